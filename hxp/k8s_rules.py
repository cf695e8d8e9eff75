"""The Kubernetes API server's semantic rules that matter for what hxp renders (pure).

`kubernetes-validate --strict` checks manifests against the OpenAPI schema only; a real API
server also runs the validation functions of its source tree, and refuses a manifest that the
schema accepts (a Deployment with `maxUnavailable: 0` and `maxSurge: 0`, a port name of 16
characters, a volume mount naming no volume). No API server runs here, so the rules are written
out below from Kubernetes' own source, each with the file and function it comes from:

- `pkg/apis/apps/validation/validation.go` and `pkg/apis/apps/v1/defaults.go` (Deployments),
- `pkg/apis/core/validation/validation.go` and `pkg/apis/core/helper/helpers.go` (pods,
  containers, Services, ConfigMaps, resources),
- `staging/src/k8s.io/apimachinery/pkg/util/validation/validation.go`,
  `.../pkg/api/validation/generic.go` and `.../pkg/apis/meta/v1/validation/validation.go`
  (names, labels, port names, environment variable names).

Read at Kubernetes v1.30.3 (apimachinery tag kubernetes-1.30.3; core validation as vendored at
k8s.io/kubernetes v1.30.3; apps validation as of v1.30.1, its Deployment functions unchanged
in later copies). The logic is restated here as facts; no Kubernetes code is copied.

Only what hxp's templates can produce is checked: Deployments (their pod template), Services,
ConfigMaps, PersistentVolumeClaims, Ingresses. Every violation names the rule, the Kubernetes
source it comes from, the file, the object and the field path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml

#: The Kubernetes release the rules below were read from.
KUBERNETES_VERSION = "v1.30.3"

_APPS = "pkg/apis/apps/validation/validation.go"
_APPS_DEFAULTS = "pkg/apis/apps/v1/defaults.go"
_CORE = "pkg/apis/core/validation/validation.go"
_CORE_HELPERS = "pkg/apis/core/helper/helpers.go"
_CORE_DEFAULTS = "pkg/apis/core/v1/defaults.go"
_UTIL = "staging/src/k8s.io/apimachinery/pkg/util/validation/validation.go"
_GENERIC = "staging/src/k8s.io/apimachinery/pkg/api/validation/generic.go"
_META = "staging/src/k8s.io/apimachinery/pkg/apis/meta/v1/validation/validation.go"
_NETWORKING = "pkg/apis/networking/validation/validation.go"


@dataclass(frozen=True)
class Rule:
    """One API server rule: its id, what it says, and where in Kubernetes it comes from."""

    id: str
    summary: str
    sources: tuple[str, ...]  # "file: function, function"


RULES: dict[str, Rule] = {
    r.id: r
    for r in (
        Rule(
            "deployment-strategy",
            "strategy type is RollingUpdate or Recreate; Recreate has no rollingUpdate; "
            "maxUnavailable and maxSurge are integers >= 0 or 'N%', not both 0, "
            "maxUnavailable at most 100%; a missing one defaults to 25%",
            (
                f"{_APPS}: ValidateDeploymentStrategy, ValidateRollingUpdateDeployment, "
                "ValidatePositiveIntOrPercent, IsNotMoreThan100Percent",
                f"{_APPS_DEFAULTS}: SetDefaults_Deployment",
                f"{_UTIL}: IsValidPercent",
            ),
        ),
        Rule(
            "extended-resource",
            "an extended resource (a domain-prefixed name outside kubernetes.io, such as "
            "nvidia.com/gpu) is a whole number, and its request, when set, equals its limit "
            "(a request without a limit is refused)",
            (
                f"{_CORE}: ValidateResourceRequirements, ValidateResourceQuantityValue",
                f"{_CORE_HELPERS}: IsExtendedResourceName, IsIntegerResourceName, "
                "IsOvercommitAllowed, IsNativeResource",
            ),
        ),
        Rule(
            "object-name",
            "metadata.name is a DNS-1123 subdomain (Deployment, ConfigMap, Secret, "
            "PersistentVolumeClaim, Ingress) or a DNS-1035 label (Service)",
            (
                f"{_APPS}: ValidateDeploymentName",
                f"{_CORE}: ValidateServiceName, ValidateConfigMapName, "
                "ValidatePersistentVolumeName, ValidateSecretName",
                f"{_NETWORKING}: ValidateIngressName",
                f"{_GENERIC}: NameIsDNSSubdomain, NameIsDNS1035Label",
                f"{_UTIL}: IsDNS1123Subdomain, IsDNS1035Label",
            ),
        ),
        Rule(
            "container-name",
            "a container name is a DNS-1123 label, unique in the pod",
            (f"{_CORE}: validateContainerCommon, validateContainers", f"{_UTIL}: IsDNS1123Label"),
        ),
        Rule(
            "port-name",
            "a container port name is an IANA service name (at most 15 characters of a-z, 0-9 "
            "and '-', at least one letter, no '--', no '-' at either end), unique in the "
            "container; a Service port name is a DNS-1123 label, required when there are "
            "several, unique; a named targetPort or probe port is an IANA service name",
            (
                f"{_CORE}: validateContainerPorts, validateServicePort, ValidatePortNumOrName",
                f"{_UTIL}: IsValidPortName, IsValidPortNum, IsDNS1123Label",
            ),
        ),
        Rule(
            "label",
            "a label key is a qualified name (optional DNS-1123 subdomain prefix and '/', "
            "name of at most 63 characters) and a value is at most 63 characters of "
            "alphanumerics, '-', '_', '.', starting and ending with an alphanumeric",
            (
                f"{_META}: ValidateLabels, ValidateLabelName",
                f"{_UTIL}: IsQualifiedName, IsValidLabelValue",
            ),
        ),
        Rule(
            "selector-matches-template",
            "a Deployment's selector is not empty and matches its pod template's labels",
            (f"{_APPS}: ValidateDeploymentSpec, ValidatePodTemplateSpecForReplicaSet",),
        ),
        Rule(
            "env-name",
            "an environment variable name (and an envFrom prefix) matches "
            "[-._a-zA-Z][-._a-zA-Z0-9]* and is not '.', '..' or '..*'; ConfigMap keys and "
            "secretKeyRef keys are config keys ([-._a-zA-Z0-9]+, at most 253)",
            (
                f"{_CORE}: ValidateEnv, ValidateEnvFrom, ValidateConfigMap, "
                "validateSecretKeySelector",
                f"{_UTIL}: IsEnvVarName, IsConfigMapKey",
            ),
        ),
        Rule(
            "probe-handler",
            "a probe (and a lifecycle hook) has exactly one handler; liveness and startup "
            "probes have successThreshold 1",
            (
                f"{_CORE}: validateHandler, validateProbe, validateLivenessProbe, "
                "validateStartupProbe, validateLifecycle",
            ),
        ),
        Rule(
            "prestop-sleep",
            "a lifecycle sleep lasts more than 0 seconds and no longer than the pod's "
            "terminationGracePeriodSeconds (30 when unset)",
            (f"{_CORE}: validateSleepAction", f"{_CORE_DEFAULTS}: SetDefaults_PodSpec"),
        ),
        Rule(
            "volume-mount",
            "a volume name is a DNS-1123 label, unique, with exactly one source; every "
            "volumeMount names a volume of the pod and mount paths are unique per container",
            (
                f"{_CORE}: ValidateVolumes, validateVolumeSource, ValidateVolumeMounts",
                f"{_UTIL}: IsDNS1123Label",
            ),
        ),
    )
}


@dataclass(frozen=True)
class Violation:
    """One broken rule: where (file, object, field path) and what."""

    rule: str
    file: str
    obj: str
    field: str
    message: str
    source: str = ""  # the Kubernetes file and function; the rule's first source when empty

    def __str__(self) -> str:
        source = self.source or RULES[self.rule].sources[0]
        return (
            f"{self.file}: {self.obj} {self.field}: {self.message} "
            f"[rule {self.rule}; Kubernetes {KUBERNETES_VERSION} {source}]"
        )


# --------------------------------------------------------------------------- string formats
# From apimachinery util/validation (IsDNS1123Label, IsDNS1123Subdomain, IsDNS1035Label,
# IsQualifiedName, IsValidLabelValue, IsValidPortName, IsEnvVarName, IsConfigMapKey).

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL_RE = re.compile(_DNS1123_LABEL)
_DNS1123_SUBDOMAIN_RE = re.compile(rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*")
_DNS1035_LABEL_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_PORT_NAME_CHARS_RE = re.compile(r"[-a-z0-9]+")
_ENV_NAME_RE = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_CONFIG_KEY_RE = re.compile(r"[-._a-zA-Z0-9]+")
_PERCENT_RE = re.compile(r"[0-9]+%")


def dns1123_label_errors(value: str) -> list[str]:
    errs = ["must be no more than 63 characters"] if len(value) > 63 else []
    if not _DNS1123_LABEL_RE.fullmatch(value):
        errs.append(
            "must not contain dots"
            if _DNS1123_SUBDOMAIN_RE.fullmatch(value)
            else "must be a lowercase RFC 1123 label (a-z, 0-9 and '-', alphanumeric at both ends)"
        )
    return errs


def dns1123_subdomain_errors(value: str) -> list[str]:
    errs = ["must be no more than 253 characters"] if len(value) > 253 else []
    if not _DNS1123_SUBDOMAIN_RE.fullmatch(value):
        errs.append(
            "must be a lowercase RFC 1123 subdomain (a-z, 0-9, '-' and '.', "
            "alphanumeric at both ends)"
        )
    return errs


def dns1035_label_errors(value: str) -> list[str]:
    errs = ["must be no more than 63 characters"] if len(value) > 63 else []
    if not _DNS1035_LABEL_RE.fullmatch(value):
        errs.append(
            "must be a DNS-1035 label (a-z, 0-9 and '-', starting with a letter, "
            "ending with an alphanumeric)"
        )
    return errs


def qualified_name_errors(value: str) -> list[str]:
    parts = value.split("/")
    if len(parts) > 2:
        return ["must be a qualified name with an optional DNS subdomain prefix and '/'"]
    errs: list[str] = []
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            errs.append("prefix part must be non-empty")
        else:
            errs += [f"prefix part {e}" for e in dns1123_subdomain_errors(prefix)]
    if not name:
        errs.append("name part must be non-empty")
    elif len(name) > 63:
        errs.append("name part must be no more than 63 characters")
    if not _QUALIFIED_NAME_RE.fullmatch(name):
        errs.append(
            "name part must consist of alphanumerics, '-', '_' or '.', "
            "starting and ending with an alphanumeric"
        )
    return errs


def label_value_errors(value: str) -> list[str]:
    errs = ["must be no more than 63 characters"] if len(value) > 63 else []
    if value and not _QUALIFIED_NAME_RE.fullmatch(value):
        errs.append(
            "must be empty or consist of alphanumerics, '-', '_' or '.', "
            "starting and ending with an alphanumeric"
        )
    return errs


def port_name_errors(value: str) -> list[str]:
    """IANA service name syntax, lower case only (RFC 6335 as Kubernetes applies it)."""
    errs = ["must be no more than 15 characters"] if len(value) > 15 else []
    if not _PORT_NAME_CHARS_RE.fullmatch(value):
        errs.append("must contain only a-z, 0-9 and '-'")
    if not re.search(r"[a-z]", value):
        errs.append("must contain at least one letter (a-z)")
    if "--" in value:
        errs.append("must not contain consecutive hyphens")
    if value.startswith("-") or value.endswith("-"):
        errs.append("must not begin or end with a hyphen")
    return errs


def _chdir_errors(value: str) -> list[str]:
    if value == ".":
        return ["must not be '.'"]
    if value == "..":
        return ["must not be '..'"]
    if value.startswith(".."):
        return ["must not start with '..'"]
    return []


def env_name_errors(value: str) -> list[str]:
    """Strict names: the RelaxedEnvironmentVariableValidation gate is alpha (off) in 1.30."""
    errs = []
    if not _ENV_NAME_RE.fullmatch(value):
        errs.append(
            "must consist of letters, digits, '_', '-' or '.', and must not start with a digit"
        )
    return errs + _chdir_errors(value)


def config_key_errors(value: str) -> list[str]:
    errs = ["must be no more than 253 characters"] if len(value) > 253 else []
    if not _CONFIG_KEY_RE.fullmatch(value):
        errs.append("must consist of alphanumerics, '-', '_' or '.'")
    return errs + _chdir_errors(value)


# --------------------------------------------------------------------------- quantities

_QUANTITY_RE = re.compile(
    r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(Ki|Mi|Gi|Ti|Pi|Ei)|([numkMGTPE])|([eE][+-]?[0-9]+))?"
)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def parse_quantity(value: Any) -> Decimal | None:
    """A Kubernetes resource.Quantity ("2", "500m", "1Gi", "1e3") as a number; None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return Decimal(str(value))
    if not isinstance(value, str):
        return None
    match = _QUANTITY_RE.fullmatch(value.strip())
    if match is None:
        return None
    try:
        number = Decimal(match.group(1))
    except InvalidOperation:  # pragma: no cover - the pattern admits only numbers
        return None
    binary, decimal, exponent = match.group(2), match.group(3), match.group(4)
    if binary:
        return number * _BINARY[binary]
    if decimal:
        return number.scaleb(_DECIMAL[decimal])
    if exponent:
        return number.scaleb(int(exponent[1:]))
    return number


