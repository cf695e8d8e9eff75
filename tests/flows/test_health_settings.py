"""run_health_sweep's settings: the heartbeat off, built once per settings of the caller."""

from __future__ import annotations

from prefect.settings import (
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    PREFECT_LOGGING_LEVEL,
    get_current_settings,
    temporary_settings,
)

from flows.health import without_heartbeat


def test_the_heartbeat_is_off_and_the_settings_are_built_once() -> None:
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        caller = get_current_settings()
        with without_heartbeat():
            first = get_current_settings()
            assert first.flows.heartbeat_frequency is None
            assert first.logging.level == caller.logging.level
        assert get_current_settings() is caller  # left as it was
        with without_heartbeat():
            assert get_current_settings() is first  # the same object: not rebuilt
        # other settings of the caller: built again, from those
        with temporary_settings(updates={PREFECT_LOGGING_LEVEL: "ERROR"}), without_heartbeat():
            other = get_current_settings()
            assert other is not first
            assert other.flows.heartbeat_frequency is None
            assert other.logging.level == "ERROR"
