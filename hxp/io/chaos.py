"""What a fault campaign (hxp.chaos) observes beyond the backends' own view: the processes that
run a stack's process-backend instances, counted from /proc; the containers of a docker host
(all of them with the stack's label, kept previous versions included); the systemd units of a
systemd host (loaded or installed), the processes in each unit's cgroup and the kept previous
unit files; and one probe of an instance's health check. The verdicts are hxp.chaos's."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from hxp.backends import backend_for, observe_all
from hxp.backends.base import LABEL_INSTANCE, LABEL_STACK, Remove, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.backends.runners import runner_for
from hxp.backends.systemd import BACKUP_ROOT, UNIT_DIR
from hxp.chaos import Census, Holder, census
from hxp.errors import BackendError, HxpError
from hxp.io.probes import probe
from hxp.plan import ObservedUnit
from hxp.spec import Stack
from hxp.units import UnitInstance


@dataclass
class ProcessCensus:
    """Per instance directory of a stack: its live supervisors and the processes they run (a
    unit's own children are not counted), and processes that belong to no live supervisor."""

    supervisors: dict[str, list[int]] = field(default_factory=dict)
    units: dict[str, list[int]] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _instance_under(path: str, root: str) -> str | None:
    path = path.removesuffix(" (deleted)")
    if not path.startswith(root + "/"):
        return None
    return path[len(root) + 1 :].split("/", 1)[0]


def process_census(state_dir: str | Path, stack: str) -> ProcessCensus:
    root = str((Path(state_dir) / "process" / stack).resolve())
    census = ProcessCensus()
    procs: dict[int, tuple[int, str | None, str | None]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        stat = _stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        log = _link(f"/proc/{pid}/fd/2")
        sup = _instance_under(log, root) if log.endswith("/supervisor.log") else None
        procs[pid] = (stat[1], sup, _instance_under(_link(f"/proc/{pid}/cwd"), root))
    sup_of = {pid: inst for pid, (_, inst, _) in procs.items() if inst is not None}
    for pid, inst in sup_of.items():
        census.supervisors.setdefault(inst, []).append(pid)
    for pid, (ppid, sup, cwd_inst) in procs.items():
        if sup is not None:
            continue
        if ppid in sup_of:
            census.units.setdefault(sup_of[ppid], []).append(pid)
        elif cwd_inst is not None and procs.get(ppid, (0, None, None))[2] != cwd_inst:
            census.orphans.append(f"pid {pid} of {cwd_inst}, its supervisor gone")
    return census


def answers(inst: UnitInstance) -> bool:
    """One probe of the instance's health check passes (no check: nothing to answer)."""
    if inst.health is None:
        return True
    return asyncio.run(probe(inst.health)).ok


def observed(stack: Stack, state_dir: str | Path) -> dict[str, ObservedUnit]:
    """What the stack's backends observe (the campaign's view, as `hxp status` has it)."""
    return observe_all(stack, state_dir)


def process_hash(state_dir: str | Path, stack: str, instance: str) -> str | None:
    """The config hash of what the process backend runs for `instance`, if anything."""
    seen = ProcessBackend(state_dir).observe(stack).get(instance)
    return seen.config_hash if seen else None


def remove_stack(stack: Stack, state_dir: str | Path) -> None:
    """Remove every instance of `stack` that its hosts run, kept previous versions included
    (the campaign's teardown, any backend)."""
    for host_name, host in stack.hosts.items():
        backend = backend_for(host_name, host, state_dir)
        for name in backend.observe(stack.stack):
            backend.apply(Remove(UnitRef(stack.stack, name, name)))


def docker_holders(stack: str) -> list[Holder]:
    """Every container of the local engine (DOCKER_HOST) labelled with `stack`."""
    import docker

    try:
        client = docker.from_env()
        found = client.containers.list(
            all=True, filters={"label": f"{LABEL_STACK}={stack}"}, ignore_removed=True
        )
    except docker.errors.DockerException as exc:
        raise BackendError(f"cannot list the containers of stack {stack}: {exc}") from exc
    return [
        Holder(
            name=c.name,
            instance=(c.labels or {}).get(LABEL_INSTANCE),
            running=c.status in ("running", "restarting"),
        )
        for c in found
    ]


def docker_census(stack: str, instances: list[str]) -> Census:
    from hxp.backends.docker import container_name

    names = {i: container_name(stack, i) for i in instances}
    return census(docker_holders(stack), instances, names, kind="container")


_SYSTEMD_LISTING = """
set -u
p="hxp-$1-"
echo "@units"
systemctl list-units --all --plain --no-legend --full -- "$p*" 2>/dev/null
echo "@files"
find {unit_dir} -maxdepth 1 -name "$p*.service" -printf '%f\n' 2>/dev/null
echo "@procs"
ps -e -o unit= 2>/dev/null | grep "^$p" || true
echo "@kept"
find {backup_root}/"$1" -type f 2>/dev/null || true
"""


def parse_systemd_listing(text: str, stack: str) -> tuple[list[Holder], list[str]]:
    """The holders and kept files of `_SYSTEMD_LISTING`'s answer."""
    prefix = f"hxp-{stack}-"
    part = ""
    active: dict[str, bool] = {}
    procs: dict[str, int] = {}
    kept: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("@"):
            part = line[1:]
            continue
        if not line:
            continue
        fields = line.split()
        if part == "units" and len(fields) >= 3:
            if fields[1] == "not-found" and fields[2] == "inactive":
                continue  # only named (an After= of an absent blue-green slot): no unit
            active[fields[0]] = fields[2] in ("active", "activating", "reloading", "deactivating")
        elif part == "files":
            active.setdefault(fields[0], False)
        elif part == "procs":
            procs[fields[0]] = procs.get(fields[0], 0) + 1
        elif part == "kept":
            kept.append(line)
    for unit in procs:
        active.setdefault(unit, False)
    holders = [
        Holder(
            name=unit,
            instance=unit[len(prefix) :].removesuffix(".service"),
            running=running,
            processes=procs.get(unit, 0),
        )
        for unit, running in sorted(active.items())
        if unit.startswith(prefix) and unit.endswith(".service")
    ]
    return holders, kept


def systemd_census(stack: Stack, host_name: str, instances: list[str]) -> Census:
    """The units, their processes and the kept files of `stack` on systemd host `host_name`."""
    script = _SYSTEMD_LISTING.format(unit_dir=UNIT_DIR, backup_root=BACKUP_ROOT)
    runner = runner_for(stack.hosts[host_name])
    done = runner.run(["sh", "-c", script, "sh", stack.stack], check=False)
    if done.returncode != 0:
        raise BackendError(f"cannot list the systemd units of {stack.stack}: {done.error_text}")
    holders, kept = parse_systemd_listing(done.text, stack.stack)
    names = {i: f"hxp-{stack.stack}-{i}.service" for i in instances}
    return census(holders, instances, names, kept, kind="unit")


def running_hashes(state_dir: str | Path, stack: str) -> dict[str, str | None]:
    """The config hash of every process-backend instance of `stack` that runs."""
    seen = ProcessBackend(state_dir).observe(stack)
    return {name: o.config_hash for name, o in seen.items() if o.running}


def remove_process_stack(state_dir: str | Path, stack: str) -> None:
    """Remove every process-backend instance of `stack` (the campaign's teardown)."""
    backend = ProcessBackend(state_dir)
    for name in backend.observe(stack):
        backend.apply(Remove(UnitRef(stack, name, name)))


def gateway_routes(stack: Stack, state_dir: str | Path) -> frozenset[str] | None:
    """What the stack's gateway routes now, as `unit:port` (None: the stack has no gateway)."""
    if stack.gateway is None:
        return None
    from hxp.io.gateway import stack_gateway

    live = stack_gateway(stack, state_dir).live()
    return frozenset(f"{unit}:{port}" for unit, ports in live.items() for port in ports)


def install_unit_program(stack: Stack, host_name: str) -> None:
    """Put hxp.io.chaos_unit (and the two package files it needs) under CHAOS_PYTHONPATH on a
    systemd host, through its runner: the campaign's units run it from there."""
    from hxp.chaos import CHAOS_PYTHONPATH

    runner = runner_for(stack.hosts[host_name])
    here = Path(__file__).resolve().parent
    runner.run(["mkdir", "-p", "--", f"{CHAOS_PYTHONPATH}/hxp/io"])
    for source, target in (
        (here.parent / "__init__.py", "hxp/__init__.py"),
        (here / "__init__.py", "hxp/io/__init__.py"),
        (here / "chaos_unit.py", "hxp/io/chaos_unit.py"),
    ):
        runner.write_file(f"{CHAOS_PYTHONPATH}/{target}", source.read_text(), 0o644)


def stop_gateway(stack: Stack, state_dir: str | Path) -> None:
    """Stop the stack's gateway, if it has one (the campaign's teardown)."""
    if stack.gateway is None:
        return
    from hxp.io.gateway import stack_gateway

    gateway = stack_gateway(stack, state_dir)
    gateway.stop()
    gateway.reap_orphans()  # the workers of a master the nginx-killed fault killed last
    gateway.clear()


def kill_gateway_master(stack: Stack, state_dir: str | Path) -> int | None:
    """SIGKILL the stack's nginx master (its workers are left behind, as after an OOM kill);
    its pid, or None when none ran."""
    from hxp.io.gateway import stack_gateway

    pid = stack_gateway(stack, state_dir).master_pid()
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    return pid


def gateway_up(stack: Stack, state_dir: str | Path) -> bool | None:
    """The stack's nginx master runs and every route's port accepts a connection (None: the
    stack has no gateway)."""
    if stack.gateway is None:
        return None
    from hxp.io.gateway import stack_gateway

    if stack_gateway(stack, state_dir).master_pid() is None:
        return False
    for port in stack.gateway.routes.values():
        try:
            socket.create_connection((stack.gateway.bind, port), timeout=2).close()
        except OSError:
            return False
    return True


# ------------------------------------------------------------------ a state directory to fill

FILLER = ".hxp-chaos-filler"


def mount_small_fs(path: Path, size_mib: int = 64) -> None:
    """Mount a tmpfs of `size_mib` on `path` (an empty directory the campaign made; root
    only): a file system the campaign may fill without touching any other."""
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise HxpError(f"{path}: not empty; the campaign mounts only on a state dir it made")
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "hxp-chaos", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise HxpError(f"mounting a tmpfs on {path} failed: {out.stderr.strip()}")


def is_mounted(path: Path) -> bool:
    return os.path.ismount(path)


def unmount(path: Path) -> None:
    """Unmount what mount_small_fs mounted (lazily: a process still holding a file there
    does not keep it)."""
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(path: Path) -> int:
    """Fill the file system of `path` to the last byte with one file; the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with open(path / FILLER, "ab") as out:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    written += os.write(out.fileno(), chunk[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


def free(path: Path) -> None:
    """Undo fill()."""
    (path / FILLER).unlink(missing_ok=True)
