"""`hxp fit -f stack.yaml [MODEL]` and `hxp status`'s models table, through the installed CLI of a
user with a fresh HOME: the model's settings come from the stack, its config.json from the
Hugging Face cache (a cache laid out here as huggingface_hub lays it out), its GPUs from the host
(declared: this machine has no NVML driver; with a driver they are discovered)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.stacks import free_port, free_range, sim_fleet
from tests.support.user import User

ROOT = Path(__file__).resolve().parents[2]
#: Qwen2.5-7B-Instruct on an H100 under vLLM 0.19.0, as the llm-d planner's sweep logged it.
CASE = yaml.safe_load((ROOT / "tests/data/vllm_logs/llmd_v019_qwen25_7b_h100_tp1.yaml").read_text())
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache(root: Path, repo: str, ref: str, config: dict[str, Any]) -> Path:
    """A hub cache holding `repo`'s config.json, `ref` pointing at its snapshot; $HF_HOME."""
    repo_dir = root / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / ref).write_text(COMMIT)
    return root


STACK = """\
stack: f
hosts:
  gpu:
    backend: process
    gpus:
      - {{index: 0, memory_gib: 79.19, name: NVIDIA H100 80GB HBM3}}
      - {{index: 1, memory_gib: 79.19, name: NVIDIA H100 80GB HBM3}}
  cpu: {{backend: process}}
models:
  chat:
    host: gpu
    model: Qwen/Qwen2.5-7B-Instruct
    gpus: [1]
    vllm:
      version: "0.19.0"
      max_model_len: 8192
      gpu_memory_utilization: 0.95
      tensor_parallel_size: 1
      extra_args: [{extra}]
  small:
    host: cpu
    model: Qwen/Qwen2.5-7B-Instruct
"""


@pytest.fixture
def user(tmp_path: Path) -> User:
    home = tmp_path / "home"
    home.mkdir()
    hf = hf_cache(tmp_path / "hf", "Qwen/Qwen2.5-7B-Instruct", "main", CASE["config"])
    return User(home, tmp_path / "state", HF_HOME=str(hf))


def _stack(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "stack.yaml"
    path.write_text(STACK.format(extra=extra))
    return path


def _json(user: User, *args: str) -> tuple[int, Any]:
    done = user.hxp("fit", *args, "--json")
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def test_fit_takes_the_model_and_gpus_from_the_stack(user: User, tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    code, out = _json(user, "-f", str(stack), "chat")
    assert code == 0
    chat = out["chat"]
    assert chat["fits"] is True
    assert "declared" in chat["gpus"]
    snapshot = f"models--Qwen--Qwen2.5-7B-Instruct/snapshots/{COMMIT}/config.json"
    assert chat["config"].endswith(snapshot)
    logged = CASE["logged"]["kv_cache_tokens"]
    assert abs(chat["kv_cache_tokens"] - logged) / logged < 0.01, chat["kv_cache_tokens"]

    # The same question ad hoc takes the ten flags the stack spares the operator.
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CASE["config"]))
    code, ad_hoc = _json(
        user, "--config", str(config), "--gpus", "1", "--gpu-memory-gib", "79.19",
        "--gpu-name", "NVIDIA H100 80GB HBM3", "--gpu-memory-utilization", "0.95",
        "--max-model-len", "8192", "--tensor-parallel-size", "1", "--vllm-version", "0.19.0",
    )  # fmt: skip
    assert code == 0
    for key in ("kv_cache_tokens", "max_concurrency", "weights_gib_per_gpu", "explain"):
        assert ad_hoc[key] == chat[key], key

    # Text output: the model, its config.json, its replica's GPUs and where they came from.
    text = user.hxp("fit", "-f", str(stack), "chat")
    assert text.returncode == 0, text.stderr
    assert "== chat: Qwen/Qwen2.5-7B-Instruct on gpu" in text.stdout
    assert "GPUs per replica: 1 x (NVIDIA H100 80GB HBM3 79.2 GiB), declared" in text.stdout


