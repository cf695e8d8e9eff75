"""The vLLM launch builder: argv per target and per pinned version, and the flag table."""

from __future__ import annotations

from typing import Any

import pytest

from hxp.errors import StackValidationError
from hxp.render import render_stack
from hxp.spec import ModelSpec
from hxp.units import expand_units
from hxp.vllm import (
    FLAG_TABLE,
    check_extra_args,
    parse_version,
    replica_gpus,
    vllm_args,
    vllm_launch,
    vllm_program,
)
from tests.support.render_data import HOSTILE_VALUES, stack_from_data


def model(**changes: Any) -> ModelSpec:
    data: dict[str, Any] = {"host": "gpu", "model": "org/model", "gpus": [0]}
    vllm = changes.pop("vllm", {})
    data.update(changes)
    data["vllm"] = {"tensor_parallel_size": 1, **vllm}
    return ModelSpec.model_validate(data)


def flags_of(argv: tuple[str, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[arg] = nxt if nxt is not None and not nxt.startswith("--") else None
    return out


@pytest.mark.parametrize(
    ("python", "program"),
    [
        ("python3", "vllm"),
        ("/opt/vllm/.venv/bin/python", "/opt/vllm/.venv/bin/vllm"),
        ("/usr/bin/python3.12", "/usr/bin/vllm"),
        ("venv/bin/python", "venv/bin/vllm"),
    ],
)
def test_the_vllm_script_sits_next_to_the_models_python(python: str, program: str) -> None:
    assert vllm_program(python) == program
    launch = vllm_launch(model(python=python), "chat", 8000)
    assert launch.host_argv[:3] == (program, "serve", "org/model")


def test_serve_form_for_hosts_and_the_image() -> None:
    launch = vllm_launch(model(revision="abc", served_name="c"), "chat", 8001)
    assert launch.host_argv == ("vllm", "serve", *launch.container_args)
    assert launch.container_entrypoint == ("vllm", "serve")
    assert launch.container_args[0] == "org/model"
    assert "--model" not in launch.container_args  # `vllm serve --model` is deprecated
    flags = flags_of(launch.container_args)
    assert flags["--revision"] == "abc"
    assert flags["--served-model-name"] == "c"
    assert flags["--port"] == "8001"
    assert flags["--host"] == "0.0.0.0"
    assert flags["--tensor-parallel-size"] == "1"
    assert flags["--gpu-memory-utilization"] == "0.9"
    assert "--disable-log-requests" not in flags  # off by default since 0.10.1


def test_versions_before_vllm_serve_use_the_api_server_module_and_model_flag() -> None:
    launch = vllm_launch(model(python="/v/bin/python", vllm={"version": "0.5.0"}), "chat", 8000)
    assert launch.host_argv[:5] == (
        "/v/bin/python",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "org/model",
    )
    assert launch.container_entrypoint is None  # the image's own: the api_server module
    assert launch.container_args[:2] == ("--model", "org/model")


@pytest.mark.parametrize(
    ("version", "emitted"),
    [("0.9.2", True), ("0.10.0", True), ("0.10.1", False), ("0.11.0", False), ("0.18.1", False)],
)
def test_request_logging_is_off_on_every_version(version: str, emitted: bool) -> None:
    args = vllm_launch(model(vllm={"version": version}), "chat", 8000).container_args
    assert ("--disable-log-requests" in args) is emitted
    assert "--enable-log-requests" not in args


def test_every_typed_setting_reaches_its_flag() -> None:
    m = model(
        gpus=[0, 1, 2, 3],
        vllm={
            "tensor_parallel_size": 2,
            "pipeline_parallel_size": 2,
            "max_model_len": 4096,
            "gpu_memory_utilization": 0.85,
            "dtype": "bfloat16",
            "kv_cache_dtype": "fp8",
            "quantization": "awq",
            "max_num_seqs": 64,
            "max_num_batched_tokens": 8192,
            "enforce_eager": True,
            "extra_args": ["--enable-prefix-caching"],
        },
    )
    args = vllm_launch(m, "chat", 8000).container_args
    flags = flags_of(args)
    assert flags["--tensor-parallel-size"] == "2"
    assert flags["--pipeline-parallel-size"] == "2"
    assert flags["--max-model-len"] == "4096"
    assert flags["--gpu-memory-utilization"] == "0.85"
    assert flags["--dtype"] == "bfloat16"
    assert flags["--kv-cache-dtype"] == "fp8"
    assert flags["--quantization"] == "awq"
    assert flags["--max-num-seqs"] == "64"
    assert flags["--max-num-batched-tokens"] == "8192"
    assert "--enforce-eager" in flags
    assert args[-1] == "--enable-prefix-caching"  # extra_args come last, verbatim


def test_vllm_args_keeps_its_old_shape_for_callers() -> None:
    m = model()
    assert vllm_args(m, "chat", 8000) == list(vllm_launch(m, "chat", 8000).container_args)


@pytest.mark.parametrize(
    ("version", "arg", "message"),
    [
        ("0.18.0", "--swap-space", r"--swap-space was removed in vLLM 0\.18\.0"),
        ("0.18.0", "--swap-space=8", r"--swap-space was removed"),
        ("0.17.0", "--disable-log-requests", r"removed in vLLM 0\.17\.0.*--no-enable-log"),
        ("0.17.0", "--disable_log_requests", r"--disable-log-requests was removed"),
        ("0.13.0", "--task", r"--task was removed in vLLM 0\.13\.0.*--runner"),
        ("0.13.0", "--task=embed", r"--task was removed"),
        ("0.10.0", "--enable-log-requests", r"exists only from vLLM 0\.10\.1 on"),
        ("0.10.0", "--no-enable-log-requests", r"--enable-log-requests exists only from"),
        ("0.10.0", "--runner", r"--runner exists only from vLLM 0\.10\.1.*--task"),
        ("0.9.2", "--convert", r"--convert exists only from"),
    ],
)
def test_a_flag_the_pinned_version_lacks_is_refused(version: str, arg: str, message: str) -> None:
    m = model(vllm={"version": version, "extra_args": [arg, "1"]})
    with pytest.raises(StackValidationError, match=message) as info:
        check_extra_args(m, "models.chat")
    assert info.value.issues[0].path == "models.chat.vllm.extra_args"
    assert f"pinned: {version}" in str(info.value)


@pytest.mark.parametrize(
    ("version", "arg"),
    [
        ("0.17.1", "--swap-space"),
        ("0.16.0", "--disable-log-requests"),
        ("0.12.0", "--task"),
        ("0.10.1", "--enable-log-requests"),
        ("0.11.0", "--no-enable-log-requests"),
        ("0.11.0", "--runner"),
        ("0.11.0", "--some-flag-the-table-does-not-know"),
        ("0.11.0", "not-a-flag"),
    ],
)
def test_a_flag_the_pinned_version_has_passes(version: str, arg: str) -> None:
    m = model(vllm={"version": version, "extra_args": [arg]})
    check_extra_args(m, "models.chat")
    assert vllm_launch(m, "chat", 8000).container_args[-1] == arg


def test_the_refusal_names_the_field_when_the_stack_is_expanded() -> None:
    data = {
        "stack": "s",
        "hosts": {"gpu": {"backend": "process"}},
        "models": {"chat": {"host": "gpu", "model": "org/m", "vllm": {"version": "0.18.0"}}},
    }
    data["models"]["chat"]["vllm"]["extra_args"] = ["--swap-space", "4"]  # type: ignore[index]
    stack = stack_from_data(data)
    with pytest.raises(StackValidationError, match=r"models\.chat\.vllm\.extra_args"):
        expand_units(stack)
    with pytest.raises(StackValidationError, match=r"models\.chat\.vllm\.extra_args"):
        render_stack(stack, "systemd")


def test_hostile_extra_args_pass_through_untouched() -> None:
    m = model(vllm={"extra_args": list(HOSTILE_VALUES)})
    args = vllm_launch(m, "chat", 8000).container_args
    assert args[-len(HOSTILE_VALUES) :] == HOSTILE_VALUES


def test_the_flag_table_is_well_formed() -> None:
    flags = [f.flag for f in FLAG_TABLE]
    assert len(set(flags)) == len(flags)
    for change in FLAG_TABLE:
        assert change.flag.startswith("--")
        assert change.source
        assert change.instead
        assert change.since is not None or change.until is not None
        if change.since is not None and change.until is not None:
            assert change.since < change.until
    # Every entry a rename: the old spelling ends where (or after) the new one starts.
    by_flag = {f.flag: f for f in FLAG_TABLE}
    assert by_flag["--enable-log-requests"].since == (0, 10, 1)
    assert by_flag["--disable-log-requests"].until == (0, 17, 0)
    assert by_flag["--task"].until == (0, 13, 0)
    assert by_flag["--runner"].since == (0, 10, 1)
    assert by_flag["--swap-space"].until == (0, 18, 0)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("0.11.0", (0, 11, 0)),
        ("0.10.1.1", (0, 10, 1)),
        ("0.17.0rc1", (0, 17, 0)),
        ("1", (1, 0, 0)),
        ("0.9", (0, 9, 0)),
        ("0.6.6.post1", (0, 6, 6)),
    ],
)
def test_parse_version(text: str, version: tuple[int, int, int]) -> None:
    assert parse_version(text) == version


