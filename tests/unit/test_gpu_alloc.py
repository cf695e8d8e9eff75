"""GPU allocation for `gpus: auto`: the pure chooser, the store's reservations, and the
deploy-time reserve/release path (no flow, a fixed GpuProbe in place of NVML)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from hxp.errors import GpuAllocationError
from hxp.gpu_alloc import (
    GIB,
    GpuInfo,
    Reservation,
    choose_gpus,
    declared_gpus,
    explicit_gpus,
    host_key,
    lock_name,
)
from hxp.spec import GpuSpec, HostSpec, ModelSpec
from hxp.store import Store
from hxp.units import expand_units
from tasks.gpus import allocate_unit_gpus, release_gpus
from tests.support.render_data import stack_from_data


def model(util: float = 0.9, tp: int = 1) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "host": "gpu",
            "model": "org/m",
            "vllm": {"gpu_memory_utilization": util, "tensor_parallel_size": tp},
        }
    )


def gpu(index: int, free_gib: float | None, total_gib: float = 80) -> GpuInfo:
    return GpuInfo(
        index=index,
        total_bytes=int(total_gib * GIB),
        free_bytes=None if free_gib is None else int(free_gib * GIB),
        source="nvml" if free_gib is not None else "declared",
    )


def choose(
    devices: list[GpuInfo],
    reservations: list[Reservation],
    m: ModelSpec,
    count: int,
    instance: str = "chat",
    listed: dict[int, str] | None = None,
) -> tuple[int, ...]:
    return choose_gpus(devices, reservations, m, count, "s", instance, "models.chat", listed)


def test_lowest_numbered_gpus_whose_free_memory_covers_the_need() -> None:
    devices = [gpu(0, 10), gpu(1, 79), gpu(2, 75), gpu(3, 80)]
    # 0.9 x 80 GiB = 72 GiB needed on each GPU
    assert choose(devices, [], model(), 1) == (1,)
    assert choose(devices, [], model(), 2) == (1, 2)
    assert choose(devices, [], model(util=0.1), 1) == (0,)


def test_gpus_reserved_by_others_or_listed_by_other_models_are_never_chosen() -> None:
    devices = [gpu(i, 80) for i in range(4)]
    held = [Reservation("local", 0, "other", "x")]
    assert choose(devices, held, model(), 2, listed={1: "models.coder (listed)"}) == (2, 3)


def test_an_instance_keeps_its_own_reservation_even_while_its_old_version_uses_it() -> None:
    devices = [gpu(0, 80), gpu(1, 2), gpu(2, 80)]  # GPU 1 is full: our running old version
    mine = [Reservation("local", 1, "s", "chat")]
    assert choose(devices, mine, model(), 1) == (1,)


def test_a_reservation_of_the_wrong_size_is_replaced() -> None:
    devices = [gpu(0, 80), gpu(1, 80), gpu(2, 80)]
    mine = [Reservation("local", 2, "s", "chat")]
    assert choose(devices, mine, model(tp=2), 2) == (0, 1)


def test_two_models_never_share_a_gpu() -> None:
    devices = [gpu(i, 80) for i in range(3)]
    reservations: list[Reservation] = []
    chosen = []
    for instance in ("chat-0", "chat-1", "coder"):
        picked = choose(devices, reservations, model(util=0.3), 1, instance)
        reservations += [Reservation("local", g, "s", instance) for g in picked]
        chosen += picked
    assert sorted(chosen) == [0, 1, 2]
    with pytest.raises(GpuAllocationError, match=r"GPU 0: taken by s/chat-0"):
        choose(devices, reservations, model(util=0.3), 1, "fourth")


def test_the_error_says_what_is_needed_and_what_is_free() -> None:
    devices = [gpu(0, 10), gpu(1, 40)]
    with pytest.raises(GpuAllocationError) as info:
        choose(devices, [Reservation("local", 1, "t", "x")], model(), 1)
    text = str(info.value)
    assert text.startswith("models.chat.gpus: chat needs 1 GPU(s) with 72.0 GiB on each")
    assert "gpu_memory_utilization 0.9" in text
    assert "GPU 0: 10.0 GiB free of 80.0 GiB, needs 72.0 GiB" in text
    assert "GPU 1: taken by t/x" in text
    assert "0 fit" in text


def test_no_gpus_at_all_is_an_error_naming_where_to_declare_them() -> None:
    with pytest.raises(GpuAllocationError, match=r"none declared under hosts\.gpu\.gpus"):
        choose([], [], model(), 1)


def test_declared_gpus_have_unknown_free_memory_and_count_whole() -> None:
    host = HostSpec(
        gpus=[GpuSpec(index=1, memory_gib=24, name="L4"), GpuSpec(index=0, memory_gib=80)]
    )
    devices = declared_gpus(host)
    assert [(d.index, d.total_bytes, d.free_bytes, d.name) for d in devices] == [
        (0, 80 * GIB, None, None),
        (1, 24 * GIB, None, "L4"),
    ]
    assert choose(devices, [], model(), 2) == (0, 1)
    with pytest.raises(GpuAllocationError, match="declared, free unknown"):
        choose(devices, [], model(), 3)


def test_host_keys_and_lock_names() -> None:
    assert host_key("a", HostSpec()) == "local"
    assert host_key("a", HostSpec(runner="ssh", address="10.0.0.5")) == "10.0.0.5"
    assert host_key("a", HostSpec(runner="docker-exec", container="box")) == "container-box"
    assert lock_name("10.0.0.5") == "gpus-10.0.0.5"
    assert lock_name("fe80::1") == "gpus-fe80--1"


def test_explicit_gpus_of_other_models_on_the_same_machine() -> None:
    models = {
        "a": ModelSpec.model_validate({"host": "h1", "model": "o/a", "gpus": [0, 1]}),
        "b": ModelSpec.model_validate({"host": "h2", "model": "o/b", "gpus": [2]}),
        "c": ModelSpec.model_validate({"host": "h1", "model": "o/c"}),
    }
    assert explicit_gpus(models, ["h1"], "c") == {0: "models.a (listed)", 1: "models.a (listed)"}
    assert explicit_gpus(models, ["h1"], "a") == {}


# ---------------------------------------------------------------- the store


def test_store_reserve_release_and_list(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.reserve("local", "s", "chat", [0, 1])
    store.reserve("local", "s", "coder", [2])
    store.reserve("10.0.0.5", "s", "chat", [0])
    assert [(r.host, r.gpu_index, r.owner) for r in store.reservations("local")] == [
        ("local", 0, "s/chat"),
        ("local", 1, "s/chat"),
        ("local", 2, "s/coder"),
    ]
    with pytest.raises(GpuAllocationError, match="GPU 2 by s/coder already reserved"):
        store.reserve("local", "t", "other", [2, 3])
    store.reserve("local", "s", "chat", [3])  # replaces what it held on that host
    assert [r.gpu_index for r in store.reservations("local")] == [2, 3]
    released = store.release("s", "chat", host="local")
    assert [(r.host, r.gpu_index) for r in released] == [("local", 3)]
    assert [r.host for r in store.reservations()] == ["10.0.0.5", "local"]
    assert [r.gpu_index for r in store.release("s", "chat")] == [0]
    assert store.release("s", "nothing") == []


# ---------------------------------------------------------------- reserve/release at deploy time


class FixedGpus:
    """A GpuProbe that reports a fixed set of GPUs (what NVML would say)."""

    def __init__(self, devices: list[GpuInfo]) -> None:
        self._devices = devices
        self.calls = 0

    def devices(self) -> list[GpuInfo]:
        self.calls += 1
        return list(self._devices)


def fleet(**chat: Any) -> Any:
    data = {
        "stack": "s",
        "hosts": {"gpu": {"backend": "process"}},
        "models": {
            "chat": {"host": "gpu", "model": "o/chat", "replicas": 2, "port": 8000, **chat},
            "coder": {"host": "gpu", "model": "o/coder", "port": 8100},
            "pinned": {"host": "gpu", "model": "o/pinned", "port": 8200, "gpus": [0]},
        },
    }
    return stack_from_data(data)


def instances(stack: Any, unit: str) -> dict[str, Any]:
    return {u.name: u for u in expand_units(stack, {unit})}


def test_allocation_reserves_sets_gpus_and_release_frees_them(tmp_path: Path) -> None:
    stack = fleet()
    probe = FixedGpus([gpu(i, 80) for i in range(4)])
    chat = instances(stack, "chat")
    placed = allocate_unit_gpus(stack, tmp_path, "chat", chat, chat, "test", probe)
    assert {n: i.gpus for n, i in placed.instances.items()} == {"chat-0": (1,), "chat-1": (2,)}
    assert dict(placed.instances["chat-0"].host_env)["CUDA_VISIBLE_DEVICES"] == "1"
    assert placed.note == ""
    coder = instances(stack, "coder")
    placed = allocate_unit_gpus(stack, tmp_path, "coder", coder, coder, "test", probe)
    assert placed.instances["coder"].gpus == (3,)
    # Full: GPU 0 is listed by `pinned`, 1-3 reserved.
    with pytest.raises(GpuAllocationError, match=r"models\.pinned"):
        allocate_unit_gpus(stack, tmp_path, "coder", {"x": coder["coder"]}, ["x"], "test", probe)
    # A second deploy of chat keeps its GPUs.
    again = allocate_unit_gpus(stack, tmp_path, "chat", chat, chat, "test", probe)
    assert again.instances["chat-1"].gpus == (2,)
    assert release_gpus(stack, tmp_path, "chat-1") == [2]
    assert [r.gpu_index for r in Store(tmp_path).reservations("local")] == [1, 3]
    assert (tmp_path / "locks" / "gpus-local.lock").exists()


def test_units_without_auto_gpus_are_left_alone(tmp_path: Path) -> None:
    stack = fleet()
    probe = FixedGpus([gpu(0, 80)])
    pinned = instances(stack, "pinned")
    placed = allocate_unit_gpus(stack, tmp_path, "pinned", pinned, pinned, "test", probe)
    assert placed.instances == {}
    assert probe.calls == 0
    assert Store(tmp_path).reservations() == []


def test_without_nvml_the_declared_gpus_are_used_with_a_note(tmp_path: Path) -> None:
    data_stack = stack_from_data(
        {
            "stack": "s",
            "hosts": {"gpu": {"backend": "process", "gpus": [{"index": 0, "memory_gib": 24}]}},
            "models": {"chat": {"host": "gpu", "model": "o/chat"}},
        }
    )
    chat = instances(data_stack, "chat")
    placed = allocate_unit_gpus(data_stack, tmp_path, "chat", chat, chat, "test")  # real NVML
    assert placed.instances["chat"].gpus == (0,)
    assert "NVML unavailable" in placed.note or placed.note == ""  # "" on a machine with GPUs


def test_concurrent_allocations_on_one_host_never_hand_out_a_gpu_twice(tmp_path: Path) -> None:
    stack = fleet()
    probe = FixedGpus([gpu(i, 80) for i in range(1, 3)])
    results: list[Any] = []

    def deploy(unit: str) -> None:
        insts = instances(stack, unit)
        try:
            results.append(allocate_unit_gpus(stack, tmp_path, unit, insts, insts, unit, probe))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=deploy, args=(u,)) for u in ("chat", "coder")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Whichever came first got its GPUs; the other was refused whole, reserving nothing.
    errors = [r for r in results if isinstance(r, GpuAllocationError)]
    placed = [r for r in results if not isinstance(r, Exception)]
    assert (len(errors), len(placed)) == (1, 1), results
    held = [(r.instance, r.gpu_index) for r in Store(tmp_path).reservations()]
    assert held == [(n, i.gpus[0]) for n, i in placed[0].instances.items()]
    assert len({g for _, g in held}) == len(held)
