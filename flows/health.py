"""`health-sweep`: check every unit of a stack, combine layers, replicas and dependencies into
each unit's health, take unhealthy replicas out of the gateway (and put them back), and tell
people: a table and a summary in the UI, one event per change, gauges on the Pushgateway.

A sweep runs often and briefly: run it with the flow heartbeat off (`run_health_sweep`, as
the tests and the benchmark do); see docs/operations.md. `hxp health` runs the same steps
(hxp.io.sweep) without Prefect.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.events import emit_event
from prefect.settings import get_current_settings
from prefect.utilities.annotations import quote

from flows.naming import stack_run_name
from hxp.health import (
    Status,
    SweepReport,
    SweepSettings,
    health_markdown,
    health_rows,
    table_due,
    table_fingerprint,
)
from hxp.io.sweep import load_stack_cached, record_metrics
from hxp.io.telemetry import pushgateway_url as pushgateway_of
from hxp.store import counted_at
from tasks.deploy import state_dir_of
from tasks.health import (
    check_health,
    push_health_metrics,
    record_health,
    reroute_gateway,
)

_run_name = stack_run_name("health")


def resource(stack: str, unit: str) -> dict[str, str]:
    """The Prefect event resource of a unit: `hxp.unit.<stack>.<unit>`."""
    return {
        "prefect.resource.id": f"hxp.unit.{stack}.{unit}",
        "prefect.resource.name": unit,
        "hxp.stack": stack,
    }


def _emit_events(report: SweepReport) -> int:
    """One event per state change, one per replica moved in or out of the gateway, one per
    alert. Returns how many were emitted."""
    count = 0
    for t in report.transitions:
        emit_event(
            event=t.event,
            resource=resource(report.stack, t.unit),
            payload={
                "before": t.before.value if t.before else None,
                "after": t.after.value,
                "reason": t.reason,
            },
        )
        count += 1
    for route in report.routes:
        moves = [("hxp.health.replica-removed", i) for i in route.removed]
        moves += [("hxp.health.replica-restored", i) for i in route.restored]
        for name, instance in moves:
            emit_event(
                event=name,
                resource=resource(report.stack, route.unit),
                payload={"instance": instance, "upstream": list(route.after)},
            )
            count += 1
        if route.alert:
            emit_event(
                event="hxp.health.last-replica",
                resource=resource(report.stack, route.unit),
                payload={"alert": route.alert, "upstream": list(route.after)},
            )
            count += 1
    return count


class ReadOnlyMap(Mapping[str, Any]):
    """A read-only mapping: a sweep's per-unit and per-instance results as the flow returns them.

    Prefect walks a flow's return value item by item looking for futures (dicts, lists,
    dataclasses and pydantic models; ~22 ms for 1,000 units here, every sweep). A Mapping
    that is not a dict is not walked; these hold plain strings and dicts, never a future.
    Read it like a dict (`[]`, `get`, `items`, `in`, `len`); `dict(m)` for a copy."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"ReadOnlyMap({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ReadOnlyMap, (self._data,))


# The flow's own result settings, so that starting a run reads nothing from the server.
# Without them Prefect asks the server for its default result storage three times per run
# (`GET /api/admin/storage`: twice to build the run's result store, once to decide whether to
# persist); a sweep's result is not persisted (the store and the artifacts keep what it found).
# A Path (Prefect's local result storage) resolves without a request; a block would need one.
_RESULT_STORAGE = Path(get_current_settings().results.local_storage_path)


@flow(
    name="health-sweep",
    flow_run_name=_run_name,
    persist_result=False,
    result_storage=_RESULT_STORAGE,
)
async def health_sweep(
    stack_files: list[str] | str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    flap_threshold: int = 2,
    min_healthy_share: float = 0.5,
    synthetic_window: float = 300.0,
    concurrency: int = 200,
    observe: bool = True,
    host_timeout: float = 2.0,
    reroute: bool = True,
    pushgateway_url: str | None = None,
) -> dict[str, Any]:
    """Check every unit of a stack and act on what changed.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        overrides: `path.to.key=value` overrides applied last, like `hxp --set`.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        flap_threshold: Consecutive sweeps that must agree before a state changes.
        min_healthy_share: A replicated unit with fewer replicas serving is unhealthy.
        synthetic_window: Seconds: real successful requests this recent skip the synthetic
            one-token completion.
        concurrency: Network calls in flight at once.
        observe: Ask the backends (the backend layer); off checks the endpoints only.
        host_timeout: Seconds each addressed host's reachability connect (its sshd) may take;
            a host that does not answer and whose every probe fails is `unreachable`.
        reroute: Take unhealthy replicas out of the gateway and put recovered ones back.
        pushgateway_url: Push hxp_unit_health here; default the stack's monitoring.pushgateway.

    Returns the report as a dict: stack, status, seconds, hosts, transitions, routes, notes,
    and `units` and `instances` as read-only mappings (`ReadOnlyMap`).
    """
    logger = get_run_logger()
    settings = SweepSettings(
        flap_threshold=flap_threshold,
        min_healthy_share=min_healthy_share,
        synthetic_window=synthetic_window,
        concurrency=concurrency,
        observe=observe,
        host_timeout=host_timeout,
    )
    files = [stack_files] if isinstance(stack_files, str) else list(stack_files)
    # Parsed in the flow, not in a task: the parse is cached by content, and a task run
    # costs more than the cache hit it would wrap.
    state = state_dir_of(state_dir)
    stack = counted_at(state, load_stack_cached(files, list(overrides or []))).stack
    started = time.monotonic()
    # quote(): the tasks get the values as they are, without Prefect walking through them.
    probed = await check_health(quote(stack), state, settings)
    report = await record_health(quote(stack), state, quote(probed), settings)
    if reroute and stack.gateway is not None:
        report.routes, notes = reroute_gateway(quote(stack), state, quote(report))
        report.notes.extend(notes)
    report.seconds = time.monotonic() - started
    record_metrics(report)
    url = pushgateway_of(stack, pushgateway_url)
    if url:
        try:
            push_health_metrics(stack.stack, url)
        except OSError as exc:
            report.notes.append(f"pushgateway {url}: {exc}")
    events = _emit_events(report)
    for t in report.transitions:
        log = logger.warning if t.after is not Status.HEALTHY else logger.info
        log("%s: %s -> %s (%s): %s", t.unit, t.before or "new", t.after, t.event, t.reason)
    for note in report.notes:
        logger.warning(note)
    for h in report.unreachable:
        emit_event(
            event="hxp.health.host-unreachable",
            resource={
                "prefect.resource.id": f"hxp.host.{stack.stack}.{h.host}",
                "prefect.resource.name": h.host,
                "hxp.stack": stack.stack,
            },
            payload={"address": h.address, "reason": h.reason, "instances": list(h.instances)},
        )
    rows = health_rows(report)
    fingerprint, now = table_fingerprint(rows), time.time()
    where = (str(get_current_settings().api.url), state, stack.stack)
    last = _TABLES.get(where)
    due = table_due(fingerprint, last, now)
    artifacts = [
        acreate_markdown_artifact(
            key=f"health-summary-{stack.stack}",
            markdown=health_markdown(report, None if due or last is None else last[1]),
            description=f"health sweep of stack {stack.stack}",
        )
    ]
    if due:
        _TABLES[where] = (fingerprint, now)
        artifacts.append(
            acreate_table_artifact(
                key=f"health-{stack.stack}",
                table=rows,
                description=f"health of stack {stack.stack}: {report.status.value}",
            )
        )
    await asyncio.gather(*artifacts)
    logger.info(
        "stack %s is %s: %d unit(s), %d instance(s), %d change(s), %d event(s), %.2fs",
        stack.stack,
        report.status.value,
        len(report.units),
        len(report.instances),
        len(report.transitions),
        events,
        report.seconds,
    )
    freeze_heap_once()
    result = report.to_dict()
    result["units"] = ReadOnlyMap(result["units"])
    result["instances"] = ReadOnlyMap(result["instances"])
    return result


# The table artifact this process last published, per (Prefect API, state dir, stack):
# (fingerprint, time).
_TABLES: dict[tuple[str, str, str], tuple[int, float]] = {}

_FROZEN: list[bool] = []


def freeze_heap_once() -> None:
    """After this process's first sweep, move what it holds into the collector's permanent
    generation (gc.freeze), once.

    Prefect, pydantic and the parsed stack leave ~200,000 long-lived objects: every full
    collection walks them all (~100 ms here, about once per 1,000-endpoint sweep, landing
    in whichever sweep crossed the threshold). Frozen objects are still freed when their
    last reference goes; only cycles among them are never collected, and these live as long
    as the process anyway."""
    if not _FROZEN:
        _FROZEN.append(True)
        gc.collect()
        gc.freeze()


_NO_HEARTBEAT: dict[int, tuple[Any, Any]] = {}


def without_heartbeat() -> Any:
    """A settings context: the caller's settings with the flow heartbeat off.

    Prefect's temporary_settings builds and validates a whole new Settings object each time
    (0.1-0.2 s here, every sweep); the result is kept per settings object of the caller."""
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    context = get_settings_context()
    hit = _NO_HEARTBEAT.get(id(context.settings))
    if hit is None or hit[0] is not context.settings:
        off = context.settings.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
        if len(_NO_HEARTBEAT) >= 8:
            _NO_HEARTBEAT.pop(next(iter(_NO_HEARTBEAT)))
        # the reference to the caller's settings keeps its id from being reused
        hit = _NO_HEARTBEAT[id(context.settings)] = (context.settings, off)
    return SettingsContext(profile=context.profile, settings=hit[1])


def run_health_sweep(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run `health_sweep` to completion with the flow heartbeat off.

    The heartbeat (PREFECT.md) costs a flow run about a second and can only be turned off in
    code; a sweep is short and runs again soon, so a crashed one needs no detecting.
    """
    from prefect.context import SyncClientContext

    # One sync client for the run's own calls outside its loop (the flow engine reads the
    # server's default result storage twice, each time with a new client: a TLS context
    # loaded from the CA bundle each, ~50 ms here, whatever the API's scheme).
    with without_heartbeat(), SyncClientContext.get_or_create():
        result: dict[str, Any] = asyncio.run(health_sweep(*args, **kwargs))
    return result
