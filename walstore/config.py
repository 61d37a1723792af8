"""Frozen, validated settings for one node: environment variables, CLI flags, defaults.

The seed's variables keep their names and defaults (NODE_ID, HTTP_PORT, DATA_DIR,
ETCD_ENDPOINTS, SERVICE_NAME, NAMESPACE). Additions: PEER_PORT, CLUSTER_SIZE, PEERS,
CLUSTER_ID, HTTP_HOST, PEER_HOST, LEASE_TTL_S, SEGMENT_SIZE_BYTES, MAX_BODY_BYTES,
HTTP_HEADER_TIMEOUT_S, HTTP_IDLE_TIMEOUT_S, HTTP_MAX_CONNECTIONS, PROBE_PORT, LOG_LEVEL,
MAX_BATCH_EVENTS, MAX_BATCH_BYTES.

With no peers (CLUSTER_SIZE=1 and PEERS empty) the node runs alone, leads itself and needs
no etcd: the embedded default. With CLUSTER_SIZE=N>1 and no PEERS, the peers are the
StatefulSet's stable DNS names ``{SERVICE_NAME}-{i}.{SERVICE_NAME}.{NAMESPACE}.svc.cluster.local``.
Bad values are errors at start-up (ConfigError), never surprises later.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from walstore.errors import ConfigError
from walstore.event import MAX_BATCH_EVENTS
from walstore.protocol.frames import MAX_FRAME_BYTES
from walstore.protocol.messages import MAX_APPEND_ENTRIES_BYTES

REPLICATION_FRAME_BYTES = min(4 << 20, MAX_APPEND_ENTRIES_BYTES)

# Every variable `walstore serve` reads; the k8s manifest test checks the StatefulSet
# against this set so the two cannot drift apart.
ENV_VARS = (
    "NODE_ID",
    "HTTP_PORT",
    "DATA_DIR",
    "ETCD_ENDPOINTS",
    "SERVICE_NAME",
    "NAMESPACE",
    "PEER_PORT",
    "CLUSTER_SIZE",
    "PEERS",
    "CLUSTER_ID",
    "HTTP_HOST",
    "PEER_HOST",
    "LEASE_TTL_S",
    "SEGMENT_SIZE_BYTES",
    "MAX_BODY_BYTES",
    "HTTP_HEADER_TIMEOUT_S",
    "HTTP_IDLE_TIMEOUT_S",
    "HTTP_MAX_CONNECTIONS",
    "PROBE_PORT",
    "LOG_LEVEL",
    "MAX_BATCH_EVENTS",
    "MAX_BATCH_BYTES",
    "REPLICATION_FRAME_BYTES",
)

# A batch travels whole in one frame twice: as FORWARD (its events as JSON, follower to
# leader) and, from the leader's memory, as one APPEND (its records). Either is at most
# the request body plus this much per event (a generated 36-byte id and the JSON keys
# around it in FORWARD; 32 record header + 32 body prefix + a generated id + "{}" metadata
# + 7 padding in APPEND), plus BATCH_FRAME_SLACK_BYTES (the tracking record, frame
# headers). validate() keeps MAX_BATCH_BYTES + MAX_BATCH_EVENTS * this within one frame.
BATCH_EVENT_OVERHEAD_BYTES = 160
BATCH_FRAME_SLACK_BYTES = 64 * 1024
MAX_BATCH_EVENTS_LIMIT = 100_000  # one state-machine step per event, on the event loop

# The names logging.basicConfig takes; anything else would make the node die at start-up
# with a traceback from inside logging instead of a ConfigError naming the variable.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HOSTPORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True, slots=True)
class PeerSpec:
    node_id: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Config:
    node_id: str = "event-store-0"  # seed default; in k8s the pod name
    http_host: str = "0.0.0.0"  # all interfaces: in a pod the probes come from the kubelet
    http_port: int = 8080  # seed default
    data_dir: Path = Path("/data/wal")  # seed default; the PVC mount in k8s
    etcd_endpoints: tuple[str, ...] = ("localhost:2379",)  # seed default; unused when alone
    service_name: str = "event-store"  # seed default; StatefulSet and headless Service name
    namespace: str = "default"  # seed default
    peer_host: str = "0.0.0.0"
    peer_port: int = 7070  # the binary peer protocol
    cluster_size: int = 1  # 1 = embedded single node, no etcd
    cluster_id: str = "event-store"  # peers with another id are refused at HELLO
    peers: tuple[PeerSpec, ...] = ()  # every member, this node included
    lease_ttl_s: float = 2.0  # etcd lease: failover time vs. false step-downs on GC/IO stalls
    segment_size_bytes: int = 64 * 1024 * 1024  # fewer files vs. time to pre-allocate one
    max_body_bytes: int = 1024 * 1024  # one HTTP request body; larger -> 413
    http_header_timeout_s: float = 10.0  # a request head must arrive within this (slowloris)
    http_idle_timeout_s: float = 60.0  # keep-alive connections idle longer are closed
    http_max_connections: int = 10_000  # beyond: 503 and close; keeps file descriptors for peers
    # Health and /metrics only, with their own connection cap (walstore.http.server). Off
    # (None) by default: a node run by hand needs no second port, and binding one unasked
    # could collide with something; the Kubernetes manifests turn it on. 0 = any free port.
    probe_port: int | None = None
    log_level: str = "INFO"
    # POST /events/batch: at most this many events (400 too_many_events) and a body of at
    # most this many bytes (413 batch_too_large, refused from Content-Length unread).
    # POST /events keeps max_body_bytes.
    max_batch_events: int = MAX_BATCH_EVENTS
    max_batch_bytes: int = 16 * 1024 * 1024
    # Most record bytes a leader sends in one APPEND (a batch bigger than this still goes
    # whole): what a follower holds per frame in flight, against frames per catch-up.
    replication_frame_bytes: int = REPLICATION_FRAME_BYTES

    @property
    def clustered(self) -> bool:
        return len(self.peers) > 1

    @property
    def me(self) -> PeerSpec | None:
        return next((p for p in self.peers if p.node_id == self.node_id), None)

    def validate(self) -> Config:
        if not _NODE_ID.match(self.node_id):
            raise ConfigError(f"NODE_ID {self.node_id!r}: letters, digits, '.', '_', '-' (max 63)")
        ports = [("HTTP_PORT", self.http_port), ("PEER_PORT", self.peer_port)]
        if self.probe_port is not None:
            ports.append(("PROBE_PORT", self.probe_port))
        for name, port in ports:
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} {port} is not a TCP port")
        if self.probe_port and self.probe_port in (self.http_port, self.peer_port):
            raise ConfigError(f"PROBE_PORT {self.probe_port} is also HTTP_PORT or PEER_PORT")
        if self.cluster_size < 1 or self.cluster_size > 15:
            raise ConfigError(f"CLUSTER_SIZE {self.cluster_size}: between 1 and 15")
        ids = [p.node_id for p in self.peers]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"PEERS names a node twice: {ids}")
        if self.peers and self.node_id not in ids:
            raise ConfigError(f"NODE_ID {self.node_id!r} is not one of PEERS {ids}")
        if not 0.2 <= self.lease_ttl_s <= 60:
            raise ConfigError(f"LEASE_TTL_S {self.lease_ttl_s}: between 0.2 and 60 seconds")
        if not 1 << 20 <= self.segment_size_bytes <= 1 << 32:
            raise ConfigError("SEGMENT_SIZE_BYTES: between 1 MiB and 4 GiB")
        if not 1024 <= self.max_body_bytes <= 64 << 20:
            raise ConfigError("MAX_BODY_BYTES: between 1 KiB and 64 MiB")
        if not 0.1 <= self.http_header_timeout_s <= 600 or not 0.1 <= self.http_idle_timeout_s <= 3600:
            raise ConfigError("HTTP_HEADER_TIMEOUT_S: 0.1-600 s; HTTP_IDLE_TIMEOUT_S: 0.1-3600 s")
        if not 1 <= self.http_max_connections <= 1_000_000:
            raise ConfigError("HTTP_MAX_CONNECTIONS: between 1 and 1,000,000")
        if not 1 <= self.max_batch_events <= MAX_BATCH_EVENTS_LIMIT:
            raise ConfigError(f"MAX_BATCH_EVENTS {self.max_batch_events}: between 1 and {MAX_BATCH_EVENTS_LIMIT:,}")
        if not 1024 <= self.max_batch_bytes <= MAX_FRAME_BYTES:
            raise ConfigError(f"MAX_BATCH_BYTES {self.max_batch_bytes}: between 1 KiB and 32 MiB (see below)")
        frame = self.max_batch_bytes + self.max_batch_events * BATCH_EVENT_OVERHEAD_BYTES + BATCH_FRAME_SLACK_BYTES
        if frame > MAX_FRAME_BYTES:
            raise ConfigError(
                f"MAX_BATCH_BYTES {self.max_batch_bytes} with MAX_BATCH_EVENTS {self.max_batch_events}: the largest "
                f"batch ({frame} bytes forwarded or replicated) would not fit one peer frame ({MAX_FRAME_BYTES})"
            )
        if not 64 << 10 <= self.replication_frame_bytes <= MAX_APPEND_ENTRIES_BYTES:
            raise ConfigError(
                f"REPLICATION_FRAME_BYTES {self.replication_frame_bytes}: between 64 KiB and {MAX_APPEND_ENTRIES_BYTES}"
            )
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL {self.log_level!r}: one of {', '.join(LOG_LEVELS)}")
        if self.clustered and not self.etcd_endpoints:
            raise ConfigError("a cluster needs ETCD_ENDPOINTS")
        return self


def parse_peers(text: str) -> tuple[PeerSpec, ...]:
    """``id=host:port,id=host:port`` -> PeerSpecs."""
    peers = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        node_id, sep, hostport = item.partition("=")
        m = _HOSTPORT.match(hostport)
        if not sep or not m or not _NODE_ID.match(node_id):
            raise ConfigError(f"PEERS entry {item!r}: expected id=host:port")
        peers.append(PeerSpec(node_id, m["host"].strip("[]"), int(m["port"])))
    return tuple(peers)


def derived_peers(service: str, namespace: str, size: int, port: int) -> tuple[PeerSpec, ...]:
    """The StatefulSet's stable DNS names: pod ``{service}-{i}`` behind headless ``{service}``."""
    return tuple(
        PeerSpec(f"{service}-{i}", f"{service}-{i}.{service}.{namespace}.svc.cluster.local", port) for i in range(size)
    )


