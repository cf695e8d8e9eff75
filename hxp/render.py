"""Render unit files, Compose files and Kubernetes manifests from a stack.

Jinja2's sandbox with StrictUndefined: a template can read what it is given and nothing else,
and a missing value is an error naming the template and line. Operators override any built-in
template by putting a file of the same name in the stack's `templates_dir`.
"""

from __future__ import annotations

import json
import math
import re
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

import jinja2
import yaml
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel

from hxp import __version__
from hxp.errors import Issue, OutputCheckError, StackValidationError, TemplateError
from hxp.spec import ModelSpec, Stack, format_duration
from hxp.startup import weights_gib_from_name
from hxp.units import UnitInstance, expand_units
from hxp.vllm import CONTAINER_CACHE_DIR, FLAG_TABLE, parse_version

Target = Literal["systemd", "compose", "k8s", "monitoring"]
TARGETS: tuple[Target, ...] = ("systemd", "compose", "k8s")  # the unit targets
ALL_TARGETS: tuple[Target, ...] = (*TARGETS, "monitoring")
_HEADER_RE = re.compile(r"\A\{#-?\s*hxp-template\s+version=(\d+)\b")


def builtin_templates_dir() -> Path:
    """The templates shipped with hxp: the repository's templates/ or the wheel's copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "templates", here / "_templates"):
        if candidate.is_dir():
            return candidate
    raise TemplateError("built-in templates not found (broken installation)")


class _VersionedLoader(jinja2.FileSystemLoader):
    """A file loader that refuses templates without a `{# hxp-template version=N #}` header."""

    def __init__(self, searchpath: list[Path]) -> None:
        super().__init__([str(p) for p in searchpath])
        self.versions: dict[str, tuple[int, str]] = {}

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        source, filename, uptodate = super().get_source(environment, template)
        match = _HEADER_RE.match(source)
        if match is None:
            raise TemplateError(
                f"{filename}:1 template has no version header "
                "('{# hxp-template version=N #}' on the first line)"
            )
        self.versions[template] = (int(match.group(1)), filename)
        return source, filename, uptodate


def systemd_arg(value: str) -> str:
    """Quote one argv element for ExecStart=: no word splitting, no $VAR or %-specifier."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def systemd_value(value: str) -> str:
    """Quote a value for Environment=/Description= lines: no %-specifier expansion."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def systemd_text(value: str) -> str:
    """Free text (Description=): specifiers escaped, no quoting needed."""
    return value.replace("%", "%%")


# Left raw by json.dumps, but refused by YAML readers (C1 controls, surrogates, U+FFFE/U+FFFF)
# or read as a line break and folded (U+0085, U+2028, U+2029): written as \uXXXX escapes.
_YAML_UNSAFE_RE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")


def _quoted(text: str) -> str:
    return _YAML_UNSAFE_RE.sub(
        lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False)
    )


def yaml_str(value: Any) -> str:
    """A YAML scalar that always reads back as the same string (JSON is a YAML subset)."""
    return _quoted(str(value))


def compose_str(value: Any) -> str:
    """A YAML string for Compose, with `$` escaped so Compose does not interpolate it."""
    return _quoted(str(value).replace("$", "$$"))


def k8s_arg(value: Any) -> str:
    """A YAML string for a container's command/args: `$` doubled, so no $(VAR) is expanded."""
    return _quoted(str(value).replace("$", "$$"))


def compose_duration(seconds: float) -> str:
    return format_duration(seconds)


