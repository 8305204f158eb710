"""What the registry may hold: bounded integers, finite floats, valid Unicode, bounded plain JSON.

Two doors, one set of rules:
- `parse_json` / `parse_json_or_lines` / `parse_uint`: client text (bodies, cfg files, form and query
  fields) -> values, refusing what Python's parsers let through but nothing downstream can take:
  `NaN`/`Infinity` literals, numbers that overflow to inf, integers outside int64 (SQLite's INTEGER),
  lone UTF-16 surrogates (`"\\ud800"`: not encodable as UTF-8), nesting deeper than MAX_DEPTH
  (RecursionError) and digits that `str.isdigit()` accepts but `int()` does not (`"²"`).
- `check_int` / `check_float` / `check_text` / `check_json`: the same rules on values about to be
  stored; every record (records.py) runs them when it is built, so a write that would store
  something the database or a JSON response cannot hold fails before anything is committed.
Every error is an InvalidInput naming the parameter (a path into the document: `steering[0].extra`).
"""

from __future__ import annotations

import json
import math

from steerserve.registry.errors import InvalidInput

INT64_MAX = (1 << 63) - 1
MAX_DEPTH = 32  # no registry document nests beyond ~6; deeper is hostile
_MAX_UINT_DIGITS = len(str(INT64_MAX))


def _join(param: str, key: object) -> str:
    if isinstance(key, int):
        return f"{param}[{key}]"
    return f"{param}.{key}" if param else str(key)