def test_replicas_get_consecutive_slices_of_the_listed_gpus() -> None:
    m = model(gpus=[4, 5, 6, 7], replicas=2, vllm={"tensor_parallel_size": 2})
    assert replica_gpus(m, 0) == (4, 5)
    assert replica_gpus(m, 1) == (6, 7)
    assert replica_gpus(model(gpus="auto"), 0) is None


def _launch_args(version: str, engine: str = "vllm", **vllm: object) -> list[str]:
    from hxp.spec import Stack
    from hxp.units import expand_units

    stack = Stack.model_validate({
        "stack": "s", "hosts": {"local": {"backend": "process"}},
        "models": {"chat": {"host": "local", "model": "org/chat", "engine": engine, "gpus": [0],
                            "port": 8000, "stop_timeout": "25s",
                            "vllm": {"version": version, **vllm}}},
    })  # fmt: skip
    (inst,) = expand_units(stack)
    return list(inst.argv)


@pytest.mark.parametrize("engine", ["vllm", "simulator"])
def test_launch_passes_shutdown_timeout_sized_to_stop_timeout_from_0_18(engine: str) -> None:
    """vLLM 0.18.0 added --shutdown-timeout (default 0: abort in-flight requests on SIGTERM);
    every launch from 0.18.0 carries the unit's stop_timeout, none before."""
    args = _launch_args("0.18.0", engine)
    assert args[args.index("--shutdown-timeout") + 1] == "25"
    assert "--shutdown-timeout" not in _launch_args("0.17.1", engine)


