"""GPU discovery through NVML (nvidia-ml-py, imported as `pynvml`), with a declared fallback.

`GpuProbe` is the seam: `NvmlProbe` asks the driver on this machine; `DeclaredProbe` reads the
host's `gpus:` from the stack. `discover_gpus` tries NVML for a local host and falls back to the
declared GPUs with a note saying why (no driver or library, or a remote host, whose GPUs NVML on
this machine cannot see).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from hxp.gpu_alloc import (
    GpuInfo,
    GpuSource,
    Reservation,
    choose_gpus,
    declared_gpus,
    explicit_gpus,
    host_key,
    lock_name,
)
from hxp.io.lock import stack_lock
from hxp.io.nvml import NvmlProbe
from hxp.lifecycle import SurgeDecision, surge_decision
from hxp.spec import HostSpec, ModelSpec, Stack
from hxp.store import Store
from hxp.units import UnitInstance


class GpuProbe(Protocol):
    """Something that lists a machine's GPUs."""

    def devices(self) -> list[GpuInfo]: ...


class DeclaredProbe:
    """The GPUs a host declares in the stack (`hosts.<name>.gpus`): no free memory known."""

    def __init__(self, host: HostSpec) -> None:
        self.host = host

    def devices(self) -> list[GpuInfo]:
        return declared_gpus(self.host)


@dataclass(frozen=True)
class GpuDiscovery:
    """What discovery found, where from, and (for a fallback) why."""

    devices: list[GpuInfo]
    source: GpuSource
    note: str = ""


def discover_gpus(host_name: str, host: HostSpec, probe: GpuProbe | None = None) -> GpuDiscovery:
    """The host's GPUs: NVML on a local host, else (or when NVML fails) the declared ones."""
    declared = DeclaredProbe(host).devices()
    fallback = f"using the {len(declared)} GPU(s) declared under hosts.{host_name}.gpus"
    if host.runner != "local":
        return GpuDiscovery(
            declared,
            "declared",
            f"host {host_name!r} is reached by {host.runner}: NVML sees only this machine; "
            + fallback,
        )
    try:
        found = (probe or NvmlProbe()).devices()
    except Exception as exc:  # no library, no driver, no device nodes
        reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        return GpuDiscovery(declared, "declared", f"NVML unavailable ({reason}); {fallback}")
    return GpuDiscovery(found, "nvml")


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


@dataclass(frozen=True)
class GpuPlacement:
    """Instances with the GPUs chosen for them, and how the host's GPUs were found."""

    instances: dict[str, UnitInstance]
    note: str = ""


def allocate_unit_gpus(
    stack: Stack,
    state_dir: str | Path,
    unit: str,
    instances: Mapping[str, UnitInstance],
    names: Iterable[str],
    holder: str,
    probe: GpuProbe | None = None,
) -> GpuPlacement:
    """For a `gpus: auto` model: choose and reserve GPUs for the named instances, under the
    host's GPU lock, so two models never get the same GPU. Other units: nothing to do."""
    spec = stack.unit(unit)
    wanted = [n for n in names if instances[n].gpu_count]
    if not isinstance(spec, ModelSpec) or spec.gpus != "auto" or not wanted:
        return GpuPlacement({})
    host = stack.hosts[spec.host]
    key = host_key(spec.host, host)
    same_machine = [h for h, hs in stack.hosts.items() if host_key(h, hs) == key]
    listed = explicit_gpus(stack.models, same_machine, unit)
    store = Store(state_dir)
    chosen: dict[str, UnitInstance] = {}
    with stack_lock(state_dir, lock_name(key), holder):
        found = discover_gpus(spec.host, host, probe)
        held = store.reservations(key)
        # Choose for every instance first: one that cannot be placed leaves nothing reserved.
        for name in wanted:
            inst = instances[name]
            gpus = choose_gpus(
                found.devices,
                held,
                spec,
                inst.gpu_count,
                stack.stack,
                name,
                inst.field_path,
                listed,
            )
            held = [r for r in held if r.owner != f"{stack.stack}/{name}"]
            held += [Reservation(key, g, stack.stack, name) for g in gpus]
            chosen[name] = dataclasses.replace(inst, gpus=gpus)
        for name, inst in chosen.items():
            store.reserve(key, stack.stack, name, inst.gpus or ())
    return GpuPlacement(chosen, found.note)


def surge_for(
    stack: Stack,
    state_dir: str | Path,
    inst: UnitInstance,
    mode: Literal["auto", "never"] = "auto",
    probe: GpuProbe | None = None,
) -> SurgeDecision:
    """Whether one more replica of `inst`'s unit fits beside the running ones now: the host's
    GPUs as discovered, the store's reservations and the GPUs other models list, judged by
    `hxp.lifecycle.surge_decision` (the calculator's start check on each spare GPU). Rolling
    restarts and blue-green deploys both ask this before starting a replica beside another."""
    spec = stack.unit(inst.unit)
    devices: list[GpuInfo] = []
    reservations: list[Reservation] = []
    listed: Iterable[int] = ()
    if inst.gpu_count and mode != "never":
        host = stack.hosts[spec.host]
        key = host_key(spec.host, host)
        devices = discover_gpus(spec.host, host, probe).devices
        reservations = Store(state_dir).reservations(key)
        same = [h for h, hs in stack.hosts.items() if host_key(h, hs) == key]
        listed = explicit_gpus(stack.models, same, inst.unit)
    routed = stack.gateway is not None and inst.unit in stack.gateway.routes
    return surge_decision(spec, inst.gpu_count, devices, reservations, listed, mode, routed)


def release_gpus(stack: Stack, state_dir: str | Path, instance: str) -> list[int]:
    """Drop an instance's GPU reservations (it was removed); returns the GPUs it held."""
    return [r.gpu_index for r in Store(state_dir).release(stack.stack, instance)]


__all__ = [
    "DeclaredProbe",
    "GpuDiscovery",
    "GpuPlacement",
    "GpuProbe",
    "NvmlProbe",
    "allocate_unit_gpus",
    "describe",
    "discover_gpus",
    "release_gpus",
    "surge_for",
]
