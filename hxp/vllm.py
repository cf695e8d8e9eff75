"""vLLM launch builder: typed engine settings -> the argv of the pinned vLLM version.

Two forms come out of one model spec:

- `host_argv`: the program and arguments for a process on the host (process and systemd
  backends): `<dir of models.X.python>/vllm serve MODEL --flag ...` (plain `vllm` when `python`
  is a bare command name), or `python -m vllm.entrypoints.openai.api_server --model MODEL ...`
  for versions older than the `vllm serve` CLI.
- `container_entrypoint` + `container_args`: for the `vllm/vllm-openai:<tag>` image (Docker,
  Compose, Kubernetes). The image's own entrypoint changed over the years (see
  IMAGE_ENTRYPOINTS), so hxp sets it explicitly to `vllm serve` wherever that CLI exists: the
  arguments then mean the same thing on every image of the version table.

Flags that vLLM renamed or removed are listed in FLAG_TABLE with the version where it
happened and the source it was checked against. The builder emits the spelling the pinned
version knows, and refuses an `extra_args` flag that the table says the pinned version lacks,
naming `models.<name>.vllm.extra_args` and what to use instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from hxp.errors import Issue, StackValidationError
from hxp.spec import ModelSpec

VersionTuple = tuple[int, int, int]

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
SERVE_ENTRYPOINT: tuple[str, ...] = ("vllm", "serve")
# `vllm serve` (model as a positional argument) ships from this version on: vLLM PR #6431
# ("Update docs and tests to use `vllm serve`") waited for "v0.5.2 has been released" to
# switch the docs to it. Older versions only have the api_server module.
SERVE_CLI_SINCE: VersionTuple = (0, 5, 2)
# Request logging is on by default before this version and off (opt in with
# --enable-log-requests) from it on: vLLM PR #21739.
LOG_REQUESTS_OFF_BY_DEFAULT_SINCE: VersionTuple = (0, 10, 1)

# What ENTRYPOINT the vllm-openai image declares, as checked in vLLM's Dockerfile. hxp does not
# rely on it (it sets the entrypoint itself, see container_entrypoint); kept as the record.
IMAGE_ENTRYPOINTS: tuple[tuple[str, str], ...] = (
    (
        "up to at least 0.10.x",
        'ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"] '
        "(Dockerfile, then docker/Dockerfile, target vllm-openai; issue #22072, Aug 2025)",
    ),
    (
        "0.20 and later",
        'ENTRYPOINT ["vllm", "serve"] (docker/Dockerfile target vllm-openai; images 0.20-0.26 '
        "log the `vllm serve` --model deprecation warning when given --model)",
    ),
)


@dataclass(frozen=True)
class FlagChange:
    """One vLLM CLI flag with the versions that have it: [since, until)."""

    flag: str
    since: VersionTuple | None  # first version with the flag; None: older than the table
    until: VersionTuple | None  # first version without it; None: still there
    instead: str  # what to write where the flag is missing
    source: str  # where this was checked

    def present_in(self, version: VersionTuple) -> bool:
        if self.since is not None and version < self.since:
            return False
        return not (self.until is not None and version >= self.until)


FLAG_TABLE: tuple[FlagChange, ...] = (
    FlagChange(
        "--disable-log-requests",
        since=None,
        until=(0, 17, 0),
        instead="nothing (request logging is off by default since 0.10.1), "
        "or --no-enable-log-requests",
        source="deprecated by vLLM PR #21739 (0.10.1: docs v0.10.1.1 arg_utils); still in "
        "v0.14.0 (docs v0.14.0 arg_utils); removed in 0.17.0 (llm-d-benchmark PR #781)",
    ),
    FlagChange(
        "--enable-log-requests",
        since=(0, 10, 1),
        until=None,
        instead="nothing: requests are logged by default before 0.10.1",
        source="added by vLLM PR #21739; absent from docs v0.10.0 arg_utils, present in "
        "docs v0.10.1.1 arg_utils",
    ),
    FlagChange(
        "--task",
        since=None,
        until=(0, 13, 0),
        instead="--runner and/or --convert",
        source="replaced by vLLM PR #21470 ('Replace --task with --runner and --convert'); "
        "refused by 0.13.0 (gpustack issue #3991: '--task=embed can not be recognized')",
    ),
    FlagChange(
        "--runner",
        since=(0, 10, 1),
        until=None,
        instead="--task",
        source="added by vLLM PR #21470; listed in docs v0.10.1 engine_args",
    ),
    FlagChange(
        "--convert",
        since=(0, 10, 1),
        until=None,
        instead="--task",
        source="added by vLLM PR #21470; listed in docs v0.10.1 engine_args",
    ),
    FlagChange(
        "--swap-space",
        since=None,
        until=(0, 18, 0),
        instead="nothing: swap space was unused by the V1 engine; drop the flag",
        source="removed by vLLM PR #36216 ('Remove unused swap_space parameter'); present in "
        "0.17.1, absent from 0.18.0 (unsloth-zoo issue #1210, every release checked)",
    ),
    FlagChange(
        "--shutdown-timeout",
        since=(0, 18, 0),
        until=None,
        instead="nothing: before 0.18.0 vLLM aborts in-flight requests on SIGTERM; drain them "
        "in front of it (preStop pause, gateway drain) instead",
        source="added by vLLM PR #34730 ('Add shutdown timeout - allowing in-flight requests "
        "to finish': EngineArgs.shutdown_timeout, default 0 = abort), reverted by #36628 and "
        "re-applied by #36666 before the v0.18.0 release (llm-d issue #927: 'Available in: "
        "vLLM v0.18.0+')",
    ),
    FlagChange(
        "--kv-cache-memory-bytes",
        since=(0, 10, 2),
        until=None,
        instead="nothing: vLLM profiles the KV-cache memory from gpu_memory_utilization",
        source="vllm/engine/arg_utils.py @ 0.10.2 L744 (wheel); absent from 0.10.1.1; hxp pins "
        "it from 0.11.0 (hxp.calibration.PIN_KV_CACHE_MEMORY_SINCE)",
    ),
)
_FLAGS = {f.flag: f for f in FLAG_TABLE}

# Sleep mode (models.<name>.sleep_mode). `--enable-sleep-mode` came with vLLM PR #11743 ("[Core]
# Support fully transparent sleep mode", merged January 2025, first released in 0.7.0). The HTTP
# endpoints (POST /sleep?level=1|2, POST /wake_up, GET /is_sleeping -> {"is_sleeping": bool})
# are registered only when VLLM_SERVER_DEV_MODE is set (vllm/entrypoints/serve/sleep/
# api_router.py, attach_router; before that file, the same routes sat in
# vllm/entrypoints/openai/api_server.py under `if envs.VLLM_SERVER_DEV_MODE`).
SLEEP_MODE_FLAG = "--enable-sleep-mode"
SLEEP_MODE_SINCE: VersionTuple = (0, 7, 0)
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"


def sleep_mode_args(model: ModelSpec, args: Sequence[str] = ()) -> tuple[str, ...]:
    """`--enable-sleep-mode` for a model that opts in (`sleep_mode: true`), unless `args`
    already carry it; nothing otherwise."""
    if not model.sleep_mode or SLEEP_MODE_FLAG in args:
        return ()
    return (SLEEP_MODE_FLAG,)


def sleep_mode_env(model: ModelSpec) -> dict[str, str]:
    """VLLM_SERVER_DEV_MODE=1 for a model that opts in: vLLM registers /sleep, /wake_up and
    /is_sleeping only in development mode. Nothing for any other model."""
    return {DEV_MODE_ENV: "1"} if model.sleep_mode else {}


def check_sleep_mode(model: ModelSpec, field_path: str) -> None:
    """Refuse `sleep_mode: true` on a vLLM older than the flag."""
    if not model.sleep_mode or model.engine == "simulator":
        return
    if parse_version(model.vllm.version) < SLEEP_MODE_SINCE:
        raise StackValidationError(
            [
                Issue(
                    f"sleep mode needs vLLM {format_version(SLEEP_MODE_SINCE)} or later "
                    f"(--enable-sleep-mode, vLLM PR #11743); pinned: {model.vllm.version}",
                    f"{field_path}.sleep_mode",
                )
            ]
        )


_VERSION_RE = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def parse_version(text: str) -> VersionTuple:
    """`0.11.0`, `0.10.1.1`, `0.17.0rc1` -> (major, minor, patch); suffixes are ignored."""
    match = _VERSION_RE.match(text)
    if match is None:
        raise ValueError(f"invalid vLLM version {text!r}")
    major, minor, patch = (int(g) if g is not None else 0 for g in match.groups())
    return (major, minor, patch)


def format_version(version: VersionTuple) -> str:
    return ".".join(str(p) for p in version)


def has_serve_cli(version: VersionTuple) -> bool:
    return version >= SERVE_CLI_SINCE


def vllm_program(python: str) -> str:
    """The `vllm` console script next to the model's interpreter (`vllm` on PATH otherwise)."""
    if "/" not in python:
        return "vllm"
    return str(PurePosixPath(python).parent / "vllm")


