"""Docker containers through the Docker SDK, one per unit instance, on a local or ssh host.

Each instance is the container `hxp-<stack>-<instance>`, labelled with its stack, unit,
instance, config hash and revision. An Update stops the current container and keeps it, renamed
`hxp-<stack>-<instance>-prev`, until Commit removes it or Restore puts it back. Containers run
with host networking, `--init`, a non-root uid, no capabilities and `no-new-privileges`; models
get their GPUs through device requests (never CUDA_VISIBLE_DEVICES), `vllm serve` as their
entrypoint and a `hxp-<stack>-<unit>-cache` volume for the Hugging Face and compile caches.

Secret values (`secret_env`, resolved by the deploy task) go into the container's environment:
that is Docker's model, so anyone who may run `docker inspect` on the host can read them. They
never reach labels, the command line or hxp's logs.

Images must already be on the host: no registry pull is attempted, a missing image is a
permanent error. The container healthcheck is a shell one-liner run inside the container:
HTTP checks use `wget` (busybox or GNU) or else `curl`, TCP checks `nc -z` or else busybox's
`nc HOST PORT -e true`; the deploy's readiness gate still probes from the orchestrator.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import docker
import docker.errors
import docker.types

from hxp.backends.base import (
    LABEL_CONFIG_HASH,
    LABEL_INSTANCE,
    LABEL_REVISION,
    LABEL_STACK,
    LABEL_UNIT,
    BackendAction,
    Commit,
    Create,
    LogScope,
    Remove,
    Restore,
    Start,
    Stop,
    UnitRef,
    Update,
)
from hxp.backends.runners import SshRunner, runner_for
from hxp.errors import BackendError
from hxp.plan import ObservedUnit
from hxp.spec import HealthSpec, HostSpec, RestartPolicy
from hxp.units import UnitInstance
from hxp.vllm import CONTAINER_CACHE_DIR

# Docker-only labels: what Stop/Start/Restore need when they have no unit spec at hand.
LABEL_STOP_TIMEOUT = "hxp.stop-timeout"
LABEL_RESTART = "hxp.restart"

PREVIOUS_SUFFIX = "-prev"
DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"
ON_FAILURE_RETRIES = 5
NANOSECONDS = 1_000_000_000
DEFAULT_GRACE = 10.0
RUN_SLACK = 0.1  # seconds before StartedAt where a run's log starts (run_since)
#: How long an engine this process has reached before is waited for when it stops answering
#: (its daemon restarting: stopping its containers, then starting again) before a call fails.
#: An engine never reached fails at once.
ENGINE_RETURN_SECONDS = 30.0
ENGINE_POLL_SECONDS = 0.25
_REACHED: set[tuple[str, str, str]] = set()  # (host, runner, DOCKER_HOST) that answered


# ---------------------------------------------------------------- pure: names and specs


def container_name(stack: str, instance: str) -> str:
    """The current container of an instance."""
    return f"hxp-{stack}-{instance}"


def previous_name(stack: str, instance: str) -> str:
    """The container an Update replaced, kept stopped until Commit or Restore."""
    return container_name(stack, instance) + PREVIOUS_SUFFIX


def volume_name(stack: str, unit: str, volume: str) -> str:
    """A unit's named volume (shared by its replicas, kept when the unit is removed)."""
    return f"hxp-{stack}-{unit}-{volume}"


def restart_policy(policy: RestartPolicy) -> dict[str, Any]:
    """Docker's restart policy for the stack file's `restart`."""
    match policy:
        case "always":
            return {"Name": "always"}
        case "on-failure":
            return {"Name": "on-failure", "MaximumRetryCount": ON_FAILURE_RETRIES}
        case "no":
            return {"Name": "no"}


def _nanoseconds(seconds: float) -> int:
    return round(seconds * NANOSECONDS)


def healthcheck(health: HealthSpec) -> dict[str, Any]:
    """The container healthcheck for a unit's checks (all must pass), timings in nanoseconds.

    A lone command runs as it is (exec form); HTTP and TCP checks need a shell in the image and
    only test for success: the readiness gate checks the exact status and body.
    """
    steps: list[str] = []
    if health.http is not None:
        url = shlex.quote(health.http.url)
        steps.append(f"{{ wget -q -O /dev/null {url} || curl -fsS -o /dev/null {url}; }}")
    if health.tcp is not None:
        host, port = shlex.quote(health.tcp.host), str(health.tcp.port)
        steps.append(f"{{ nc -z {host} {port} 2>/dev/null || nc {host} {port} -e true; }}")
    if health.command is not None:
        steps.append(shlex.join(health.command))
    if health.command is not None and len(steps) == 1:
        test = ["CMD", *health.command]
    else:
        test = ["CMD-SHELL", " && ".join(steps)]
    return {
        "test": test,
        "interval": _nanoseconds(health.interval),
        "timeout": _nanoseconds(health.timeout),
        "retries": health.retries,
        "start_period": _nanoseconds(health.start_period),
    }


