"""The compensating subflow restores units on the ready-set scheduler in reverse dependency
order: a unit once every changed unit that depends on it is restored, independent units side
by side. Real processes on the process backend, real Prefect server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hxp.backends.base import Remove, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.errors import DeployError
from hxp.store import Store
from tests.support.stacks import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

#: Appends its start time to a file, sleeps its start-up time, then listens.
SERVER = (
    "import socket, sys, time; open(sys.argv[3], 'a').write(f'{time.time()}\\n'); "
    "time.sleep(float(sys.argv[2])); s = socket.socket(); "
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(16); "
    "[s.accept()[0].close() for _ in iter(int, 1)]"
)
SLOW = 1.5  # start-up time of a and b: a serial rollback restores them >= this far apart


def stack(tmp: Path, version: str, ports: dict[str, int]) -> Path:
    """a and b independent, c depends on both; v2 changes all three and c exits at once."""
    services = {}
    for name, deps, delay in (("a", [], SLOW), ("b", [], SLOW), ("c", ["a", "b"], 0.2)):
        port = ports[name]
        services[name] = {
            "host": "local",
            "command": [sys.executable, "-c", SERVER, str(port), str(delay), str(tmp / name)],
            "ports": {"tcp": port},
            "depends_on": deps,
            "env": {"VERSION": version},
            "stop_timeout": "2s",
            "health": {"tcp": {"port": port}, "interval": "50ms", "start_period": "20s"},
        }
    if version == "2":
        services["c"]["command"] = [sys.executable, "-c", "raise SystemExit(3)"]
    path = tmp / f"v{version}.yaml"
    data = {"stack": "pr", "hosts": {"local": {"backend": "process"}}, "deploy": {"bake": "0s"}}
    path.write_text(json.dumps({**data, "services": services}))
    return path


def starts(tmp: Path, unit: str) -> list[float]:
    return [float(x) for x in (tmp / unit).read_text().split()]


def test_independent_units_are_restored_side_by_side_after_their_dependents(
    tmp_path: Path,
) -> None:
    from flows.deploy import deploy_stack

    state = tmp_path / "state"
    ports = {name: free_port() for name in ("a", "b", "c")}
    v1, v2 = stack(tmp_path, "1", ports), stack(tmp_path, "2", ports)
    try:
        assert deploy_stack(str(v1), state_dir=str(state))["changed"] is True
        with pytest.raises(DeployError, match="failed at c@local") as failed:
            deploy_stack(str(v2), state_dir=str(state))
        summary = str(failed.value)
        for unit in ("a", "b", "c"):
            assert f"{unit}: restored revision 1, healthy" in summary
        # Each was started by v1, by v2, then restored (c's v2 never wrote: it exits at once).
        a, b, c = starts(tmp_path, "a")[-1], starts(tmp_path, "b")[-1], starts(tmp_path, "c")[-1]
        assert len(starts(tmp_path, "a")) == 3
        assert abs(a - b) < SLOW / 2, (a, b)  # side by side, not one after the other
        assert min(a, b) > c + 0.2  # after c (their dependent) was restored and ready
        store = Store(state)
        assert {r.unit: r.status for r in store.revisions("pr") if r.revision == 2} == {
            "a": "rolled-back",
            "b": "rolled-back",
            "c": "rolled-back",
        }
        seen = ProcessBackend(state).observe("pr")
        assert all(seen[u].running for u in ("a", "b", "c"))
    finally:
        backend = ProcessBackend(state)
        for name in backend.observe("pr"):
            backend.apply(Remove(UnitRef("pr", name, name)))
