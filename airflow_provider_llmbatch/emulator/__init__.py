"""
A local emulator of the vendors' Batch APIs, built from the vendor registry.

Each vendor is served under its own prefix (:func:`emulator_prefix`) with its response shapes, quirks,
error bodies and result-file format (its :class:`EmulatorDialect`); batches move through their statuses
on a clock, and faults (throttling, 5xx, resets, slow or broken answers) can be injected per vendor and
operation.
"""

from __future__ import annotations

from airflow_provider_llmbatch.emulator.config import DEFAULT_API_KEY, EmulatorConfig, OffsetClock
from airflow_provider_llmbatch.emulator.faults import FaultRule
from airflow_provider_llmbatch.emulator.server import Emulator, build_app
from airflow_provider_llmbatch.emulator.vendor_dialects import (
    DIALECTS,
    EmulatorDialect,
    dialect_of,
    emulator_prefix,
)

__all__ = [
    "DEFAULT_API_KEY",
    "DIALECTS",
    "Emulator",
    "EmulatorConfig",
    "EmulatorDialect",
    "FaultRule",
    "OffsetClock",
    "build_app",
    "dialect_of",
    "emulator_prefix",
]
