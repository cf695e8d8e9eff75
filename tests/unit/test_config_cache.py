"""load_config_cached: one parse per content, HXP__ variables and overrides; a change: again."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hxp.config import load_config, load_config_cached
from hxp.errors import StackFileError

STACK = textwrap.dedent(
    """\
    stack: cached
    hosts:
      local: {backend: process}
    services:
      web:
        host: local
        command: [python3, -m, http.server, "8081"]
        ports: {http: 8081}
    """
)


def test_same_content_is_parsed_once(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(STACK)
    first = load_config_cached([path], {"PATH": "/bin"})
    # other variables do not matter; HXP__ ones and overrides do
    assert load_config_cached([path], {"HOME": "/root"}) is first
    assert load_config_cached([path], {}) is first
    assert load_config_cached([str(path)], {}) is first
    assert first.stack == load_config([path]).stack


def test_a_changed_file_env_or_override_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(STACK)
    first = load_config_cached([path])
    env = load_config_cached([path], {"HXP__services__web__replicas": "3"})
    assert env is not first
    assert env.stack.services["web"].replicas == 3
    override = load_config_cached([path], {}, ["services.web.replicas=2"])
    assert override.stack.services["web"].replicas == 2
    path.write_text(STACK.replace("stack: cached", "stack: changed"))
    assert load_config_cached([path]).stack.stack == "changed"
    path.write_text(STACK)
    assert load_config_cached([path]) is first  # the same content again


def test_errors_are_those_of_load_config(tmp_path: Path) -> None:
    with pytest.raises(StackFileError, match=r"missing\.yaml"):
        load_config_cached([tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(STACK.replace("stack: cached", "stack: [a"))
    for _ in range(2):  # a failed parse is not remembered: it fails again, the same way
        with pytest.raises(StackFileError, match=r"bad\.yaml"):
            load_config_cached([bad])
