"""`deploy-monitoring`: render, validate, deploy or reload, verify Prometheus and Alertmanager.

The runbook it replaces: write prometheus.yml, rules and alertmanager.yml from the stack; run
promtool/amtool and the query lint; start Prometheus, Alertmanager and the Pushgateway like
any unit (process or systemd host, readiness-gated, rolled back on failure) or `POST /-/reload`
the running ones; then check that every target is up, the rules are loaded and Alertmanager
answers; push the dashboards to Grafana when it is configured.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.deploy import apply_config
from flows.naming import stack_run_name
from hxp.config import Document, build_config
from hxp.io.monitoring import find_binaries
from hxp.monitoring import MonitoringPaths, component_urls, monitoring_stack_data
from tasks.deploy import state_dir_of
from tasks.monitoring import (
    install_monitoring,
    monitoring_root,
    push_dashboards,
    reload_monitoring,
    render_monitoring,
    validate_monitoring,
    verify_monitoring,
)
from tasks.stack import load_stack

_run_name = stack_run_name("monitoring")


@flow(name="deploy-monitoring", flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(4))
def deploy_monitoring(
    stack_files: list[str] | str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    verify_timeout: float = 60.0,
    wait_for_lock: bool = True,
) -> dict[str, Any]:
    """Deploy (or reload) a stack's Prometheus, Alertmanager and Pushgateway, then verify them.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins (paths on the worker).
        overrides: `path.to.key=value` overrides applied last, like `hxp --set`.
        state_dir: Where hxp keeps its store, process state and monitoring files.
        verify_timeout: Seconds to wait for every target to be up and the rules loaded.
        wait_for_lock: Wait for another deploy of the monitoring units to finish.
    """
    logger = get_run_logger()
    files = [stack_files] if isinstance(stack_files, str) else list(stack_files)
    stack = load_stack(files, list(overrides or [])).stack
    state = state_dir_of(state_dir)
    rendered = render_monitoring(stack, state)
    checks = validate_monitoring(stack, rendered)
    logger.info("passed: %s", ", ".join(checks))
    install = install_monitoring(stack, state, rendered)
    root = monitoring_root(state, stack)
    units = monitoring_stack_data(stack, MonitoringPaths(str(root)), find_binaries())
    effective = build_config([Document(f"monitoring of stack {stack.stack}", units)])
    try:
        deployed = apply_config(effective, state_dir=state, wait_for_lock=wait_for_lock)
    except BaseException:
        install.restore()
        raise
    reloaded = reload_monitoring(stack, install, sorted(deployed["units"]))
    report = verify_monitoring(stack, verify_timeout)
    pushed = push_dashboards(stack, state, rendered)
    urls = component_urls(stack)
    for component, url in urls.items():
        logger.info("%s: %s", component, url)
    return {
        "stack": stack.stack,
        "changed_files": install.changed,
        "units": deployed["units"],
        "units_changed": deployed["changed"],
        "reloaded": reloaded,
        "targets_up": report.targets_up,
        "rule_groups": report.rule_groups,
        "alertmanagers": report.alertmanagers,
        "grafana_dashboards": pushed,
        "urls": urls,
        "config_dir": str(root),
    }
