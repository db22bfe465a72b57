from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Tests that import Airflow in this process get a private, throw-away AIRFLOW_HOME, set before anything
# imports Airflow, so the suite neither reads nor writes the machine's ~/airflow.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="llmbatch-tests-airflow-home-")
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)

pytest_plugins = ["airflow_provider_llmbatch.emulator.pytest_plugin"]
