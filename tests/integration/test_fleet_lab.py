"""The fleet lab itself: idempotent `up`, `down` that leaves nothing (also after a crash: the
prefix is swept), one lab at a time on 198.18.0.0/24, and a clear refusal when not root."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.fleet_lab import (
    PREFIX,
    FleetLab,
    LabError,
    LabState,
    lab_available,
    ssh_connections,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def needs_lab() -> None:
    why = lab_available()
    if why is not None:
        pytest.skip(why)


def leftovers(prefix: str, directory: Path) -> list[str]:
    """Everything on this machine that carries the lab's prefix or lives in its directory."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if prefix in line]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {m}" for m in re.findall(rf"^\d+: ({re.escape(prefix)}\S*?)[:@]", links, re.M)]
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [
        f"mount {line}" for line in mounts.splitlines() if prefix in line or str(directory) in line
    ]
    found += [f"run dir {p}" for p in Path("/run").glob(f"{prefix}*")]
    if directory.exists():
        found.append(f"directory {directory}")
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def test_up_twice_then_down_after_a_crash_leaves_nothing(needs_lab: None, tmp_path: Path) -> None:
    directory = tmp_path / "lab"
    lab = FleetLab("crash", directory)
    first = lab.up([("h1", "docker"), ("h2", "plain")])
    again = lab.up([("h1", "docker"), ("h2", "plain")])  # sweeps the first, same addresses
    assert [h.address for h in again.hosts] == ["198.18.0.2", "198.18.0.3"]
    assert [h.address for h in first.hosts] == [h.address for h in again.hosts]
    assert LabState.load(directory) == again
    assert ssh_connections(again.host("h2")) >= 1  # its sshd answered the readiness probe
    assert "sshd answers" in "\n".join(lab.status())
    # A crash: the process that made the lab is gone and something else runs in a namespace.
    started = subprocess.run(
        [
            "sh",
            "-c",
            f"nsenter --net=/run/netns/{PREFIX}crash-h1 sleep 600 >/dev/null 2>&1 & echo $!",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    stray = int(started.stdout)
    assert running(stray)
    removed = FleetLab("crash", directory).down()  # a fresh object: only names and files
    assert not running(stray)  # killed by the sweep
    assert f"namespace {PREFIX}crash-h1" in removed
    assert leftovers(f"{PREFIX}crash-", directory) == []
    assert FleetLab("crash", directory).down() == []  # nothing left to remove


def test_one_lab_at_a_time(needs_lab: None, tmp_path: Path) -> None:
    lab = FleetLab("one", tmp_path / "one")
    lab.up([("h1", "plain")])
    try:
        with pytest.raises(LabError, match=r"another fleet lab \('one'\) is up"):
            FleetLab("two", tmp_path / "two").up([("h1", "plain")])
        assert leftovers(f"{PREFIX}two-", tmp_path / "two") == []
    finally:
        lab.down()


def test_not_root_is_refused_clearly(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        done = subprocess.run(
            [str(ROOT / "scripts/fleet-lab.sh"), "up"], capture_output=True, text=True, check=False
        )
    else:
        done = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                str(ROOT / "scripts/fleet-lab.sh"),
                "up",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    assert done.returncode == 2
    assert "fleet-lab: needs root" in done.stderr
