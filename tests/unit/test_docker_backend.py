"""The docker backend's pure parts: create arguments, healthchecks, and reading inspected state."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from hxp.backends.base import (
    LABEL_CONFIG_HASH,
    LABEL_INSTANCE,
    LABEL_REVISION,
    LABEL_STACK,
    LABEL_UNIT,
    Backend,
)
from hxp.backends.docker import (
    RUN_SLACK,
    DockerBackend,
    container_name,
    create_kwargs,
    healthcheck,
    observed_from_attrs,
    parse_docker_time,
    previous_name,
    restart_policy,
    run_since,
)
from hxp.config import build_config, parse_document
from hxp.errors import BackendError
from hxp.spec import HealthSpec, HostSpec
from hxp.units import UnitInstance, expand_units

STACK = """
stack: demo
hosts:
  box: {backend: docker}
services:
  web:
    host: box
    image: local/web:1
    command: [python3, -m, http.server, "{port.http}", --bind, 127.0.0.1]
    ports: {http: 8080}
    env: {GREETING: hello}
    uid: 4242
    restart: always
    stop_timeout: 3s
    workdir: /srv
    volumes:
      - {name: data, target: /data}
      - {name: conf, target: /etc/web, read_only: true}
    resources: {memory: 512MiB, cpus: 1.5}
    health:
      http: {url: "http://127.0.0.1:8080/"}
      interval: 500ms
      timeout: 2s
      retries: 4
      start_period: 1m
  plain:
    host: box
    image: local/plain:1
models:
  llm:
    host: box
    model: org/model
    gpus: [2, 3]
    replicas: 2
    vllm: {tensor_parallel_size: 1}
    env: {HF_HOME: /cache}
  auto:
    host: box
    model: org/other
    port: 9000
    vllm: {tensor_parallel_size: 2}
