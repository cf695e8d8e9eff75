"""Start one host's units of a stack with the process backend, from inside that fleet-lab host's
network namespace: what the agent on that host does for its part of a deploy (the process
backend is local to its host), without a Prefect worker, so that a test that is about health
and the gateway does not pay for one.

`python -m tests.support.lab_units STACK_FILE HOST STATE_DIR` (run under `nsenter --net=...`):
create, start and commit every instance of HOST, then exit; the supervisors stay (they belong
to the namespace, and the lab's `down` ends them). `start_host_units` runs it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.fleet_lab import LabState

ROOT = Path(__file__).resolve().parents[2]


def start_host_units(state: LabState, host: str, stack_file: Path, state_dir: Path) -> None:
    """Run this module inside lab host `host`'s namespace; raise with its output if it fails."""
    ns = state.host(host).namespace
    done = subprocess.run(
        [
            "nsenter",
            f"--net=/run/netns/{ns}",
            sys.executable,
            "-m",
            "tests.support.lab_units",
            str(stack_file),
            host,
            str(state_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"units of {host} did not start: {done.stdout}{done.stderr}")


def main(argv: list[str]) -> int:
    from hxp.backends import backend_for
    from hxp.backends.base import Commit, Create, UnitRef
    from hxp.config import load_config, unit_config_hash
    from hxp.units import expand_units

    stack_file, host, state_dir = argv
    stack = load_config([stack_file], {}).stack
    backend = backend_for(host, stack.hosts[host], state_dir)
    for inst in expand_units(stack):
        if inst.host != host:
            continue
        backend.apply(Create(inst, unit_config_hash(stack, inst.unit), 1))
        backend.apply(Commit(UnitRef.of(inst)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