def _flag_name(arg: str) -> str | None:
    """The flag an argument spells (`--x=1` -> `--x`, `--no-x` -> `--x`), or None."""
    if not arg.startswith("--") or arg == "--":
        return None
    name = "--" + arg[2:].split("=", 1)[0].replace("_", "-")
    if name.startswith("--no-") and name not in _FLAGS:
        positive = "--" + name[len("--no-") :]
        if positive in _FLAGS:
            return positive
    return name


def check_extra_args(model: ModelSpec, field_path: str) -> None:
    """Refuse extra_args flags that the version table says the pinned vLLM does not have."""
    version = parse_version(model.vllm.version)
    issues: list[Issue] = []
    for arg in model.vllm.extra_args:
        name = _flag_name(arg)
        change = _FLAGS.get(name) if name is not None else None
        if change is None or change.present_in(version):
            continue
        if change.until is not None and version >= change.until:
            when = f"was removed in vLLM {format_version(change.until)}"
        else:
            assert change.since is not None
            when = f"exists only from vLLM {format_version(change.since)} on"
        issues.append(
            Issue(
                f"{name} {when} (pinned: {model.vllm.version}); use {change.instead} "
                f"[{change.source}]",
                f"{field_path}.vllm.extra_args",
            )
        )
    if issues:
        raise StackValidationError(issues)


