"""The systemd backend's pure parts and command construction, against an in-memory host.

Parser cases are real output captured from systemd 252.39 (Debian 12) running as PID 1 in a
container (tests/support/systemd_container.py) and GNU grep 3.8.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import subprocess
from pathlib import Path

import pytest

from hxp.backends import backend_for
from hxp.backends.base import Commit, Create, Remove, Restore, Start, Stop, UnitRef, Update
from hxp.backends.runners import (
    CommandRunner,
    DockerExecRunner,
    LocalRunner,
    RunResult,
    SshRunner,
    runner_for,
)
from hxp.backends.systemd import (
    BACKUP_ROOT,
    UNIT_DIR,
    SystemdBackend,
    UnitMarkers,
    describe_state,
    env_file_text,
    invocations_tail,
    is_running,
    marker_lines,
    parse_marker_listing,
    parse_markers,
    parse_systemctl_show,
    render_unit,
    stop_seconds,
)
from hxp.config import load_config
from hxp.errors import BackendError
from hxp.render import render_stack
from hxp.spec import HostSpec
from hxp.units import UnitInstance, expand_units
from tests.support.render_data import EXAMPLES, stack_from_data

HOSTILE = "nginx; rm -rf / $(touch /tmp/pwned) `id` 'q' \"dq\" \\ \n end"

# ---------------------------------------------------------------- captured output

SHOW_THREE_UNITS = """\
MainPID=27
Result=success
NRestarts=0
ExecMainStatus=0
Id=systemd-journald.service
LoadState=loaded
ActiveState=active
SubState=running

MainPID=0
Result=success
NRestarts=0
ExecMainStatus=0
Id=nonexistent.service
LoadState=not-found
ActiveState=inactive
SubState=dead

