"""KV calibration: the start-up log parser on real logs in every wording, the simulator's lines
per vLLM version, the pin decision, the store table and the plan's predicted/measured line."""

from __future__ import annotations

from pathlib import Path

import pytest

from hxp.calibration import (
    GIB,
    Calibration,
    CalibrationKey,
    parse_startup_log,
    pin_kv_cache_memory,
    pinned_instance,
    startup_kv_lines,
    with_pinned_flag,
)
from hxp.plan import plan_stack
from hxp.store import Store
from hxp.units import expand_units
from hxp.vllm import FLAG_TABLE, check_extra_args
from tests.support.render_data import stack_from_data
from tests.support.vllm_log_cases import load_cases

CASES = {c["case"]: c for c in load_cases()}


def _case_log(name: str) -> str:
    return str(CASES[name]["log"])


@pytest.mark.parametrize(
    "name",
    [
        "llmd_v019_gemma2_9b_h100_tp1",
        "llmd_v019_gemma3_27b_h100_tp1",
        "llmd_v019_qwen15_moe_a27b_h100_tp1",
        "llmd_v019_qwen25_7b_w8a8_h100_tp1",
    ],
)
def test_v1_separate_lines_of_real_logs(name: str) -> None:
    """vLLM 0.19 (two lines, kv_cache_utils.py) with `Available KV cache memory` (gpu_worker.py)."""
    case = CASES[name]
    m = parse_startup_log(_case_log(name))
    assert m is not None
    assert m.wording == "v1-separate"
    assert m.kv_cache_tokens == case["logged"]["kv_cache_tokens"]
    assert m.available_kv_gib == pytest.approx(case["logged"]["available_kv_gib"])
    assert m.max_concurrency == pytest.approx(case["logged"]["max_concurrency"])
    assert m.max_model_len == 8192
    assert m.complete


def test_v1_lines_without_memory_are_incomplete() -> None:
    """0.8.5 logs tokens but no `Available KV cache memory` line (it came in 0.9.1)."""
    m = parse_startup_log(_case_log("i17469_qwen3_30b_a3b_4xa10_v085"))
    assert m is not None
    assert m.kv_cache_tokens == 198784
    assert m.available_kv_gib is None
    assert not m.complete


def test_v0_memory_profiling_line_and_refusal() -> None:
    """V0 0.6.4: `Memory profiling results: ... kv_cache_size=X GiB`, `# GPU blocks: N` (with
    a typo'd first line in the report) and the refusal naming the token count."""
    ok = parse_startup_log(_case_log("i10517_llama31_8b_rtx3090_v064_len20000"))
    assert ok is not None
    assert ok.available_kv_gib == pytest.approx(3.81)
    assert (
        ok.kv_cache_tokens
        == 1952 * 16
        == CASES["i10517_llama31_8b_rtx3090_v064_len20000"]["logged"]["kv_cache_tokens"]
    )
    assert ok.max_model_len == 20000
    assert ok.max_concurrency == pytest.approx(1.56)
    refused = parse_startup_log(_case_log("i10517_llama31_8b_rtx3090_v064_len29000"))
    assert refused is not None
    assert refused.kv_cache_tokens == 1478 * 16 == 23648  # "# GPU blocks: 1478"
    assert refused.available_kv_gib == pytest.approx(2.89)


def test_v0_rest_of_memory_line() -> None:
    text = (
        "INFO 04-02 10:20:54 worker.py:266] model weights take 30.71GiB; non_torch_memory takes "
        "0.30GiB; PyTorch activation peak memory takes 1.26GiB; the rest of the memory reserved "
        "for KV Cache is 7.71GiB.\n"
        "INFO 04-02 10:20:55 executor_base.py:111] # cuda blocks: 3946, # CPU blocks: 1024\n"
        "INFO 04-02 10:20:55 executor_base.py:116] Maximum concurrency for 4096 tokens per "
        "request: 15.41x\n"
    )
    m = parse_startup_log(text)
    assert m is not None
    assert m.wording == "v0-blocks"
    assert m.kv_cache_tokens == 3946 * 16
    assert m.available_kv_gib == pytest.approx(7.71)
    assert m.max_model_len == 4096


