"""The operator's commands end to end: apply, status, history, rollback, down (process backend)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hxp.backends.process import ProcessBackend
from hxp.store import Store
from hxp_cli import main
from tests.support.stacks import web_stack

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_apply_status_history_rollback_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ports, _ = (*web_stack(tmp_path), None)
    state = tmp_path / "state"
    v2 = tmp_path / "v2.yaml"
    v2.write_text("services:\n  db:\n    env: {VERSION: '2'}\n")
    common = ("--state-dir", str(state))

    code, out, _ = run(capsys, "apply", "-f", str(path), *common)
    assert code == 0
    assert "Deploy #1 of stack t succeeded." in out
    code, out, _ = run(capsys, "apply", "-f", str(path), *common)
    assert code == 0
    assert "No changes." in out
    assert "running, config hash unchanged" in out

    code, out, _ = run(capsys, "status", "-f", str(path), *common)
    assert code == 0
    assert out.count("running  current") == 3

    code, out, _ = run(capsys, "apply", "-f", str(path), "-f", str(v2), *common)
    assert code == 0
    assert "db:update" in out
    code, out, _ = run(capsys, "history", "-f", str(path), "db", *common)
    assert code == 0
    lines = [line.split() for line in out.splitlines()[1:]]
    assert [(cols[0], cols[1]) for cols in lines] == [("1", "good"), ("2", "good")]

    code, out, _ = run(capsys, "rollback", "-f", str(path), "db", *common)
    assert code == 0, out
    assert "Rolled back db back to revision 1." in out
    revision_1 = Store(state).revisions("t", "db")[0]
    assert ProcessBackend(state).observe("t")["db"].config_hash == revision_1.config_hash
    # Measured against the v2 files, db now drifts: it runs revision 1 again.
    code, out, _ = run(capsys, "status", "-f", str(path), "-f", str(v2), *common)
    assert code == 1
    assert "drift" in out

    code, out, _ = run(capsys, "history", "-f", str(path), *common)
    assert "rollback" in out

    code, out, _ = run(capsys, "down", "-f", str(path), *common)
    assert code == 0
    assert out.splitlines()[:3] == ["removed api", "removed cache", "removed db"]
    assert ProcessBackend(state).observe("t") == {}
    code, out, _ = run(capsys, "status", "-f", str(path), *common)
    assert code == 1
    assert out.count("absent") == 3


def test_apply_with_bad_input_exits_2_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _, _ = (*web_stack(tmp_path), None)
    state = tmp_path / "state"
    code, _, err = run(
        capsys,
        "apply",
        "-f",
        str(path),
        "--set",
        "services.db.replicas=lots",
        "--state-dir",
        str(state),
    )
    assert code == 2
    assert "services.db.replicas" in err
    assert "Traceback" not in err
    assert not (state / "hxp.sqlite3").exists()


def test_failed_apply_prints_the_summary_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _, _ = (*web_stack(tmp_path), None)
    state = tmp_path / "state"
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  cache:\n    command: [/nonexistent/cache-server]\n")
    code, _, err = run(capsys, "apply", "-f", str(path), "-f", str(bad), "--state-dir", str(state))
    assert code == 1
    assert "error: deploy of stack 't' failed at cache@local" in err
    assert "removed (created by this deploy)" in err
    assert ProcessBackend(state).observe("t") == {}
