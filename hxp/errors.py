"""One exception family. Every error names the file, line, field, unit or template at fault."""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class Location:
    """Where a value came from: a file and line, an environment variable, or `--set`."""

    source: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source


@dataclass(frozen=True)
class Issue:
    """One problem with the input, as the operator should read it."""

    message: str
    path: str = ""
    location: Location | None = None

    def __str__(self) -> str:
        where = f"{self.location} " if self.location is not None else ""
        field = f"{_printable(self.path)}: " if self.path else ""
        return f"{where}{field}{self.message}"


def _printable(text: str) -> str:
    """Escape control characters (as in repr) so a hostile key cannot forge output lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class HxpError(Exception):
    """Base of every error hxp raises on purpose; `exit_code` is what the CLI returns."""

    exit_code = 1


class StateDiskFullError(HxpError):
    """The state directory's disk is full: the store (or a backend's files there) could not be
    written. Nothing is corrupted (SQLite rolls the write back); free space and apply again."""


class InputError(HxpError):
    """The operator's input (stack file, override, template) is wrong; nothing was changed."""

    exit_code = 2

    def __init__(self, issues: Sequence[Issue] | str) -> None:
        self.issues: tuple[Issue, ...] = (
            (Issue(issues),) if isinstance(issues, str) else tuple(issues)
        )
        super().__init__("\n".join(str(i) for i in self.issues))


class StackFileError(InputError):
    """A stack file cannot be read or parsed."""


class StackValidationError(InputError):
    """The merged stack breaks the stack format's rules."""


class CycleError(InputError):
    """The dependency graph has a cycle; the message names the whole cycle."""

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = tuple(cycle)
        super().__init__(f"dependency cycle: {' -> '.join(self.cycle)}")


class UnknownUnitError(InputError):
    """A unit name that the stack does not define."""


class TemplateError(InputError):
    """A template cannot be loaded or rendered; the message names the template and line."""


class OutputCheckError(HxpError):
    """Rendered output failed a validator (systemd-analyze, compose-spec, kubernetes schema)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class BackendError(HxpError):
    """A backend could not carry out an action. `transient` errors are worth retrying."""

    def __init__(self, message: str, *, transient: bool = False, unit: str | None = None) -> None:
        self.transient = transient
        self.unit = unit
        super().__init__(f"{unit}: {message}" if unit else message)


class DeployError(HxpError):
    """A deploy failed (and was rolled back); the message names the unit and the failed check."""


class HostUnreachableError(DeployError):
    """A host a deploy must reach did not answer its reachability check; nothing was changed.
    The message is `host <name> (<address>) unreachable: <reason>`."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        self.host = host
        self.address = address
        self.reason = reason
        super().__init__(f"host {host} ({address}) unreachable: {reason}")


class LockedError(HxpError):
    """Another run holds the stack's lock."""


class SecretError(HxpError):
    """A secret could not be resolved, or sits in a file others may read; never shows the value."""


class GpuAllocationError(HxpError):
    """No set of GPUs on a host can take a model: says what it needs and what is free."""


class PromQLSyntaxError(HxpError):
    """A PromQL expression the query lint cannot read; the message names the offset."""


class QueryLintError(OutputCheckError):
    """A rule or dashboard query names a series that no known exporter exposes."""


class MonitoringError(HxpError):
    """Prometheus or Alertmanager refused a config, or a monitoring check failed after deploy."""


class LifecycleError(HxpError):
    """A start, stop, restart or supervision step failed; the message names the unit and step.
    `error_class` says what it is worth (see classify_error): a unit that never became ready
    is `permanent`, whatever words its checks reported."""

    def __init__(self, message: str, error_class: str = "permanent") -> None:
        self.error_class = error_class
        super().__init__(message)


class SleepModeError(InputError):
    """`hxp sleep` / `hxp wake` on a model that did not opt in (names the field to set)."""


class SleepCallError(BackendError):
    """A replica's sleep-mode endpoint (/sleep, /wake_up, /is_sleeping) refused or did not
    answer, or a woken replica served no completion."""


class IllegalTransitionError(LifecycleError):
    """A unit was asked to move between two lifecycle states the state machine does not join."""

    def __init__(self, instance: str, current: str, target: str, allowed: Sequence[str]) -> None:
        self.instance = instance
        self.current = current
        self.target = target
        self.allowed = tuple(allowed)
        choices = ", ".join(self.allowed) or "nothing"
        super().__init__(
            f"{instance}: illegal lifecycle transition {current} -> {target} "
            f"(from {current} it may go to: {choices})",
            "permanent",
        )


