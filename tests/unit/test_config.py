"""Layered configuration: merge order, provenance, overrides, migration, hashes, errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hxp.config import (
    ConfigSnapshot,
    build_config,
    config_hash,
    load_config,
    parse_document,
    read_document,
    unit_config_hash,
)
from hxp.errors import StackFileError, StackValidationError

BASE = textwrap.dedent(
    """\
    stack: demo
    hosts:
      local: {backend: process}
    services:
      cache:
        host: local
        command: [python3, -m, http.server, "8081"]
        ports: {http: 8081}
        env: {LOG_LEVEL: info, KEEP: "yes"}
        health:
          http: {url: "http://127.0.0.1:8081/"}
          interval: 2s
    monitoring:
      alertmanager:
        host: local
        receivers:
          - {name: ops, type: webhook, url: "http://127.0.0.1:9000/a"}
          - {name: dev, type: webhook, url: "http://127.0.0.1:9000/b"}
    """
)

PROD = textwrap.dedent(
    """\
    services:
      cache:
        replicas: 2
        env: {LOG_LEVEL: warning}
        health:
          interval: 5s
    monitoring:
      alertmanager:
        receivers:
          - {name: ops, type: webhook, url: "http://127.0.0.1:9000/prod"}
          - {name: page, type: email, to: oncall@example.com}
    """
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_later_file_wins_and_mappings_merge_deeply(tmp_path: Path) -> None:
    cfg = load_config([write(tmp_path, "base.yaml", BASE), write(tmp_path, "prod.yaml", PROD)])
    cache = cfg.stack.services["cache"]
    assert cache.replicas == 2
    assert cache.env == {"LOG_LEVEL": "warning", "KEEP": "yes"}
    assert cache.health is not None
    assert cache.health.interval == 5.0
    assert cache.health.http is not None  # kept from the base file
    assert cache.command == ["python3", "-m", "http.server", "8081"]


def test_named_lists_merge_by_name(tmp_path: Path) -> None:
    cfg = load_config([write(tmp_path, "base.yaml", BASE), write(tmp_path, "prod.yaml", PROD)])
    assert cfg.stack.monitoring is not None
    assert cfg.stack.monitoring.alertmanager is not None
    receivers = {r.name: r for r in cfg.stack.monitoring.alertmanager.receivers}
    assert list(receivers) == ["ops", "dev", "page"]
    assert receivers["ops"].url == "http://127.0.0.1:9000/prod"
    assert receivers["dev"].url == "http://127.0.0.1:9000/b"


def test_unnamed_list_is_replaced_whole(tmp_path: Path) -> None:
    over = "services:\n  cache:\n    command: [python3, -m, http.server, '9999']\n"
    cfg = load_config([write(tmp_path, "b.yaml", BASE), write(tmp_path, "o.yaml", over)])
    assert cfg.stack.services["cache"].command == ["python3", "-m", "http.server", "9999"]


def test_precedence_files_then_env_then_set(tmp_path: Path) -> None:
    files = [write(tmp_path, "base.yaml", BASE), write(tmp_path, "prod.yaml", PROD)]
    env = {"HXP__services__cache__replicas": "3", "HXP__services__cache__env__KEEP": "env"}
    cfg = load_config(files, env, ["services.cache.replicas=4"])
    cache = cfg.stack.services["cache"]
    assert cache.replicas == 4  # --set beats the environment
    assert cache.env["KEEP"] == "env"  # the environment beats the files
    prov = dict((p, o) for p, _, o in cfg.provenance_rows())
    assert prov["services.cache.replicas"] == "--set services.cache.replicas"
    assert prov["services.cache.env.KEEP"] == "env HXP__services__cache__env__KEEP"


def test_provenance_names_file_and_line(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", BASE)
    prod = write(tmp_path, "prod.yaml", PROD)
    cfg = load_config([base, prod])
    prov = dict((p, o) for p, _, o in cfg.provenance_rows())
    assert prov["stack"] == f"{base}:1"
    assert prov["services.cache.replicas"] == f"{prod}:3"
    assert prov["services.cache.env.KEEP"] == f"{base}:9"
    assert prov["services.cache.env.LOG_LEVEL"] == f"{prod}:4"
    assert prov["monitoring.alertmanager.receivers.ops.url"] == f"{prod}:10"
    assert prov["monitoring.alertmanager.receivers.dev.url"] == f"{base}:18"
    assert prov["services.cache.restart"] == "default"


def test_set_addresses_named_list_items_by_name(tmp_path: Path) -> None:
    cfg = load_config(
        [write(tmp_path, "b.yaml", BASE)],
        overrides=["monitoring.alertmanager.receivers.dev.url=http://127.0.0.1:1/x"],
    )
    assert cfg.stack.monitoring is not None
    assert cfg.stack.monitoring.alertmanager is not None
    dev = next(r for r in cfg.stack.monitoring.alertmanager.receivers if r.name == "dev")
    assert dev.url == "http://127.0.0.1:1/x"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("services.cache.replicas=two", "services.cache.replicas"),
        ("monitoring.alertmanager.receivers.nope.url=http://x/", "no item named 'nope'"),
        ("services.cache.command.x=1", "cannot set a key inside a list"),
        ("novalue", "must look like path.to.key=value"),
        ("services.cache.bogus=1", "services.cache.bogus: unknown key"),
    ],
)
def test_bad_override_names_the_field(tmp_path: Path, override: str, expected: str) -> None:
    with pytest.raises(StackValidationError) as err:
        load_config([write(tmp_path, "b.yaml", BASE)], overrides=[override])
    assert expected in str(err.value)


def test_validation_error_names_file_line_and_field(tmp_path: Path) -> None:
    bad = BASE.replace("interval: 2s", "interval: soon")
    path = write(tmp_path, "stack.yaml", bad)
    with pytest.raises(StackValidationError) as err:
        load_config([path])
    assert f"{path}:12 services.cache.health.interval: invalid duration 'soon'" in str(err.value)


def test_env_override_error_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(StackValidationError) as err:
        load_config(
            [write(tmp_path, "b.yaml", BASE)], {"HXP__services__cache__health__timeout": "later"}
        )
    assert "env HXP__services__cache__health__timeout services.cache.health.timeout" in str(
        err.value
    )


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "s.yaml", "stack: demo\nhosts:\n  local: {backend: process\n")
    with pytest.raises(StackFileError) as err:
        read_document(path)
    assert str(err.value).startswith(f"{path}:")
    assert "YAML syntax error" in str(err.value)


def test_duplicate_key_is_an_error_with_both_lines() -> None:
    with pytest.raises(StackFileError) as err:
        parse_document("stack: a\nhosts: {}\nstack: b\n", "s.yaml")
    assert "s.yaml:3 stack: duplicate key 'stack' (first defined on line 1)" in str(err.value)


def test_alias_bomb_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    with pytest.raises(StackFileError) as err:
        parse_document("\n".join(lines), "bomb.yaml")
    assert "too large" in str(err.value)


def test_yaml_merge_keys_are_supported() -> None:
    doc = parse_document("base: &b {a: 1, b: 2}\nother:\n  <<: *b\n  b: 3\n", "m.yaml")
    assert doc.data["other"] == {"a": 1, "b": 3}


V1 = textwrap.dedent(
    """\
    version: 1
    stack: old
    hosts:
      local: {type: process}
    services:
      - name: web
        host: local
        command: [python3, -m, http.server]
        healthcheck:
          tcp: {port: 8000}
          interval: soon
    """
)


def test_version_1_is_migrated_with_notices_and_keeps_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "old.yaml", V1)
    with pytest.raises(StackValidationError) as err:
        load_config([path])
    # The line of a migrated value still points into the original file.
    assert f"{path}:11 services.web.health.interval" in str(err.value)
    cfg = load_config([write(tmp_path, "ok.yaml", V1.replace("soon", "2s"))])
    assert cfg.stack.version == 2
    assert cfg.stack.hosts["local"].backend == "process"
    assert cfg.stack.services["web"].health is not None
    assert any("migrated from format version 1 to 2" in n for n in cfg.notices)
    assert any("healthcheck renamed to health" in n for n in cfg.notices)


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StackFileError) as err:
        load_config([write(tmp_path, "n.yaml", "version: 9\n" + BASE)])
    assert "newer than this hxp supports" in str(err.value)
    assert ":1 version:" in str(err.value)


def test_content_hash_is_independent_of_file_layout(tmp_path: Path) -> None:
    one = load_config([write(tmp_path, "b.yaml", BASE)], overrides=["services.cache.replicas=2"])
    split = load_config(
        [
            write(tmp_path, "b2.yaml", BASE),
            write(tmp_path, "o.yaml", "services: {cache: {replicas: 2}}"),
        ]
    )
    assert one.content_hash == split.content_hash
    other = load_config([write(tmp_path, "b3.yaml", BASE)])
    assert other.content_hash != one.content_hash
    assert config_hash(one.stack) == one.content_hash


def test_unit_hash_changes_only_for_that_unit(tmp_path: Path) -> None:
    text = BASE + "  \n"
    two = text.replace(
        "monitoring:",
        "  db:\n    host: local\n    command: [python3]\nmonitoring:",
    )
    a = load_config([write(tmp_path, "a.yaml", two)])
    b = load_config([write(tmp_path, "b.yaml", two)], overrides=["services.db.replicas=2"])
    assert unit_config_hash(a.stack, "cache") == unit_config_hash(b.stack, "cache")
    assert unit_config_hash(a.stack, "db") != unit_config_hash(b.stack, "db")


def test_snapshot_restores_the_same_stack(tmp_path: Path) -> None:
    cfg = load_config([write(tmp_path, "b.yaml", BASE)])
    snap = ConfigSnapshot.of(cfg)
    assert snap.content_hash == cfg.content_hash
    assert snap.restore() == cfg.stack
    assert config_hash(snap.restore()) == cfg.content_hash


def test_no_files_is_an_input_error() -> None:
    with pytest.raises(StackFileError):
        load_config([])


def test_build_config_from_documents_without_files() -> None:
    doc = parse_document(BASE, "<memory>")
    cfg = build_config([doc])
    assert cfg.sources == ("<memory>",)
    assert cfg.stack.stack == "demo"


def test_a_field_added_later_at_its_default_leaves_the_unit_hash_alone() -> None:
    """Upgrading hxp must not make deployed units look changed: `simulator_gpus` (added after
    0.1.0) counts only when set. The pinned hash is the one 0.1.0 gave this model."""
    import hashlib
    import json

    from tests.support.render_data import stack_from_data

    data = {
        "version": 2,
        "stack": "s",
        "hosts": {"gpu": {}},
        "models": {"chat": {"host": "gpu", "model": "org/m-1B", "engine": "simulator"}},
    }
    stack = stack_from_data(data)
    fields = stack.unit("chat").model_dump(mode="json")
    del fields["simulator_gpus"]
    del fields["pin_kv_cache_memory"]  # added later still (issue 17), hash-neutral too
    del fields["hf_config"]  # likewise
    del fields["autoscale"]  # likewise (the autoscaler's settings never count)
    del fields["sleep_mode"]  # likewise (issue 17, sleep mode): counts only when true
    del fields["part_of"]  # added later (a unit on several hosts): never counts
    before = {"unit": fields, "host": stack.hosts["gpu"].model_dump(mode="json")}
    assert (
        unit_config_hash(stack, "chat")
        == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    )
    data["models"]["chat"]["simulator_gpus"] = 1  # type: ignore[index]
    assert unit_config_hash(stack_from_data(data), "chat") != unit_config_hash(stack, "chat")
