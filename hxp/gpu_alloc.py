"""GPU allocation for `gpus: auto` models (pure): which GPUs of a host a replica gets.

Given the host's devices (discovered through NVML, or as declared in the stack), the
reservations recorded in the store, the GPUs other units list explicitly, and what one GPU of
the replica needs, `choose_gpus` returns the indexes to use or raises GpuAllocationError saying
what is needed and what each GPU has free. A replica that already holds a reservation of the
right size keeps it (an update starts the new version on the GPUs the old one had).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from hxp.errors import GpuAllocationError
from hxp.spec import HostSpec, ModelSpec

GIB = 1024**3
GpuSource = Literal["nvml", "nvidia-smi", "declared"]


@dataclass(frozen=True)
class GpuProcess:
    """A process with memory on a GPU (NVML's compute processes)."""

    pid: int
    used_bytes: int | None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as discovered (NVML) or declared (`hosts.<name>.gpus`; free memory unknown)."""

    index: int
    total_bytes: int
    free_bytes: int | None = None
    used_bytes: int | None = None
    uuid: str | None = None
    name: str | None = None
    utilization_pct: int | None = None
    processes: tuple[GpuProcess, ...] = ()
    source: GpuSource = "declared"


@dataclass(frozen=True)
class Reservation:
    """A GPU held by one instance of one stack, as recorded in the store."""

    host: str
    gpu_index: int
    stack: str
    instance: str
    reserved_at: float = 0.0

    @property
    def owner(self) -> str:
        return f"{self.stack}/{self.instance}"


def declared_gpus(host: HostSpec) -> list[GpuInfo]:
    """The GPUs the stack declares for a host (free memory unknown)."""
    return [
        GpuInfo(index=g.index, total_bytes=int(g.memory_gib * GIB), name=g.name)
        for g in sorted(host.gpus, key=lambda g: g.index)
    ]


def host_key(host_name: str, host: HostSpec) -> str:
    """The machine a host entry points at, for reservations shared between stacks: `local` for
    this machine, the ssh address, or the container a docker-exec runner enters."""
    match host.runner:
        case "local":
            return "local"
        case "ssh":
            return host.address or host_name
        case "docker-exec":
            return f"container-{host.container}"


def lock_name(key: str) -> str:
    """The per-host GPU lock's name (a file name under STATE/locks)."""
    return "gpus-" + re.sub(r"[^A-Za-z0-9.-]", "-", key)


def gpu_need_bytes(model: ModelSpec, device: GpuInfo) -> int:
    """What one replica needs on one of its GPUs: vLLM reserves gpu_memory_utilization of the
    GPU's total memory, and refuses to start when less than that is free."""
    return int(model.vllm.gpu_memory_utilization * device.total_bytes)


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def choose_gpus(
    devices: Iterable[GpuInfo],
    reservations: Iterable[Reservation],
    model: ModelSpec,
    count: int,
    stack: str,
    instance: str,
    field_path: str,
    listed_elsewhere: Mapping[int, str] | None = None,
) -> tuple[int, ...]:
    """The GPU indexes one replica gets: its own reservation if it has one of `count` GPUs,
    else the lowest-numbered free GPUs whose free memory covers the need."""
    devices = sorted(devices, key=lambda d: d.index)
    by_index = {d.index: d for d in devices}
    owner = f"{stack}/{instance}"
    taken: dict[int, str] = dict(listed_elsewhere or {})
    mine: list[int] = []
    for r in reservations:
        if r.owner == owner:
            mine.append(r.gpu_index)
        else:
            taken.setdefault(r.gpu_index, r.owner)
    if len(mine) == count and all(i in by_index and i not in taken for i in mine):
        return tuple(sorted(mine))
    if count == 0:
        return ()
    fitting: list[int] = []
    report: list[str] = []
    for d in devices:
        need = gpu_need_bytes(model, d)
        if d.index in taken:
            report.append(f"GPU {d.index}: taken by {taken[d.index]}")
            continue
        free = d.free_bytes if d.free_bytes is not None else d.total_bytes
        shown = (
            f"{_gib(d.free_bytes)} free of {_gib(d.total_bytes)}"
            if d.free_bytes is not None
            else f"{_gib(d.total_bytes)} declared, free unknown"
        )
        if free >= need:
            fitting.append(d.index)
            report.append(f"GPU {d.index}: {shown}")
        else:
            report.append(f"GPU {d.index}: {shown}, needs {_gib(need)}")
    if len(fitting) >= count:
        return tuple(fitting[:count])
    if not devices:
        raise GpuAllocationError(
            f"{field_path}.gpus: {instance} needs {count} GPU(s), and none were found on host "
            f"{model.host!r} (no NVML there, and none declared under hosts.{model.host}.gpus)"
        )
    need = max(gpu_need_bytes(model, d) for d in devices)
    raise GpuAllocationError(
        f"{field_path}.gpus: {instance} needs {count} GPU(s) with {_gib(need)} on each "
        f"(gpu_memory_utilization {model.vllm.gpu_memory_utilization:g} of the GPU's memory); "
        f"{len(fitting)} fit: " + "; ".join(report)
    )


def explicit_gpus(
    models: Mapping[str, ModelSpec], host_names: Iterable[str], except_unit: str
) -> dict[int, str]:
    """GPUs that other models of the stack list explicitly on the same machine: never chosen."""
    hosts = set(host_names)
    out: dict[int, str] = {}
    for name, model in sorted(models.items()):
        if name == except_unit or model.host not in hosts or model.gpus == "auto":
            continue
        for index in model.gpus:
            out.setdefault(index, f"models.{name} (listed)")
    return out


__all__ = [
    "GpuInfo",
    "GpuProcess",
    "Reservation",
    "choose_gpus",
    "declared_gpus",
    "explicit_gpus",
    "gpu_need_bytes",
    "host_key",
    "lock_name",
]
