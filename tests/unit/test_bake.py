"""The bake window's length (hxp.bake): a unit's own `bake`, else `deploy.bake`, else the
default for its kind; `bake` is deploy policy, never part of a unit's config hash; bad values
are refused naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from hxp.bake import bake_pause, bake_seconds, default_bake
from hxp.config import Document, build_config, unit_config_hash
from hxp.errors import InputError
from hxp.spec import HealthSpec, Stack


def data(**extra: Any) -> dict[str, Any]:
    return {
        "stack": "t",
        "hosts": {"local": {"backend": "process"}},
        "services": {
            "api": {
                "host": "local",
                "command": ["srv"],
                "health": {"tcp": {"port": 9000}, "interval": "4s"},
            },
            "bare": {"host": "local", "command": ["srv"]},
        },
        "models": {
            "chat": {
                "host": "local",
                "model": "org/m",
                "engine": "simulator",
                "health": {"http": {"url": "http://127.0.0.1:8000/health"}, "interval": "20s"},
            }
        },
        **extra,
    }


def stack(**extra: Any) -> Stack:
    return build_config([Document("stack.yaml", data(**extra))]).stack


def health(stack: Stack, unit: str) -> HealthSpec | None:
    return stack.unit(unit).health


def test_defaults_follow_the_kind_and_the_health_interval() -> None:
    s = stack()
    assert bake_seconds(s, "api", health(s, "api")) == 8.0  # 2 x 4s beats the 5s floor
    assert bake_seconds(s, "bare", None) == 10.0  # no checks: a 5s interval counts
    assert bake_seconds(s, "chat", health(s, "chat")) == 40.0  # 2 x 20s beats the 30s floor
    assert default_bake("service", HealthSpec(tcp={"port": 1}, interval=0.2)) == 5.0
    assert default_bake("model", HealthSpec(tcp={"port": 1}, interval=0.2)) == 30.0


def test_a_units_own_bake_wins_over_the_stacks_which_wins_over_the_default() -> None:
    s = stack(deploy={"bake": "3s"})
    assert bake_seconds(s, "api", health(s, "api")) == 3.0
    assert bake_seconds(s, "chat", health(s, "chat")) == 3.0
    d = data(deploy={"bake": "3s"})
    d["services"]["api"]["bake"] = "0s"
    d["models"]["chat"]["bake"] = "2m"
    s = build_config([Document("stack.yaml", d)]).stack
    assert bake_seconds(s, "api", health(s, "api")) == 0.0
    assert bake_seconds(s, "chat", health(s, "chat")) == 120.0
    assert bake_seconds(s, "bare", None) == 3.0


def test_a_units_bake_is_not_part_of_its_config_hash() -> None:
    before = stack()
    d = data()
    d["services"]["api"]["bake"] = "1m"
    after = build_config([Document("stack.yaml", d)]).stack
    assert unit_config_hash(after, "api") == unit_config_hash(before, "api")
    d["services"]["api"]["env"] = {"X": "1"}
    changed = build_config([Document("stack.yaml", d)]).stack
    assert unit_config_hash(changed, "api") != unit_config_hash(before, "api")


@pytest.mark.parametrize(
    ("where", "value", "path"),
    [
        ("deploy", "soon", "deploy.bake"),
        ("unit", "-1s", "services.api.bake"),
        ("deploy_key", "1s", "deploy.linger"),
    ],
)
def test_bad_bake_values_are_refused_naming_the_field(where: str, value: str, path: str) -> None:
    d = data()
    if where == "deploy":
        d["deploy"] = {"bake": value}
    elif where == "unit":
        d["services"]["api"]["bake"] = value
    else:
        d["deploy"] = {"linger": value}
    with pytest.raises(InputError) as info:
        build_config([Document("stack.yaml", d)])
    assert path in str(info.value)


def test_the_watch_looks_at_least_twice_a_second_and_never_past_the_window() -> None:
    assert bake_pause(HealthSpec(tcp={"port": 1}, interval=5.0), 10.0) == 0.5
    assert bake_pause(HealthSpec(tcp={"port": 1}, interval=0.2), 10.0) == 0.2
    assert bake_pause(None, 0.1) == 0.1
    assert bake_pause(None, -1.0) == 0.0
