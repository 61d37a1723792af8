"""A small synchronous HTTP client for walstore (the CLI, tests and load tools use it).

stdlib only (http.client, one keep-alive connection); answers are decoded JSON plus the
HTTP status, errors are raised as ``ClientError`` carrying the status and the server's
``{code, message}`` so callers can tell a definite failure (4xx) from an unknown outcome
(timeouts, 504, a dropped connection).
"""

from __future__ import annotations

import http.client
import urllib.parse
from dataclasses import dataclass
from typing import Any

import orjson


class ClientError(Exception):
    def __init__(self, status: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


@dataclass(slots=True)
class Response:
    status: int
    body: Any
    headers: dict[str, str]


class WalstoreClient:
    def __init__(self, base_url: str, *, timeout_s: float = 10.0) -> None:
        url = urllib.parse.urlsplit(base_url if "://" in base_url else f"http://{base_url}")
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"expected http://host:port, got {base_url!r}")
        self.host = url.hostname
        self.port = url.port or 80
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> WalstoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: Any = None, *, check: bool = True) -> Response:
        data = None if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            self._conn.request(method, path, body=data, headers=headers)
            resp = self._conn.getresponse()
            raw = resp.read()
        except BaseException:
            # The connection's state is unknown after any failure: never reuse it.
            self.close()
            raise
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        ctype = resp.getheader("Content-Type", "")
        decoded: Any = orjson.loads(raw) if raw and ctype.startswith("application/json") else raw.decode()
        out = Response(resp.status, decoded, {k.lower(): v for k, v in resp.getheaders()})
        if check and resp.status >= 400:
            err = decoded.get("error", {}) if isinstance(decoded, dict) else {}
            code, message = err.get("code", "http_error"), err.get("message", str(decoded))
            raise ClientError(resp.status, code, message, decoded)
        return out

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/events", event).body
        return result

    def append_batch(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/events/batch", {"events": events}).body
        return result

    def read(self, aggregate_id: str, **params: Any) -> dict[str, Any]:
        path = f"/events/{urllib.parse.quote(aggregate_id, safe='')}"
        result: dict[str, Any] = self.request("GET", _with_query(path, params)).body
        return result

    def read_log(self, **params: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", _with_query("/events", params)).body
        return result

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/status").body
        return result

    def health(self) -> Response:
        return self.request("GET", "/health", check=False)


def _with_query(path: str, params: dict[str, Any]) -> str:
    given = {k: v for k, v in params.items() if v is not None}
    return f"{path}?{urllib.parse.urlencode(given)}" if given else path