def is_native_resource(name: str) -> bool:
    """Unprefixed names and names under kubernetes.io/ are native (helpers.IsNativeResource)."""
    return "/" not in name or "kubernetes.io/" in name


def is_extended_resource(name: str) -> bool:
    """Domain-prefixed, not native, no 'requests.' prefix, and a qualified name once prefixed
    with 'requests.' (helpers.IsExtendedResourceName)."""
    if is_native_resource(name) or name.startswith("requests."):
        return False
    return not qualified_name_errors(f"requests.{name}")


# --------------------------------------------------------------------------- the checks


class _Checker:
    def __init__(self, file: str) -> None:
        self.file = file
        self.found: list[Violation] = []

    def add(self, rule: str, obj: str, field: str, message: str, source: str = "") -> None:
        self.found.append(Violation(rule, self.file, obj, field, message, source))


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


#: The name check of each kind hxp renders: (DNS-1035 label, source) or (DNS-1123 subdomain, ...).
_NAME_RULES = {
    "Deployment": (False, f"{_APPS}: ValidateDeploymentName (NameIsDNSSubdomain)"),
    "ConfigMap": (False, f"{_CORE}: ValidateConfigMapName (NameIsDNSSubdomain)"),
    "Secret": (False, f"{_CORE}: ValidateSecretName (NameIsDNSSubdomain)"),
    "PersistentVolumeClaim": (
        False,
        f"{_CORE}: ValidatePersistentVolumeClaim (ValidatePersistentVolumeName, "
        "NameIsDNSSubdomain)",
    ),
    "Ingress": (False, f"{_NETWORKING}: ValidateIngressName (NameIsDNSSubdomain)"),
    "Service": (True, f"{_CORE}: ValidateServiceName (NameIsDNS1035Label)"),
}


