"""Blue-green model migration behind the nginx gateway, under load: no request may fail.

The model servers are hxp-vllm-sim, the development double of vLLM; nginx is real.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hxp.backends.process import ProcessBackend
from hxp.config import load_config
from hxp.errors import DeployError
from hxp.gateway import server_port
from hxp.io.gateway import NginxGateway
from hxp.store import Store
from tests.support.loadgen import BackgroundLoad
from tests.support.orchestrator import hxp_process
from tests.support.stacks import free_port, free_range, sim_fleet, tear_down_fleet

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
REQUESTS = 10_000


@pytest.fixture
def fleet(tmp_path: Path):  # type: ignore[no-untyped-def]
    base, gateway = free_range(4), free_port()
    path = sim_fleet(tmp_path / "fleet.yaml", "bg", base, gateway)
    state = tmp_path / "state"
    yield path, state, f"http://127.0.0.1:{gateway}"
    tear_down_fleet(path, state, "bg")


def deploy(files: list[Path], state: Path) -> dict:  # type: ignore[type-arg]
    from flows.deploy import deploy_stack

    return deploy_stack([str(f) for f in files], state_dir=str(state))


def overlay(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def test_new_revision_moves_in_under_load_without_a_failed_request(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, state, url = fleet
    assert deploy([path], state)["changed"]
    assert sorted(ProcessBackend(state).observe("bg")) == ["chat-0", "chat-1"]

    load = BackgroundLoad(url, "chat", REQUESTS, concurrency=32).start()
    time.sleep(1.0)
    v2 = overlay(tmp_path, "v2", "models:\n  chat:\n    revision: r2\n")
    result = deploy([path, v2], state)
    moved = load.join()

    assert [a["kind"] for a in result["plan"]["actions"]] == ["replace", "replace"]
    assert moved.sent == REQUESTS
    assert moved.failed == 0, moved.errors
    print(f"\n{moved.sent} requests at {moved.rate:.0f}/s during the migration, 0 failed")
    seen = ProcessBackend(state).observe("bg")
    assert sorted(seen) == ["chat-0-g", "chat-1-g"]
    want = load_config([path, v2], {}).stack
    from hxp.config import unit_config_hash

    assert {o.config_hash for o in seen.values()} == {unit_config_hash(want, "chat")}
    events = [e["message"] for e in Store(state).events("bg") if e["kind"] == "blue-green"]
    assert len(events) == 2
    # Moving back to slot 0 works the same way, and a re-apply changes nothing.
    assert deploy([path, v2], state)["changed"] is False


def test_a_revision_that_never_gets_ready_leaves_the_old_one_serving(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, state, url = fleet
    deploy([path], state)
    good = ProcessBackend(state).observe("bg")
    load = BackgroundLoad(url, "chat", REQUESTS, concurrency=32).start()
    time.sleep(1.0)
    bad = overlay(
        tmp_path,
        "bad",
        "models:\n  chat:\n    revision: r3\n    simulator_args: [--never-ready]\n"
        "    health: {start_period: 2s}\n",
    )
    with pytest.raises(DeployError) as err:
        deploy([path, bad], state)
    result = load.join()
    assert result.failed == 0, result.errors
    assert result.sent == REQUESTS
    assert "never became ready" in str(err.value)
    assert "new slot removed; the old one kept serving" in str(err.value)
    now = ProcessBackend(state).observe("bg")
    assert {k: v.config_hash for k, v in now.items()} == {k: v.config_hash for k, v in good.items()}
    last = Store(state).deploys("bg")[0]
    assert last.status == "failed"
    assert last.result is not None
    assert last.result["failed_unit"] == "chat"


# --------------------------------------------------------------------------- on GPUs
# The same moves for a model on GPUs: the new slot starts beside the old one only when spare
# GPUs pass the calculator's start check (surge); otherwise, with several replicas, one at a
# time; a single replica without room is refused before anything changes. There is no GPU
# here: the host declares its GPUs (`hosts.local.gpus`) and the simulator claims one per
# replica (`simulator_gpus: 1`), placed and reserved as vLLM's would be.


class NvmlLibraryNotFound(Exception):
    """What pynvml raises from nvmlInit on a machine without the NVIDIA driver."""


class NvmlWithoutDriver:
    """TEST DOUBLE of the pynvml module on a machine without an NVIDIA driver: nvmlInit fails
    as pynvml's does, so discovery uses the GPUs the host declares, on any test machine."""

    def nvmlInit(self) -> None:
        raise NvmlLibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:  # pragma: no cover - never initialised
        pass


