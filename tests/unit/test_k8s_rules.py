"""The API server's semantic rules (hxp.k8s_rules): each rule refuses a manifest that breaks it,
naming the rule and the field, and lets the same manifest pass once it is right.

The cases start from one valid set of objects (a Deployment with a GPU container, its Service
and ConfigMap) and change one thing each. The refused values are the ones the Kubernetes source
refuses (pkg/apis/apps/validation, pkg/apis/core/validation, apimachinery util/validation at
v1.30.3); the gpu-fleet `chat` Deployment as hxp rendered it before is a fixture of its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from hxp.io.validators import check_k8s_rules
from hxp.k8s_rules import (
    KUBERNETES_VERSION,
    RULES,
    Violation,
    check_document,
    check_manifests,
    is_extended_resource,
    parse_quantity,
)
from hxp.render import RenderedFile

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "k8s"
BEFORE = FIXTURES / "gpu-fleet-chat-maxsurge0-maxunavailable0.yaml"

Doc = dict[str, Any]


def deployment() -> Doc:
    labels = {"app.kubernetes.io/instance": "s-chat", "hxp.io/kind": "model"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "s-chat", "labels": dict(labels)},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app.kubernetes.io/instance": "s-chat"}},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
            },
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "containers": [
                        {
                            "name": "chat",
                            "image": "vllm/vllm-openai:v0.18.0",
                            "env": [
                                {
                                    "name": "HF_TOKEN",
                                    "valueFrom": {
                                        "secretKeyRef": {"name": "hf-token", "key": "value"}
                                    },
                                }
                            ],
                            "envFrom": [{"configMapRef": {"name": "s-chat"}}],
                            "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
                            "lifecycle": {"preStop": {"sleep": {"seconds": 15}}},
                            "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}},
                            "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}},
                            "startupProbe": {"tcpSocket": {"port": 8000}, "failureThreshold": 60},
                            "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}},
                            "volumeMounts": [
                                {"name": "tmp", "mountPath": "/tmp"},
                                {"name": "cache", "mountPath": "/var/cache/hxp"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {}},
                        {"name": "cache", "persistentVolumeClaim": {"claimName": "s-chat-cache"}},
                    ],
                },
            },
        },
    }


def service() -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "s-chat"},
        "spec": {
            "selector": {"app.kubernetes.io/instance": "s-chat"},
            "ports": [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def config_map() -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "s-chat"},
        "data": {"HF_HOME": "/var/cache/hxp/huggingface"},
    }


def pvc() -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "s-chat-cache"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "30Gi"}}},
    }


def ctr(d: Doc) -> Doc:
    container: Doc = d["spec"]["template"]["spec"]["containers"][0]
    return container


def pod(d: Doc) -> Doc:
    spec: Doc = d["spec"]["template"]["spec"]
    return spec


def rolling(d: Doc) -> Doc:
    ru: Doc = d["spec"]["strategy"]["rollingUpdate"]
    return ru


Change = Callable[[Doc], None]
C = "spec.template.spec.containers[0]"

# (rule, object maker, change, the field path the violation names)
REFUSED: list[tuple[str, Callable[[], Doc], Change, str]] = [
    # deployment-strategy
    (
        "deployment-strategy",
        deployment,
        lambda d: rolling(d).update(maxUnavailable=0, maxSurge=0),
        "spec.strategy.rollingUpdate.maxUnavailable",
    ),
    (
        "deployment-strategy",
        deployment,
        lambda d: rolling(d).update(maxUnavailable="0%", maxSurge=0),
        "spec.strategy.rollingUpdate.maxUnavailable",
    ),
    (
        "deployment-strategy",
        deployment,
        lambda d: rolling(d).update(maxSurge="twenty"),
        "spec.strategy.rollingUpdate.maxSurge",
    ),
    (
        "deployment-strategy",
        deployment,
        lambda d: rolling(d).update(maxUnavailable=-1),
        "spec.strategy.rollingUpdate.maxUnavailable",
    ),
    (
        "deployment-strategy",
        deployment,
        lambda d: rolling(d).update(maxUnavailable="110%"),
        "spec.strategy.rollingUpdate.maxUnavailable",
    ),
    (
        "deployment-strategy",
        deployment,
        lambda d: d["spec"]["strategy"].update(type="Recreate"),
        "spec.strategy.rollingUpdate",
    ),
    (
        "deployment-strategy",
        deployment,
        lambda d: d["spec"]["strategy"].update(type="BlueGreen"),
        "spec.strategy.type",
    ),
    # extended-resource
    (
        "extended-resource",
        deployment,
        lambda d: ctr(d)["resources"]["limits"].update({"nvidia.com/gpu": "500m"}),
        f"{C}.resources.limits[nvidia.com/gpu]",
    ),
    (
        "extended-resource",
        deployment,
        lambda d: ctr(d)["resources"].update(requests={"nvidia.com/gpu": 2}),
        f"{C}.resources.requests",
    ),
    (
        "extended-resource",
        deployment,
        lambda d: ctr(d).update(resources={"requests": {"nvidia.com/gpu": 1}}),
        f"{C}.resources.limits",
    ),
    # object-name
    (
        "object-name",
        deployment,
        lambda d: d["metadata"].update(name="S_Chat"),
        "metadata.name",
    ),
    ("object-name", service, lambda d: d["metadata"].update(name="1-chat"), "metadata.name"),
    ("object-name", service, lambda d: d["metadata"].update(name="s.chat"), "metadata.name"),
    ("object-name", config_map, lambda d: d["metadata"].update(name="x" * 254), "metadata.name"),
    ("object-name", pvc, lambda d: d["metadata"].update(name="cache-"), "metadata.name"),
    # container-name
    ("container-name", deployment, lambda d: ctr(d).update(name="Chat"), f"{C}.name"),
    ("container-name", deployment, lambda d: ctr(d).update(name="a.b"), f"{C}.name"),
    (
        "container-name",
        deployment,
        lambda d: pod(d)["containers"].append({**copy.deepcopy(ctr(d)), "lifecycle": None}),
        "spec.template.spec.containers[1].name",
    ),
    # port-name
    (
        "port-name",
        deployment,
        lambda d: ctr(d)["ports"][0].update(name="http-openai-api"),  # 15 is fine, this is 15
        "__none__",
    ),
    (
        "port-name",
        deployment,
        lambda d: ctr(d)["ports"][0].update(name="http-openai-apis"),  # 16
        f"{C}.ports[0].name",
    ),
    ("port-name", deployment, lambda d: ctr(d)["ports"][0].update(name="8000"), f"{C}.ports[0]"),
    ("port-name", deployment, lambda d: ctr(d)["ports"][0].update(name="a--b"), f"{C}.ports[0]"),
    ("port-name", deployment, lambda d: ctr(d)["ports"][0].update(name="HTTP"), f"{C}.ports[0]"),
    (
        "port-name",
        deployment,
        lambda d: ctr(d)["livenessProbe"]["httpGet"].update(port="-http"),
        f"{C}.livenessProbe.httpGet.port",
    ),
    (
        "port-name",
        service,
        lambda d: d["spec"]["ports"][0].update(targetPort="http-openai-apis"),
        "spec.ports[0].targetPort",
    ),
    (
        "port-name",
        service,
        lambda d: d["spec"]["ports"].append({"port": 9000, "targetPort": 9000}),
        "spec.ports[1].name",
    ),
    # label
    (
        "label",
        deployment,
        lambda d: d["metadata"]["labels"].update({"hxp.io/kind": "a model"}),
        "metadata.labels[hxp.io/kind]",
    ),
    (
        "label",
        deployment,
        lambda d: d["metadata"]["labels"].update({"Bad_Prefix/x": "1"}),
        "metadata.labels[Bad_Prefix/x]",
    ),
    (
        "label",
        deployment,
        lambda d: d["metadata"]["labels"].update({"k": "v" * 64}),
        "metadata.labels[k]",
    ),
    (
        "label",
        deployment,
        lambda d: d["spec"]["template"]["metadata"]["labels"].update({"a/b/c": "1"}),
        "spec.template.metadata.labels[a/b/c]",
    ),
    (
        "label",
        service,
        lambda d: d["spec"]["selector"].update({"app": "-x"}),
        "spec.selector[app]",
    ),
    # selector-matches-template
    (
        "selector-matches-template",
        deployment,
        lambda d: d["spec"]["selector"]["matchLabels"].update({"hxp.io/kind": "service"}),
        "spec.template.metadata.labels",
    ),
    (
        "selector-matches-template",
        deployment,
        lambda d: d["spec"].update(selector={}),
        "spec.selector",
    ),
    # env-name
    ("env-name", deployment, lambda d: ctr(d)["env"][0].update(name="1TOKEN"), f"{C}.env[0].name"),
    ("env-name", deployment, lambda d: ctr(d)["env"][0].update(name="A=B"), f"{C}.env[0].name"),
    ("env-name", deployment, lambda d: ctr(d)["env"][0].update(name=".."), f"{C}.env[0].name"),
    (
        "env-name",
        deployment,
        lambda d: ctr(d)["envFrom"][0].update(prefix="9_"),
        f"{C}.envFrom[0].prefix",
    ),
    (
        "env-name",
        deployment,
        lambda d: ctr(d)["env"][0]["valueFrom"]["secretKeyRef"].update(key="a/b"),
        f"{C}.env[0].valueFrom.secretKeyRef.key",
    ),
    ("env-name", config_map, lambda d: d["data"].update({"A B": "1"}), "data[A B]"),
    # probe-handler
    (
        "probe-handler",
        deployment,
        lambda d: ctr(d)["readinessProbe"].update(tcpSocket={"port": 8000}),
        f"{C}.readinessProbe.tcpSocket",
    ),
    (
        "probe-handler",
        deployment,
        lambda d: ctr(d).update(livenessProbe={"periodSeconds": 5}),
        f"{C}.livenessProbe",
    ),
    (
        "probe-handler",
        deployment,
        lambda d: ctr(d)["startupProbe"].update(successThreshold=2),
        f"{C}.startupProbe.successThreshold",
    ),
    (
        "probe-handler",
        deployment,
        lambda d: ctr(d)["lifecycle"]["preStop"].update(exec={"command": ["sleep", "5"]}),
        f"{C}.lifecycle.preStop.sleep",
    ),
    # prestop-sleep
    (
        "prestop-sleep",
        deployment,
        lambda d: pod(d).update(terminationGracePeriodSeconds=10),
        f"{C}.lifecycle.preStop.sleep.seconds",
    ),
    (
        "prestop-sleep",
        deployment,
        lambda d: ctr(d)["lifecycle"]["preStop"]["sleep"].update(seconds=0),
        f"{C}.lifecycle.preStop.sleep.seconds",
    ),
    (
        "prestop-sleep",
        deployment,
        lambda d: (
            pod(d).pop("terminationGracePeriodSeconds"),
            ctr(d)["lifecycle"]["preStop"]["sleep"].update(seconds=31),
        ),
        f"{C}.lifecycle.preStop.sleep.seconds",
    ),
    # volume-mount
    (
        "volume-mount",
        deployment,
        lambda d: ctr(d)["volumeMounts"][1].update(name="hf-cache"),
        f"{C}.volumeMounts[1].name",
    ),
    (
        "volume-mount",
        deployment,
        lambda d: ctr(d)["volumeMounts"][1].update(mountPath="/tmp"),
        f"{C}.volumeMounts[1].mountPath",
    ),
    (
        "volume-mount",
        deployment,
        lambda d: pod(d)["volumes"][1].update(name="Cache"),
        "spec.template.spec.volumes[1].name",
    ),
    (
        "volume-mount",
        deployment,
        lambda d: pod(d)["volumes"][1].update(emptyDir={}),
        "spec.template.spec.volumes[1].",
    ),
    (
        "volume-mount",
        deployment,
        lambda d: pod(d)["volumes"].append({"name": "tmp", "emptyDir": {}}),
        "spec.template.spec.volumes[2].name",
    ),
    (
        "volume-mount",
        deployment,
        lambda d: pod(d)["volumes"].append({"name": "empty"}),
        "spec.template.spec.volumes[2]",
    ),
]

# Changes each rule accepts: what the API server lets through (and hxp may render).
PASSING: list[tuple[str, Callable[[], Doc], Change]] = [
    ("deployment-strategy", deployment, lambda d: rolling(d).update(maxUnavailable=0, maxSurge=1)),
    ("deployment-strategy", deployment, lambda d: rolling(d).update(maxUnavailable="100%")),
    ("deployment-strategy", deployment, lambda d: d["spec"]["strategy"].pop("rollingUpdate")),
    ("deployment-strategy", deployment, lambda d: rolling(d).pop("maxSurge")),  # 25% default
    ("deployment-strategy", deployment, lambda d: d["spec"].update(strategy={"type": "Recreate"})),
    (
        "extended-resource",
        deployment,
        lambda d: ctr(d)["resources"].update(requests={"nvidia.com/gpu": "1", "cpu": "500m"}),
    ),
    (
        "extended-resource",
        deployment,
        lambda d: ctr(d)["resources"]["limits"].update({"nvidia.com/gpu": "2", "cpu": "1500m"}),
    ),
    ("object-name", deployment, lambda d: d["metadata"].update(name="s.chat-2")),
    ("object-name", service, lambda d: d["metadata"].update(name="a" * 63)),
    ("container-name", deployment, lambda d: ctr(d).update(name="chat-2")),
    ("port-name", deployment, lambda d: ctr(d)["ports"][0].update(name="http-openai-api")),
    ("port-name", service, lambda d: d["spec"]["ports"][0].update(name="http-2", targetPort=8000)),
    ("label", deployment, lambda d: d["metadata"]["labels"].update({"example.com/My_Key": ""})),
    (
        "selector-matches-template",
        deployment,
        lambda d: d["spec"]["selector"].update(
            matchExpressions=[{"key": "hxp.io/kind", "operator": "In", "values": ["model"]}]
        ),
    ),
    ("env-name", deployment, lambda d: ctr(d)["env"][0].update(name="my.env-NAME_1")),
    ("env-name", config_map, lambda d: d["data"].update({"key.name-1_X": "1"})),
    (
        "probe-handler",
        deployment,
        lambda d: ctr(d)["readinessProbe"].update(successThreshold=3),  # readiness may
    ),
    ("prestop-sleep", deployment, lambda d: pod(d).update(terminationGracePeriodSeconds=15)),
    ("prestop-sleep", deployment, lambda d: pod(d).pop("terminationGracePeriodSeconds")),
    (
        "volume-mount",
        deployment,
        lambda d: (
            pod(d)["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory"}}),
            ctr(d)["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"}),
        ),
    ),
]


def _violations(doc: Doc) -> list[Violation]:
    return check_document("unit.yaml", doc)


def test_the_base_objects_pass_every_rule() -> None:
    for make in (deployment, service, config_map, pvc):
        assert _violations(make()) == [], make.__name__


@pytest.mark.parametrize(
    ("rule", "make", "change", "field"),
    REFUSED,
    ids=[f"{r}-{i}" for i, (r, *_rest) in enumerate(REFUSED)],
)
def test_a_manifest_breaking_a_rule_is_refused_naming_rule_and_field(
    rule: str, make: Callable[[], Doc], change: Change, field: str
) -> None:
    doc = make()
    change(doc)
    found = _violations(doc)
    if field == "__none__":  # a boundary case written next to its refusal: it passes
        assert found == []
        return
    assert found, f"{rule}: not refused"
    assert {v.rule for v in found} == {rule}, [str(v) for v in found]
    assert any(v.field.startswith(field) for v in found), [str(v) for v in found]
    text = str(found[0])
    assert f"rule {rule}" in text
    assert f"Kubernetes {KUBERNETES_VERSION}" in text
    assert "unit.yaml" in text
    assert doc["kind"] in text


@pytest.mark.parametrize(
    ("rule", "make", "change"), PASSING, ids=[f"{r}-{i}" for i, (r, *_) in enumerate(PASSING)]
)
def test_a_manifest_keeping_a_rule_passes(
    rule: str, make: Callable[[], Doc], change: Change
) -> None:
    doc = make()
    change(doc)
    assert _violations(doc) == []


def test_every_rule_has_a_refused_and_a_passing_case_and_cites_kubernetes_source() -> None:
    refused = {r for r, _m, _c, f in REFUSED if f != "__none__"}
    passing = {r for r, *_ in PASSING}
    assert refused == set(RULES) == passing
    for rule in RULES.values():
        assert rule.sources
        for source in rule.sources:
            assert source.startswith(("pkg/apis/", "staging/src/k8s.io/apimachinery/")), source
            assert ".go: " in source


def test_the_gpu_fleet_chat_deployment_as_rendered_before_is_refused() -> None:
    """maxUnavailable 0 with maxSurge 0: schema-valid, refused by the API server."""
    found = check_manifests([("chat.yaml", BEFORE.read_text())])
    assert [(v.rule, v.obj, v.field) for v in found] == [
        (
            "deployment-strategy",
            "Deployment/fleet-chat",
            "spec.strategy.rollingUpdate.maxUnavailable",
        )
    ]
    assert "may not be 0 when maxSurge is 0" in str(found[0])
    assert "ValidateRollingUpdateDeployment" in str(found[0])


def test_the_render_validator_reports_the_rule_for_the_old_manifest() -> None:
    old = RenderedFile("chat.yaml", BEFORE.read_text(), "k8s/unit.yaml.j2", 1)
    (result,) = check_k8s_rules([old])
    assert not result.ok
    assert result.skipped is None
    (problem,) = result.problems
    assert problem.startswith("chat.yaml: Deployment/fleet-chat spec.strategy.rollingUpdate")
    assert "rule deployment-strategy" in problem
    fixed = yaml.safe_load_all(BEFORE.read_text())
    docs = [d for d in fixed if d]
    for d in docs:
        if d["kind"] == "Deployment":
            d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] = 1
    good = RenderedFile("chat.yaml", yaml.safe_dump_all(docs), "k8s/unit.yaml.j2", 1)
    (result,) = check_k8s_rules([good])
    assert result.ok, result.problems


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", 1),
        ("500m", 0.5),
        ("1Gi", 2**30),
        ("1.5k", 1500),
        ("1e3", 1000),
        (2, 2),
        ("1x", None),
        ("", None),
        (True, None),
    ],
)
def test_quantities_parse_as_kubernetes_reads_them(text: Any, value: float | None) -> None:
    parsed = parse_quantity(text)
    assert (parsed if parsed is None else float(parsed)) == value


@pytest.mark.parametrize(
    ("name", "extended"),
    [
        ("nvidia.com/gpu", True),
        ("amd.com/gpu", True),
        ("cpu", False),
        ("memory", False),
        ("hugepages-2Mi", False),
        ("kubernetes.io/something", False),
        ("requests.example.com/x", False),
        ("example.com/a b", False),
    ],
)
def test_extended_resource_names(name: str, extended: bool) -> None:
    assert is_extended_resource(name) is extended