def _check_name(c: _Checker, kind: str, obj: str, meta: Mapping[str, Any]) -> None:
    if kind not in _NAME_RULES:
        return  # not an API object hxp renders (kustomization.yaml's Kustomization)
    label, source = _NAME_RULES[kind]
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        c.add("object-name", obj, "metadata.name", "name is required", source)
        return
    errs = dns1035_label_errors(name) if label else dns1123_subdomain_errors(name)
    for e in errs:
        c.add("object-name", obj, "metadata.name", f"{name!r} {e}", source)


def _check_labels(c: _Checker, obj: str, path: str, labels: Any) -> None:
    for key, value in _map(labels).items():
        for e in qualified_name_errors(str(key)):
            c.add("label", obj, f"{path}[{key}]", f"key {key!r}: {e}")
        text = "" if value is None else str(value)
        for e in label_value_errors(text):
            c.add("label", obj, f"{path}[{key}]", f"value {text!r}: {e}")


def _int_or_percent(value: Any) -> tuple[int | None, bool, str | None]:
    """(number, is_percent, error) for an IntOrString field."""
    if isinstance(value, bool):
        return None, False, "must be an integer or a percentage (e.g. '5%')"
    if isinstance(value, int):
        if value < 0:
            return value, False, "must be greater than or equal to 0"
        return value, False, None
    if isinstance(value, str):
        if not _PERCENT_RE.fullmatch(value):
            return None, True, f"{value!r} must be a numeric string followed by '%' (e.g. '25%')"
        return int(value[:-1]), True, None
    return None, False, "must be an integer or a percentage (e.g. '5%')"


