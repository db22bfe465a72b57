"""
The rules of a request file, line by line, and the problems they report.

:class:`RequestChecker` holds the state of one pass over a request file (line numbers, the first model,
keys of the custom ids seen) and turns every broken rule into one readable problem: ``line N: <field>:
expected <...>, got <...>`` or ``file: <field>: ...``. :mod:`airflow_provider_llmbatch.jsonl_check` feeds
it line by line while reading a file, :func:`~airflow_provider_llmbatch.jsonl.build_request_file` while
writing one. All vendor differences (``response_format`` support too) come from the :class:`VendorSpec`.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

from airflow_provider_llmbatch.codec import CODEC_ERRORS, UNSET, is_utf8, json_loads, loads, shape_decoder
from airflow_provider_llmbatch.exceptions import InvalidInputError, InvalidRequestFileError
from airflow_provider_llmbatch.id_keys import IdKeys
from airflow_provider_llmbatch.vendors import REGISTRY, EndpointSpec, VendorSpec

LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})
"""The keys of a request line; vendors document no others."""

_BOM = b"\xef\xbb\xbf"
_OPEN_BRACE = 0x7B
_MISSING: Any = object()
_crc32 = zlib.crc32
_MSGSPEC_OFFSET = re.compile(r"\(byte (\d+)\)")
_JSON_TYPES: dict[type, str] = {dict: "object", list: "array", str: "string", int: "number", float: "number"}
_JSON_TYPES |= {bool: "boolean", type(None): "null"}


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


def line_limit(spec: VendorSpec, endpoint: EndpointSpec, file_bytes: int | None = None) -> tuple[int, str]:
    """Return the most bytes of a line without its newline, and why: with it, it must fit in one file."""
    most, line = (file_bytes or byte_limit(spec, endpoint)) - 1, spec.limits.max_line_bytes
    if line is not None and line <= most:
        return line, f"at most {line} bytes ({human_bytes(line)}) per line"
    where = f"max_bytes={most + 1}" if file_bytes else f"{human_bytes(most + 1)} for {endpoint.path}"
    return most, f"at most {most} bytes per line (with its newline a line must fit in one file: {where})"


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
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{kind} {text}"


def diagnose_unparsable(raw: bytes, error: Exception) -> tuple[str, str, str]:
    """Return ``(field, expected, got)`` for a line the parser refused with ``error``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        return "encoding", "UTF-8 text", f"byte 0x{bad} at byte {exc.start + 1} of the line ({exc.reason})"
    if isinstance(error, RecursionError):
        return "json", "a JSON object nested less deeply", "nesting deeper than the JSON parser allows"
    match = _MSGSPEC_OFFSET.search(str(error))
    if match:
        at = int(match.group(1))
        for constant in (b"-Infinity", b"Infinity", b"NaN"):
            if raw.startswith(constant, at) or raw.startswith(constant, at - 1):
                got = f"{constant.decode()}, which JSON does not allow (write null or a number)"
                return "json", "strict JSON", got
    try:
        json_loads(text.encode("utf-8"))
    except ValueError as exc:
        return "json", "a JSON object", f"malformed JSON ({exc})"
    except RecursionError:
        return "json", "a JSON object nested less deeply", "nesting deeper than the JSON parser allows"
    return "json", "a JSON object", f"JSON the parser rejects ({error})"