MainPID=35
Result=success
NRestarts=0
ExecMainStatus=0
Id=dbus.service
LoadState=loaded
ActiveState=active
SubState=running
"""

SHOW_AUTO_RESTART = """\
MainPID=0
Result=exit-code
NRestarts=1
ExecMainStatus=1
Id=hxp-ex-web.service
LoadState=loaded
ActiveState=activating
SubState=auto-restart
"""

SHOW_START_LIMIT_HIT = """\
MainPID=0
Result=exit-code
NRestarts=5
ExecMainStatus=1
Id=hxp-ex-web.service
LoadState=loaded
ActiveState=failed
SubState=failed
"""

GREP_LISTING = (
    b"/etc/systemd/system/hxp-demo-web.service\x00# hxp-stack: demo\n"
    b"/etc/systemd/system/hxp-demo-web.service\x00# hxp-instance: web\n"
    b"/etc/systemd/system/hxp-demo-web.service\x00# hxp-config-hash: h1\n"
    b"/etc/systemd/system/hxp-demo-web.service\x00# hxp-revision: 1\n"
    b"/etc/systemd/system/hxp-demo-x-web.service\x00# hxp-stack: demo-x\n"
    b"/etc/systemd/system/hxp-demo-x-web.service\x00# hxp-instance: web\n"
    b"/etc/systemd/system/hxp-demo-x-web.service\x00# hxp-config-hash: h1\n"
    b"/etc/systemd/system/hxp-demo-x-web.service\x00# hxp-revision: 1\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            SHOW_THREE_UNITS,
            [
                ("systemd-journald.service", "loaded", "active", "running", "27"),
                ("nonexistent.service", "not-found", "inactive", "dead", "0"),
                ("dbus.service", "loaded", "active", "running", "35"),
            ],
            id="systemd-252-three-units-one-not-found",
        ),
        pytest.param(
            SHOW_AUTO_RESTART,
            [("hxp-ex-web.service", "loaded", "activating", "auto-restart", "0")],
            id="systemd-252-exit-1-auto-restart",
        ),
        pytest.param(
            SHOW_START_LIMIT_HIT,
            [("hxp-ex-web.service", "loaded", "failed", "failed", "0")],
            id="systemd-252-start-limit-hit",
        ),
        pytest.param("", [], id="no-units"),
        pytest.param(
            "\n\nId=a.service\n\n\n\nId=b.service",
            [("a.service",), ("b.service",)],
            id="extra-blank-lines",
        ),
    ],
)
def test_parse_systemctl_show(text: str, expected: list[tuple[str, ...]]) -> None:
    keys = ("Id", "LoadState", "ActiveState", "SubState", "MainPID")
    units = parse_systemctl_show(text)
    assert [tuple(u[k] for k in keys[: len(e)]) for u, e in zip(units, expected, strict=True)] == [
        tuple(e) for e in expected
    ]


def test_parse_systemctl_show_reports_unknown_lines() -> None:
    warnings: list[str] = []
    units = parse_systemctl_show(
        "Id=a.service\nnot a property\n=x\nDescription=a=b", warnings.append
    )
    assert units == [{"Id": "a.service", "Description": "a=b"}]
    assert len(warnings) == 2
    assert "not a property" in warnings[0]


@pytest.mark.parametrize(
    ("text", "running", "detail"),
    [
        pytest.param(SHOW_THREE_UNITS, True, "active/running, restarts 0", id="running"),
        pytest.param(
            SHOW_AUTO_RESTART,
            False,
            "activating/auto-restart, restarts 1, last exit status 1, result exit-code",
            id="auto-restart",
        ),
        pytest.param(
            SHOW_START_LIMIT_HIT,
            False,
            "failed/failed, restarts 5, last exit status 1, result exit-code",
            id="failed",
        ),
    ],
)
def test_state_of_a_unit(text: str, running: bool, detail: str) -> None:
    props = parse_systemctl_show(text)[0]
    assert is_running(props) is running
    assert describe_state(props) == detail


def test_not_found_unit_is_described_as_not_loaded() -> None:
    props = parse_systemctl_show(SHOW_THREE_UNITS)[1]
    assert not is_running(props)
    assert describe_state(props) == "not loaded (not-found)"


# ---------------------------------------------------------------- markers


def test_markers_round_trip() -> None:
    text = marker_lines("demo", "api-0", "abc123", 7) + "[Unit]\nDescription=x\n"
    assert parse_markers(text.splitlines()) == UnitMarkers("demo", "api-0", "abc123", 7)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        pytest.param([], UnitMarkers(), id="none"),
        pytest.param(["# hxp-revision: seven"], UnitMarkers(), id="bad-revision"),
        pytest.param(
            ["# hxp-config-hash: a", "# hxp-config-hash: b"],
            UnitMarkers(config_hash="a"),
            id="first-wins",
        ),
        pytest.param(
            ["ExecStart=/bin/true # hxp-stack: evil", "#hxp-stack: x", "# hxp-stack"],
            UnitMarkers(),
            id="only-whole-marker-lines",
        ),
    ],
)
def test_parse_markers(lines: list[str], expected: UnitMarkers) -> None:
    assert parse_markers(lines) == expected


def test_parse_marker_listing_from_grep_null() -> None:
    found = parse_marker_listing(GREP_LISTING)
    assert found == {
        "/etc/systemd/system/hxp-demo-web.service": UnitMarkers("demo", "web", "h1", 1),
        "/etc/systemd/system/hxp-demo-x-web.service": UnitMarkers("demo-x", "web", "h1", 1),
    }
    # A file name with a colon stays whole: the separator is NUL, not ':'.
    odd = parse_marker_listing(b"/etc/systemd/system/hxp-a:b.service\x00# hxp-stack: a\n")
    assert list(odd) == ["/etc/systemd/system/hxp-a:b.service"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("[Service]\nTimeoutStopSec=30\n", 30.0, id="seconds"),
        pytest.param("TimeoutStopSec=2.5s\n", 2.5, id="suffix"),
        pytest.param("TimeoutStopSec=5min\n", 90.0, id="unparsed-default"),
        pytest.param("[Service]\n", 90.0, id="unset-default"),
        pytest.param(None, 90.0, id="no-file"),
    ],
)
def test_stop_seconds(text: str | None, seconds: float) -> None:
    assert stop_seconds(text) == seconds


# ---------------------------------------------------------------- rendering


def test_rendered_unit_is_the_golden_file_plus_markers() -> None:
    """The backend renders from one UnitInstance exactly what `hxp render` renders from a Stack."""
    compared = 0
    for name, path in sorted(EXAMPLES.items()):
        stack = load_config([path], environ={}).stack
        golden = {f.path: f.content for f in render_stack(stack, "systemd")}
        for unit in expand_units(stack):
            if unit.systemd_name not in golden:
                continue
            text = render_unit(unit, "h", 3)
            assert (
                text == marker_lines(stack.stack, unit.name, "h", 3) + golden[unit.systemd_name]
            ), f"{name}: {unit.systemd_name}"
            compared += 1
    assert compared >= 4


def test_the_backend_renders_with_the_stacks_template_overrides(tmp_path: Path) -> None:
    """An operator's `templates_dir` changes what the systemd backend installs, as it changes
    what `hxp render` writes."""
    builtin = Path(__file__).resolve().parents[2] / "templates" / "systemd" / "unit.service.j2"
    override = tmp_path / "templates" / "systemd" / "unit.service.j2"
    override.parent.mkdir(parents=True)
    text = builtin.read_text().replace("[Service]\n", "[Service]\n# site override\n", 1)
    assert text != builtin.read_text()
    override.write_text(text)
    stack = load_config([EXAMPLES["demo"]], environ={}).stack
    stack = stack.model_copy(update={"templates_dir": str(tmp_path / "templates")})
    unit = next(u for u in expand_units(stack) if u.kind == "service")
    rendered = render_unit(unit, "h", 1)
    assert "# site override" in rendered
    assert rendered.endswith(
        next(f.content for f in render_stack(stack, "systemd") if f.path == unit.systemd_name)
    )


# ---------------------------------------------------------------- runners


def test_ssh_runner_quotes_every_argument_for_the_remote_shell() -> None:
    runner = SshRunner("gpu-1.example.net", "deploy", 2222)
    argv = ["echo", HOSTILE, "--", "-n"]
    local = runner.command(argv, interactive=False)
    assert local[:2] == ["ssh", "-o"]
    assert "BatchMode=yes" in local
    assert local[local.index("-p") + 1] == "2222"
    assert local[local.index("-l") + 1] == "deploy"
    assert local[-3:-1] == ["--", "gpu-1.example.net"]
    remote = local[-1]
    assert shlex.split(remote) == argv
    # What a POSIX remote shell does with that string: one argument, nothing executed.
    out = subprocess.run(["sh", "-c", remote], capture_output=True, text=True, check=True)
    assert out.stdout == f"{HOSTILE} -- -n\n"


def test_docker_exec_runner_passes_argv_through() -> None:
    runner = DockerExecRunner("box-1")
    assert runner.command(["cat", HOSTILE], interactive=False) == [
        "docker",
        "exec",
        "box-1",
        "cat",
        HOSTILE,
    ]
    assert runner.command(["tee", "/x"], interactive=True)[:4] == ["docker", "exec", "-i", "box-1"]


def test_runner_for_each_kind() -> None:
    assert isinstance(runner_for(HostSpec(backend="systemd")), LocalRunner)
    ssh = runner_for(HostSpec(backend="systemd", runner="ssh", address="10.0.0.5", ssh_user="ops"))
    assert isinstance(ssh, SshRunner)
    assert (ssh.address, ssh.user, ssh.port) == (
        "10.0.0.5",
        "ops",
        22,
    )
    dock = runner_for(HostSpec(backend="systemd", runner="docker-exec", container="c1"))
    assert isinstance(dock, DockerExecRunner)
    assert dock.container == "c1"


def test_a_timeout_is_transient() -> None:
    with pytest.raises(BackendError) as err:
        LocalRunner(timeout=0.2).run(["sleep", "5"])
    assert err.value.transient
    assert "timed out" in str(err.value)


def test_a_failed_command_is_not_transient() -> None:
    with pytest.raises(BackendError) as err:
        LocalRunner().run(["sh", "-c", "echo boom >&2; exit 3"])
    assert not err.value.transient
    assert "exited 3" in str(err.value)
    assert "boom" in str(err.value)
    assert LocalRunner().run(["false"], check=False).returncode == 1


def test_ssh_connection_failure_is_transient() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendError) as err:
        SshRunner("127.0.0.1", port=port, timeout=20).run(["true"])
    assert err.value.transient
    assert "connection failed" in str(err.value)


def test_docker_daemon_unreachable_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(BackendError) as err:
        DockerExecRunner("c1", timeout=20).run(["true"])
    assert err.value.transient


@pytest.mark.parametrize("runner", [LocalRunner(), CommandRunner()], ids=["local", "commands"])
def test_write_and_read_files(runner: CommandRunner, tmp_path: Path) -> None:
    target = tmp_path / "unit.service"
    assert runner.read_file(str(target)) is None
    runner.write_file(str(target), f"ExecStart={HOSTILE}\n", 0o640)
    assert target.read_text() == f"ExecStart={HOSTILE}\n"
    assert target.stat().st_mode & 0o777 == 0o640
    runner.write_file(str(target), "second\n", 0o600)
    assert runner.read_file(str(target)) == "second\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unit.service"]


# ---------------------------------------------------------------- the backend on a fake host


ONE_TWO_3 = ("one", "two", "three")


class FakeHost:
    """An in-memory host: files, users, unit states; records every command it is given."""

    description = "fake"

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self.users: set[str] = set()
        self.states: dict[str, dict[str, str]] = {}
        self.commands: list[list[str]] = []

    def run(
        self,
        argv: list[str],
        input: bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> RunResult:
        assert all(isinstance(a, str) for a in argv)
        self.commands.append(list(argv))
        ok, fail = RunResult(0, b"", b""), RunResult(1, b"", b"")
        match argv:
            case ["id", "-u", "--", user]:
                return ok if user in self.users else fail
            case ["useradd", *_, "--", user]:
                self.users.add(user)
                return ok
            case ["test", "-f", path]:
                return ok if path in self.files else fail
            case ["rm", "-f", "--", path]:
                self.files.pop(path, None)
                return ok
            case ["rm", "-rf", "--", path]:
                for f in [f for f in self.files if f.startswith(path + "/")]:
                    del self.files[f]
                return ok
            case ["find", directory, *rest]:
                pattern = rest[rest.index("-name") + 1]
                out = b"".join(
                    f"{p}\0{line}\n".encode()
                    for p, text in sorted(self.files.items())
                    if p.rsplit("/", 1)[0] == directory
                    and fnmatch.fnmatch(p.rsplit("/", 1)[1], pattern)
                    for line in text.splitlines()
                    if line.startswith("# hxp-")
                )
                return RunResult(0, out, b"")
            case ["systemctl", "show", "-p", _, "--", *units]:
                text = "\n".join(
                    "".join(f"{k}={v}\n" for k, v in {**self.states.get(u, {}), "Id": u}.items())
                    for u in units
                )
                return RunResult(0, text.encode(), b"")
            case ["journalctl", *rest] if "json" in rest:
                invocation = self.states.get(argv[2], {}).get("InvocationID", "")
                lines = [{"MESSAGE": m, "_SYSTEMD_INVOCATION_ID": invocation} for m in ONE_TWO_3]
                return RunResult(0, "".join(json.dumps(e) + "\n" for e in lines).encode(), b"")
            case ["journalctl", *_]:
                return RunResult(0, b"one\ntwo\nthree\n", b"")
            case _:
                return ok

    def write_file(self, path: str, content: str, mode: int) -> None:
        self.files[path] = content

    def read_file(self, path: str) -> str | None:
        return self.files.get(path)

    def systemctl(self) -> list[list[str]]:
        return [c[1:] for c in self.commands if c[0] == "systemctl" and c[1] != "show"]


def web(greeting: str = "one") -> UnitInstance:
    data = {
        "stack": "demo",
        "hosts": {"box": {"backend": "systemd"}},
        "services": {
            "web": {
                "host": "box",
                "user": "websvc",
                "command": ["python3", "-m", "http.server", "8000"],
                "env": {"GREETING": greeting},
            }
        },
    }
    (unit,) = expand_units(stack_from_data(data))
    return unit


UNIT = f"{UNIT_DIR}/hxp-demo-web.service"
PREVIOUS = f"{BACKUP_ROOT}/demo/web/previous.service"
REF = UnitRef("demo", "web", "web")


def fake_backend() -> tuple[SystemdBackend, FakeHost]:
    host = FakeHost()
    return SystemdBackend("box", HostSpec(backend="systemd"), None, runner=host), host


def test_backend_for_builds_a_systemd_backend(tmp_path: Path) -> None:
    backend = backend_for("box", HostSpec(backend="systemd"), tmp_path)
    assert isinstance(backend, SystemdBackend)
    assert backend.kind == "systemd"


def test_create_adds_the_user_installs_and_starts() -> None:
    backend, host = fake_backend()
    backend.apply(Create(web(), "h1", 1))
    assert "websvc" in host.users
    assert parse_markers(host.files[UNIT].splitlines()) == UnitMarkers("demo", "web", "h1", 1)
    assert "User=websvc" in host.files[UNIT]
    assert PREVIOUS not in host.files
    assert host.systemctl() == [
        ["daemon-reload"],
        ["enable", "--no-reload", "--", "hxp-demo-web.service"],
        ["reset-failed", "--", "hxp-demo-web.service"],
        ["restart", "--", "hxp-demo-web.service"],
    ]


def test_update_keeps_the_previous_file_and_a_retry_does_not_replace_it() -> None:
    backend, host = fake_backend()
    backend.apply(Create(web(), "h1", 1))
    first = host.files[UNIT]
    backend.apply(Update(web("two"), "h2", 2))
    assert host.files[PREVIOUS] == first
    backend.apply(Update(web("two"), "h2", 2))  # retried: same hash
    assert host.files[PREVIOUS] == first
    assert "GREETING=two" in host.files[UNIT]

    backend.apply(Restore(REF))
    assert host.files[UNIT] == first
    assert PREVIOUS not in host.files
    assert host.systemctl()[-1] == ["restart", "--", "hxp-demo-web.service"]
    with pytest.raises(BackendError, match="no previous version"):
        backend.apply(Restore(REF))


def test_commit_drops_the_kept_file_and_remove_deletes_everything() -> None:
    backend, host = fake_backend()
    backend.apply(Create(web(), "h1", 1))
    backend.apply(Update(web("two"), "h2", 2))
    backend.apply(Commit(REF))
    assert PREVIOUS not in host.files
    assert UNIT in host.files
    backend.apply(Update(web("three"), "h3", 3))
    backend.apply(Remove(REF))
    assert host.files == {}
    assert ["disable", "--now", "--no-reload", "--", "hxp-demo-web.service"] in host.systemctl()
    host.commands.clear()
    backend.apply(Remove(REF))  # removing what is gone is fine, and does not try to disable
    assert ["disable", "--now", "--no-reload", "--", "hxp-demo-web.service"] not in host.systemctl()


def test_start_needs_an_installed_unit_and_stop_passes_through() -> None:
    backend, host = fake_backend()
    with pytest.raises(BackendError, match="not created"):
        backend.apply(Start(REF))
    backend.apply(Create(web(), "h1", 1))
    backend.apply(Stop(REF, 3.0))
    backend.apply(Start(REF))
    assert host.systemctl()[-3:] == [
        ["stop", "--", "hxp-demo-web.service"],
        ["reset-failed", "--", "hxp-demo-web.service"],
        ["start", "--", "hxp-demo-web.service"],
    ]


def test_observe_reads_markers_and_state_and_skips_other_stacks() -> None:
    backend, host = fake_backend()
    assert backend.observe("demo") == {}
    backend.apply(Create(web(), "h1", 4))
    host.files[f"{UNIT_DIR}/hxp-demo-x-web.service"] = marker_lines("demo-x", "web", "z", 1)
    host.files[f"{UNIT_DIR}/hxp-demo-manual.service"] = "[Unit]\n"  # not installed by hxp
    host.states["hxp-demo-web.service"] = parse_systemctl_show(SHOW_AUTO_RESTART)[0]
    seen = backend.observe("demo")
    assert list(seen) == ["web"]
    web_seen = seen["web"]
    assert (web_seen.exists, web_seen.running, web_seen.config_hash, web_seen.revision) == (
        True,
        False,
        "h1",
        4,
    )
    assert web_seen.host == "box"
    assert web_seen.detail.startswith("activating/auto-restart")
    host.states["hxp-demo-web.service"] = parse_systemctl_show(SHOW_THREE_UNITS)[0]
    assert backend.observe("demo")["web"].running


INVOCATION = "0123456789abcdef0123456789abcdef"


def test_logs_ask_the_journal() -> None:
    backend, host = fake_backend()
    host.states["hxp-demo-web.service"] = {"InvocationID": INVOCATION}
    assert backend.logs(REF, 2) == ["two", "three"]
    # The current invocation only (its program's lines and systemd's about it), never the
    # unit's whole journal across revisions and restarts.
    assert host.commands[-2] == [
        "systemctl",
        "show",
        "-p",
        "Id,InvocationID,NRestarts",
        "--",
        "hxp-demo-web.service",
    ]
    assert host.commands[-1] == [
        "journalctl",
        f"_SYSTEMD_INVOCATION_ID={INVOCATION}",
        "+",
        f"INVOCATION_ID={INVOCATION}",
        "-n",
        "2",
        "--no-pager",
        "-o",
        "cat",
    ]


def _entry(message: object, own: str = "", pid1: str = "") -> str:
    entry: dict[str, object] = {"MESSAGE": message}
    if own:
        entry["_SYSTEMD_INVOCATION_ID"] = own
    if pid1:
        entry["INVOCATION_ID"] = pid1
    return json.dumps(entry)


def test_invocations_tail_keeps_the_latest_invocations_only() -> None:
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    journal = "\n".join(
        [
            _entry("a says", own=a),
            _entry("a exited", pid1=a),
            _entry("b says", own=b),
            _entry("no invocation"),
            _entry("b exited", pid1=b),
            "not json",
            _entry([0x63, 0x20, 0xFF], own=c),  # not UTF-8: journalctl gives the bytes
            _entry("c two\nlines", own=c),
        ]
    )
    assert invocations_tail(journal, c, 1) == ["c \ufffd", "c two", "lines"]
    assert invocations_tail(journal, c, 2) == ["b says", "b exited", "c \ufffd", "c two", "lines"]
    assert invocations_tail(journal, c, 9)[:2] == ["a says", "a exited"]
    # The current invocation counts before it wrote anything.
    d = "d" * 32
    assert invocations_tail(journal, d, 2) == ["c \ufffd", "c two", "lines"]


def test_logs_since_start_read_the_restarted_invocations_too() -> None:
    backend, host = fake_backend()
    host.states["hxp-demo-web.service"] = {"InvocationID": INVOCATION, "NRestarts": "2"}
    assert backend.logs(REF, 2, since="start") == ["two", "three"]
    assert host.commands[-1][:3] == ["journalctl", "-u", "hxp-demo-web.service"]
    assert "json" in host.commands[-1]
    # No restart since the start: the current invocation is all there is.
    host.states["hxp-demo-web.service"]["NRestarts"] = "0"
    backend.logs(REF, 2, since="start")
    assert host.commands[-1][1] == f"_SYSTEMD_INVOCATION_ID={INVOCATION}"


@pytest.mark.parametrize("invocation", ["", "not-an-id", INVOCATION + "; rm -rf /"])
def test_logs_of_a_unit_with_no_current_invocation_are_empty(invocation: str) -> None:
    backend, host = fake_backend()
    host.states["hxp-demo-web.service"] = {"InvocationID": invocation}
    assert backend.logs(REF) == []
    assert not any(c[0] == "journalctl" for c in host.commands)


@pytest.mark.parametrize("bad", [HOSTILE, "../../etc/passwd", "Web", "-rf", ""])
def test_hostile_names_never_reach_a_command(bad: str) -> None:
    backend, host = fake_backend()
    for action in (
        Remove(UnitRef("demo", bad, bad)),
        Restore(UnitRef(bad, "web", "web")),
        Commit(UnitRef("demo", "web", bad)),
    ):
        with pytest.raises(BackendError, match="invalid name"):
            backend.apply(action)
    with pytest.raises(BackendError):
        backend.logs(UnitRef("demo", bad, bad))
    with pytest.raises(BackendError):
        backend.observe(bad)
    assert host.commands == []


# ---------------------------------------------------------------- secrets

SECRET = 'hf_tok"en$HOME`x`\\back'
ENV_FILE = "/etc/hxp/demo/web.env"


class ModeHost(FakeHost):
    """A FakeHost that remembers each file's mode."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: dict[str, int] = {}

    def write_file(self, path: str, content: str, mode: int) -> None:
        super().write_file(path, content, mode)
        self.modes[path] = mode


