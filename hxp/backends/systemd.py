"""systemd hosts: each instance is a hardened unit, /etc/systemd/system/hxp-<stack>-<name>.service.

Create/Update render templates/systemd/unit.service.j2, add marker comment lines (stack,
instance, config hash, revision), install the file, `daemon-reload` and (re)start it. A unit
file about to be overwritten is first copied to BACKUP_ROOT/<stack>/<instance>/previous.service:
that is the version Restore puts back and Commit drops. Every command goes through a Runner
(local, ssh or docker exec) as an argv list.

The kept copy lives outside /var/lib/hxp: that tree holds the units' StateDirectory=, owned
by the unit's user, and a file there could be swapped for a unit that runs as root.

A unit with `secret_env` reads its values from ENV_ROOT/<stack>/<instance>.env (written by the
runner as root, mode 0600, in a 0700 directory; the template names it in EnvironmentFile=). The
values travel to the host on the runner's stdin, never on a command line, and are never part of
the unit file.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

from hxp.backends.base import (
    BackendAction,
    Commit,
    Create,
    LogScope,
    Remove,
    Restore,
    Start,
    Stop,
    UnitRef,
    Update,
)
from hxp.backends.runners import Runner, runner_for
from hxp.errors import BackendError
from hxp.plan import ObservedUnit
from hxp.render import Renderer
from hxp.spec import HostSpec
from hxp.units import UnitInstance

UNIT_DIR = "/etc/systemd/system"
BACKUP_ROOT = "/var/lib/hxp-systemd"
ENV_ROOT = "/etc/hxp"
SHOW_PROPERTIES = (
    "Id",
    "LoadState",
    "ActiveState",
    "SubState",
    "MainPID",
    "ExecMainStatus",
    "NRestarts",
    "Result",
)
MARKER_PREFIX = "# hxp-"
SYSTEMCTL_TIMEOUT = 120.0
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_INVOCATION_RE = re.compile(r"[0-9a-f]{32}")


# ---------------------------------------------------------------- pure: markers and parsers


@dataclass(frozen=True)
class UnitMarkers:
    """What hxp wrote into an installed unit file about itself."""

    stack: str | None = None
    instance: str | None = None
    config_hash: str | None = None
    revision: int | None = None


def marker_lines(stack: str, instance: str, config_hash: str, revision: int) -> str:
    """The comment lines that identify an installed unit file and its version."""
    return (
        f"{MARKER_PREFIX}stack: {stack}\n"
        f"{MARKER_PREFIX}instance: {instance}\n"
        f"{MARKER_PREFIX}config-hash: {config_hash}\n"
        f"{MARKER_PREFIX}revision: {revision}\n"
    )


def parse_markers(lines: Iterable[str]) -> UnitMarkers:
    """Read the marker comment lines (any other line is ignored)."""
    found: dict[str, str] = {}
    for line in lines:
        if not line.startswith(MARKER_PREFIX):
            continue
        key, sep, value = line[len(MARKER_PREFIX) :].partition(":")
        if sep:
            found.setdefault(key.strip(), value.strip())
    revision: int | None
    try:
        revision = int(found["revision"]) if "revision" in found else None
    except ValueError:
        revision = None
    return UnitMarkers(
        stack=found.get("stack") or None,
        instance=found.get("instance") or None,
        config_hash=found.get("config-hash") or None,
        revision=revision,
    )


def parse_marker_listing(data: bytes) -> dict[str, UnitMarkers]:
    """Parse `grep --null -H '^# hxp-' FILE...` output: file path -> its markers."""
    lines: dict[str, list[str]] = {}
    for raw in data.split(b"\n"):
        path, sep, line = raw.partition(b"\0")
        if not sep:
            continue
        lines.setdefault(path.decode("utf-8", "replace"), []).append(
            line.decode("utf-8", "replace")
        )
    return {path: parse_markers(found) for path, found in lines.items()}


def parse_systemctl_show(
    text: str, warn: Callable[[str], None] | None = None
) -> list[dict[str, str]]:
    """Parse `systemctl show -p ... UNIT...`: one dict of properties per unit, in output order.

    Units are separated by blank lines; a line that is not `Key=Value` goes to `warn`.
    """
    units: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                units.append(current)
                current = {}
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or not key.isalnum():
            if warn is not None:
                warn(f"systemctl show: unexpected line {line!r}")
            continue
        current[key] = value
    if current:
        units.append(current)
    return units


def invocations_tail(journal_json: str, current: str, count: int) -> list[str]:
    """The messages of `journalctl -o json` output (oldest first) that belong to the latest
    `count` invocations of a unit, `current` the newest: walking back from the newest entry,
    the first `count` invocation IDs met (current counted even before it wrote anything).
    An entry of no invocation, or of an older one, is left out."""
    kept: list[str] = []
    allowed = {current}
    for raw in reversed(journal_json.splitlines()):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        invocation = entry.get("_SYSTEMD_INVOCATION_ID") or entry.get("INVOCATION_ID")
        if not isinstance(invocation, str) or not invocation:
            continue
        if invocation not in allowed:
            if len(allowed) >= count:
                continue
            allowed.add(invocation)
        message = entry.get("MESSAGE")
        if isinstance(message, list):  # journalctl's form of a message that is not UTF-8
            message = bytes(b for b in message if isinstance(b, int) and 0 <= b < 256).decode(
                "utf-8", "replace"
            )
        if isinstance(message, str):
            kept.extend(reversed(message.splitlines() or [""]))
    kept.reverse()
    return kept


def stop_seconds(unit_file: str | None) -> float:
    """TimeoutStopSec= of a unit file in seconds (systemd's default 90 s when unset)."""
    for line in (unit_file or "").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "TimeoutStopSec":
            try:
                return float(value.strip().removesuffix("s"))
            except ValueError:
                return 90.0
    return 90.0


def describe_state(props: dict[str, str]) -> str:
    """A one-line state of a unit for ObservedUnit.detail, e.g. `active/running, restarts 0`."""
    if props.get("LoadState", "loaded") not in ("loaded", ""):
        return f"not loaded ({props['LoadState']})"
    detail = f"{props.get('ActiveState', '?')}/{props.get('SubState', '?')}"
    detail += f", restarts {props.get('NRestarts', '0') or '0'}"
    status = props.get("ExecMainStatus", "0")
    if status not in ("", "0"):
        detail += f", last exit status {status}"
    result = props.get("Result", "success")
    if result not in ("", "success"):
        detail += f", result {result}"
    return detail


def is_running(props: dict[str, str]) -> bool:
    return props.get("ActiveState") == "active" and props.get("SubState") == "running"


class _StackView:
    """What the unit template reads of the stack, rebuilt from one UnitInstance."""

    def __init__(self, unit: UnitInstance) -> None:
        self.stack = unit.stack
        self._replicas = dict(unit.dependency_replicas)

    def unit(self, name: str) -> _DependencyView:
        return _DependencyView(self._replicas.get(name, 1))


@dataclass(frozen=True)
class _DependencyView:
    replicas: int


def env_file_text(values: Mapping[str, str]) -> str:
    """An EnvironmentFile= body: `KEY="value"` lines, quoted so systemd reads each value back
    verbatim (no expansion); a newline or NUL cannot be written and is refused."""
    lines = []
    for key, value in sorted(values.items()):
        if any(c in value for c in "\n\r\0"):
            raise BackendError(f"the value of {key} contains a newline or NUL")
        escaped = "".join("\\" + c if c in '\\"`$' else c for c in value)
        lines.append(f'{key}="{escaped}"\n')
    return "".join(lines)


def render_unit(unit: UnitInstance, config_hash: str, revision: int) -> str:
    """The unit file hxp installs: the rendered template plus its marker lines."""
    renderer = Renderer(unit.templates_dir)  # the stack's overrides, as `hxp render` uses them
    rendered = renderer.render("systemd/unit.service.j2", stack=_StackView(unit), unit=unit)
    return marker_lines(unit.stack, unit.name, config_hash, revision) + rendered.content


# ---------------------------------------------------------------- the backend


def _checked(ref: UnitRef) -> UnitRef:
    """Names reach paths and command lines: refuse anything but a plain stack/instance name."""
    for value in (ref.stack, ref.instance):
        if not _NAME_RE.fullmatch(value):
            raise BackendError(f"invalid name {value!r}", unit=str(ref))
    return ref


class ReloadBatch:
    """`systemctl daemon-reload` coalesced per host (a group commit).

    A caller that changed unit files asks for a reload; the reload it gets is one that
    started after its change. While a reload runs, later callers wait and the first of them
    then runs one reload for all of them. A failed reload wakes the waiters, one of which
    tries again (its own error is its own). One batch per runner (`Runner.description`: the
    host as this process reaches it), shared by every backend object of the process.
    """

    _all: ClassVar[dict[str, ReloadBatch]] = {}
    _all_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._changed = 0  # changes asked for so far
        self._reloaded = 0  # changes covered by the last reload that succeeded
        self._running = False
        self.reloads = 0  # reloads run (for tests and logs)

    @classmethod
    def of(cls, runner: Runner) -> ReloadBatch:
        key = getattr(runner, "description", None) or f"runner-{id(runner)}"
        with cls._all_lock:
            return cls._all.setdefault(key, cls())

    def reload(self, run: Callable[[], object]) -> None:
        with self._cond:
            self._changed += 1
            mine = self._changed
            while self._reloaded < mine:
                if not self._running:
                    self._running = True
                    target = self._changed
                    break
                self._cond.wait()
            else:
                return  # a reload that started after this change has finished
        try:
            run()
        except BaseException:
            with self._cond:
                self._running = False
                self._cond.notify_all()
            raise
        with self._cond:
            self._reloaded = max(self._reloaded, target)
            self._running = False
            self.reloads += 1
            self._cond.notify_all()


class SystemdBackend:
    """Hardened systemd units on one host, driven through a Runner."""

    kind: ClassVar[str] = "systemd"

    def __init__(
        self,
        host_name: str,
        host: HostSpec,
        state_dir: str | Path | None = None,
        runner: Runner | None = None,
    ) -> None:
        self.host_name = host_name
        self.host = host
        self.runner = runner if runner is not None else runner_for(host, state_dir=state_dir)

    # ---------------------------------------------------------------- paths

    @staticmethod
    def unit_name(ref: UnitRef) -> str:
        return f"hxp-{ref.stack}-{ref.instance}.service"

    def unit_path(self, ref: UnitRef) -> str:
        return f"{UNIT_DIR}/{self.unit_name(ref)}"

    @staticmethod
    def backup_dir(ref: UnitRef) -> str:
        return f"{BACKUP_ROOT}/{ref.stack}/{ref.instance}"

    def previous_path(self, ref: UnitRef) -> str:
        return f"{self.backup_dir(ref)}/previous.service"

    @staticmethod
    def env_path(ref: UnitRef) -> str:
        return f"{ENV_ROOT}/{ref.stack}/{ref.instance}.env"

    def previous_env_path(self, ref: UnitRef) -> str:
        return f"{self.backup_dir(ref)}/previous.env"

    # ---------------------------------------------------------------- the Backend interface

    def observe(self, stack: str) -> dict[str, ObservedUnit]:
        if not _NAME_RE.fullmatch(stack):
            raise BackendError(f"invalid stack name {stack!r}")
        prefix = f"hxp-{stack}-"
        listing = self.runner.run(
            [
                "find",
                UNIT_DIR,
                "-maxdepth",
                "1",
                "-type",
                "f",
                "-name",
                f"{prefix}*.service",
                "-exec",
                "grep",
                "--null",
                "-H",
                "-e",
                f"^{MARKER_PREFIX}",
                "{}",
                "+",
            ],
            check=False,
        )
        if listing.returncode not in (0, 1) or (listing.returncode == 1 and listing.stderr):
            raise BackendError(f"cannot list unit files: {listing.error_text}")
        found: dict[str, tuple[str, UnitMarkers]] = {}
        for path, markers in parse_marker_listing(listing.stdout).items():
            name = PurePosixPath(path).name
            instance = name[len(prefix) : -len(".service")]
            # `hxp-demo-*` also matches stack `demo-x`: the stack marker decides.
            if markers.stack != stack or not _NAME_RE.fullmatch(instance):
                continue
            found[name] = (instance, markers)
        if not found:
            return {}
        shown = self.runner.run(
            ["systemctl", "show", "-p", ",".join(SHOW_PROPERTIES), "--", *sorted(found)],
            timeout=SYSTEMCTL_TIMEOUT,
        )
        states = {p.get("Id", ""): p for p in parse_systemctl_show(shown.text)}
        out: dict[str, ObservedUnit] = {}
        for name, (instance, markers) in sorted(found.items()):
            props = states.get(name, {})
            running = is_running(props)
            out[instance] = ObservedUnit(
                name=instance,
                exists=True,
                running=running,
                healthy=running,
                config_hash=markers.config_hash,
                revision=markers.revision,
                detail=describe_state(props) if props else "no state from systemctl",
                host=self.host_name,
                restarts=int(props["NRestarts"]) if props.get("NRestarts", "").isdigit() else None,
            )
        return out

    def apply(self, action: BackendAction) -> None:
        match action:
            case Create(unit=unit, config_hash=h, revision=rev, secrets=secrets):
                self._install(unit, h, rev, secrets)
            case Update(unit=unit, config_hash=h, revision=rev, secrets=secrets):
                self._install(unit, h, rev, secrets)
            case Start(ref=ref):
                self._require_installed(_checked(ref))
                self._systemctl("reset-failed", ref, check=False)
                self._systemctl("start", ref)
            case Stop(ref=ref, grace_seconds=grace):
                self._systemctl("stop", _checked(ref), timeout=grace + SYSTEMCTL_TIMEOUT)
            case Remove(ref=ref):
                self._remove(_checked(ref))
            case Restore(ref=ref):
                self._restore(_checked(ref))
            case Commit(ref=ref):
                self.runner.run(["rm", "-f", "--", self.previous_path(_checked(ref))])
                self.runner.run(["rm", "-f", "--", self.previous_env_path(ref)])

    def logs(self, ref: UnitRef, lines: int = 50, since: LogScope = "run") -> list[str]:
        """The journal of the unit's current invocation: what its program wrote and what
        systemd said about it (exit status, result) since its latest start. systemd gives every
        start a new InvocationID, a Restart= restart included, and keeps it after the unit
        stops or fails; a unit that never started has none, and no lines. since="start" adds
        the NRestarts invocations before it (systemd counts the Restart= restarts since the
        latest start it was asked for, and sets NRestarts back to 0 at such a start)."""
        if lines <= 0:
            return []
        name = self.unit_name(_checked(ref))
        shown = self.runner.run(
            ["systemctl", "show", "-p", "Id,InvocationID,NRestarts", "--", name],
            check=False,
            timeout=SYSTEMCTL_TIMEOUT,
        )
        props = parse_systemctl_show(shown.text) if shown.returncode == 0 else []
        invocation = props[0].get("InvocationID", "") if props else ""
        if not _INVOCATION_RE.fullmatch(invocation):
            return []
        restarts = props[0].get("NRestarts", "")
        if since == "start" and restarts.isdigit() and int(restarts) > 0:
            return self._invocations_tail(name, invocation, int(restarts) + 1, lines)
        result = self.runner.run(
            [
                "journalctl",
                f"_SYSTEMD_INVOCATION_ID={invocation}",
                "+",
                f"INVOCATION_ID={invocation}",
                "-n",
                str(int(lines)),
                "--no-pager",
                "-o",
                "cat",
            ],
            check=False,
        )
        return result.text.splitlines()[-lines:] if result.returncode == 0 else []

    def _invocations_tail(self, name: str, current: str, count: int, lines: int) -> list[str]:
        """The last `lines` journal lines of the unit's latest `count` invocations, `current`
        the newest of them: its latest entries, each attributed by its invocation ID."""
        result = self.runner.run(
            [
                "journalctl",
                "-u",
                name,
                "-n",
                str(int(lines)),
                "--no-pager",
                "-o",
                "json",
                "--output-fields=MESSAGE,_SYSTEMD_INVOCATION_ID,INVOCATION_ID",
            ],
            check=False,
        )
        if result.returncode != 0:
            return []
        return invocations_tail(result.text, current, count)[-lines:]

    # ---------------------------------------------------------------- mechanics

    def _systemctl(
        self,
        verb: str,
        ref: UnitRef,
        check: bool = True,
        timeout: float = SYSTEMCTL_TIMEOUT,
        flags: tuple[str, ...] = (),
    ) -> None:
        self.runner.run(
            ["systemctl", verb, *flags, "--", self.unit_name(ref)], check=check, timeout=timeout
        )

    def _daemon_reload(self) -> None:
        """Make systemd read the unit files written so far: one `daemon-reload` for every
        change made before it started (ReloadBatch: 10 units created side by side on a host
        cost one or two reloads, not 10, each of which re-reads every unit while PID 1 waits)."""
        ReloadBatch.of(self.runner).reload(
            lambda: self.runner.run(["systemctl", "daemon-reload"], timeout=SYSTEMCTL_TIMEOUT)
        )

    def _require_installed(self, ref: UnitRef) -> None:
        probe = self.runner.run(["test", "-f", self.unit_path(ref)], check=False)
        if probe.returncode != 0:
            raise BackendError("not created", unit=str(ref))

    def _ensure_user(self, user: str) -> None:
        if not _USER_RE.fullmatch(user):
            raise BackendError(f"invalid user name {user!r}")
        if self.runner.run(["id", "-u", "--", user], check=False).returncode == 0:
            return
        added = self.runner.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--",
                user,
            ],
            check=False,
        )
        # Two units deployed at once may both add the user: only a missing user is an error.
        if added.returncode == 0:
            return
        if self.runner.run(["id", "-u", "--", user], check=False).returncode != 0:
            raise BackendError(f"cannot add system user {user!r}: {added.error_text}")

    def _install(
        self, unit: UnitInstance, config_hash: str, revision: int, secrets: Mapping[str, str]
    ) -> None:
        ref = _checked(UnitRef.of(unit))
        missing = sorted(set(unit.spec.secret_env) - set(secrets))
        if missing:
            raise BackendError(
                f"secret_env {missing} has no value (the deploy resolves it from its Secret "
                "block); refusing to start without it",
                unit=str(ref),
            )
        env_text = env_file_text({k: secrets[k] for k in unit.spec.secret_env})
        content = render_unit(unit, config_hash, revision)
        self._ensure_user(unit.spec.user)
        path = self.unit_path(ref)
        current = self.runner.read_file(path)
        # A restart first stops the running version: allow for the longer stop timeout.
        budget = max(stop_seconds(current), stop_seconds(content)) + SYSTEMCTL_TIMEOUT
        # Back up what is about to be overwritten, unless it is this very version (a retried
        # update must not keep the new version as "previous").
        if current is not None and parse_markers(current.splitlines()).config_hash != config_hash:
            self.runner.run(["install", "-d", "-m", "0700", "--", self.backup_dir(ref)])
            self.runner.write_file(self.previous_path(ref), current, 0o600)
            current_env = self.runner.read_file(self.env_path(ref))
            if current_env is not None:
                self.runner.write_file(self.previous_env_path(ref), current_env, 0o600)
            else:
                self.runner.run(["rm", "-f", "--", self.previous_env_path(ref)])
        if unit.spec.secret_env:
            self.runner.run(["install", "-d", "-m", "0700", "--", f"{ENV_ROOT}/{ref.stack}"])
            self.runner.write_file(self.env_path(ref), env_text, 0o600)
        else:
            self.runner.run(["rm", "-f", "--", self.env_path(ref)])
        self.runner.write_file(path, content, 0o644)
        self._daemon_reload()
        self._systemctl("enable", ref, flags=("--no-reload",))  # reloaded just above
        self._systemctl("reset-failed", ref, check=False)
        self._systemctl("restart", ref, timeout=budget)

    def _restore(self, ref: UnitRef) -> None:
        previous = self.runner.read_file(self.previous_path(ref))
        if previous is None:
            raise BackendError("no previous version kept to restore", unit=str(ref))
        current = self.runner.read_file(self.unit_path(ref))
        budget = max(stop_seconds(current), stop_seconds(previous)) + SYSTEMCTL_TIMEOUT
        self.runner.write_file(self.unit_path(ref), previous, 0o644)
        previous_env = self.runner.read_file(self.previous_env_path(ref))
        if previous_env is not None:
            self.runner.write_file(self.env_path(ref), previous_env, 0o600)
            self.runner.run(["rm", "-f", "--", self.previous_env_path(ref)])
        self.runner.run(["rm", "-f", "--", self.previous_path(ref)])
        self._daemon_reload()
        self._systemctl("reset-failed", ref, check=False)
        self._systemctl("restart", ref, timeout=budget)

    def _remove(self, ref: UnitRef) -> None:
        installed = self.runner.read_file(self.unit_path(ref))
        if installed is not None:
            self.runner.run(
                ["systemctl", "disable", "--now", "--no-reload", "--", self.unit_name(ref)],
                timeout=stop_seconds(installed) + SYSTEMCTL_TIMEOUT,
            )
        self.runner.run(["rm", "-f", "--", self.unit_path(ref)])
        self.runner.run(["rm", "-f", "--", self.env_path(ref)])
        self.runner.run(["rm", "-rf", "--", self.backup_dir(ref)])
        self._daemon_reload()
        self._systemctl("reset-failed", ref, check=False)

    def __repr__(self) -> str:
        return f"SystemdBackend({self.host_name!r}, {getattr(self.runner, 'description', '?')})"


__all__ = [
    "ReloadBatch",
    "SystemdBackend",
    "UnitMarkers",
    "describe_state",
    "env_file_text",
    "invocations_tail",
    "marker_lines",
    "parse_marker_listing",
    "parse_markers",
    "parse_systemctl_show",
    "render_unit",
    "stop_seconds",
]
