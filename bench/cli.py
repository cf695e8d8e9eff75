"""The CLI as an operator runs it: no-op `hxp apply`, `hxp plan`, `hxp status` vs `hxp validate`.

One command. Runs `hxp` (the installed console script of this checkout's venv) as a user would:
fresh processes (cold start included), a clean environment (no PREFECT_* variable, HOME and the
Prefect profile in a temporary directory), a local Prefect server started by `hxp server start`.
Generates a stack of `--units` process units (each a tiny HTTP server with a TCP check), deploys
it once with `hxp apply` (its peak RSS measured), then `--rounds` interleaved rounds of
validate / no-op apply / plan / status, each a fresh process, and prints the medians.

Baseline, same run: `hxp validate` of the same file (the floor of any CLI command that reads
the stack). Target (issue): each command within 2 s of it. The last line's ratio is
(median no-op apply - median validate) / 2 s, so <= 1.0 meets it.

Peak RSS of the 50-unit deploy: the `hxp apply` process itself (exact, from wait4), and what
hxp leaves around its units (the process backend's launcher and one supervisor per unit),
sampled from /proc every 20 ms while the deploy runs. The units themselves are the workload.

Run: .venv/bin/python bench/cli.py [--units 50] [--rounds 7] [--before DIR]
(`--before DIR`: also run the hxp code of another checkout, e.g. `git archive COMMIT | tar -x
-C DIR`, with this venv, interleaved in the same rounds on the same deployed units: a
before/after comparison under the same load.)
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HXP = Path(sys.executable).parent / "hxp"

# A unit: a socket that accepts and closes, in a Python without site (a few MB, starts fast).
UNIT_CODE = (
    "import socket,sys\n"
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind(('127.0.0.1',int(sys.argv[1])));s.listen(16)\n"
    "while True:\n c,_=s.accept();c.close()\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_stack(units: int, script: Path) -> dict[str, object]:
    rng = random.Random(3)
    names = [f"svc-{i:02d}" for i in range(units)]
    services: dict[str, object] = {}
    for i, name in enumerate(names):
        port = free_port()
        services[name] = {
            "host": "local",
            "command": [sys.executable, "-I", "-S", str(script), str(port)],
            "ports": {"http": port},
            "depends_on": rng.sample(names[max(0, i - 5) : i], k=min(i, rng.randint(0, 2))),
            "health": {"tcp": {"port": port}, "interval": "1s", "timeout": "500ms", "retries": 20},
        }
    return {"stack": "clibench", "hosts": {"local": {"backend": "process"}}, "services": services}


def clean_env(home: Path) -> dict[str, str]:
    """What a user's shell would have, minus anything Prefect or hxp: a fresh HOME."""
    keep = ("PATH", "LANG", "LC_ALL", "TERM", "USER", "LOGNAME", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["HOME"] = str(home)
    return env


def run(cmd: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    took = time.perf_counter() - start
    if proc.returncode not in ok:
        sys.exit(f"{' '.join(cmd[:2])} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return took


def _pss(pid: int) -> int:
    """Proportional set size: forks of one launcher share most pages, so their RSS overcounts."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _supervisors(home: Path) -> dict[int, int]:
    """PSS of the process backend's launcher and supervisors started by this bench's hxp
    (forks of the launcher: same command line, the bench's HOME in their environment)."""
    marker = f"HOME={home}".encode()
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if (
            entry.isdigit()
            and "supervisor.py" in _cmdline(int(entry))
            and marker in _environ(int(entry)).split(b"\0")
        ):
            out[int(entry)] = _pss(int(entry))
    return out


def wait_for_runner(state: Path, seconds: float = 120.0) -> None:
    """Until the warm runner `hxp server start` started listens (it imports Prefect first)."""
    log = state / "prefect" / "runner.log"
    deadline = time.monotonic() + seconds
    while not (log.exists() and "listening" in log.read_text()):
        if time.monotonic() > deadline:
            raise SystemExit(f"the warm runner did not start; see {log}")
        time.sleep(0.2)


def measured_apply(cmd: list[str], env: dict[str, str], home: Path) -> dict[str, float]:
    """Run the deploy; its wall time, the hxp process's peak RSS (wait4, exact) and the peak
    of hxp's launcher + supervisors together (sampled)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak_sup, peak_one, count = 0, 0, 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_sup, peak_one, count
        while not done.wait(0.02):
            sups = _supervisors(home)
            if sups:
                peak_sup = max(peak_sup, sum(sups.values()))
                peak_one = max(peak_one, max(sups.values()))
                count = max(count, len(sups))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"hxp apply exited {proc.returncode}:\n{out}")
    return {
        "seconds": took,
        "hxp_mb": usage.ru_maxrss / 1024,  # kB on Linux
        "supervisors_mb": peak_sup / 2**20,
        "supervisor_mb": peak_one / 2**20,
        "supervisors": count,
    }


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--before", metavar="DIR", help="also time this checkout's hxp")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hxp-clibench-"))
    state = tmp / "state"
    env = clean_env(tmp / "home")
    before_env = {**env, "PYTHONPATH": str(Path(args.before).resolve())} if args.before else {}
    (tmp / "home").mkdir()
    stack_file = tmp / "stack.yaml"
    (tmp / "unit.py").write_text(UNIT_CODE)
    stack_file.write_text(yaml.safe_dump(make_stack(args.units, tmp / "unit.py")))
    common = ["-f", str(stack_file), "--state-dir", str(state)]
    load_before = loadavg()
    try:
        run([str(HXP), "server", "start", "--state-dir", str(state)], env)
        run([str(HXP), "validate", "-f", str(stack_file)], env)  # warm the page cache
        # the first deploy in a process of its own (no warm runner): the peak RSS of one
        # process doing all of the work, the worst case
        standalone = {**env, "HXP_WARM_RUNNER": "0"}
        deploy = measured_apply([str(HXP), "apply", *common], standalone, tmp / "home")
        wait_for_runner(state)
        base = {
            "validate": [str(HXP), "validate", "-f", str(stack_file)],
            "apply": [str(HXP), "apply", *common],
            "plan": [str(HXP), "plan", *common],
            "status": [str(HXP), "status", *common],
        }
        commands = {name: (cmd, env) for name, cmd in base.items()}
        commands["apply (no runner)"] = (base["apply"], standalone)
        if args.before:
            commands.update({f"{n} (before)": (cmd, before_env) for n, cmd in base.items()})
        times: dict[str, list[float]] = {name: [] for name in commands}
        order = list(commands)
        for r in range(args.rounds):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            for name in rotated:
                cmd, cmd_env = commands[name]
                times[name].append(run(cmd, cmd_env))
        load_after = loadavg()
    finally:
        subprocess.run(
            [str(HXP), "down", *common], env=env, capture_output=True, check=False, timeout=600
        )
        subprocess.run(
            [str(HXP), "server", "stop", "--state-dir", str(state)],
            env=env,
            capture_output=True,
            check=False,
        )
        shutil.rmtree(tmp, ignore_errors=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}; load average {load_before} before, "
        f"{load_after} after"
    )
    print(f"code: {ROOT}" + (f"; before: {args.before}" if args.before else ""))
    print(
        f"{args.units} process units; local prefect server (SQLite) from `hxp server start`; "
        f"clean environment; each command a fresh process; medians of {args.rounds} rounds"
    )
    print(
        f"first deploy (no warm runner): {deploy['seconds']:.2f}s; peak RSS of the hxp apply "
        f"process "
        f"{deploy['hxp_mb']:.0f} MB; its launcher + {deploy['supervisors'] - 1:.0f} supervisors "
        f"(forks, proportional set size) {deploy['supervisors_mb']:.0f} MB together, "
        f"largest {deploy['supervisor_mb']:.1f} MB"
    )
    for name in times:
        runs = " ".join(f"{t:.2f}" for t in times[name])
        floor = "validate (before)" if name.endswith("(before)") else "validate"
        if name == "apply (no runner)":
            floor = "validate"
        extra = "" if name == floor else f"  (+{med[name] - med[floor]:.2f}s)"
        print(f"hxp {name:<17} median {med[name]:.2f}s{extra}   [{runs}]")
    for name in ("plan", "status"):
        print(f"BENCH cli_{name} ratio={(med[name] - med['validate']) / 2.0:.2f} target=1.0")
    print(f"BENCH cli_rss ratio={deploy['hxp_mb'] / 256:.2f} target=1.0")
    print(f"BENCH cli_noop ratio={(med['apply'] - med['validate']) / 2.0:.2f} target=1.0")


if __name__ == "__main__":
    main()
