"""Kubernetes output of `hxp render --target k8s`: a GPU-aware rollout, model pods that keep
their weights on a persistent volume and stop cleanly, and a kustomization.yaml listing every
file; every example passes the API server's rules (hxp.k8s_rules)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from hxp.errors import StackValidationError
from hxp.k8s_rules import check_manifests
from hxp.render import (
    K8S_EXIT_MARGIN_SECONDS,
    K8S_KUSTOMIZATION,
    K8S_PRESTOP_SECONDS,
    model_cache_gib,
    render_stack,
)
from hxp.spec import ModelSpec, Stack
from hxp.startup import model_start_period
from hxp_cli import main
from tests.support.render_data import stack_from_data


def _docs(stack: Stack, unit: str) -> dict[str, dict[str, Any]]:
    """The objects of one unit's file, by kind (the PVCs by name)."""
    files = {f.path: f.content for f in render_stack(stack, "k8s")}
    out: dict[str, dict[str, Any]] = {}
    for doc in yaml.safe_load_all(files[f"{unit}.yaml"]):
        key = doc["metadata"]["name"] if doc["kind"] == "PersistentVolumeClaim" else doc["kind"]
        out[key] = doc
    return out


def _pod(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = docs["Deployment"]["spec"]["template"]["spec"]
    return pod


def _model_stack(**model: Any) -> Stack:
    spec: dict[str, Any] = {
        "host": "gpu",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "image": "vllm/vllm-openai:v0.18.0",
        "gpus": [0],
        "vllm": {"version": "0.18.0", "tensor_parallel_size": 1},
    }
    for key, value in model.items():
        if key == "vllm":
            spec["vllm"] = {**spec["vllm"], **value}
        else:
            spec[key] = value
    data = {
        "version": 2,
        "stack": "s",
        "hosts": {
            "gpu": {"backend": "docker", "gpus": [{"index": i, "memory_gib": 80} for i in range(4)]}
        },
        "models": {"chat": spec},
    }
    return stack_from_data(data)


# --------------------------------------------------------------------------- every example


def test_every_example_renders_clean_under_the_api_server_rules(
    example: tuple[str, Stack],
) -> None:
    _, stack = example
    files = render_stack(stack, "k8s")
    assert [str(v) for v in check_manifests((f.path, f.content) for f in files)] == []


def test_kustomization_lists_every_rendered_file(example: tuple[str, Stack]) -> None:
    _, stack = example
    files = {f.path: f.content for f in render_stack(stack, "k8s")}
    kustomization = yaml.safe_load(files.pop(K8S_KUSTOMIZATION))
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == sorted(files)
    assert len(files) == len(stack.services) + len(stack.models)


def test_kustomization_of_a_partial_render_lists_what_was_rendered(
    example: tuple[str, Stack],
) -> None:
    _, stack = example
    unit = sorted(stack.models)[0]
    files = {f.path: f.content for f in render_stack(stack, "k8s", only={unit})}
    assert yaml.safe_load(files[K8S_KUSTOMIZATION])["resources"] == [f"{unit}.yaml"]


# --------------------------------------------------------------------------- rollout


def test_several_gpu_replicas_roll_one_at_a_time_without_surge() -> None:
    stack = _model_stack(replicas=2, gpus=[0, 1])
    strategy = _docs(stack, "chat")["Deployment"]["spec"]["strategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }


def test_the_gpu_fleet_chat_is_no_longer_zero_and_zero() -> None:
    from hxp.config import load_config
    from tests.support.render_data import EXAMPLES

    stack = load_config([EXAMPLES["gpu-fleet"]], environ={}).stack
    chat = _docs(stack, "chat")["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert chat == {"maxUnavailable": 1, "maxSurge": 0}
    coder = _docs(stack, "coder")["Deployment"]["spec"]["strategy"]
    assert coder == {"type": "Recreate"}


def test_one_gpu_replica_is_recreated_and_the_manifest_says_why() -> None:
    stack = _model_stack()
    text = next(f.content for f in render_stack(stack, "k8s") if f.path == "chat.yaml")
    strategy = _docs(stack, "chat")["Deployment"]["spec"]["strategy"]
    assert strategy == {"type": "Recreate"}
    comment = text.split("strategy:\n", 1)[1].splitlines()[0].strip()
    assert comment.startswith("#")
    assert "one GPU replica" in comment
    assert "no spare GPU" in comment


@pytest.mark.parametrize(("replicas", "unavailable"), [(1, 1), (3, 0)])
def test_without_gpus_a_new_pod_surges_as_before(replicas: int, unavailable: int) -> None:
    data = {
        "version": 2,
        "stack": "s",
        "hosts": {"h": {"backend": "docker"}},
        "services": {
            "web": {"host": "h", "image": "nginx:1.27", "replicas": replicas, "ports": {"http": 80}}
        },
    }
    strategy = _docs(stack_from_data(data), "web")["Deployment"]["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxUnavailable": unavailable, "maxSurge": 1}


# --------------------------------------------------------------------------- caches


def _volume_of(pod: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume backing `path` in the container: the mount whose path is the longest prefix."""
    mounts = pod["containers"][0]["volumeMounts"]
    best = max(
        (m for m in mounts if Path(path).is_relative_to(m["mountPath"])),
        key=lambda m: len(m["mountPath"]),
    )
    (volume,) = [v for v in pod["volumes"] if v["name"] == best["name"]]
    return volume


def _hf_home(docs: dict[str, dict[str, Any]]) -> str:
    return str(docs["ConfigMap"]["data"]["HF_HOME"])


def test_model_weights_live_on_a_claim_not_an_empty_dir(example: tuple[str, Stack]) -> None:
    _, stack = example
    for name in stack.models:
        docs = _docs(stack, name)
        volume = _volume_of(_pod(docs), _hf_home(docs))
        assert "emptyDir" not in volume, f"{name}: HF_HOME on {volume}"
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert claim in docs, f"{name}: claim {claim} is not rendered"


def test_default_hf_home_gets_a_cache_claim_sized_from_the_model() -> None:
    stack = _model_stack(replicas=2, gpus=[0, 1])
    docs = _docs(stack, "chat")
    claim = docs["s-chat-hxp-cache"]
    # Llama-3.1-8B: 14.9 GiB of bf16 weights, x1.2 + 10 GiB, rounded up to 10 GiB.
    assert claim["spec"]["resources"]["requests"]["storage"] == "30Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # two replicas share it
    assert _volume_of(_pod(docs), _hf_home(docs)) == {
        "name": "cache",
        "persistentVolumeClaim": {"claimName": "s-chat-hxp-cache"},
    }
    one = _docs(_model_stack(), "chat")["s-chat-hxp-cache"]
    assert one["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_hf_home_on_a_declared_volume_uses_it_and_no_cache_claim() -> None:
    stack = _model_stack(
        env={"HF_HOME": "/models/hf"},
        volumes=[{"name": "weights", "target": "/models", "size": "200GiB"}],
    )
    docs = _docs(stack, "chat")
    assert "s-chat-hxp-cache" not in docs
    volume = _volume_of(_pod(docs), "/models/hf")
    assert volume["persistentVolumeClaim"]["claimName"] == "s-chat-weights"


@pytest.mark.parametrize(
    ("model", "size"),
    [
        ({"model": "Qwen/Qwen2.5-Coder-32B-Instruct"}, 90),
        ({"model": "org/unnamed-model"}, 100),
        ({"engine": "simulator", "model": "hxp-sim/demo"}, 1),
    ],
)
def test_cache_claim_size(model: dict[str, Any], size: int) -> None:
    spec = ModelSpec.model_validate({"host": "h", **model})
    assert model_cache_gib(spec) == size


def test_hf_home_on_no_volume_is_refused_naming_the_field(tmp_path: Path) -> None:
    stack = _model_stack(env={"HF_HOME": "/data/hf"})
    with pytest.raises(StackValidationError, match=r"models\.chat\.env\.HF_HOME") as info:
        render_stack(stack, "k8s")
    assert "on no volume" in str(info.value)
    # Other targets are not concerned.
    assert render_stack(stack, "compose")


def test_the_cli_refuses_hf_home_on_no_volume_with_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {
        "version": 2,
        "stack": "s",
        "hosts": {"gpu": {"backend": "docker", "gpus": [{"index": 0, "memory_gib": 80}]}},
        "models": {
            "chat": {"host": "gpu", "model": "org/m-1B", "gpus": [0], "env": {"HF_HOME": "/hf"}}
        },
    }
    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["render", "-f", str(stack_file), "--target", "k8s", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "models.chat.env.HF_HOME" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_a_volume_named_like_the_cache_claim_is_refused() -> None:
    stack = _model_stack(volumes=[{"name": "hxp-cache", "target": "/elsewhere"}])
    with pytest.raises(StackValidationError, match=r"models\.chat\.volumes"):
        render_stack(stack, "k8s")


# --------------------------------------------------------------------------- stopping


def _container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = _pod(docs)["containers"][0]
    return container


def test_vllm_018_drains_for_stop_timeout_after_the_prestop_pause() -> None:
    docs = _docs(_model_stack(stop_timeout="40s"), "chat")
    container = _container(docs)
    assert container["lifecycle"] == {"preStop": {"sleep": {"seconds": K8S_PRESTOP_SECONDS}}}
    args = container["args"]
    assert args[args.index("--shutdown-timeout") + 1] == "40"
    assert args.count("--shutdown-timeout") == 1
    grace = _pod(docs)["terminationGracePeriodSeconds"]
    assert grace == K8S_PRESTOP_SECONDS + 40 + K8S_EXIT_MARGIN_SECONDS
    assert grace > K8S_PRESTOP_SECONDS  # the API server's sleep rule (prestop-sleep)


def test_vllm_before_018_gets_no_shutdown_flag_but_still_the_pause() -> None:
    docs = _docs(_model_stack(image="vllm/vllm-openai:v0.17.1", vllm={"version": "0.17.1"}), "chat")
    container = _container(docs)
    assert "--shutdown-timeout" not in container["args"]
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] == K8S_PRESTOP_SECONDS
    grace = _pod(docs)["terminationGracePeriodSeconds"]
    assert grace == K8S_PRESTOP_SECONDS + 10 + K8S_EXIT_MARGIN_SECONDS  # stop_timeout 10s


@pytest.mark.parametrize("given", [["--shutdown-timeout", "120"], ["--shutdown-timeout=120"]])
def test_an_operators_shutdown_timeout_is_kept_and_sizes_the_grace(given: list[str]) -> None:
    docs = _docs(_model_stack(vllm={"extra_args": given}), "chat")
    args = _container(docs)["args"]
    assert sum(a.startswith("--shutdown-timeout") for a in args) == 1
    assert args[-len(given) :] == given
    grace = _pod(docs)["terminationGracePeriodSeconds"]
    assert grace == K8S_PRESTOP_SECONDS + 120 + K8S_EXIT_MARGIN_SECONDS


def test_an_unreadable_shutdown_timeout_is_not_doubled() -> None:
    """vLLM itself refuses the value; hxp neither adds a second flag nor guesses the drain."""
    docs = _docs(_model_stack(vllm={"extra_args": ["--shutdown-timeout", "soon"]}), "chat")
    assert _container(docs)["args"].count("--shutdown-timeout") == 1
    grace = _pod(docs)["terminationGracePeriodSeconds"]
    assert grace == K8S_PRESTOP_SECONDS + 10 + K8S_EXIT_MARGIN_SECONDS


def test_shutdown_timeout_in_extra_args_before_018_is_refused() -> None:
    with pytest.raises(StackValidationError, match=r"exists only from vLLM 0\.18\.0") as info:
        render_stack(
            _model_stack(vllm={"version": "0.17.1", "extra_args": ["--shutdown-timeout", "30"]}),
            "k8s",
        )
    assert info.value.issues[0].path == "models.chat.vllm.extra_args"


def test_services_keep_their_stop_timeout_and_get_no_hook() -> None:
    data = {
        "version": 2,
        "stack": "s",
        "hosts": {"h": {"backend": "docker"}},
        "services": {"web": {"host": "h", "image": "nginx:1.27", "stop_timeout": "25s"}},
    }
    docs = _docs(stack_from_data(data), "web")
    assert _pod(docs)["terminationGracePeriodSeconds"] == 25
    assert "lifecycle" not in _container(docs)


def test_the_startup_probe_budget_is_the_start_grace_the_other_backends_use() -> None:
    stack = _model_stack()
    probe = _container(_docs(stack, "chat"))["startupProbe"]
    grace = model_start_period(stack.models["chat"]).seconds
    assert probe["periodSeconds"] == 5
    assert probe["failureThreshold"] == math.ceil(grace / 5) + 3
    assert probe["periodSeconds"] * probe["failureThreshold"] >= grace


def test_hostile_stack_still_renders_clean(hostile_stack: Stack) -> None:
    files = render_stack(copy.deepcopy(hostile_stack), "k8s")
    assert [str(v) for v in check_manifests((f.path, f.content) for f in files)] == []
