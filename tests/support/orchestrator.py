"""The hxp CLI as a separate orchestrator process, for tests that SIGKILL it mid-run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def hxp_process(
    *args: str, state: Path, code: str | None = None, **kw: Any
) -> subprocess.Popen[str]:
    """`hxp ARGS` (or `python -c CODE ARGS`, a CLI with test doubles installed) against the
    test's Prefect server and state directory, in a session of its own so that the test can
    kill all of it; stdout and stderr together on `.stdout`."""
    from prefect.settings import PREFECT_API_URL

    environ = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "HXP_STATE_DIR": str(state),
    }
    program = ["-c", code] if code is not None else ["-m", "hxp_cli"]
    return subprocess.Popen(
        [sys.executable, *program, *args],
        env=environ,
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **kw,
    )