def url_parts(url: str) -> dict[str, Any]:
    """Split a health URL for probes: scheme, host, port, path (with query)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return {"scheme": parts.scheme.upper(), "host": parts.hostname, "port": port, "path": path}


@dataclass(frozen=True)
class RenderedFile:
    """One output file: where it goes, what it holds, and which template made it."""

    path: str
    content: str
    template: str
    template_version: int
    mode: int = 0o644


# pydantic's own API on models (parse_raw/parse_file can unpickle or read files, model_* can
# rebuild and dump): templates read a model's fields and the stack's own methods, never these.
_PYDANTIC_API = frozenset(dir(BaseModel))


class _Sandbox(SandboxedEnvironment):
    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        model = isinstance(obj, BaseModel) or (isinstance(obj, type) and issubclass(obj, BaseModel))
        if model and attr in _PYDANTIC_API:
            return False
        return bool(super().is_safe_attribute(obj, attr, value))


class Renderer:
    """Jinja2 sandbox over `templates_dir` (operator overrides) then the built-in templates."""

    def __init__(self, templates_dir: str | Path | None = None) -> None:
        search: list[Path] = []
        if templates_dir is not None:
            user = Path(templates_dir)
            if not user.is_dir():
                raise StackValidationError(
                    [Issue(f"no such directory {str(user)!r}", "templates_dir")]
                )
            search.append(user)
        search.append(builtin_templates_dir())
        self.loader = _VersionedLoader(search)
        self.env = _Sandbox(
            loader=self.loader,
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            systemd_arg=systemd_arg,
            systemd_value=systemd_value,
            systemd_text=systemd_text,
            yaml_str=yaml_str,
            compose_str=compose_str,
            k8s_arg=k8s_arg,
            duration=compose_duration,
            url_parts=url_parts,
        )
        # Where model containers keep their caches (hxp.vllm): the templates mount it writable.
        self.env.globals["cache_dir"] = CONTAINER_CACHE_DIR

    def render(self, template: str, **context: Any) -> RenderedFile:
        """Render one template; errors name the template file and line."""
        try:
            tpl = self.env.get_template(template)
            version, _filename = self.loader.versions[template]
            header = f"Rendered by hxp {__version__} from {template} (template version {version})"
            text = tpl.render(header=header, **context)
        except TemplateError:
            raise
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"{exc.filename or exc.name or template}:{exc.lineno} template syntax error: "
                f"{exc.message}"
            ) from None
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(f"template {exc.name!r} not found") from None
        except Exception as exc:  # a runtime error inside the template
            raise TemplateError(f"{_template_frame(exc, template)} {exc}") from None
        return RenderedFile(path="", content=text, template=template, template_version=version)


def _template_frame(exc: BaseException, fallback: str) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith(".j2")]
    if frames:
        return f"{frames[-1].filename}:{frames[-1].lineno}"
    return fallback


def _need_images(units: Iterable[UnitInstance], target: str) -> None:
    issues = [
        Issue(f"required to render target {target}", f"{u.field_path}.image")
        for u in units
        if u.image is None and u.replica == 0
    ]
    if issues:
        raise StackValidationError(issues)


#: The file that lists every rendered manifest for `kubectl apply -k`.
K8S_KUSTOMIZATION = "kustomization.yaml"
#: Kubernetes label values and Service names (RFC 1035 labels) allow 63 characters.
K8S_NAME_MAX = 63


def _k8s_names_fit(stack: Stack, units: Iterable[UnitInstance]) -> None:
    """`<stack>-<unit>` names the Deployment, its Service and the instance label: it must fit."""
    issues = [
        Issue(
            f"'{stack.stack}-{u.unit}' is {len(stack.stack) + 1 + len(u.unit)} characters; "
            f"Kubernetes names its Service and instance label <stack>-<unit>, which allow "
            f"{K8S_NAME_MAX}: shorten the unit or the stack name to render target k8s",
            u.field_path,
        )
        for u in units
        if u.replica == 0 and len(stack.stack) + 1 + len(u.unit) > K8S_NAME_MAX
    ]
    if issues:
        raise StackValidationError(issues)


# --------------------------------------------------------------------------- Kubernetes pods

#: preStop pause of a model pod: how long the kubelet waits before vLLM gets SIGTERM, so that
#: the pod's endpoint leaves the Service first. Endpoint removal starts when the pod starts
#: terminating, at the same time as the preStop hook; kube-proxy and ingress controllers then
#: apply it on their next sync (about a second each, up to several in large clusters). vLLM
#: does not drain: a request that still arrives after SIGTERM is refused, and before 0.18 an
#: in-flight one is cut. 15 s covers slow syncs; it is the pause KServe's LLM pods use.
K8S_PRESTOP_SECONDS = 15
#: After the drain, vLLM tears its engine processes down (it waited a fixed 5 s for them before
#: `--shutdown-timeout` existed, vLLM PR #34730): this is added to the grace period.
K8S_EXIT_MARGIN_SECONDS = 5
#: Name of the PersistentVolumeClaim suffix that holds a model's caches (HF_HOME, compile caches)
#: when HF_HOME is not on a volume the model declares.
K8S_CACHE_CLAIM = "hxp-cache"
#: Cache claim size when the model's size is unknown (neither its name nor a config says).
K8S_CACHE_DEFAULT_GIB = 100
_SHUTDOWN_TIMEOUT = next(f for f in FLAG_TABLE if f.flag == "--shutdown-timeout")


@dataclass(frozen=True)
class K8sPodPlan:
    """How one unit's Deployment rolls out, stops and keeps its caches on Kubernetes."""

    strategy: Literal["RollingUpdate", "Recreate"]
    max_unavailable: int  # RollingUpdate only
    max_surge: int  # RollingUpdate only
    why: str  # one line for the manifest: why this strategy
    grace_seconds: int  # terminationGracePeriodSeconds
    drain_seconds: int  # the part of it after SIGTERM: vLLM's drain, or the unit's stop_timeout
    prestop_seconds: int | None  # models: the preStop sleep; None: no hook
    shutdown_timeout: int | None  # vLLM's drain after SIGTERM (>= 0.18); None: not supported
    add_shutdown_flag: bool  # hxp appends `--shutdown-timeout N` (not in extra_args already)
    cache_claim: str | None  # PVC mounted at the cache dir (HF_HOME under it); None: none
    cache_size_gib: int
    cache_access: Literal["ReadWriteOnce", "ReadWriteMany"]
    cache_empty_dir: bool  # the cache dir is an emptyDir (HF_HOME is on a declared volume)