def _check_strategy(c: _Checker, obj: str, spec: Mapping[str, Any]) -> None:
    strategy = _map(spec.get("strategy"))
    path = "spec.strategy"
    kind = strategy.get("type", "RollingUpdate")  # SetDefaults_Deployment
    rolling = strategy.get("rollingUpdate")
    if kind == "Recreate":
        if rolling is not None:
            c.add(
                "deployment-strategy",
                obj,
                f"{path}.rollingUpdate",
                "may not be specified when strategy type is 'Recreate'",
            )
        return
    if kind != "RollingUpdate":
        c.add(
            "deployment-strategy",
            obj,
            f"{path}.type",
            f"{kind!r} is not supported: 'Recreate' or 'RollingUpdate'",
        )
        return
    rolling = _map(rolling)
    values: dict[str, int] = {}
    for key in ("maxUnavailable", "maxSurge"):
        raw = rolling.get(key, "25%")  # SetDefaults_Deployment: a missing one is 25%
        number, is_percent, error = _int_or_percent(raw)
        if error is not None:
            c.add("deployment-strategy", obj, f"{path}.rollingUpdate.{key}", error)
        # An invalid value counts as 0 in the both-zero test, as the API server's does.
        values[key] = number if number is not None and error is None else 0
        if key == "maxUnavailable" and is_percent and number is not None and number > 100:
            c.add(
                "deployment-strategy",
                obj,
                f"{path}.rollingUpdate.maxUnavailable",
                f"{raw!r} must not be greater than 100%",
            )
    if values["maxUnavailable"] == 0 and values["maxSurge"] == 0:
        c.add(
            "deployment-strategy",
            obj,
            f"{path}.rollingUpdate.maxUnavailable",
            "may not be 0 when maxSurge is 0 (the rollout could neither add nor remove a pod)",
        )


