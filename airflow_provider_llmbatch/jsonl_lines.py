"""
Request files line by line: the strict JSON codec, the chunked line scanner and the rules.

:func:`scan_lines` reads a file in chunks and yields its lines, hashing the bytes on the way
(:class:`Tally`). :class:`RequestChecker` holds the state of one pass over a request file (line
numbers, the first model, keys of the custom ids seen) and turns every broken rule into one
readable problem: ``line N: <field>: expected <...>, got <...>`` or ``file: <field>: ...``. It
never sees the whole file: :mod:`airflow_provider_llmbatch.jsonl` feeds it line by line, while
reading a file or while writing one. All vendor differences come from the :class:`VendorSpec`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import queue
import re
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any

from airflow_provider_llmbatch.exceptions import InvalidInputError, InvalidRequestFileError
from airflow_provider_llmbatch.vendors import REGISTRY, EndpointSpec, VendorSpec

LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})
"""The keys of a request line; vendors document no others."""

_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 20
_CPUS = os.cpu_count() or 1
_OPEN_BRACE = 0x7B
_MISSING: Any = object()
_crc32 = zlib.crc32
_MSGSPEC_OFFSET = re.compile(r"\(byte (\d+)\)")
_JSON_TYPES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def is_utf8(raw: bytes) -> bool:
    """Return whether ``raw`` is valid UTF-8."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def json_loads(raw: bytes) -> Any:
    """Parse one JSON document strictly with the standard library: UTF-8 only, no NaN or Infinity."""
    return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)