def secret_web(token: str = SECRET) -> UnitInstance:
    data = {
        "stack": "demo",
        "hosts": {"box": {"backend": "systemd"}},
        "services": {
            "web": {
                "host": "box",
                "command": ["python3", "-m", "http.server", "8000"],
                "secret_env": {"HF_TOKEN": "hf-token"},
            }
        },
    }
    (unit,) = expand_units(stack_from_data(data))
    return unit


def test_env_file_text_quotes_every_value_for_systemd() -> None:
    assert env_file_text({"B": "plain", "A": SECRET}) == (
        'A="hf_tok\\"en\\$HOME\\`x\\`\\\\back"\nB="plain"\n'
    )
    with pytest.raises(BackendError, match="the value of A contains a newline") as info:
        env_file_text({"A": "one\ntwo"})
    assert "one" not in str(info.value)


def test_secrets_go_to_a_root_only_env_file_never_the_unit_file() -> None:
    host = ModeHost()
    backend = SystemdBackend("box", HostSpec(backend="systemd"), None, runner=host)
    with pytest.raises(BackendError, match=r"secret_env \['HF_TOKEN'\] has no value"):
        backend.apply(Create(secret_web(), "h1", 1))
    assert host.files == {}
    backend.apply(Create(secret_web(), "h1", 1, {"HF_TOKEN": SECRET}))
    assert host.modes[ENV_FILE] == 0o600
    assert ["install", "-d", "-m", "0700", "--", "/etc/hxp/demo"] in host.commands
    assert host.files[ENV_FILE] == env_file_text({"HF_TOKEN": SECRET})
    assert f"EnvironmentFile={ENV_FILE}" in host.files[UNIT]
    assert [p for p, text in host.files.items() if "hf_tok" in text] == [ENV_FILE]
    assert not any("hf_tok" in " ".join(c) for c in host.commands)  # never on a command line


