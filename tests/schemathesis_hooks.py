"""Schemathesis hooks for tests/test_openapi.py (loaded through ``SCHEMATHESIS_HOOKS``).

``min_index`` makes a read wait until that index is applied, up to 10 s, and then answer
503 ``min_index_timeout``: documented, but a 5xx, and ten seconds per case. A generated
``min_index`` above what the node holds is therefore lowered to 1 (the test appends an
event first, so 1 is applied). Every other value, and every malformed one, goes as
generated; the 503 itself is tested in tests/test_http_api.py.
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    query = case.query
    if not isinstance(query, dict):
        return
    value = query.get("min_index")
    # generated as an int, or (coverage phase) as the text that will be sent
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 1:
        query["min_index"] = 1
