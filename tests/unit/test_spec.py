"""Field validation of the stack format: names, durations, sizes, ports, URLs, argv, env."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from hxp.spec import Stack, format_duration, format_size, parse_duration, parse_size


def stack(**service: Any) -> dict[str, Any]:
    svc = {"host": "local", "command": ["python3"], **service}
    return {"stack": "demo", "hosts": {"local": {"backend": "process"}}, "services": {"web": svc}}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2), ("5m", 300), ("1h", 3600), ("1d", 86400), ("1.5s", 1.5), (3, 3)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-1s", "5 parsecs", "1w", "", True, "1s2s", "9999999d"])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [0, 0.5, 2, 90, 300, 3600, 86400, 0.25])
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MiB", 512 * 2**20), ("80GiB", 80 * 2**30), ("1GB", 10**9), ("1.5GiB", 3 * 2**29)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("text", ["lots", "-5GiB", "0", "5 gigs", "1e9"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    "name",
    [
        "a\nb",
        "web\n",
        "; rm -rf /",
        "../etc",
        "a/b",
        "Web",
        "-web",
        "web-",
        "a" * 64,
        "a b",
        "a.b",
        "$(id)",
        "web;",
        "",
        "ümlaut",
    ],
)
def test_hostile_unit_names_are_rejected(name: str) -> None:
    data = stack()
    data["services"] = {name: data["services"]["web"]}
    with pytest.raises(ValidationError):
        Stack.model_validate(data)


@pytest.mark.parametrize("name", ["a", "web", "gpu-01", "a" * 63, "0x"])
def test_good_names(name: str) -> None:
    data = stack()
    data["services"] = {name: data["services"]["web"]}
    assert name in Stack.model_validate(data).services


@pytest.mark.parametrize("port", [0, 65536, -1, "80", 8080.5, True])
def test_bad_ports(port: Any) -> None:
    with pytest.raises(ValidationError):
        Stack.model_validate(stack(ports={"http": port}))


@pytest.mark.parametrize(
    "url",
    ["ftp://x/", "http://", "http:///path", "http://a b/", "http://x:99999/", "x", "http://x/\n"],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValidationError):
        Stack.model_validate(stack(health={"http": {"url": url}}))


@pytest.mark.parametrize(
    "env",
    [{"A": "x\ny"}, {"A": "x\r"}, {"A B": "x"}, {"A=B": "x"}, {"1A": "x"}, {"A": "nul\x00"}],
)
def test_bad_env(env: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        Stack.model_validate(stack(env=env))


def test_env_scalars_become_strings_and_shell_characters_are_kept() -> None:
    s = Stack.model_validate(stack(env={"N": 3, "B": True, "S": "; rm -rf / $(id) `x`"}))
    assert s.services["web"].env == {"N": "3", "B": "true", "S": "; rm -rf / $(id) `x`"}


@pytest.mark.parametrize("argv", [[], [""], ["a\nb"], "python3 -m http.server"])
def test_bad_argv(argv: Any) -> None:
    with pytest.raises(ValidationError):
        Stack.model_validate(stack(command=argv))


def test_empty_argument_after_the_program_is_allowed() -> None:
    s = Stack.model_validate(stack(command=["redis-server", "--save", ""]))
    assert s.services["web"].command == ["redis-server", "--save", ""]


def test_models_are_frozen_and_forbid_extra_keys() -> None:
    s = Stack.model_validate(stack())
    with pytest.raises(ValidationError):
        s.services["web"].replicas = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs"):
        Stack.model_validate(stack(replica=2))


def test_references_are_checked_across_services_and_models() -> None:
    data = stack(depends_on=["chat"])
    data["models"] = {"chat": {"host": "local", "model": "org/m", "depends_on": ["ghost"]}}
    with pytest.raises(ValidationError) as err:
        Stack.model_validate(data)
    assert "models.chat.depends_on: unknown unit 'ghost'" in str(err.value)


def test_port_ranges_of_replicas_may_not_overlap() -> None:
    data = stack(ports={"http": 8000}, replicas=2)
    data["services"]["api"] = {"host": "local", "command": ["x"], "ports": {"http": 8001}}
    with pytest.raises(ValidationError, match="port 8001 on host 'local' already used"):
        Stack.model_validate(data)