def _check_selector(c: _Checker, obj: str, spec: Mapping[str, Any]) -> None:
    selector = _map(spec.get("selector"))
    match_labels = _map(selector.get("matchLabels"))
    expressions = _list(selector.get("matchExpressions"))
    if not match_labels and not expressions:
        c.add("selector-matches-template", obj, "spec.selector", "empty selector is invalid")
        return
    _check_labels(c, obj, "spec.selector.matchLabels", match_labels)
    labels = _map(_map(_map(spec.get("template")).get("metadata")).get("labels"))
    missing = {k: v for k, v in match_labels.items() if str(labels.get(k)) != str(v)}
    if missing or (expressions and not _expressions_match(expressions, labels)):
        c.add(
            "selector-matches-template",
            obj,
            "spec.template.metadata.labels",
            f"selector does not match template labels (missing {sorted(missing) or 'expr'})",
        )


def _expressions_match(expressions: list[Any], labels: Mapping[str, Any]) -> bool:
    for item in expressions:
        e = _map(item)
        key, op = str(e.get("key", "")), str(e.get("operator", ""))
        values = [str(v) for v in _list(e.get("values"))]
        have = key in labels
        value = str(labels.get(key)) if have else None
        ok = {
            "In": have and value in values,
            "NotIn": not have or value not in values,
            "Exists": have,
            "DoesNotExist": not have,
        }.get(op, False)
        if not ok:
            return False
    return True


_HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")
_HOOK_HANDLERS = ("exec", "httpGet", "tcpSocket", "sleep")


def _check_port_ref(c: _Checker, obj: str, path: str, port: Any) -> None:
    if isinstance(port, str):
        for e in port_name_errors(port):
            c.add("port-name", obj, path, f"{port!r} {e}")
    elif isinstance(port, int) and not 1 <= port <= 65535:
        c.add("port-name", obj, path, f"{port} must be between 1 and 65535, inclusive")


def _check_handler(
    c: _Checker, obj: str, path: str, handler: Mapping[str, Any], kinds: tuple[str, ...]
) -> None:
    present = [k for k in kinds if handler.get(k) is not None]
    if not present:
        c.add("probe-handler", obj, path, "must specify a handler type")
    for extra in present[1:]:
        c.add("probe-handler", obj, f"{path}.{extra}", "may not specify more than 1 handler type")
    for k in ("httpGet", "tcpSocket"):
        if k in present:
            _check_port_ref(c, obj, f"{path}.{k}.port", _map(handler[k]).get("port"))


def _check_probes(c: _Checker, obj: str, path: str, ctr: Mapping[str, Any], grace: int) -> None:
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        p = ctr.get(probe)
        if p is None:
            continue
        _check_handler(c, obj, f"{path}.{probe}", _map(p), _HANDLERS)
        threshold = _map(p).get("successThreshold", 1)  # SetDefaults_Probe
        if probe != "readinessProbe" and threshold != 1:
            c.add(
                "probe-handler", obj, f"{path}.{probe}.successThreshold", f"{threshold} must be 1"
            )
    lifecycle = _map(ctr.get("lifecycle"))
    for hook in ("postStart", "preStop"):
        h = lifecycle.get(hook)
        if h is None:
            continue
        hpath = f"{path}.lifecycle.{hook}"
        _check_handler(c, obj, hpath, _map(h), _HOOK_HANDLERS)
        sleep = _map(h).get("sleep")
        if sleep is not None:
            seconds = _map(sleep).get("seconds")
            whole = isinstance(seconds, int) and not isinstance(seconds, bool)
            if not (whole and isinstance(seconds, int) and 0 < seconds <= grace):
                c.add(
                    "prestop-sleep",
                    obj,
                    f"{hpath}.sleep.seconds",
                    f"{seconds!r} must be greater than 0 and at most "
                    f"terminationGracePeriodSeconds ({grace})",
                )


def _check_env(c: _Checker, obj: str, path: str, ctr: Mapping[str, Any]) -> None:
    for i, ev in enumerate(_list(ctr.get("env"))):
        name = str(_map(ev).get("name", ""))
        epath = f"{path}.env[{i}]"
        if not name:
            c.add("env-name", obj, f"{epath}.name", "name is required")
        for e in env_name_errors(name) if name else []:
            c.add("env-name", obj, f"{epath}.name", f"{name!r} {e}")
        ref = _map(_map(_map(ev).get("valueFrom")).get("secretKeyRef"))
        if ref:
            for e in dns1123_subdomain_errors(str(ref.get("name", ""))):
                c.add("env-name", obj, f"{epath}.valueFrom.secretKeyRef.name", e)
            for e in config_key_errors(str(ref.get("key", ""))):
                c.add("env-name", obj, f"{epath}.valueFrom.secretKeyRef.key", e)
    for i, source in enumerate(_list(ctr.get("envFrom"))):
        prefix = _map(source).get("prefix")
        for e in env_name_errors(str(prefix)) if prefix else []:
            c.add("env-name", obj, f"{path}.envFrom[{i}].prefix", f"{prefix!r} {e}")