"""


def units(text: str = STACK) -> dict[str, UnitInstance]:
    stack = build_config([parse_document(text, "stack.yaml")]).stack
    return {u.name: u for u in expand_units(stack)}


# ---------------------------------------------------------------- healthcheck


@pytest.mark.parametrize(
    ("health", "test"),
    [
        pytest.param(
            {"command": ["pg_isready", "-q"]},
            ["CMD", "pg_isready", "-q"],
            id="command-exec-form",
        ),
        pytest.param(
            {"http": {"url": "http://127.0.0.1:8000/health"}},
            [
                "CMD-SHELL",
                "{ wget -q -O /dev/null http://127.0.0.1:8000/health"
                " || curl -fsS -o /dev/null http://127.0.0.1:8000/health; }",
            ],
            id="http-wget-or-curl",
        ),
        pytest.param(
            {"tcp": {"port": 6379}},
            [
                "CMD-SHELL",
                "{ nc -z 127.0.0.1 6379 2>/dev/null || nc 127.0.0.1 6379 -e true; }",
            ],
            id="tcp-nc-z-or-busybox-nc",
        ),
        pytest.param(
            {"tcp": {"host": "localhost", "port": 1}, "command": ["check", "it's; rm -rf /"]},
            [
                "CMD-SHELL",
                "{ nc -z localhost 1 2>/dev/null || nc localhost 1 -e true; }"
                " && check 'it'\"'\"'s; rm -rf /'",
            ],
            id="all-must-pass-hostile-arg-quoted",
        ),
    ],
)
def test_healthcheck_test(health: dict[str, Any], test: list[str]) -> None:
    assert healthcheck(HealthSpec.model_validate(health))["test"] == test


def test_healthcheck_durations_are_nanoseconds() -> None:
    spec = HealthSpec.model_validate(
        {"tcp": {"port": 1}, "interval": "500ms", "timeout": "2s", "start_period": "1m"}
    )
    check = healthcheck(spec)
    assert check["interval"] == 500_000_000
    assert check["timeout"] == 2_000_000_000
    assert check["start_period"] == 60_000_000_000
    assert check["retries"] == 3


def test_http_healthcheck_quotes_the_url() -> None:
    spec = HealthSpec.model_validate({"http": {"url": "http://h:1/a?x=1&y=$(reboot)"}})
    shell = healthcheck(spec)["test"][1]
    assert "'http://h:1/a?x=1&y=$(reboot)'" in shell
    assert " http://h:1/a?x" not in shell


# ---------------------------------------------------------------- create arguments


def test_create_kwargs_for_a_service() -> None:
    kwargs = create_kwargs(units()["web"], "abc123", 7)
    health = kwargs.pop("healthcheck")
    assert health["retries"] == 4
    assert health["start_period"] == 60_000_000_000
    assert kwargs == {
        "image": "local/web:1",
        "name": "hxp-demo-web",
        "command": ["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1"],
        "environment": {"GREETING": "hello"},
        "user": "4242:4242",
        "network_mode": "host",
        "init": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "restart_policy": {"Name": "always"},
        "labels": {
            LABEL_STACK: "demo",
            LABEL_UNIT: "web",
            LABEL_INSTANCE: "web",
            LABEL_CONFIG_HASH: "abc123",
            LABEL_REVISION: "7",
            "hxp.stop-timeout": "3",
            "hxp.restart": "always",
        },
        "working_dir": "/srv",
        "volumes": {
            "hxp-demo-web-data": {"bind": "/data", "mode": "rw"},
            "hxp-demo-web-conf": {"bind": "/etc/web", "mode": "ro"},
        },
        "mem_limit": 512 * 1024**2,
        "nano_cpus": 1_500_000_000,
    }


def test_a_service_without_command_keeps_the_image_command() -> None:
    kwargs = create_kwargs(units()["plain"], "h", 1)
    assert "command" not in kwargs
    assert "healthcheck" not in kwargs
    assert "device_requests" not in kwargs
    assert kwargs["user"] == "10001:10001"
    assert kwargs["restart_policy"] == {"Name": "on-failure", "MaximumRetryCount": 5}


def test_model_replicas_get_their_own_gpus_as_device_requests() -> None:
    all_units = units()
    for replica, gpu in (("llm-0", "2"), ("llm-1", "3")):
        kwargs = create_kwargs(all_units[replica], "h", 1)
        # The operator's HF_HOME wins; HOME points at the model's cache volume.
        assert kwargs["environment"] == {"HF_HOME": "/cache", "HOME": "/var/cache/hxp"}
        assert kwargs["volumes"]["hxp-demo-llm-cache"] == {"bind": "/var/cache/hxp", "mode": "rw"}
        assert "CUDA_VISIBLE_DEVICES" not in kwargs["environment"]
        [request] = kwargs["device_requests"]
        assert request["DeviceIDs"] == [gpu]
        assert request["Capabilities"] == [["gpu"]]
        assert kwargs["image"] == "vllm/vllm-openai:v0.11.0"
        assert kwargs["entrypoint"] == ["vllm", "serve"]
        assert kwargs["command"][:2] == ["org/model", "--served-model-name"]
        assert kwargs["labels"][LABEL_INSTANCE] == replica
        assert kwargs["labels"][LABEL_UNIT] == "llm"
        assert kwargs["name"] == f"hxp-demo-{replica}"
        assert kwargs["ipc_mode"] == "host"
        assert kwargs["healthcheck"]["test"][0] == "CMD-SHELL"


def test_auto_gpus_become_a_device_count() -> None:
    [request] = create_kwargs(units()["auto"], "h", 1)["device_requests"]
    assert request["Count"] == 2
    assert not request["DeviceIDs"]
    assert request["Capabilities"] == [["gpu"]]


def test_secret_env_is_refused_rather_than_dropped() -> None:
    text = STACK.replace("    env: {GREETING: hello}\n", "    secret_env: {TOKEN: api-token}\n")
    with pytest.raises(BackendError, match="secret_env") as info:
        create_kwargs(units(text)["web"], "h", 1)
    assert not info.value.transient


def test_restart_policies() -> None:
    assert restart_policy("no") == {"Name": "no"}
    assert restart_policy("always") == {"Name": "always"}
    assert restart_policy("on-failure") == {"Name": "on-failure", "MaximumRetryCount": 5}


# ---------------------------------------------------------------- inspected state

RUNNING: dict[str, Any] = {
    "Name": "/hxp-demo-web",
    "RestartCount": 0,
    "Config": {
        "Labels": {
            LABEL_STACK: "demo",
            LABEL_UNIT: "web",
            LABEL_INSTANCE: "web",
            LABEL_CONFIG_HASH: "abc123",
            LABEL_REVISION: "7",
        },
        "Healthcheck": {"Test": ["CMD", "true"]},
    },
    "State": {
        "Status": "running",
        "Running": True,
        "ExitCode": 0,
        "Error": "",
        "Health": {"Status": "healthy", "FailingStreak": 0},
    },
}


def attrs(**state: Any) -> dict[str, Any]:
    out = copy.deepcopy(RUNNING)
    out["State"].update(state)
    return out


def test_a_healthy_running_container() -> None:
    seen = observed_from_attrs(RUNNING, "box")
    assert seen is not None
    assert (seen.name, seen.exists, seen.running, seen.healthy) == ("web", True, True, True)
    assert (seen.config_hash, seen.revision, seen.host) == ("abc123", 7, "box")
    assert seen.detail == "running, health healthy"


@pytest.mark.parametrize(
    ("health", "healthy"),
    [("healthy", True), ("unhealthy", False), ("starting", None)],
)
def test_docker_health_status_maps_to_healthy(health: str, healthy: bool | None) -> None:
    seen = observed_from_attrs(attrs(Health={"Status": health}), "box")
    assert seen is not None
    assert seen.running
    assert seen.healthy is healthy


def test_without_healthcheck_running_means_healthy() -> None:
    data = attrs()
    del data["State"]["Health"]
    seen = observed_from_attrs(data, "box")
    assert seen is not None
    assert seen.healthy is True
    assert seen.detail == "running"


def test_an_exited_container_reports_its_exit_code_and_restarts() -> None:
    data = attrs(Status="exited", Running=False, ExitCode=1, Health={"Status": "unhealthy"})
    data["RestartCount"] = 5
    seen = observed_from_attrs(data, "box")
    assert seen is not None
    assert not seen.running
    assert seen.healthy is False
    assert seen.detail == "exited, health unhealthy, exit code 1, restarts 5"


def test_a_runtime_error_is_in_the_detail() -> None:
    data = attrs(Status="created", Running=False, Error="exec: nope: not found")
    del data["State"]["Health"]
    seen = observed_from_attrs(data, "box")
    assert seen is not None
    assert seen.detail == "created, error: exec: nope: not found"


def test_the_kept_previous_version_is_not_an_instance() -> None:
    data = attrs()
    data["Name"] = "/" + previous_name("demo", "web")
    assert observed_from_attrs(data, "box") is None


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param({}, id="unlabelled"),
        pytest.param({LABEL_STACK: "demo"}, id="no-instance"),
        # stack "demo" + instance "web" and stack "demo-web" + instance ... share no name:
        pytest.param({LABEL_STACK: "demo-web", LABEL_INSTANCE: "x"}, id="other-name"),
    ],
)
def test_foreign_containers_are_ignored(labels: dict[str, str]) -> None:
    data = attrs()
    data["Config"]["Labels"] = labels
    assert observed_from_attrs(data, "box") is None


def test_an_unparseable_revision_is_none() -> None:
    data = attrs()
    data["Config"]["Labels"][LABEL_REVISION] = "x"
    seen = observed_from_attrs(data, "box")
    assert seen is not None
    assert seen.revision is None


def test_names() -> None:
    assert container_name("demo", "web-1") == "hxp-demo-web-1"
    assert previous_name("demo", "web-1") == "hxp-demo-web-1-prev"


# ---------------------------------------------------------------- construction


def test_the_backend_connects_lazily(tmp_path: Any) -> None:
    backend = DockerBackend("box", HostSpec(backend="docker"), tmp_path)
    assert isinstance(backend, Backend)
    assert backend.kind == "docker"
    assert backend._docker is None


def test_an_unreachable_engine_is_a_transient_error_naming_the_host(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    backend = DockerBackend("gpu-7", HostSpec(backend="docker"), tmp_path)
    with pytest.raises(BackendError, match="gpu-7") as info:
        backend.observe("demo")
    assert info.value.transient


def test_an_engine_never_reached_is_not_waited_for(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an engine this process reached before is waited for (its daemon restarting)."""
    import time

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/never.sock")
    started = time.monotonic()
    with pytest.raises(BackendError, match="cannot reach Docker") as info:
        DockerBackend("fresh", HostSpec(backend="docker"), tmp_path).observe("demo")
    assert "waited" not in str(info.value)
    assert time.monotonic() - started < 5


