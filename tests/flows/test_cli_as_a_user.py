"""The installed `hxp` script exactly as a new user runs it: no Prefect variable at all, a fresh
HOME (so no Prefect profile either) and state directory. Every run must land on the server
`hxp server start` started, where the UI shows it: never on a temporary server of its own."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.stacks import web_stack
from tests.support.user import User
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def user(tmp_path: Path) -> Iterator[User]:
    home = tmp_path / "home"
    home.mkdir()
    who = User(home, tmp_path / "state")
    yield who
    who.hxp("server", "stop")


def _post(api: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = httpx.post(f"{api}/{path}", json=body, timeout=10)
    response.raise_for_status()
    rows: list[dict[str, Any]] = response.json()
    return rows


def _flow_run(api: str, name: str) -> dict[str, Any] | None:
    runs = _post(api, "flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})
    done = [r for r in runs if r["state_type"] == "COMPLETED"]
    return done[0] if done else None


def test_every_run_lands_on_the_server_hxp_server_start_started(user: User, tmp_path: Path) -> None:
    assert not [k for k in user.env if k.startswith("PREFECT_")]
    started = user.hxp("server", "start")
    assert started.returncode == 0, started.stderr
    api = re.search(r"\(API (http://\S+/api),", started.stdout)
    assert api is not None, started.stdout
    url = api.group(1)

    stack, _ports = web_stack(tmp_path)
    applied = user.hxp("apply", "-f", str(stack))
    output = applied.stdout + applied.stderr
    assert applied.returncode == 0, output
    assert "Deploy #1 of stack t succeeded." in applied.stdout
    assert f"Prefect API: {url}" in applied.stderr
    assert "temporary server" not in output
    assert "Started the local Prefect server" not in output  # it was running already

    deploy = wait_for(lambda: _flow_run(url, "deploy-t"), "the deploy-t flow run on the server")
    assert deploy["flow_id"]
    flow = httpx.get(f"{url}/flows/{deploy['flow_id']}", timeout=10).json()
    assert flow["name"] == "deploy-stack"
    wanted = {"deploy-db@local", "deploy-cache@local", "deploy-api@local", "commit-db"}

    def task_runs() -> set[str] | None:
        rows = _post(url, "task_runs/filter", {"flow_runs": {"id": {"any_": [deploy["id"]]}}})
        names = {r["name"] for r in rows if r["state_type"] == "COMPLETED"}
        return names if wanted <= names else None

    wait_for(task_runs, f"the task runs {sorted(wanted)} of deploy-t", 30)
    artifacts = _post(
        url, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [deploy["id"]]}}}
    )
    assert {"plan-t", "deploy-t"} <= {a["key"] for a in artifacts}

    links = user.hxp("urls", "-f", str(stack))
    assert links.returncode == 0, links.stderr
    assert f"/runs/flow-run/{deploy['id']}" in links.stdout

    down = user.hxp("down", "-f", str(stack))
    assert down.returncode == 0, down.stdout + down.stderr
    assert down.stdout.splitlines()[:3] == ["removed api", "removed cache", "removed db"]
    assert "temporary server" not in down.stdout + down.stderr
    down_run = wait_for(lambda: _flow_run(url, "down-t"), "the down-t flow run on the server")
    flow = httpx.get(f"{url}/flows/{down_run['flow_id']}", timeout=10).json()
    assert flow["name"] == "down-stack"

    # A Prefect profile that names an API comes before hxp's local server: with another
    # state directory (no local server there) the runs still land on this server.
    profiles = Path(user.env["HOME"]) / ".prefect" / "profiles.toml"
    profiles.write_text(f'active = "ops"\n\n[profiles.ops]\nPREFECT_API_URL = "{url}"\n')
    user.env["HXP_STATE_DIR"] = str(tmp_path / "other-state")
    again = user.hxp("apply", "-f", str(stack))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"Prefect API: {url} (Prefect profile ops)" in again.stderr
    assert not (tmp_path / "other-state" / "prefect" / "server.json").exists()
    runs = _post(url, "flow_runs/filter", {"flow_runs": {"name": {"any_": ["deploy-t"]}}})
    assert len(runs) == 2
    assert user.hxp("down", "-f", str(stack)).returncode == 0
    user.env["HXP_STATE_DIR"] = str(tmp_path / "state")  # for `hxp server stop`


def test_a_command_that_needs_the_server_starts_it_once_and_says_so(
    user: User, tmp_path: Path
) -> None:
    stack, _ports = web_stack(tmp_path)
    first = user.hxp("apply", "-f", str(stack))
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stderr.count("Started the local Prefect server") == 1
    assert "temporary server" not in first.stdout + first.stderr
    status = user.hxp("server", "status")
    assert status.returncode == 0, status.stdout
    ui = status.stdout.split("running: ", 1)[1].split()[0]
    assert _flow_run(f"{ui}/api", "deploy-t") is not None
    again = user.hxp("down", "-f", str(stack))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Started the local Prefect server" not in again.stderr  # the same one, reused
    assert f"Prefect API: {ui}/api" in again.stderr
