"""The SSH runner's options and its reading of ssh's failures (the real sshd is in
tests/integration/test_fleet_ssh.py), and the host fields' bad-input errors through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hxp.backends.runners import SshFailure, SshRunner, classify_ssh_failure, control_dir_for
from hxp.spec import HostSpec

ROOT = Path(__file__).resolve().parents[2]

# What OpenSSH 9.2 prints (stderr, exit 255) in each case.
MESSAGES = [
    (
        "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
        "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
        "Host key verification failed.",
        SshFailure.HOST_KEY,
    ),
    (
        "No ED25519 host key is known for 198.18.0.2 and you have requested strict checking.\n"
        "Host key verification failed.",
        SshFailure.HOST_KEY,
    ),
    ("root@198.18.0.2: Permission denied (publickey).", SshFailure.AUTH),
    ("ssh: Could not resolve hostname gpu-9: Name or service not known", SshFailure.CONFIG),
    ("command-line line 0: Bad configuration option: frobnicate", SshFailure.CONFIG),
    ("ssh: connect to host 198.18.0.2 port 2222: Connection refused", SshFailure.UNREACHABLE),
    ("ssh: connect to host 198.18.0.9 port 22: No route to host", SshFailure.UNREACHABLE),
    ("ssh: connect to host 198.18.0.2 port 22: Connection timed out", SshFailure.UNREACHABLE),
    ("Connection closed by 198.18.0.2 port 22", SshFailure.UNREACHABLE),
    ("client_loop: send disconnect: Broken pipe", SshFailure.UNREACHABLE),
]


@pytest.mark.parametrize(("stderr", "kind"), MESSAGES, ids=[k.value for _, k in MESSAGES])
def test_ssh_failures_classified(stderr: str, kind: SshFailure) -> None:
    assert classify_ssh_failure(stderr) is kind
    assert kind.transient == (kind is SshFailure.UNREACHABLE)


def test_host_keys_are_pinned_to_the_given_file_and_connections_shared(tmp_path: Path) -> None:
    runner = SshRunner(
        "198.18.0.2",
        "root",
        identity_file="/k/id",
        known_hosts="/k/known_hosts",
        control_dir=tmp_path,
    )
    options = runner.options()
    pairs = {options[i + 1] for i, o in enumerate(options) if o == "-o"}
    assert {
        "StrictHostKeyChecking=yes",
        "UserKnownHostsFile=/k/known_hosts",
        "GlobalKnownHostsFile=/dev/null",
        "IdentityFile=/k/id",
        "IdentitiesOnly=yes",
        "BatchMode=yes",
    } <= pairs
    assert runner.control_path is not None
    assert runner.control_path.parent == tmp_path
    # Another host gets another socket; the same host (another runner object) the same one.
    assert SshRunner("198.18.0.3", "root", control_dir=tmp_path).control_path != (
        runner.control_path
    )
    same = SshRunner(
        "198.18.0.2",
        "root",
        identity_file="/k/id",
        known_hosts="/k/known_hosts",
        control_dir=tmp_path,
    )
    assert same.control_path == runner.control_path
    # Other pins never reuse a connection made under these.
    other = SshRunner("198.18.0.2", "root", known_hosts="/other/known_hosts", control_dir=tmp_path)
    assert other.control_path != runner.control_path


def test_control_sockets_stay_short(tmp_path: Path) -> None:
    short = control_dir_for("/var/lib/hxp")
    assert short == Path("/var/lib/hxp/ssh")
    deep = tmp_path / ("x" * 60) / "state"
    moved = control_dir_for(deep)
    assert moved.parent == Path("/tmp")
    assert moved == control_dir_for(deep)  # the same state dir: the same place
    runner = SshRunner("198.18.0.2", "root", control_dir=moved)
    # ssh binds `<path>.<16 random characters>` first: that must fit in sun_path (108).
    assert len(str(runner.control_path)) + 17 < 108


def test_without_a_control_dir_nothing_is_shared() -> None:
    runner = SshRunner("198.18.0.2")
    assert runner.control_path is None
    assert not runner.master_alive()
    assert "ControlMaster=no" not in runner.command(["true"], interactive=False)


# ---------------------------------------------------------------- bad input: exit 2, field named


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hxp_cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def stack_file(tmp_path: Path, hosts: str, services: str) -> Path:
    path = tmp_path / "stack.yaml"
    path.write_text(f"version: 2\nstack: s\nhosts:\n{hosts}\nservices:\n{services}\n")
    return path


WEB = "  web: {host: a, command: [/bin/true], ports: {http: 8000}}"


@pytest.mark.parametrize(
    ("hosts", "services", "expected"),
    [
        (
            "  a: {backend: systemd, runner: ssh, address: 10.0.0.300}",
            WEB,
            "hosts.a.address: invalid host address '10.0.0.300': neither an IP address nor a "
            "host name",
        ),
        (
            "  a: {backend: systemd, runner: ssh, address: 'gpu_01;id'}",
            WEB,
            "hosts.a.address: invalid host address 'gpu_01;id'",
        ),
        (
            "  a: {backend: systemd, runner: ssh, address: 198.18.0.2, ssh_key: /nonexistent/id}",
            WEB,
            "hosts.a.ssh_key: file '/nonexistent/id' does not exist",
        ),
        (
            "  a: {backend: systemd, runner: ssh, address: 198.18.0.2, "
            "known_hosts: /nonexistent/known_hosts}",
            WEB,
            "hosts.a.known_hosts: file '/nonexistent/known_hosts' does not exist",
        ),
        (
            "  a: {backend: systemd, runner: ssh, address: 198.18.0.2}",
            WEB + "\n  api: {host: a, command: [/bin/true], ports: {http: 8000}}",
            "services.web: port 8000 on host 'a' (198.18.0.2) already used by services.api",
        ),
        (
            "  a: {backend: systemd, runner: ssh, address: 198.18.0.2}\n"
            "  b: {backend: systemd, runner: ssh, address: 198.18.0.2}",
            WEB + "\n  api: {host: b, command: [/bin/true], ports: {http: 8000}}",
            "services.web: port 8000 on host 'a' (198.18.0.2) already used by services.api",
        ),
    ],
    ids=[
        "ip-out-of-range",
        "hostile-name",
        "missing-key",
        "missing-known-hosts",
        "same-port",
        "same-port-same-address",
    ],
)
def test_bad_host_input_exits_2_naming_the_field(
    tmp_path: Path, hosts: str, services: str, expected: str
) -> None:
    path = stack_file(tmp_path, hosts, services)
    state = tmp_path / "state"
    for command in (
        ["validate", "-f", str(path)],
        ["plan", "-f", str(path), "--state-dir", str(state)],
    ):
        done = run_cli(*command)
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr
        assert "Traceback" not in done.stderr
    assert not state.exists()  # nothing was made


def test_addresses_that_are_fine() -> None:
    for address in ("198.18.0.2", "fd00::5", "gpu-01.example.net", "gpu01", "localhost"):
        assert HostSpec(runner="ssh", address=address).address == address


def test_the_new_host_fields_leave_existing_config_hashes_alone(tmp_path: Path) -> None:
    """Unset, ssh_key/known_hosts/docker_socket are not part of the host's dump, so a unit's
    config hash (its spec plus its host) is what it was before they existed."""
    plain = HostSpec(backend="systemd", runner="ssh", address="10.0.0.5", ssh_user="deploy")
    assert sorted(plain.model_dump(mode="json")) == [
        "address",
        "backend",
        "container",
        "gpus",
        "labels",
        "runner",
        "ssh_port",
        "ssh_user",
        "work_pool",
    ]
    key = tmp_path / "id"
    key.write_text("k")
    pinned = HostSpec(runner="ssh", address="10.0.0.5", ssh_key=str(key))
    assert pinned.model_dump(mode="json")["ssh_key"] == str(key)