@pytest.fixture
def declared_gpus_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import hxp.io.gpus

    real = hxp.io.gpus.NvmlProbe
    monkeypatch.setattr(hxp.io.gpus, "NvmlProbe", lambda: real(NvmlWithoutDriver()))


@pytest.fixture
def gpu_fleet(tmp_path: Path, declared_gpus_only: None):  # type: ignore[no-untyped-def]
    """A factory: a routed simulator model with `replicas` replicas, one GPU each, on a host
    that declares `gpus` GPUs of 80 GiB. Everything it started is stopped afterwards."""
    made: list[tuple[Path, Path]] = []

    def make(replicas: int, gpus: int) -> tuple[Path, Path, str]:
        base, gateway = free_range(2 * replicas), free_port()
        path = sim_fleet(
            tmp_path / "gpu-fleet.yaml", "bgg", base, gateway, replicas=replicas, gpus=gpus
        )
        state = tmp_path / "state"
        made.append((path, state))
        return path, state, f"http://127.0.0.1:{gateway}"

    yield make
    for path, state in made:
        tear_down_fleet(path, state, "bgg")


def assert_as_before(
    path: Path, state: Path, name: str, good: dict[str, str], gpus: dict[str, list[int]] | None
) -> None:
    """The unit runs exactly its old instances, each on its old config (and GPUs), and the
    gateway sends traffic to the old ports and nothing else."""
    now = ProcessBackend(state).observe(name)
    assert {k: v.config_hash for k, v in now.items()} == good
    assert all(v.running for v in now.values())
    if gpus is not None:
        assert held(state) == gpus
    stack = load_config([path], {}).stack
    assert stack.gateway is not None
    port, replicas = stack.models["chat"].port, stack.models["chat"].replicas
    assert sorted(NginxGateway(state, name, stack.gateway).live()["chat"]) == list(
        range(port, port + replicas)
    )


