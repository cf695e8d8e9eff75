"""GPU placement of model instances: choosing GPUs under the host's reservations lock, the
blue-green surge decision, releasing reservations. Discovery (NVML, nvidia-smi, declared) lives
in hxp.io.gpus.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hxp.gpu_alloc import (
    GpuInfo,
    Reservation,
    choose_gpus,
    explicit_gpus,
    host_key,
    lock_name,
)
from hxp.io.gpus import GpuProbe, discover_gpus
from hxp.io.lock import stack_lock
from hxp.lifecycle import SurgeDecision, surge_decision
from hxp.spec import ModelSpec, Stack
from hxp.store import Store
from hxp.units import UnitInstance


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
        found = discover_gpus(spec.host, host, probe, state_dir)
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
        devices = discover_gpus(spec.host, host, probe, state_dir).devices
        reservations = Store(state_dir).reservations(key)
        same = [h for h, hs in stack.hosts.items() if host_key(h, hs) == key]
        listed = explicit_gpus(stack.models, same, inst.unit)
    routed = stack.gateway is not None and inst.unit in stack.gateway.routes
    return surge_decision(spec, inst.gpu_count, devices, reservations, listed, mode, routed)


def release_gpus(stack: Stack, state_dir: str | Path, instance: str) -> list[int]:
    """Drop an instance's GPU reservations (it was removed); returns the GPUs it held."""
    return [r.gpu_index for r in Store(state_dir).release(stack.stack, instance)]
