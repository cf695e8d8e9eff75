"""A model's default start-up grace (`health.start_period`), scaled from the weights one GPU
loads: from a config.json given to it, else from the size in its name."""

from __future__ import annotations

from typing import Any

import pytest

from hxp.spec import ModelSpec
from hxp.startup import (
    BASE_SECONDS,
    DEFAULT_SECONDS,
    MAX_SECONDS,
    MIN_SECONDS,
    SECONDS_PER_GIB,
    grace_for,
    model_start_period,
    params_from_name,
    start_grace,
)
from hxp.units import expand_units
from tests.support.model_configs import LLAMA_31_8B
from tests.support.render_data import stack_from_data


def grace_of(model: dict[str, Any]) -> float:
    stack = stack_from_data(
        {"stack": "s", "hosts": {"gpu": {"backend": "process"}}, "models": {"m": model}}
    )
    (inst,) = expand_units(stack)
    assert inst.health is not None
    return inst.health.start_period


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", 8.0),
        ("Qwen/Qwen2.5-0.5B-Instruct", 0.5),
        ("meta-llama/Llama-3.3-70B-Instruct", 70.0),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", 56.0),
        ("Qwen/Qwen3-30B-A3B", 30.0),  # A3B: the active parameters, not the size
        ("google/gemma-2-9b-it", 9.0),
        ("HuggingFaceTB/SmolLM-135M", 0.135),
        ("microsoft/Phi-3-mini-4k-instruct", None),  # 4k is a context length
        ("hxp-sim/chat", None),
    ],
)
def test_the_parameter_count_in_a_model_name(name: str, billions: float | None) -> None:
    assert params_from_name(name) == billions


def test_a_small_model_gets_a_shorter_grace_than_a_large_one() -> None:
    small = grace_of({"host": "gpu", "model": "Qwen/Qwen2.5-0.5B-Instruct"})
    mid = grace_of({"host": "gpu", "model": "meta-llama/Llama-3.1-8B-Instruct"})
    large = grace_of({"host": "gpu", "model": "meta-llama/Llama-3.3-70B-Instruct"})
    assert MIN_SECONDS <= small < mid < large <= MAX_SECONDS
    # 8B in bf16 is ~14.9 GiB on one GPU: base + 10 s per GiB.
    assert mid == round(BASE_SECONDS + SECONDS_PER_GIB * 8e9 * 2 / 2**30)
    # Split over four GPUs, each loads a quarter: the grace shrinks with it.
    tp4 = grace_of(
        {
            "host": "gpu",
            "model": "meta-llama/Llama-3.3-70B-Instruct",
            "vllm": {"tensor_parallel_size": 4},
        }
    )
    assert mid < tp4 < large


def test_an_explicit_start_period_wins() -> None:
    model = {
        "host": "gpu",
        "model": "meta-llama/Llama-3.3-70B-Instruct",
        "health": {"http": {"url": "http://127.0.0.1:8000/health"}, "start_period": "42s"},
    }
    assert grace_of(model) == 42.0


def test_without_a_size_the_default_stays() -> None:
    assert grace_of({"host": "gpu", "model": "hxp-sim/chat"}) == DEFAULT_SECONDS
    assert start_grace(ModelSpec(host="gpu", model="org/chat")).basis == "default"


def test_quantized_weights_load_faster_than_bf16() -> None:
    bf16 = start_grace(ModelSpec(host="gpu", model="org/Big-70B"))
    fp8 = start_grace(ModelSpec(host="gpu", model="org/Big-70B", vllm={"quantization": "fp8"}))
    awq = start_grace(ModelSpec(host="gpu", model="org/Big-70B-AWQ"))
    assert bf16.weights_gib_per_gpu == pytest.approx(2 * (fp8.weights_gib_per_gpu or 0))
    assert awq.seconds < fp8.seconds < bf16.seconds


def test_the_grace_is_clamped() -> None:
    assert grace_for(0.0) == MIN_SECONDS
    assert grace_for(10_000.0) == MAX_SECONDS
    assert grace_for(50.0) == BASE_SECONDS + 50 * SECONDS_PER_GIB


def test_a_config_json_gives_the_calculators_weights() -> None:
    model = ModelSpec(host="gpu", model="org/chat")  # no size in the name: only the config knows
    grace = start_grace(model, LLAMA_31_8B)
    assert grace.basis == "config"
    assert grace.weights_gib_per_gpu == pytest.approx(14.99, abs=0.01)  # hxp.resources
    assert grace.seconds == round(BASE_SECONDS + SECONDS_PER_GIB * 14.99)
    assert (
        grace.explain()
        == f"{grace.seconds:.0f}s for 15.0 GiB of weights per GPU (from the config.json)"
    )
    # Tensor parallelism halves what each GPU loads.
    tp2 = ModelSpec(host="gpu", model="org/chat", vllm={"tensor_parallel_size": 2})
    assert start_grace(tp2, LLAMA_31_8B).weights_gib_per_gpu == pytest.approx(7.51, abs=0.03)
    # Unit expansion reads no file: without a size in the name, the default.
    assert model_start_period(model).seconds == DEFAULT_SECONDS
    assert grace_of({"host": "gpu", "model": "org/chat"}) == DEFAULT_SECONDS


def test_a_config_the_calculator_cannot_read_falls_back_to_the_name() -> None:
    model = ModelSpec(host="gpu", model="org/odd-8B")
    assert start_grace(model, {"model_type": "mystery"}).basis == "name"
