"""hxp.model_fit: a stack's model as the calculator's request (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from hxp.errors import InputError
from hxp.gpu_alloc import GpuInfo
from hxp.model_fit import engine_flags, fit_request_for, replica_devices
from hxp.resources import GIB, GpuMemory
from hxp.spec import ModelSpec
from tests.support.model_configs import LLAMA_31_8B


def model(**fields: Any) -> ModelSpec:
    return ModelSpec.model_validate({"host": "gpu", "model": "meta-llama/Llama-3.1-8B", **fields})


def devices(n: int, gib: float = 80.0) -> list[GpuInfo]:
    return [
        GpuInfo(index=i, total_bytes=int(gib * GIB), free_bytes=1, name=f"G{i}") for i in range(n)
    ]


@pytest.mark.parametrize(
    ("args", "mode", "chunked"),
    [
        ([], None, None),
        (["--performance-mode", "throughput"], "throughput", None),
        (["--performance-mode=interactivity", "--enable-chunked-prefill"], "interactivity", True),
        (["--enable-chunked-prefill", "--no-enable-chunked-prefill"], None, False),
    ],
)
def test_engine_flags_from_extra_args(
    args: list[str], mode: str | None, chunked: bool | None
) -> None:
    flags = engine_flags(args, "models.m.vllm.extra_args")
    assert (flags.performance_mode, flags.enable_chunked_prefill) == (mode, chunked)


def test_an_unknown_performance_mode_names_the_field() -> None:
    with pytest.raises(InputError, match=r"models.m.vllm.extra_args: --performance-mode 'fast'"):
        engine_flags(["--performance-mode", "fast"], "models.m.vllm.extra_args")


def test_listed_gpus_are_replica_zeros_slice_by_index() -> None:
    spec = model(gpus=[2, 3], replicas=2, vllm={"tensor_parallel_size": 1})
    got = replica_devices(spec, "m", devices(4))
    assert [g.name for g in got] == ["G2"]
    assert got[0].free_gib is None  # total memory only: its own replicas do not count against it
    with pytest.raises(InputError, match=r"models.m.gpus: host 'gpu' has no GPU \[2, 3\]"):
        replica_devices(model(gpus=[2, 3], vllm={"tensor_parallel_size": 2}), "m", devices(2))


def test_auto_gpus_take_what_tp_needs_or_the_hosts_share() -> None:
    assert len(replica_devices(model(vllm={"tensor_parallel_size": 2}), "m", devices(8))) == 2
    assert len(replica_devices(model(replicas=2), "m", devices(8))) == 4
    with pytest.raises(InputError, match="needs 4 GPUs; host 'gpu' has 2"):
        replica_devices(model(vllm={"tensor_parallel_size": 4}), "m", devices(2))
    with pytest.raises(InputError, match=r"host 'gpu' has no GPUs.*hosts.gpu.gpus"):
        replica_devices(model(), "m", [])


def test_the_request_carries_the_stack_settings_and_overrides_win() -> None:
    spec = model(
        gpus=[0, 1],
        vllm={
            "version": "0.19.0",
            "max_model_len": 8192,
            "gpu_memory_utilization": 0.8,
            "kv_cache_dtype": "fp8",
            "max_num_seqs": 64,
            "enforce_eager": True,
            "extra_args": ["--performance-mode", "throughput"],
        },
    )
    gpus = (GpuMemory(80.0),) * 2
    req = fit_request_for(spec, "m", LLAMA_31_8B, gpus)
    assert req.tensor_parallel_size == 2  # the listed GPUs of its one replica
    assert (req.max_model_len, req.gpu_memory_utilization, req.kv_cache_dtype) == (8192, 0.8, "fp8")
    assert (req.max_num_seqs, req.enforce_eager, req.vllm_version) == (64, True, "0.19.0")
    assert req.performance_mode == "throughput"
    assert req.enable_chunked_prefill is None
    over = fit_request_for(spec, "m", LLAMA_31_8B, gpus, max_model_len=4096, kv_cache_dtype=None)
    assert (over.max_model_len, over.kv_cache_dtype) == (4096, "fp8")  # None: not given


def _stack(runner: str) -> Any:
    from tests.support.render_data import stack_from_data

    host: dict[str, Any] = {"backend": "process", "gpus": [{"index": 0, "memory_gib": 40}]}
    if runner == "ssh":
        host.update(runner="ssh", address="10.0.0.5", backend="systemd")
    return stack_from_data(
        {
            "stack": "s",
            "hosts": {"gpu": host},
            "models": {
                "chat": {
                    "host": "gpu",
                    "model": "meta-llama/Llama-3.1-8B",
                    "vllm": {"max_model_len": 8192, "version": "0.19.0"},
                }
            },
        }
    )


def test_a_local_hosts_gpus_are_discovered_a_remote_ones_declared(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """hxp fit -f asks NVML on this machine for a local host (here its test double, the one
    tests/unit/test_gpus.py checks NvmlProbe against), and takes a remote host's declared GPUs."""
    import json

    import hxp.io.gpus
    from hxp_cli.fit import fit_stack_model
    from tests.unit.test_gpus import H100, FakeNvml

    real = hxp.io.gpus.NvmlProbe
    monkeypatch.setattr(hxp.io.gpus, "NvmlProbe", lambda: real(FakeNvml([H100])))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_31_8B))

    local = fit_stack_model(_stack("local"), "chat", str(config))
    assert local.gpu_source == "discovered (NVML)"
    assert [(g.name, g.total_gib) for g in local.request.gpus] == [("NVIDIA H100 80GB HBM3", 80.0)]
    assert local.request.gpus[0].free_gib is None  # 70 GiB in use now does not count against it
    assert local.result.fits

    remote = fit_stack_model(_stack("ssh"), "chat", str(config))
    assert remote.gpu_source == "declared (host 'gpu' is reached by ssh)"
    assert [g.total_gib for g in remote.request.gpus] == [40.0]
