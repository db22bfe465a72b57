"""The provider imports without Airflow's AI provider; only the adapters need it, and say how to get it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent(
    """
    import importlib, pathlib, sys

    # Everything of common-ai but the provider info Airflow's provider discovery reads from its metadata.
    ALLOWED = {"airflow.providers.common.ai", "airflow.providers.common.ai.get_provider_info"}

    class NoCommonAI:
        def find_spec(self, name, path=None, target=None):
            if name.startswith("airflow.providers.common.ai.") and name not in ALLOWED:
                raise ImportError(f"{name} is not installed")
            return None

    sys.meta_path.insert(0, NoCommonAI())

    import airflow_provider_llmbatch
    from airflow_provider_llmbatch.get_provider_info import get_provider_info

    get_provider_info()
    root = pathlib.Path(airflow_provider_llmbatch.__file__).parent
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if "common_ai" not in parts and parts[-1] != "__main__":
            importlib.import_module(".".join(p for p in parts if p != "__init__"))
    assert not set(n for n in sys.modules if n.startswith("airflow.providers.common.ai")) - ALLOWED
    try:
        import airflow_provider_llmbatch.common_ai
    except Exception as exc:
        print("REFUSED", type(exc).__name__, exc)
    """
)


def test_the_provider_imports_without_common_ai_and_the_adapters_name_the_extra(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "AIRFLOW_HOME": str(tmp_path), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED ")]
    assert refused, proc.stdout[-2000:]
    assert "AirflowOptionalProviderFeatureException" in refused[0]
    assert 'pip install "airflow-provider-llmbatch[common-ai]"' in refused[0]
