"""The generated alert rules under `promtool test rules`, a Prometheus that refuses a bad
reload, and the simulator's served /metrics matching what the query lint knows of it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from hxp.config import load_config
from hxp.errors import MonitoringError
from hxp.io.monitoring import LifecycleApi, install_files, prometheus_config_text
from hxp.monitoring import (
    ALERT_RULES,
    PROMETHEUS_CONFIG,
    MonitoringFile,
    all_alert_names,
    config_files,
)
from hxp.querylint import exposition_series, simulator_source
from hxp.spec import Stack
from tasks.monitoring import RenderedMonitoring, reload_or_restore, validate_monitoring
from tests.support.monitoring import monitored_stack
from tests.support.stacks import free_port

pytestmark = pytest.mark.slow
DATA = Path(__file__).parents[1] / "data" / "monitoring"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing")


def rules_stack() -> Stack:
    return load_config([DATA / "rules-stack.yaml"], environ={}).stack


def _cases() -> dict[str, dict[str, list[str]]]:
    """alertname -> {"firing": [test names], "quiet": [test names]} from rules_test.yml."""
    doc = yaml.safe_load((DATA / "rules_test.yml").read_text())
    out: dict[str, dict[str, list[str]]] = {}
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            kind = "firing" if case.get("exp_alerts") else "quiet"
            out.setdefault(case["alertname"], {"firing": [], "quiet": []})[kind].append(
                test["name"]
            )
    return out


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = _cases()
    for name in all_alert_names(rules_stack()):
        assert cases.get(name, {}).get("firing"), f"{name}: no promtool case where it fires"
        assert cases.get(name, {}).get("quiet"), f"{name}: no promtool case where it is quiet"


@needs_promtool
def test_promtool_rule_tests_pass(tmp_path: Path) -> None:
    files = config_files(rules_stack())
    install_files(tmp_path, files)
    rules_dir = (tmp_path / ALERT_RULES).parent
    shutil.copy(DATA / "rules_test.yml", rules_dir / "rules_test.yml")
    out = subprocess.run(
        ["promtool", "test", "rules", "rules_test.yml"],
        cwd=rules_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_rule_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """The cases are not vacuous: a different queue threshold makes them fail."""
    stack = rules_stack()
    assert stack.monitoring is not None
    alerts = stack.monitoring.alerts.model_copy(update={"queue_waiting": 50})
    monitoring = stack.monitoring.model_copy(update={"alerts": alerts})
    install_files(tmp_path, config_files(stack.model_copy(update={"monitoring": monitoring})))
    rules_dir = (tmp_path / ALERT_RULES).parent
    shutil.copy(DATA / "rules_test.yml", rules_dir / "rules_test.yml")
    out = subprocess.run(
        ["promtool", "test", "rules", "rules_test.yml"],
        cwd=rules_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0
    assert "HxpVllmQueueSaturated" in out.stdout + out.stderr


@needs_promtool
def test_validation_refuses_a_config_promtool_rejects(tmp_path: Path) -> None:
    from prefect.logging import disable_run_logger

    stack = load_config([monitored_stack(tmp_path, "http://127.0.0.1:9/")[0]], environ={}).stack
    files = [
        MonitoringFile(f.path, f.content + "scrape_configs: oops\n", f.mode)
        if f.path == PROMETHEUS_CONFIG
        else f
        for f in config_files(stack)
    ]
    with disable_run_logger(), pytest.raises(MonitoringError, match="promtool check config"):
        validate_monitoring.fn(stack, RenderedMonitoring(files))


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[LifecycleApi, Path, Stack]]:
    """A real Prometheus (with --web.enable-lifecycle) on the monitored test stack's config."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus missing")
    path, ports = monitored_stack(tmp_path, "http://127.0.0.1:9/")
    stack = load_config([path], environ={}).stack
    root = tmp_path / "mon"
    install_files(root, config_files(stack))
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={root / PROMETHEUS_CONFIG}",
            f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            "--web.enable-lifecycle",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = LifecycleApi(f"http://127.0.0.1:{ports['prometheus']}", "prometheus")
    deadline = time.monotonic() + 20
    while not api.ready() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        yield api, root, stack
    finally:
        proc.terminate()
        proc.wait(10)


def test_rejected_reload_keeps_the_old_config(prometheus) -> None:  # type: ignore[no-untyped-def]
    api, root, _stack = prometheus
    before = prometheus_config_text(api)
    good = (root / PROMETHEUS_CONFIG).read_text()
    # A config that parses as YAML but that Prometheus refuses (two jobs of one name).
    doc = yaml.safe_load(good)
    doc["scrape_configs"].append(dict(doc["scrape_configs"][0]))
    install = install_files(root, [MonitoringFile(PROMETHEUS_CONFIG, yaml.safe_dump(doc))])
    with pytest.raises(MonitoringError) as err:
        reload_or_restore(api, install)
    message = str(err.value)
    assert "rejected the new config (HTTP 500)" in message
    assert "found multiple scrape configs with job name" in message
    assert "keeps running on its old config" in message
    assert (root / PROMETHEUS_CONFIG).read_text() == good  # the file is back
    assert prometheus_config_text(api) == before  # the server never took the bad one
    assert api.ready()

    # A good change is applied in place.
    doc = yaml.safe_load(good)
    doc["global"]["scrape_interval"] = "2s"
    install = install_files(root, [MonitoringFile(PROMETHEUS_CONFIG, yaml.safe_dump(doc))])
    reload_or_restore(api, install)
    assert "scrape_interval: 2s" in prometheus_config_text(api)


def test_simulator_lint_source_matches_its_served_metrics(tmp_path: Path) -> None:
    """The lint renders the simulator's registry in-process; it equals what /metrics serves."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hxp.sim.vllm", "--port", str(port), "--model", "m/x"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert text, "the simulator never served /metrics"
        served = {n for n in exposition_series(text) if n.startswith("vllm:")}
        known = {n for n in simulator_source().series if n.startswith("vllm:")}
        assert served == known
        assert "vllm:num_preemptions_total" in served
        assert "vllm:num_preemptions" not in served
    finally:
        proc.terminate()
        proc.wait(10)


@needs_promtool
def test_hxp_render_monitoring_runs_the_validators(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hxp_cli import main

    root = Path(__file__).parents[2]
    code = main(
        [
            "render",
            "-f",
            str(root / "examples" / "gpu-fleet" / "stack.yaml"),
            "--target",
            "monitoring",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    for check in ("promtool check config", "amtool check-config", "dashboard queries parse"):
        assert f"passed {check}" in out or f"passed promtool: {check}" in out, out
    assert (tmp_path / "alertmanager" / "alertmanager.yml").stat().st_mode & 0o077 == 0
