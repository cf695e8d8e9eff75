"""A Docker daemon restart in the middle of a deploy, on a daemon this test starts itself (its
own socket, data and exec roots; the session's shared engine is never restarted): the docker
backend waits for an engine it reached before to come back, and the campaign's docker-restart
runs (hxp.chaos) end consistent, leaving no container behind."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import yaml

from hxp.backends.base import LABEL_STACK
from hxp.backends.docker import DockerBackend
from hxp.chaos import Fault, generated_stack
from hxp.spec import HostSpec
from tests.support.docker_engine import (
    PrivateDockerd,
    build_chaos_image,
    dockerd_available,
    own_dockerd,
)
from tests.support.stacks import free_range

pytestmark = [pytest.mark.slow]

#: How long the daemon stays down in the campaign's restart: longer than the deploy task's own
#: retries of a transient error (1 s, then 2 s), as a daemon stopping real containers takes.
DOWN_SECONDS = 5.0


@pytest.fixture
def engine(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PrivateDockerd]:
    """A dockerd of this test alone (it is restarted), DOCKER_HOST pointing at it."""
    if not dockerd_available():
        pytest.skip("dockerd is not installed or not root (scripts/install-system-deps.sh)")
    with own_dockerd(tmp_path_factory.mktemp("restart-dockerd")) as started:
        monkeypatch.setenv("DOCKER_HOST", started.url)
        yield started


def test_the_backend_waits_for_an_engine_it_reached_to_come_back(
    engine: PrivateDockerd, tmp_path: Path
) -> None:
    """Before: a call made while the daemon restarted failed at once (`cannot reach Docker`),
    so a restart longer than the deploy task's retries (about 3 s) failed the deploy, and its
    rollback, made at once too, failed as well: the new revision kept running uncommitted, the
    previous one was left stopped as `-prev`."""
    assert DockerBackend("box", HostSpec(backend="docker"), tmp_path).observe("none") == {}
    engine.stop()
    back = threading.Thread(target=lambda: (time.sleep(2.0), engine.start()))
    started = time.monotonic()
    back.start()
    try:
        assert DockerBackend("box", HostSpec(backend="docker"), tmp_path).observe("none") == {}
    finally:
        back.join()
    assert time.monotonic() - started >= 2.0


@pytest.mark.usefixtures("prefect_server")
def test_a_daemon_restart_mid_deploy_ends_consistent(
    engine: PrivateDockerd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.chaos import Campaign, run_campaign

    seed = random.randrange(1, 10**6)
    with capsys.disabled():
        print(f"\ndocker-restart runs: seed {seed} (replay one: --replay {seed}:RUN)")
    base = free_range(2)
    name = f"cr{seed}"
    image = build_chaos_image(engine.url)
    stack = generated_stack(name, range(base, base + 2), "python3", "docker", image=image)
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(stack, sort_keys=False))
    runs = Campaign(
        path,
        tmp_path / "state",
        "docker",
        log=lambda line: None,
        restart_docker=lambda: engine.restart(DOWN_SECONDS),
    )
    assert Fault.DOCKER_RESTART in runs.faults
    assert Fault.DOCKER_RESTART not in runs.skipped
    select = [r for r in range(500) if runs.plan(seed, r).fault is Fault.DOCKER_RESTART][:2]
    try:
        results = run_campaign(runs, seed, 0, log=print, select=select)
    finally:
        runs.teardown()
    assert [r.plan.fault for r in results] == [Fault.DOCKER_RESTART] * 2
    bad = [
        f"--replay {r.plan.key}: {r.violations} {r.error or ''}"
        for r in results
        if not r.consistent
    ]
    assert not bad, f"seed {seed}:\n" + "\n".join(bad)
    client = docker.DockerClient(base_url=engine.url)
    assert client.containers.list(all=True, filters={"label": f"{LABEL_STACK}={name}"}) == []


def test_a_campaign_not_handed_its_daemon_never_restarts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `hxp chaos` on a user's stack: no daemon handed over, so the fault is skipped."""
    from flows.chaos import Campaign

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'none.sock'}")
    base = free_range(2)
    stack = generated_stack("crs", range(base, base + 2), "python3", "docker", image="x:1")
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(stack, sort_keys=False))
    runs = Campaign(path, tmp_path / "state", "docker", log=lambda line: None)
    assert Fault.DOCKER_RESTART not in runs.faults
    assert "not one the campaign started" in runs.skipped[Fault.DOCKER_RESTART]
