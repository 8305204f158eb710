"""What uvicorn's access log may show of a request line: never the query string of an API route.

Keys sent as `?api_key=...` are refused (auth reads only the Authorization header), but uvicorn logged
the full request target, so a key a client put in a URL ended up in the log verbatim. The filter drops
the query string of every `/v1` and `/generate` request (it may hold prompts or ids, too) and, on the
other routes, replaces the value of every credential-looking parameter with `REDACTED`.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, urlencode

_API_PATH = re.compile(r"^/(v1|generate)(/|$)")
_CREDENTIAL = re.compile(r"key|token|secret|passw|auth|bearer|session|sig|credential", re.IGNORECASE)
_ARG_TARGET = 2  # uvicorn's access record args: (client, method, target, http_version, status)


def safe_target(target: str) -> str:
    """The request target as it may be logged."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    if _API_PATH.match(path):
        return path
    params = parse_qsl(query, keep_blank_values=True)
    return f"{path}?{urlencode([(k, 'REDACTED' if _CREDENTIAL.search(k) else v) for k, v in params])}"


class QueryRedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) > _ARG_TARGET and isinstance(args[_ARG_TARGET], str):
            record.args = (*args[:_ARG_TARGET], safe_target(args[_ARG_TARGET]), *args[_ARG_TARGET + 1 :])
        return True


def install() -> None:
    """Put the filter on uvicorn's access logger (after uvicorn configured its logging)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QueryRedactingFilter) for f in access.filters):
        access.addFilter(QueryRedactingFilter())
