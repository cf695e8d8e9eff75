"""Remote GPU discovery's parser on what a real H200 printed (tests/data/nvidia_smi/, driver
580.159.04), the nvidia-smi TEST DOUBLE held to the same files, and NvidiaSmiProbe running the
double through a real (local) runner."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from hxp.backends.runners import LocalRunner
from hxp.gpu_alloc import GIB, GpuInfo, GpuProcess
from hxp.io.gpus import NvidiaSmiProbe, NvmlProbe, discover_gpus
from hxp.nvidia_smi import (
    APP_FIELDS,
    GPU_FIELDS,
    NvidiaSmiError,
    compare_declared,
    gpu_query,
    parse_apps,
    parse_gpus,
    unknown_field,
)
from hxp.spec import GpuSpec, HostSpec
from tests.support import nvidia_smi_double
from tests.support.nvidia_smi_double import CAPTURED_GPU_FIELDS, H200_UUID, h200

DATA = Path(__file__).resolve().parents[1] / "data" / "nvidia_smi"
MIB = 2**20
IDLE_FIELDS = list(CAPTURED_GPU_FIELDS)
BUSY_FIELDS = ["index", "uuid", "memory.total", "memory.reserved", "memory.used", "memory.free"]
BUSY_APP_FIELDS = ["pid", "process_name", "gpu_uuid", "gpu_bus_id", "used_memory"]
HEADER_FIELDS = ["index", "uuid", "name", *GPU_FIELDS[3:7]]
BUSY_PROCESS = {"pid": 435, "name": "python3", "gpu_uuid": H200_UUID, "used_memory_mib": 12806}
# The busy capture: 9 MiB besides the process's 12,806 were in use, and free was 2 MiB above
# total - reserved - used (the driver's rounding).
BUSY_GPU = h200(memory_used_mib=12815, memory_free_mib=130342)


def data(name: str) -> str:
    return (DATA / name).read_text()


# ---------------------------------------------------------------- the parser, on real output


def test_idle_h200_memory_as_cuda_sees_it() -> None:
    [gpu] = parse_gpus(data("query_gpu_idle.csv"), fields=IDLE_FIELDS)
    assert gpu == GpuInfo(
        index=0,
        total_bytes=(143771 - 616) * MIB,
        free_bytes=143156 * MIB,
        used_bytes=0,
        uuid=H200_UUID,
        name="NVIDIA H200",
        utilization_pct=0,
        processes=(),
        source="nvidia-smi",
    )
    assert round(gpu.total_bytes / GIB, 2) == 139.80  # cudaMemGetInfo's total there


def test_busy_h200_with_its_process() -> None:
    apps = parse_apps(data("query_apps_busy.csv"), BUSY_APP_FIELDS)
    assert apps == {H200_UUID: (GpuProcess(pid=435, used_bytes=12806 * MIB),)}
    [gpu] = parse_gpus(data("query_gpu_busy.csv"), apps, BUSY_FIELDS)
    assert (gpu.used_bytes, gpu.free_bytes) == (12815 * MIB, 130342 * MIB)
    assert gpu.processes == (GpuProcess(pid=435, used_bytes=12806 * MIB),)
    assert gpu.total_bytes == 143155 * MIB


def test_the_unknown_field_error() -> None:
    assert unknown_field(data("query_bad_field.txt")) == "bogus.field"
    assert unknown_field(data("query_gpu_idle.csv")) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0, GPU-x, 143771\n", "expected 8 values"),
        ("0, GPU-x, NVIDIA H200, lots, 616, 0, 1, 0\n", "expected a number, got 'lots'"),
        ("[N/A], GPU-x, NVIDIA H200, 143771, 616, 0, 1, 0\n", "without index"),
    ],
    ids=["too-few-values", "not-a-number", "no-index"],
)
def test_unreadable_output_is_an_error_quoting_it(text: str, message: str) -> None:
    with pytest.raises(NvidiaSmiError, match=message):
        parse_gpus(text)


def test_not_supported_utilization_is_unknown() -> None:
    [gpu] = parse_gpus("0, GPU-x, NVIDIA H200, 143771, 616, 0, 143155, [Not Supported]\n")
    assert gpu.utilization_pct is None


def test_a_driver_without_memory_reserved_keeps_the_total_and_says_so() -> None:
    notes: list[str] = []
    fields = [f for f in GPU_FIELDS if f != "memory.reserved"]
    [gpu] = parse_gpus("0, GPU-x, NVIDIA H100, 81559, 0, 81079, 0\n", None, fields, notes.append)
    assert gpu.total_bytes == 81559 * MIB
    assert notes == ["GPU 0: no memory.reserved (old driver): total includes the reserve"]


def test_commands_are_argv_lists() -> None:
    assert gpu_query() == [
        "nvidia-smi",
        "--query-gpu=" + ",".join(GPU_FIELDS),
        "--format=csv,noheader,nounits",
    ]


# ---------------------------------------------------------------- declared vs discovered


def test_declared_and_discovered_compared() -> None:
    found = parse_gpus(data("query_gpu_idle.csv"), fields=IDLE_FIELDS)
    host = HostSpec(gpus=[GpuSpec(index=0, memory_gib=141), GpuSpec(index=1, memory_gib=141)])
    from hxp.gpu_alloc import declared_gpus

    assert [str(m) for m in compare_declared("g1", declared_gpus(host), found)] == [
        "hosts.g1.gpus: 2 declared, 1 discovered",
        "hosts.g1.gpus: GPU 1 is declared but was not discovered",
    ]
    small = HostSpec(gpus=[GpuSpec(index=0, memory_gib=80)])
    assert [str(m) for m in compare_declared("g1", declared_gpus(small), found)] == [
        "hosts.g1.gpus: GPU 0: declared 80.0 GiB, discovered 139.8 GiB as CUDA sees it "
        "(NVIDIA H200)"
    ]
    nominal = HostSpec(gpus=[GpuSpec(index=0, memory_gib=141)])  # within 5 %: no warning
    assert compare_declared("g1", declared_gpus(nominal), found) == []
    assert compare_declared("g1", [], found) == []  # nothing declared: nothing to compare


# ---------------------------------------------------------------- the double, held to real output


def run_double(argv: list[str], config: dict[str, object]) -> tuple[str, int]:
    return nvidia_smi_double.run(argv, config)


def test_double_prints_the_idle_capture() -> None:
    argv = ["--query-gpu=" + ",".join(IDLE_FIELDS), "--format=csv,noheader,nounits"]
    assert run_double(argv, {"gpus": [h200()]}) == (data("query_gpu_idle.csv"), 0)


def test_double_prints_the_busy_captures() -> None:
    config = {"gpus": [BUSY_GPU], "processes": [BUSY_PROCESS]}
    gpu = ["--query-gpu=" + ",".join(BUSY_FIELDS), "--format=csv,noheader,nounits"]
    apps = ["--query-compute-apps=" + ",".join(BUSY_APP_FIELDS), "--format=csv,noheader,nounits"]
    assert run_double(gpu, config) == (data("query_gpu_busy.csv"), 0)
    assert run_double(apps, config) == (data("query_apps_busy.csv"), 0)


def test_double_prints_the_header_captures() -> None:
    gpu = ["--query-gpu=" + ",".join(HEADER_FIELDS), "--format=csv"]
    assert run_double(gpu, {"gpus": [h200()]}) == (data("query_gpu_header.csv"), 0)
    apps = ["--query-compute-apps=" + ",".join(APP_FIELDS), "--format=csv"]
    config = {"gpus": [BUSY_GPU], "processes": [BUSY_PROCESS]}
    assert run_double(apps, config) == (data("query_apps_header.csv"), 0)


def test_double_refuses_an_unknown_field_as_the_real_one() -> None:
    text, code = run_double(["--query-gpu=index,bogus.field", "--format=csv"], {"gpus": [h200()]})
    real = data("query_bad_field.txt")
    assert (text, code) == (real.split("rc=")[0], int(real.split("rc=")[1]))


# ---------------------------------------------------------------- NvidiaSmiProbe through a runner


@pytest.fixture
def double_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `nvidia-smi` on PATH that runs the double with tmp_path/gpus.json; returns that file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    config = tmp_path / "gpus.json"
    script = bindir / "nvidia-smi"
    script.write_text(
        f'#!/bin/sh\nexec {sys.executable} {nvidia_smi_double.__file__} --config {config} "$@"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    return config


def write(config: Path, gpus: list[dict[str, object]], **extra: object) -> None:
    import json

    config.write_text(json.dumps({"gpus": gpus, "processes": [], **extra}))


REMOTE = HostSpec(
    backend="systemd",
    runner="ssh",
    address="198.18.0.9",
    gpus=[GpuSpec(index=0, memory_gib=141, name="H200")],
)


def test_probe_through_a_runner(double_on_path: Path) -> None:
    write(double_on_path, [h200(0), h200(1, uuid="GPU-1")])
    found = discover_gpus("g1", REMOTE, NvidiaSmiProbe(LocalRunner()))
    assert found.source == "nvidia-smi"
    assert [d.index for d in found.devices] == [0, 1]
    assert found.warnings == ("hosts.g1.gpus: 1 declared, 2 discovered",)


def test_probe_on_an_old_driver_asks_again_without_memory_reserved(double_on_path: Path) -> None:
    write(double_on_path, [h200(0)], unknown_fields=["memory.reserved"])
    found = discover_gpus("g1", REMOTE, NvidiaSmiProbe(LocalRunner()))
    assert found.source == "nvidia-smi"
    assert found.devices[0].total_bytes == 143771 * MIB
    assert "no memory.reserved" in found.note


def test_a_host_without_a_driver_falls_back_to_the_declared_gpus(double_on_path: Path) -> None:
    write(double_on_path, [], no_driver=True)
    found = discover_gpus("g1", REMOTE, NvidiaSmiProbe(LocalRunner()))
    assert found.source == "declared"
    assert found.note.startswith("nvidia-smi unavailable (NvidiaSmiError: local: `nvidia-smi")
    assert "exited 9: NVIDIA-SMI has failed" in found.note
    assert found.note.endswith("using the 1 GPU(s) declared under hosts.g1.gpus")
    assert [d.total_bytes for d in found.devices] == [141 * GIB]


def test_nvml_still_cannot_see_a_remote_host() -> None:
    found = discover_gpus("g1", REMOTE, NvmlProbe(object()))
    assert found.source == "declared"
    assert "NVML sees only this machine" in found.note


def test_the_double_script_runs_standalone(tmp_path: Path) -> None:
    config = tmp_path / "gpus.json"
    write(config, [h200()])
    done = subprocess.run(
        [sys.executable, nvidia_smi_double.__file__, "--config", str(config), "--query-gpu=index"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2  # no --format: refused, as the real one refuses bad usage


def test_plan_carries_warnings() -> None:
    from hxp.plan import plan_stack
    from tests.support.render_data import stack_from_data

    stack = stack_from_data(
        {
            "version": 2,
            "stack": "g",
            "hosts": {"here": {"backend": "process"}},
            "services": {"web": {"host": "here", "command": ["/bin/true"]}},
        }
    )
    plan = plan_stack(stack, {}, "h" * 64)
    warned = dataclasses.replace(plan, warnings=("hosts.x.gpus: 2 declared, 1 discovered",))
    assert warned.to_dict()["warnings"] == ["hosts.x.gpus: 2 declared, 1 discovered"]
    assert "  warning: hosts.x.gpus: 2 declared, 1 discovered" in warned.summary()
    assert "warnings" not in plan.to_dict()  # the format gains the key only when needed