def test_docker_exec_hosts_are_refused(tmp_path: Any) -> None:
    host = HostSpec(backend="docker", runner="docker-exec", container="box")
    with pytest.raises(BackendError, match="docker-exec") as info:
        DockerBackend("box", host, tmp_path).observe("demo")
    assert not info.value.transient


def test_secret_values_go_into_the_container_environment_only() -> None:
    text = STACK.replace("    env: {GREETING: hello}\n", "    secret_env: {TOKEN: api-token}\n")
    kwargs = create_kwargs(units(text)["web"], "h", 1, {"TOKEN": "s3cr3t", "OTHER": "unused"})
    assert kwargs["environment"] == {"TOKEN": "s3cr3t"}  # what the unit asks for, no more
    rest = {k: v for k, v in kwargs.items() if k != "environment"}
    assert "s3cr3t" not in repr(rest)  # not in labels, command, healthcheck, ...


# ---------------------------------------------------------------- where the current run starts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-04T16:17:02.433904835Z", 1796401022.433904835),
        ("2026-12-04T16:17:02Z", 1796401022.0),
        ("1970-01-01T00:00:01.5Z", None),
        ("0001-01-01T00:00:00Z", None),  # Docker's zero time: never started
        ("", None),
        ("yesterday", None),
    ],
)
def test_parse_docker_time(text: str, expected: float | None) -> None:
    near = pytest.approx(expected, rel=0, abs=1e-5) if expected else None
    assert parse_docker_time(text) == near


def test_the_current_run_starts_just_before_started_at() -> None:
    # Docker stamps StartedAt a few ms after the program's first line (measured: 1.6 ms on
    # an idle engine) and restarts a crashed container after 100 ms at the soonest.
    since = run_since(
        {"StartedAt": "2026-12-04T16:17:02.433904835Z", "FinishedAt": "0001-01-01T00:00:00Z"}
    )
    assert since == pytest.approx(1796401022.433904835 - RUN_SLACK, rel=0, abs=1e-5)
    assert 0.0 < RUN_SLACK <= 0.1
    assert run_since({"StartedAt": "0001-01-01T00:00:00Z"}) is None  # created, never started
    assert run_since({}) is None
