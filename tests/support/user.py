"""The installed `hxp` script as a new user runs it: no Prefect variable, a fresh HOME (so no
Prefect profile) and a fresh state directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HXP = Path(sys.executable).parent / "hxp"


class User:
    """A shell of a user who has only installed hxp."""

    def __init__(self, home: Path, state: Path, **extra: str) -> None:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HXP"))}
        self.env = {**keep, "HOME": str(home), "HXP_STATE_DIR": str(state), **extra}
        self.cwd = home

    def hxp(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(HXP), *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
