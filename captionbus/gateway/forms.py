"""Multipart (and url-encoded) request bodies, parsed as they arrive, with a limit on every part.

The `file` part streams onto disk under the gateway's upload dir (next to the artifact root,
so the store hardlinks it: a 1 GB upload never sits in memory and is written once); every other
part is a form field held in memory, refused with 413 the moment it passes its limit (a 5 MB
`language` used to be read whole and echoed back in the 400). Other file parts are dropped
unread. python-multipart's low-level `MultipartParser` does the framing; what goes where is here.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from captionbus.web.errors import ApiError, body_read

FIELD_LIMIT = 4 * 1024  # bytes: a language code, a model name, a URL, a path
# A known speaker's reference clip is a data URL of 2-10 s of audio (OpenAI's known_speaker_references[]):
# 10 s of 48 kHz stereo 16-bit WAV is 1.9 MB, 2.6 MB in base64; four of them fit in the total.
REFERENCE_LIMIT = 3 * 1024 * 1024
FIELD_LIMITS = {"options": 1024 * 1024, "prompt": 64 * 1024,  # JSON options (glossaries) inline; a prompt
                "known_speaker_references[]": REFERENCE_LIMIT, "known_speaker_references": REFERENCE_LIMIT}
FIELDS_TOTAL = 14 * 1024 * 1024  # all fields together (2 MB + four reference clips)


@dataclass
class Upload:
    path: Path
    filename: str
    size: int


@dataclass
class Form:
    fields: dict[str, list[str]]
    upload: Upload | None

    def one(self, name: str, default: str | None = None) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else default

    def many(self, *names: str) -> list[str]:
        return [value for name in names for value in self.fields.get(name, [])]

    def cleanup(self) -> None:
        if self.upload is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.upload.path)


def limit_of(name: str) -> int:
    return FIELD_LIMITS.get(name, FIELD_LIMIT)


def too_big(name: str) -> ApiError:
    return ApiError(413, f"form field {name[:64]!r} is over its limit of {limit_of(name)} bytes "
                         "(files go in the `file` part)")


class _Parts:
    """MultipartParser callbacks: headers -> a part's name/filename; data -> field buffer or file."""

    def __init__(self, upload_dir: Path):
        self.upload_dir = upload_dir
        self.fields: dict[str, list[str]] = {}
        self.upload: Upload | None = None
        self.total = 0
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._buffer: bytearray | None = None
        self._file = None
        self._file_name = ""
        self._size = 0

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._field, "on_header_value": self._value,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self._headers, self._header_name, self._header_value = {}, b"", b""
        self._buffer, self._file = None, None

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = (options.get(b"name") or b"").decode(errors="replace")
        filename = options.get(b"filename")
        if filename is None:
            self._buffer = bytearray()
        elif self._name == "file" and self.upload is None and self._file is None:
            self._file = tempfile.NamedTemporaryFile(dir=self.upload_dir, prefix="upload-", delete=False)  # noqa: SIM115
            self._file_name = os.path.basename(filename.decode(errors="replace")) or "upload"
            self._size = 0
        # any other file part: dropped unread

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._buffer is not None:
            self._buffer += data[start:end]
            self.total += end - start
            if len(self._buffer) > limit_of(self._name):
                raise too_big(self._name)
            if self.total > FIELDS_TOTAL:
                raise ApiError(413, f"form fields are over {FIELDS_TOTAL} bytes together")
        elif self._file is not None:
            self._file.write(data[start:end])
            self._size += end - start

    def _end(self) -> None:
        if self._buffer is not None:
            self.fields.setdefault(self._name, []).append(self._buffer.decode(errors="replace"))
            self._buffer = None
        elif self._file is not None:
            self._file.close()
            self.upload = Upload(Path(self._file.name), self._file_name, self._size)
            self._file = None

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file.name)
        if self.upload is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.upload.path)


async def read_form(request: Request, max_upload_bytes: int, upload_dir: Path) -> Form:
    """The request's form; ApiError (400 malformed, 413 over a limit) otherwise, leaving no file behind."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";", 1)[0].strip().lower()
    limit = max_upload_bytes + FIELDS_TOTAL
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload of {int(declared)} bytes is over this gateway's limit of {max_upload_bytes} bytes")
    if kind == "application/x-www-form-urlencoded":
        return await _read_urlencoded(request)
    if kind != "multipart/form-data":
        raise ApiError(400, "send multipart/form-data (a `file` part and form fields)")
    _, params = parse_options_header(content_type)
    if not params.get(b"boundary"):
        raise ApiError(400, "multipart/form-data without a boundary")
    upload_dir.mkdir(parents=True, exist_ok=True)
    parts = _Parts(upload_dir)
    received = 0
    try:
        parser = MultipartParser(params[b"boundary"], parts.callbacks())
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise ApiError(413, f"upload is over this gateway's limit of {max_upload_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
        body_read(request)
        if parts.upload is not None and parts.upload.size > max_upload_bytes:
            raise ApiError(413, f"upload is over this gateway's limit of {max_upload_bytes} bytes")
    except ApiError:
        parts.discard()
        raise
    except Exception as e:  # noqa: BLE001  the parser raises several types for a malformed body
        parts.discard()
        raise ApiError(400, f"malformed multipart body: {e}") from None
    return Form(parts.fields, parts.upload)


async def _read_urlencoded(request: Request) -> Form:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > FIELDS_TOTAL:
            raise ApiError(413, f"form fields are over {FIELDS_TOTAL} bytes together")
    body_read(request)
    fields: dict[str, list[str]] = {}
    for name, value in parse_qsl(body.decode(errors="replace"), keep_blank_values=True):
        if len(value.encode()) > limit_of(name):
            raise too_big(name)
        fields.setdefault(name, []).append(value)
    return Form(fields, None)


def parse_options(raw: str | None) -> dict:
    """`options` is the JSON form of `-o` flags: {"asr": {"model": "base"}, "vad": "pyannote"}."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"options is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ApiError(400, 'options must be a JSON object such as {"asr": {"model": "base"}}')
    return value


def split_languages(raw: str | None) -> list[str]:
    return [code.strip() for code in (raw or "").split(",") if code.strip()]