def held(state: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in Store(state).reservations("local"):
        out.setdefault(r.instance, []).append(r.gpu_index)
    return out


def gpus_of(state: Path, instance: str) -> str:
    """The CUDA_VISIBLE_DEVICES an instance was started with (its process spec)."""
    import json

    spec = json.loads((state / "process" / "bgg" / instance / "spec.json").read_text())
    return dict(spec["env"])["CUDA_VISIBLE_DEVICES"]


def events(state: Path, kind: str) -> list[str]:
    return [e["message"] for e in Store(state).events("bgg") if e["kind"] == kind]


def revision(tmp_path: Path, name: str, extra: str = "") -> Path:
    return overlay(tmp_path, name, f"models:\n  chat:\n    revision: {name}\n{extra}")


def test_gpu_surge_when_a_spare_gpu_fits(gpu_fleet, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path, state, _url = gpu_fleet(replicas=1, gpus=2)
    deploy([path], state)
    assert held(state) == {"chat": [0]}
    # A spy on the drain of the old slot: what runs at the moment traffic has moved over.
    import tasks.instances

    seen_at_switch: list[dict[str, bool]] = []
    real_drain = tasks.instances.wait_drained

    async def spy(inst, cap):  # type: ignore[no-untyped-def]
        seen_at_switch.append(
            {k: v.running for k, v in ProcessBackend(state).observe("bgg").items()}
        )
        return await real_drain(inst, cap)

    monkeypatch.setattr(tasks.instances, "wait_drained", spy)
    result = deploy([path, revision(tmp_path, "r2")], state)

    assert [a["kind"] for a in result["plan"]["actions"]] == ["replace"]
    (line,) = result["units"]["chat"]["strategy"]
    assert line.startswith("chat -> chat-g: surge: spare GPU memory fits one more replica on GPU 1")
    assert events(state, "blue-green-strategy") == [line]
    assert seen_at_switch == [{"chat": True, "chat-g": True}]  # both slots up, side by side
    assert sorted(ProcessBackend(state).observe("bgg")) == ["chat-g"]
    assert gpus_of(state, "chat-g") == "1"
    assert held(state) == {"chat-g": [1]}  # the old slot's GPU 0 was released


def test_gpu_one_at_a_time_without_a_spare_gpu_fails_no_request(  # type: ignore[no-untyped-def]
    gpu_fleet, tmp_path: Path, monkeypatch
) -> None:
    path, state, url = gpu_fleet(replicas=2, gpus=2)
    deploy([path], state)
    assert held(state) == {"chat-0": [0], "chat-1": [1]}
    import tasks.instances

    seen_at_drain: list[dict[str, bool]] = []
    real_drain = tasks.instances.wait_drained

    async def spy(inst, cap):  # type: ignore[no-untyped-def]
        seen_at_drain.append(
            {k: v.running for k, v in ProcessBackend(state).observe("bgg").items()}
        )
        return await real_drain(inst, cap)

    monkeypatch.setattr(tasks.instances, "wait_drained", spy)
    load = BackgroundLoad(url, "chat", REQUESTS, concurrency=32).start()
    time.sleep(1.0)
    result = deploy([path, revision(tmp_path, "r2")], state)
    moved = load.join()

    assert moved.sent == REQUESTS
    assert moved.failed == 0, moved.errors
    strategy = result["units"]["chat"]["strategy"]
    assert [s.split(":")[0] for s in strategy] == ["chat-0 -> chat-0-g", "chat-1 -> chat-1-g"]
    assert all(": one at a time: " in s for s in strategy), strategy
    assert "GPU 0: held by bgg/chat-0 (80.00 GiB, free unknown)" in strategy[0]
    assert events(state, "blue-green-strategy") == strategy
    # Each old replica stopped before its new slot existed, while the other one served (a
    # stopped old slot is kept until the deploy commits, for a rollback to start it again).
    assert seen_at_drain == [
        {"chat-0": True, "chat-1": True},
        {"chat-0": False, "chat-0-g": True, "chat-1": True},
    ]
    assert sorted(ProcessBackend(state).observe("bgg")) == ["chat-0-g", "chat-1-g"]
    assert held(state) == {"chat-0-g": [0], "chat-1-g": [1]}
    assert (gpus_of(state, "chat-0-g"), gpus_of(state, "chat-1-g")) == ("0", "1")
    assert deploy([path, revision(tmp_path, "r2")], state)["changed"] is False


def test_gpu_single_replica_without_room_is_refused_and_nothing_changes(  # type: ignore[no-untyped-def]
    gpu_fleet, tmp_path: Path
) -> None:
    from hxp.errors import HxpError

    path, state, _url = gpu_fleet(replicas=1, gpus=1)
    deploy([path], state)
    before = {
        k: (v.config_hash, v.running) for k, v in ProcessBackend(state).observe("bgg").items()
    }
    store = Store(state)
    revisions = [(r.revision, r.status) for r in store.revisions("bgg", "chat")]

    with pytest.raises(DeployError) as err:
        deploy([path, revision(tmp_path, "r2")], state)

    message = str(err.value)
    assert isinstance(err.value, HxpError)  # the CLI prints it without a traceback
    assert "refused; nothing was changed" in message
    assert "models.chat: refusing to replace chat (model hxp-sim/chat)" in message
    assert "needs 1 GPU(s) with 72.00 GiB free on each" in message
    assert "GPU 0: held by bgg/chat (80.00 GiB, free unknown)" in message
    after = {k: (v.config_hash, v.running) for k, v in ProcessBackend(state).observe("bgg").items()}
    assert after == before
    assert held(state) == {"chat": [0]}
    assert [(r.revision, r.status) for r in store.revisions("bgg", "chat")] == revisions
    last = store.deploys("bgg")[0]
    assert last.status == "failed"
    assert last.result is not None
    assert last.result["failed_unit"] == "chat"
    assert last.result["rollback"] == []
    assert events(state, "blue-green-refused") == [last.result["reason"]]
    stack = load_config([path], {}).stack
    assert stack.gateway is not None
    assert NginxGateway(state, "bgg", stack.gateway).live()["chat"] == [stack.models["chat"].port]


def test_gpu_one_at_a_time_gate_failure_restores_the_old_replica(  # type: ignore[no-untyped-def]
    gpu_fleet, tmp_path: Path
) -> None:
    path, state, url = gpu_fleet(replicas=2, gpus=2)
    deploy([path], state)
    good = {k: v.config_hash for k, v in ProcessBackend(state).observe("bgg").items()}
    load = BackgroundLoad(url, "chat", REQUESTS, concurrency=32).start()
    time.sleep(1.0)
    bad = revision(
        tmp_path, "r3", "    simulator_args: [--never-ready]\n    health: {start_period: 2s}\n"
    )
    with pytest.raises(DeployError) as err:
        deploy([path, bad], state)
    result = load.join()

    assert result.failed == 0, result.errors
    assert result.sent == REQUESTS
    message = str(err.value)
    assert "chat-0-g never became ready" in message
    assert "chat-0 restored and back behind the gateway" in message
    # Both old replicas serve their old revision on their own GPUs; the new slot is gone.
    assert_as_before(path, state, "bgg", good, {"chat-0": [0], "chat-1": [1]})
    # Why is on record: the deploy, its events and the decision it took.
    last = Store(state).deploys("bgg")[0]
    assert last.status == "failed"
    assert last.result is not None
    assert "chat-0-g never became ready" in last.result["reason"]
    assert any("chat-0 restored" in m for m in events(state, "unit-failed"))
    assert events(state, "blue-green-strategy")[-1].startswith("chat-0 -> chat-0-g: one at a time")
    lifecycle = Store(state).lifecycle("bgg")
    assert lifecycle["chat-0"].state.value == "running"
    assert "chat-0-g" not in lifecycle


def test_gpu_one_at_a_time_rollback_restarts_the_replicas_already_replaced(  # type: ignore[no-untyped-def]
    gpu_fleet, tmp_path: Path, monkeypatch
) -> None:
    """chat-0 moves one at a time, then chat-1's new slot fails its gate (a fault injected into
    the gate): chat-1 is restored at once, and the rollback brings chat-0 back on its GPU."""
    # The fake gate replaces the one tasks.deploy uses (tasks.instances.gate, as imported).
    import tasks.deploy
    from hxp.health import ReadinessGate
    from hxp.spec import HealthSpec

    path, state, _url = gpu_fleet(replicas=2, gpus=2)
    deploy([path], state)
    good = {k: v.config_hash for k, v in ProcessBackend(state).observe("bgg").items()}
    real_gate = tasks.deploy.gate

    def gate(backend, inst):  # type: ignore[no-untyped-def]
        if inst.name != "chat-1-g":
            return real_gate(backend, inst)
        failed = ReadinessGate(HealthSpec(command=["true"]))
        failed.give_up("injected: chat-1-g fails its gate")
        return failed

    monkeypatch.setattr(tasks.deploy, "gate", gate)
    with pytest.raises(DeployError) as err:
        deploy([path, revision(tmp_path, "r2")], state)

    message = str(err.value)
    assert "chat-1-g never became ready" in message
    assert "chat-1 restored and back behind the gateway" in message
    assert "chat-0-g: new slot removed; the old one kept serving" in message
    assert "chat-0 restored and back behind the gateway" in message
    assert_as_before(path, state, "bgg", good, {"chat-0": [0], "chat-1": [1]})
    monkeypatch.undo()
    assert deploy([path], state)["changed"] is False


# --------------------------------------------------------------------------- rolling back


def test_rolling_back_several_replicas_gives_each_its_own_port_back(  # type: ignore[no-untyped-def]
    fleet, tmp_path: Path, monkeypatch
) -> None:
    """Both replicas move to their new slots, then a unit that depends on the model fails:
    the rollback brings each replica's old slot back in place of that replica's own new slot
    (and drains the new one before removing it), so every replica stays behind the gateway
    throughout, no request fails under load, and the gateway ends listing exactly the old
    ports."""
    path, state, url = fleet
    deploy([path], state)
    good = {k: v.config_hash for k, v in ProcessBackend(state).observe("bg").items()}
    stack = load_config([path], {}).stack
    assert stack.gateway is not None
    base = stack.models["chat"].port
    # Slot 0 and slot 1 of each replica (blue-green: the other slot is each port + replicas).
    replicas = {"chat-0": {base, base + 2}, "chat-1": {base + 1, base + 3}}
    upstreams: list[list[int]] = []
    real_set = NginxGateway._set_upstream

    def spy(self, unit, servers, *rest):  # type: ignore[no-untyped-def]
        if unit == "chat":
            upstreams.append(sorted(server_port(s) for s in servers))
        return real_set(self, unit, servers, *rest)

    monkeypatch.setattr(NginxGateway, "_set_upstream", spy)
    bad = overlay(
        tmp_path,
        "bad",
        "models:\n  chat:\n    revision: r2\n"
        "services:\n  client:\n    host: local\n    command: [/nonexistent/client]\n"
        "    depends_on: [chat]\n",
    )
    load = BackgroundLoad(url, "chat", REQUESTS, concurrency=32).start()
    time.sleep(1.0)
    with pytest.raises(DeployError) as err:
        deploy([path, bad], state)
    during = load.join()
    assert during.failed == 0, during.errors  # the move and its rollback lose no request

    message = str(err.value)
    assert "failed at client@local" in message
    for name in ("chat-0", "chat-1"):
        assert f"{name}: previous version restarted and back behind the gateway" in message
        assert f"{name}-g: new slot removed; the old one kept serving" in message
    assert [base + 2, base + 3] in upstreams  # the move went all the way before the rollback
    for ports in upstreams:
        for name, slots in replicas.items():
            assert slots & set(ports), f"{name} left the gateway: {upstreams}"
    assert_as_before(path, state, "bg", good, None)
    after = BackgroundLoad(url, "chat", 200, concurrency=8).start().join()
    assert after.failed == 0, after.errors
    monkeypatch.undo()
    assert deploy([path], state)["changed"] is False


def test_an_unexpected_error_mid_move_is_rolled_back_like_a_failed_gate(  # type: ignore[no-untyped-def]
    fleet, tmp_path: Path, monkeypatch
) -> None:
    """chat-0 has moved to its new slot (its old one retired) when the gateway fails on
    chat-1's switch with an error no step expects: the steps taken reach the rollback, the
    retired old slot comes back, and the unit ends as it was."""
    path, state, url = fleet
    deploy([path], state)
    good = {k: v.config_hash for k, v in ProcessBackend(state).observe("bg").items()}
    stack = load_config([path], {}).stack
    assert stack.gateway is not None
    base = stack.models["chat"].port
    real_set = NginxGateway._set_upstream
    calls: list[list[int]] = []

    def flaky(self, unit, servers, *rest):  # type: ignore[no-untyped-def]
        ports = [server_port(s) for s in servers]  # the servers are `address:port`
        calls.append(sorted(ports))
        if unit == "chat" and base + 3 in ports:  # chat-1's switch to its new slot
            raise RuntimeError("injected: nginx config disk full")
        return real_set(self, unit, servers, *rest)

    monkeypatch.setattr(NginxGateway, "_set_upstream", flaky)
    with pytest.raises(DeployError) as err:
        deploy([path, revision(tmp_path, "r2")], state)
    monkeypatch.undo()

    message = str(err.value)
    assert "unexpected error after" in message
    assert "injected: nginx config disk full" in message
    assert "chat-0: previous version restarted and back behind the gateway" in message
    assert_as_before(path, state, "bg", good, None)
    after = BackgroundLoad(url, "chat", 200, concurrency=8).start().join()
    assert after.failed == 0, after.errors
    assert deploy([path], state)["changed"] is False


def test_gpu_one_at_a_time_gates_the_restored_replica_with_its_own_revision(  # type: ignore[no-untyped-def]
    gpu_fleet, tmp_path: Path
) -> None:
    """The new revision serves under another name and never gets ready: the old replica that
    made room comes back gated with its own revision's check and served name (`chat`), not
    the new one's (`chat-v3`, which it does not serve)."""
    path, state, _url = gpu_fleet(replicas=2, gpus=2)
    deploy([path], state)
    good = {k: v.config_hash for k, v in ProcessBackend(state).observe("bgg").items()}
    bad = revision(
        tmp_path,
        "r3",
        "    served_name: chat-v3\n    simulator_args: [--never-ready]\n"
        "    health: {start_period: 2s}\n",
    )
    with pytest.raises(DeployError) as err:
        deploy([path, bad], state)

    message = str(err.value)
    assert "chat-0-g never became ready" in message
    assert "chat-0 restored and back behind the gateway" in message
    assert_as_before(path, state, "bgg", good, {"chat-0": [0], "chat-1": [1]})
    assert Store(state).lifecycle("bgg")["chat-0"].state.value == "running"
    assert deploy([path], state)["changed"] is False


# --------------------------------------------------------------------------- a killed orchestrator

# `hxp apply` with the NVML double above in place (a subprocess does not see monkeypatch).
ORCHESTRATOR = """\
import sys
import hxp.io.gpus


class NvmlLibraryNotFound(Exception):
    pass


class NvmlWithoutDriver:
    def nvmlInit(self):
        raise NvmlLibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        pass


real = hxp.io.gpus.NvmlProbe
hxp.io.gpus.NvmlProbe = lambda: real(NvmlWithoutDriver())
from hxp_cli import main

sys.exit(main(sys.argv[1:]))
"""


def orchestrator(state: Path, *files: Path) -> subprocess.Popen[str]:
    """`hxp apply -f ...` with the NVML double, in a session the test can SIGKILL whole."""
    args = [a for f in files for a in ("-f", str(f))]
    return hxp_process("apply", *args, state=state, code=ORCHESTRATOR)


def kill_when(proc: subprocess.Popen[str], state: Path, stack: str, ready) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the orchestrator (its whole session) once `ready(observed)` holds."""
    deadline = time.monotonic() + 120
    while not ready(ProcessBackend(state).observe(stack)):
        assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the deploy never got there"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert Store(state).deploys(stack)[0].status == "running"


def test_an_orchestrator_killed_mid_blue_green_is_reconciled_by_the_next_apply(  # type: ignore[no-untyped-def]
    fleet, tmp_path: Path
) -> None:
    """Killed with chat-0 moved (its old slot retired, chat-0-g serving) and chat-1-g still
    gating: the next apply rolls back from what the store recorded, so both old slots serve
    again on their own ports (chat-0 created again as revision 1 defined it) and both new
    slots are gone; the previous config then changes nothing."""
    path, state, url = fleet
    deploy([path], state)
    good = {k: v.config_hash for k, v in ProcessBackend(state).observe("bg").items()}
    # r2: replica 0 passes its extra check, replica 1 never does.
    slow = overlay(
        tmp_path,
        "slow",
        "models:\n  chat:\n    revision: r2\n    health:\n"
        f"      command: [{sys.executable}, -c, 'raise SystemExit({{replica}})']\n"
        "      start_period: 300s\n",
    )
    proc = orchestrator(state, path, slow)
    kill_when(
        proc,
        state,
        "bg",
        lambda seen: "chat-0" not in seen and "chat-1-g" in seen and seen["chat-1-g"].running,
    )

    again = deploy([path], state)

    assert again["changed"] is False
    store = Store(state)
    assert [d.status for d in store.deploys("bg")][:3] == ["succeeded", "interrupted", "succeeded"]
    interrupted = store.deploys("bg")[1].result
    assert interrupted is not None
    rollback = interrupted["rollback"]
    assert "chat-0: previous version restarted and back behind the gateway" in rollback
    assert "chat-0-g: new slot removed; the old one kept serving" in rollback
    assert "chat-1-g: new slot removed; the old one kept serving" in rollback
    assert_as_before(path, state, "bg", good, None)
    now = ProcessBackend(state).observe("bg")
    assert {k: v.revision for k, v in now.items()} == {"chat-0": 1, "chat-1": 1}
    assert [r.status for r in store.revisions("bg", "chat")] == ["good", "rolled-back"]
    after = BackgroundLoad(url, "chat", 200, concurrency=8).start().join()
    assert after.failed == 0, after.errors


def test_gpu_orchestrator_killed_mid_one_at_a_time_is_reconciled_by_the_next_apply(  # type: ignore[no-untyped-def]
    gpu_fleet, tmp_path: Path
) -> None:
    """Killed while chat-0-g gates on the GPU chat-0 gave back (chat-0 stopped): the next apply
    removes chat-0-g and brings chat-0 back on a GPU as revision 1 defined it, behind the
    gateway; the previous config then changes nothing."""
    path, state, _url = gpu_fleet(replicas=2, gpus=2)
    deploy([path], state)
    good = {k: v.config_hash for k, v in ProcessBackend(state).observe("bgg").items()}
    slow = revision(
        tmp_path, "r2", "    simulator_args: [--never-ready]\n    health: {start_period: 300s}\n"
    )
    proc = orchestrator(state, path, slow)
    kill_when(
        proc,
        state,
        "bgg",
        lambda seen: "chat-0-g" in seen and seen["chat-0-g"].running and not seen["chat-0"].running,
    )

    again = deploy([path], state)

    assert again["changed"] is False
    store = Store(state)
    interrupted = store.deploys("bgg")[1]
    assert interrupted.status == "interrupted"
    assert interrupted.result is not None
    rollback = interrupted.result["rollback"]
    assert "chat-0-g: new slot removed; the old one kept serving" in rollback
    assert "chat-0: previous version restarted and back behind the gateway" in rollback
    assert_as_before(path, state, "bgg", good, {"chat-0": [0], "chat-1": [1]})
    assert store.lifecycle("bgg")["chat-0"].state.value == "running"
    assert "chat-0-g" not in store.lifecycle("bgg")