class RequestChecker:
    """
    Check the lines of one request file against a vendor's rules, keeping only what is needed.

    Uniqueness is checked on 96-bit keys of the custom ids (not the ids), stored until the request
    limit is passed, so memory stays small however large the file is.

    :param spec: the vendor.
    :param endpoint: the batch endpoint every line must name.
    :param file_name: the file's name, to check its extension (None skips the check).
    :param max_problems: how many problems to list; further ones are only counted.
    :param whole_input: check an input that will be split into files: no per-file request or size
        limit, and custom ids kept as 64-bit keys only (8 bytes each), unique over the whole input
        (:meth:`duplicated_keys` names the repeated ones at the end).
    :param part_bytes: the bytes one part may hold when asked below the endpoint's file limit (a split's
        ``max_bytes``): a line must fit in one.
    """

    def __init__(
        self,
        spec: VendorSpec,
        endpoint: EndpointSpec,
        file_name: str | None,
        *,
        max_problems: int = 20,
        whole_input: bool = False,
        part_bytes: int | None = None,
    ) -> None:
        self.spec = spec
        self.endpoint = endpoint
        self.max_requests = request_limit(spec, endpoint)
        self.max_file_bytes = byte_limit(spec, endpoint)
        self.max_line_bytes, self._line_rule = line_limit(spec, endpoint, part_bytes)
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
        self._keys: IdKeys | None = IdKeys() if whole_input else None
        self.duplicates_named = False
        """Set once the repeated ids are listed line by line: ``finish`` then does not count them again."""
        self._url = endpoint.path
        self._forbidden = spec.forbidden_body_keys
        self._output = spec.structured_output
        # A line asking for a response format takes the full parse, where the vendor's support is checked.
        watched = self._forbidden | ({"response_format"} if self._output else frozenset())
        self._shape, names = shape_decoder(watched)
        fields = dict(zip(sorted(watched), names, strict=True))
        self._format_name, self._forbidden_names = fields.pop("response_format", None), tuple(fields.values())
        if file_name is not None and not file_name.endswith(".jsonl"):
            self.file_problem("name", "a file name ending in '.jsonl'", repr(file_name))

    @property
    def expected_model(self) -> str | None:
        """Return the model every line must name: the first line's (None before a model is seen)."""
        return self.model

    @property
    def url(self) -> str:
        """Return the batch endpoint every line must name."""
        return self._url

    def accept_block(self, custom_ids: list[str]) -> None:
        """Count a block of lines that passed every check of :meth:`line` at once (``whole_input``)."""
        assert self._keys is not None
        self.lineno += len(custom_ids)
        self.requests += len(custom_ids)
        self._keys.add_all(custom_ids)

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
            self.problem(f"line {lineno}", "line", self._line_rule, f"{size} bytes")
            if len(raw) < size:
                return
        try:
            shape = self._shape(raw)
        except CODEC_ERRORS:
            shape = None
        # A good line in one expression; any doubt goes to the full parse and the detailed checks.
        # Skipped text is syntax-checked but not decoded, hence the UTF-8 check of non-ASCII lines.
        if (
            shape is not None
            and shape.method == "POST"
            and shape.url == self._url
            and type(custom_id := shape.custom_id) is str
            and custom_id != ""
            and (body := shape.body) is not UNSET
            and body.model == self._expected_model
            and not (
                self._forbidden_names
                and any(getattr(body, name) is not UNSET for name in self._forbidden_names)
            )
            and (self._format_name is None or getattr(body, self._format_name) is UNSET)
            and (raw.isascii() or is_utf8(raw))
        ):
            self._check_unique(custom_id, lineno)
            return
        try:
            obj = loads(raw)
        except CODEC_ERRORS as exc:
            self.problem(f"line {lineno}", *diagnose_unparsable(raw, exc))
            return
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
        if self._output is not None and (found := self._output.check(body)) is not None:
            where, expected, got = found
            self.problem(f"line {lineno}", where, f"{expected} ({self.spec.display_name})", got)

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
        if self._keys is not None:
            self._keys.add(custom_id)
            return
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

    def duplicated_keys(self) -> set[int]:
        """Return the keys (:func:`~airflow_provider_llmbatch.id_keys.id_key`) of the ids used again."""
        if not self._keys or self.duplicates_named:
            return set()
        return self._keys.repeated()

    def finish(self, total_bytes: int, source: str) -> None:
        """Add the file-level checks and raise :class:`InvalidRequestFileError` if anything is wrong."""
        if self.lineno == 0:
            self.file_problem("lines", "at least one request", "an empty file")
        elif self.requests == 0:
            self.file_problem("lines", "at least one request", "only blank lines")
        repeated = self.duplicated_keys()
        if repeated:
            again = f"{len(repeated)} used again"
            self.file_problem("custom_id", "each id used once in the whole input", again)
        # An input checked whole is split into files within the limits: no per-file limit applies to it.
        if self._keys is None and self.requests > self.max_requests:
            self.file_problem(
                "requests",
                f"at most {self.max_requests} requests per file for {self.endpoint.path} "
                "(split it with split_request_file)",
                f"{self.requests}",
            )
        if self._keys is None and total_bytes > self.max_file_bytes:
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
