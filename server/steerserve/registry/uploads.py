"""Streamed request bodies under a byte limit: multipart files spooled to temp files, JSON read whole.

No web framework here: the functions take the body as an async iterator of chunks (Starlette's
`request.stream()`). Files go to temp files in the registry's uploads folder (locked `TempFile`s
like the blob store's, so a crashed server's leftovers are removed at the next start) and are deleted by
`Form.cleanup()` once the request is done. Past the limit nothing more is stored and TooLarge is
raised; see `_limited` for what happens to the rest of the body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from steerserve.registry.blobs import TempFile
from steerserve.registry.errors import InvalidInput, TooLarge

_DRAIN_CAP = 8 << 20  # read (and drop) at most this much past the limit so the client sees the 413
_MAX_FIELD_BYTES = 64 << 10
_MAX_PARTS = 16


@dataclass
class UploadedFile:
    temp: TempFile  # locked while the request lives: a restart's cleanup leaves it alone
    filename: str | None
    size: int = 0

    @property
    def path(self) -> Path:
        return self.temp.path


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)

    def cleanup(self) -> None:
        for f in self.files.values():
            f.temp.close()


_UPLOAD_LIMIT = "the upload limit"


def _too_large(limit: int, what: str) -> TooLarge:
    hint = " (max_upload_mb)" if what == _UPLOAD_LIMIT else ""
    return TooLarge(f"the request body is larger than {what} of {limit} bytes{hint}", "body")


async def _limited(
    stream: AsyncIterator[bytes], content_length: int | None, limit: int, what: str = _UPLOAD_LIMIT
) -> AsyncIterator[bytes]:
    """Chunks of the body until it passes `limit`; then TooLarge.

    NOTE: before raising, up to _DRAIN_CAP more bytes are read and dropped: a server that answers
    and closes while the client is still sending makes the client see a reset instead of the 413.
    Nothing past the limit is stored. A declared length far over the limit is refused unread.
    """
    if content_length is not None and content_length > limit + _DRAIN_CAP:
        raise _too_large(limit, what)
    total = 0
    over = False
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            over = True
            if total > limit + _DRAIN_CAP:
                break
            continue
        yield chunk
    if over:
        raise _too_large(limit, what)


async def receive_body(
    stream: AsyncIterator[bytes], content_length: int | None, limit: int, what: str = _UPLOAD_LIMIT
) -> bytearray:
    """The whole body, at most `limit` bytes (`what` names the limit in the 413)."""
    body = bytearray()  # NOTE: no list of chunks then a join: one copy of the body, not two
    async for chunk in _limited(stream, content_length, limit, what):
        body += chunk
    return body


class _FormBuilder:
    """python-multipart callbacks that fill a Form, files straight to disk."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.form = Form()
        self._headers: dict[bytes, bytes] = {}
        self._name, self._value = b"", b""
        self._field: tuple[str, bytearray] | None = None
        self._file = None
        self._parts = 0
        self.ended = False

    def on_part_begin(self) -> None:
        self._headers = {}
        self._parts += 1
        if self._parts > _MAX_PARTS:
            raise InvalidInput(f"too many parts in the multipart body (at most {_MAX_PARTS})", param="body")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", errors="replace")
        if not name:
            raise InvalidInput("a multipart part has no name", param="body")
        if name in self.form.files or name in self.form.fields:
            raise InvalidInput(f"the multipart field {name!r} appears twice", param=name)
        if b"filename" in options:
            filename = options[b"filename"].decode("utf-8", errors="replace")
            upload = UploadedFile(TempFile(self.directory), filename)
            self.form.files[name] = upload
            self._file = (upload, open(upload.path, "wb"))  # noqa: SIM115 - closed in on_part_end/close
        else:
            self._field = (name, bytearray())

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        # NOTE: plain blocking writes: they land in the page cache, far cheaper than a thread hop per chunk.
        if self._file is not None:
            upload, handle = self._file
            handle.write(data[start:end])
            upload.size += end - start
        elif self._field is not None:
            name, buf = self._field
            buf += data[start:end]
            if len(buf) > _MAX_FIELD_BYTES:
                raise InvalidInput(f"form field {name!r} is longer than {_MAX_FIELD_BYTES} bytes", param=name)

    def on_part_end(self) -> None:
        if self._file is not None:
            self._file[1].close()
            self._file = None
        elif self._field is not None:
            name, buf = self._field
            self.form.fields[name] = buf.decode("utf-8", errors="replace")
            self._field = None

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self._file is not None:
            self._file[1].close()
            self._file = None


async def receive_form(
    stream: AsyncIterator[bytes], content_type: str, content_length: int | None, limit: int, directory: Path
) -> Form:
    """Parse a multipart/form-data body, files spooled to `directory`; the caller must `cleanup()`."""
    mime, params = parse_options_header(content_type)
    if mime != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidInput("expected a multipart/form-data body with a boundary", param="content-type")
    builder = _FormBuilder(directory)
    callbacks = {n: getattr(builder, n) for n in dir(builder) if n.startswith("on_")}
    parser = MultipartParser(params[b"boundary"], callbacks)
    try:
        async for chunk in _limited(stream, content_length, limit):
            parser.write(chunk)
        parser.finalize()
        if not builder.ended:
            raise InvalidInput("the multipart body ended before its closing boundary", param="body")
    except MultipartParseError as exc:
        builder.close()
        builder.form.cleanup()
        raise InvalidInput(f"malformed multipart body: {exc}", param="body") from None
    except BaseException:
        builder.close()
        builder.form.cleanup()
        raise
    builder.close()
    return builder.form