def _split(text: str) -> tuple[str, ...]:
    return tuple(e.strip() for e in text.split(",") if e.strip())


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def from_env(env: Mapping[str, str] | None = None, **overrides: object) -> Config:
    """Settings from the environment, then explicit overrides (CLI flags; None = not given)."""
    env = os.environ if env is None else env
    d = Config()
    cfg = Config(
        node_id=env.get("NODE_ID", "").strip() or d.node_id,
        http_host=env.get("HTTP_HOST", "").strip() or d.http_host,
        http_port=_int(env, "HTTP_PORT", d.http_port),
        data_dir=Path(env.get("DATA_DIR", "").strip() or d.data_dir),
        etcd_endpoints=_split(env.get("ETCD_ENDPOINTS", "")) or d.etcd_endpoints,
        service_name=env.get("SERVICE_NAME", "").strip() or d.service_name,
        namespace=env.get("NAMESPACE", "").strip() or d.namespace,
        peer_host=env.get("PEER_HOST", "").strip() or d.peer_host,
        peer_port=_int(env, "PEER_PORT", d.peer_port),
        cluster_size=_int(env, "CLUSTER_SIZE", d.cluster_size),
        cluster_id=env.get("CLUSTER_ID", "").strip() or d.cluster_id,
        lease_ttl_s=_float(env, "LEASE_TTL_S", d.lease_ttl_s),
        segment_size_bytes=_int(env, "SEGMENT_SIZE_BYTES", d.segment_size_bytes),
        max_body_bytes=_int(env, "MAX_BODY_BYTES", d.max_body_bytes),
        http_header_timeout_s=_float(env, "HTTP_HEADER_TIMEOUT_S", d.http_header_timeout_s),
        http_idle_timeout_s=_float(env, "HTTP_IDLE_TIMEOUT_S", d.http_idle_timeout_s),
        http_max_connections=_int(env, "HTTP_MAX_CONNECTIONS", d.http_max_connections),
        probe_port=_int(env, "PROBE_PORT", -1) if env.get("PROBE_PORT", "").strip() else d.probe_port,
        log_level=env.get("LOG_LEVEL", "").strip().upper() or d.log_level,
        max_batch_events=_int(env, "MAX_BATCH_EVENTS", d.max_batch_events),
        max_batch_bytes=_int(env, "MAX_BATCH_BYTES", d.max_batch_bytes),
        replication_frame_bytes=_int(env, "REPLICATION_FRAME_BYTES", d.replication_frame_bytes),
    )
    given = {k: v for k, v in overrides.items() if v is not None}
    peers_text = given.pop("peers", None) or env.get("PEERS", "")
    if "data_dir" in given:
        given["data_dir"] = Path(str(given["data_dir"]))
    if "log_level" in given:
        given["log_level"] = str(given["log_level"]).strip().upper()
    if "etcd_endpoints" in given and isinstance(given["etcd_endpoints"], str):
        given["etcd_endpoints"] = _split(str(given["etcd_endpoints"]))
    unknown = set(given) - set(Config.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown settings: {sorted(unknown)}")
    cfg = replace(cfg, **given)  # type: ignore[arg-type]
    peers = parse_peers(str(peers_text)) if peers_text else ()
    if not peers and cfg.cluster_size > 1:
        peers = derived_peers(cfg.service_name, cfg.namespace, cfg.cluster_size, cfg.peer_port)
    if peers:
        cfg = replace(cfg, peers=peers, cluster_size=len(peers))
    return cfg.validate()