def engine_flags(model: ModelSpec, name: str, port: int) -> list[str]:
    """The engine and server flags of one replica (everything but the model itself)."""
    v = model.vllm
    version = parse_version(v.version)
    args: list[str] = []
    if model.revision:
        args += ["--revision", model.revision]
    args += ["--served-model-name", model.served_name or name]
    args += ["--host", "0.0.0.0", "--port", str(port)]  # noqa: S104 - a server listens
    args += ["--tensor-parallel-size", str(model.tensor_parallel())]
    if v.pipeline_parallel_size > 1:
        args += ["--pipeline-parallel-size", str(v.pipeline_parallel_size)]
    args += ["--gpu-memory-utilization", f"{v.gpu_memory_utilization:g}"]
    if v.max_model_len is not None:
        args += ["--max-model-len", str(v.max_model_len)]
    if v.dtype != "auto":
        args += ["--dtype", v.dtype]
    if v.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", v.kv_cache_dtype]
    if v.quantization is not None:
        args += ["--quantization", v.quantization]
    if v.max_num_seqs is not None:
        args += ["--max-num-seqs", str(v.max_num_seqs)]
    if v.max_num_batched_tokens is not None:
        args += ["--max-num-batched-tokens", str(v.max_num_batched_tokens)]
    if v.enforce_eager:
        args.append("--enforce-eager")
    # Requests (and, on the V0 engine, their prompts) stay out of the logs on every version.
    if version < LOG_REQUESTS_OFF_BY_DEFAULT_SINCE:
        args.append("--disable-log-requests")
    return args + list(v.extra_args)


