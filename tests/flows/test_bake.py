"""The bake window on the process backend, with the default settings: a new revision that
serves, passes its check, then crashes a moment later is rolled back (exit 1, the previous
revision back and serving, history saying so); `--no-bake` commits it. Real processes, real
Prefect server."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from hxp.backends.base import Remove, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.store import Store
from hxp_cli import main
from tests.support.crash_after_serving import crash_after_serving
from tests.support.stacks import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def stack(tmp: Path, port: int) -> tuple[Path, Path]:
    """v1: a plain HTTP server; v2 (an overlay): serves, passes its check, exits 1 two seconds
    after its first request. No bake, no min_ready set: the defaults."""
    py = sys.executable
    base = tmp / "stack.yaml"
    base.write_text(
        textwrap.dedent(
            f"""\
            stack: bk
            hosts:
              local: {{backend: process}}
            services:
              api:
                host: local
                command: [{py}, -m, http.server, "{port}", --bind, 127.0.0.1]
                ports: {{http: {port}}}
                health:
                  http: {{url: "http://127.0.0.1:{port}/"}}
                  interval: 1s
                  timeout: 500ms
                  start_period: 5s
            """
        )
    )
    v2 = tmp / "v2.yaml"
    command = json.dumps(crash_after_serving(py, port, 2.0))
    v2.write_text(f"services:\n  api:\n    command: {command}\n")
    return base, v2


def serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    base, v2 = stack(tmp_path, port)
    state = tmp_path / "state"
    yield base, v2, state, port
    backend = ProcessBackend(state)
    for name in backend.observe("bk"):
        backend.apply(Remove(UnitRef("bk", name, name)))


def test_crash_after_serving_fails_during_bake_and_the_previous_revision_comes_back(
    env, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    base, v2, state, port = env
    common = ("--state-dir", str(state))
    assert main(["apply", "-f", str(base), *common]) == 0
    capsys.readouterr()

    code = main(["apply", "-f", str(base), "-f", str(v2), *common])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "failed during bake" in out + err

    store = Store(state)
    failed = store.deploys("bk")[0]
    assert failed.status == "failed"
    assert failed.result is not None
    assert failed.result["phase"] == "bake"
    assert failed.result["reason_class"] == "bake"
    assert failed.result["failed_unit"] == "api"
    good = store.last_good("bk", "api")
    assert good is not None
    assert good.revision == 1
    assert [r.status for r in store.revisions("bk", "api")] == ["good", "rolled-back"]
    seen = ProcessBackend(state).observe("bk")["api"]
    assert seen.running
    assert seen.config_hash == good.config_hash
    assert serving(port)

    assert main(["history", "-f", str(base), *common]) == 0
    out, _ = capsys.readouterr()
    assert "failed during bake: api" in out.splitlines()[1]


def test_no_bake_commits_a_revision_that_crashes_after_serving(
    env, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    base, v2, state, _port = env
    common = ("--state-dir", str(state))
    assert main(["apply", "-f", str(base), *common]) == 0
    assert main(["apply", "-f", str(base), "-f", str(v2), "--no-bake", *common]) == 0
    capsys.readouterr()
    revisions = Store(state).revisions("bk", "api")
    assert [r.status for r in revisions] == ["good", "good"]
