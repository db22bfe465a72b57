"""
The results join's working state on disk: a spool of finished rows and a SQLite index of them.

Every output and error line comes in finished (its row but for the custom_id); the row goes to the
spool file and its custom_id into the index, under its slot: the part of the input whose batch wrote it
(a part's lines answer only that part's requests), or its resubmission round (a round's lines answer only
the requests it sent again, of any part). In a slot the first line of an id wins. The requests then come
in file order, a batch at a time, each with its part: one query finds their lines, the newest round's
that sent it before the part's own, and their rows are copied out of the spool as they come. In memory
there is one byte per line (was it used?), a batch of lines or requests at a time, and SQLite's page
cache; the directory goes when the join ends.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from airflow_provider_llmbatch.codec import to_json

if TYPE_CHECKING:
    from airflow_provider_llmbatch.results import Anomalies

FinishedLine: TypeAlias = tuple[str, int, int, int, str, int, int, int, bytes]
"""An output or error line as a row: custom_id, its batch's round, its batch's number (its place in the
join's batches), its slot (the part of the input its batch ran, or :func:`round_slot`), status, prompt,
completion and total tokens, and the row's other members as JSON
(``"status":...,"response":...,"error":...,"usage":...``)."""


def round_slot(round_: int) -> int:
    """Return the slot of a resubmission round's lines (parts take the slots from 0 up)."""
    return -round_


_Request: TypeAlias = tuple[bytes, int, bytes, bytes | None, tuple[str, bytes]]
# A request to write: its key, its part, its id as JSON, its body as JSON (or None), its row without a line.

# Lines are stored, requests looked up and rows written in batches of at most this many lines or bytes.
_BATCH_LINES = 512
_BATCH_BYTES = 512 * 1024
# SQLite integers are 64-bit; a larger token count (never a real one) is stored as its digits.
_INT64 = 1 << 63
# A throwaway database: no journal, no fsync, a bounded page cache (KiB), sorts spilled to files.
_PRAGMAS = (
    "PRAGMA journal_mode = OFF",
    "PRAGMA synchronous = OFF",
    "PRAGMA temp_store = FILE",
    "PRAGMA cache_size = -8192",
)
# ``lines``: one row per custom_id and slot of the output and error files, for its first line there: the
# line's place among them (``seq``), its round, its batch, status and tokens, and where its finished row
# is in the spool file. ``sent``: the resubmission rounds that sent each request again.
# ``missing``: the request ids that have no line, to tell a repeated one. Ids are UTF-8 blobs (lone
# surrogates kept); the token columns have no type, so a count beyond 64 bits can be stored as text.
_SCHEMA = """
CREATE TABLE lines (
    id BLOB NOT NULL,
    slot INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    round INTEGER NOT NULL,
    batch INTEGER NOT NULL,
    status TEXT NOT NULL,
    prompt,
    completion,
    total,
    pos INTEGER NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (id, slot)
) WITHOUT ROWID;
CREATE TABLE missing (id BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE sent (id BLOB NOT NULL, round INTEGER NOT NULL, PRIMARY KEY (id, round)) WITHOUT ROWID;
"""
_INSERT_LINES = "INSERT OR IGNORE INTO lines VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_SENT = "INSERT OR IGNORE INTO sent VALUES (?, ?)"
_LOOKUP_LINES = (
    "SELECT id, slot, seq, batch, status, prompt, completion, total, pos, size FROM lines WHERE id IN ({})"
)
_LOOKUP_MISSING = "SELECT id FROM missing WHERE id IN ({})"
_LOOKUP_SENT = "SELECT id, round FROM sent WHERE id IN ({})"


class RowSink(Protocol):
    """Where rows are written: a binary file, or anything else that takes JSONL bytes."""

    def write(self, data: bytes, /) -> Any:
        """Take the bytes of whole rows."""


def _key(custom_id: str) -> bytes:
    return custom_id.encode("utf-8", "surrogatepass")


def _id_of(key: bytes) -> str:
    return key.decode("utf-8", "surrogatepass")


class ResultIndex:
    """
    The spool and the index of one join, in a temporary directory (see :func:`open_index`).

    The spool holds every finished row (less its custom_id) in the order of the lines; the index maps
    each custom_id to its first line.
    """

    def __init__(self, directory: str) -> None:
        self.db = sqlite3.connect(os.path.join(directory, "index.sqlite"), isolation_level=None)
        for pragma in _PRAGMAS:
            self.db.execute(pragma)
        self.db.executescript(_SCHEMA)
        # One transaction for the whole join: nothing is ever committed, the file is thrown away.
        self.db.execute("BEGIN")
        self.spool_path = os.path.join(directory, "rows.spool")
        self.lines = 0
        self.stored = 0
        self.used = bytearray()
        self.resent = False
        self.missed = False

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def add_lines(self, lines: Iterable[FinishedLine], anomalies: Anomalies) -> None:
        """Spool the rows of every output and error line and index their custom_ids, counting duplicates."""
        batch: list[tuple[Any, ...]] = []
        rows: list[bytes] = []
        pos = spooled = 0
        with open(self.spool_path, "wb") as spool:
            for custom_id, round_, number, slot, status, prompt, completion, total, members in lines:
                self.lines += 1
                rows.append(members)
                size = len(members)
                tokens: tuple[int | str, ...] = (prompt, completion, total)
                if min(prompt, completion, total) < -_INT64 or max(prompt, completion, total) >= _INT64:
                    tokens = (str(prompt), str(completion), str(total))  # past SQLite's 64 bits
                batch.append((_key(custom_id), slot, self.lines, round_, number, status, *tokens, pos, size))
                pos += size
                if len(batch) >= _BATCH_LINES or pos - spooled >= _BATCH_BYTES:
                    spool.write(b"".join(rows))
                    self._store(batch, anomalies)
                    batch, rows, spooled = [], [], pos
            spool.write(b"".join(rows))
            self._store(batch, anomalies)
        self.used = bytearray(self.lines + 1)

    def _store(self, batch: list[tuple[Any, ...]], anomalies: Anomalies) -> None:
        """Index a batch of lines; an id already indexed keeps its first line."""
        if not batch:
            return
        added = self.db.executemany(_INSERT_LINES, batch).rowcount
        self.stored += added
        duplicates = len(batch) - added
        if not duplicates:
            return
        # The lines that lost: their id is indexed in their slot under another line. One of a later round
        # replaced it (a resubmission, not an anomaly); one of the same round is a duplicate.
        marks = ",".join("?" * len(batch))
        kept = {
            (key, slot): (seq, round_)
            for key, slot, seq, round_ in self.db.execute(
                f"SELECT id, slot, seq, round FROM lines WHERE id IN ({marks})", [line[0] for line in batch]
            )
        }
        for key, slot, seq, round_, *_ in batch:
            winner = kept.get((key, slot))
            if winner is not None and winner[0] != seq and winner[1] == round_:
                anomalies.add("duplicates", _id_of(key))

    def add_sent(self, custom_ids: Iterable[str], round_: int) -> None:
        """Note the requests resubmission round ``round_`` sent again (an id it repeats, once)."""
        batch: list[tuple[bytes, int]] = []
        self.resent = True
        for custom_id in custom_ids:
            batch.append((_key(custom_id), round_))
            if len(batch) >= _BATCH_LINES:
                self.db.executemany(_INSERT_SENT, batch)
                batch = []
        self.db.executemany(_INSERT_SENT, batch)

    def write_rows(
        self,
        requests: Iterable[tuple[str, dict[str, Any] | None, tuple[str, bytes], int]],
        out: RowSink,
        *,
        include_request: bool,
        anomalies: Anomalies,
    ) -> tuple[Counter[str], list[int], dict[int, list[int]]]:
        """
        Write one row per request, in request order.

        :param requests: each request's custom_id, body (a dict, or None), the status and finished row
            members it gets without a line, and its part (the slot of the lines that answer it).
        :param out: where the rows go.
        :param include_request: add each request's body to its row as ``request``.
        :param anomalies: counts the repeated request ids.
        :return: the rows per status; the prompt, completion and total tokens over them; and the same
            tokens per batch number (of the batches whose lines became rows).
        """
        writer = _RowWriter(self, out, anomalies)
        batch: list[_Request] = []
        size = 0
        with open(self.spool_path, "rb", buffering=0) as spool:
            writer.spool = spool.fileno()
            for custom_id, body, missing, part in requests:
                request = to_json(body) if include_request else None
                batch.append((_key(custom_id), part, to_json(custom_id), request, missing))
                size += len(request) if request is not None else 0
                if len(batch) >= _BATCH_LINES or size >= _BATCH_BYTES:
                    writer.write(batch)
                    batch, size = [], 0
            writer.write(batch)
            writer.flush()
        return writer.counts, writer.tokens, writer.batch_tokens

    def count_unknown(self, anomalies: Anomalies) -> None:
        """Count the ids of the output and error files that no request line has, in order of appearance."""
        used = self.used
        if self.stored == used.count(1):
            return
        for key, seq in self.db.execute("SELECT id, seq FROM lines ORDER BY seq"):
            if not used[seq]:
                anomalies.add("unknown_ids", _id_of(key))


class _RowWriter:
    """Write the rows of batches of requests: look their ids up, read their rows from the spool."""

    def __init__(self, index: ResultIndex, out: RowSink, anomalies: Anomalies) -> None:
        self.index = index
        self.out = out
        self.spool = -1  # the spool's file descriptor, read with os.pread
        self.anomalies = anomalies
        self.counts: Counter[str] = Counter()
        self.tokens = [0, 0, 0]
        self.batch_tokens: dict[int, list[int]] = {}
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    def write(self, batch: list[_Request]) -> None:
        """Write the rows of a batch of requests, in order."""
        if not batch:
            return
        db, used, spool, index = self.index.db, self.index.used, self.spool, self.index
        keys = list(dict.fromkeys(request[0] for request in batch))
        marks = ",".join("?" * len(keys))
        lines: dict[bytes, list[tuple[Any, ...]]] = {}
        for found in db.execute(_LOOKUP_LINES.format(marks), keys):
            lines.setdefault(found[0], []).append(found)
        sent: dict[bytes, list[int]] = {}  # the rounds that sent each request again
        if index.resent:
            for key, round_ in db.execute(_LOOKUP_SENT.format(marks), keys):
                sent.setdefault(key, []).append(round_)
        # Requested before without a line; looked up only once some request had none.
        seen = {k for (k,) in db.execute(_LOOKUP_MISSING.format(marks), keys)} if index.missed else set()
        unanswered: list[tuple[bytes]] = []
        counts, tokens, pending = self.counts, self.tokens, self.pending
        for key, part, label, request, missing in batch:
            candidates = lines.get(key, ())
            rounds = sent.get(key, ())
            line: tuple[Any, ...] | None
            if len(candidates) == 1 and candidates[0][1] == part:
                line = candidates[0]
                again = used[candidates[0][2]]
            else:
                line = _answer(candidates, part, rounds)
                # Requested before: a line of its id answered it (any slot's, see below).
                again = any(used[other[2]] for other in candidates)
            if again or key in seen:
                self.anomalies.add("duplicate_requests", _id_of(key))
            if line is None:
                status, fragment = missing
                if key not in seen:
                    seen.add(key)
                    unanswered.append((key,))
            else:
                _, _, seq, number, status, prompt, completion, total, pos, size = line
                used[seq] = 1
                if line[1] != part:  # the lines a round's replaced answered this request too: no unknown ids
                    for other in candidates:
                        if other[1] == part or -other[1] in rounds:
                            used[other[2]] = 1
                per_batch = self.batch_tokens.get(number)
                if per_batch is None:
                    per_batch = self.batch_tokens[number] = [0, 0, 0]
                prompt, completion, total = int(prompt), int(completion), int(total)
                tokens[0] += prompt
                tokens[1] += completion
                tokens[2] += total
                per_batch[0] += prompt
                per_batch[1] += completion
                per_batch[2] += total
                fragment = os.pread(spool, size, pos)
            counts[status] += 1
            row = _row(label, fragment, request, 1 + len(rounds))
            pending.append(row)
            self.pending_bytes += len(row)
            if self.pending_bytes >= _BATCH_BYTES:
                self.flush()
        if unanswered:
            db.executemany("INSERT OR IGNORE INTO missing VALUES (?)", unanswered)
            index.missed = True

    def flush(self) -> None:
        self.out.write(b"".join(self.pending))
        self.pending.clear()
        self.pending_bytes = 0


def _answer(
    candidates: Iterable[tuple[Any, ...]], part: int, rounds: Sequence[int]
) -> tuple[Any, ...] | None:
    """
    Return the line that answers a request of ``part``: the newest line of a round that sent it again,
    else the part's own; None when neither has one.

    :param candidates: the indexed lines of the request's id, in every slot.
    :param rounds: the rounds that sent the request again.
    """
    own = newest = None
    for line in candidates:
        slot = line[1]
        if slot == part:
            own = line
        elif slot < 0 and -slot in rounds and (newest is None or slot < newest[1]):
            newest = line
    return newest or own


def _row(label: bytes, fragment: bytes, request: bytes | None, attempts: int) -> bytes:
    """
    Return one results line: the request's id, the finished members of its row, its attempts, and its
    body if asked.

    :param label: the custom_id as JSON.
    :param fragment: the row's ``status``, ``response``, ``error`` and ``usage`` members as JSON.
    :param request: the request body as JSON, or None to leave ``request`` out.
    :param attempts: how many times the request was sent.
    """
    head = b'{"custom_id":' + label + b"," + fragment + b',"attempts":' + str(attempts).encode()
    if request is None:
        return head + b"}\n"
    return head + b',"request":' + request + b"}\n"


@contextlib.contextmanager
def open_index() -> Iterator[ResultIndex]:
    """Yield an empty index in a new temporary directory; the directory is removed on the way out."""
    with tempfile.TemporaryDirectory(prefix="llmbatch-join-") as directory:
        index = ResultIndex(directory)
        try:
            yield index
        finally:
            index.close()