def test_update_keeps_the_previous_env_file_for_restore_and_remove_deletes_it() -> None:
    host = ModeHost()
    backend = SystemdBackend("box", HostSpec(backend="systemd"), None, runner=host)
    backend.apply(Create(secret_web(), "h1", 1, {"HF_TOKEN": "old"}))
    backend.apply(Update(secret_web(), "h2", 2, {"HF_TOKEN": "new"}))
    previous_env = f"{BACKUP_ROOT}/demo/web/previous.env"
    assert host.files[previous_env] == 'HF_TOKEN="old"\n'
    assert host.modes[previous_env] == 0o600
    assert host.files[ENV_FILE] == 'HF_TOKEN="new"\n'
    backend.apply(Restore(REF))
    assert host.files[ENV_FILE] == 'HF_TOKEN="old"\n'
    assert previous_env not in host.files
    backend.apply(Update(secret_web(), "h3", 3, {"HF_TOKEN": "newer"}))
    backend.apply(Commit(REF))
    assert previous_env not in host.files
    backend.apply(Remove(REF))
    assert host.files == {}


def test_a_unit_that_drops_its_secrets_loses_its_env_file() -> None:
    backend, host = fake_backend()
    backend.apply(Create(secret_web(), "h1", 1, {"HF_TOKEN": "old"}))
    backend.apply(Update(web(), "h2", 2))
    assert ENV_FILE not in host.files
    assert "EnvironmentFile" not in host.files[UNIT]