def _check_resources(c: _Checker, obj: str, path: str, ctr: Mapping[str, Any]) -> None:
    resources = _map(ctr.get("resources"))
    limits, requests = _map(resources.get("limits")), _map(resources.get("requests"))
    for section, values in (("limits", limits), ("requests", requests)):
        for name, raw in values.items():
            if not is_extended_resource(str(name)):
                continue
            rpath = f"{path}.resources.{section}[{name}]"
            qty = parse_quantity(raw)
            if qty is None or qty < 0:
                c.add("extended-resource", obj, rpath, f"{raw!r} is not a valid quantity >= 0")
            elif qty != qty.to_integral_value():
                c.add("extended-resource", obj, rpath, f"{raw!r} must be an integer")
    for name, raw in requests.items():
        if not is_extended_resource(str(name)):
            continue
        if name not in limits:
            c.add(
                "extended-resource",
                obj,
                f"{path}.resources.limits",
                f"a limit must be set for {name} (not overcommitable)",
            )
        elif parse_quantity(raw) != parse_quantity(limits[name]):
            c.add(
                "extended-resource",
                obj,
                f"{path}.resources.requests",
                f"{name} request {raw!r} must be equal to its limit {limits[name]!r}",
            )


_VOLUME_SOURCES = (
    "emptyDir",
    "hostPath",
    "persistentVolumeClaim",
    "configMap",
    "secret",
    "projected",
    "downwardAPI",
    "nfs",
    "csi",
    "ephemeral",
    "image",
    "gitRepo",
    "iscsi",
    "glusterfs",
    "rbd",
    "flexVolume",
    "cinder",
    "cephfs",
    "flocker",
    "fc",
    "azureFile",
    "azureDisk",
    "vsphereVolume",
    "quobyte",
    "photonPersistentDisk",
    "portworxVolume",
    "scaleIO",
    "storageos",
    "gcePersistentDisk",
    "awsElasticBlockStore",
)


def _check_volumes(c: _Checker, obj: str, path: str, volumes: list[Any]) -> set[str]:
    names: set[str] = set()
    for i, vol in enumerate(volumes):
        vol = _map(vol)
        vpath = f"{path}.volumes[{i}]"
        name = str(vol.get("name", ""))
        errs = ["name is required"] if not name else dns1123_label_errors(name)
        for e in errs:
            c.add("volume-mount", obj, f"{vpath}.name", f"{name!r} {e}")
        if name in names:
            c.add("volume-mount", obj, f"{vpath}.name", f"duplicate volume name {name!r}")
        sources = [s for s in _VOLUME_SOURCES if vol.get(s) is not None]
        if not sources:
            c.add("volume-mount", obj, vpath, "must specify a volume type")
        for extra in sources[1:]:
            c.add(
                "volume-mount", obj, f"{vpath}.{extra}", "may not specify more than 1 volume type"
            )
        if not errs and name not in names:
            names.add(name)
    return names


def _check_mounts(c: _Checker, obj: str, path: str, ctr: Mapping[str, Any], vols: set[str]) -> None:
    paths: set[str] = set()
    for i, mount in enumerate(_list(ctr.get("volumeMounts"))):
        mount = _map(mount)
        mpath = f"{path}.volumeMounts[{i}]"
        name = str(mount.get("name", ""))
        if name not in vols:
            c.add("volume-mount", obj, f"{mpath}.name", f"{name!r} names no volume of the pod")
        target = str(mount.get("mountPath", ""))
        if not target:
            c.add("volume-mount", obj, f"{mpath}.mountPath", "mountPath is required")
        elif target in paths:
            c.add("volume-mount", obj, f"{mpath}.mountPath", f"{target!r} must be unique")
        paths.add(target)


def _check_container_ports(c: _Checker, obj: str, path: str, ctr: Mapping[str, Any]) -> None:
    seen: set[str] = set()
    for i, port in enumerate(_list(ctr.get("ports"))):
        name = _map(port).get("name")
        if not name:
            continue
        ppath = f"{path}.ports[{i}].name"
        errs = port_name_errors(str(name))
        for e in errs:
            c.add("port-name", obj, ppath, f"{name!r} {e}")
        if not errs and name in seen:
            c.add("port-name", obj, ppath, f"duplicate port name {name!r}")
        seen.add(str(name))


