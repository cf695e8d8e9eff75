"""The fault campaign driver behind `hxp chaos` and bench/chaos.py (not itself a flow: each
apply it makes is a deploy-stack flow run). Per run (hxp.chaos.plan_run) it writes the new
revision's stack file, applies it (in this process, or as `hxp apply` processes where the
orchestrator is to be killed or two applies race), observes the outcome and checks the
invariants of hxp.chaos.violations; the last good stack file carries over to the next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from hxp.chaos import (
    BACKENDS,
    FAULTS,
    Census,
    Fault,
    InstanceSeen,
    Observation,
    RunPlan,
    RunResult,
    candidate_stack,
    faults_for,
    new_revision,
    plan_run,
    skipped_faults,
    violations,
)
from hxp.config import load_config, unit_config_hash
from hxp.errors import HxpError, InputError
from hxp.io.chaos import (
    answers,
    docker_census,
    fill,
    free,
    gateway_routes,
    gateway_up,
    install_unit_program,
    kill_gateway_master,
    mount_small_fs,
    observed,
    process_census,
    process_hash,
    remove_stack,
    running_hashes,
    stop_gateway,
    systemd_census,
    unmount,
)
from hxp.spec import Stack
from hxp.store import Store
from hxp.units import UnitInstance, all_slots, expand_units, slot_instances

ROOT = Path(__file__).resolve().parents[1]
KILL_WAIT_SECONDS = 60.0


def check_port(stack: Stack, unit: str) -> int | None:
    """The port a service's health check probes (its fault revisions serve there)."""
    health = stack.unit(unit).health
    if health is None:
        return None
    if health.tcp is not None:
        return int(health.tcp.port)
    if health.http is not None:
        from urllib.parse import urlsplit

        return urlsplit(str(health.http.url)).port
    return None


def running_slot(stack: Stack, inst: UnitInstance, seen: Mapping[str, Any]) -> UnitInstance:
    """The instance as it runs: a unit behind the gateway lives in slot `x` or `x-g` (a
    blue-green move alternates them); the other slot when only that one exists."""
    if stack.gateway is None or inst.unit not in stack.gateway.routes or inst.name in seen:
        return inst
    other = {i.name: i for i in slot_instances(stack, inst.unit, 1)}.get(f"{inst.name}-g")
    return other if other is not None and other.name in seen else inst


