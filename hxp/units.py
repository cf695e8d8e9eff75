"""Expand a stack's services and models into concrete unit instances (one per replica).

An instance carries everything a renderer or backend needs: argv, environment, ports, health,
GPU assignment. Deciding these is pure; backends and templates only read them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from hxp.endpoints import listen_address
from hxp.spec import HealthSpec, HostSpec, HttpCheck, ModelSpec, ServiceSpec, Stack, UnitSpec
from hxp.startup import model_start_period
from hxp.vllm import (
    VllmLaunch,
    container_cache_env,
    replica_gpus,
    shutdown_args,
    sleep_mode_args,
    sleep_mode_env,
    vllm_launch,
)
from hxp.vllm import vllm_args as vllm_args  # re-exported: its old home

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
    slot: int = 0  # blue-green: 0 runs on the declared ports, 1 on each port + replicas
    # (unit, replicas) of each dependency: what a backend rendering a unit file alone needs.
    dependency_replicas: tuple[tuple[str, int], ...] = field(default=())
    # The container's entrypoint, when hxp sets it (models: `vllm serve`); None: the image's.
    container_entrypoint: tuple[str, ...] | None = None
    # The stack's `templates_dir` (operator overrides), for a backend rendering this unit alone.
    templates_dir: str | None = None

    @property
    def name(self) -> str:
        """Instance name: the unit name, with `-N` for replicated units."""
        base = self.unit if self.replicas == 1 else f"{self.unit}-{self.replica}"
        return f"{base}-g" if self.slot else base

    @property
    def base_name(self) -> str:
        """The replica's name without its blue-green slot."""
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
    def container_env(self) -> tuple[tuple[str, str], ...]:
        """Environment inside a container: `env`, plus a writable HOME and HF_HOME for models."""
        if self.kind != "model":
            return self.env
        return tuple(sorted((*self.env, *container_cache_env(dict(self.env)).items())))

    @property
    def route_port(self) -> int | None:
        """The port the gateway sends traffic to: the `http` port, else the first; None if none."""
        if not self.ports:
            return None
        return dict(self.ports).get("http", self.ports[0][1])

    @property
    def systemd_name(self) -> str:
        return f"hxp-{self.stack}-{self.name}.service"

    @property
    def field_path(self) -> str:
        return f"{'models' if self.kind == 'model' else 'services'}.{self.unit}"


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


def _templates_dir(stack: Stack) -> str | None:
    return None if stack.templates_dir is None else str(stack.templates_dir)


def _service_instance(
    stack: Stack, name: str, svc: ServiceSpec, i: int, slot: int = 0
) -> UnitInstance:
    offset = i + slot * svc.replicas
    ports = tuple((pn, p + offset) for pn, p in sorted(svc.ports.items()))
    instance = name if svc.replicas == 1 else f"{name}-{i}"
    instance = f"{instance}-g" if slot else instance
    values = {"replica": str(i), "instance": instance, **{f"port.{pn}": str(p) for pn, p in ports}}
    argv = tuple(substitute(a, values) for a in svc.command or ())
    shift = {p: p + offset for p in svc.ports.values()}
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
        templates_dir=_templates_dir(stack),
        slot=slot,
    )


def _model_instance(
    stack: Stack, name: str, model: ModelSpec, i: int, slot: int = 0
) -> UnitInstance:
    port = model.port + i + slot * model.replica_span()
    launch = (
        simulator_launch(model, name, port, listen_address(stack.hosts[model.host]))
        if model.engine == "simulator"
        else (vllm_launch(model, name, port))
    )
    gpus = replica_gpus(model, i)
    env = {**sleep_mode_env(model), **model.env}  # the operator's own value wins
    health = _replica_health(
        model.health, {model.port: port}, {"replica": str(i), "port.http": str(port)}
    ) or HealthSpec(
        http=HttpCheck(url=f"http://127.0.0.1:{port}/health"),
        interval=5.0,
        timeout=2.0,
        retries=3,
        # Scaled from the weights one GPU loads (hxp.startup); the operator's `health` wins.
        start_period=model_start_period(model).seconds,
    )
    return UnitInstance(
        stack=stack.stack,
        unit=name,
        kind="model",
        replica=i,
        replicas=model.replica_span(),
        host=model.host,
        host_spec=stack.hosts[model.host],
        spec=model,
        argv=launch.host_argv,
        container_args=launch.container_args,
        env=tuple(sorted(env.items())),
        ports=(("http", port),),
        health=health,
        image=model.image or f"vllm/vllm-openai:v{model.vllm.version}",
        gpus=gpus,
        gpu_count=model.gpus_per_replica(),
        depends_on=tuple(model.depends_on),
        dependency_replicas=_dependency_replicas(stack, model.depends_on),
        templates_dir=_templates_dir(stack),
        container_entrypoint=launch.container_entrypoint,
        slot=slot,
    )


def simulator_launch(
    model: ModelSpec, name: str, port: int, listen: str = "127.0.0.1"
) -> VllmLaunch:
    """hxp-vllm-sim in place of vLLM: same port, served name and version (a development double).
    It listens on loopback on a local host, on every interface on a host reached by address."""
    args = [
        "--host",
        listen,
        "--port",
        str(port),
        "--model",
        model.model,
        "--served-model-name",
        model.served_name or name,
        "--version",
        model.vllm.version,
    ]
    if model.vllm.max_model_len is not None:
        args += ["--max-model-len", str(model.vllm.max_model_len)]
    args += list(shutdown_args(model, model.simulator_args))  # before: the operator's win
    if model.vllm.max_num_seqs is not None:  # the double's slots, as vLLM's max_num_seqs
        args += ["--max-concurrency", str(model.vllm.max_num_seqs)]
    args += list(sleep_mode_args(model, model.simulator_args))
    args += list(model.simulator_args)
    return VllmLaunch(
        host_argv=(model.python, "-m", "hxp.sim.vllm", *args),
        container_args=tuple(args),
        container_entrypoint=("python3", "-m", "hxp.sim.vllm"),
    )


def slot_instances(stack: Stack, unit: str, slot: int) -> list[UnitInstance]:
    """A unit's replicas in one blue-green slot (1: each port + replicas, names `-g`)."""
    if unit in stack.services:
        svc = stack.services[unit]
        return [_service_instance(stack, unit, svc, i, slot) for i in range(svc.replicas)]
    model = stack.models[unit]
    return [_model_instance(stack, unit, model, i, slot) for i in range(model.replicas)]


def all_slots(stack: Stack, unit: str) -> list[UnitInstance]:
    """A unit's instances; for a unit behind the gateway, both blue-green slots."""
    insts = expand_units(stack, {unit})
    if stack.gateway is not None and unit in stack.gateway.routes:
        insts += slot_instances(stack, unit, 1)
    return insts


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
