"""
Results as Parquet: typed columns derived from the output schema, written in row groups as rows come.

``format="parquet"`` lands the same rows as the JSONL results, one per request in request order, with
these columns:

- ``custom_id`` (string), ``status`` (string), ``attempts`` (int32);
- the output's fields, one column each, typed from the output schema (a schema whose root is not an
  object gives one column, ``output``); null where the row has no valid output;
- ``error`` (struct of ``code`` and ``message`` strings);
- ``prompt_tokens``, ``completion_tokens``, ``total_tokens`` (int64; null where the vendor gave none);
- ``response`` (the response body as JSON text) only without an output schema, where it is the only
  answer there is; ``request`` (the request body as JSON text) with ``include_request``.

JSON Schema types map to Arrow types: ``string`` -> string (``format`` is kept as text), ``integer`` ->
int64, ``number`` -> float64, ``boolean`` -> bool, an ``enum`` of strings -> dictionary(int32, string), a
nullable type (``anyOf`` with ``null``, or ``type: [T, "null"]``) -> T, an object with ``properties`` ->
struct, an object whose only schema is ``additionalProperties`` -> map(string, T), an array -> list(T).
``$ref`` is followed (pydantic's ``$defs``). Anything else (a union of several types, a free-form object,
a recursive model) is kept as JSON text, so no answer is ever lost to the mapping; the one exception is
an integer outside int64 (or a number outside float64), which Arrow cannot hold: that cell is null (the
JSONL results keep it). A pydantic model's columns follow what lands as ``output``: its serialization
schema, keys by alias.

Memory stays flat: :class:`ParquetSink` buffers at most ``row_group_rows`` rows (and about
``row_group_bytes`` of their JSON) before it writes them out as one row group. pyarrow comes with the
``parquet`` extra and is imported only when Parquet is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any, Literal

import msgspec

from airflow_provider_llmbatch import codec
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.locations import Location, open_read
from airflow_provider_llmbatch.schema import OutputSchema

ResultFormat = Literal["jsonl", "parquet"]
"""The formats results land in."""

RESULT_FORMATS: tuple[ResultFormat, ...] = ("jsonl", "parquet")
"""Every result format; ``jsonl`` is the default."""

DEFAULT_ROW_GROUP_ROWS = 8_192
"""Rows per Parquet row group (and the most rows held in memory)."""

DEFAULT_ROW_GROUP_BYTES = 4 * 1024 * 1024
"""A row group is also written once its rows' JSON reaches this many bytes."""

BASE_COLUMNS = (
    "custom_id",
    "status",
    "attempts",
    "error",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
)
"""The columns every Parquet results file has, whatever the schema."""

_MAX_DEPTH = 32
Convert = Callable[[Any], Any]


def pyarrow_modules() -> tuple[Any, Any]:
    """
    Return ``(pyarrow, pyarrow.parquet)``, imported now.

    :raises InvalidInputError: when pyarrow is not installed, naming the extra that brings it.
    """
    try:
        return importlib.import_module("pyarrow"), importlib.import_module("pyarrow.parquet")
    except ImportError as exc:
        raise InvalidInputError(
            f"format='parquet' needs pyarrow ({exc}); install it with "
            "pip install 'airflow-provider-llmbatch[parquet]'"
        ) from None


def check_format(value: Any) -> ResultFormat:
    """Return a ``format`` argument, or raise :class:`InvalidInputError` naming the formats."""
    if value not in RESULT_FORMATS:
        raise InvalidInputError(f"format must be one of {', '.join(RESULT_FORMATS)}, got {value!r}")
    result: ResultFormat = value
    return result


def _json_text(value: Any) -> Any:
    return None if value is None else codec.dumps(value).decode("utf-8")


_INT64 = range(-(2**63), 2**63)


def _int(value: Any) -> Any:
    # JSON Schema counts 1.0 as an integer; Arrow's int64 does not take a float, nor a larger integer.
    value = int(value) if isinstance(value, float) else value
    return value if value in _INT64 else None


def _float(value: Any) -> Any:
    # Arrow's float64 takes a Python int only within int64; a larger one is converted here.
    if isinstance(value, int) and value not in _INT64:
        try:
            return float(value)
        except OverflowError:
            return None
    return value


