"""Run the emulator: ``python -m airflow_provider_llmbatch.emulator``."""

from __future__ import annotations

import sys

from airflow_provider_llmbatch.emulator.cli import main

sys.exit(main())