def test_combined_line_of_recent_versions() -> None:
    """0.28.0 onward: one line (kv_cache_utils.py update_kv_cache_capacity); 0.30 names the pool."""
    for pool in ("GPU", "GPU + host"):
        text = (
            "(EngineCore pid=9) INFO 11-02 10:00:01 [gpu_worker.py:773] Available KV cache "
            "memory: 54.1 GiB\n"
            f"(EngineCore pid=9) INFO 11-02 10:00:01 [kv_cache_utils.py:1148] {pool} KV cache "
            "size: 1,013,376 tokens, Maximum concurrency for 32,768 tokens per request: 30.93x\n"
        )
        m = parse_startup_log(text)
        assert m is not None
        assert m.wording == "v1-combined"
        assert (m.kv_cache_tokens, m.max_model_len) == (1013376, 32768)
        assert m.available_kv_gib == pytest.approx(54.1)
        assert m.available_kv_bytes == round(54.1 * GIB)


def test_pinned_start_reports_the_reserved_memory() -> None:
    """With --kv-cache-memory-bytes vLLM skips profiling and words the memory differently."""
    text = (
        "INFO [gpu_worker.py:668] Initial free memory 78.5 GiB, reserved 48.43 GiB memory for KV "
        "Cache as specified by kv_cache_memory_bytes config and skipped memory profiling.\n"
        "INFO [kv_cache_utils.py:1148] GPU KV cache size: 906,784 tokens, Maximum concurrency for "
        "8,192 tokens per request: 110.69x\n"
    )
    m = parse_startup_log(text)
    assert m is not None
    assert m.available_kv_gib == pytest.approx(48.43)


def test_no_kv_lines_is_none() -> None:
    assert parse_startup_log("INFO starting\nINFO listening on 0.0.0.0:8000\n") is None


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ((0, 7, 3), ["# GPU blocks: 3000, # CPU blocks: 0", "Maximum concurrency for 8192 "]),
        ((0, 8, 5), ["GPU KV cache size: 48,000 tokens", "Maximum concurrency for 8,192 "]),
        ((0, 11, 0), ["Available KV cache memory: 5.00 GiB", "GPU KV cache size: 48,000 tokens",
                      "Maximum concurrency for 8,192 tokens per request: 5.86x"]),
        ((0, 27, 1), ["Available KV cache memory: 5.0 GiB", "GPU KV cache size: 48,000 tokens",
                      "Maximum concurrency for 8,192 "]),
        ((0, 28, 0), ["Available KV cache memory: 5.0 GiB", "GPU KV cache size: 48,000 tokens, "]),
    ],
)  # fmt: skip
def test_simulator_lines_follow_the_version(
    version: tuple[int, int, int], expected: list[str]
) -> None:
    lines = startup_kv_lines(version, 5 * GIB, 48000, 8192, 48000 / 8192)
    assert len(lines) == len(expected)
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), (line, start)
    parsed = parse_startup_log(lines)
    assert parsed is not None
    assert parsed.kv_cache_tokens == 48000
    if version >= (0, 9, 1):
        assert parsed.available_kv_bytes == 5 * GIB


def _calibration(version: str = "0.33.0", bytes_: int = 40 * GIB) -> Calibration:
    key = CalibrationKey("org/m-8B", "r1", version, "H100", 1, 8192, 0.9)
    return Calibration(key, 327680, bytes_, 40.0, 1.0, "chat-0")


