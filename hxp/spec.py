"""Typed, frozen models of the operator's stack file (see docs/configuration.md).

Every name, port, duration, size, URL, argv list and env value is validated here, before it can
reach a unit file, a command line or a YAML document.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    model_serializer,
    model_validator,
)

from hxp.graph import find_cycle
from hxp.metric_names import FLEET_SERIES, PUBLISHED_PREFIXES

CURRENT_VERSION = 2

_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_PORT_NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,13}[a-z0-9])?")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IMAGE_RE = re.compile(
    r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?"
)
_HF_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")
_REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_VERSION_RE = re.compile(r"[0-9]+(\.[0-9]+){0,2}([a-z0-9.+-]*)")
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*"
)
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}
# Characters that must never appear in a value that reaches a unit file or a YAML document.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid name {value!r}: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def _check_port_name(value: str) -> str:
    if not _PORT_NAME_RE.fullmatch(value):
        raise ValueError(f"invalid port name {value!r}: 1-15 lowercase letters, digits and '-'")
    return value


def _check_env_key(value: str) -> str:
    if not _ENV_KEY_RE.fullmatch(value):
        raise ValueError(f"invalid environment variable name {value!r}")
    return value


def _env_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def _check_text(value: str) -> str:
    if _CONTROL_RE.search(value):
        raise ValueError(f"{value!r} contains a newline or control character")
    return value


def _check_arg(value: str) -> str:
    return _check_text(value)


def _check_program(value: str) -> str:
    # systemd reads a leading - @ : + ! | of ExecStart's program as a flag even when quoted,
    # and takes the program path literally (no $$ unescaping): neither can be quoted away.
    if value[:1] in ("-", "@", ":", "+", "!", "|") or "$" in value:
        raise ValueError(
            f"invalid program {value!r}: must not start with - @ : + ! | or contain '$'"
        )
    return _check_arg(value)


def _check_argv(value: list[str]) -> list[str]:
    if not value[0]:
        raise ValueError("the program (first argument) must not be empty")
    _check_program(value[0])
    return value


def _check_image(value: str) -> str:
    if not _IMAGE_RE.fullmatch(value):
        raise ValueError(f"invalid image reference {value!r}")
    return value


def _check_hf_repo(value: str) -> str:
    if not _HF_REPO_RE.fullmatch(value) or ".." in value:
        raise ValueError(f"invalid model id {value!r}: expected 'org/name' (no '..')")
    return value


def _check_revision(value: str) -> str:
    if not _REVISION_RE.fullmatch(value) or ".." in value:
        raise ValueError(f"invalid revision {value!r}")
    return value


def _check_version(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and not _VERSION_RE.fullmatch(value):
        raise ValueError(f"invalid version {value!r}: expected e.g. '0.11.0'")
    return value


def _check_address(value: str) -> str:
    """An IPv4 or IPv6 address, or a host name whose last label is not all digits (so that
    `10.0.0.300` is neither)."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOSTNAME_RE.fullmatch(value) or value.rsplit(".", 1)[-1].isdigit():
        raise ValueError(f"invalid host address {value!r}: neither an IP address nor a host name")
    return value


def _check_user(value: str) -> str:
    if not _USER_RE.fullmatch(value):
        raise ValueError(f"invalid user name {value!r}")
    return value


def _check_abs_path(value: str) -> str:
    _check_text(value)
    if not value.startswith("/") or any(p == ".." for p in value.split("/")):
        raise ValueError(f"invalid path {value!r}: must be absolute, without '..'")
    if re.search(r"[\s\"'\\$`;&|<>*?%]", value):
        raise ValueError(f"invalid path {value!r}: no spaces, quotes or shell characters")
    return value


def _check_file(value: str) -> str:
    if not os.path.isfile(value):
        raise ValueError(f"file {value!r} does not exist")
    return value


def _check_url(value: str) -> str:
    _check_text(value)
    if re.search(r"\s", value):
        raise ValueError(f"invalid URL {value!r}: contains whitespace")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid URL {value!r}: expected http(s)://host[:port]/path")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid URL {value!r}: bad port") from exc
    return value


def parse_duration(value: Any) -> float:
    """Parse `500ms`, `2s`, `5m`, `1h`, `1d` (or a bare number of seconds) into seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: use e.g. 500ms, 2s, 5m, 1h")
    if seconds < 0 or seconds > 366 * 86400:
        raise ValueError(f"duration {value!r} out of range")
    return seconds


def format_duration(seconds: float) -> str:
    """Format seconds back into the stack file's notation (the largest exact unit)."""
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        factor = _DURATION_UNITS[unit]
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{round(seconds * 1000)}ms"


def parse_size(value: Any) -> int:
    """Parse `512MiB`, `80GiB` (or a bare number of bytes) into bytes."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.fullmatch(value.strip())):
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    else:
        raise ValueError(f"invalid size {value!r}: use e.g. 512MiB, 80GiB")
    if size <= 0:
        raise ValueError(f"size {value!r} must be positive")
    return size


def format_size(size: int) -> str:
    """Format bytes in the largest binary unit that divides them exactly."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


Name = Annotated[str, AfterValidator(_check_name)]
PortName = Annotated[str, AfterValidator(_check_port_name)]
EnvKey = Annotated[str, AfterValidator(_check_env_key)]
EnvValue = Annotated[str, BeforeValidator(_env_value), AfterValidator(_check_text)]
Text = Annotated[str, AfterValidator(_check_text)]
Arg = Annotated[str, AfterValidator(_check_arg)]
Argv = Annotated[list[Arg], Field(min_length=1, max_length=512), AfterValidator(_check_argv)]
Port = Annotated[int, Field(ge=1, le=65535, strict=True)]
Duration = Annotated[
    float, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]
Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size, return_type=str)]
Url = Annotated[str, AfterValidator(_check_url)]
ImageRef = Annotated[str, AfterValidator(_check_image)]
AbsPath = Annotated[str, AfterValidator(_check_abs_path)]
UserName = Annotated[str, AfterValidator(_check_user)]
ExistingFile = Annotated[str, AfterValidator(_check_abs_path), AfterValidator(_check_file)]
Version = Annotated[str, BeforeValidator(_check_version)]


def is_loopback_address(address: str) -> bool:
    """Whether `address` names this machine's loopback (`localhost`, 127.0.0.0/8, ::1)."""
    if address.lower() in ("localhost", "[::1]"):
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuSpec(_Model):
    """One GPU on a host."""

    index: Annotated[int, Field(ge=0, le=63, strict=True)]
    memory_gib: Annotated[float, Field(gt=0, le=4096)]
    name: Text | None = None


Backend = Literal["process", "docker", "systemd"]
Runner = Literal["local", "ssh", "docker-exec"]


class HostSpec(_Model):
    """A machine units run on, and how hxp reaches it."""

    backend: Backend = "process"
    address: Annotated[str, AfterValidator(_check_address)] | None = None
    runner: Runner = "local"
    ssh_user: UserName | None = None
    ssh_port: Port = 22
    container: Name | None = Field(
        default=None, description="container to `docker exec` into (runner docker-exec)"
    )
    gpus: list[GpuSpec] = Field(default_factory=list, max_length=64)
    labels: dict[PortName, Text] = Field(default_factory=dict)
    work_pool: Name | None = Field(
        default=None,
        description="Prefect work pool whose worker deploys this host's units "
        "(deploy-stack with dispatch)",
    )
    ssh_key: ExistingFile | None = Field(
        default=None, description="ssh: the private key to log in with"
    )
    known_hosts: ExistingFile | None = Field(
        default=None, description="ssh: the only known_hosts file trusted (host keys pinned)"
    )
    docker_socket: AbsPath | None = Field(
        default=None,
        description="docker over ssh: the engine's socket on the host "
        "(default /var/run/docker.sock)",
    )

    @model_serializer(mode="wrap")
    def _omit_unused_ssh(self, handler: Any) -> Any:
        # Left out when unset, so adding these fields changed no existing unit's config hash.
        data = handler(self)
        if isinstance(data, dict):
            for key in ("ssh_key", "known_hosts", "docker_socket"):
                if data.get(key) is None:
                    data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _runner_needs(self) -> HostSpec:
        if self.runner == "ssh" and self.address is None:
            raise ValueError("runner 'ssh' needs an address")
        if self.runner == "docker-exec" and self.container is None:
            raise ValueError("runner 'docker-exec' needs a container")
        indexes = [g.index for g in self.gpus]
        if len(set(indexes)) != len(indexes):
            raise ValueError(f"duplicate GPU index in {indexes}")
        return self


class HttpCheck(_Model):
    url: Url
    expect_status: Annotated[int, Field(ge=100, le=599)] = 200
    body_contains: Text | None = None


class TcpCheck(_Model):
    host: Annotated[str, AfterValidator(_check_address)] = "127.0.0.1"
    port: Port


class HealthSpec(_Model):
    """How hxp decides that a unit is ready and healthy."""

    http: HttpCheck | None = None
    tcp: TcpCheck | None = None
    command: Argv | None = None
    interval: Duration = 5.0
    timeout: Duration = 2.0
    retries: Annotated[int, Field(ge=1, le=100)] = 3
    start_period: Duration = 0.0
    min_ready: Duration = Field(
        default=0.0,
        description="after its first passed check, the unit must stay up and healthy this long",
    )
    stall_window: Duration = Field(
        default=60.0,
        description="models: requests running while no token is generated this long means a "
        "stalled engine (unhealthy, out of the gateway, restarted by the supervisor)",
    )

    @model_validator(mode="after")
    def _one_check(self) -> HealthSpec:
        if self.http is None and self.tcp is None and self.command is None:
            raise ValueError("health needs at least one of http, tcp, command")
        if self.timeout <= 0 or self.interval <= 0:
            raise ValueError("health interval and timeout must be positive")
        if self.stall_window <= 0:
            raise ValueError("health stall_window must be positive")
        return self


class VolumeSpec(_Model):
    """A named volume mounted into a unit (Docker volume, Kubernetes PVC, host directory)."""

    name: Name
    target: AbsPath
    size: Size = 10 * 1024**3
    read_only: bool = False


class ResourceSpec(_Model):
    memory: Size | None = None
    cpus: Annotated[float, Field(gt=0, le=1024)] | None = None


RestartPolicy = Literal["always", "on-failure", "no"]


class _UnitSpec(_Model):
    """Fields every deployable unit (service or model) shares."""

    host: Name
    part_of: Name | None = Field(
        default=None,
        description="set by hxp: the unit declared with `hosts:` that this unit is the part "
        "of on one host (hxp.spec.spread_hosts)",
    )
    env: dict[EnvKey, EnvValue] = Field(default_factory=dict)
    secret_env: dict[EnvKey, Name] = Field(
        default_factory=dict,
        description="environment variable -> Prefect Secret block (Kubernetes: Secret) name",
    )
    depends_on: list[Name] = Field(default_factory=list)
    replicas: Annotated[int, Field(ge=1, le=64, strict=True)] = 1
    health: HealthSpec | None = None
    image: ImageRef | None = None
    user: UserName = Field(default="hxp", description="system user for process/systemd units")
    uid: Annotated[int, Field(ge=1, le=2**31 - 1)] = Field(
        default=10001, description="numeric non-root uid for containers (Docker, Kubernetes)"
    )
    ingress_host: Annotated[str, AfterValidator(_check_address)] | None = Field(
        default=None, description="Kubernetes Ingress host name for this unit"
    )
    workdir: AbsPath | None = None
    volumes: list[VolumeSpec] = Field(default_factory=list)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    restart: RestartPolicy = "on-failure"
    stop_timeout: Duration = 10.0
    bake: Duration | None = Field(
        default=None,
        description="how long a deploy watches this unit's new instances after the final "
        "verification before it commits (overrides deploy.bake); 0: no bake",
    )

    @model_validator(mode="after")
    def _unique_lists(self) -> _UnitSpec:
        if len(set(self.depends_on)) != len(self.depends_on):
            raise ValueError(f"depends_on lists a unit twice: {self.depends_on}")
        names = [v.name for v in self.volumes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate volume name in {names}")
        clash = set(self.env) & set(self.secret_env)
        if clash:
            raise ValueError(f"{sorted(clash)} set in both env and secret_env")
        return self


class ConfigFileSpec(_Model):
    """A file hxp writes for a service before it starts (process hosts); a change to it alone
    is applied by the service's `reload` without a restart. The overwritten file is backed up."""

    path: AbsPath
    content: Annotated[str, Field(max_length=1_000_000)]
    mode: Annotated[int, Field(ge=0, le=0o777, strict=True)] = 0o644


class ReloadSpec(_Model):
    """How a running service re-reads its config_files: a signal to its process, or a command."""

    signal: Literal["HUP", "USR1", "USR2"] | None = None
    command: Argv | None = None

    @model_validator(mode="after")
    def _one_way(self) -> ReloadSpec:
        if (self.signal is None) == (self.command is None):
            raise ValueError("reload: give exactly one of signal or command")
        return self


def _omit_unset_bake(data: Any) -> Any:
    """A unit's dump leaves `bake` out when unset (deploy policy, added later: never part of
    the unit's config hash, and no dump of an existing unit changes)."""
    if isinstance(data, dict) and data.get("bake") is None:
        data.pop("bake", None)
    return data


class ServiceSpec(_UnitSpec):
    """A supporting service: database, cache, gateway, exporter."""

    command: Argv | None = None
    ports: dict[PortName, Port] = Field(default_factory=dict)
    config_files: list[ConfigFileSpec] = Field(default_factory=list, max_length=64)
    reload: ReloadSpec | None = Field(
        default=None, description="signal or command that makes it re-read its config_files"
    )

    @model_serializer(mode="wrap")
    def _omit_unused_reload(self, handler: Any) -> Any:
        # Left out when unused, so adding these fields changed no existing unit's config hash.
        data = handler(self)
        if isinstance(data, dict):
            if not data.get("config_files"):
                data.pop("config_files", None)
            if data.get("reload") is None:
                data.pop("reload", None)
        return _omit_unset_bake(data)


KvCacheDtype = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
ModelDtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]


class VllmSpec(_Model):
    """vLLM engine settings of a model."""

    version: Version = "0.11.0"
    max_model_len: Annotated[int, Field(ge=16, le=10_000_000)] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    tensor_parallel_size: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = "auto"
    pipeline_parallel_size: Annotated[int, Field(ge=1, le=64)] = 1
    kv_cache_dtype: KvCacheDtype = "auto"
    dtype: ModelDtype = "auto"
    quantization: Name | None = None
    max_num_seqs: Annotated[int, Field(ge=1, le=65536)] | None = None
    max_num_batched_tokens: Annotated[int, Field(ge=1)] | None = None
    enforce_eager: bool = False
    extra_args: list[Arg] = Field(default_factory=list, max_length=256)


class AutoscaleSpec(_Model):
    """A model's replica count chosen by the autoscaler (hxp.autoscale) within bounds."""

    min_replicas: Annotated[int, Field(ge=1, le=64, strict=True)] = 1
    max_replicas: Annotated[int, Field(ge=1, le=64, strict=True)]
    target: Literal["queue_per_replica", "kv_cache_usage", "ttft_p95"] = Field(
        description="the signal: waiting requests per replica, mean KV-cache use (0-1), or "
        "time to first token p95 (seconds)"
    )
    threshold: Annotated[float, Field(gt=0)] = Field(
        description="scale up above it; scale down below `scale_down_below` x threshold"
    )
    scale_down_below: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.5,
        description="fraction of `threshold` the signal, spread over one replica fewer, must "
        "stay under for a scale down",
    )
    scale_up_after: Duration = Field(
        default=60.0, description="how long the signal must hold above before a scale up"
    )
    scale_down_after: Duration = Field(
        default=300.0, description="how long the signal must hold below before a scale down"
    )
    cooldown: Duration = Field(default=120.0, description="no action this long after any")
    interval: Duration = Field(
        default=15.0,
        description="how often the autoscaler reads metrics; a sample older than twice this "
        "is stale and never acted on",
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        if self.target == "kv_cache_usage" and self.threshold > 1:
            raise ValueError(f"threshold: KV-cache use is 0-1, got {self.threshold}")
        for name in ("scale_up_after", "scale_down_after", "cooldown"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.interval <= 0:
            raise ValueError("interval must be positive")
        return self


class ModelSpec(_UnitSpec):
    """A vLLM model server."""

    model: Annotated[str, AfterValidator(_check_hf_repo)]
    revision: Annotated[str, AfterValidator(_check_revision)] | None = None
    served_name: Name | None = None
    gpus: Literal["auto"] | list[Annotated[int, Field(ge=0, le=63, strict=True)]] = "auto"
    port: Port = 8000
    python: Annotated[str, Field(min_length=1), AfterValidator(_check_program)] = Field(
        default="python3", description="interpreter that has vLLM installed (process, systemd)"
    )
    vllm: VllmSpec = Field(default_factory=VllmSpec)
    engine: Literal["vllm", "simulator"] = Field(
        default="vllm",
        description="`simulator` runs hxp-vllm-sim, a development double, instead of vLLM",
    )
    simulator_args: list[Arg] = Field(
        default_factory=list, description="extra hxp-vllm-sim flags (engine: simulator)"
    )
    hf_config: AbsPath | None = Field(
        default=None,
        description="the model's config.json on the machine running hxp: the plan's KV-cache "
        "prediction (hxp.resources) beside what vLLM measured",
    )
    pin_kv_cache_memory: bool = Field(
        default=True,
        description="after the first successful start, pass the KV-cache memory vLLM measured "
        "as --kv-cache-memory-bytes (vLLM >= 0.11; hxp.calibration); false: let vLLM profile",
    )
    simulator_gpus: Annotated[int, Field(ge=0, le=64)] = Field(
        default=0,
        description="engine: simulator: GPUs each replica claims as vLLM would (placed, "
        "reserved and checked by the GPU calculator; the simulator never uses them); 0: none",
    )

    sleep_mode: bool = Field(
        default=False,
        description="allow `hxp sleep` / `hxp wake`: starts vLLM with --enable-sleep-mode and "
        "VLLM_SERVER_DEV_MODE=1 (which also exposes vLLM's other development endpoints; "
        "docs/operations.md#sleep-mode)",
    )

    autoscale: AutoscaleSpec | None = Field(
        default=None,
        description="let the autoscaler choose the replica count within [min, max]; "
        "`replicas` then only sets the first count (docs/configuration.md#autoscale)",
    )

    @model_validator(mode="after")
    def _autoscale_gpus(self) -> ModelSpec:
        if self.autoscale is not None and self.gpus != "auto":
            raise ValueError("autoscale: needs `gpus: auto` (listed GPUs fix the replica count)")
        return self

    def replica_span(self) -> int:
        """How many replica indexes the model's names and ports cover: its replicas, or for an
        autoscaled model its max_replicas (names and ports stay put as the count changes)."""
        if self.autoscale is not None:
            return max(self.autoscale.max_replicas, self.replicas)
        return self.replicas

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> Any:
        return _omit_unset_bake(handler(self))

    def tensor_parallel(self) -> int:
        """TP as declared; `auto` falls back to the listed GPUs per replica, else 1.

        The resource calculator (hxp.resources) refines `auto` from the model's config.
        """
        tp = self.vllm.tensor_parallel_size
        if tp != "auto":
            return tp
        if isinstance(self.gpus, list) and self.gpus:
            return max(1, len(self.gpus) // self.replicas)
        return 1

    def gpus_per_replica(self) -> int:
        if self.engine == "simulator":
            return self.simulator_gpus  # the development double uses none; it may claim some
        return self.tensor_parallel() * self.vllm.pipeline_parallel_size


class ReceiverSpec(_Model):
    """An Alertmanager receiver; secrets come from Prefect Secret blocks."""

    name: Name
    type: Literal["webhook", "email", "slack"]
    url: Url | None = None
    to: Text | None = None
    channel: Text | None = None
    secret_block: Name | None = Field(
        default=None,
        description="Prefect Secret block: the Slack webhook URL, the SMTP password, or a "
        "webhook URL that must stay out of rendered files",
    )
    severity: list[Literal["critical", "warning", "info"]] = Field(default_factory=list)
    smarthost: Annotated[str, AfterValidator(_check_text)] | None = Field(
        default=None, description="email: SMTP server host:port (default localhost:25)"
    )
    sender: Text | None = Field(default=None, description="email: From address")
    username: Text | None = Field(default=None, description="email: SMTP user name")
    send_resolved: bool = True

    @model_validator(mode="after")
    def _fields_for_type(self) -> ReceiverSpec:
        if self.type == "webhook" and self.url is None and self.secret_block is None:
            raise ValueError("a webhook receiver needs url or secret_block")
        if self.type == "email" and self.to is None:
            raise ValueError("an email receiver needs to")
        if self.type == "slack" and self.url is None and self.secret_block is None:
            raise ValueError("a slack receiver needs url or secret_block")
        return self


class PrometheusSpec(_Model):
    host: Name
    port: Port = 9090
    scrape_interval: Duration = 15.0
    evaluation_interval: Duration | None = Field(
        default=None, description="rule evaluation interval; default: scrape_interval"
    )
    retention: Duration = 15 * 86400.0


class AlertmanagerSpec(_Model):
    host: Name
    port: Port = 9093
    receivers: list[ReceiverSpec] = Field(default_factory=list)
    group_wait: Duration = 30.0
    group_interval: Duration = 300.0
    repeat_interval: Duration = 4 * 3600.0

    @model_validator(mode="after")
    def _unique(self) -> AlertmanagerSpec:
        names = [r.name for r in self.receivers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate receiver name {dup}")
        return self


class PushgatewaySpec(_Model):
    host: Name
    port: Port = 9091


class GrafanaSpec(_Model):
    url: Url
    token_block: Name | None = None


class SloSpec(_Model):
    ttft_p95: Duration = 2.0
    e2e_p99: Duration = 30.0


class AlertsSpec(_Model):
    """Thresholds and timings of the generated alert rules (hxp.monitoring)."""

    down_for: Duration = Field(
        default=60.0, description="`for:` of availability alerts (down, absent, unhealthy)"
    )
    saturation_for: Duration = Field(
        default=600.0, description="`for:` of saturation and SLO alerts"
    )
    window: Duration = Field(default=300.0, description="rate and quantile window")
    queue_waiting: Annotated[float, Field(ge=0)] = Field(
        default=50, description="requests waiting in one replica's queue"
    )
    kv_cache_usage: Annotated[float, Field(gt=0, le=1)] = 0.95
    gpu_memory_usage: Annotated[float, Field(gt=0, le=1)] = 0.95
    preemptions: Annotated[float, Field(ge=0)] = Field(
        default=0, description="preemptions per replica within `window` tolerated"
    )


class GatewaySpec(_Model):
    """An nginx gateway on one host that load-balances the replicas of routed units.

    A routed unit is updated blue-green: the new version starts beside the old one on the
    unit's second port range (each port + replicas), is gated, takes the traffic, and the old
    one is drained and stopped.
    """

    host: Name
    routes: Annotated[dict[Name, Port], Field(min_length=1)] = Field(
        description="unit -> the port the gateway listens on for it"
    )
    drain_timeout: Duration = Field(
        default=30.0, description="how long an old replica may finish its in-flight requests"
    )
    bind: Annotated[str, AfterValidator(_check_address)] = Field(
        default="127.0.0.1",
        description="the address nginx listens on; a gateway on a host reached over SSH must "
        "listen where clients reach it (that host's address, or 0.0.0.0)",
    )
    directory: AbsPath | None = Field(
        default=None,
        description="on a gateway host reached over SSH: where nginx's config, pid, logs and "
        "temporary files live there (default /var/lib/hxp-gateway/<stack>); a gateway on this "
        "machine keeps them under STATE/gateway/<stack>/",
    )

    @model_serializer(mode="wrap")
    def _omit_unset_directory(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict) and data.get("directory") is None:
            data.pop("directory", None)
        return data


class DeploySpec(_Model):
    """How a deploy of the stack proceeds (not part of any unit's config)."""

    bake: Duration | None = Field(
        default=None,
        description="how long a deploy watches every changed instance after the final "
        "verification before it commits; default per unit: services max(2 x health interval, "
        "5s), models max(2 x health interval, 30s); 0: no bake",
    )


class MonitoringSpec(_Model):
    prometheus: PrometheusSpec | None = None
    alertmanager: AlertmanagerSpec | None = None
    pushgateway: PushgatewaySpec | None = None
    grafana: GrafanaSpec | None = None
    slo: SloSpec = Field(default_factory=SloSpec)
    alerts: AlertsSpec = Field(default_factory=AlertsSpec)


_METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,199}")
_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]{0,99}")
_SERIES_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")


def _check_metric_name(value: str) -> str:
    if not _METRIC_NAME_RE.fullmatch(value):
        raise ValueError(f"invalid metric name {value!r}")
    if value.startswith(PUBLISHED_PREFIXES):
        raise ValueError(f"{value!r}: fleet: and hxp_ are what hxp publishes, not inputs")
    return value


def _check_label_name(value: str) -> str:
    if not _LABEL_NAME_RE.fullmatch(value) or value.startswith("__"):
        raise ValueError(f"invalid label name {value!r}")
    if value in ("le", "quantile"):
        raise ValueError(f"label {value!r} belongs to histogram/summary buckets")
    return value


def _check_series_name(value: str) -> str:
    if not _SERIES_NAME_RE.fullmatch(value):
        raise ValueError(f"invalid series name {value!r}: lowercase letters, digits, '_'")
    return value


LabelName = Annotated[str, AfterValidator(_check_label_name)]
Price = Annotated[float, Field(ge=0, le=1_000_000)]


class SeriesSpec(_Model):
    """A custom fleet series: one vLLM (or other) family, reduced per model and fleet-wide."""

    family: Annotated[str, AfterValidator(_check_metric_name)] = Field(
        description="family as scraped, e.g. vllm:num_preemptions (a counter's _total optional)"
    )
    op: Literal["rate", "sum", "avg", "max", "min", "p50", "p90", "p95", "p99"] = Field(
        default="rate",
        description="rate: counters; sum/avg/max/min: gauges; pNN: histogram quantiles",
    )
    match: dict[LabelName, Text] = Field(
        default_factory=dict, description="only series with these label values"
    )


class MetricsSpec(_Model):
    """What the aggregate-metrics flow publishes besides the built-in fleet series."""

    price_per_million_tokens: Price | None = Field(
        default=None, description="price of 1M tokens (prompt and generated alike)"
    )
    price_per_million_prompt_tokens: Price | None = None
    price_per_million_generation_tokens: Price | None = None
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"
    per_label: Annotated[list[LabelName], Field(max_length=8)] = Field(
        default_factory=list,
        description="break tokens/s (and cost) down by these labels of the token counters",
    )
    series: dict[Annotated[str, AfterValidator(_check_series_name)], SeriesSpec] = Field(
        default_factory=dict, description="name -> custom series, published as fleet:<name>"
    )
    stale_after: Duration = Field(
        default=300.0, description="a previous scrape older than this gives no rate"
    )
    scrape_timeout: Duration = 2.0
    max_concurrency: Annotated[int, Field(ge=1, le=1024)] = 64

    @model_validator(mode="after")
    def _consistent(self) -> MetricsSpec:
        if len(set(self.per_label)) != len(self.per_label):
            raise ValueError(f"per_label lists a label twice: {self.per_label}")
        clash = sorted(n for n in self.series if f"fleet:{n}" in FLEET_SERIES)
        if clash:
            raise ValueError(f"series {clash}: name taken by a built-in fleet series")
        if self.scrape_timeout <= 0:
            raise ValueError("scrape_timeout must be positive")
        return self

    def prices(self) -> tuple[float | None, float | None]:
        """(prompt, generation) price per million tokens; None where none is configured."""
        both = self.price_per_million_tokens
        prompt = self.price_per_million_prompt_tokens
        generation = self.price_per_million_generation_tokens
        return (both if prompt is None else prompt, both if generation is None else generation)


UnitSpec = ServiceSpec | ModelSpec


def part_name(unit: str, host: str) -> str:
    """The name of the part on `host` of a unit declared with `hosts:`."""
    return f"{unit}-{host}"


def spread_hosts(data: Any) -> Any:
    """A unit declared on several hosts (`hosts: [a, b]`, each running `replicas` replicas)
    becomes one unit per host, named `<unit>-<host>`, with `host` set and `part_of: <unit>`.
    A gateway route or a `depends_on` that names the declared unit names every part: the
    gateway balances one route over the parts of all hosts. A model's parts serve it under the
    declared name (`served_name`, unless given). Raw stack data in, raw data out."""
    if not isinstance(data, dict):
        return data
    declared = [
        (kind, name)
        for kind in ("services", "models")
        if isinstance(data.get(kind), dict)
        for name, unit in data[kind].items()
        if isinstance(unit, dict) and "hosts" in unit
    ]
    if not declared:
        return data
    known: dict[str, Any] = data["hosts"] if isinstance(data.get("hosts"), dict) else {}
    out = dict(data)
    parts: dict[str, list[str]] = {}
    problems: list[str] = []
    for kind in ("services", "models"):
        units = data.get(kind)
        if not isinstance(units, dict):
            continue
        spread: dict[str, Any] = {}
        for name, unit in units.items():
            if not (isinstance(unit, dict) and "hosts" in unit):
                spread[name] = unit
                continue
            where = f"{kind}.{name}.hosts"
            hosts = unit["hosts"]
            if "host" in unit:
                problems.append(f"{where}: give `host` (one host) or `hosts`, not both")
                continue
            if (
                not isinstance(hosts, list)
                or not hosts
                or not all(isinstance(h, str) and _NAME_RE.fullmatch(h) for h in hosts)
            ):
                problems.append(f"{where}: expected a non-empty list of host names, got {hosts!r}")
                continue
            if len(set(hosts)) != len(hosts):
                problems.append(f"{where}: a host is listed twice in {hosts}")
                continue
            unknown = [h for h in hosts if h not in known]
            if unknown:
                problems.append(f"{where}: unknown host(s) {unknown}")
                continue
            body = {k: v for k, v in unit.items() if k != "hosts"}
            if kind == "models":  # every part serves the model under the declared name
                body.setdefault("served_name", name)
            parts[name] = [part_name(name, h) for h in hosts]
            for host, part in zip(hosts, parts[name], strict=True):
                spread[part] = {**body, "host": host, "part_of": name}
        out[kind] = spread
    taken: dict[str, str] = {}
    for kind in ("services", "models"):
        for name in data.get(kind) or {}:
            taken.setdefault(name, kind)
    for name, names in parts.items():
        for part in names:
            clash = taken.get(part)
            if clash is not None and part not in parts:
                problems.append(
                    f"{clash}.{part}: name already used by the part of {name!r} on a host"
                )
    if problems:
        raise ValueError("\n".join(problems))

    def named(units: Any) -> Any:
        if not isinstance(units, list):
            return units
        return [p for u in units for p in (parts.get(u, [u]) if isinstance(u, str) else [u])]

    for kind in ("services", "models"):
        if isinstance(out.get(kind), dict):
            out[kind] = {
                n: (
                    {**u, "depends_on": named(u["depends_on"])}
                    if isinstance(u, dict) and "depends_on" in u
                    else u
                )
                for n, u in out[kind].items()
            }
    gateway = out.get("gateway")
    if isinstance(gateway, dict) and isinstance(gateway.get("routes"), dict):
        routes = {p: port for u, port in gateway["routes"].items() for p in parts.get(u, [u])}
        out["gateway"] = {**gateway, "routes": routes}
    return out


class Stack(_Model):
    """A whole fleet: hosts, services, models and their monitoring."""

    version: Annotated[int, Field(ge=1, strict=True)] = CURRENT_VERSION
    stack: Name
    hosts: Annotated[dict[Name, HostSpec], Field(min_length=1)]
    services: dict[Name, ServiceSpec] = Field(default_factory=dict)
    models: dict[Name, ModelSpec] = Field(default_factory=dict)
    monitoring: MonitoringSpec | None = None
    metrics: MetricsSpec | None = None
    gateway: GatewaySpec | None = None
    deploy: DeploySpec | None = None
    templates_dir: AbsPath | None = Field(
        default=None, description="directory whose templates override the built-in ones"
    )

    @model_validator(mode="before")
    @classmethod
    def _spread_hosts(cls, data: Any) -> Any:
        return spread_hosts(data)

    @model_validator(mode="after")
    def _references(self) -> Stack:
        problems: list[str] = []
        for kind, units in (("services", self.services), ("models", self.models)):
            for name, unit in units.items():
                if unit.host not in self.hosts:
                    problems.append(f"{kind}.{name}.host: unknown host {unit.host!r}")
                for dep in unit.depends_on:
                    if dep == name:
                        problems.append(f"{kind}.{name}.depends_on: depends on itself")
                    elif dep not in self.services and dep not in self.models:
                        problems.append(f"{kind}.{name}.depends_on: unknown unit {dep!r}")
        for name in sorted(set(self.services) & set(self.models)):
            problems.append(f"models.{name}: name already used by services.{name}")
        problems.extend(self._backend_requirements())
        if not problems:
            cycle = find_cycle(self.dependencies())
            if cycle is not None:
                kind = "models" if cycle[0] in self.models else "services"
                problems.append(
                    f"{kind}.{cycle[0]}.depends_on: dependency cycle: {' -> '.join(cycle)}"
                )
        problems.extend(self._port_conflicts())
        if self.monitoring is not None:
            for part in ("prometheus", "alertmanager", "pushgateway"):
                spec = getattr(self.monitoring, part)
                if spec is not None and spec.host not in self.hosts:
                    problems.append(f"monitoring.{part}.host: unknown host {spec.host!r}")
        if self.gateway is not None:
            if self.gateway.host not in self.hosts:
                problems.append(f"gateway.host: unknown host {self.gateway.host!r}")
            else:
                problems.extend(self._gateway_host_problems())
            kinds: dict[int, set[str]] = {}
            for routed, port in self.gateway.routes.items():
                kinds.setdefault(port, set()).add("models" if routed in self.models else "services")
            for port, both in sorted(kinds.items()):
                if len(both) > 1:
                    shared = sorted(u for u, p in self.gateway.routes.items() if p == port)
                    problems.append(
                        f"gateway.routes: port {port} is shared by models and services "
                        f"({', '.join(shared)}); a route balances units of one kind"
                    )
            for routed in self.gateway.routes:
                if routed not in self.services and routed not in self.models:
                    problems.append(f"gateway.routes.{routed}: unknown unit {routed!r}")
                elif routed in self.models and any(
                    a.split("=", 1)[0] == "--disable-log-stats"
                    for a in self.models[routed].vllm.extra_args
                ):
                    problems.append(
                        f"models.{routed}.vllm.extra_args: --disable-log-stats removes "
                        "vllm:num_requests_running, which the drain of a routed model waits "
                        "on before its stop (and the health sweep reads): drop the flag, or "
                        f"take {routed!r} out of gateway.routes"
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _gateway_host_problems(self) -> Iterator[str]:
        """hxp runs nginx on this machine, on an agent host (a process host with an address:
        its worker runs it there), or on any host it reaches over SSH; not elsewhere."""
        assert self.gateway is not None
        name = self.gateway.host
        host = self.hosts[name]
        here = host.address is None or is_loopback_address(host.address)
        if host.runner == "ssh":
            if is_loopback_address(self.gateway.bind) and not here:
                yield (
                    f"gateway.bind: {self.gateway.bind} on host {name!r} ({host.address}) is "
                    "reachable only from that host: bind its address or 0.0.0.0"
                )
        elif host.backend == "process" and host.work_pool is not None and not here:
            # An agent host: only the deploy part its own worker runs can drive nginx there
            # (its runner is local to it); another host's part has no way to reach it.
            others = sorted(u for u in self.gateway.routes if self._host_of(u) not in (name, None))
            if others:
                yield (
                    f"gateway.host: the gateway runs on agent host {name!r}, which only its own "
                    f"worker's deploy part can drive, but routed unit(s) {', '.join(others)} run "
                    "on other hosts, whose parts cannot reach it: put the gateway on a host "
                    "reached over SSH (`runner: ssh`) or on this machine"
                )
        elif host.runner == "docker-exec" or (host.backend != "process" and not here):
            where = f", address {host.address}" if host.address else ""
            yield (
                f"gateway.host: hxp cannot run nginx on host {name!r} (backend {host.backend}, "
                f"runner {host.runner}{where}): give the host `runner: ssh` (with its address, "
                "ssh_user, ssh_key and known_hosts), or put the gateway on a local or agent host"
            )

    def _host_of(self, unit: str) -> str | None:
        spec = self.services.get(unit) or self.models.get(unit)
        return None if spec is None else spec.host

    def _backend_requirements(self) -> Iterator[str]:
        for name, svc in self.services.items():
            for arg in svc.command or ():
                for ref in re.findall(r"\{port\.([a-z][-a-z0-9]*)\}", arg):
                    if ref not in svc.ports:
                        yield f"services.{name}.command: {{port.{ref}}} names no port in ports"
            host = self.hosts.get(svc.host)
            if host is None:
                continue
            if host.backend == "docker" and svc.image is None:
                yield f"services.{name}.image: required on host {svc.host!r} (backend docker)"
            if (svc.config_files or svc.reload is not None) and host.backend != "process":
                yield (
                    f"services.{name}.config_files: config files and reload run on process "
                    f"hosts for now (host {svc.host!r} uses {host.backend})"
                )
            paths = [f.path for f in svc.config_files]
            if len(set(paths)) != len(paths):
                yield f"services.{name}.config_files: a path is listed twice"
            if host.backend != "docker" and svc.command is None:
                yield (
                    f"services.{name}.command: required on host {svc.host!r} "
                    f"(backend {host.backend})"
                )
        for name, model in self.models.items():
            host = self.hosts.get(model.host)
            if host is None or model.gpus == "auto":
                continue
            need = model.gpus_per_replica() * model.replicas
            if len(model.gpus) < need:
                yield (
                    f"models.{name}.gpus: {model.replicas} replica(s) x "
                    f"{model.gpus_per_replica()} GPU(s) each need {need} GPUs, "
                    f"{len(model.gpus)} listed"
                )
            if len(set(model.gpus)) != len(model.gpus):
                yield f"models.{name}.gpus: a GPU is listed twice in {model.gpus}"
            known = {g.index for g in host.gpus}
            missing = sorted(set(model.gpus) - known)
            if host.gpus and missing:
                yield f"models.{name}.gpus: host {model.host!r} has no GPU {missing}"

    def _port_conflicts(self) -> Iterator[str]:
        # Host entries with the same address are one machine: their ports clash too.
        machine = {n: h.address or f"host {n}" for n, h in self.hosts.items()}
        taken: dict[tuple[str, int], str] = {}
        for kind, name, host, port, replicas in self._port_claims():
            for i in range(replicas):
                key = (machine.get(host, host), port + i)
                owner = f"{kind}.{name}"
                if key in taken and taken[key] != owner:
                    spec = self.hosts.get(host)
                    address = spec.address if spec is not None else None
                    where = f"host {host!r}" + (f" ({address})" if address else "")
                    yield f"{owner}: port {port + i} on {where} already used by {taken[key]}"
                    break
                taken[key] = owner

    def _port_claims(self) -> Iterator[tuple[str, str, str, int, int]]:
        routed = set(self.gateway.routes) if self.gateway is not None else set()
        for name, svc in sorted(self.services.items()):
            slots = 2 if name in routed else 1  # blue-green: a second port range
            for port in svc.ports.values():
                yield "services", name, svc.host, port, svc.replicas * slots
        for name, model in sorted(self.models.items()):
            slots = 2 if name in routed else 1
            yield "models", name, model.host, model.port, model.replica_span() * slots
        if self.gateway is not None:
            # Units may share a route (one port balanced over all of them, such as the parts
            # of a unit declared on several hosts): the port is the gateway's claim, once.
            for port in sorted(set(self.gateway.routes.values())):
                yield "gateway", "routes", self.gateway.host, port, 1
        if self.monitoring is not None:
            for part in ("prometheus", "alertmanager", "pushgateway"):
                spec = getattr(self.monitoring, part)
                if spec is not None:
                    yield "monitoring", part, spec.host, spec.port, 1

    def units(self) -> dict[str, UnitSpec]:
        """Services and models in one namespace, keyed by unit name."""
        merged: dict[str, UnitSpec] = dict(self.services)
        merged.update(self.models)
        return merged

    def unit(self, name: str) -> UnitSpec:
        units = self.units()
        if name not in units:
            from hxp.errors import UnknownUnitError

            raise UnknownUnitError(f"unknown unit {name!r}; the stack has {sorted(units)}")
        return units[name]

    def unit_names(self, name: str) -> list[str]:
        """The units a name given by an operator means: the unit itself, or every part of a
        unit declared with `hosts:` (hxp.spec.spread_hosts)."""
        units = self.units()
        if name in units:
            return [name]
        parts = [n for n, u in units.items() if u.part_of == name]
        if parts:
            return parts
        self.unit(name)  # raises UnknownUnitError
        return []

    def named_units(self, names: Iterable[str]) -> list[str]:
        """`unit_names` of each name, together, sorted."""
        return sorted({part for name in names for part in self.unit_names(name)})

    def dependencies(self) -> dict[str, list[str]]:
        """unit -> the units it depends on."""
        return {name: list(unit.depends_on) for name, unit in self.units().items()}