def _check_pod(c: _Checker, obj: str, path: str, pod: Mapping[str, Any]) -> None:
    grace = pod.get("terminationGracePeriodSeconds", 30)  # SetDefaults_PodSpec
    grace = grace if isinstance(grace, int) else 30
    vols = _check_volumes(c, obj, path, _list(pod.get("volumes")))
    names: set[str] = set()
    for group in ("initContainers", "containers"):
        for i, ctr in enumerate(_list(pod.get(group))):
            ctr = _map(ctr)
            cpath = f"{path}.{group}[{i}]"
            name = str(ctr.get("name", ""))
            errs = ["name is required"] if not name else dns1123_label_errors(name)
            for e in errs:
                c.add("container-name", obj, f"{cpath}.name", f"{name!r} {e}")
            if name in names:
                c.add("container-name", obj, f"{cpath}.name", f"duplicate container name {name!r}")
            names.add(name)
            _check_container_ports(c, obj, cpath, ctr)
            _check_env(c, obj, cpath, ctr)
            _check_resources(c, obj, cpath, ctr)
            _check_mounts(c, obj, cpath, ctr, vols)
            if group == "containers":
                _check_probes(c, obj, cpath, ctr, grace)


def _check_service(c: _Checker, obj: str, spec: Mapping[str, Any]) -> None:
    ports = _list(spec.get("ports"))
    seen: set[str] = set()
    for i, port in enumerate(ports):
        port = _map(port)
        ppath = f"spec.ports[{i}]"
        name = port.get("name")
        if not name:
            if len(ports) > 1:
                c.add("port-name", obj, f"{ppath}.name", "name is required with several ports")
        else:
            for e in dns1123_label_errors(str(name)):
                c.add("port-name", obj, f"{ppath}.name", f"{name!r} {e}")
            if name in seen:
                c.add("port-name", obj, f"{ppath}.name", f"duplicate port name {name!r}")
            seen.add(str(name))
        if "targetPort" in port:
            _check_port_ref(c, obj, f"{ppath}.targetPort", port["targetPort"])
    _check_labels(c, obj, "spec.selector", spec.get("selector"))


def check_document(file: str, doc: Mapping[str, Any]) -> list[Violation]:
    """Every rule that applies to one manifest document."""
    c = _Checker(file)
    kind = str(doc.get("kind", ""))
    meta = _map(doc.get("metadata"))
    obj = f"{kind}/{meta.get('name', '?')}"
    _check_name(c, kind, obj, meta)
    _check_labels(c, obj, "metadata.labels", meta.get("labels"))
    spec = _map(doc.get("spec"))
    if kind == "Deployment":
        _check_strategy(c, obj, spec)
        _check_selector(c, obj, spec)
        template = _map(spec.get("template"))
        _check_labels(
            c, obj, "spec.template.metadata.labels", _map(template.get("metadata")).get("labels")
        )
        _check_pod(c, obj, "spec.template.spec", _map(template.get("spec")))
    elif kind == "Service":
        _check_service(c, obj, spec)
    elif kind == "ConfigMap":
        for key in _map(doc.get("data")):
            for e in config_key_errors(str(key)):
                c.add("env-name", obj, f"data[{key}]", f"{key!r} {e}")
    return c.found


def check_manifests(files: Iterable[tuple[str, str]]) -> list[Violation]:
    """Every rule over (file name, YAML text) pairs; documents that are not objects are skipped."""
    found: list[Violation] = []
    for name, text in files:
        for doc in _documents(text):
            found.extend(check_document(name, doc))
    return found


def _documents(text: str) -> Iterator[Mapping[str, Any]]:
    for doc in yaml.safe_load_all(text):
        if isinstance(doc, Mapping) and "kind" in doc and "apiVersion" in doc:
            yield doc


__all__ = [
    "KUBERNETES_VERSION",
    "RULES",
    "Rule",
    "Violation",
    "check_document",
    "check_manifests",
    "is_extended_resource",
    "parse_quantity",
]