def json_dumps(value: Any) -> bytes:
    """Serialize compactly with the standard library, keeping non-ASCII text as UTF-8."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _select_codec() -> tuple[Callable[[bytes], Any], Callable[[Any], bytes], tuple[type[Exception], ...]]:
    """Return the fastest strict JSON parser and serializer available, with the errors they raise."""
    try:
        import msgspec
    except ImportError:  # pragma: no cover - msgspec comes with Airflow, the fallback is for slim installs
        return json_loads, json_dumps, (ValueError, TypeError, RecursionError)
    # msgspec rejects NaN/Infinity and checks UTF-8 while parsing, so it is strict by itself.
    decode: Callable[[bytes], Any] = msgspec.json.Decoder().decode
    encode: Callable[[Any], bytes] = msgspec.json.Encoder().encode
    # Both parsers stop nesting deeper than about 1,000 levels with RecursionError: a bad line, not a crash.
    return decode, encode, (msgspec.MsgspecError, ValueError, TypeError, OverflowError, RecursionError)


loads, dumps, CODEC_ERRORS = _select_codec()
"""The parser and serializer used for request lines (replaceable, for tests of the fallback)."""

_DEFAULT_LOADS = loads


@functools.cache
def _shape_decoder(forbidden: frozenset[str]) -> tuple[Callable[[bytes], Any], tuple[str, ...], Any] | None:
    """
    Return a decoder that builds only what the checks read, the names of forbidden keys, and "unset".

    The rest of a line (the prompts) is parsed and checked for syntax but never built into Python
    objects, which is most of the cost of parsing. None when msgspec is not installed.
    """
    try:
        import msgspec
    except ImportError:  # pragma: no cover - see _select_codec
        return None
    unset = msgspec.UNSET
    names = tuple(f"forbidden_{i}" for i in range(len(forbidden)))
    body = msgspec.defstruct(
        "RequestBodyShape",
        [("model", Any, unset), *((name, Any, unset) for name in names)],
        rename=dict(zip(names, sorted(forbidden), strict=True)),
    )
    line = msgspec.defstruct(
        "RequestLineShape",
        [("custom_id", Any, unset), ("method", Any, unset), ("url", Any, unset), ("body", body, unset)],
        forbid_unknown_fields=True,
    )
    return msgspec.json.Decoder(line).decode, names, unset


def chunk_bytes() -> int:
    """Return the bytes read per chunk: few calls, flat memory, and the size hashing moves to a thread at."""
    return _CHUNK


def resolve_vendor(vendor: VendorSpec | str) -> VendorSpec:
    """Return the spec for a spec or a registry name."""
    if isinstance(vendor, VendorSpec):
        return vendor
    try:
        return REGISTRY[vendor]
    except KeyError:
        raise InvalidInputError(f"unknown vendor {vendor!r}; use one of: {', '.join(REGISTRY)}") from None


def resolve_endpoint(spec: VendorSpec, endpoint: str | None) -> EndpointSpec:
    """Return the endpoint's spec (the vendor's default for None), or raise listing the allowed ones."""
    path = endpoint or spec.default_endpoint
    found = spec.endpoint(path)
    if found is None:
        allowed = ", ".join(e.path for e in spec.endpoints)
        raise InvalidInputError(
            f"endpoint {path!r} is not a batch endpoint of {spec.display_name}; use one of: {allowed}"
        )
    return found


def request_limit(spec: VendorSpec, endpoint: EndpointSpec) -> int:
    """Return the most requests one file may hold for this endpoint."""
    return min(spec.limits.max_requests, endpoint.max_requests or spec.limits.max_requests)


def byte_limit(spec: VendorSpec, endpoint: EndpointSpec) -> int:
    """Return the most bytes one file may hold for this endpoint."""
    return min(spec.limits.max_file_bytes, endpoint.max_file_bytes or spec.limits.max_file_bytes)


def human_bytes(size: int) -> str:
    """Return a byte count as people say it (``100 MiB``), exact where it is not round."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def show(value: Any) -> str:
    """Return a short description of a JSON value for a message: its type and a clipped repr."""
    if value is _MISSING:
        return "nothing (the key is missing)"
    kind = _JSON_TYPES.get(type(value), type(value).__name__)
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return f"{kind} of {len(value)} item(s)"
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def diagnose_unparsable(raw: bytes, error: Exception) -> tuple[str, str, str]:
    """Return ``(field, expected, got)`` for a line that did not parse, the same whichever parser failed."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        return "encoding", "UTF-8 text", f"byte 0x{bad} at byte {exc.start + 1} of the line ({exc.reason})"
    if isinstance(error, RecursionError):
        return "json", "a JSON object nested less deeply", "nesting deeper than the JSON parser allows"
    message = str(error)
    match = _MSGSPEC_OFFSET.search(message)
    for constant in ("-Infinity", "Infinity", "NaN"):
        if match:
            at = int(match.group(1))
            found = raw.startswith(constant.encode(), at) or raw.startswith(constant.encode(), at - 1)
        else:
            found = f"{constant} is not valid JSON" in message
        if found:
            return "json", "strict JSON", f"{constant}, which JSON does not allow (write null or a number)"
    try:
        json_loads(text.encode("utf-8"))
    except ValueError as exc:
        return "json", "a JSON object", f"malformed JSON ({exc})"
    except RecursionError:
        return "json", "a JSON object nested less deeply", "nesting deeper than the JSON parser allows"
    return "json", "a JSON object", f"JSON the parser rejects ({error})"


class Tally:
    """
    Count and hash the bytes of a file as they pass.

    Large files are hashed on a helper thread (hashlib releases the GIL), so hashing overlaps with
    parsing; a bounded queue keeps at most a few chunks in flight.
    """

    __slots__ = ("_queue", "_thread", "bytes", "sha")

    def __init__(self) -> None:
        self.bytes = 0
        self.sha = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None

    def update(self, data: bytes) -> None:
        """Count and hash the next bytes, in order."""
        self.bytes += len(data)
        if self._queue is None:
            if len(data) < _CHUNK or _CPUS < 2:
                self.sha.update(data)
                return
            self._queue = queue.Queue(maxsize=8)
            self._thread = threading.Thread(target=self._drain, name="llmbatch-sha256", daemon=True)
            self._thread.start()
        self._queue.put(data)

    def _drain(self) -> None:
        assert self._queue is not None
        while (data := self._queue.get()) is not None:
            self.sha.update(data)

    def close(self) -> None:
        """Wait until every byte given is hashed."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def hexdigest(self) -> str:
        """Return the SHA-256 of all bytes given."""
        self.close()
        return self.sha.hexdigest()