def _seconds(value: float) -> int:
    return max(math.ceil(value), 1)


def _extra_shutdown_timeout(args: Iterable[str]) -> int | None:
    """The value of a `--shutdown-timeout` the operator put in `vllm.extra_args`, if any."""
    items = list(args)
    for i, arg in enumerate(items):
        value: str | None = None
        if arg.startswith("--shutdown-timeout="):
            value = arg.split("=", 1)[1]
        elif arg == "--shutdown-timeout" and i + 1 < len(items):
            value = items[i + 1]
        if value is not None:
            try:
                return max(math.ceil(float(value)), 0)
            except ValueError:
                return None
    return None


def model_cache_gib(model: ModelSpec) -> int:
    """Size of a model's cache claim: its weights (from the parameter count in its name, as the
    start-up grace estimates them) plus a fifth for tokenizer, config and revisions, plus 10 GiB
    of compile caches, rounded up to 10 GiB; 100 GiB when the size is unknown; 1 GiB for the
    simulator, which downloads nothing."""
    if model.engine == "simulator":
        return 1
    per_gpu = weights_gib_from_name(model)
    if per_gpu is None:
        return K8S_CACHE_DEFAULT_GIB
    total = per_gpu * model.tensor_parallel() * model.vllm.pipeline_parallel_size
    return int(math.ceil((total * 1.2 + 10) / 10) * 10)


def _under(path: str, root: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(root))