class _When:
    """A thread that does `act` once `ready()` holds (polled every 20 ms) until stopped: how a
    fault is injected in the middle of an apply made in this process."""

    def __init__(self, ready: Callable[[], bool], act: Callable[[], object]) -> None:
        self.done = False
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready, act), daemon=True)
        self._thread.start()

    def _run(self, ready: Callable[[], bool], act: Callable[[], object]) -> None:
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                if ready():
                    act()
                    self.done = True
                    return
            except Exception as exc:  # reported as the run's error, not raised in a thread
                self.error = f"{type(exc).__name__}: {exc}"
                return
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Campaign:
    """Runs of one campaign on one stack file and state directory. `own_state`: the caller
    made `state_dir` for this campaign (bench, tests): it may mount a small file system there
    and fill it (the state-disk-full fault); never on a user's state directory.
    `restart_docker`: the caller started the Docker daemon the stack's host uses (bench,
    tests) and hands over how to restart it (the docker-restart fault); never a user's."""

    def __init__(
        self,
        stack_file: Path,
        state_dir: Path,
        backend: str = "process",
        log: Callable[[str], None] = print,
        own_state: bool = False,
        restart_docker: Callable[[], None] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise InputError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
        self.backend = backend
        # The unit program's interpreter: this one here; the host's or image's elsewhere.
        self.python = sys.executable if backend == "process" else "python3"
        self.state = state_dir
        self.mounted = False
        self.restart_docker = restart_docker
        have: set[str] = set()
        if restart_docker is not None and backend == "docker":
            have.add("own-dockerd")
        if own_state:
            try:
                mount_small_fs(state_dir)
            except HxpError as exc:
                log(f"state-disk-full not injected: {exc}")
            else:
                self.mounted = True
                have.add("own-state")
        # the campaign's own files stay off a file system it fills
        self.work = (
            state_dir.with_name(state_dir.name + ".chaos")
            if self.mounted
            else (state_dir / "chaos")
        )
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = log
        try:
            raw = yaml.safe_load(stack_file.read_text())
            if not isinstance(raw, dict):
                raise InputError(f"{stack_file}: not a stack mapping")
            self.good: dict[str, Any] = raw
            stack = self._load(self._write("good", raw))
            for name, host in stack.hosts.items():
                if host.backend != backend:
                    raise InputError(
                        f"{stack_file}: host {name} uses backend {host.backend}, not {backend}"
                    )
                if backend == "docker" and host.runner != "local":
                    raise InputError(
                        f"{stack_file}: host {name}: the docker campaign counts containers on "
                        f"the local engine (DOCKER_HOST), not through runner {host.runner}"
                    )
            self.stack = stack
            self.name = stack.stack
            self.ports = {u: check_port(stack, u) for u in stack.services}
            targets = {u: p for u, p in self.ports.items() if p is not None}
            if not targets:
                raise InputError(f"{stack_file}: no service with an http or tcp health check")
            self.deps = {u: [d for d in stack.unit(u).depends_on if d in targets] for u in targets}
            routes = stack.gateway.routes if stack.gateway is not None else None
            self.models = sorted(
                m
                for m, spec in stack.models.items()
                if spec.engine == "simulator"
                and spec.health is not None
                and spec.health.http is not None
                and (routes is None or m in routes)
            )
            if self.models:
                have.add("model")
                if routes is not None:
                    have.add("gateway")
            self.faults = faults_for(backend, frozenset(have))
            self.skipped = skipped_faults(backend, frozenset(have))
            self.store = Store(state_dir)
        except BaseException:
            if self.mounted:  # bad input: leave nothing mounted
                unmount(state_dir)
            raise

    # ------------------------------------------------------------------ files and applies

    def _write(self, name: str, raw: dict[str, Any]) -> Path:
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    @staticmethod
    def _load(path: Path) -> Stack:
        return load_config([path], {}).stack

    def _apply_here(self, path: Path) -> int:
        from flows.deploy import deploy_stack

        try:
            deploy_stack(str(path), state_dir=str(self.state))
        except HxpError as exc:
            return exc.exit_code
        return 0

    def _apply_process(self, path: Path, tag: str) -> subprocess.Popen[bytes]:
        from prefect.settings import PREFECT_API_URL

        env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
        out = (self.work / f"{tag}.log").open("wb")
        argv = [sys.executable, "-m", "hxp_cli", "apply", "-f", str(path)]
        return subprocess.Popen(
            [*argv, "--state-dir", str(self.state)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _settle_store(self) -> bool:
        for _ in range(50):
            if self.store.checkpoint():
                return True
            time.sleep(0.1)
        return False

    def _last_id(self) -> int:
        rows = self.store.deploys(self.name, 1)
        return rows[0].id if rows else 0

    def _rows_since(self, before: int) -> list[Any]:
        return sorted(
            (d for d in self.store.deploys(self.name, 100) if d.id > before), key=lambda d: d.id
        )

    def _wait(self, done: Callable[[], bool], proc: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while time.monotonic() < deadline and proc.poll() is None:
            if done():
                return True
            time.sleep(0.02)
        return False

    def _kill(self, proc: subprocess.Popen[bytes]) -> int | None:
        if proc.poll() is not None:
            return proc.returncode
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None

    def setup(self) -> None:
        """Deploy the stack as given: the first good revision every run starts from (on
        systemd hosts, the unit program is installed first)."""
        for fault, why in self.skipped.items():
            self.log(f"{fault} not injected: {why}")
        if self.backend == "systemd":
            for host in self.stack.hosts:
                install_unit_program(self.stack, host)
        code = self._apply_here(self.work / "good.yaml")
        if code != 0:
            raise HxpError(f"the stack's own first apply failed (exit {code}): nothing to test")

    # ------------------------------------------------------------------ one run

    def plan(self, seed: int, run: int) -> RunPlan:
        return plan_run(seed, run, self.faults, self.deps, self.models)

    def run(self, plan: RunPlan) -> RunResult:
        result = RunResult(plan)
        spec = FAULTS[plan.fault]
        python = self.python
        port = self.ports.get(plan.unit) or 0  # a model's revisions keep its own port
        before = self._last_id()
        good_file = self._write("good", self.good)
        candidate = candidate_stack(self.good, plan, python, self.ports)
        cand_file = self._write(f"run-{plan.run}", candidate)
        cand_stack = self._load(cand_file)
        codes: list[int | None] = []
        recovery: int | None = None
        final = candidate
        started = time.perf_counter()
        if plan.fault is Fault.CONCURRENT_APPLIES:
            other = new_revision(self.good, plan.unit, Fault.NONE, plan.version + "b", python, port)
            other_file = self._write(f"run-{plan.run}b", other)
            procs = [
                self._apply_process(cand_file, f"run-{plan.run}"),
                self._apply_process(other_file, f"run-{plan.run}b"),
            ]
            codes = [p.wait() for p in procs]
            rows = self._rows_since(before)
            later = load_config([other_file], {}).content_hash
            if rows and rows[-1].config_hash == later:
                final, cand_stack = other, self._load(other_file)
        elif spec.exit_code is None:
            proc = self._apply_process(cand_file, f"run-{plan.run}")
            if plan.fault is Fault.KILL_DURING_APPLY:
                want = unit_config_hash(cand_stack, plan.unit)
                seen = self._wait(lambda: self._hash_of(plan.unit) == want, proc)
            else:
                seen = self._wait(lambda: self._rolled_back(before), proc)
            codes = [self._kill(proc)]
            if not seen:
                result.error = "the moment to kill the orchestrator never came"
            recovery = self._apply_here(good_file)
            final = self.good
        elif plan.fault is Fault.NGINX_KILLED:
            want = unit_config_hash(cand_stack, plan.unit)
            stack_now = cand_stack
            slots = {i.name for i in all_slots(cand_stack, plan.unit)}
            killer = _When(
                lambda: self._unit_runs(slots, want),
                lambda: kill_gateway_master(stack_now, self.state),
            )
            codes = [self._apply_here(cand_file)]
            killer.stop()
            if not killer.done:
                result.error = killer.error or "the moment to kill nginx never came"
        elif plan.fault is Fault.DOCKER_RESTART:
            restart = self.restart_docker
            if restart is None:
                raise HxpError("docker-restart: the campaign was given no daemon to restart")
            want = unit_config_hash(cand_stack, plan.unit)
            restarter = _When(lambda: self._hash_of(plan.unit) == want, restart)
            codes = [self._apply_here(cand_file)]
            restarter.stop()
            if not restarter.done:
                result.error = restarter.error or "the moment to restart the daemon never came"
        elif plan.fault is Fault.STATE_DISK_FULL:
            want = unit_config_hash(cand_stack, plan.unit)
            # An empty write-ahead log: each write of the apply appends to it, so every write
            # made after the fill needs new space (SQLite would otherwise reuse log space an
            # earlier apply left, and the deploy's last writes could still fit).
            if not self._settle_store():
                result.error = "the store's write-ahead log could not be emptied before the run"
            proc = self._apply_process(cand_file, f"run-{plan.run}")
            seen = self._wait(lambda: self._hash_of(plan.unit) == want, proc)
            if seen:
                fill(self.state)
            codes = [proc.wait()]
            free(self.state)
            if not seen:
                result.error = "the moment to fill the disk never came"
            log_text = (self.work / f"run-{plan.run}.log").read_text(errors="replace")
            if "Traceback" in log_text or "internal error" in log_text:
                result.violations.append("the failed apply printed no clear error (see its log)")
            elif seen and codes != [0] and "error: " not in log_text:
                result.violations.append("the failed apply printed no error")
            recovery = self._apply_here(good_file)
            final = self.good
        else:
            codes = [self._apply_here(cand_file)]
            if spec.outcome == "previous":
                final = self.good
        result.apply_seconds = time.perf_counter() - started
        rows = self._rows_since(before)
        result.rollback_seconds = self._rollback_seconds(rows)
        # What runs now is what the store calls good: the last good file follows the outcome
        # (a fault committed against expectation is the next run's baseline, and reported).
        committed = all(c == 0 for c in codes) and recovery is None
        expected_stack = cand_stack if spec.outcome == "new" else self._load(good_file)
        if committed:
            self.good = final if spec.outcome == "new" else candidate
        observed_file = self._write("good", self.good)
        result.violations += violations(
            spec,
            self.observe(
                self._load(observed_file), codes, recovery, expected_stack, rows, observed_file
            ),
        )
        return result

    def _unit_runs(self, slots: set[str], want: str) -> bool:
        """An instance in `slots` (a unit's blue-green slots) runs the config hash `want`."""
        running = running_hashes(self.state, self.name)
        return any(h == want for n, h in running.items() if n in slots)

    def _hash_of(self, unit: str) -> str | None:
        if self.backend == "process":
            return process_hash(self.state, self.name, unit)
        seen = observed(self.stack, self.state).get(unit)
        return seen.config_hash if seen else None

    def _rolled_back(self, before: int) -> bool:
        rows = self._rows_since(before)
        return any(
            e["kind"] == "rolled-back" for r in rows for e in self.store.events(self.name, r.id)
        )

    def _rollback_seconds(self, rows: list[Any]) -> float | None:
        for row in rows:
            events = self.store.events(self.name, row.id)
            failed = [e["at"] for e in events if e["kind"] == "unit-failed"]
            restored = [e["at"] for e in events if e["kind"] == "rolled-back"]
            if failed and restored:
                return float(max(restored) - min(failed))
        return None

    def repair(self, plan: RunPlan) -> bool:
        """After a violation: a clean revision of the run's unit(s), so that one run's fault
        (a crash-looping committed revision) does not spill into the next runs' verdicts."""
        python = self.python
        clean = self.good
        for unit in filter(None, (plan.unit, plan.partner)):
            port = self.ports.get(unit) or 0
            clean = new_revision(clean, unit, Fault.NONE, plan.version + "-repair", python, port)
        if self._apply_here(self._write(f"run-{plan.run}-repair", clean)) != 0:
            return False
        self.good = clean
        return True

    # ------------------------------------------------------------------ invariants

    def observe(
        self,
        stack: Stack,
        codes: list[int | None],
        recovery: int | None,
        expected: Stack,
        rows: list[Any],
        good_file: Path,
    ) -> Observation:
        from hxp.plan import plan_stack

        seen = observed(stack, self.state)
        routes = stack.gateway.routes if stack.gateway is not None else {}
        instances = [running_slot(stack, inst, seen) for inst in expand_units(stack)]
        names = {i.name for i in instances}
        counted = self._census(stack, sorted(names))
        out: list[InstanceSeen] = []
        should_route: set[str] = set()
        for inst in instances:
            obs = seen.get(inst.name)
            good = self.store.last_good(self.name, inst.unit)
            running = bool(obs and obs.running)
            out.append(
                InstanceSeen(
                    name=inst.name,
                    running=running,
                    config_hash=obs.config_hash if obs else None,
                    good_hash=good.config_hash if good else None,
                    answers=running and answers(inst),
                    processes=counted.per_instance.get(inst.name, 0),
                )
            )
            if inst.unit in routes and out[-1].answers and inst.route_port is not None:
                should_route.add(f"{inst.unit}:{inst.route_port}")
        leftovers = [f"instance {n} (not in the stack)" for n in sorted(set(seen) - names)]
        leftovers += counted.leftovers
        content = load_config([good_file], {}).content_hash
        plan = plan_stack(stack, seen, content)
        changes = [f"{a.instance}: {a.kind.value} ({a.reason})" for a in plan.actions]
        expected_hash = {
            u: unit_config_hash(expected, u) for u in [*expected.services, *expected.models]
        }
        reserved = {
            r.instance for r in self.store.reservations() if getattr(r, "stack", "") == self.name
        }
        gpu_models = {
            i.name
            for i in instances
            if i.gpus and seen.get(i.name) is not None and seen[i.name].running
        }
        return Observation(
            exit_codes=tuple(codes),
            recovery_exit=recovery,
            expected_hash=expected_hash,
            instances=out,
            unit_of={i.name: i.unit for i in instances},
            leftovers=leftovers,
            plan_changes=changes,
            history=[r.status for r in rows],
            unfinished=len(self.store.unfinished_deploys(self.name)),
            routed=gateway_routes(stack, self.state),
            should_route=frozenset(should_route) if stack.gateway is not None else None,
            reserved=frozenset(reserved),
            gpu_models=frozenset(gpu_models),
            gateway_up=gateway_up(stack, self.state),
        )

    def _census(self, stack: Stack, names: list[str]) -> Census:
        """Processes (process backend), running containers (docker) or processes in the
        unit's cgroup (systemd) per instance, and what is left over."""
        if self.backend == "docker":
            return docker_census(self.name, names)
        if self.backend == "systemd":
            out = Census(per_instance={n: 0 for n in names})
            for host in stack.hosts:
                part = systemd_census(stack, host, names)
                for n, count in part.per_instance.items():
                    out.per_instance[n] += count
                out.leftovers += part.leftovers
            return out
        found = process_census(self.state, self.name)
        out = Census(per_instance={n: len(found.units.get(n, [])) for n in names})
        for inst_name, pids in sorted(found.supervisors.items()):
            if inst_name not in names or len(pids) > 1:
                out.leftovers.append(f"{len(pids)} supervisor(s) of {inst_name}: pids {pids}")
        out.leftovers += [
            f"process {pid} of {n}"
            for n, pids in sorted(found.units.items())
            if n not in names
            for pid in pids
        ]
        out.leftovers += found.orphans
        return out

    # ------------------------------------------------------------------ the campaign

    def teardown(self) -> None:
        try:
            remove_stack(self._load(self._write("good", self.good)), self.state)
            stop_gateway(self._load(self.work / "good.yaml"), self.state)
        finally:
            if self.mounted:
                self.store.close()
                unmount(self.state)


def run_campaign(
    campaign: Campaign,
    seed: int,
    runs: int,
    only: int | None = None,
    log: Callable[[str], None] = print,
    stop_at: float | None = None,
    select: Sequence[int] | None = None,
) -> list[RunResult]:
    """Runs 0..runs-1 of campaign `seed` (only run `only` when replaying, only the runs in
    `select` when given); no run starts after `stop_at` (time.monotonic()), so a time-boxed
    campaign reports the runs it made."""
    campaign.setup()
    results: list[RunResult] = []
    chosen = [only] if only is not None else list(select) if select is not None else range(runs)
    for run in chosen:
        if stop_at is not None and time.monotonic() > stop_at:
            log(f"time is up after {len(results)} run(s)")
            break
        plan = campaign.plan(seed, run)
        try:
            result = campaign.run(plan)
        except Exception as exc:  # the campaign could not run it: report, go on
            result = RunResult(plan, error=f"{type(exc).__name__}: {exc}")
        results.append(result)
        if not result.consistent and not campaign.repair(plan):
            log(f"run {plan.key}: the repair apply failed too; later runs may inherit it")
        mark = "ok" if result.consistent else "VIOLATION"
        detail = (
            ""
            if result.consistent
            else " -- " + "; ".join(result.violations + ([result.error] if result.error else []))
        )
        log(
            f"run {plan.key:>10} {plan.fault.value:<24} {plan.unit:<8} "
            f"{result.apply_seconds or 0:6.2f}s {mark}{detail}"
        )
    return results


def write_artifact(path: Path, seed: int, backend: str, results: list[RunResult]) -> None:
    from hxp.chaos import summary_rows

    data = {
        "seed": seed,
        "backend": backend,
        "summary": summary_rows(results),
        "runs": [
            {
                "replay": r.plan.key,
                "fault": r.plan.fault.value,
                "unit": r.plan.unit,
                "partner": r.plan.partner,
                "consistent": r.consistent,
                "violations": r.violations,
                "error": r.error,
                "apply_s": r.apply_seconds,
                "rollback_s": r.rollback_seconds,
            }
            for r in results
        ],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
