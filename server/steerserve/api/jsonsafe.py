"""JSON out, always valid: every response body and every SSE event goes through `dumps`.

Python's json writes NaN / Infinity (not JSON) and starlette's JSONResponse raises on them (a 500). Here a
non-finite float is replaced instead, structurally, wherever it sits: -inf becomes -9999.0 and +inf
9999.0 (vLLM's floor for the logprob of an impossible token), NaN becomes null. The common case (nothing
to replace) costs one json.dumps.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi.responses import JSONResponse

FLOAT_LIMIT = 9999.0  # what +-inf is written as


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced (containers copied, other values as they are)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else math.copysign(FLOAT_LIMIT, value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a non-finite float somewhere
        return json.dumps(finite(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class SafeJSONResponse(JSONResponse):
    """The app's default response class: JSON bodies without NaN / Infinity."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8", errors="replace")