def labels_of(unit: UnitInstance, config_hash: str, revision: int) -> dict[str, str]:
    return {
        LABEL_STACK: unit.stack,
        LABEL_UNIT: unit.unit,
        LABEL_INSTANCE: unit.name,
        LABEL_CONFIG_HASH: config_hash,
        LABEL_REVISION: str(revision),
        LABEL_STOP_TIMEOUT: f"{unit.spec.stop_timeout:g}",
        LABEL_RESTART: unit.spec.restart,
    }


def create_kwargs(
    unit: UnitInstance, config_hash: str, revision: int, secrets: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Keyword arguments of `client.containers.create` for one instance (raises BackendError).

    `secrets` holds the value of every `secret_env` variable; one missing is refused, never
    silently dropped.
    """
    ref = str(UnitRef.of(unit))
    if unit.image is None:
        raise BackendError("the docker backend needs an image", unit=ref)
    secrets = secrets or {}
    missing = sorted(set(unit.spec.secret_env) - set(secrets))
    if missing:
        raise BackendError(
            f"secret_env {missing} has no value (the deploy resolves it from its Secret "
            "block); refusing to start without it",
            unit=ref,
        )
    spec = unit.spec
    environment = dict(unit.container_env)
    environment.update({k: secrets[k] for k in unit.spec.secret_env})
    kwargs: dict[str, Any] = {
        "image": unit.image,
        "name": container_name(unit.stack, unit.name),
        "environment": environment,
        "user": f"{spec.uid}:{spec.uid}",
        "network_mode": "host",
        "init": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "restart_policy": restart_policy(spec.restart),
        "labels": labels_of(unit, config_hash, revision),
    }
    # Services give their full argv; a model runs `vllm serve` (hxp.vllm) with its arguments.
    if unit.container_entrypoint is not None:
        kwargs["entrypoint"] = list(unit.container_entrypoint)
    if unit.container_args:
        kwargs["command"] = list(unit.container_args)
    if unit.health is not None:
        kwargs["healthcheck"] = healthcheck(unit.health)
    if spec.workdir is not None:
        kwargs["working_dir"] = spec.workdir
    volumes = {
        volume_name(unit.stack, unit.unit, v.name): {
            "bind": v.target,
            "mode": "ro" if v.read_only else "rw",
        }
        for v in spec.volumes
    }
    if unit.kind == "model" and all(v.target != CONTAINER_CACHE_DIR for v in spec.volumes):
        volumes[volume_name(unit.stack, unit.unit, "cache")] = {
            "bind": CONTAINER_CACHE_DIR,
            "mode": "rw",
        }
    if volumes:
        kwargs["volumes"] = volumes
    if spec.resources.memory is not None:
        kwargs["mem_limit"] = spec.resources.memory
    if spec.resources.cpus is not None:
        kwargs["nano_cpus"] = round(spec.resources.cpus * NANOSECONDS)
    if unit.gpu_count:
        if unit.gpus is not None:
            request = docker.types.DeviceRequest(
                device_ids=[str(g) for g in unit.gpus], capabilities=[["gpu"]]
            )
        else:
            request = docker.types.DeviceRequest(count=unit.gpu_count, capabilities=[["gpu"]])
        kwargs["device_requests"] = [request]
    if unit.kind == "model":
        # vLLM's workers share tensors through /dev/shm; Docker's private one is 64 MiB.
        kwargs["ipc_mode"] = "host"
    return kwargs


def _label_int(labels: Mapping[str, str], key: str) -> int | None:
    try:
        return int(labels[key])
    except (KeyError, ValueError):
        return None


def observed_from_attrs(attrs: Mapping[str, Any], host_name: str) -> ObservedUnit | None:
    """What an inspected container says about its instance; None for a kept previous version
    or a container hxp did not create."""
    labels: Mapping[str, str] = (attrs.get("Config") or {}).get("Labels") or {}
    stack, instance = labels.get(LABEL_STACK), labels.get(LABEL_INSTANCE)
    if not stack or not instance:
        return None
    if str(attrs.get("Name", "")).lstrip("/") != container_name(stack, instance):
        return None
    state: Mapping[str, Any] = attrs.get("State") or {}
    status = str(state.get("Status", "unknown"))
    running = status == "running"
    health = (state.get("Health") or {}).get("Status")
    healthy: bool | None
    if not running:
        healthy = False
    elif health is None:
        healthy = True
    else:
        healthy = {"healthy": True, "unhealthy": False}.get(health)  # "starting": unknown yet
    detail = status
    if health is not None:
        detail += f", health {health}"
    if status in ("exited", "dead", "restarting"):
        detail += f", exit code {state.get('ExitCode')}"
    if attrs.get("RestartCount"):
        detail += f", restarts {attrs['RestartCount']}"
    if state.get("Error"):
        detail += f", error: {state['Error']}"
    return ObservedUnit(
        name=instance,
        exists=True,
        running=running,
        healthy=healthy,
        config_hash=labels.get(LABEL_CONFIG_HASH),
        revision=_label_int(labels, LABEL_REVISION),
        detail=detail,
        host=host_name,
        restarts=int(attrs.get("RestartCount") or 0),
    )


def run_since(state: Mapping[str, Any]) -> float | None:
    """Where a container's current run starts in its log, as the `since` of a logs request (a
    Unix time); None when the container never started (its whole log is this run's).

    Every Update creates a new container, so its log holds the new revision only; the log of a
    container restarted (by its restart policy, or a Start or Restore of a stopped one) also
    holds its earlier runs. Docker stamps StartedAt after the program is already running (its
    first line may come a few milliseconds earlier), and restarts a crashed container no sooner
    than 100 ms after the crash (an explicit Start follows a Stop that has waited for the
    output): RUN_SLACK before StartedAt keeps the first line and no line of the run before.
    """
    started = parse_docker_time(str(state.get("StartedAt") or ""))
    if started is None:
        return None
    return max(started - RUN_SLACK, 1e-6)


def parse_docker_time(text: str) -> float | None:
    """Docker's RFC 3339 time with nanoseconds (`2026-12-04T16:17:02.433904835Z`) as a Unix
    time; None for its zero time (`0001-01-01T00:00:00Z`: never happened) or anything else."""
    stamp, _, fraction = text.removesuffix("Z").partition(".")
    try:
        moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        seconds = moment.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)
    except ValueError:
        return None
    return seconds if moment.year > 1970 else None


def _grace_of(labels: Mapping[str, str]) -> float:
    try:
        return float(labels[LABEL_STOP_TIMEOUT])
    except (KeyError, ValueError):
        return DEFAULT_GRACE


def _restart_of(labels: Mapping[str, str]) -> dict[str, Any]:
    match labels.get(LABEL_RESTART):
        case "always":
            return restart_policy("always")
        case "no":
            return restart_policy("no")
        case _:
            return restart_policy("on-failure")


# ---------------------------------------------------------------- the backend


class DockerBackend:
    """Containers on one host's Docker engine (local socket, DOCKER_HOST, or ssh)."""

    kind: ClassVar[str] = "docker"

    def __init__(self, host_name: str, host: HostSpec, state_dir: str | Path) -> None:
        self.host_name = host_name
        self.host = host
        self.state_dir = Path(state_dir)
        self._docker: Any = None

    # ---------------------------------------------------------------- the Backend interface

    def observe(self, stack: str) -> dict[str, ObservedUnit]:
        out: dict[str, ObservedUnit] = {}
        with self._errors(None):
            # A container removed between the engine's listing and its inspection (a deploy
            # in another process discarding a kept version) is gone, not an error.
            found = self._client().containers.list(
                all=True, filters={"label": f"{LABEL_STACK}={stack}"}, ignore_removed=True
            )
            for container in found:
                seen = observed_from_attrs(container.attrs, self.host_name)
                if seen is not None:
                    out[seen.name] = seen
        return dict(sorted(out.items()))

    def apply(self, action: BackendAction) -> None:
        match action:
            case Create(unit=unit, config_hash=h, revision=rev, secrets=secrets):
                ref = UnitRef.of(unit)
                kwargs = create_kwargs(unit, h, rev, secrets)
                with self._errors(ref):
                    self._require_image(unit.image or "", ref)
                    current = self._get(ref, container_name(ref.stack, ref.instance))
                    if current is not None:  # a retried Create: start over
                        self._discard(current)
                    self._start(self._client().containers.create(**kwargs), ref)
            case Update(unit=unit, config_hash=h, revision=rev, secrets=secrets):
                ref = UnitRef.of(unit)
                kwargs = create_kwargs(unit, h, rev, secrets)
                with self._errors(ref):
                    self._require_image(unit.image or "", ref)
                    self._update(ref, kwargs, h)
            case Start(ref=ref):
                with self._errors(ref):
                    current = self._get(ref, container_name(ref.stack, ref.instance))
                    if current is None:
                        raise BackendError("not created", unit=str(ref))
                    self._start(current, ref)
            case Stop(ref=ref, grace_seconds=grace):
                with self._errors(ref):
                    current = self._get(ref, container_name(ref.stack, ref.instance))
                    if current is not None:
                        self._park(current, grace)
            case Remove(ref=ref):
                with self._errors(ref):
                    for name in (container_name(ref.stack, ref.instance), self._prev(ref)):
                        container = self._get(ref, name)
                        if container is not None:
                            self._discard(container)
                with suppress(OSError):
                    self._start_record_path(ref).unlink(missing_ok=True)
            case Restore(ref=ref):
                with self._errors(ref):
                    previous = self._get(ref, self._prev(ref))
                    if previous is None:
                        raise BackendError("no previous version kept to restore", unit=str(ref))
                    current = self._get(ref, container_name(ref.stack, ref.instance))
                    if current is not None:
                        self._discard(current)
                    previous.rename(container_name(ref.stack, ref.instance))
                    self._start(previous, ref)
            case Commit(ref=ref):
                with self._errors(ref):
                    previous = self._get(ref, self._prev(ref))
                    if previous is not None:
                        self._discard(previous)

    def logs(self, ref: UnitRef, lines: int = 50, since: LogScope = "run") -> list[str]:
        """The current container's lines since its latest start (run_since), or, with
        since="start", since hxp last started it (its start record, kept under the state
        directory; without one, since its latest start)."""
        if lines <= 0:
            return []
        with self._errors(ref):
            current = self._get(ref, container_name(ref.stack, ref.instance))
            if current is None:
                return []
            state = current.attrs.get("State") or {}
            begin = run_since(state)
            if since == "start":
                recorded = self._start_record(ref).get(current.id)
                begin = run_since({"StartedAt": recorded}) if recorded else begin
            raw: bytes = current.logs(stdout=True, stderr=True, tail=lines, since=begin)
        return raw.decode("utf-8", "replace").splitlines()[-lines:]

    # ---------------------------------------------------------------- mechanics

    @staticmethod
    def _prev(ref: UnitRef) -> str:
        return previous_name(ref.stack, ref.instance)

    def _update(self, ref: UnitRef, kwargs: dict[str, Any], config_hash: str) -> None:
        current = self._get(ref, container_name(ref.stack, ref.instance))
        if current is not None and current.labels.get(LABEL_CONFIG_HASH) == config_hash:
            # A retried update: the new version exists already; keep the kept old one.
            self._start(current, ref)
            return
        if current is not None:
            previous = self._get(ref, self._prev(ref))
            if previous is not None:
                self._discard(previous)
            self._park(current, _grace_of(current.labels))
            current.rename(self._prev(ref))
        # With no current container, an earlier try already kept the old one (or none existed).
        self._start(self._client().containers.create(**kwargs), ref)

    def _client(self) -> Any:
        """The Docker client, connected on first use. An engine that answered this process
        before and does not now (its daemon restarting) is waited for, up to
        ENGINE_RETURN_SECONDS; one never reached fails at once."""
        if self._docker is not None:
            return self._docker
        where = f"Docker on host {self.host_name!r}"
        engine = (self.host_name, self.host.runner, os.environ.get("DOCKER_HOST", ""))
        deadline = time.monotonic() + ENGINE_RETURN_SECONDS
        while True:
            try:
                client = self._connect()
                break
            except (docker.errors.DockerException, OSError) as exc:
                if engine not in _REACHED or time.monotonic() >= deadline:
                    waited = f" (waited {ENGINE_RETURN_SECONDS:g}s)" if engine in _REACHED else ""
                    raise BackendError(
                        f"cannot reach {where}{waited}: {exc}", transient=True
                    ) from exc
                time.sleep(ENGINE_POLL_SECONDS)
        _REACHED.add(engine)
        self._docker = client
        return client

    def _connect(self) -> Any:
        match self.host.runner:
            case "local":
                client = docker.from_env()
            case "ssh":
                client = docker.DockerClient(base_url=f"unix://{self._forwarded_socket()}")
            case "docker-exec":
                raise BackendError(
                    f"host {self.host_name!r}: the docker backend runs on a local or ssh "
                    "host, not inside a container (runner docker-exec)"
                )
        client.ping()
        return client

    def _forwarded_socket(self) -> Path:
        """A local socket reaching the host's engine through the host's shared ssh connection.

        The SDK's own `ssh://` transport runs `ssh HOST docker system dial-stdio` without any
        options (no pinned known_hosts, key or connection sharing) and needs the docker CLI
        on the host; forwarding the engine's socket over the SshRunner's master keeps all of
        those, and every API call is a channel of the one connection."""
        runner = runner_for(self.host, state_dir=self.state_dir)
        if not isinstance(runner, SshRunner) or runner.control_path is None:
            raise BackendError(f"host {self.host_name!r}: docker over ssh needs an ssh runner")
        remote = self.host.docker_socket or DEFAULT_DOCKER_SOCKET
        local = runner.control_path.with_name(runner.control_path.name + ".docker")
        return runner.forward_unix_socket(remote, local)

    @contextmanager
    def _errors(self, ref: UnitRef | None) -> Iterator[None]:
        """Docker SDK failures as BackendError: unreachable or server-side ones are transient."""
        unit = str(ref) if ref is not None else None
        where = f"Docker on host {self.host_name!r}"
        try:
            yield
        except docker.errors.APIError as exc:
            message = exc.explanation or str(exc)
            raise BackendError(
                f"{where}: {message}", transient=exc.is_server_error(), unit=unit
            ) from exc
        except docker.errors.DockerException as exc:
            raise BackendError(f"{where}: {exc}", unit=unit) from exc
        except OSError as exc:  # requests' connection errors and timeouts, ssh failures
            self._docker = None  # the next call connects afresh (and waits for a restart)
            raise BackendError(f"cannot reach {where}: {exc}", transient=True, unit=unit) from exc

    def _require_image(self, image: str, ref: UnitRef) -> None:
        try:
            self._client().images.get(image)
        except docker.errors.ImageNotFound:
            raise BackendError(
                f"image {image} not found on host {self.host_name!r}; no registry pull is "
                "attempted (build or load it on the host first)",
                unit=str(ref),
            ) from None

    def _get(self, ref: UnitRef, name: str) -> Any:
        """The container called `name`, if it is this instance's; None when there is none."""
        try:
            container = self._client().containers.get(name)
        except docker.errors.NotFound:
            return None
        labels = container.labels
        if labels.get(LABEL_STACK) != ref.stack or labels.get(LABEL_INSTANCE) != ref.instance:
            owner = f"{labels.get(LABEL_STACK)}/{labels.get(LABEL_INSTANCE)}"
            raise BackendError(
                f"container {name} on host {self.host_name!r} belongs to {owner}, not to this "
                "instance; hxp will not touch it",
                unit=str(ref),
            )
        return container

    def _start(self, container: Any, ref: UnitRef) -> None:
        container.reload()
        if container.status == "running":
            return
        container.update(restart_policy=_restart_of(container.labels))
        try:
            container.start()
        except docker.errors.APIError as exc:
            # The runtime could not start the program (missing executable, no GPU runtime):
            # retrying will not help.
            raise BackendError(
                f"cannot start {container.name}: {exc.explanation or exc}", unit=str(ref)
            ) from exc
        container.reload()
        started = (container.attrs.get("State") or {}).get("StartedAt")
        if started:
            self._write_start_record(ref, {container.id: str(started)})

    # Docker keeps only the latest StartedAt, and its restart policy's restarts move it. The
    # StartedAt of hxp's own latest start of the instance's container (for logs since="start")
    # is kept in STATE/docker/<host>/<stack>/<instance>.json, by container id, in the Docker
    # engine's clock.

    def _start_record_path(self, ref: UnitRef) -> Path:
        return self.state_dir / "docker" / self.host_name / ref.stack / f"{ref.instance}.json"

    def _start_record(self, ref: UnitRef) -> dict[str, str]:
        try:
            data = json.loads(self._start_record_path(ref).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, str)}

    def _write_start_record(self, ref: UnitRef, record: dict[str, str]) -> None:
        path = self._start_record_path(ref)
        with suppress(OSError):  # without it, since="start" falls back to the latest run
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(path)

    @staticmethod
    def _park(container: Any, grace: float) -> None:
        """Stop a container and keep it stopped, even across a restart of the Docker engine."""
        container.update(restart_policy={"Name": "no"})
        container.stop(timeout=math.ceil(grace))

    def _discard(self, container: Any) -> None:
        """Stop a container gracefully (if it still can be) and delete it."""
        with suppress(docker.errors.APIError):
            self._park(container, _grace_of(container.labels))
        container.remove(force=True)
