"""Read an Airflow SQLite metadata database, read-only, without importing Airflow."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class MetadataReader:
    """
    Read an Airflow SQLite metadata database, read-only, without importing Airflow.

    :param db_path: the SQLite file.
    """

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path

    def _query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        # Read-only and with a busy timeout: the scheduler and workers may be writing right now.
        con = sqlite3.connect(f"{self.db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def has_dag(self, dag_id: str) -> bool:
        """Return True once the DAG is parsed and serialized."""
        return bool(self._query("SELECT 1 FROM serialized_dag WHERE dag_id = ?", dag_id))

    def latest_run(self, dag_id: str) -> tuple[str, str | None] | None:
        """Return ``(run_id, state)`` of the DAG's newest run."""
        rows = self._query(
            "SELECT run_id, state FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", dag_id
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def run_dates(self, dag_id: str, run_id: str) -> tuple[str | None, str | None]:
        """Return ``(logical_date, run_after)`` of a run as stored (None where the run has none)."""
        rows = self._query(
            "SELECT logical_date, run_after FROM dag_run WHERE dag_id = ? AND run_id = ?", dag_id, run_id
        )
        if not rows:
            return None, None
        return _text(rows[0][0]), _text(rows[0][1])

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """Return task id -> state for a run (mapped tasks: the last index read wins)."""
        rows = self._query(
            "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?", dag_id, run_id
        )
        return {task_id: state for task_id, state in rows}

    def return_values(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """Return task id -> XCom return value for a run."""
        rows = self._query(
            "SELECT task_id, value FROM xcom WHERE dag_id = ? AND run_id = ? AND key = 'return_value'",
            dag_id,
            run_id,
        )
        values: dict[str, Any] = {}
        for task_id, raw in rows:
            try:
                values[task_id] = json.loads(raw) if isinstance(raw, str | bytes) else raw
            except ValueError:
                values[task_id] = raw
        return values

    def triggers(
        self, classpath: str, *, since: float = 0.0, until: float = float("inf")
    ) -> list[dict[str, Any] | None]:
        """Return the kwargs of the triggers of a class created in a time window (None where encrypted)."""
        rows = self._query("SELECT kwargs, created_date FROM trigger WHERE classpath = ?", classpath)
        found: list[dict[str, Any] | None] = []
        for raw, created in rows:
            if not since <= _epoch(created) <= until:
                continue
            try:
                kwargs = json.loads(raw) if str(raw).startswith("{") else None
            except ValueError:
                kwargs = None
            found.append(kwargs if isinstance(kwargs, dict) else None)
        return found


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _epoch(created: Any) -> float:
    try:
        moment = datetime.fromisoformat(str(created))
    except ValueError:
        return 0.0
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