# --------------------------------------------------------------------------- error classes

#: What a failure is worth: `transient` is retried (with backoff), `permanent` and `input` are
#: not (the same call would fail the same way; `input` means the operator's file is wrong).
ERROR_CLASSES = ("transient", "permanent", "input")

# Checked in order: a permanent cause wins over a transient-looking word in the same message
# ("port 8000 already in use ... timed out" is still a port clash).
_PERMANENT_PATTERNS = (
    r"address already in use|port \d+ .*already in use|errno 98\b|eaddrinuse",
    r"out of (gpu )?memory|cuda out of memory|\boom\b|cannot allocate memory|"
    r"free memory .* below|no set of gpus|needs \d+ gpu",
    r"no such image|image .*not found|pull access denied|manifest unknown|"
    r"repository does not exist",
    r"no such file or directory|executable file not found|command not found|"
    r"cannot start|exec format error|permission denied|not created|no previous version",
    r"invalid|unknown (unit|host|option|flag)|unrecognized argument|bad config|"
    r"config(uration)? rejected|syntax error",
)
_TRANSIENT_PATTERNS = (
    r"connection refused|econnrefused|errno 111\b",
    r"connection reset|econnreset|errno 104\b|broken pipe|remote end closed|"
    r"connection aborted|server disconnected",
    r"timed? ?out|timeout|deadline exceeded",
    r"\b(status|http|error)[ :]*5\d\d\b|\b5\d\d (server error|internal|bad gateway|"
    r"service unavailable|gateway time)",
    r"\bbusy\b|resource temporarily unavailable|try again|already in progress|"
    r"is being (removed|created|stopped)|transaction .* is destructive|job .* (canceled|queued)|"
    r"database is locked|did not start in time|failed to connect to bus",
)


def classify_message(text: str) -> str | None:
    """`transient` or `permanent` when the message says which, else None."""
    lowered = text.lower()
    for pattern in _PERMANENT_PATTERNS:
        if re.search(pattern, lowered):
            return "permanent"
    for pattern in _TRANSIENT_PATTERNS:
        if re.search(pattern, lowered):
            return "transient"
    return None


def classify_error(exc: BaseException) -> str:
    """transient, permanent or input: whether retrying the same call could succeed.

    An error that says it is transient (BackendError.transient) is believed; operator input is
    `input`; then the message decides (port in use, missing image or binary, out of GPU
    memory, invalid config: permanent; refused or reset connections, timeouts, 5xx, a busy
    Docker or systemd: transient); an unknown error is permanent, so it is never retried
    blindly.
    """
    if isinstance(exc, BackendError) and exc.transient:
        return "transient"
    if isinstance(exc, InputError | GpuAllocationError | SecretError):
        return "input" if isinstance(exc, InputError | SecretError) else "permanent"
    if isinstance(exc, LifecycleError):
        return exc.error_class
    if isinstance(exc, ConnectionRefusedError | ConnectionResetError | BrokenPipeError):
        return "transient"
    if isinstance(exc, TimeoutError):
        return "transient"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return "permanent"
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return "permanent"
    found = classify_message(f"{type(exc).__name__}: {exc}")
    return found or "permanent"


class FailureClass(StrEnum):
    """Why a deploy failed, set where it failed and carried on the unit's outcome and the
    deploy record (the `reason_class` label of hxp_rollbacks_total)."""

    INTERRUPTED = "interrupted"  # the orchestrator stopped during the run
    READINESS = "readiness"  # an instance never became ready
    VERIFY = "verify"  # ready, then a check failed before the commit
    CRASHED = "crashed"  # an instance stopped (not running when gated or verified)
    BAKE = "bake"  # verified, then crashed, restarted, failed a check or stalled in the bake
    APPLY = "apply"  # a backend action failed
    SECRET = "secret"  # noqa: S105 - a secret could not be resolved (a class, no secret)
    RESOURCES = "resources"  # no GPUs for it
    OTHER = "other"

    @property
    def error_class(self) -> str:
        """transient, permanent or input: for `hxp_errors_total{error_class}`."""
        if self is FailureClass.INTERRUPTED:
            return "transient"
        if self in (FailureClass.SECRET, FailureClass.RESOURCES):
            return "input"
        return "permanent"
