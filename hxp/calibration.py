"""KV-cache calibration: what vLLM measured at start-up, and what hxp does with it.

Pure: parses start-up log text, keys measurements, decides the pinned flag and formats the
lines the simulator prints. The store keeps the measurements (``Store.kv_calibration``); the
deploy records them after a model's first successful start (``tasks.calibration``).

What vLLM logs, per release (checked in the released wheels' source):

* V0 (to 0.10.x, and V1 fallbacks): ``# GPU blocks: N, # CPU blocks: M`` then
  ``Maximum concurrency for L tokens per request: C.CCx`` (``vllm/executor/executor_base.py``;
  ``L`` unformatted); the worker's ``Memory profiling results: ... kv_cache_size=X.XXGiB`` or
  ``... the rest of the memory reserved for KV Cache is X.XXGiB.`` (``vllm/worker/worker.py``).
* V1 0.8.0-0.27.1: two lines, ``GPU KV cache size: 1,234 tokens`` and ``Maximum concurrency
  for 8,192 tokens per request: 20.60x`` (``vllm/v1/core/kv_cache_utils.py``).
* 0.28.0-0.29.0: one line, ``GPU KV cache size: 1,234 tokens, Maximum concurrency for 8,192
  tokens per request: 20.60x`` (``update_kv_cache_capacity``).
* From 0.30.0: the same line with the device's pool name first (``GPU`` on CUDA,
  ``GPU + host`` with host offload).
* ``Available KV cache memory: X GiB`` (``vllm/v1/worker/gpu_worker.py``, from 0.9.1):
  ``%.2f GiB`` up to 0.11.0, ``format_gib`` (``round(bytes / GiB, 2)``, so ``54.1``) by 0.15.0.
* With ``--kv-cache-memory-bytes`` (from 0.10.2) the worker skips profiling and logs
  ``... reserved X GiB memory for KV Cache as specified by kv_cache_memory_bytes config ...``
  instead (``%.2f`` then ``format_gib``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from hxp.spec import ModelSpec
from hxp.units import UnitInstance

GIB = 1 << 30
BLOCK_TOKENS = 16

VersionTuple = tuple[int, int, int]

#: First release with ``--kv-cache-memory-bytes`` (vllm/engine/arg_utils.py @ 0.10.2 L744;
#: absent from 0.10.1.1). hxp pins it from PIN_KV_CACHE_MEMORY_SINCE only.
KV_CACHE_MEMORY_BYTES_FLAG_SINCE: VersionTuple = (0, 10, 2)
#: hxp pins the measured KV memory from 0.11.0 (issue 17): the first release of the V1-only
#: engine (vllm/worker/ holds no V0 worker @ 0.11.0), so the flag always means one thing.
PIN_KV_CACHE_MEMORY_SINCE: VersionTuple = (0, 11, 0)
#: The V1 ``GPU KV cache size`` line (vllm/v1/core/kv_cache_utils.py @ 0.8.0 L537).
V1_TOKENS_LINE_SINCE: VersionTuple = (0, 8, 0)
#: ``Available KV cache memory`` (vllm/v1/worker/gpu_worker.py @ 0.9.1 L227).
AVAILABLE_LINE_SINCE: VersionTuple = (0, 9, 1)
#: ``format_gib`` instead of ``%.2f`` (vllm/v1/worker/gpu_worker.py @ 0.15.0 L357; 0.11.0 L298
#: still ``%.2f``; releases between were not checked: the double uses ``%.2f`` below 0.15.0).
FORMAT_GIB_SINCE: VersionTuple = (0, 15, 0)
#: One combined line (vllm/v1/core/kv_cache_utils.py @ 0.28.0 L1870; 0.27.1 L2235: two lines).
COMBINED_LINE_SINCE: VersionTuple = (0, 28, 0)
#: The combined line names the pool (``%s KV cache size``; kv_cache_utils.py @ 0.30.0 L2396).
POOL_NAME_SINCE: VersionTuple = (0, 30, 0)

_NUM = r"(\d[\d,]*)"
_FLOAT = r"(\d+(?:\.\d+)?)"
_TOKENS_RE = re.compile(r"(?:GPU|[A-Z]+)(?: \+ host)? KV cache size: " + _NUM + r" tokens")
_CONCURRENCY_RE = re.compile(
    r"Maximum concurrency for " + _NUM + r" tokens per request: " + _FLOAT + r"x"
)
_V0_BLOCKS_RE = re.compile(r"(?:# )?(?:GPU|[A-Za-z]+) blocks: (\d+), # CPU blocks: (\d+)")
_AVAILABLE_RE = re.compile(r"Available KV cache memory: " + _FLOAT + r" ?GiB")
_RESERVED_RE = re.compile(
    r"reserved " + _FLOAT + r" ?GiB memory for KV Cache as specified by kv_cache_memory_bytes"
)
_V0_REST_RE = re.compile(r"the rest of the memory reserved for KV Cache is (-?\d+(?:\.\d+)?)GiB")
_V0_PROFILE_RE = re.compile(r"Memory profiling results:.*?\bkv_cache_size=(-?\d+(?:\.\d+)?)GiB")
_V0_TOO_SMALL_RE = re.compile(
    r"maximum number of tokens that can be stored in KV cache \((\d+)\)", re.IGNORECASE
)


def _int(text: str) -> int:
    return int(text.replace(",", ""))


@dataclass(frozen=True)
class KvMeasurement:
    """What one start-up log says about the KV cache (per GPU for the memory)."""

    kv_cache_tokens: int | None = None
    max_concurrency: float | None = None
    max_model_len: int | None = None
    available_kv_gib: float | None = None
    wording: str = ""  # which form the tokens came in: v0-blocks, v1-separate, v1-combined

    @property
    def available_kv_bytes(self) -> int | None:
        if self.available_kv_gib is None:
            return None
        return round(self.available_kv_gib * GIB)

    @property
    def complete(self) -> bool:
        """Tokens and memory both known: enough to calibrate and to pin."""
        return self.kv_cache_tokens is not None and self.available_kv_gib is not None


def parse_startup_log(lines: str | Iterable[str]) -> KvMeasurement | None:
    """The KV-cache figures of a vLLM start-up log, in every wording; None when absent.

    The last occurrence wins (a restarted process appends to the same log).
    """
    text = lines if isinstance(lines, str) else "\n".join(lines)
    tokens: int | None = None
    concurrency: float | None = None
    max_len: int | None = None
    memory: float | None = None
    wording = ""
    for line in text.splitlines():
        if (m := _TOKENS_RE.search(line)) is not None:
            tokens = _int(m.group(1))
            wording = "v1-separate"
        if (m := _CONCURRENCY_RE.search(line)) is not None:
            max_len, concurrency = _int(m.group(1)), float(m.group(2))
            if _TOKENS_RE.search(line) is not None:
                wording = "v1-combined"
        if (m := _V0_BLOCKS_RE.search(line)) is not None:
            tokens = int(m.group(1)) * BLOCK_TOKENS
            wording = "v0-blocks"
        for regex in (_AVAILABLE_RE, _RESERVED_RE, _V0_REST_RE, _V0_PROFILE_RE):
            if (m := regex.search(line)) is not None:
                memory = float(m.group(1))
        if (m := _V0_TOO_SMALL_RE.search(line)) is not None and tokens is None:
            tokens = int(m.group(1))
            wording = "v0-refusal"
    if tokens is None and memory is None:
        return None
    if wording == "v0-blocks" and concurrency is not None and max_len is not None:
        # V0 prints blocks; its concurrency line is num_blocks x block_size / max_model_len.
        tokens = tokens if tokens is not None else round(concurrency * max_len)
    return KvMeasurement(tokens, concurrency, max_len, memory, wording)


@dataclass(frozen=True)
class CalibrationKey:
    """The combination a measurement holds for."""

    model: str
    revision: str
    vllm_version: str
    gpu_name: str
    tensor_parallel_size: int
    max_model_len: int | None
    gpu_memory_utilization: float

    def describe(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        length = self.max_model_len if self.max_model_len is not None else "default"
        return (
            f"{self.model}{rev}, vLLM {self.vllm_version}, {self.gpu_name}, "
            f"TP={self.tensor_parallel_size}, max_model_len {length}, "
            f"utilization {self.gpu_memory_utilization:g}"
        )


@dataclass(frozen=True)
class Calibration:
    """A stored measurement."""

    key: CalibrationKey
    kv_cache_tokens: int
    available_kv_bytes: int
    max_concurrency: float | None
    measured_at: float
    instance: str


def pin_kv_cache_memory(
    version: VersionTuple, calibration: Calibration | None, opt_in: bool
) -> int | None:
    """The bytes to pass as ``--kv-cache-memory-bytes``, or None (no measurement, opted out,
    or a vLLM older than PIN_KV_CACHE_MEMORY_SINCE)."""
    if not opt_in or calibration is None or version < PIN_KV_CACHE_MEMORY_SINCE:
        return None
    return calibration.available_kv_bytes if calibration.available_kv_bytes > 0 else None


def with_pinned_flag(argv: Iterable[str], pinned: int | None) -> tuple[str, ...]:
    """argv with ``--kv-cache-memory-bytes`` set to `pinned` (an operator's own wins)."""
    args = tuple(argv)
    if pinned is None or any(a.split("=", 1)[0] == "--kv-cache-memory-bytes" for a in args):
        return args
    return (*args, "--kv-cache-memory-bytes", str(pinned))


@dataclass(frozen=True)
class KvEstimate:
    """One model's KV cache as the plan shows it: predicted, measured, pinned."""

    unit: str
    key: CalibrationKey
    predicted_tokens: int | None = None
    predicted_kv_gib: float | None = None
    measured_tokens: int | None = None
    measured_kv_gib: float | None = None
    pinned_bytes: int | None = None
    note: str = ""

    @property
    def expected_tokens(self) -> int | None:
        """What the next start will get: the measurement where there is one (same
        combination, and pinned memory from 0.11), else the calculator's prediction."""
        return self.measured_tokens if self.measured_tokens is not None else self.predicted_tokens

    def to_dict(self) -> dict[str, object]:
        return {
            "unit": self.unit,
            "combination": self.key.describe(),
            "predicted_tokens": self.predicted_tokens,
            "predicted_kv_gib": _r(self.predicted_kv_gib),
            "measured_tokens": self.measured_tokens,
            "measured_kv_gib": _r(self.measured_kv_gib),
            "expected_tokens": self.expected_tokens,
            "pinned_kv_cache_memory_bytes": self.pinned_bytes,
            "note": self.note,
        }

    def line(self) -> str:
        def both(tokens: int | None, gib: float | None) -> str:
            if tokens is None and gib is None:
                return "unknown"
            parts = [f"{tokens:,} tokens" if tokens is not None else "? tokens"]
            if gib is not None:
                parts.append(f"{gib:.2f} GiB")
            return " / ".join(parts)

        text = (
            f"predicted {both(self.predicted_tokens, self.predicted_kv_gib)}, "
            f"measured {both(self.measured_tokens, self.measured_kv_gib)}"
        )
        if self.predicted_tokens and self.measured_tokens:
            off = (self.predicted_tokens - self.measured_tokens) / self.measured_tokens
            text += f" (prediction {off:+.1%})"
        if self.pinned_bytes is not None:
            text += f"; pins --kv-cache-memory-bytes {self.pinned_bytes}"
        if self.note:
            text += f"; {self.note}"
        return text


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --- what the simulator prints ------------------------------------------------------------


def _gib_text(version: VersionTuple, gib: float) -> str:
    return f"{round(gib, 2)}" if version >= FORMAT_GIB_SINCE else f"{gib:.2f}"


def startup_kv_lines(
    version: VersionTuple,
    available_kv_bytes: int,
    kv_cache_tokens: int,
    max_model_len: int,
    max_concurrency: float,
    *,
    pinned: bool = False,
    free_gib: float | None = None,
) -> list[str]:
    """The KV-cache lines of a start-up log, as the vLLM `version` words them (messages
    only: the logger's prefix is the caller's)."""
    gib = available_kv_bytes / GIB
    lines: list[str] = []
    if version < V1_TOKENS_LINE_SINCE:
        lines.append(f"# GPU blocks: {kv_cache_tokens // BLOCK_TOKENS}, # CPU blocks: 0")
        lines.append(
            f"Maximum concurrency for {max_model_len} tokens per request: {max_concurrency:.2f}x"
        )
        return lines
    if pinned and version >= KV_CACHE_MEMORY_BYTES_FLAG_SINCE:
        free = _gib_text(version, free_gib if free_gib is not None else 0.0)
        lines.append(
            f"Initial free memory {free} GiB, reserved {_gib_text(version, gib)} GiB memory for "
            "KV Cache as specified by kv_cache_memory_bytes config and skipped memory profiling."
        )
    elif version >= AVAILABLE_LINE_SINCE:
        lines.append(f"Available KV cache memory: {_gib_text(version, gib)} GiB")
    size = f"{kv_cache_tokens:,}"
    concurrency = (
        f"Maximum concurrency for {max_model_len:,} tokens per request: {max_concurrency:.2f}x"
    )
    if version >= COMBINED_LINE_SINCE:
        lines.append(f"GPU KV cache size: {size} tokens, {concurrency}")
    else:
        lines.append(f"GPU KV cache size: {size} tokens")
        lines.append(concurrency)
    return lines


__all__ = [
    "AVAILABLE_LINE_SINCE",
    "COMBINED_LINE_SINCE",
    "KV_CACHE_MEMORY_BYTES_FLAG_SINCE",
    "PIN_KV_CACHE_MEMORY_SINCE",
    "Calibration",
    "CalibrationKey",
    "KvEstimate",
    "KvMeasurement",
    "calibration_key",
    "kv_estimate",
    "parse_startup_log",
    "pin_kv_cache_memory",
    "pinned_instance",
    "startup_kv_lines",
    "with_pinned_flag",
]


# --- keys, pins and plan lines for a stack (pure) -------------------------------------------


def gpu_name_of(inst: UnitInstance) -> str:
    """The GPU an instance runs on, as the calibration key names it: the host's GPU entry
    (its name, else its memory), `simulated` for a simulator that claims none."""
    spec = inst.spec
    assert isinstance(spec, ModelSpec)
    gpus = {g.index: g for g in inst.host_spec.gpus}
    for index in inst.gpus or ():
        if index in gpus:
            g = gpus[index]
            return g.name or f"{g.memory_gib:g} GiB GPU"
    if inst.host_spec.gpus and not inst.gpus and spec.engine != "simulator":
        g = inst.host_spec.gpus[0]
        return g.name or f"{g.memory_gib:g} GiB GPU"
    return "simulated" if spec.engine == "simulator" else "unknown GPU"


def calibration_key(inst: UnitInstance) -> CalibrationKey | None:
    """The combination a model instance's start measures; None for a service."""
    spec = inst.spec
    if not isinstance(spec, ModelSpec):
        return None
    return CalibrationKey(
        model=spec.model,
        revision=spec.revision or "",
        vllm_version=spec.vllm.version,
        gpu_name=gpu_name_of(inst),
        tensor_parallel_size=spec.tensor_parallel(),
        max_model_len=spec.vllm.max_model_len,
        gpu_memory_utilization=spec.vllm.gpu_memory_utilization,
    )


def pinned_instance(inst: UnitInstance, calibration: Calibration | None) -> UnitInstance:
    """The instance with ``--kv-cache-memory-bytes`` pinned to the measurement, where the
    model opts in and its vLLM is new enough; unchanged otherwise."""
    spec = inst.spec
    if not isinstance(spec, ModelSpec):
        return inst
    version = _version(spec.vllm.version)
    pinned = pin_kv_cache_memory(version, calibration, spec.pin_kv_cache_memory)
    if pinned is None:
        return inst
    return replace(
        inst,
        argv=with_pinned_flag(inst.argv, pinned),
        container_args=with_pinned_flag(inst.container_args, pinned),
    )


def kv_estimate(
    inst: UnitInstance,
    calibration: Calibration | None,
    predicted_tokens: int | None = None,
    predicted_kv_gib: float | None = None,
) -> KvEstimate | None:
    """What the plan shows for one model instance."""
    key = calibration_key(inst)
    if key is None:
        return None
    spec = inst.spec
    assert isinstance(spec, ModelSpec)
    version = _version(spec.vllm.version)
    pinned = pin_kv_cache_memory(version, calibration, spec.pin_kv_cache_memory)
    note = ""
    if calibration is None:
        note = "not measured yet (recorded after the first successful start)"
    elif not spec.pin_kv_cache_memory:
        note = "pin_kv_cache_memory: false"
    elif version < PIN_KV_CACHE_MEMORY_SINCE:
        note = f"not pinned below vLLM {'.'.join(map(str, PIN_KV_CACHE_MEMORY_SINCE))}"
    return KvEstimate(
        unit=inst.unit,
        key=key,
        predicted_tokens=predicted_tokens,
        predicted_kv_gib=predicted_kv_gib,
        measured_tokens=calibration.kv_cache_tokens if calibration else None,
        measured_kv_gib=(
            calibration.available_kv_bytes / GIB
            if calibration and calibration.available_kv_bytes
            else None
        ),
        pinned_bytes=pinned,
        note=note,
    )


def _version(text: str) -> VersionTuple:
    m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if m is None:
        return (0, 0, 0)
    a, b, c = (int(g) if g is not None else 0 for g in m.groups())
    return (a, b, c)
