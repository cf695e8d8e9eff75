"""GPUs of this machine through NVML (nvidia-ml-py, imported as `pynvml`): read-only, so the
CLI may ask too (`hxp fit -f`); tasks.gpus decides what a host's GPUs are from it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from hxp.gpu_alloc import GpuInfo, GpuProcess


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class NvmlProbe:
    """The GPUs of this machine, through NVML. `nvml` is the pynvml module (or a stand-in)."""

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = nvml

    def _module(self) -> Any:
        if self._nvml is None:
            import pynvml  # type: ignore[import-untyped]

            self._nvml = pynvml
        return self._nvml

    def devices(self) -> list[GpuInfo]:
        nvml = self._module()
        nvml.nvmlInit()
        try:
            return [self._device(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
        finally:
            nvml.nvmlShutdown()

    @staticmethod
    def _device(nvml: Any, index: int) -> GpuInfo:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = _memory(nvml, handle)
        try:
            utilization: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # NVMLError_NotSupported on some boards and MIG instances
            utilization = None
        try:
            processes = tuple(
                GpuProcess(pid=int(p.pid), used_bytes=p.usedGpuMemory)
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            )
        except Exception:  # not supported, or no permission to see other users' processes
            processes = ()
        return GpuInfo(
            index=index,
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)),
            total_bytes=int(memory.total),
            free_bytes=int(memory.free),
            used_bytes=int(memory.used),
            utilization_pct=utilization,
            processes=processes,
            source="nvml",
        )


def _memory(nvml: Any, handle: Any) -> Any:
    """Memory as CUDA (and so vLLM) sees it: NVML's v1 total includes what the driver reserves
    for itself (about 0.46 GiB on an H100 80GB HBM3: 79.65 GiB by NVML, 79.19 GiB by
    ``cudaMemGetInfo``) and counts it as used. The v2 call reports that reserve apart; it is
    taken off the total and the used memory here so that utilization x total is vLLM's budget."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        with contextlib.suppress(Exception):  # older drivers: no nvmlDeviceGetMemoryInfo_v2
            m = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            reserved = int(getattr(m, "reserved", 0))
            return _Memory(int(m.total) - reserved, int(m.free), int(m.used))
    return nvml.nvmlDeviceGetMemoryInfo(handle)


@dataclass(frozen=True)
class _Memory:
    total: int
    free: int
    used: int
