"""GPU discovery: NvmlProbe against a test double of the pynvml functions it calls, the
declared-GPUs fallback, and real discovery on this machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hxp.errors import GpuAllocationError
from hxp.gpu_alloc import GIB, GpuInfo, GpuProcess
from hxp.io.gpus import DeclaredProbe, NvmlProbe, describe, discover_gpus
from hxp.spec import GpuSpec, HostSpec
from hxp.store import Store
from hxp.units import expand_units
from tasks.gpus import allocate_unit_gpus
from tests.support.render_data import stack_from_data

REPO = Path(__file__).resolve().parents[2]


MIB = 1 << 20


class NvmlNotSupported(Exception):
    """What pynvml raises for a query a board does not support (NVMLError_NotSupported)."""


class FakeNvml:
    """TEST DOUBLE of the pynvml module: exactly the functions NvmlProbe calls, answering from
    a table of devices, and recording init/shutdown so a leak would show."""

    def __init__(self, devices: list[dict[str, Any]]) -> None:
        self._devices = devices
        self.initialised = 0
        self.shut_down = 0

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.shut_down += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self._devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        return self._devices[index]

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> Any:
        return handle["name"]

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> Any:
        return handle["uuid"]

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> Any:
        total, used = handle["total"], handle["used"]
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> Any:
        if handle.get("util") is None:
            raise NvmlNotSupported("Not Supported")
        return SimpleNamespace(gpu=handle["util"], memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: dict[str, Any]) -> Any:
        if handle.get("procs") is None:
            raise NvmlNotSupported("Not Supported")
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in handle["procs"]]


H100 = {
    "name": b"NVIDIA H100 80GB HBM3",  # older pynvml returns bytes
    "uuid": b"GPU-0b7e2d7c-0000-0000-0000-000000000000",
    "total": 80 * GIB,
    "used": 70 * GIB,
    "util": 97,
    "procs": [(4242, 70 * GIB), (4343, None)],
}
L4 = {
    "name": "NVIDIA L4",  # newer returns str
    "uuid": "GPU-11111111-0000-0000-0000-000000000000",
    "total": 24 * GIB,
    "used": 0,
    "util": None,
    "procs": None,
}


def test_nvml_probe_reads_every_device_and_shuts_nvml_down() -> None:
    nvml = FakeNvml([H100, L4])
    devices = NvmlProbe(nvml).devices()
    assert nvml.initialised == nvml.shut_down == 1
    assert devices == [
        GpuInfo(
            index=0,
            uuid="GPU-0b7e2d7c-0000-0000-0000-000000000000",
            name="NVIDIA H100 80GB HBM3",
            total_bytes=80 * GIB,
            free_bytes=10 * GIB,
            used_bytes=70 * GIB,
            utilization_pct=97,
            processes=(GpuProcess(4242, 70 * GIB), GpuProcess(4343, None)),
            source="nvml",
        ),
        GpuInfo(
            index=1,
            uuid="GPU-11111111-0000-0000-0000-000000000000",
            name="NVIDIA L4",
            total_bytes=24 * GIB,
            free_bytes=24 * GIB,
            used_bytes=0,
            utilization_pct=None,
            processes=(),
            source="nvml",
        ),
    ]


class FakeNvmlV2(FakeNvml):
    """The double with NVML's v2 memory call, which reports the driver's reserve apart (the
    numbers an H100 80GB HBM3 gave through the real pynvml: 81,559 MiB total, ~470 MiB of it
    reserved by the driver and counted as used by the v1 call)."""

    nvmlMemory_v2 = 0x02000028

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any], version: int | None = None) -> Any:
        if version is None:
            return super().nvmlDeviceGetMemoryInfo(handle)
        assert version == self.nvmlMemory_v2
        total, used, reserved = handle["total"], handle["used"], handle.get("reserved", 0)
        return SimpleNamespace(
            version=version, total=total, reserved=reserved, used=used - reserved, free=total - used
        )


def test_nvml_v2_memory_takes_the_driver_reserve_off_the_total() -> None:
    idle_h100 = {**H100, "total": 81559 * MIB, "used": 470 * MIB, "reserved": 470 * MIB}
    (device,) = NvmlProbe(FakeNvmlV2([idle_h100])).devices()
    assert device.total_bytes == (81559 - 470) * MIB  # what cudaMemGetInfo reports
    assert device.free_bytes == device.total_bytes
    assert device.used_bytes == 0
    (v1,) = NvmlProbe(FakeNvml([idle_h100])).devices()  # no v2 call: NVML's totals as they are
    assert v1.total_bytes == 81559 * MIB
    assert v1.used_bytes == 470 * MIB


def test_nvml_is_shut_down_even_when_a_query_fails() -> None:
    broken = dict(H100)
    del broken["total"]
    nvml = FakeNvml([broken])
    with pytest.raises(KeyError):
        NvmlProbe(nvml).devices()
    assert nvml.shut_down == 1


def test_discovery_falls_back_to_declared_gpus_with_a_note() -> None:
    class NoLibrary:
        def devices(self) -> list[GpuInfo]:
            raise OSError("NVML Shared Library Not Found")

    host = HostSpec(gpus=[GpuSpec(index=0, memory_gib=80, name="H100")])
    found = discover_gpus("gpu-01", host, NoLibrary())
    assert found.source == "declared"
    assert found.note == (
        "NVML unavailable (OSError: NVML Shared Library Not Found); "
        "using the 1 GPU(s) declared under hosts.gpu-01.gpus"
    )
    assert found.devices == DeclaredProbe(host).devices()
    assert describe(found) == ["GPU 0: H100 (80.0 GiB total) [declared]"]


def test_remote_hosts_use_their_declared_gpus() -> None:
    host = HostSpec(runner="ssh", address="10.0.0.5", gpus=[GpuSpec(index=0, memory_gib=40)])
    found = discover_gpus("gpu-02", host, NvmlProbe(FakeNvml([H100])))
    assert found.source == "declared"
    assert "reached by ssh" in found.note
    assert [d.total_bytes for d in found.devices] == [40 * GIB]


def test_nvml_discovery_through_the_double() -> None:
    found = discover_gpus("local", HostSpec(), NvmlProbe(FakeNvml([H100, L4])))
    assert (found.source, found.note) == ("nvml", "")
    lines = describe(found)
    assert lines[0].startswith("GPU 0: NVIDIA H100 80GB HBM3 GPU-0b7e2d7c")
    assert "10.0 GiB free, 70.0 GiB used, 97% busy, 2 process(es)" in lines[0]


def test_real_discovery_on_this_machine() -> None:
    found = discover_gpus("local", HostSpec(gpus=[GpuSpec(index=0, memory_gib=16)]))
    if found.source == "declared":  # no NVIDIA driver here
        assert found.note.startswith("NVML unavailable (")
        assert [d.index for d in found.devices] == [0]
    else:
        assert all(d.total_bytes > 0 and d.uuid for d in found.devices)


def test_allocation_with_a_nearly_full_gpu_refuses_and_reserves_nothing(tmp_path: Path) -> None:
    stack = stack_from_data(
        {
            "stack": "s",
            "hosts": {"gpu": {"backend": "process"}},
            "models": {"chat": {"host": "gpu", "model": "o/chat", "replicas": 2}},
        }
    )
    insts = {u.name: u for u in expand_units(stack)}
    probe = NvmlProbe(FakeNvml([L4, H100]))  # H100 has 10 GiB free, needs 72
    with pytest.raises(GpuAllocationError, match=r"chat-1 needs 1 GPU.*GPU 1: 10\.0 GiB free"):
        allocate_unit_gpus(stack, tmp_path, "chat", insts, insts, "t", probe)
    assert Store(tmp_path).reservations() == []  # chat-0 fit, but nothing is half-reserved


def test_gpu_check_bench_runs_here() -> None:
    out = subprocess.run(
        [sys.executable, "bench/gpu_check.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "GPU discovery" in out.stdout
    if "NVML unavailable" not in out.stdout:  # a machine with a driver
        assert "[nvml]" in out.stdout
