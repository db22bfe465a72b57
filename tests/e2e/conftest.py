from __future__ import annotations

from airflow_env import airflow_template

__all__ = ["airflow_template"]
