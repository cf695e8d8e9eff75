"""What use_prefect leaves in effect for the rest of a CLI process: the flow heartbeat off.

Run in a fresh interpreter (use_prefect changes process-wide Prefect settings and logging).
The heartbeat setting used to come back as soon as the garbage collector took the settings
context use_prefect had entered, so every CLI flow run started a heartbeat thread and waited
up to a second for it at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import argparse, gc
from hxp_cli.common import use_prefect
use_prefect(argparse.Namespace(state_dir={state!r}, debug=False))
gc.collect()
from prefect import flow  # what a command imports next (configures Prefect's logging again)
from prefect.settings import get_current_settings

gc.collect()
print("heartbeat", get_current_settings().flows.heartbeat_frequency)
"""


def test_use_prefect_keeps_the_heartbeat_off(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # an API that is configured (nothing is started; nothing here calls it)
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(state=str(tmp_path / "state"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "heartbeat None" in proc.stdout, proc.stdout