def test_pin_from_0_11_only_and_opt_out() -> None:
    cal = _calibration()
    assert pin_kv_cache_memory((0, 11, 0), cal, True) == 40 * GIB
    assert pin_kv_cache_memory((0, 10, 2), cal, True) is None  # the flag exists; hxp waits
    assert pin_kv_cache_memory((0, 33, 0), cal, False) is None
    assert pin_kv_cache_memory((0, 33, 0), None, True) is None


def test_operator_flag_wins() -> None:
    argv = ("vllm", "serve", "m", "--kv-cache-memory-bytes=1000")
    assert with_pinned_flag(argv, 5) == argv
    assert with_pinned_flag(("vllm",), 5) == ("vllm", "--kv-cache-memory-bytes", "5")


def test_flag_table_knows_kv_cache_memory_bytes_from_0_10_2() -> None:
    entry = next(f for f in FLAG_TABLE if f.flag == "--kv-cache-memory-bytes")
    assert entry.since == (0, 10, 2)
    assert entry.until is None
    assert "arg_utils.py @ 0.10.2" in entry.source
    stack = _stack("0.10.1", extra_args=["--kv-cache-memory-bytes", "1"])
    with pytest.raises(Exception, match=r"exists only from vLLM 0\.10\.2"):
        check_extra_args(stack.models["chat"], "models.chat")


def _stack(version: str, pin: bool = True, extra_args: list[str] | None = None):  # type: ignore[no-untyped-def]
    model: dict[str, object] = {
        "host": "gpu",
        "model": "org/m-8B",
        "revision": "r1",
        "gpus": [0],
        "vllm": {"version": version, "max_model_len": 8192, "extra_args": extra_args or []},
    }
    if not pin:
        model["pin_kv_cache_memory"] = False
    return stack_from_data(
        {
            "version": 2,
            "stack": "s",
            "hosts": {"gpu": {"gpus": [{"index": 0, "memory_gib": 80, "name": "H100"}]}},
            "models": {"chat": model},
        }
    )


@pytest.mark.parametrize(
    ("version", "pin", "pinned"),
    [("0.33.0", True, True), ("0.11.0", True, True), ("0.10.2", True, False),
     ("0.33.0", False, False)],
)  # fmt: skip
def test_argv_carries_the_pin_for_0_11_and_later(version: str, pin: bool, pinned: bool) -> None:
    stack = _stack(version, pin)
    inst = expand_units(stack)[0]
    out = pinned_instance(inst, _calibration(version))
    assert ("--kv-cache-memory-bytes" in out.argv) is pinned
    assert ("--kv-cache-memory-bytes" in out.container_args) is pinned
    if pinned:
        i = out.argv.index("--kv-cache-memory-bytes")
        assert out.argv[i + 1] == str(40 * GIB)


