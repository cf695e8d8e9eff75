"""Health results and the readiness gate's decisions (pure: probing happens in hxp.io.probes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from hxp.spec import HealthSpec


class Status(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ProbeResult:
    """One check of one endpoint."""

    ok: bool
    check: str
    reason: str
    latency: float = 0.0


class Verdict(StrEnum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ReadinessGate:
    """Decides when a freshly started unit is ready, or has failed, from successive probes.

    Failures inside `start_period` do not count; after it, `retries` failures at least
    `interval` apart fail the gate (probes may come faster: readiness is noticed early, but
    failures are counted on the spec's own clock). A unit whose process is gone fails at once.
    One success makes it ready.
    """

    health: HealthSpec
    verdict: Verdict = Verdict.PENDING
    failures: int = 0
    attempts: int = 0
    last: ProbeResult | None = None
    history: list[ProbeResult] = field(default_factory=list)
    counted_at: float | None = None

    def observe(self, result: ProbeResult, elapsed: float, running: bool = True) -> Verdict:
        self.verdict = self._decide(result, elapsed, running)
        return self.verdict

    def give_up(self, reason: str) -> Verdict:
        self.last = ProbeResult(False, self.last.check if self.last else "readiness", reason)
        self.verdict = Verdict.FAILED
        return self.verdict

    def _decide(self, result: ProbeResult, elapsed: float, running: bool) -> Verdict:
        self.attempts += 1
        self.last = result
        self.history.append(result)
        if not running:
            self.last = ProbeResult(False, result.check, "the process is not running")
            return Verdict.FAILED
        if result.ok:
            return Verdict.READY
        spaced = self.counted_at is None or elapsed - self.counted_at >= self.health.interval
        if elapsed >= self.health.start_period and spaced:
            self.failures += 1
            self.counted_at = elapsed
            if self.failures >= self.health.retries:
                return Verdict.FAILED
        return Verdict.PENDING

    @property
    def deadline(self) -> float:
        """Seconds after which the gate gives up whatever the probes say (a safety net)."""
        h = self.health
        return h.start_period + (h.retries + 1) * (h.interval + h.timeout) + 5.0

    def explain(self) -> str:
        if self.last is None:
            return "never probed"
        return (
            f"{self.last.check} failed {self.failures} time(s) after the start period "
            f"({self.attempts} probes): {self.last.reason}"
        )
