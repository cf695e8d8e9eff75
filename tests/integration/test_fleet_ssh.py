"""Remote hosts for real: a Docker host and a systemd host of the fleet lab, each its own network
namespace with its own sshd, driven only over SSH (pinned host keys, one shared connection).

Connections are counted where sshd logs them (LogLevel VERBOSE: one `Connection from` line per
TCP connection accepted).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from hxp.backends import backend_for
from hxp.backends.base import Commit, Create, Remove, UnitRef, observe_one
from hxp.backends.runners import SshRunner, control_dir_for, runner_for
from hxp.errors import BackendError, classify_error
from hxp.gpu_alloc import GIB
from hxp.io.gpus import discover_gpus
from hxp.spec import Stack
from hxp.units import expand_units
from tests.support.docker_engine import BUSYBOX_IMAGE, build_busybox_image
from tests.support.fleet_lab import (
    FleetLab,
    LabState,
    lab_available,
    set_gpus,
    ssh_connections,
    sshd_log,
)
from tests.support.nvidia_smi_double import h200
from tests.support.render_data import stack_from_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

UNITS = 30
#: One shared connection is the rule (three runs beside two busy CPU loops opened exactly one
#: each). OpenSSH's multiplexing client opens a connection of its own when the master cannot give
#: it a session (mux.c falls back to a direct connection), which a loaded sshd that has not yet
#: released the sessions just closed can cause: one CI run saw 4 on the systemd host. "A handful"
#: is the issue's word; more than 5 fails, with what sshd logged meanwhile.
MAX_CONNECTIONS = 5


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    """Two lab hosts: `dock` (its own dockerd) and `sysd` (systemd as PID 1, sshd inside)."""
    why = lab_available()
    if why is not None:
        pytest.skip(why)
    made = FleetLab("ssh", tmp_path_factory.mktemp("lab"))
    state = made.up([("dock", "docker"), ("sysd", "systemd")])
    try:
        build_busybox_image(f"unix://{state.host('dock').docker_socket}")
        yield state
    finally:
        made.down()


def thirty_unit_stack(state: LabState, host: str) -> Stack:
    backend = state.host(host).role
    services: dict[str, Any] = {}
    for i in range(UNITS):
        unit: dict[str, Any] = {"host": host, "stop_timeout": "1s"}
        if backend == "docker":
            unit.update(image=BUSYBOX_IMAGE, command=["sleep", "3600"])
        else:
            unit.update(command=["/bin/sleep", "3600"], user="root")
        services[f"u{i:02d}"] = unit
    return stack_from_data(
        {
            "version": 2,
            "stack": f"f{uuid.uuid4().hex[:8]}",
            "hosts": {host: state.ssh_host_entry(host)},
            "services": services,
        }
    )


def deploy_each_unit(stack: Stack, host: str, state_dir: Path) -> None:
    """What a deploy does per unit, 8 at a time: its own backend, create, look, commit."""
    instances = expand_units(stack)

    def one(inst: Any) -> None:
        backend = backend_for(host, stack.hosts[host], state_dir)
        backend.apply(Create(inst, "hash-1", 1))
        seen = observe_one(backend, inst)
        assert seen is not None
        assert seen.running, seen
        backend.apply(Commit(UnitRef.of(inst)))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, instances))


def remove_all(stack: Stack, host: str, state_dir: Path) -> None:
    def one(inst: Any) -> None:
        backend_for(host, stack.hosts[host], state_dir).apply(Remove(UnitRef.of(inst)))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, expand_units(stack)))


def close_shared_connection(stack: Stack, host: str, state_dir: Path) -> None:
    runner = runner_for(stack.hosts[host], state_dir=state_dir)
    assert isinstance(runner, SshRunner)
    runner.close()


@pytest.mark.parametrize("host", ["dock", "sysd"])
def test_thirty_units_on_one_ssh_host_share_one_connection(
    lab: LabState, host: str, tmp_path: Path
) -> None:
    stack = thirty_unit_stack(lab, host)
    state_dir = tmp_path / "state"
    before = ssh_connections(lab.host(host))
    log_before = len(sshd_log(lab.host(host)))
    try:
        deploy_each_unit(stack, host, state_dir)
        seen = backend_for(host, stack.hosts[host], state_dir).observe(stack.stack)
        assert sorted(seen) == [f"u{i:02d}" for i in range(UNITS)]
        assert all(u.running and u.config_hash == "hash-1" for u in seen.values())
    finally:
        remove_all(stack, host, state_dir)
        close_shared_connection(stack, host, state_dir)
    opened = ssh_connections(lab.host(host)) - before
    print(f"{host}: {UNITS} units deployed over {opened} TCP connection(s) to sshd")
    logged = sshd_log(lab.host(host))[log_before:]
    notable = [ln for ln in logged.splitlines() if "Accepted publickey" not in ln]
    assert 1 <= opened <= MAX_CONNECTIONS, "what sshd logged meanwhile:\n" + "\n".join(
        notable[-60:]
    )
    # The containers ran on the lab host's own engine, not on any engine of this machine.
    if host == "dock":
        engine = docker.DockerClient(base_url=f"unix://{lab.host(host).docker_socket}")
        assert engine.containers.list(all=True, filters={"label": f"hxp.stack={stack.stack}"}) == []


def test_without_a_shared_connection_each_command_connects(lab: LabState, tmp_path: Path) -> None:
    """The baseline the multiplexing is measured against: no control directory, one TCP
    connection per command."""
    h = lab.host("dock")
    plain = SshRunner(h.address, "root", identity_file=lab.client_key, known_hosts=lab.known_hosts)
    before = ssh_connections(h)
    for _ in range(5):
        plain.run(["true"])
    assert ssh_connections(h) - before == 5


def test_many_commands_at_once_stay_within_sshds_default_max_sessions(
    lab: LabState, tmp_path: Path
) -> None:
    """The lab's sshd keeps OpenSSH's default MaxSessions (10 per connection): 40 commands
    started side by side all succeed over the one shared connection (the runner holds them
    to MAX_SESSIONS at a time; beyond 10, sshd refuses the session and ssh falls back to a
    connection of its own per command)."""
    h = lab.host("dock")
    before = ssh_connections(h)
    runner = SshRunner(
        h.address,
        "root",
        identity_file=lab.client_key,
        known_hosts=lab.known_hosts,
        control_dir=control_dir_for(tmp_path / "state"),
    )
    try:
        with ThreadPoolExecutor(40) as pool:
            results = list(
                pool.map(lambda i: runner.run(["sh", "-c", f"sleep 0.3; echo {i}"]), range(40))
            )
        assert [r.text.strip() for r in results] == [str(i) for i in range(40)]
    finally:
        runner.close()
    assert 1 <= ssh_connections(h) - before <= MAX_CONNECTIONS


def wrong_known_hosts(lab: LabState, tmp_path: Path, address: str) -> Path:
    """A known_hosts that pins another key for `address` (as after a host was replaced)."""
    key = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    kind, blob = Path(f"{key}.pub").read_text().split()[:2]
    path = tmp_path / "known_hosts"
    path.write_text(f"{address} {kind} {blob}\n")
    return path


@pytest.mark.parametrize("host", ["dock", "sysd"])
def test_a_host_key_mismatch_is_refused_naming_the_host(
    lab: LabState, host: str, tmp_path: Path
) -> None:
    h = lab.host(host)
    pinned = wrong_known_hosts(lab, tmp_path, h.address)
    entry = lab.ssh_host_entry(host, known_hosts=str(pinned))
    stack = stack_from_data(
        {
            "version": 2,
            "stack": "keys",
            "hosts": {host: entry},
            "services": {
                "web": {"host": host, "image": BUSYBOX_IMAGE, "command": ["/bin/sleep", "9"]}
            },
        }
    )
    before = ssh_connections(h)
    with pytest.raises(BackendError) as err:
        backend_for(host, stack.hosts[host], tmp_path / "state").observe("keys")
    message = str(err.value)
    assert f"host key verification failed for {h.address}" in message
    assert str(pinned) in message
    assert not err.value.transient
    assert classify_error(err.value) == "permanent"
    # Refused before logging in: nothing ran there, and no shared connection was left behind.
    runner = runner_for(stack.hosts[host], state_dir=tmp_path / "state")
    assert isinstance(runner, SshRunner)
    assert not runner.master_alive()
    assert ssh_connections(h) - before >= 1


def test_an_unknown_host_key_is_refused_too(lab: LabState, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    h = lab.host("dock")
    runner = SshRunner(h.address, "root", identity_file=lab.client_key, known_hosts=str(empty))
    with pytest.raises(BackendError) as err:
        runner.run(["true"])
    assert "host key verification failed" in str(err.value)
    assert not err.value.transient


def test_a_refused_connection_is_transient(lab: LabState, tmp_path: Path) -> None:
    h = lab.host("dock")
    runner = SshRunner(
        h.address,
        "root",
        port=2222,  # nothing listens there
        identity_file=lab.client_key,
        known_hosts=lab.known_hosts,
        control_dir=control_dir_for(tmp_path),
    )
    with pytest.raises(BackendError) as err:
        runner.run(["true"])
    assert err.value.transient
    assert "Connection refused" in str(err.value)


def test_a_refused_key_is_permanent(lab: LabState, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    h = lab.host("sysd")
    runner = SshRunner(h.address, "root", identity_file=str(stranger), known_hosts=lab.known_hosts)
    with pytest.raises(BackendError) as err:
        runner.run(["true"])
    assert not err.value.transient
    assert f"{h.address} refused our key ({stranger})" in str(err.value)


def test_remote_gpu_discovery_over_ssh(lab: LabState, tmp_path: Path) -> None:
    h = lab.host("sysd")
    second = "GPU-00000000-0000-4000-8000-000000000001"
    set_gpus(
        h,
        [h200(0), h200(1, uuid=second)],
        [{"pid": 435, "name": "python3", "gpu_uuid": second, "used_memory_mib": 12806}],
    )
    declared = [{"index": i, "memory_gib": 141, "name": "H200"} for i in range(3)]
    data = {
        "version": 2,
        "stack": "gpus",
        "hosts": {"sysd": lab.ssh_host_entry("sysd", gpus=declared)},
        "services": {"web": {"host": "sysd", "command": ["/bin/sleep", "9"]}},
    }
    stack = stack_from_data(data)
    state_dir = tmp_path / "state"
    try:
        found = discover_gpus("sysd", stack.hosts["sysd"], state_dir=state_dir)
    finally:
        close_shared_connection(stack, "sysd", state_dir)
    assert found.source == "nvidia-smi"
    assert [d.index for d in found.devices] == [0, 1]
    # Memory as CUDA sees it: 143,771 MiB less the driver's 616.
    assert all(d.total_bytes == (143771 - 616) * 2**20 for d in found.devices)
    assert round(found.devices[0].total_bytes / GIB, 2) == 139.80
    assert found.devices[0].processes == ()
    assert [(p.pid, p.used_bytes) for p in found.devices[1].processes] == [(435, 12806 * 2**20)]
    assert found.devices[1].used_bytes == 12806 * 2**20
    assert found.warnings == (
        "hosts.sysd.gpus: 3 declared, 2 discovered",
        "hosts.sysd.gpus: GPU 2 is declared but was not discovered",
    )
    # `hxp plan` shows the mismatch as a warning (and still plans).
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run(
        [sys.executable, "-m", "hxp_cli", "plan", "-f", str(path), "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "  warning: hosts.sysd.gpus: 3 declared, 2 discovered\n" in done.stdout
    assert "1 to change" in done.stdout
    close_shared_connection(stack, "sysd", state_dir)