def test_a_flag_wins_over_the_stack_and_extra_args_count(user: User, tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    _, base = _json(user, "-f", str(stack), "chat")
    _, shorter = _json(user, "-f", str(stack), "chat", "--max-model-len", "4096")
    assert shorter["chat"]["max_model_len"] == 4096
    assert shorter["chat"]["max_concurrency"] > base["chat"]["max_concurrency"]
    _, flag = _json(user, "-f", str(stack), "chat", "--performance-mode", "throughput")
    # throughput doubles the batch defaults: a larger profile run leaves less for the KV cache
    assert flag["chat"]["kv_cache_tokens"] < base["chat"]["kv_cache_tokens"]
    assert "performance_mode throughput" in flag["chat"]["explain"]
    in_stack = _stack(tmp_path, extra="--performance-mode, throughput")
    _, from_stack = _json(user, "-f", str(in_stack), "chat")
    assert from_stack["chat"]["kv_cache_tokens"] == flag["chat"]["kv_cache_tokens"]
    _, chunked = _json(user, "-f", str(stack), "chat", "--no-enable-chunked-prefill")
    assert chunked["chat"]["fits"] is True
    # GPUs given on the command line replace the host's: a 24 GiB card cannot hold 8K x 1024.
    code, small = _json(user, "-f", str(stack), "chat", "--gpus", "1", "--gpu-memory-gib", "12")
    assert code == 1
    assert small["chat"]["fits"] is False


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["nope"], "no model 'nope' in stack 'f' (models: chat, small)"),
        (["small"], "models.small: host 'cpu' has no GPUs"),
        (["chat", "--gpus", "2"], "--gpus and --gpu-memory-gib go together"),
        (["chat", "--performance-mode", "fast"], "invalid choice: 'fast'"),
    ],
)
def test_bad_fit_requests_exit_2_naming_the_field(
    user: User, tmp_path: Path, args: list[str], says: str
) -> None:
    done = user.hxp("fit", "-f", str(_stack(tmp_path)), *args)
    assert done.returncode == 2, done.stdout
    assert says in done.stderr
    assert "Traceback" not in done.stderr


def test_without_a_cached_config_fit_says_where_it_looked(user: User, tmp_path: Path) -> None:
    user.env["HF_HOME"] = str(tmp_path / "empty")
    done = user.hxp("fit", "-f", str(_stack(tmp_path)), "chat")
    assert done.returncode == 2
    assert "models.chat.model: no config.json of Qwen/Qwen2.5-7B-Instruct" in done.stderr
    assert str(tmp_path / "empty" / "hub" / "models--Qwen--Qwen2.5-7B-Instruct") in done.stderr
    assert "--config FILE" in done.stderr
    bare = user.hxp("fit")  # in a HOME without stack.yaml
    assert bare.returncode == 2
    assert "no stack.yaml here; ask from a stack (hxp fit -f STACK [MODEL])" in bare.stderr
    ad_hoc = user.hxp("fit", "--config", str(tmp_path / "c.json"), "--gpus", "1")
    assert ad_hoc.returncode == 2
    assert "needs --gpu-memory-gib, --gpu-memory-utilization, --max-model-len" in ad_hoc.stderr


@pytest.mark.slow
def test_status_shows_each_models_gpus_revision_kv_gateway_and_health(
    user: User, tmp_path: Path
) -> None:
    """Two simulator replicas claiming one declared GPU each, behind the gateway: status shows
    the GPUs each got, the revision, the calculator's prediction (the same as `hxp fit`'s), the
    gateway membership, and the health the last sweep recorded."""
    hf_cache(tmp_path / "hf2", "hxp-sim/chat", "r1", CASE["config"])
    user.env["HF_HOME"] = str(tmp_path / "hf2")
    stack = sim_fleet(tmp_path / "fleet.yaml", "sf", free_range(2), free_port(), gpus=2)
    try:
        applied = user.hxp("apply", "-f", str(stack))
        assert applied.returncode == 0, applied.stdout + applied.stderr
        _, fitted = _json(user, "-f", str(stack), "chat")
        kv = f"{fitted['chat']['kv_cache_tokens']:,}"
        concurrency = f"{fitted['chat']['max_concurrency']:.1f}x"

        status = user.hxp("status", "-f", str(stack))
        assert status.returncode == 0, status.stdout + status.stderr
        rows = _models_table(status.stdout)
        assert set(rows) == {"chat-0", "chat-1"}
        assert {rows[i]["gpus"] for i in rows} == {"0", "1"}
        for row in rows.values():
            assert row["revision"] == "r1"
            assert (row["kv"], row["concurrency"]) == (kv, concurrency)
            assert row["gateway"] == "in"
            assert row["health"] == "not swept"
            assert row["model"] == "hxp-sim/chat"

        swept = user.hxp("health", "-f", str(stack), "--json")
        assert swept.returncode == 0, swept.stdout + swept.stderr
        after = _models_table(user.hxp("status", "-f", str(stack)).stdout)
        assert {r["health"] for r in after.values()} == {"healthy"}

        as_json = json.loads(user.hxp("status", "-f", str(stack), "--json").stdout)
        model = {r["instance"]: r["model"] for r in as_json if "model" in r}
        assert model["chat-0"]["kv_tokens"] == fitted["chat"]["kv_cache_tokens"]
        assert model["chat-0"]["gateway"] == "in"
    finally:
        down = user.hxp("down", "-f", str(stack))
        user.hxp("server", "stop")
    assert down.returncode == 0, down.stdout + down.stderr


def _models_table(stdout: str) -> dict[str, dict[str, str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model instance"))
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith("  note:"):
            break
        cells = re.split(r"\s+", line.strip())
        keys = ("gpus", "revision", "kv", "concurrency", "gateway", "health")
        if cells[6] == "not":  # "not swept" is two words
            cells[6:8] = ["not swept"]
        rows[cells[0]] = {**dict(zip(keys, cells[1:7], strict=True)), "model": cells[7]}
    return rows
