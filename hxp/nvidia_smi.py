"""`nvidia-smi --query-*` output -> the GPU model NVML discovery fills (pure).

Remote hosts are asked through their runner (hxp.io.gpus.NvidiaSmiProbe) with the two commands
built here; the parsers take the captured text. Memory is reported as CUDA (and vLLM) sees it,
as NVML discovery does: `memory.reserved` (what the driver keeps for itself: 616 MiB of
143,771 on an H200) is taken off the total. Tested on output a real H200 printed
(tests/data/nvidia_smi/).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hxp.gpu_alloc import GpuInfo, GpuProcess

MIB = 1024**2
GPU_FIELDS = (
    "index",
    "uuid",
    "name",
    "memory.total",
    "memory.reserved",
    "memory.used",
    "memory.free",
    "utilization.gpu",
)
# Drivers before `memory.reserved` existed (NVML v1): the total then includes the reserve.
GPU_FIELDS_WITHOUT_RESERVED = tuple(f for f in GPU_FIELDS if f != "memory.reserved")
APP_FIELDS = ("pid", "process_name", "gpu_uuid", "used_memory")
_UNKNOWN_FIELD_RE = re.compile(r'Field "([^"]+)" is not a valid field to query')


class NvidiaSmiError(ValueError):
    """nvidia-smi's output could not be read; the message quotes the offending line."""


def gpu_query(fields: Sequence[str] = GPU_FIELDS) -> list[str]:
    """The argv that lists the GPUs, one CSV line each, without header or units."""
    return ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]


def apps_query(fields: Sequence[str] = APP_FIELDS) -> list[str]:
    """The argv that lists the compute processes, one CSV line each."""
    return [
        "nvidia-smi",
        f"--query-compute-apps={','.join(fields)}",
        "--format=csv,noheader,nounits",
    ]


def unknown_field(output: str) -> str | None:
    """The field nvidia-smi refused (`Field "X" is not a valid field to query.`), if any."""
    found = _UNKNOWN_FIELD_RE.search(output)
    return found.group(1) if found else None


def _rows(text: str, fields: Sequence[str]) -> list[dict[str, str]]:
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        values = [v.strip() for v in line.split(", ")]
        if len(values) != len(fields):
            raise NvidiaSmiError(
                f"nvidia-smi: expected {len(fields)} values ({', '.join(fields)}), "
                f"got {len(values)}: {line.strip()[:200]!r}"
            )
        rows.append(dict(zip(fields, values, strict=True)))
    return rows


def _number(value: str) -> float | None:
    """A value without units; nvidia-smi writes `[N/A]` or `[Not Supported]` for none."""
    value = value.strip()
    if not value or value.startswith("["):
        return None
    try:
        return float(value)
    except ValueError:
        raise NvidiaSmiError(f"nvidia-smi: expected a number, got {value!r}") from None


def _mib(row: dict[str, str], field: str) -> int | None:
    value = _number(row[field]) if field in row else None
    return None if value is None else int(value * MIB)


def parse_apps(text: str, fields: Sequence[str] = APP_FIELDS) -> dict[str, tuple[GpuProcess, ...]]:
    """GPU uuid -> the compute processes on it, from `--query-compute-apps` output."""
    out: dict[str, list[GpuProcess]] = {}
    for row in _rows(text, fields):
        pid = _number(row["pid"])
        if pid is None:
            raise NvidiaSmiError(f"nvidia-smi: a process without a pid: {row}")
        used = _mib(row, "used_memory") if "used_memory" in row else _mib(row, "used_gpu_memory")
        out.setdefault(row["gpu_uuid"], []).append(GpuProcess(pid=int(pid), used_bytes=used))
    return {uuid: tuple(procs) for uuid, procs in out.items()}


def parse_gpus(
    text: str,
    apps: dict[str, tuple[GpuProcess, ...]] | None = None,
    fields: Sequence[str] = GPU_FIELDS,
    warn: Callable[[str], None] | None = None,
) -> list[GpuInfo]:
    """The GPUs in `--query-gpu` output (with `fields`), memory as CUDA sees it."""
    devices = []
    for row in _rows(text, fields):
        index = _number(row["index"])
        total = _mib(row, "memory.total")
        if index is None or total is None:
            raise NvidiaSmiError(f"nvidia-smi: a GPU without index or memory.total: {row}")
        reserved = _mib(row, "memory.reserved") or 0
        if "memory.reserved" not in row and warn is not None:
            warn(f"GPU {int(index)}: no memory.reserved (old driver): total includes the reserve")
        utilization = _number(row.get("utilization.gpu", ""))
        uuid = row.get("uuid") or None
        devices.append(
            GpuInfo(
                index=int(index),
                total_bytes=total - reserved,
                free_bytes=_mib(row, "memory.free"),
                used_bytes=_mib(row, "memory.used"),
                uuid=uuid,
                name=row.get("name") or None,
                utilization_pct=None if utilization is None else int(utilization),
                processes=(apps or {}).get(uuid or "", ()),
                source="nvidia-smi",
            )
        )
    return sorted(devices, key=lambda d: d.index)


@dataclass(frozen=True)
class GpuMismatch:
    """A difference between the GPUs a host declares and those discovered on it."""

    host: str
    message: str

    def __str__(self) -> str:
        return f"hosts.{self.host}.gpus: {self.message}"


def compare_declared(
    host: str, declared: Sequence[GpuInfo], found: Sequence[GpuInfo], tolerance: float = 0.05
) -> list[GpuMismatch]:
    """Where the declared `gpus:` and the discovered GPUs differ: count, indexes, memory
    (beyond `tolerance`: declared sizes are nominal, e.g. 141 GiB for 139.8 as CUDA sees it)."""
    if not declared:
        return []
    out: list[GpuMismatch] = []
    want = {d.index: d for d in declared}
    have = {d.index: d for d in found}
    if len(want) != len(have):
        out.append(GpuMismatch(host, f"{len(want)} declared, {len(have)} discovered"))
    for index in sorted(set(want) - set(have)):
        out.append(GpuMismatch(host, f"GPU {index} is declared but was not discovered"))
    for index in sorted(set(want) & set(have)):
        d, f = want[index], have[index]
        if abs(d.total_bytes - f.total_bytes) > tolerance * f.total_bytes:
            out.append(
                GpuMismatch(
                    host,
                    f"GPU {index}: declared {d.total_bytes / 1024**3:.1f} GiB, discovered "
                    f"{f.total_bytes / 1024**3:.1f} GiB as CUDA sees it"
                    + (f" ({f.name})" if f.name else ""),
                )
            )
    return out
