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
FIELD_LIMITS = {"options": 1024 * 1024, "prompt": 64 * 1024}  # JSON options (glossaries) inline; a prompt
FIELDS_TOTAL = 2 * 1024 * 1024  # every field but reference clips, together, on every route
# A known speaker's reference clip is a data URL of 2-10 s of audio (OpenAI's known_speaker_references[]):
# 10 s of 48 kHz stereo 16-bit WAV is 1.9 MB, 2.6 MB in base64. Only the routes that take known
# speakers (read_form(references=True): POST /v1/jobs, /v1/audio/transcriptions) accept them, each
# up to REFERENCE_LIMIT and all of them up to REFERENCES_TOTAL (four full-size clips; more, shorter or
# compressed clips fit too), counted apart from FIELDS_TOTAL: a gateway holds at most
# FIELDS_TOTAL of fields in memory per request elsewhere (it was 14 MB on every route, clips included).
REFERENCE_FIELDS = frozenset({"known_speaker_references[]", "known_speaker_references"})
REFERENCE_LIMIT = 3 * 1024 * 1024
REFERENCES_TOTAL = 4 * REFERENCE_LIMIT


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


def limit_of(name: str, references: bool = False) -> int:
    if references and name in REFERENCE_FIELDS:
        return REFERENCE_LIMIT
    return FIELD_LIMITS.get(name, FIELD_LIMIT)


def too_big(name: str, references: bool = False) -> ApiError:
    return ApiError(413, f"form field {name[:64]!r} is over its limit of {limit_of(name, references)} bytes "
                         "(files go in the `file` part)")


class _Totals:
    """Bytes of form fields so far: reference clips (where the route takes them) apart from the rest."""

    def __init__(self, references: bool):
        self.references = references
        self.fields = 0
        self.clips = 0

    def add(self, name: str, size: int) -> None:
        if self.references and name in REFERENCE_FIELDS:
            self.clips += size
            if self.clips > REFERENCES_TOTAL:
                raise ApiError(413, f"known speakers' reference clips are over {REFERENCES_TOTAL} bytes together")
        else:
            self.fields += size
            if self.fields > FIELDS_TOTAL:
                raise ApiError(413, f"form fields are over {FIELDS_TOTAL} bytes together")

    @property
    def limit(self) -> int:
        """The most bytes of fields a body may hold."""
        return FIELDS_TOTAL + (REFERENCES_TOTAL if self.references else 0)


class _Parts:
    """MultipartParser callbacks: headers -> a part's name/filename; data -> field buffer or file."""

    def __init__(self, upload_dir: Path, references: bool):
        self.upload_dir = upload_dir
        self.fields: dict[str, list[str]] = {}
        self.upload: Upload | None = None
        self.totals = _Totals(references)
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
            if len(self._buffer) > limit_of(self._name, self.totals.references):
                raise too_big(self._name, self.totals.references)
            self.totals.add(self._name, end - start)
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


async def read_form(request: Request, max_upload_bytes: int, upload_dir: Path, references: bool = False) -> Form:
    """The request's form; ApiError (400 malformed, 413 over a limit) otherwise, leaving no file behind.
    `references`: the route takes known speakers' reference clips (REFERENCE_FIELDS, REFERENCES_TOTAL)."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";", 1)[0].strip().lower()
    limit = max_upload_bytes + _Totals(references).limit
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload of {int(declared)} bytes is over this gateway's limit of {max_upload_bytes} bytes")
    if kind == "application/x-www-form-urlencoded":
        return await _read_urlencoded(request, references)
    if kind != "multipart/form-data":
        raise ApiError(400, "send multipart/form-data (a `file` part and form fields)")
    _, params = parse_options_header(content_type)
    if not params.get(b"boundary"):
        raise ApiError(400, "multipart/form-data without a boundary")
    upload_dir.mkdir(parents=True, exist_ok=True)
    parts = _Parts(upload_dir, references)
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


async def _read_urlencoded(request: Request, references: bool) -> Form:
    totals = _Totals(references)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > totals.limit:
            raise ApiError(413, f"form fields are over {totals.limit} bytes together")
    body_read(request)
    fields: dict[str, list[str]] = {}
    for name, value in parse_qsl(body.decode(errors="replace"), keep_blank_values=True):
        size = len(value.encode())
        if size > limit_of(name, references):
            raise too_big(name, references)
        totals.add(name, size)
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
