"""
Join a batch's request file with its output and error files into one results file.

The join streams and keeps its working state on disk, so memory stays flat whatever the line count:

1. every output and error line is parsed once, strictly, and turned into its finished row right away;
   the row is stored under its ``custom_id`` and its slot (the part of the input its batch ran, or its
   resubmission round) in a SQLite index in a temporary directory (in a slot the first line of an id is
   kept, later ones are counted as duplicates);
2. each resubmission round's request file is read, to note which requests it sent again;
3. the request file is read one line at a time and its requests looked up in order, a batch at a time:
   a request is answered by the newest round that sent it again and has its line, else by its own
   part's line; the rows are written as they come.

The index is :mod:`airflow_provider_llmbatch.results_index`; this module says what the lines mean.

Each row is ``{"custom_id", "status", "response", "error", "usage"}`` (plus ``"request"`` when asked),
with ``status`` one of ``succeeded``, ``failed``, ``expired``, ``cancelled``, ``missing``. With an output
schema every row has ``output`` too: the answer of a succeeded response, parsed and validated on our
side (:mod:`~airflow_provider_llmbatch.typed_output`); an answer that does not parse or validate makes
the row ``invalid_output``, with the reason in ``error``. Rows land as JSONL, or as Parquet with typed
columns (:mod:`~airflow_provider_llmbatch.parquet_out`). They are
written to a temporary name next to the destination and then moved into place, so a crash never leaves
a partial file at the destination. The index is removed when the join ends, whether it succeeded or not;
it takes about as much disk as the output files (plus the request bodies with ``include_request``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from airflow_provider_llmbatch import codec
from airflow_provider_llmbatch.locations import Location, atomic_writer, open_read, result_uri
from airflow_provider_llmbatch.parquet_out import (
    DEFAULT_ROW_GROUP_ROWS,
    ParquetSink,
    ResultFormat,
    check_format,
)
from airflow_provider_llmbatch.result_lines import read_result_line
from airflow_provider_llmbatch.results_index import FinishedLine, open_index, round_slot
from airflow_provider_llmbatch.schema import OutputSchema
from airflow_provider_llmbatch.typed_output import INVALID_OUTPUT, typed_output

RowStatus = Literal["succeeded", "invalid_output", "failed", "expired", "cancelled", "missing"]
"""The closed set of result-row statuses (``invalid_output`` only with an output schema)."""

ROW_STATUSES: tuple[RowStatus, ...] = ("succeeded", "failed", "expired", "cancelled", "missing")
"""Every row status of a join without an output schema, in the order counts are reported."""

TYPED_ROW_STATUSES: tuple[RowStatus, ...] = ("succeeded", "invalid_output", *ROW_STATUSES[1:])
"""Every row status of a join with an output schema, in the order counts are reported."""

ANOMALY_KINDS: tuple[str, ...] = (
    "duplicates",
    "unknown_ids",
    "no_custom_id",
    "malformed_lines",
    "duplicate_requests",
)
"""Every anomaly the join counts."""

# What a request without an output or error line became, by the batch's final status.
_MISSING_STATUS: Mapping[str, RowStatus] = {"expired": "expired", "cancelled": "cancelled"}
_MISSING_ERROR: Mapping[RowStatus, tuple[str, str]] = {
    "expired": ("batch_expired", "the batch expired before this request was processed"),
    "cancelled": ("batch_cancelled", "the batch was cancelled before this request was processed"),
    "missing": ("missing_result", "the vendor returned no output or error line for this request"),
}
# Error codes vendors write for requests that never ran (OpenAI's convention, also the emulator's).
_UNRUN_CODES: Mapping[str, RowStatus] = {"batch_expired": "expired", "batch_cancelled": "cancelled"}
_TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
_SAMPLES = 5


@dataclass
class JoinReport:
    """
    What a join produced.

    :param result_uri: where the results file was committed.
    :param counts: rows per status, plus ``total`` (the request lines); ``invalid_output`` only with an
        output schema.
    :param usage: token totals over the rows (``prompt_tokens``, ``completion_tokens``, ``total_tokens``).
    :param batch_usage: the same totals per batch, in the order of the join's ``batches``: the tokens of
        the rows whose line came from that batch (they add up to ``usage``).
    :param anomalies: vendor-file oddities: ``duplicates`` (an id repeated in the output/error files;
        the first line is kept), ``unknown_ids`` (ids of no request the line's batch was sent: not in its
        part of the request file, or for a round's line, not in the request file), ``no_custom_id``
        (lines without an id), ``malformed_lines`` (lines that are not a JSON object),
        ``duplicate_requests`` (ids repeated in the request file; each such line still gets a row).
    :param samples: up to five example ids (or ``file@offset``) per anomaly, for logs.
    """

    result_uri: str
    counts: dict[str, int] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    batch_usage: list[dict[str, int]] = field(default_factory=list)
    anomalies: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def reconciled(self) -> bool:
        """Return True when every request line got exactly one row."""
        return sum(self.counts.get(s, 0) for s in TYPED_ROW_STATUSES) == self.counts.get("total", -1)


class Anomalies:
    """The anomalies of one join (see :class:`JoinReport`): a count of each, a few samples of each."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(ANOMALY_KINDS, 0)
        self.samples: dict[str, list[str]] = {}

    def add(self, kind: str, sample: str) -> None:
        """Count one anomaly, keeping its sample while there is room."""
        self.counts[kind] += 1
        bucket = self.samples.setdefault(kind, [])
        if len(bucket) < _SAMPLES:
            bucket.append(sample)

    def full(self, kind: str) -> bool:
        """Return whether there is no room left for samples of ``kind``."""
        return len(self.samples.get(kind, ())) >= _SAMPLES


def _finish(
    data: Mapping[str, Any], schema: OutputSchema | None = None
) -> tuple[RowStatus, int, int, int, bytes]:
    """
    Turn one parsed output or error line into its result row, all but the custom_id (the request's).

    :param data: the parsed line.
    :param schema: the output schema a succeeded response's answer is validated against, if any.
    :return: the row's status; its prompt, completion and total tokens; and the row's ``status``,
        ``response``, ``error`` and ``usage`` members (and ``output`` with a schema) as JSON.
    """
    line = read_result_line(data)
    status: RowStatus = "succeeded"
    error: dict[str, str | None] | None = None
    if not line.succeeded:
        status = "failed"
        error = {"code": line.error_code, "message": line.error_message or "request failed"}
        if not line.has_response:
            # A line without a response for a request that never ran carries the batch's outcome.
            status = _UNRUN_CODES.get(line.error_code or "", "failed")
    output: Any = None
    if schema is not None and status == "succeeded":
        output, problem = typed_output(line.body, schema)
        if problem is not None:
            status, error = INVALID_OUTPUT, {"code": INVALID_OUTPUT, "message": problem}
    usage = line.usage
    # The responses endpoint names them input/output tokens; chat and embeddings prompt/completion.
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    total = usage.get("total_tokens", prompt + completion)
    row: dict[str, Any] = {"status": status, "response": line.body, "error": error, "usage": usage}
    if schema is not None:
        row["output"] = output
    return status, prompt, completion, total, codec.to_json(row)[1:-1]


def _missing(status: RowStatus, typed: bool = False) -> tuple[RowStatus, bytes]:
    """Return the status and the finished row members of a request that has no line."""
    code, message = _MISSING_ERROR[status]
    row: dict[str, Any] = {"status": status, "response": None, "error": {"code": code, "message": message}}
    row["usage"] = {}
    if typed:
        row["output"] = None
    return status, codec.to_json(row)[1:-1]


def _finished_lines(
    batches: Sequence[BatchFiles], anomalies: Anomalies, schema: OutputSchema | None = None
) -> Iterator[FinishedLine]:
    """
    Yield each line of the batches' output and error files that has a custom_id, finished (see
    :func:`_finish`), with its batch's round, the batch's place in ``batches`` and its slot: the part of
    the input the batch ran (its place among the round-0 batches), or its round's.

    Lines without an id and malformed lines (not a JSON object, not strict JSON, nested deeper than
    the parser allows) are counted, with ``file@offset`` samples.
    """
    parts = {n: part for part, n in enumerate(n for n, b in enumerate(batches) if b.round == 0)}
    files = [
        (Path(p), b.round, n, parts[n] if n in parts else round_slot(b.round))
        for n, b in enumerate(batches)
        for p in (b.output_file, b.error_file)
        if p is not None
    ]
    files.sort(key=lambda f: -f[1])  # newest round first
    for path, round_, number, slot in files:
        with open(path, "rb") as handle:
            offset = 0
            for raw in handle:
                start, offset = offset, offset + len(raw)
                if raw.isspace():
                    continue
                try:
                    data = codec.parse_vendor_object(raw)
                    value = data.get("custom_id")
                    if value is None or value == "" or isinstance(value, dict | list):
                        anomalies.add("no_custom_id", f"{path.name}@{start}")
                        continue
                    finished = _finish(data, schema)
                except (ValueError, RecursionError):
                    # RecursionError: nesting deeper than the parser allows, a malformed line like any other.
                    anomalies.add("malformed_lines", f"{path.name}@{start}")
                    continue
                yield (str(value), round_, number, slot, *finished)


def _iter_requests(source: Location, with_body: bool = True) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """
    Yield each request line's custom_id and body (a dict, or None), as ``json.loads`` reads the line.

    :param source: the request file.
    :param with_body: read the bodies too; without, None stands for every body.
    """
    with open_read(source) as handle:
        for line_no, raw in enumerate(handle, start=1):
            if raw.isspace():
                continue
            request = codec.read_request(raw, with_body)
            if request is None:
                # Request files are validated before upload; a line without an id means the file
                # changed since, and no row could be placed for it.
                raise ValueError(f"{source}: line {line_no}: custom_id: expected a request line with an id")
            yield request


@dataclass(frozen=True)
class BatchFiles:
    """
    What one batch of a job produced (its files, downloaded) and how it ended.

    :param status: the batch's final status; decides what its requests without a line became.
    :param output_file: the downloaded output file, if it has one.
    :param error_file: the downloaded error file, if it has one.
    :param requests: for a part of the input: how many request lines it holds (parts are in input order).
    :param round: 0 for the input's own batches; 1, 2, ... for resubmission rounds, whose lines replace
        earlier ones of the same request.
    :param sent: a resubmission round's request file: the requests the round's lines may answer, each
        one more attempt (a round split into several batches gives each the same file).
    """

    status: str | None
    output_file: str | os.PathLike[str] | None = None
    error_file: str | os.PathLike[str] | None = None
    requests: int | None = None
    round: int = 0
    sent: str | os.PathLike[str] | None = None


def join_results(
    requests: Location,
    destination: Location,
    *,
    output_file: str | os.PathLike[str] | None = None,
    error_file: str | os.PathLike[str] | None = None,
    batch_status: str | None = None,
    include_request: bool = False,
    batches: Sequence[BatchFiles] | None = None,
    output_schema: OutputSchema | None = None,
    format: ResultFormat = "jsonl",
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
) -> JoinReport:
    """
    Write one result row per request line, joining the vendor's output and error lines by custom_id.

    Memory stays flat: the lines are indexed in a temporary SQLite database (removed when the join
    ends, on error too), and rows are written as the request-ordered join produces them. Every row
    carries ``attempts``: how many times its request was sent (1, plus the resubmission rounds).

    :param requests: the request file the batch ran; rows come out in its order.
    :param destination: where the results JSONL goes; written to a temporary name, then moved.
    :param output_file: the downloaded output file (local), if the batch has one.
    :param error_file: the downloaded error file (local), if the batch has one.
    :param batch_status: the batch's final status; decides what a request without a line became
        (``expired`` -> expired, ``cancelled`` -> cancelled, anything else -> missing).
    :param include_request: add each request's body to its row as ``request``.
    :param batches: instead of the three above, every batch of a job: its parts (round 0, in input order,
        each with its ``requests`` count) and its resubmission rounds.
    :param output_schema: validate each succeeded response's answer against it and add ``output`` to
        every row; an answer that does not parse or validate makes the row ``invalid_output``.
    :param format: ``jsonl``, or ``parquet`` (typed columns, in row groups; needs pyarrow).
    :param row_group_rows: rows per Parquet row group, and the most rows held in memory.
    """
    format = check_format(format)
    if batches is None:
        batches = [BatchFiles(batch_status, output_file, error_file)]
    typed = output_schema is not None
    anomalies = Anomalies()
    with open_index() as index:
        index.add_lines(_finished_lines(batches, anomalies, output_schema), anomalies)
        # A round split into several batches has one request file: each of its requests counts once.
        rounds = dict.fromkeys((os.fspath(b.sent), b.round) for b in batches if b.sent is not None)
        for sent, round_ in rounds:
            index.add_sent((rid for rid, _ in _iter_requests(sent, with_body=False)), round_)
        with atomic_writer(destination) as out:
            sink = (
                ParquetSink(
                    out, output_schema, include_request=include_request, row_group_rows=row_group_rows
                )
                if format == "parquet"
                else None
            )
            rows, tokens, per_batch = index.write_rows(
                _with_missing(_iter_requests(requests, with_body=include_request), batches, typed),
                sink or out,
                include_request=include_request,
                anomalies=anomalies,
            )
            if sink is not None:
                sink.close()
        index.count_unknown(anomalies)
    counts: dict[str, int] = {s: rows[s] for s in (TYPED_ROW_STATUSES if typed else ROW_STATUSES)}
    counts["total"] = sum(counts.values())
    return JoinReport(
        result_uri=result_uri(destination),
        counts=counts,
        usage=dict(zip(_TOKEN_FIELDS, tokens, strict=True)),
        batch_usage=[
            dict(zip(_TOKEN_FIELDS, per_batch.get(n, (0, 0, 0)), strict=True)) for n in range(len(batches))
        ],
        anomalies=anomalies.counts,
        samples=anomalies.samples,
    )


def _with_missing(
    requests: Iterator[tuple[str, dict[str, Any] | None]], batches: Sequence[BatchFiles], typed: bool = False
) -> Iterator[tuple[str, dict[str, Any] | None, tuple[str, bytes], int]]:
    """
    Add to each request what it became without a line, by the end of the input part that held it, and
    that part's place (the slot of the lines that answer it).
    """
    parts = [b for b in batches if b.round == 0]
    ends: list[tuple[int, tuple[str, bytes]]] = []
    held = 0
    for part in parts:
        held += part.requests if part.requests is not None else 0
        ends.append((held, _missing(_MISSING_STATUS.get(part.status or "", "missing"), typed)))
    last = ends[-1][1] if ends else _missing("missing", typed)
    index = 0
    for number, (custom_id, body) in enumerate(requests, start=1):
        while index < len(ends) - 1 and number > ends[index][0]:
            index += 1
        yield custom_id, body, ends[index][1] if ends else last, index
