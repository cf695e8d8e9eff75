"""Monitoring tasks: render with secrets, validate, install, reload, verify, push to Grafana.

Each does one kind of side effect; what to render and what to expect is decided in
hxp.monitoring.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from hxp.errors import MonitoringError, QueryLintError
from hxp.io.monitoring import (
    Install,
    LifecycleApi,
    check_monitoring_dir,
    install_files,
    prometheus_alertmanagers,
    prometheus_rule_groups,
    prometheus_targets,
    push_grafana,
    wait_until,
    write_secret_files,
)
from hxp.monitoring import (
    ALERTMANAGER_CONFIG,
    ALERTMANAGER_SECRETS,
    DASHBOARDS_DIR,
    MonitoringFile,
    alert_rules,
    component_urls,
    lint_files,
    monitoring_files,
    recording_rules,
    replica_health,
    rule_group_names,
    secret_blocks,
)
from hxp.spec import Stack


def monitoring_root(state_dir: str, stack: Stack) -> Path:
    """STATE/monitoring/<stack>/: configs, rules, secrets, TSDB and dashboards of one stack."""
    return Path(state_dir) / "monitoring" / stack.stack


@dataclass
class RenderedMonitoring:
    """The files to install, and the secret values that go to 0600 files beside them."""

    files: list[MonitoringFile]
    secret_files: dict[str, str] = field(default_factory=dict, repr=False)


@task(
    name="render-monitoring", task_run_name="render-monitoring-{stack.stack}", cache_policy=NO_CACHE
)
def render_monitoring(stack: Stack, state_dir: str) -> RenderedMonitoring:
    """Every monitoring file, with secrets resolved from Prefect Secret blocks (or env/files)."""
    from tasks.secrets import default_resolver

    root = monitoring_root(state_dir, stack)
    blocks = secret_blocks(stack)
    resolver = default_resolver(state_dir)
    values = {name: resolver.resolve(name) for name in sorted(blocks)}
    inline = {n: v for n, v in values.items() if blocks[n] == "inline"}
    files = monitoring_files(
        stack,
        secrets_dir=str(root / ALERTMANAGER_SECRETS),
        inline_secrets=inline,
        dashboards_path=str(root / DASHBOARDS_DIR),
    )
    secret_files = {n: v for n, v in values.items() if blocks[n] == "file"}
    return RenderedMonitoring(files, secret_files)


@task(
    name="validate-monitoring",
    task_run_name="validate-monitoring-{stack.stack}",
    cache_policy=NO_CACHE,
)
def validate_monitoring(stack: Stack, rendered: RenderedMonitoring) -> list[str]:
    """Query lint, then promtool and amtool on a staged copy; raise on any problem."""
    logger = get_run_logger()
    problems = lint_files(stack, rendered.files)
    if problems:
        raise QueryLintError(problems)
    passed = ["query lint"]
    with tempfile.TemporaryDirectory(prefix="hxp-monitoring-") as tmp:
        install_files(Path(tmp), rendered.files)
        for result in check_monitoring_dir(Path(tmp)):
            if result.skipped:
                logger.warning("skipped %s: %s", result.check, result.skipped)
            elif result.problems:
                problems.extend(f"{result.check}: {p}" for p in result.problems)
            else:
                passed.append(result.check)
    if problems:
        raise MonitoringError("monitoring config is invalid:\n" + "\n".join(problems))
    return passed


@task(
    name="install-monitoring",
    task_run_name="install-monitoring-{stack.stack}",
    cache_policy=NO_CACHE,
)
def install_monitoring(stack: Stack, state_dir: str, rendered: RenderedMonitoring) -> Install:
    """Write the secrets (mode 0600) and the files; the replaced versions are kept in memory."""
    root = monitoring_root(state_dir, stack)
    if rendered.secret_files:
        write_secret_files(root / ALERTMANAGER_SECRETS, rendered.secret_files)
    return install_files(root, rendered.files)


def _api(stack: Stack, component: str) -> LifecycleApi:
    return LifecycleApi(component_urls(stack)[component], component)


@task(
    name="reload-monitoring", task_run_name="reload-monitoring-{stack.stack}", cache_policy=NO_CACHE
)
def reload_monitoring(stack: Stack, install: Install, started: list[str]) -> list[str]:
    """`POST /-/reload` where files changed; a refusal puts the old files back and fails.

    Components in `started` were (re)started by this run and read the new files already.
    """
    logger = get_run_logger()
    reloaded: list[str] = []
    for component, prefix in (("prometheus", "prometheus/"), ("alertmanager", "alertmanager/")):
        if component not in component_urls(stack):
            continue
        if not any(p.startswith(prefix) for p in install.changed):
            logger.info("%s: config unchanged, no reload", component)
            continue
        if component in started:
            logger.info("%s: started with the new config, no reload", component)
            continue
        reload_or_restore(_api(stack, component), install)
        logger.info("%s: reloaded", component)
        reloaded.append(component)
    return reloaded


def reload_or_restore(api: LifecycleApi, install: Install) -> None:
    """Reload; if refused, put the previous files back so a restart does not read the bad ones."""
    try:
        api.reload()
    except MonitoringError as exc:
        install.restore()
        raise MonitoringError(
            f"{exc}\nThe previous config files were put back; {api.name} keeps running on its "
            "old config."
        ) from None


@dataclass
class VerifyReport:
    targets_up: list[str]
    targets_down: list[str]
    rule_groups: dict[str, int]
    alertmanagers: list[str]

    @property
    def ok(self) -> bool:
        return not self.targets_down


@task(
    name="verify-monitoring", task_run_name="verify-monitoring-{stack.stack}", cache_policy=NO_CACHE
)
def verify_monitoring(stack: Stack, timeout: float = 60.0) -> VerifyReport:
    """Every target `up`, every rule group loaded, Alertmanager ready and known to Prometheus."""
    urls = component_urls(stack)
    prom = _api(stack, "prometheus")
    want_groups = set(rule_group_names(stack))
    want_rules = len(recording_rules(stack)) + len(alert_rules(stack))

    def replicas() -> tuple[list[str], list[str]]:
        seen = prometheus_targets(prom)
        return replica_health(
            (t.job, t.labels.get("replica", t.instance), t.health, t.error) for t in seen
        )

    def all_up() -> tuple[list[str], list[str]] | None:
        up, down = replicas()
        return (up, down) if up and not down else None

    up, down = wait_until(all_up, timeout) or replicas()
    if down or not up:
        raise MonitoringError(
            f"monitoring of {stack.stack}: targets not up after {timeout:.0f}s: "
            + ("; ".join(down) or "Prometheus has no targets")
        )
    groups = prometheus_rule_groups(prom)
    missing = sorted(want_groups - set(groups))
    loaded = sum(n for g, n in groups.items() if g in want_groups)
    if missing or loaded != want_rules:
        raise MonitoringError(
            f"monitoring of {stack.stack}: rule groups {missing or sorted(want_groups)} not "
            f"loaded as rendered ({loaded} of {want_rules} rules loaded)"
        )
    managers: list[str] = []
    if "alertmanager" in urls:
        am = _api(stack, "alertmanager")
        if not wait_until(am.ready, timeout):
            raise MonitoringError(f"Alertmanager at {am.base_url} is not ready")
        managers = wait_until(lambda: prometheus_alertmanagers(prom), timeout)
        if not managers:
            raise MonitoringError(
                f"Prometheus at {prom.base_url} does not know its Alertmanager {am.base_url}"
            )
    return VerifyReport(up, down, groups, managers)


@task(name="push-grafana", task_run_name="push-grafana-{stack.stack}", cache_policy=NO_CACHE)
def push_dashboards(stack: Stack, state_dir: str, rendered: RenderedMonitoring) -> list[str]:
    """Through Grafana's HTTP API, when `monitoring.grafana` has a URL and a token block."""
    from hxp.dashboards import datasource_uid
    from tasks.secrets import default_resolver

    mon = stack.monitoring
    if mon is None or mon.grafana is None or mon.grafana.token_block is None:
        return []
    token = default_resolver(state_dir).resolve(mon.grafana.token_block)
    boards = [json.loads(f.content) for f in rendered.files if f.path.endswith(".json")]
    datasource: dict[str, Any] = {
        "name": f"hxp {stack.stack}",
        "uid": datasource_uid(stack),
        "type": "prometheus",
        "access": "proxy",
        "url": component_urls(stack)["prometheus"],
        "isDefault": False,
    }
    pushed = push_grafana(mon.grafana.url, token, datasource, boards)
    get_run_logger().info(
        "Grafana %s: datasource %s, %d dashboard(s)",
        mon.grafana.url,
        pushed.datasource,
        len(pushed.dashboards),
    )
    return list(pushed.dashboards)


__all__ = [
    "ALERTMANAGER_CONFIG",
    "RenderedMonitoring",
    "VerifyReport",
    "install_monitoring",
    "monitoring_root",
    "push_dashboards",
    "reload_monitoring",
    "reload_or_restore",
    "render_monitoring",
    "validate_monitoring",
    "verify_monitoring",
]
