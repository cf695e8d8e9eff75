"""TEST DOUBLE of `nvidia-smi` (no GPU here): the two queries hxp's remote GPU discovery runs.

Prints exactly what a real H200 printed (driver 580.159.04; /work/shared/data/nvidia-smi-h200/,
copied to tests/data/nvidia_smi/): values joined by ", ", memory in MiB, `--format=csv` adds a
header line with units (`memory.total [MiB]`) and units after values (`143771 MiB`), an unknown
field prints `Field "X" is not a valid field to query.` and a blank line and exits 2. The GPUs
and processes come from a JSON file (`--config`):

    {"gpus": [{"index": 0, "uuid": "GPU-...", "name": "NVIDIA H200",
               "memory_total_mib": 143771, "memory_reserved_mib": 616, ...}],
     "processes": [{"pid": 435, "name": "python3", "gpu_uuid": "GPU-...",
                    "used_memory_mib": 12806}],
     "unknown_fields": ["memory.reserved"]}

A GPU's `memory.used` is its processes' memory unless `memory_used_mib` is given; `memory.free`
is total - reserved - used (+ `free_offset_mib`: the real driver's rounding showed 1 more when
idle) unless `memory_free_mib` is given. `unknown_fields` makes fields
unknown, as on an older driver; `"no_driver": true` fails as nvidia-smi does without a loaded
driver. Any other option, or none, prints the usage and exits 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

H200_UUID = "GPU-4c236329-528f-a6c2-6f08-fba7406ce978"
MIB_FIELDS = {"memory.total", "memory.reserved", "memory.used", "memory.free"}
# Header names where nvidia-smi's column title differs from the field or carries a unit.
HEADERS = {
    "utilization.gpu": "utilization.gpu [%]",
    "utilization.memory": "utilization.memory [%]",
    "power.draw": "power.draw [W]",
    "used_memory": "used_gpu_memory [MiB]",
    "used_gpu_memory": "used_gpu_memory [MiB]",
    "name": "name",
    "process_name": "process_name",
}
# What nvidia-smi prints (exit 9) on a machine whose driver is not loaded.
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n\n"
)
UNITS = {"utilization.gpu": " %", "utilization.memory": " %", "power.draw": " W"}


#: The fields of the real H200's idle query (tests/data/nvidia_smi/query_gpu_idle.csv), the
#: ones this double answers for `--query-gpu`.
CAPTURED_GPU_FIELDS = (
    "index",
    "uuid",
    "name",
    "pci.bus_id",
    "driver_version",
    "memory.total",
    "memory.reserved",
    "memory.used",
    "memory.free",
    "utilization.gpu",
    "utilization.memory",
    "temperature.gpu",
    "power.draw",
    "ecc.errors.uncorrected.volatile.total",
    "clocks_throttle_reasons.active",
)


def h200(index: int = 0, uuid: str = H200_UUID, **extra: Any) -> dict[str, Any]:
    """One GPU as the real H200 of the fixtures reported it (idle)."""
    gpu = {
        "index": index,
        "uuid": uuid,
        "name": "NVIDIA H200",
        "pci_bus_id": f"00000000:{6 + index:02X}:00.0" if index else "00000000:00:06.0",
        "driver_version": "580.159.04",
        "memory_total_mib": 143771,
        "memory_reserved_mib": 616,
        "free_offset_mib": 1,  # the driver rounds: idle free was total - reserved + 1
        "utilization_gpu": 0,
        "utilization_memory": 0,
        "temperature_gpu": 39,
        "power_draw": "126.90",
    }
    gpu.update(extra)
    return gpu


def _gpu_value(gpu: dict[str, Any], used: int, field: str) -> str:
    total = int(gpu["memory_total_mib"])
    reserved = int(gpu.get("memory_reserved_mib", 0))
    values: dict[str, Any] = {
        "index": gpu["index"],
        "uuid": gpu["uuid"],
        "name": gpu.get("name", "NVIDIA H200"),
        "pci.bus_id": gpu.get("pci_bus_id", "00000000:00:06.0"),
        "driver_version": gpu.get("driver_version", "580.159.04"),
        "memory.total": total,
        "memory.reserved": reserved,
        "memory.used": used,
        "memory.free": gpu.get(
            "memory_free_mib", total - reserved - used + int(gpu.get("free_offset_mib", 0))
        ),
        "utilization.gpu": gpu.get("utilization_gpu", 0),
        "utilization.memory": gpu.get("utilization_memory", 0),
        "temperature.gpu": gpu.get("temperature_gpu", 39),
        "power.draw": gpu.get("power_draw", "126.90"),
        "ecc.errors.uncorrected.volatile.total": gpu.get("ecc_uncorrected", 0),
        "clocks_throttle_reasons.active": gpu.get("throttle", "0x0000000000000001"),
    }
    return str(values[field])


def _app_value(proc: dict[str, Any], gpus: dict[str, dict[str, Any]], field: str) -> str:
    gpu = gpus.get(proc["gpu_uuid"], {})
    values: dict[str, Any] = {
        "pid": proc["pid"],
        "process_name": proc.get("name", "python3"),
        "gpu_uuid": proc["gpu_uuid"],
        "gpu_bus_id": gpu.get("pci_bus_id", "00000000:00:06.0"),
        "used_memory": proc["used_memory_mib"],
        "used_gpu_memory": proc["used_memory_mib"],
    }
    return str(values[field])


def _query(
    fields: list[str], rows: list[list[str]], units: bool, header: bool, known: set[str]
) -> tuple[str, int]:
    for f in fields:
        if f not in known:
            return f'Field "{f}" is not a valid field to query.\n\n', 2
    lines = []
    if header:
        lines.append(
            ", ".join(HEADERS.get(f, f"{f} [MiB]" if f in MIB_FIELDS else f) for f in fields)
        )
    for row in rows:
        shown = []
        for f, v in zip(fields, row, strict=True):
            unit = " MiB" if f in MIB_FIELDS or f in ("used_memory", "used_gpu_memory") else ""
            shown.append(v + (UNITS.get(f, unit) if units else ""))
        lines.append(", ".join(shown))
    return "".join(line + "\n" for line in lines), 0


def run(argv: list[str], config: dict[str, Any]) -> tuple[str, int]:
    """What nvidia-smi prints for `argv`, and its exit status."""
    if config.get("no_driver"):
        return NO_DRIVER, 9
    query = next((a for a in argv if a.startswith("--query-")), None)
    fmt = next((a.split("=", 1)[1] for a in argv if a.startswith("--format=")), None)
    if query is None or fmt is None:
        return "TEST DOUBLE of nvidia-smi: only --query-gpu/--query-compute-apps with --format\n", 2
    kind, _, spec = query.partition("=")
    fields = [f.strip() for f in spec.split(",") if f.strip()]
    options = {o.strip() for o in fmt.split(",")}
    units = "nounits" not in options
    header = "noheader" not in options
    unknown = set(config.get("unknown_fields", ()))
    gpus = sorted(config.get("gpus", []), key=lambda g: int(g["index"]))
    procs = config.get("processes", [])
    if kind == "--query-gpu":
        known = set(CAPTURED_GPU_FIELDS) - unknown
        rows = []
        for g in gpus:
            mine = [int(p["used_memory_mib"]) for p in procs if p["gpu_uuid"] == g["uuid"]]
            used = int(g.get("memory_used_mib", sum(mine)))
            rows.append([_gpu_value(g, used, f) for f in fields if f in known])
        return _query(fields, rows, units, header, known)
    if kind == "--query-compute-apps":
        known = {
            "pid",
            "process_name",
            "gpu_uuid",
            "gpu_bus_id",
            "used_memory",
            "used_gpu_memory",
        } - unknown
        by_uuid = {g["uuid"]: g for g in gpus}
        rows = [[_app_value(p, by_uuid, f) for f in fields if f in known] for p in procs]
        return _query(fields, rows, units, header, known)
    return f"TEST DOUBLE of nvidia-smi: {kind} is not doubled\n", 2


def main() -> int:
    args = sys.argv[1:]
    config_path = None
    if args[:1] == ["--config"] and len(args) > 1:
        config_path, args = args[1], args[2:]
    config = json.loads(Path(config_path).read_text()) if config_path else {"gpus": [h200()]}
    text, code = run(args, config)
    sys.stdout.write(text)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