def check_int(value: object, param: str, lo: int = 0, hi: int = INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        big = isinstance(value, int) and value.bit_length() > 100  # str() of a huge int is itself slow
        shown = f"an integer of {value.bit_length()} bits" if big else repr(value)
        raise InvalidInput(f"{param} must be an integer in {lo}..{hi}, got {shown}", param=param or None)
    return value


def check_float(value: object, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{param} must be a finite number, got {value!r}", param=param or None)
    return float(value)


def check_text(value: object, param: str, max_chars: int | None = None) -> str:
    """A str that UTF-8 (the database, every response) can encode, of at most `max_chars`."""
    if not isinstance(value, str):
        raise InvalidInput(f"{param} must be a string, got {type(value).__name__}", param=param or None)
    if max_chars is not None and len(value) > max_chars:
        raise InvalidInput(f"{param} is longer than {max_chars} characters", param=param or None)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(
                f"{param} holds a lone UTF-16 surrogate (like \\ud800), which is not valid Unicode",
                param=param or None,
            ) from None
    return value


def _scalar_ok(v: object) -> bool:
    """The common case, checked without building a path: a plain JSON scalar within bounds."""
    t = type(v)
    if t is str:
        return v.isascii() or _encodable(v)
    if t is float:
        return math.isfinite(v)
    if t is int:
        return -INT64_MAX - 1 <= v <= INT64_MAX
    return v is None or t is bool


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_scalar(item: object, where: str) -> None:
    """Raise the InvalidInput naming `where` for a scalar `_scalar_ok` refused."""
    if isinstance(item, bool) or item is None:
        return
    if isinstance(item, int):
        check_int(item, where, -INT64_MAX - 1)
    elif isinstance(item, float):
        check_float(item, where)
    elif isinstance(item, str):
        check_text(item, where)
    else:
        raise InvalidInput(f"{where} must be plain JSON, got {type(item).__name__}", param=where or None)


def check_plain(value: object, param: str) -> None:
    """Plain, bounded JSON data: dicts with str keys, lists, valid str, int64 ints, finite floats,
    bools, None; nested at most MAX_DEPTH deep. Errors name the path (`param.key[3]`); paths are only
    built for containers and for the value refused, so a million-float list costs no million strings."""
    stack: list[tuple[object, str, int]] = [(value, param, 0)]
    while stack:
        item, where, depth = stack.pop()
        is_dict = isinstance(item, dict)
        if not is_dict and not isinstance(item, (list, tuple)):
            _check_scalar(item, where)
            continue
        if depth >= MAX_DEPTH:
            raise InvalidInput(
                f"{param or 'the document'} nests deeper than {MAX_DEPTH} levels (at {where[:60]}...)",
                param=param or None,
            )
        if not is_dict and _plain_numbers(item):
            continue
        for key, sub in item.items() if is_dict else enumerate(item):
            if is_dict and not (type(key) is str and _scalar_ok(key)):
                check_text(key, f"{where} (a key)" if where else "a key")
            if isinstance(sub, (dict, list, tuple)):
                stack.append((sub, _join(where, key), depth + 1))
            elif not _scalar_ok(sub):
                _check_scalar(sub, _join(where, key))


def _plain_numbers(items: list | tuple) -> bool:
    """True for a list of only finite floats or only int64 ints, checked at C speed (vectors)."""
    kinds = set(map(type, items))
    if kinds == {float}:
        return all(map(math.isfinite, items))
    if kinds == {int}:
        return min(items) >= -INT64_MAX - 1 and max(items) <= INT64_MAX
    return False


def check_json(value: object, param: str, max_bytes: int) -> str:
    """`value` (checked with check_plain) as the canonical JSON text to store, at most `max_bytes`."""
    check_plain(value, param)
    text = dumps(value)
    if len(text) > max_bytes:
        raise InvalidInput(
            f"{param or 'the document'} is over {max_bytes} bytes as JSON", param=param or None
        )
    return text


def dumps(value: object, sort_keys: bool = True) -> str:
    """The JSON text the store writes (never NaN: records were checked, this is the last guard)."""
    return json.dumps(value, sort_keys=sort_keys, allow_nan=False)


# ---- parsing client text --------------------------------------------------------------------------


def _loads(text: str) -> object:
    # NOTE: `NaN` / `Infinity` literals and overflowing numbers like 1e999 parse to non-finite floats;
    # check_plain then refuses them, naming their path (`vector[0]`), which a parse hook could not
    return json.loads(text)


def _parse(data: bytes | bytearray | str, param: str) -> object:
    try:
        return _loads(data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{param} is not valid UTF-8: {exc}", param=param) from None
    except RecursionError:
        raise InvalidInput(f"{param} nests deeper than {MAX_DEPTH} levels", param=param) from None
    except ValueError as exc:  # JSONDecodeError, > 4300-digit ints
        raise InvalidInput(f"{param} is not valid JSON: {exc}", param=param) from None


def _checked(value: object, param: str) -> object:
    """check_plain with paths relative to the document (`features[3].index`, `steering[0].x`)."""
    try:
        check_plain(value, "" if param == "body" else param)
    except InvalidInput as exc:
        raise InvalidInput(exc.message, param=exc.param or param) from None
    return value


def parse_json(data: bytes | bytearray | str, param: str = "body", max_bytes: int | None = None) -> object:
    """Strict JSON from client text, checked like a stored value (check_plain)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidInput(f"{param} is larger than {max_bytes} bytes", param=param)
    return _checked(_parse(data, param), param)


def parse_json_or_lines(data: bytes | bytearray | str, param: str) -> object:
    """A JSON document, or JSON Lines (one document per non-empty line) as a list; checked alike."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{param} is not valid UTF-8: {exc}", param=param) from None
    try:
        value = _parse(text, param)
    except InvalidInput as whole:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) < 2:
            raise
        value = []
        for n, line in enumerate(lines):
            try:
                value.append(_parse(line, param))
            except InvalidInput as exc:
                if n == 0:  # not JSON Lines either: the error of the whole document is the useful one
                    raise whole from None
                raise InvalidInput(f"line {n + 1}: {exc.message}", param=param) from None
    return _checked(value, param)


def parse_uint(text: str, param: str, hi: int = INT64_MAX) -> int:
    """An ASCII decimal integer in 0..hi (`"²"` passes `str.isdigit()` but is not a number)."""
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()) or len(digits) > _MAX_UINT_DIGITS:
        raise InvalidInput(f"{param} must be an integer in 0..{hi}, got {text[:40]!r}", param=param)
    return check_int(int(digits), param, 0, hi)


def is_uint(text: str) -> bool:
    """True for text `parse_uint` reads (ASCII digits); decides 'layer number or hook name'."""
    digits = text.strip()
    return bool(digits) and digits.isascii() and digits.isdigit()
