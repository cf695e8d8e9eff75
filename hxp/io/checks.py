"""The outcome of checking rendered output with a real tool (systemd-analyze, Compose,
kubernetes-validate, promtool, amtool): shared by hxp.io.validators and hxp.io.monitoring,
which would otherwise import each other."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CheckResult:
    """The outcome of one validator over a set of files."""

    check: str
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None
    details: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems
