"""Expand a stack's services and models into concrete unit instances (one per replica).

An instance carries everything a renderer or backend needs: argv, environment, ports, health,
GPU assignment. Deciding these is pure; backends and templates only read them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from hxp.spec import HealthSpec, HostSpec, HttpCheck, ModelSpec, ServiceSpec, Stack, UnitSpec

UnitKind = Literal["service", "model"]


@dataclass(frozen=True)
class UnitInstance:
    """One replica of a service or model, ready to render or run."""

    stack: str
    unit: str
    kind: UnitKind
    replica: int
    replicas: int
    host: str
    host_spec: HostSpec
    spec: UnitSpec
    argv: tuple[str, ...]
    container_args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    ports: tuple[tuple[str, int], ...]
    health: HealthSpec | None
    image: str | None
    gpus: tuple[int, ...] | None
    gpu_count: int
    depends_on: tuple[str, ...] = field(default=())
    # (unit, replicas) of each dependency: what a backend rendering a unit file alone needs.
    dependency_replicas: tuple[tuple[str, int], ...] = field(default=())

    @property
    def name(self) -> str:
        """Instance name: the unit name, with `-N` for replicated units."""
        return self.unit if self.replicas == 1 else f"{self.unit}-{self.replica}"

    @property
    def host_env(self) -> tuple[tuple[str, str], ...]:
        """Environment for a process on the host: `env` plus the GPUs this replica owns.

        Containers get their GPUs through device requests instead.
        """
        if self.gpus is None or any(k == "CUDA_VISIBLE_DEVICES" for k, _ in self.env):
            return self.env
        visible = ("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in self.gpus))
        return tuple(sorted((*self.env, visible)))

    @property
    def systemd_name(self) -> str:
        return f"hxp-{self.stack}-{self.name}.service"

    @property
    def field_path(self) -> str:
        return f"{'models' if self.kind == 'model' else 'services'}.{self.unit}"


def vllm_args(model: ModelSpec, name: str, port: int) -> list[str]:
    """Arguments of vLLM's OpenAI-compatible server for one model replica."""
    v = model.vllm
    args = ["--model", model.model]
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
    return args + list(v.extra_args)


def _model_gpus(model: ModelSpec, replica: int) -> tuple[int, ...] | None:
    """The GPUs one replica owns: consecutive slices of the listed GPUs (checked in spec)."""
    if model.gpus == "auto":
        return None
    per = model.gpus_per_replica()
    return tuple(model.gpus[replica * per : (replica + 1) * per])


_PLACEHOLDER_RE = re.compile(r"\{(replica|instance|port\.[a-z][-a-z0-9]*)\}")


def substitute(value: str, values: dict[str, str]) -> str:
    """Replace `{replica}`, `{instance}` and `{port.NAME}`; any other text stays as it is."""
    return _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), value)


def _replica_health(
    health: HealthSpec | None, shift: dict[int, int], values: dict[str, str]
) -> HealthSpec | None:
    """A replica's checks: placeholders filled, and a declared base port moved to its own."""
    if health is None:
        return None
    changes: dict[str, object] = {}
    if health.http is not None:
        url = substitute(health.http.url, values)
        parts = urlsplit(url)
        if parts.port in shift:
            url = urlunsplit(parts._replace(netloc=f"{parts.hostname}:{shift[parts.port]}"))
        changes["http"] = health.http.model_copy(update={"url": url})
    if health.tcp is not None and health.tcp.port in shift:
        changes["tcp"] = health.tcp.model_copy(update={"port": shift[health.tcp.port]})
    if health.command is not None:
        changes["command"] = [substitute(a, values) for a in health.command]
    return health.model_copy(update=changes)


def _dependency_replicas(stack: Stack, deps: list[str]) -> tuple[tuple[str, int], ...]:
    units = stack.units()
    return tuple((d, units[d].replicas) for d in sorted(deps) if d in units)


def _service_instance(stack: Stack, name: str, svc: ServiceSpec, i: int) -> UnitInstance:
    ports = tuple((pn, p + i) for pn, p in sorted(svc.ports.items()))
    instance = name if svc.replicas == 1 else f"{name}-{i}"
    values = {"replica": str(i), "instance": instance, **{f"port.{pn}": str(p) for pn, p in ports}}
    argv = tuple(substitute(a, values) for a in svc.command or ())
    shift = {p: p + i for p in svc.ports.values()}
    return UnitInstance(
        stack=stack.stack,
        unit=name,
        kind="service",
        replica=i,
        replicas=svc.replicas,
        host=svc.host,
        host_spec=stack.hosts[svc.host],
        spec=svc,
        argv=argv,
        container_args=argv,
        env=tuple(sorted((k, substitute(v, values)) for k, v in svc.env.items())),
        ports=ports,
        health=_replica_health(svc.health, shift, values),
        image=svc.image,
        gpus=None,
        gpu_count=0,
        depends_on=tuple(svc.depends_on),
        dependency_replicas=_dependency_replicas(stack, svc.depends_on),
    )


def _model_instance(stack: Stack, name: str, model: ModelSpec, i: int) -> UnitInstance:
    port = model.port + i
    args = vllm_args(model, name, port)
    gpus = _model_gpus(model, i)
    env = dict(model.env)
    health = model.health or HealthSpec(
        http=HttpCheck(url=f"http://127.0.0.1:{port}/health"),
        interval=5.0,
        timeout=2.0,
        retries=3,
        start_period=600.0,
    )
    return UnitInstance(
        stack=stack.stack,
        unit=name,
        kind="model",
        replica=i,
        replicas=model.replicas,
        host=model.host,
        host_spec=stack.hosts[model.host],
        spec=model,
        argv=(model.python, "-m", "vllm.entrypoints.openai.api_server", *args),
        container_args=tuple(args),
        env=tuple(sorted(env.items())),
        ports=(("http", port),),
        health=health,
        image=model.image or f"vllm/vllm-openai:v{model.vllm.version}",
        gpus=gpus,
        gpu_count=model.gpus_per_replica(),
        depends_on=tuple(model.depends_on),
        dependency_replicas=_dependency_replicas(stack, model.depends_on),
    )


def expand_units(stack: Stack, only: set[str] | None = None) -> list[UnitInstance]:
    """Every replica of every service and model (or of the units in `only`), sorted by name."""
    out: list[UnitInstance] = []
    for name, svc in sorted(stack.services.items()):
        if only is None or name in only:
            out.extend(_service_instance(stack, name, svc, i) for i in range(svc.replicas))
    for name, model in sorted(stack.models.items()):
        if only is None or name in only:
            out.extend(_model_instance(stack, name, model, i) for i in range(model.replicas))
    return out