class _PartialLine:
    """A line that spans chunks, keeping at most ``keep`` of its bytes while counting all of them."""

    __slots__ = ("cr", "keep", "kept", "parts", "size")

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.parts: list[bytes] = []
        self.kept = self.size = 0
        self.cr = False

    def add(self, piece: bytes) -> None:
        if not piece:
            return
        self.size += len(piece)
        self.cr = piece[-1] == 13
        room = self.keep - self.kept
        if room > 0:
            self.parts.append(piece[:room])
            self.kept += min(room, len(piece))

    def take(self, end: bytes) -> tuple[bytes, int]:
        self.add(end)
        line, size = b"".join(self.parts), self.size - self.cr
        self.parts, self.kept, self.size, self.cr = [], 0, 0, False
        return line, size


class LineFeed:
    r"""
    Split pushed chunks into lines and hand each to ``check(line, size)``, counting and hashing every byte.

    The push form of :func:`scan_lines`, for bytes that pass by anyway (an upload): ``line`` has no
    terminator and ``size`` excludes a final ``\r``. A line longer than ``cap`` may be handed over
    truncated (``len(line) < size``): the rest is hashed and counted but not kept.

    :param cap: the longest line kept whole (the vendor's line limit).
    :param tally: counts and hashes the bytes.
    :param check: called once per line, in order.
    """

    __slots__ = ("_check", "_partial", "_update", "tally")

    def __init__(self, cap: int, tally: Tally, check: Callable[[bytes, int], None]) -> None:
        self.tally = tally
        self._update = tally.update
        self._check = check
        self._partial = _PartialLine(cap + 2)

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the file: check the lines they finish, keep the unfinished one."""
        if not isinstance(chunk, bytes):
            raise InvalidInputError("request files must be opened in binary mode ('rb')")
        if not chunk:
            return
        self._update(chunk)
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if lines:
            check = self._check
            partial = self._partial
            rest = iter(lines)
            if partial.size:
                check(*partial.take(next(rest)))
            for line in rest:
                check(line, len(line) - line.endswith(b"\r"))
        self._partial.add(tail)

    def end(self) -> None:
        """Check the last line when the file does not end with a newline, and finish hashing."""
        try:
            if self._partial.size:
                self._check(*self._partial.take(b""))
        finally:
            self.tally.close()


def scan_lines(handle: IO[bytes], cap: int, tally: Tally) -> Iterator[tuple[bytes, int]]:
    r"""
    Yield ``(line, size)`` for each line, without its terminator; ``size`` excludes a final ``\r``.

    Reads in chunks. A line longer than ``cap`` may be yielded truncated (``len(line) < size``): the
    rest is hashed and counted but not kept, so a file without newlines cannot fill the memory.
    """
    found: list[tuple[bytes, int]] = []
    keep = found.append
    feed = LineFeed(cap, tally, lambda line, size: keep((line, size)))
    read = handle.read
    try:
        while chunk := read(_CHUNK):
            feed.feed(chunk)
            yield from found
            found.clear()
        feed.end()
        yield from found
    finally:
        tally.close()


class RequestChecker:
    """
    Check the lines of one request file against a vendor's rules, keeping only what is needed.

    Uniqueness is checked on 96-bit keys of the custom ids (not the ids), stored until the request
    limit is passed, so memory stays small however large the file is.

    :param spec: the vendor.
    :param endpoint: the batch endpoint every line must name.
    :param file_name: the file's name, to check its extension (None skips the check).
    :param max_problems: how many problems to list; further ones are only counted.
    """

    def __init__(
        self, spec: VendorSpec, endpoint: EndpointSpec, file_name: str | None, *, max_problems: int = 20
    ) -> None:
        self.spec = spec
        self.endpoint = endpoint
        self.max_requests = request_limit(spec, endpoint)
        self.max_file_bytes = byte_limit(spec, endpoint)
        self.max_line_bytes = spec.limits.max_line_bytes or self.max_file_bytes
        self.max_problems = max(max_problems, 0)
        self.lineno = 0
        self.requests = 0
        self.model: str | None = None
        # Compared in the fast path: a sentinel until a model is seen, so a missing model never matches.
        self._expected_model: Any = _MISSING
        self.problems: list[str] = []
        self.file_problems: list[str] = []
        self.truncated = 0
        self._model_line = 0
        self._model_mismatch_seen = False
        self._seen: dict[int, int] = {}
        self._url = endpoint.path
        self._forbidden = spec.forbidden_body_keys
        self._loads = loads
        shape = _shape_decoder(self._forbidden) if loads is _DEFAULT_LOADS else None
        self._shape: Callable[[bytes], Any] | None = None
        self._forbidden_names: tuple[str, ...] = ()
        self._unset: Any = None
        if shape is not None:
            self._shape, self._forbidden_names, self._unset = shape
        self._errors = CODEC_ERRORS
        if file_name is not None and not file_name.endswith(".jsonl"):
            self.file_problem("name", "a file name ending in '.jsonl'", repr(file_name))

    @property
    def failed(self) -> bool:
        """Return whether a problem was found so far: the file will be rejected whatever follows."""
        return bool(self.problems or self.truncated or self.file_problems)

    def problem(self, where: str, field: str, expected: str, got: str) -> None:
        """Record a problem, or only count it once the list is full."""
        if len(self.problems) < self.max_problems:
            self.problems.append(f"{where}: {field}: expected {expected}, got {got}")
        else:
            self.truncated += 1

    def file_problem(self, field: str, expected: str, got: str) -> None:
        """Record a problem of the whole file; these are listed before the line problems."""
        self.file_problems.append(f"file: {field}: expected {expected}, got {got}")

    def skip(self) -> None:
        """Advance the line number without a line (a record that produced none)."""
        self.lineno += 1

    def line(self, raw: bytes, size: int) -> None:
        """
        Check one line.

        :param raw: the line's bytes, with or without its terminator; shorter than ``size`` when the
            reader stopped keeping a line that is over the size limit.
        :param size: the line's length in bytes without its terminator.
        """
        self.lineno = lineno = self.lineno + 1
        if not raw or raw[0] != _OPEN_BRACE:
            stripped = self._odd_start(raw, lineno)
            if stripped is None:
                return
            raw = stripped
        self.requests += 1
        if size > self.max_line_bytes:
            self.problem(
                f"line {lineno}",
                "line",
                f"at most {self.max_line_bytes} bytes ({human_bytes(self.max_line_bytes)}) per line",
                f"{size} bytes",
            )
            if len(raw) < size:
                return
        if self._shape is not None:
            unset = self._unset
            try:
                shape = self._shape(raw)
            except self._errors:
                shape = None
            # A good line in one expression; any doubt goes to the full parse and the detailed checks.
            # Skipped text is syntax-checked but not decoded, hence the UTF-8 check of non-ASCII lines.
            if (
                shape is not None
                and shape.method == "POST"
                and shape.url == self._url
                and type(custom_id := shape.custom_id) is str
                and custom_id != ""
                and (body := shape.body) is not unset
                and body.model == self._expected_model
                and not (
                    self._forbidden_names
                    and any(getattr(body, name) is not unset for name in self._forbidden_names)
                )
                and (raw.isascii() or is_utf8(raw))
            ):
                self._check_unique(custom_id, lineno)
                return
        try:
            obj = self._loads(raw)
        except self._errors as exc:
            self.problem(f"line {lineno}", *diagnose_unparsable(raw, exc))
            return
        try:
            custom_id = obj["custom_id"]
            body = obj["body"]
            good = (
                len(obj) == 4
                and obj["method"] == "POST"
                and obj["url"] == self._url
                and type(custom_id) is str
                and custom_id != ""
                and type(body) is dict
                and body.get("model") == self._expected_model
                and (not self._forbidden or self._forbidden.isdisjoint(body))
            )
        except (KeyError, TypeError, IndexError):
            good = False
        if good:
            self._check_unique(custom_id, lineno)
        else:
            self._check_parsed(obj, lineno)

    def _check_parsed(self, obj: Any, lineno: int) -> None:
        if type(obj) is not dict:
            self.problem(f"line {lineno}", "json", "a JSON object", show(obj))
            return
        if not LINE_KEYS.issuperset(obj):
            for key in sorted(k for k in obj if k not in LINE_KEYS):
                self.problem(f"line {lineno}", key, "only custom_id, method, url and body", "an unknown key")
        custom_id = obj.get("custom_id", _MISSING)
        if type(custom_id) is not str or not custom_id:
            self.problem(f"line {lineno}", "custom_id", "a non-empty string", show(custom_id))
        else:
            self._check_unique(custom_id, lineno)
        method = obj.get("method", _MISSING)
        if method != "POST":
            self.problem(f"line {lineno}", "method", "'POST'", show(method))
        url = obj.get("url", _MISSING)
        if url != self._url:
            self.problem(f"line {lineno}", "url", f"{self._url!r} (the batch endpoint)", show(url))
        body = obj.get("body", _MISSING)
        if type(body) is not dict:
            self.problem(f"line {lineno}", "body", "an object", show(body))
            return
        model = body.get("model", _MISSING)
        if type(model) is not str or model != self._expected_model:
            self._check_model(model, lineno)
        if self._forbidden and not self._forbidden.isdisjoint(body):
            for key in sorted(self._forbidden.intersection(body)):
                self.problem(
                    f"line {lineno}",
                    f"body.{key}",
                    f"no {key!r} ({self.spec.display_name} rejects it in batch requests)",
                    show(body[key]),
                )

    def _odd_start(self, raw: bytes, lineno: int) -> bytes | None:
        """Handle a line not starting with ``{``: report a BOM and blank lines; None skips the line."""
        if lineno == 1 and raw.startswith(_BOM):
            self.problem(
                "line 1",
                "encoding",
                "UTF-8 without a byte order mark (vendors reject it; save as 'UTF-8', not 'UTF-8 with BOM')",
                "a BOM (bytes EF BB BF) at the start of the file",
            )
            raw = raw[3:]
        if not raw.strip():
            self.problem(f"line {lineno}", "line", "a JSON request (no blank lines)", "a blank line")
            return None
        return raw

    def _check_unique(self, custom_id: str, lineno: int) -> None:
        # A 96-bit key instead of the id: the string's 64-bit SipHash (cached by Python) and an
        # independent CRC-32 of its bytes. Cheaper than a cryptographic digest per line; a false
        # duplicate needs both to collide (about 1e-20 for 50,000 ids).
        digest = hash(custom_id) << 32 | _crc32(custom_id.encode("utf-8", "surrogatepass"))
        if self.requests > self.max_requests:
            # Past the limit the file is rejected anyway: stop growing the table, keep checking against it.
            first = self._seen.get(digest, lineno)
        else:
            first = self._seen.setdefault(digest, lineno)
        if first != lineno:
            self.problem(
                f"line {lineno}",
                "custom_id",
                f"an id used once (it is on line {first} already)",
                f"{show(custom_id)} again",
            )

    def _check_model(self, model: Any, lineno: int) -> None:
        if type(model) is not str or not model:
            self.problem(f"line {lineno}", "body.model", "a non-empty string", show(model))
        elif self.model is None:
            self.model = self._expected_model = model
            self._model_line = lineno
            required = self.endpoint.required_model
            if required is not None and model != required:
                self.problem(
                    f"line {lineno}",
                    "body.model",
                    f"{required!r} (the only model {self.endpoint.path} accepts)",
                    show(model),
                )
        elif not self._model_mismatch_seen:
            # One report is enough: every later line with another model is the same mistake.
            self._model_mismatch_seen = True
            self.problem(
                f"line {lineno}",
                "body.model",
                f"{self.model!r} like line {self._model_line} (one model per file)",
                show(model),
            )

    def finish(self, total_bytes: int, source: str) -> None:
        """Add the file-level checks and raise :class:`InvalidRequestFileError` if anything is wrong."""
        if self.lineno == 0:
            self.file_problem("lines", "at least one request", "an empty file")
        elif self.requests == 0:
            self.file_problem("lines", "at least one request", "only blank lines")
        if self.requests > self.max_requests:
            self.file_problem(
                "requests",
                f"at most {self.max_requests} requests per file for {self.endpoint.path} "
                "(split it with split_request_file)",
                f"{self.requests}",
            )
        if total_bytes > self.max_file_bytes:
            self.file_problem(
                "bytes",
                f"at most {self.max_file_bytes} bytes ({human_bytes(self.max_file_bytes)}) "
                f"per file for {self.endpoint.path} (split it with split_request_file)",
                f"{total_bytes} bytes",
            )
        if not (self.file_problems or self.problems):
            return
        listed = [*self.file_problems, *self.problems]
        keep = max(self.max_problems, len(self.file_problems))
        raise InvalidRequestFileError(source, listed[:keep], self.truncated + max(len(listed) - keep, 0))