def test_units_created_side_by_side_share_their_daemon_reloads() -> None:
    """Each create's reload starts after its file was written; concurrent creates share them."""
    import threading
    import time

    from hxp.backends.systemd import ReloadBatch

    batch = ReloadBatch()
    written: list[int] = []
    covered: dict[int, int] = {}  # create -> how many files the reload it got had seen
    early: list[int] = []  # creates that returned before any reload had seen their file
    lock = threading.Lock()

    def slow_reload() -> None:
        with lock:
            seen = len(written)
        time.sleep(0.05)  # PID 1 re-reading every unit
        with lock:
            for i in written[:seen]:
                covered.setdefault(i, seen)

    def create(i: int) -> None:
        with lock:
            written.append(i)
        batch.reload(slow_reload)
        with lock:
            if i not in covered:
                early.append(i)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert early == []
    assert sorted(covered) == list(range(20))
    assert 1 <= batch.reloads <= 4, batch.reloads


def test_a_failed_reload_is_retried_by_a_waiting_create() -> None:
    from hxp.backends.systemd import ReloadBatch

    batch = ReloadBatch()
    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise BackendError("daemon-reload timed out")

    with pytest.raises(BackendError, match="timed out"):
        batch.reload(broken)
    batch.reload(lambda: calls.append("ok"))
    assert calls == ["broken", "ok"]
    assert batch.reloads == 1
