"""Entrypoints of the flows that run every few seconds (health sweep, metrics aggregation,
supervisor pass, autoscaler pass), with the flow heartbeat off.

The heartbeat costs each flow run about a second and Prefect lets only code turn it off (the
environment variable cannot say "none"; docs/prefect.md). A worker imports a deployment's
entrypoint module before it starts the run, so importing this module switches it off for the
runs of the deployments that point here (`entrypoint: flows/frequent.py:health_sweep`). Long
deploys keep theirs: without it a crashed run is never marked crashed.
"""

from __future__ import annotations

import os

from prefect.context import SettingsContext, get_settings_context
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

from flows.autoscale import autoscale
from flows.health import health_sweep
from flows.lifecycle import supervise_stack
from flows.metrics import aggregate_metrics

_ENTERED: list[SettingsContext] = []


def heartbeat_off() -> None:
    """Turn the flow heartbeat off for the rest of this process (a worker's flow-run process).

    The settings context is entered and never left (`temporary_settings` would try to reset it
    when garbage-collected, from another context).
    """
    current = get_settings_context()
    settings = current.settings.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
    context = SettingsContext(profile=current.profile, settings=settings)
    context.__enter__()
    _ENTERED.append(context)


if os.environ.get("HXP_FLOW_HEARTBEAT", "off") == "off":
    heartbeat_off()

__all__ = ["aggregate_metrics", "autoscale", "health_sweep", "heartbeat_off", "supervise_stack"]
