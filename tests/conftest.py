"""Shared fixtures: the example stacks and a stack full of hostile values, for the render tests."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from hxp.config import load_config
from hxp.spec import Stack
from tests.support.render_data import EXAMPLES, HOSTILE_STACK, stack_from_data


@pytest.fixture(scope="session")
def hostile_stack_data() -> dict[str, Any]:
    return copy.deepcopy(HOSTILE_STACK)


@pytest.fixture(scope="session")
def hostile_stack() -> Stack:
    return stack_from_data(copy.deepcopy(HOSTILE_STACK))


@pytest.fixture(scope="session", params=sorted(EXAMPLES))
def example(request: pytest.FixtureRequest) -> tuple[str, Stack]:
    """(name, stack) of each example under examples/."""
    name = str(request.param)
    return name, load_config([EXAMPLES[name]], environ={}).stack


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One Prefect test server for the whole session, heartbeats off (PREFECT.md); its API URL."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    with (
        prefect_test_harness(server_startup_timeout=90),
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        yield str(PREFECT_API_URL.value())
