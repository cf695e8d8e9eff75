"""A seeded fault campaign against `hxp apply`, the pure parts: which fault each run injects and
where, what each fault must end in, the invariants a run is checked against, and the table of
results. hxp.io.chaos observes; flows/chaos.py drives the runs; `hxp chaos` is the command.

A run is named by its replay key `SEED:RUN`: run RUN of the campaign with seed SEED draws its
fault and its target from its own generator (seeded by the key), so `--replay SEED:RUN` repeats
that one run, on the same stack, without the runs before it.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class Fault(StrEnum):
    NONE = "no-fault"
    SLOW_START = "slow-start"
    IMMEDIATE_EXIT = "immediate-exit"
    MISSING_EXECUTABLE = "missing-executable"
    CRASH_AFTER_SERVING = "crash-after-serving"
    CRASH_BEFORE_LISTENING = "crash-before-listening"
    NEVER_READY = "never-ready"
    KILL_DURING_APPLY = "kill-during-apply"
    KILL_DURING_ROLLBACK = "kill-during-rollback"
    CONCURRENT_APPLIES = "concurrent-applies"
    DOCKER_RESTART = "docker-restart"
    STATE_DISK_FULL = "state-disk-full"
    NGINX_KILLED = "nginx-killed"
    STALLED_MODEL = "stalled-model"


@dataclass(frozen=True)
class FaultSpec:
    """What one fault does and what the deploy must end in.

    `exit_code`: the expected exit code of the faulty apply (None: the orchestrator is killed,
    so the exit code is the signal's; the next apply of the last good stack must exit 0).
    `outcome`: `new` (the new revision is committed) or `previous` (the previous one is back).
    `history`: the expected final states of the history rows the run adds, oldest first.
    """

    fault: Fault
    exit_code: int | None
    outcome: str
    history: tuple[str, ...]
    backends: frozenset[str]
    about: str
    #: what the stack (or campaign) must have for the fault to be injected: `model` (a routed
    #: hxp-vllm-sim model), `gateway`, `own-state` (a state directory the campaign made itself),
    #: `own-dockerd` (a Docker daemon the campaign was handed to restart)
    needs: frozenset[str] = frozenset()
    #: the faulty apply has an expected exit code and is followed by an apply of the last good
    #: stack (after the fault is undone), which must exit 0
    recovers: bool = False
    #: other acceptable final states of the run's history rows
    also: tuple[tuple[str, ...], ...] = ()


_ALL = frozenset({"process", "docker", "systemd"})

FAULTS: dict[Fault, FaultSpec] = {
    f.fault: f
    for f in (
        FaultSpec(Fault.NONE, 0, "new", ("succeeded",), _ALL, "an env change; must commit"),
        FaultSpec(
            Fault.SLOW_START,
            0,
            "new",
            ("succeeded",),
            _ALL,
            "listens after 1 s, inside its start_period; must commit",
        ),
        FaultSpec(Fault.IMMEDIATE_EXIT, 1, "previous", ("failed",), _ALL, "exits 3 at once"),
        FaultSpec(
            Fault.MISSING_EXECUTABLE,
            1,
            "previous",
            ("failed",),
            _ALL,
            "its command does not exist",
        ),
        FaultSpec(
            Fault.CRASH_AFTER_SERVING,
            1,
            "previous",
            ("failed",),
            _ALL,
            "serves, passes its check, exits 5 after 1.5 s",
        ),
        FaultSpec(
            Fault.CRASH_BEFORE_LISTENING,
            1,
            "previous",
            ("failed",),
            _ALL,
            "exits 4 after 0.3 s without listening",
        ),
        FaultSpec(Fault.NEVER_READY, 1, "previous", ("failed",), _ALL, "runs, never listens"),
        FaultSpec(
            Fault.KILL_DURING_APPLY,
            None,
            "previous",
            ("interrupted", "succeeded"),
            _ALL,
            "the orchestrator is SIGKILLed while a new revision starts; the next apply of the "
            "last good stack must put it back",
        ),
        FaultSpec(
            Fault.KILL_DURING_ROLLBACK,
            None,
            "previous",
            ("interrupted", "succeeded"),
            _ALL,
            "two units change, the dependent one exits at once and its dependency's new "
            "revision takes 1.5 s to stop; the orchestrator is SIGKILLed once the rollback has "
            "restored the first (so before the second is); the next apply of the last good "
            "stack must finish it",
        ),
        FaultSpec(
            Fault.CONCURRENT_APPLIES,
            0,
            "new",
            ("succeeded", "succeeded"),
            _ALL,
            "two applies of two new revisions at once: both succeed, one after the other; the "
            "later one's revision runs",
        ),
        FaultSpec(
            Fault.DOCKER_RESTART,
            0,
            "new",
            ("succeeded",),
            frozenset({"docker"}),
            "the Docker daemon is stopped (SIGTERM) once the new revision's container exists "
            "(it listens after 3 s), and started again with the same arguments (only a daemon "
            "the campaign started): the deploy waits for the daemon and must commit",
            needs=frozenset({"own-dockerd"}),
        ),
        FaultSpec(
            Fault.STATE_DISK_FULL,
            1,
            "previous",
            ("failed", "succeeded"),
            frozenset({"process"}),
            "the state directory's file system (a tmpfs the campaign mounted) is filled once the "
            "new revision runs; the apply must fail with a clear message (exit 1); with the "
            "space freed, the next apply of the last good stack must exit 0 (the faulty apply's "
            "row ends failed, or interrupted when not even that could be written). The store's "
            "write-ahead log is emptied before the apply, so every write after the fill needs "
            "new space and the apply meets the full disk",
            needs=frozenset({"own-state"}),
            recovers=True,
            also=(("interrupted", "succeeded"),),
        ),
        FaultSpec(
            Fault.NGINX_KILLED,
            0,
            "new",
            ("succeeded",),
            frozenset({"process"}),
            "a new model revision moves in blue-green; the gateway's nginx master is SIGKILLed "
            "once the new slot runs, before the switch: the deploy must restart the gateway "
            "and commit, routing exactly the healthy instances",
            needs=frozenset({"model", "gateway"}),
        ),
        FaultSpec(
            Fault.STALLED_MODEL,
            1,
            "previous",
            ("failed",),
            frozenset({"process"}),
            "a new model revision gets ready, then its engine stalls (hxp-vllm-sim "
            "--stall-after): the bake window must fail it and the previous revision serve",
            needs=frozenset({"model"}),
        ),
    )
}

#: Faults that change a model unit (the others change a service).
MODEL_FAULTS = frozenset({Fault.NGINX_KILLED, Fault.STALLED_MODEL})


def faults_for(backend: str, have: frozenset[str] = frozenset()) -> list[Fault]:
    """The faults a campaign on `backend` injects, given what the stack and campaign `have`
    (FaultSpec.needs); without `have`, the faults every stack gets."""
    return [f for f, spec in FAULTS.items() if backend in spec.backends and spec.needs <= have]


def skipped_faults(backend: str, have: frozenset[str]) -> dict[Fault, str]:
    """The faults of `backend` a campaign leaves out, each with why."""
    why = {
        "model": "the stack has no routed hxp-vllm-sim model with an http check",
        "gateway": "the stack has no gateway",
        "own-state": "the state directory is not one the campaign made (it mounts a small file "
        "system there to fill; it never does that on a user's state directory)",
        "own-dockerd": "the Docker daemon is not one the campaign started (it stops and starts "
        "the daemon; it never does that to a user's daemon)",
    }
    return {
        f: "; ".join(why[n] for n in sorted(spec.needs - have))
        for f, spec in FAULTS.items()
        if backend in spec.backends and not spec.needs <= have
    }


@dataclass(frozen=True)
class RunPlan:
    """One run: its replay key, its fault, the unit it changes (and for a fault that needs two
    changed units, the second, a dependency of the first), and its version tag."""

    seed: int
    run: int
    fault: Fault
    unit: str
    partner: str | None
    version: str

    @property
    def key(self) -> str:
        return f"{self.seed}:{self.run}"


def parse_replay(text: str) -> tuple[int, int]:
    """`SEED:RUN` -> (seed, run); ValueError naming the expected form."""
    seed, sep, run = text.partition(":")
    try:
        if not sep:
            raise ValueError
        out = int(seed), int(run)
    except ValueError:
        raise ValueError(f"--replay {text!r}: expected SEED:RUN, e.g. 42:7") from None
    if out[1] < 0:
        raise ValueError(f"--replay {text!r}: RUN must be 0 or more")
    return out


def plan_run(
    seed: int,
    run: int,
    faults: Sequence[Fault],
    dependencies: Mapping[str, Sequence[str]],
    models: Sequence[str] = (),
) -> RunPlan:
    """Run `run` of campaign `seed`: its own generator picks a fault and a unit (for a fault
    that needs a changed dependency too, a unit that has one; for a model fault, one of
    `models`)."""
    if not faults:
        raise ValueError("no fault to inject")
    units = sorted(dependencies)
    if not units:
        raise ValueError("the stack has no unit to inject a fault into")
    rng = random.Random(f"hxp-chaos:{seed}:{run}")  # noqa: S311 - a replayable draw
    fault = rng.choice(list(faults))
    partner = None
    if fault in MODEL_FAULTS:
        if not models:
            raise ValueError(f"{fault}: the stack has no model to inject it into")
        return RunPlan(seed, run, fault, rng.choice(sorted(models)), None, f"{seed}-{run}")
    if fault is Fault.KILL_DURING_ROLLBACK:
        with_deps = [u for u in units if dependencies[u]]
        if not with_deps:
            fault = Fault.KILL_DURING_APPLY
        else:
            unit = rng.choice(with_deps)
            partner = rng.choice(sorted(dependencies[unit]))
            return RunPlan(seed, run, fault, unit, partner, f"{seed}-{run}")
    unit = rng.choice(units)
    return RunPlan(seed, run, fault, unit, partner, f"{seed}-{run}")


def plan_campaign(
    seed: int,
    runs: int,
    faults: Sequence[Fault],
    dependencies: Mapping[str, Sequence[str]],
    models: Sequence[str] = (),
) -> list[RunPlan]:
    return [plan_run(seed, run, faults, dependencies, models) for run in range(runs)]


def covering_runs(
    seed: int,
    faults: Sequence[Fault],
    dependencies: Mapping[str, Sequence[str]],
    limit: int = 1000,
    models: Sequence[str] = (),
) -> list[int]:
    """The first run of campaign `seed` that draws each of `faults`, in run order: a short
    campaign that still injects every fault (ValueError if one is not drawn in `limit` runs)."""
    first: dict[Fault, int] = {}
    for run in range(limit):
        first.setdefault(plan_run(seed, run, faults, dependencies, models).fault, run)
        if len(first) == len(set(faults)):
            return sorted(first.values())
    missing = sorted(set(faults) - set(first))
    raise ValueError(f"seed {seed}: {missing} not drawn in {limit} runs")


# ================================================================ invariants


@dataclass(frozen=True)
class InstanceSeen:
    """One instance of the stack after a run, as the campaign observed it."""

    name: str
    running: bool
    config_hash: str | None
    good_hash: str | None  # the config hash of the unit's last revision the store calls good
    answers: bool  # one probe of its health check passed
    processes: int  # processes (or containers) running it


@dataclass(frozen=True)
class Observation:
    """Everything the invariants look at after one run."""

    exit_codes: tuple[int | None, ...]  # of the faulty apply(s); None: killed
    recovery_exit: int | None  # the apply of the last good stack after a kill, if any
    expected_hash: Mapping[str, str]  # unit -> the config hash the run must end with
    instances: Sequence[InstanceSeen]
    unit_of: Mapping[str, str]  # instance -> unit
    leftovers: Sequence[str]  # processes/containers that belong to no instance of the stack
    plan_changes: Sequence[str]  # what `plan` of the good stack would still change
    history: Sequence[str]  # final states of the history rows the run added, oldest first
    unfinished: int  # history rows still `running`
    routed: frozenset[str] | None = None  # what the gateway routes (None: no gateway)
    should_route: frozenset[str] | None = None  # the healthy routed instances
    reserved: frozenset[str] = frozenset()  # instances holding GPU reservations
    gpu_models: frozenset[str] = frozenset()  # running model instances that claim GPUs
    gateway_up: bool | None = None  # its nginx master runs and its routes accept (None: none)


def violations(spec: FaultSpec, seen: Observation) -> list[str]:
    """Every invariant `seen` breaks, each as one line."""
    out: list[str] = []
    if spec.exit_code is not None and any(c != spec.exit_code for c in seen.exit_codes):
        out.append(f"exit code {list(seen.exit_codes)}, expected {spec.exit_code}")
    if spec.recovers and seen.recovery_exit != 0:
        out.append(f"the next apply of the last good stack exited {seen.recovery_exit}")
    if spec.exit_code is None:
        if any(c is not None and c >= 0 for c in seen.exit_codes):
            out.append(f"the orchestrator was to be killed but exited {list(seen.exit_codes)}")
        if seen.recovery_exit != 0:
            out.append(f"the next apply of the last good stack exited {seen.recovery_exit}")
    for inst in seen.instances:
        unit = seen.unit_of.get(inst.name, inst.name)
        want = seen.expected_hash.get(unit)
        if not inst.running:
            out.append(f"{inst.name}: not running")
        if inst.good_hash is None:
            out.append(f"{inst.name}: the store has no good revision")
        elif inst.config_hash != inst.good_hash:
            out.append(
                f"{inst.name}: runs {str(inst.config_hash)[:12]}, the store's good revision is "
                f"{inst.good_hash[:12]}"
            )
        if want is not None and inst.config_hash != want:
            which = "new" if spec.outcome == "new" else "previous"
            out.append(f"{inst.name}: does not run the {which} revision ({spec.fault} expects it)")
        if inst.running and not inst.answers:
            out.append(f"{inst.name}: does not answer its check")
        if inst.processes != 1:
            out.append(f"{inst.name}: {inst.processes} processes, expected exactly 1")
    out.extend(f"left over: {what}" for what in seen.leftovers)
    out.extend(f"plan not empty: {change}" for change in seen.plan_changes)
    if tuple(seen.history) != spec.history and tuple(seen.history) not in spec.also:
        out.append(f"history rows {list(seen.history)}, expected {list(spec.history)}")
    if seen.unfinished:
        out.append(f"{seen.unfinished} history row(s) still running")
    if seen.routed is not None and seen.routed != seen.should_route:
        out.append(
            f"the gateway routes {sorted(seen.routed)}, the healthy routed instances are "
            f"{sorted(seen.should_route or ())}"
        )
    if seen.gateway_up is False:
        out.append("the gateway is down (no nginx master, or a route refuses connections)")
    if seen.reserved != seen.gpu_models:
        out.append(
            f"GPU reservations held by {sorted(seen.reserved)}, running GPU models are "
            f"{sorted(seen.gpu_models)}"
        )
    return out


# ================================================================ backend census


@dataclass(frozen=True)
class Holder:
    """One thing on a docker or systemd host that belongs to the stack (a container, or a
    systemd unit: loaded, or only its file installed), as the campaign listed it."""

    name: str  # container name or unit name
    instance: str | None  # the instance it is for (its label, or from its unit name)
    running: bool
    processes: int | None = None  # processes in it (a systemd unit's cgroup); None: not counted


@dataclass
class Census:
    """Per instance: how many processes (or running containers) run it; and what is left over."""

    per_instance: dict[str, int] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)


def census(
    holders: Sequence[Holder],
    instances: Sequence[str],
    name_of: Mapping[str, str],
    kept: Sequence[str] = (),
    kind: str = "container",
) -> Census:
    """The census of a docker or systemd host: `name_of` maps each instance of the stack to the
    one name its container or unit must have. A running container counts 1 for its instance
    (however it is named: a kept previous version still running doubles it); a unit counts the
    processes in its cgroup (a unit that runs counts at least 1). Anything not named for an
    instance of the stack is left over (a kept previous version after the deploy ended, an
    instance outside the stack), and so is every file in `kept` (a systemd unit's kept
    previous unit file, which Commit and Restore remove)."""
    out = Census(per_instance={i: 0 for i in instances})
    wanted = set(instances)
    for h in sorted(holders, key=lambda h: h.name):
        mine = h.instance in wanted and name_of.get(h.instance or "") == h.name
        if h.running and h.instance in wanted:
            count = 1 if h.processes is None else max(h.processes, 1)
            out.per_instance[h.instance or ""] += count
        if not mine:
            state = "running" if h.running else "stopped"
            out.leftovers.append(f"{kind} {h.name} ({state}, instance {h.instance})")
        elif not h.running and h.processes:
            out.leftovers.append(f"{kind} {h.name}: {h.processes} process(es) of a stopped unit")
    out.leftovers.extend(f"kept file {path}" for path in sorted(kept))
    return out


# ================================================================ results


@dataclass
class RunResult:
    plan: RunPlan
    violations: list[str] = field(default_factory=list)
    apply_seconds: float | None = None
    rollback_seconds: float | None = None
    error: str | None = None  # the campaign itself could not run or observe this run

    @property
    def consistent(self) -> bool:
        return not self.violations and self.error is None


def _median(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


def summary_rows(results: Sequence[RunResult]) -> list[dict[str, object]]:
    """One row per fault (in FAULTS order), then `all`."""
    rows: list[dict[str, object]] = []
    groups = [(f.value, [r for r in results if r.plan.fault is f]) for f in FAULTS]
    groups.append(("all", list(results)))
    for name, group in groups:
        if not group:
            continue
        ok = sum(r.consistent for r in group)
        rows.append(
            {
                "fault": name,
                "runs": len(group),
                "consistent": ok,
                "rate": ok / len(group),
                "median_apply_s": _median([r.apply_seconds for r in group if r.apply_seconds]),
                "median_rollback_s": _median(
                    [r.rollback_seconds for r in group if r.rollback_seconds]
                ),
            }
        )
    return rows


def inconsistent_fraction(results: Sequence[RunResult]) -> float:
    return sum(not r.consistent for r in results) / len(results) if results else 0.0


def render_table(results: Sequence[RunResult], header: str = "") -> str:
    """The results as Markdown: the table per fault, then every violation with its replay key."""
    lines = [header] if header else []
    lines += [
        "| fault | runs | consistent | rate | median apply s | median rollback s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in summary_rows(results):
        lines.append(
            f"| {row['fault']} | {row['runs']} | {row['consistent']} | "
            f"{float(row['rate']):.1%} | {row['median_apply_s']} | {row['median_rollback_s']} |"  # type: ignore[arg-type]
        )
    bad = [r for r in results if not r.consistent]
    lines.append("")
    if not bad:
        lines.append("No violations.")
    for r in bad:
        what = "; ".join(r.violations + ([r.error] if r.error else []))
        lines.append(
            f"- `--replay {r.plan.key}` {r.plan.fault} on {r.plan.unit}"
            f"{f' (+{r.plan.partner})' if r.plan.partner else ''}: {what}"
        )
    return "\n".join(lines) + "\n"


# ================================================================ stacks and revisions


def unit_program(
    python: str, port: int, fault: str = "none", delay: float = 1.0, stop_delay: float = 0.0
) -> list[str]:
    """The argv of hxp.io.chaos_unit serving `port` (with `fault`; taking `stop_delay` seconds
    to stop)."""
    argv = [python, "-m", "hxp.io.chaos_unit", "--port", str(port)]
    if fault != "none":
        argv += ["--fault", fault, "--delay", f"{delay:g}"]
    if stop_delay > 0:
        argv += ["--stop-delay", f"{stop_delay:g}"]
    return argv


#: How long the partner's new revision of a kill-during-rollback run takes to stop: the
#: rollback restores the failed unit first and the partner after it, so the orchestrator,
#: killed at the first restore, is killed while the partner's restore still waits for this.
PARTNER_STOP_SECONDS = 1.5


#: The new revision's command for each unit fault (None: the unit's own command).
UNIT_FAULTS: dict[Fault, tuple[str, float] | None] = {
    Fault.NONE: None,
    Fault.SLOW_START: ("slow", 1.0),
    Fault.IMMEDIATE_EXIT: ("immediate-exit", 0.0),
    Fault.CRASH_AFTER_SERVING: ("crash-after", 1.5),
    Fault.CRASH_BEFORE_LISTENING: ("crash-before", 0.3),
    Fault.NEVER_READY: ("never-ready", 0.0),
    Fault.KILL_DURING_APPLY: ("slow", 3.0),  # a window to kill the orchestrator in
    Fault.KILL_DURING_ROLLBACK: ("immediate-exit", 0.0),
    Fault.CONCURRENT_APPLIES: None,
    Fault.DOCKER_RESTART: ("slow", 3.0),  # a window to restart the daemon in
    Fault.STATE_DISK_FULL: None,
    Fault.NGINX_KILLED: None,
    Fault.STALLED_MODEL: None,
}

#: The generated model's hxp-vllm-sim arguments, and what a stalled-model revision adds: its
#: engine stops making progress this long after it starts (its /health still answers 200).
MODEL_SIM_ARGS = ["--latency-ms", "2", "--tokens-per-second", "2000"]
STALL_AFTER = 1.5
#: The generated model's bake window: a stalled revision fails inside it.
MODEL_BAKE = "3s"

MISSING = "/nonexistent/hxp-chaos-missing"


BACKENDS = ("process", "docker", "systemd")

#: Where the docker and systemd backends' unit program lives on the host or in the image
#: (`hxp.io.chaos_unit` under it; tests/support/chaos_hosts.py puts it there).
CHAOS_PYTHONPATH = "/opt/hxp-chaos"


def generated_stack(
    name: str,
    ports: Sequence[int],
    python: str,
    backend: str = "process",
    host: Mapping[str, object] | None = None,
    image: str | None = None,
    start_period: str | None = None,
    model_port: int | None = None,
    gateway_port: int | None = None,
) -> dict[str, object]:
    """A small stack for campaigns: len(ports) services of hxp.io.chaos_unit on one host of
    `backend` (`host`: that host's extra settings, e.g. a systemd host's runner; `image`: the
    docker backend's image, which must hold `python` and hxp.io.chaos_unit under
    CHAOS_PYTHONPATH), each depending on the one or two before it, with fast checks (a
    never-ready revision fails in about 3 s). `start_period`: the checks' grace, 2 s on the
    process backend and 8 s on docker and systemd by default (a container or unit start and
    Python's own start take seconds on a loaded machine: with 2 s, runs at load average 20
    failed plain revisions; a slow-start revision still listens after 1 s, inside it).
    With `model_port` (process backend), also a model `m0` served by hxp-vllm-sim (one
    replica; a new revision moves in blue-green when it is routed); with `gateway_port` too,
    an nginx gateway routing `m0` there. ValueError naming the field on bad input."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "docker" and not image:
        raise ValueError("image: the docker backend needs an image with Python")
    if backend != "docker" and image:
        raise ValueError(f"image: only the docker backend takes one, not {backend}")
    if backend != "process" and model_port is not None:
        raise ValueError("model_port: the simulated model runs on the process backend only")
    grace = start_period or ("2s" if backend == "process" else "8s")
    services: dict[str, object] = {}
    for i, port in enumerate(ports):
        deps = [f"u{j}" for j in range(max(0, i - 2), i)] if i else []
        env = {"HXP_CHAOS_VERSION": "0"}
        if backend != "process":
            env["PYTHONPATH"] = CHAOS_PYTHONPATH
        svc: dict[str, object] = {
            "host": "local",
            "command": unit_program(python, port),
            "ports": {"http": port},
            "depends_on": deps[-1:] if i % 2 else deps,
            "env": env,
            "stop_timeout": "2s",
            "health": {
                "http": {"url": f"http://127.0.0.1:{port}/"},
                "interval": "300ms",
                "timeout": "500ms",
                "retries": 2,
                "start_period": grace,
            },
        }
        if image:
            svc = {"host": "local", "image": image, **{k: v for k, v in svc.items() if k != "host"}}
        services[f"u{i}"] = svc
    out: dict[str, object] = {
        "stack": name,
        "hosts": {"local": {**dict(host or {}), "backend": backend}},
        "services": services,
    }
    if model_port is None:
        return out
    out["models"] = {
        "m0": {
            "host": "local",
            "engine": "simulator",
            "python": python,
            "model": "hxp-sim/chaos",
            "served_name": "m0",
            "replicas": 1,
            "port": model_port,
            "simulator_args": list(MODEL_SIM_ARGS),
            "env": {"HXP_CHAOS_VERSION": "0"},
            "stop_timeout": "2s",
            "bake": MODEL_BAKE,
            "health": {
                "http": {"url": f"http://127.0.0.1:{model_port}/health"},
                "interval": "300ms",
                "timeout": "1s",
                "retries": 2,
                "start_period": "10s",
            },
        }
    }
    if gateway_port is not None:
        out["gateway"] = {
            "host": "local",
            "routes": {"m0": gateway_port},
            "drain_timeout": "2s",
        }
    return out


def new_revision(
    good: Mapping[str, object],
    unit: str,
    fault: Fault,
    version: str,
    python: str,
    port: int,
    stop_delay: float = 0.0,
) -> dict[str, object]:
    """The stack `good` with a new revision of service `unit` (serving `port`, its own) that
    carries `fault` (and takes `stop_delay` seconds to stop)."""
    import copy

    out = copy.deepcopy(dict(good))
    services = out["services"]
    assert isinstance(services, dict)
    models = out.get("models") or {}
    assert isinstance(models, dict)
    if unit in models and unit not in services:
        model = models[unit]
        model["env"] = {**model.get("env", {}), "HXP_CHAOS_VERSION": version}
        args = [a for a in model.get("simulator_args", MODEL_SIM_ARGS)]
        if "--stall-after" in args:  # a clean revision drops an earlier run's stall
            at = args.index("--stall-after")
            del args[at : at + 2]
        if fault is Fault.STALLED_MODEL:
            args += ["--stall-after", f"{STALL_AFTER:g}"]
        model["simulator_args"] = args
        return out
    svc = services[unit]
    svc["env"] = {**svc.get("env", {}), "HXP_CHAOS_VERSION": version}
    if fault is Fault.MISSING_EXECUTABLE:
        svc["command"] = [MISSING]
        return out
    how = UNIT_FAULTS.get(fault)
    if how is not None:
        svc["command"] = unit_program(python, port, *how, stop_delay=stop_delay)
    elif svc.get("command") and "hxp.io.chaos_unit" in svc["command"]:
        svc["command"] = unit_program(python, port, stop_delay=stop_delay)
    return out


def candidate_stack(
    good: Mapping[str, object],
    plan: RunPlan,
    python: str,
    ports: Mapping[str, int | None],
) -> dict[str, object]:
    """The new stack of run `plan`: its unit's revision with the fault and, for a rollback
    kill, its partner's clean revision, slow to stop (PARTNER_STOP_SECONDS); each serving its
    own port (`ports`: each service's check port; a model keeps its own)."""
    out = new_revision(good, plan.unit, plan.fault, plan.version, python, ports.get(plan.unit) or 0)
    if plan.partner is not None:
        out = new_revision(
            out,
            plan.partner,
            Fault.NONE,
            plan.version,
            python,
            ports.get(plan.partner) or 0,
            stop_delay=PARTNER_STOP_SECONDS,
        )
    return out