def k8s_pod_plan(unit: UnitInstance) -> K8sPodPlan:
    """Rollout, stop and cache decisions for a unit's Deployment (pure).

    GPU replicas: no spare GPU is assumed (a full node), so a rollout never adds a pod: several
    replicas replace one at a time (maxUnavailable 1, maxSurge 0); a single one is recreated.
    Without GPUs, a new pod starts before an old one stops (maxSurge 1), as before.
    """
    if unit.gpu_count and unit.replicas > 1:
        strategy: Literal["RollingUpdate", "Recreate"] = "RollingUpdate"
        unavailable, surge = 1, 0
        why = "GPU replicas, no spare GPU assumed: replace one at a time, never add one"
    elif unit.gpu_count:
        strategy, unavailable, surge = "Recreate", 0, 0
        why = "one GPU replica, no spare GPU assumed: the old pod stops before the new starts"
    else:
        strategy = "RollingUpdate"
        unavailable, surge = (0 if unit.replicas > 1 else 1), 1
        why = "no GPUs: start a new pod before an old one stops"
    stop = _seconds(unit.spec.stop_timeout)
    if unit.kind != "model":
        return K8sPodPlan(
            strategy, unavailable, surge, why, stop, stop, None, None, False, None, 0,
            "ReadWriteOnce", False,
        )  # fmt: skip
    spec = unit.spec
    assert isinstance(spec, ModelSpec)
    env = dict(unit.container_env)
    hf_home = env.get("HF_HOME", f"{CONTAINER_CACHE_DIR}/huggingface")
    targets = [v.target for v in spec.volumes]
    on_volume = any(_under(hf_home, t) for t in targets)
    if not on_volume and not _under(hf_home, CONTAINER_CACHE_DIR):
        raise StackValidationError(
            [
                Issue(
                    f"HF_HOME {hf_home!r} is on no volume: on Kubernetes the weights would be "
                    f"lost (and downloaded again) at every restart; declare a volume whose "
                    f"target holds it, or leave HF_HOME unset (hxp keeps it on a "
                    f"PersistentVolumeClaim under {CONTAINER_CACHE_DIR})",
                    f"{unit.field_path}.env.HF_HOME",
                )
            ]
        )
    cache_claim: str | None = None
    if not on_volume and CONTAINER_CACHE_DIR not in targets:
        if any(v.name == K8S_CACHE_CLAIM for v in spec.volumes):
            raise StackValidationError(
                [
                    Issue(
                        f"volume name {K8S_CACHE_CLAIM!r} is reserved on Kubernetes for the "
                        "model's cache claim: rename the volume",
                        f"{unit.field_path}.volumes",
                    )
                ]
            )
        cache_claim = f"{unit.stack}-{unit.unit}-{K8S_CACHE_CLAIM}"
    supported = _SHUTDOWN_TIMEOUT.present_in(parse_version(spec.vllm.version))
    # The launch already carries the flag (hxp.vllm.shutdown_args) unless the operator gave it.
    args = list(spec.vllm.extra_args) + list(unit.container_args)
    flag_given = any(a.split("=", 1)[0] == "--shutdown-timeout" for a in args)
    given = _extra_shutdown_timeout(args) if supported else None
    shutdown = (given if given is not None else stop) if supported else None
    drain = shutdown if shutdown is not None else stop
    return K8sPodPlan(
        strategy=strategy,
        max_unavailable=unavailable,
        max_surge=surge,
        why=why,
        grace_seconds=K8S_PRESTOP_SECONDS + drain + K8S_EXIT_MARGIN_SECONDS,
        drain_seconds=drain,
        prestop_seconds=K8S_PRESTOP_SECONDS,
        shutdown_timeout=shutdown,
        add_shutdown_flag=supported and not flag_given,
        cache_claim=cache_claim,
        cache_size_gib=model_cache_gib(spec),
        cache_access="ReadWriteMany" if unit.replicas > 1 else "ReadWriteOnce",
        cache_empty_dir=on_volume and CONTAINER_CACHE_DIR not in targets,
    )


def _dependency_conditions(stack: Stack) -> dict[str, dict[str, str]]:
    units = stack.units()
    out: dict[str, dict[str, str]] = {}
    for name, unit in units.items():
        out[name] = {}
        for dep in unit.depends_on:
            dep_spec = units[dep]
            healthy = dep_spec.health is not None or dep in stack.models
            out[name][dep] = "service_healthy" if healthy else "service_started"
    return out