def test_store_keeps_the_first_measurement(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first = _calibration()
    assert store.record_kv_calibration(first)
    again = Calibration(first.key, 1, 1, None, 2.0, "chat-1")
    assert not store.record_kv_calibration(again)
    assert store.kv_calibration(first.key) == first
    other = CalibrationKey("org/m-8B", "r1", "0.33.0", "H100", 1, None, 0.9)
    assert store.kv_calibration(other) is None  # max_model_len is part of the combination


def test_plan_shows_predicted_and_measured(tmp_path: Path) -> None:
    from hxp.io.calibration import annotate_plan

    stack = _stack("0.33.0")
    store = Store(tmp_path)
    plan = annotate_plan(plan_stack(stack, {}, "h"), stack, store)
    assert "not measured yet" in plan.summary()
    inst = expand_units(stack)[0]
    key = CalibrationKey("org/m-8B", "r1", "0.33.0", "H100", 1, 8192, 0.9)
    store.record_kv_calibration(Calibration(key, 327680, 40 * GIB, 40.0, 1.0, inst.name))
    plan = annotate_plan(plan_stack(stack, {}, "h"), stack, store)
    (line,) = [x for x in plan.summary().splitlines() if x.strip().startswith("kv")]
    assert "measured 327,680 tokens / 40.00 GiB" in line
    assert f"pins --kv-cache-memory-bytes {40 * GIB}" in line
    (entry,) = plan.to_dict()["kv_cache"]
    assert entry["measured_tokens"] == 327680
    assert entry["expected_tokens"] == 327680
    assert "predicted_tokens" in entry


def test_tokens_without_memory_are_shown_but_never_pinned() -> None:
    """vLLM before 0.9.1 logs no `Available KV cache memory`: the tokens are stored with 0 bytes."""
    from hxp.calibration import kv_estimate

    stack = _stack("0.33.0")
    inst = expand_units(stack)[0]
    cal = _calibration(bytes_=0)
    estimate = kv_estimate(inst, cal, 300000, 37.5)
    assert estimate is not None
    assert estimate.measured_tokens == 327680
    assert estimate.measured_kv_gib is None
    assert estimate.pinned_bytes is None
    assert "--kv-cache-memory-bytes" not in pinned_instance(inst, cal).argv
    assert "(prediction -8.4%)" in estimate.line()


def test_plan_predicts_a_vllm_model_from_its_hf_config(tmp_path: Path) -> None:
    import json

    from hxp.io.calibration import annotate_plan
    from hxp.resources import FitRequest, GpuMemory, fit
    from tests.support.model_configs import LLAMA_31_8B

    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_31_8B))
    data = {
        "version": 2,
        "stack": "s",
        "hosts": {"gpu": {"gpus": [{"index": 0, "memory_gib": 80, "name": "H100"}]}},
        "models": {
            "chat": {
                "host": "gpu",
                "model": "org/m-8B",
                "gpus": [0],
                "hf_config": str(config),
                "vllm": {"version": "0.19.1", "max_model_len": 8192},
            }
        },
    }
    stack = stack_from_data(data)
    want = fit(
        FitRequest(
            config=LLAMA_31_8B,
            gpus=(GpuMemory(80, None, "H100"),),
            max_model_len=8192,
            tensor_parallel_size=1,
            vllm_version="0.19.1",
        )
    )
    plan = annotate_plan(plan_stack(stack, {}, "h"), stack, Store(tmp_path / "state"))
    (entry,) = plan.to_dict()["kv_cache"]
    assert entry["predicted_tokens"] == want.kv_cache_tokens
    assert entry["measured_tokens"] is None
    assert entry["expected_tokens"] == want.kv_cache_tokens
    data["models"]["chat"]["hf_config"] = str(tmp_path / "missing.json")  # type: ignore[index]
    stack = stack_from_data(data)
    plan = annotate_plan(plan_stack(stack, {}, "h"), stack, Store(tmp_path / "state"))
    (entry,) = plan.to_dict()["kv_cache"]
    assert entry["predicted_tokens"] is None
    assert "no prediction" in entry["note"]
    assert "missing.json" in entry["note"]


def test_hxp_plan_prints_predicted_and_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from hxp_cli import main

    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text(
        "stack: s\n"
        "hosts:\n"
        "  local: {backend: process, gpus: [{index: 0, memory_gib: 80, name: H100}]}\n"
        "models:\n"
        "  chat: {host: local, model: org/m-8B, revision: r1, gpus: [0],\n"
        "         vllm: {version: '0.33.0', max_model_len: 8192}}\n"
    )
    state = tmp_path / "state"
    key = CalibrationKey("org/m-8B", "r1", "0.33.0", "H100", 1, 8192, 0.9)
    Store(state).record_kv_calibration(Calibration(key, 327680, 40 * GIB, 40.0, 1.0, "chat-0"))
    assert main(["plan", "-f", str(stack_file), "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.strip().startswith("kv")]
    assert "predicted unknown, measured 327,680 tokens / 40.00 GiB" in line
    assert main(["plan", "-f", str(stack_file), "--state-dir", str(state), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["kv_cache"]
    assert entry["pinned_kv_cache_memory_bytes"] == 40 * GIB
