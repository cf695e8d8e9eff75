"""GPU discovery through NVML (nvidia-ml-py, imported as `pynvml`) on this machine and through
`nvidia-smi` on a remote host's runner, with a declared fallback.

`GpuProbe` is the seam: `NvmlProbe` asks the driver on this machine; `NvidiaSmiProbe` runs
`nvidia-smi --query-*` on a host through its runner (ssh, docker exec) and parses the output
(hxp.nvidia_smi) into the same model; `DeclaredProbe` reads the host's `gpus:` from the stack.
`discover_gpus` uses NVML for a local host and nvidia-smi for a remote one, and falls back to the
declared GPUs with a note saying why; where both exist and differ, `warnings` says how.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hxp.backends.runners import Runner, runner_for
from hxp.errors import BackendError
from hxp.gpu_alloc import GpuInfo, GpuProcess, GpuSource, declared_gpus
from hxp.nvidia_smi import (
    GPU_FIELDS,
    GPU_FIELDS_WITHOUT_RESERVED,
    NvidiaSmiError,
    apps_query,
    compare_declared,
    gpu_query,
    parse_apps,
    parse_gpus,
    unknown_field,
)
from hxp.spec import HostSpec, Stack


class GpuProbe(Protocol):
    """Something that lists a machine's GPUs."""

    def devices(self) -> list[GpuInfo]: ...


class NvidiaSmiProbe:
    """The GPUs of a host, by running `nvidia-smi` through the host's runner."""

    remote = True  # it sees the host its runner reaches, not only this machine

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.notes: list[str] = []

    def _query(self, argv: list[str]) -> str | None:
        """stdout, or None when nvidia-smi refused a field (older drivers); a failure to reach
        the host is the runner's BackendError, a failing nvidia-smi an NvidiaSmiError."""
        result = self.runner.run(argv, check=False)
        said = result.text + result.error_text
        if result.returncode != 0:
            if unknown_field(said) is not None:
                return None
            raise NvidiaSmiError(
                f"{self.runner.description}: `{argv[0]} {argv[1]}` exited {result.returncode}: "
                f"{said.strip()[:300] or '(no output)'}"
            )
        return result.text

    def devices(self) -> list[GpuInfo]:
        self.notes = []
        apps_text = self._query(apps_query())
        apps = parse_apps(apps_text) if apps_text is not None else {}
        fields: tuple[str, ...] = GPU_FIELDS
        text = self._query(gpu_query(fields))
        if text is None:  # a driver without memory.reserved: ask without it
            fields = GPU_FIELDS_WITHOUT_RESERVED
            text = self._query(gpu_query(fields))
            if text is None:
                raise NvidiaSmiError(f"{self.runner.description}: nvidia-smi refused {fields}")
        return parse_gpus(text, apps, fields, warn=self.notes.append)


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


class DeclaredProbe:
    """The GPUs a host declares in the stack (`hosts.<name>.gpus`): no free memory known."""

    def __init__(self, host: HostSpec) -> None:
        self.host = host

    def devices(self) -> list[GpuInfo]:
        return declared_gpus(self.host)


@dataclass(frozen=True)
class GpuDiscovery:
    """What discovery found, where from, (for a fallback) why, and how it differs from the
    declared `gpus:` (plan warnings)."""

    devices: list[GpuInfo]
    source: GpuSource
    note: str = ""
    warnings: tuple[str, ...] = ()


def discover_gpus(
    host_name: str,
    host: HostSpec,
    probe: GpuProbe | None = None,
    state_dir: str | Path | None = None,
) -> GpuDiscovery:
    """The host's GPUs: NVML on a local host, nvidia-smi through the runner on a remote one;
    the declared ones when discovery fails (or `probe` sees only this machine)."""
    declared = DeclaredProbe(host).devices()
    fallback = f"using the {len(declared)} GPU(s) declared under hosts.{host_name}.gpus"
    remote = host.runner != "local"
    if remote and probe is None:
        probe = NvidiaSmiProbe(runner_for(host, state_dir=state_dir))
    if remote and not getattr(probe, "remote", False):
        return GpuDiscovery(
            declared,
            "declared",
            f"host {host_name!r} is reached by {host.runner}: NVML sees only this machine; "
            + fallback,
        )
    try:
        found = (probe or NvmlProbe()).devices()
    except BackendError:
        raise  # the host itself is unreachable or refused us: not a question of GPUs
    except Exception as exc:  # no library, no driver, no device nodes, unreadable output
        reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        tool = "nvidia-smi" if remote else "NVML"
        return GpuDiscovery(declared, "declared", f"{tool} unavailable ({reason}); {fallback}")
    source: GpuSource = "nvidia-smi" if remote else "nvml"
    notes = "; ".join(getattr(probe, "notes", ()) or ())
    mismatch = tuple(str(m) for m in compare_declared(host_name, declared, found))
    return GpuDiscovery(found, source, notes, mismatch)


def gpu_plan_warnings(stack: Stack, state_dir: str | Path | None = None) -> tuple[str, ...]:
    """Where a host's discovered GPUs differ from its declared `gpus:` (only hosts that
    declare some are asked), for the plan; a host that cannot be asked adds no warning here
    (observing it fails on its own)."""
    out: list[str] = []
    for name, host in sorted(stack.hosts.items()):
        if not host.gpus:
            continue
        try:
            found = discover_gpus(name, host, state_dir=state_dir)
        except BackendError:
            continue
        out.extend(found.warnings)
    return tuple(out)


def describe(discovery: GpuDiscovery) -> list[str]:
    """One line per GPU, for logs and `bench/gpu_check.py`."""
    gib = 1024**3
    lines = []
    for d in discovery.devices:
        memory = f"{d.total_bytes / gib:.1f} GiB total"
        if d.free_bytes is not None:
            memory += f", {d.free_bytes / gib:.1f} GiB free"
        if d.used_bytes is not None:
            memory += f", {d.used_bytes / gib:.1f} GiB used"
        extra = f", {d.utilization_pct}% busy" if d.utilization_pct is not None else ""
        procs = f", {len(d.processes)} process(es)" if d.processes else ""
        label = d.name or "GPU"
        uuid = f" {d.uuid}" if d.uuid else ""
        lines.append(f"GPU {d.index}: {label}{uuid} ({memory}{extra}{procs}) [{d.source}]")
    return lines
