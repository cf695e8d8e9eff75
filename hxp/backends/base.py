"""The one interface every deployment target implements: observe, apply a typed action, logs.

Flows and the deploy engine only see this Protocol; a new target is a new module beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol, runtime_checkable

from hxp.plan import ObservedUnit
from hxp.units import UnitInstance

# Labels/markers every backend attaches to what it creates.
LABEL_STACK = "hxp.stack"
LABEL_UNIT = "hxp.unit"
LABEL_INSTANCE = "hxp.instance"
LABEL_CONFIG_HASH = "hxp.config-hash"
LABEL_REVISION = "hxp.revision"

# Which of an instance's runs Backend.logs quotes: the current one, or all since its start.
LogScope = Literal["run", "start"]


@dataclass(frozen=True)
class UnitRef:
    """Which instance of which stack an action is about."""

    stack: str
    unit: str
    instance: str

    @classmethod
    def of(cls, unit: UnitInstance) -> UnitRef:
        return cls(unit.stack, unit.unit, unit.name)

    def __str__(self) -> str:
        return f"{self.stack}/{self.instance}"


def _no_secrets() -> Mapping[str, str]:
    return {}


@dataclass(frozen=True)
class Create:
    """Create and start an instance that does not exist yet.

    `secrets` holds the values of the unit's `secret_env` (never in repr, so never in a log).
    """

    unit: UnitInstance
    config_hash: str
    revision: int
    secrets: Mapping[str, str] = field(default_factory=_no_secrets, repr=False, compare=False)


@dataclass(frozen=True)
class Update:
    """Replace a running instance with a new version; the old one is kept for Restore."""

    unit: UnitInstance
    config_hash: str
    revision: int
    secrets: Mapping[str, str] = field(default_factory=_no_secrets, repr=False, compare=False)


@dataclass(frozen=True)
class Start:
    ref: UnitRef


@dataclass(frozen=True)
class Stop:
    ref: UnitRef
    grace_seconds: float = 10.0


@dataclass(frozen=True)
class Remove:
    """Stop and delete an instance and everything it owns (the kept previous version too)."""

    ref: UnitRef


@dataclass(frozen=True)
class Restore:
    """Put back the version an Update replaced, and start it."""

    ref: UnitRef


@dataclass(frozen=True)
class Commit:
    """The new version is good: drop the kept previous version."""

    ref: UnitRef


BackendAction = Create | Update | Start | Stop | Remove | Restore | Commit


@runtime_checkable
class Backend(Protocol):
    """A deployment target on one host."""

    kind: ClassVar[str]

    def observe(self, stack: str) -> dict[str, ObservedUnit]:
        """Every instance of `stack` this backend manages, by instance name."""
        ...

    def apply(self, action: BackendAction) -> None:
        """Carry out one action; raise BackendError (transient or not) on failure."""
        ...

    def logs(self, ref: UnitRef, lines: int = 50, since: LogScope = "run") -> list[str]:
        """The last `lines` lines the instance wrote in its current run, oldest first.

        since="run" (the default): the current run began at the instance's latest start,
        whoever started it: a Create, Update, Start or Restore, or the target's own restart
        after a crash (the supervisor, Docker's restart policy, systemd's Restart=).
        since="start": every run since the backend's latest Create, Update, Start or Restore of
        the instance, the target's own restarts after crashes included (a crash loop's earlier
        crashes), and nothing from before that start.

        Nothing an earlier revision wrote is ever returned, so a failure summary quotes the
        failing revision only; an instance that does not exist or never started has no lines.
        """
        ...


@dataclass(frozen=True)
class Reload:
    """Apply a new version of a running instance without restarting it: write its
    config_files, move its config-hash marker, then send its reload signal or run its
    reload command."""

    unit: UnitInstance
    config_hash: str
    revision: int


@runtime_checkable
class Reloader(Protocol):
    """A backend that can reload an instance in place (others restart it instead)."""

    def reload(self, action: Reload) -> None:
        """Carry out a Reload; raise BackendError (transient or not) on failure."""
        ...


@runtime_checkable
class InstanceObserver(Protocol):
    """A backend that can look at one instance without listing the whole stack."""

    def observe_instance(self, ref: UnitRef) -> ObservedUnit | None:
        """The instance as observe() would report it, or None when it does not exist."""
        ...


def observe_one(backend: Backend, unit: UnitInstance) -> ObservedUnit | None:
    """One instance through the cheapest call the backend offers."""
    if isinstance(backend, InstanceObserver):
        return backend.observe_instance(UnitRef.of(unit))
    return backend.observe(unit.stack).get(unit.name)