def test_launch_keeps_the_operators_shutdown_timeout() -> None:
    args = _launch_args("0.33.0", extra_args=["--shutdown-timeout=3"])
    assert [a for a in args if a.startswith("--shutdown-timeout")] == ["--shutdown-timeout=3"]


# --- sleep mode -----------------------------------------------------------------------------


def _sleep_stack(sleep_mode: bool, engine: str = "vllm", version: str = "0.11.0") -> Any:
    from hxp.spec import Stack

    return Stack.model_validate(
        {
            "stack": "s",
            "hosts": {"gpu": {"backend": "process"}},
            "models": {
                "chat": {
                    "host": "gpu",
                    "model": "org/model",
                    "gpus": [0],
                    "engine": engine,
                    "sleep_mode": sleep_mode,
                    "vllm": {"version": version, "tensor_parallel_size": 1},
                },
                "other": {"host": "gpu", "model": "org/other", "gpus": [1], "port": 8100},
            },
        }
    )


@pytest.mark.parametrize("engine", ["vllm", "simulator"])
def test_sleep_mode_flag_and_dev_mode_only_for_the_model_that_opts_in(engine: str) -> None:
    insts = {i.unit: i for i in expand_units(_sleep_stack(True, engine))}
    chat, other = insts["chat"], insts["other"]
    assert "--enable-sleep-mode" in chat.argv
    assert "--enable-sleep-mode" in chat.container_args
    assert dict(chat.env)["VLLM_SERVER_DEV_MODE"] == "1"
    assert dict(chat.host_env)["VLLM_SERVER_DEV_MODE"] == "1"
    assert dict(chat.container_env)["VLLM_SERVER_DEV_MODE"] == "1"
    assert "--enable-sleep-mode" not in other.argv
    assert "VLLM_SERVER_DEV_MODE" not in dict(other.env)
    off = {i.unit: i for i in expand_units(_sleep_stack(False, engine))}["chat"]
    assert "--enable-sleep-mode" not in off.argv + off.container_args
    assert "VLLM_SERVER_DEV_MODE" not in dict(off.env)


def test_sleep_mode_in_docker_and_systemd_renders() -> None:
    import yaml

    stack = _sleep_stack(True)
    (compose,) = render_stack(stack, "compose")
    services = yaml.safe_load(compose.content)["services"]
    assert "--enable-sleep-mode" in services["chat"]["command"]
    assert services["chat"]["environment"]["VLLM_SERVER_DEV_MODE"] == "1"
    assert "--enable-sleep-mode" not in services["other"]["command"]
    assert "VLLM_SERVER_DEV_MODE" not in (services["other"].get("environment") or {})
    units = {f.path: f.content for f in render_stack(stack, "systemd")}
    assert "--enable-sleep-mode" in units["hxp-s-chat.service"]
    assert "VLLM_SERVER_DEV_MODE=1" in units["hxp-s-chat.service"]
    assert "--enable-sleep-mode" not in units["hxp-s-other.service"]
    assert "VLLM_SERVER_DEV_MODE" not in units["hxp-s-other.service"]


def test_sleep_mode_needs_vllm_0_7() -> None:
    with pytest.raises(StackValidationError) as err:
        expand_units(_sleep_stack(True, version="0.6.6"))
    assert "models.chat.sleep_mode" in str(err.value)
    assert "0.7.0" in str(err.value)
    assert "--enable-sleep-mode" in {a for i in expand_units(_sleep_stack(True, version="0.7.0"))
                                     for a in i.argv}  # fmt: skip


def test_sleep_mode_is_a_strict_bool_and_off_by_default() -> None:
    assert model().sleep_mode is False
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        model(sleep_mode="perhaps")


def test_sleep_mode_off_leaves_every_unit_hash_as_it_was() -> None:
    from hxp.config import unit_config_hash

    off, unset = _sleep_stack(False), _sleep_stack(False)
    data = unset.model_dump(mode="json")
    del data["models"]["chat"]["sleep_mode"]
    from hxp.spec import Stack

    assert unit_config_hash(off, "chat") == unit_config_hash(Stack.model_validate(data), "chat")
    assert unit_config_hash(_sleep_stack(True), "chat") != unit_config_hash(off, "chat")
