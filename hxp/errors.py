"""One exception family. Every error names the file, line, field, unit or template at fault."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