class _Mapper:
    """Map a JSON Schema (with its ``$defs``) to Arrow types, and each type to its value converter."""

    def __init__(self, pa: Any, root: Mapping[str, Any]) -> None:
        self.pa = pa
        self.defs: Mapping[str, Any] = {**root.get("definitions", {}), **root.get("$defs", {})}

    def text(self) -> tuple[Any, Convert | None]:
        return self.pa.string(), _json_text

    def resolve(self, node: Any, seen: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
        while isinstance(node, Mapping):
            ref = node.get("$ref")
            all_of = node.get("allOf")
            if isinstance(ref, str) and ref.rsplit("/", 1)[-1] in self.defs and ref not in seen:
                node, seen = self.defs[ref.rsplit("/", 1)[-1]], (*seen, ref)
            elif isinstance(all_of, list) and len(all_of) == 1:
                node = all_of[0]
            else:
                break
        return node, seen

    def map(self, node: Any, seen: tuple[str, ...] = ()) -> tuple[Any, Convert | None]:
        """Return the Arrow type of a schema node and the converter of its values (None: as they are)."""
        node, seen = self.resolve(node, seen)
        if not isinstance(node, Mapping) or len(seen) > _MAX_DEPTH or "$ref" in node:
            return self.text()
        pa = self.pa
        for key in ("anyOf", "oneOf"):
            options = node.get(key)
            if isinstance(options, list):
                kept = [o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")]
                return self.map(kept[0], seen) if len(kept) == 1 else self.text()
        enum = node.get("enum", [node["const"]] if "const" in node else None)
        if isinstance(enum, list):
            values = [v for v in enum if v is not None]
            if values and all(isinstance(v, str) for v in values):
                return pa.dictionary(pa.int32(), pa.string()), None
            if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                return pa.int64(), _int
            return self.text()
        kind = node.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"]
            kind = kinds[0] if len(kinds) == 1 else None
        simple = {
            "string": (pa.string(), None),
            "integer": (pa.int64(), _int),
            "number": (pa.float64(), _float),
        }
        if kind in simple:
            return simple[kind]
        if kind == "boolean":
            return pa.bool_(), None
        if kind == "array" and "prefixItems" not in node:
            return self._list(node.get("items"), seen)
        if kind == "object" or "properties" in node:
            return self._object(node, seen)
        return self.text()

    def _list(self, items: Any, seen: tuple[str, ...]) -> tuple[Any, Convert | None]:
        item_type, convert = self.map(items, seen) if isinstance(items, Mapping) and items else self.text()
        if convert is None:
            return self.pa.list_(item_type), None
        return self.pa.list_(item_type), lambda v: None if v is None else [convert(x) for x in v]

    def _object(self, node: Mapping[str, Any], seen: tuple[str, ...]) -> tuple[Any, Convert | None]:
        pa = self.pa
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if isinstance(props, Mapping) and props:
            fields = [(str(name), *self.map(sub, seen)) for name, sub in props.items()]
            struct = pa.struct([pa.field(name, t) for name, t, _ in fields])
            converts = [(name, c) for name, _, c in fields if c is not None]
            if not converts:
                return struct, None

            def convert(value: Any) -> Any:
                if not isinstance(value, Mapping):
                    return None
                row = dict(value)
                for name, c in converts:
                    if row.get(name) is not None:
                        row[name] = c(row[name])
                return row

            return struct, convert
        if isinstance(extra, Mapping) and extra and not props:
            value_type, c = self.map(extra, seen)

            def entries(value: Any) -> Any:
                if not isinstance(value, Mapping):
                    return None
                return [(k, c(x) if c is not None and x is not None else x) for k, x in value.items()]

            return pa.map_(pa.string(), value_type), entries
        return self.text()


def output_columns(pa: Any, schema: OutputSchema) -> tuple[list[tuple[str, Any, Convert | None]], bool]:
    """
    Return the output's columns, ``(name, Arrow type, converter)``, and whether they are its fields.

    A schema whose root is an object with properties gives a column per field; any other gives one
    column, ``output``, holding the whole value.

    :raises InvalidInputError: when a field is named like a column every results file has.
    """
    # The schema of the landed values: a pydantic model's serialization schema (keys by alias).
    json_schema = schema.output_json_schema()
    mapper = _Mapper(pa, json_schema)
    root, seen = mapper.resolve(json_schema, ())
    props = root.get("properties") if isinstance(root, Mapping) else None
    if not isinstance(props, Mapping) or not props:
        return [("output", *mapper.map(root, seen))], False
    taken = {*BASE_COLUMNS, "response", "request"}
    clashes = sorted(str(name) for name in props if name in taken)
    if clashes:
        raise InvalidInputError(
            f"output_schema: field(s) {clashes} have the name of a results column "
            f"({', '.join(sorted(taken))}); rename them to land the results as Parquet"
        )
    return [(str(name), *mapper.map(sub, seen)) for name, sub in props.items()], True


class _Row(msgspec.Struct):
    custom_id: str
    status: str
    attempts: int = 1
    response: msgspec.Raw = msgspec.Raw(b"null")
    error: dict[str, Any] | None = None
    usage: dict[str, Any] = {}
    output: Any = None
    request: msgspec.Raw = msgspec.Raw(b"null")  # msgspec reads no Raw | None: JSON null stands for None


_decode_row = msgspec.json.Decoder(_Row).decode


def _token(usage: Mapping[str, Any], name: str, other: str) -> int | None:
    value = usage.get(name, usage.get(other))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class ParquetSink:
    """
    Take results JSONL as it is written and write it as Parquet, one row group at a time.

    A binary writer (``write(bytes)``) the results join writes its rows to, as it would to a JSONL file.

    :param out: where the Parquet bytes go (the atomic writer of the destination).
    :param output_schema: the output schema, for the typed columns; None for none.
    :param include_request: add the ``request`` column.
    :param row_group_rows: the most rows buffered, and per row group.
    :param row_group_bytes: a row group is written once its rows' JSON reaches this many bytes.
    """

    def __init__(
        self,
        out: IO[bytes],
        output_schema: OutputSchema | None,
        *,
        include_request: bool = False,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
    ) -> None:
        pa, pq = pyarrow_modules()
        self.pa = pa
        self.outputs, self.keyed = output_columns(pa, output_schema) if output_schema else ([], False)
        error = pa.struct([pa.field("code", pa.string()), pa.field("message", pa.string())])
        fields = [
            pa.field("custom_id", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("attempts", pa.int32(), nullable=False),
            *(pa.field(name, t) for name, t, _ in self.outputs),
            pa.field("error", error),
            *(pa.field(name, pa.int64()) for name in BASE_COLUMNS[4:]),
        ]
        self.with_response = output_schema is None
        if self.with_response:
            fields.append(pa.field("response", pa.string()))
        self.include_request = include_request
        if include_request:
            fields.append(pa.field("request", pa.string()))
        self.schema = pa.schema(fields)
        self.writer = pq.ParquetWriter(out, self.schema)
        self.row_group_rows = max(int(row_group_rows), 1)
        self.row_group_bytes = max(int(row_group_bytes), 1)
        self.columns: list[list[Any]] = [[] for _ in fields]
        self.buffered_rows = self.buffered_bytes = 0
        self.peak_buffered_rows = 0
        self.row_groups = 0
        self._tail = b""

    def write(self, data: bytes) -> int:
        """Take JSONL bytes (whole rows, or pieces of them); write a row group whenever one is full."""
        lines = (self._tail + data).split(b"\n") if self._tail else data.split(b"\n")
        self._tail = lines.pop()
        for line in lines:
            if line:
                self._add(line)
        return len(data)

    def _add(self, line: bytes) -> None:
        row = _decode_row(line)
        cols = iter(self.columns)
        next(cols).append(row.custom_id)
        next(cols).append(row.status)
        next(cols).append(row.attempts)
        output = row.output
        for name, _, convert in self.outputs:
            value = output if not self.keyed else output.get(name) if isinstance(output, dict) else None
            next(cols).append(convert(value) if convert is not None and value is not None else value)
        error = row.error
        next(cols).append(
            None
            if error is None
            else {"code": _str(error.get("code")), "message": _str(error.get("message"))}
        )
        usage = row.usage
        next(cols).append(_token(usage, "prompt_tokens", "input_tokens"))
        next(cols).append(_token(usage, "completion_tokens", "output_tokens"))
        next(cols).append(_token(usage, "total_tokens", "total_tokens"))
        if self.with_response:
            raw = bytes(row.response)
            next(cols).append(None if raw == b"null" else raw.decode("utf-8"))
        if self.include_request:
            request = bytes(row.request)
            next(cols).append(None if request == b"null" else request.decode("utf-8"))
        self.buffered_rows += 1
        self.buffered_bytes += len(line)
        self.peak_buffered_rows = max(self.peak_buffered_rows, self.buffered_rows)
        if self.buffered_rows >= self.row_group_rows or self.buffered_bytes >= self.row_group_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one row group."""
        if not self.buffered_rows:
            return
        pa = self.pa
        arrays = [pa.array(col, type=f.type) for col, f in zip(self.columns, self.schema, strict=True)]
        self.writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        self.row_groups += 1
        for col in self.columns:
            col.clear()
        self.buffered_rows = self.buffered_bytes = 0

    def close(self) -> None:
        """Write what is buffered and the file's footer."""
        if self._tail:
            line, self._tail = self._tail, b""
            self._add(line)
        self.flush()
        self.writer.close()


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def iter_rows(results: Location, columns: Sequence[str], batch_rows: int = 8192) -> Iterator[dict[str, Any]]:
    """Yield the rows of a Parquet results file as dicts of ``columns``, a record batch at a time."""
    _, pq = pyarrow_modules()
    with open_read(results) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=list(columns)):
            yield from batch.to_pylist()
