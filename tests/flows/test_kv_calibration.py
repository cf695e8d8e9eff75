"""KV calibration through the real deploy flow (process backend, real Prefect server, the real
`hxp-vllm-sim` process): the first start's logged KV cache is stored; the second deploy of the
same combination predicts it within 2%, the plan shows predicted and measured side by side, and
`--kv-cache-memory-bytes` is in the argv from vLLM 0.11 on and absent below."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from hxp.backends.base import Remove, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.calibration import parse_startup_log
from hxp.store import Store
from tests.support.model_configs import LLAMA_31_8B
from tests.support.stacks import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

SKEW = 0.9  # the double's "measured" KV memory is 10% below the calculator's prediction


def write_stack(tmp: Path, version: str, port: int, config: Path, env: str) -> Path:
    args = ["--model-config", str(config), "--gpu-memory-gib", "80", "--kv-skew", str(SKEW),
            "--latency-ms", "2"]  # fmt: skip
    text = "\n".join(
        [
            "stack: kv",
            "hosts:",
            "  local: {backend: process}",
            "models:",
            "  chat:",
            "    host: local",
            "    engine: simulator",
            f"    python: {sys.executable}",
            "    model: hxp-sim/llama-8b",
            "    revision: r1",
            f"    port: {port}",
            f"    env: {{DEPLOY: '{env}'}}",
            f"    vllm: {{version: '{version}', max_model_len: 8192}}",
            f"    simulator_args: {json.dumps(args)}",
            "    health:",
            f'      http: {{url: "http://127.0.0.1:{port}/health"}}',
            "      interval: 300ms",
            "      timeout: 1s",
            "      retries: 3",
            "      start_period: 10s",
        ]
    )
    path = tmp / f"stack-{env}.yaml"
    path.write_text(text + "\n")
    return path


def deploy(path: Path, state: Path) -> dict[str, Any]:
    from flows.deploy import deploy_stack

    return deploy_stack([str(path)], state_dir=str(state))


@pytest.mark.parametrize(("version", "pinned"), [("0.33.0", True), ("0.10.1", False)])
def test_second_deploy_uses_the_measurement(tmp_path: Path, version: str, pinned: bool) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_31_8B))
    state = tmp_path / "state"
    port = free_port()
    backend = ProcessBackend(state)
    ref = UnitRef("kv", "chat", "chat")
    try:
        first = deploy(write_stack(tmp_path, version, port, config, "1"), state)
        (kv1,) = first["plan"]["kv_cache"]
        assert kv1["measured_tokens"] is None
        assert "not measured yet" in kv1["note"]
        predicted = kv1["predicted_tokens"]
        logged1 = parse_startup_log(backend.logs(ref, 5000))
        assert logged1 is not None
        assert logged1.kv_cache_tokens is not None
        # The calculator alone is off by the skew: calibration has something to correct.
        assert abs(predicted - logged1.kv_cache_tokens) / logged1.kv_cache_tokens > 0.05
        stored = [e for e in Store(state).events("kv") if e["kind"] == "kv-calibrated"]
        assert len(stored) == 1

        second = deploy(write_stack(tmp_path, version, port, config, "2"), state)
        (kv2,) = second["plan"]["kv_cache"]
        assert kv2["predicted_tokens"] == predicted
        assert kv2["measured_tokens"] == logged1.kv_cache_tokens
        spec = json.loads((state / "process" / "kv" / "chat" / "spec.json").read_text())
        assert ("--kv-cache-memory-bytes" in spec["argv"]) is pinned
        assert (kv2["pinned_kv_cache_memory_bytes"] is not None) is pinned
        logged2 = parse_startup_log(backend.logs(ref, 5000))
        assert logged2 is not None
        assert logged2.kv_cache_tokens is not None
        error = abs(kv2["expected_tokens"] - logged2.kv_cache_tokens) / logged2.kv_cache_tokens
        assert error <= 0.02, (kv2, logged2)
        if pinned:
            i = spec["argv"].index("--kv-cache-memory-bytes")
            assert int(spec["argv"][i + 1]) == kv2["pinned_kv_cache_memory_bytes"]
            assert any("as specified by kv_cache_memory_bytes" in x for x in backend.logs(ref))
    finally:
        for name in backend.observe("kv"):
            backend.apply(Remove(UnitRef("kv", name, name)))
