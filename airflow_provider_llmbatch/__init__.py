"""Run LLM batch jobs on Zhipu, Moonshot, DashScope and any OpenAI-compatible Batch API from Airflow."""

from __future__ import annotations

__version__ = "0.1.0"
