"""`hxp graph` on a generated 200-unit DAG: wall time of the real CLI vs the bare YAML load.

Baseline (same run, same machine): a Python process that only imports PyYAML and loads the same
file, the floor any Python CLI reading this stack pays. Target: hxp graph answers in under a
second (the issue's bar) and within 4x of that floor.

Run: .venv/bin/python bench/graph_scale.py [--units 200] [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_stack(units: int, seed: int = 1) -> dict[str, object]:
    rng = random.Random(seed)
    names = [f"svc-{i:03d}" for i in range(units)]
    services = {}
    for i, name in enumerate(names):
        deps = rng.sample(names[max(0, i - 30) : i], k=min(i, rng.randint(0, 4)))
        services[name] = {
            "host": "local",
            "command": ["python3", "-m", "http.server", str(20000 + i)],
            "ports": {"http": 20000 + i},
            "depends_on": deps,
        }
    return {"stack": "bench", "hosts": {"local": {"backend": "process"}}, "services": services}


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=200)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stack.yaml"
        path.write_text(yaml.safe_dump(make_stack(args.units)))
        ours_cmd = [sys.executable, "-m", "hxp_cli", "graph", "-f", str(path)]
        base_cmd = [sys.executable, "-c", f"import yaml; yaml.safe_load(open({str(path)!r}))"]
        timed(ours_cmd)  # warm the file cache and bytecode
        ours, base = [], []
        for _ in range(args.runs):  # interleave so machine noise hits both alike
            ours.append(timed(ours_cmd))
            base.append(timed(base_cmd))
    o, b = statistics.median(ours), statistics.median(base)
    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}"
    )
    print(f"hxp graph, {args.units} units: median {o:.3f}s (min {min(ours):.3f}s) over {args.runs}")
    print(f"baseline (python + yaml.safe_load): median {b:.3f}s (min {min(base):.3f}s)")
    print(f"under one second: {'yes' if o < 1.0 else 'NO'}")
    print(f"BENCH graph_scale ratio={o / b:.2f} target=4.0")


if __name__ == "__main__":
    main()