def systemd_units(stack: Stack, units: Iterable[UnitInstance]) -> list[UnitInstance]:
    """Units that systemd runs: those on process and systemd hosts (Docker hosts run images)."""
    return [u for u in units if stack.hosts[u.host].backend != "docker"]


def render_stack(
    stack: Stack, target: Target, renderer: Renderer | None = None, only: set[str] | None = None
) -> list[RenderedFile]:
    """Render every file of `target` for the stack (or for the units in `only`)."""
    renderer = renderer or Renderer(stack.templates_dir)
    units = expand_units(stack, only)
    files: list[RenderedFile] = []
    if target == "systemd":
        for unit in systemd_units(stack, units):
            r = renderer.render("systemd/unit.service.j2", stack=stack, unit=unit)
            files.append(_at(r, unit.systemd_name))
    elif target == "compose":
        _need_images(units, target)
        first = [u for u in units if u.replica == 0]
        r = renderer.render(
            "compose/compose.yaml.j2",
            stack=stack,
            units=first,
            conditions=_dependency_conditions(stack),
        )
        files.append(_at(r, "compose.yaml"))
    elif target == "k8s":
        _need_images(units, target)
        _k8s_names_fit(stack, units)
        for unit in units:
            if unit.replica != 0:
                continue
            r = renderer.render("k8s/unit.yaml.j2", stack=stack, unit=unit, k8s=k8s_pod_plan(unit))
            files.append(_at(r, f"{unit.unit}.yaml"))
        # `kubectl apply -k DIR` (and GitOps tools) take the directory as it is.
        r = renderer.render(
            "k8s/kustomization.yaml.j2", stack=stack, resources=sorted(f.path for f in files)
        )
        files.append(_at(r, K8S_KUSTOMIZATION))
    elif target == "monitoring":
        files.extend(_monitoring_files(stack))
    else:  # pragma: no cover - Target is a closed Literal
        raise StackValidationError([Issue(f"unknown target {target!r}", "target")])
    for f in files:
        check_parses(f)
    return files


def _monitoring_files(stack: Stack) -> list[RenderedFile]:
    """Prometheus/Alertmanager config, rules, dashboards, provisioning; the query lint must pass."""
    from hxp.errors import QueryLintError
    from hxp.monitoring import GENERATOR, GENERATOR_VERSION, lint_files, monitoring_files

    generated = monitoring_files(stack)
    problems = lint_files(stack, generated)
    if problems:
        raise QueryLintError(problems)
    return [
        RenderedFile(f.path, f.content, GENERATOR, GENERATOR_VERSION, f.mode) for f in generated
    ]


def _at(rendered: RenderedFile, path: str) -> RenderedFile:
    return RenderedFile(
        path=path,
        content=rendered.content,
        template=rendered.template,
        template_version=rendered.template_version,
        mode=rendered.mode,
    )


def check_parses(f: RenderedFile) -> None:
    """Every YAML output must parse back into mappings; an error names file and line."""
    if not f.path.endswith((".yaml", ".yml")):
        return
    try:
        docs = [d for d in yaml.safe_load_all(f.content) if d is not None]
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else "?"
        raise OutputCheckError(
            [f"{f.path}:{line} (from {f.template}) does not parse as YAML: {exc.problem}"]
        ) from None
    for doc in docs:
        if not isinstance(doc, dict):
            raise OutputCheckError([f"{f.path} (from {f.template}): a document is not a mapping"])


def write_files(files: Iterable[RenderedFile], out_dir: str | Path) -> list[Path]:
    """Write rendered files under `out_dir` (no path escapes it); returns the paths written."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        target = (root / f.path).resolve()
        if root.resolve() not in target.parents:
            raise OutputCheckError([f"refusing to write outside {root}: {f.path}"])
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(f.content, encoding="utf-8")
        tmp.chmod(f.mode)
        tmp.replace(target)
        written.append(target)
    return written