@dataclass(frozen=True)
class VllmLaunch:
    """How to start one replica: on the host, and in the vllm-openai image."""

    host_argv: tuple[str, ...]
    container_entrypoint: tuple[str, ...] | None  # None: the image's own entrypoint
    container_args: tuple[str, ...]


def vllm_launch(model: ModelSpec, name: str, port: int, field_path: str = "") -> VllmLaunch:
    """The launch of one replica of `model` (unit `name`) listening on `port`."""
    check_extra_args(model, field_path or f"models.{name}")
    check_sleep_mode(model, field_path or f"models.{name}")
    version = parse_version(model.vllm.version)
    flags = engine_flags(model, name, port)
    flags += list(shutdown_args(model, flags))
    flags += list(sleep_mode_args(model, flags))
    if has_serve_cli(version):
        return VllmLaunch(
            host_argv=(vllm_program(model.python), "serve", model.model, *flags),
            container_entrypoint=SERVE_ENTRYPOINT,
            container_args=(model.model, *flags),
        )
    with_model = ("--model", model.model, *flags)
    return VllmLaunch(
        host_argv=(model.python, "-m", API_SERVER_MODULE, *with_model),
        container_entrypoint=None,
        container_args=with_model,
    )


def shutdown_args(model: ModelSpec, args: Sequence[str]) -> tuple[str, ...]:
    """`--shutdown-timeout N` to append to a replica's arguments: from vLLM 0.18.0 (FLAG_TABLE)
    vLLM aborts in-flight requests on SIGTERM unless given a timeout (default 0). hxp drains a
    routed replica before SIGTERM; this lets what the drain cap left running finish within the
    unit's stop_timeout, the same size the Kubernetes render gives it. Nothing before 0.18.0,
    nor when the operator's `args` already carry the flag."""
    change = next(f for f in FLAG_TABLE if f.flag == "--shutdown-timeout")
    if not change.present_in(parse_version(model.vllm.version)):
        return ()
    if any(a.split("=", 1)[0] == "--shutdown-timeout" for a in args):
        return ()
    return ("--shutdown-timeout", str(max(math.ceil(model.stop_timeout), 1)))


def vllm_args(model: ModelSpec, name: str, port: int) -> list[str]:
    """The image's arguments for one replica (kept for callers of the old helper)."""
    return list(vllm_launch(model, name, port).container_args)


def replica_gpus(model: ModelSpec, replica: int) -> tuple[int, ...] | None:
    """The GPUs one replica owns: consecutive slices of the listed GPUs (checked in spec);
    None for `gpus: auto` (chosen at deploy time, see hxp.gpu_alloc)."""
    if model.gpus == "auto":
        return None
    per = model.gpus_per_replica()
    return tuple(model.gpus[replica * per : (replica + 1) * per])


# Where model containers keep the Hugging Face cache and vLLM's compile caches: a named volume
# (Compose, Docker) or the CacheDirectory= (systemd), writable by the unit's uid.
CONTAINER_CACHE_DIR = "/var/cache/hxp"


def container_cache_env(env: dict[str, str]) -> dict[str, str]:
    """HOME and HF_HOME for a model container (the non-root uid has no home of its own);
    the operator's own env wins."""
    defaults = {"HOME": CONTAINER_CACHE_DIR, "HF_HOME": f"{CONTAINER_CACHE_DIR}/huggingface"}
    return {k: v for k, v in defaults.items() if k not in env}


__all__ = [
    "CONTAINER_CACHE_DIR",
    "DEV_MODE_ENV",
    "FLAG_TABLE",
    "IMAGE_ENTRYPOINTS",
    "SLEEP_MODE_FLAG",
    "SLEEP_MODE_SINCE",
    "FlagChange",
    "VllmLaunch",
    "check_extra_args",
    "check_sleep_mode",
    "container_cache_env",
    "engine_flags",
    "parse_version",
    "replica_gpus",
    "shutdown_args",
    "sleep_mode_args",
    "sleep_mode_env",
    "vllm_args",
    "vllm_launch",
    "vllm_program",
]
