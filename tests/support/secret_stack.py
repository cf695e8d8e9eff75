"""A stack whose units take a secret (HF_TOKEN), for the secret-handling tests.

`api` is a Python HTTP server on the process backend that refuses to start unless HF_TOKEN
hashes to the expected digest: it proves the value arrived without the value itself ever
appearing in its command line.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

from hxp.spec import Stack
from tests.support.render_data import stack_from_data
from tests.support.stacks import free_port

TOKEN = "hf_LeakCanary-7f3a9c1e5b2d4806"
BLOCK = "hf-token"


def checker(port: int, token: str = TOKEN, python: str = sys.executable) -> list[str]:
    digest = hashlib.sha256(token.encode()).hexdigest()
    code = (
        "import hashlib, os, sys, http.server as h; "
        f"ok = hashlib.sha256(os.environ.get('HF_TOKEN', '').encode()).hexdigest() == '{digest}'; "
        "ok or sys.exit('HF_TOKEN is missing or wrong'); "
        f"h.HTTPServer(('127.0.0.1', {port}), h.SimpleHTTPRequestHandler).serve_forever()"
    )
    return [python, "-c", code]


def secret_stack_data(port: int | None = None, block: str = BLOCK) -> dict[str, Any]:
    port = port or free_port()
    return {
        "stack": "sec",
        "hosts": {
            "local": {"backend": "process"},
            "gpu": {"backend": "systemd", "gpus": [{"index": 0, "memory_gib": 80}]},
        },
        "services": {
            "api": {
                "host": "local",
                "image": "local/api:1",
                "command": checker(port),
                "ports": {"http": port},
                "env": {"MODE": "test"},
                "secret_env": {"HF_TOKEN": block},
                "health": {
                    "http": {"url": f"http://127.0.0.1:{port}/"},
                    "interval": "200ms",
                    "timeout": "500ms",
                    "retries": 3,
                    "start_period": "10s",
                },
            }
        },
        "models": {
            "chat": {
                "host": "gpu",
                "model": "org/model",
                "gpus": [0],
                "secret_env": {"HF_TOKEN": block},
                "vllm": {"tensor_parallel_size": 1},
            }
        },
    }


def secret_stack(port: int | None = None, block: str = BLOCK) -> Stack:
    return stack_from_data(secret_stack_data(port, block))


def write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def files_containing(root: Path, needle: str, skip: frozenset[str] = frozenset()) -> list[str]:
    """Every file under `root` (but those named in `skip`) whose bytes contain `needle`."""
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in skip and needle.encode() in path.read_bytes():
            hits.append(str(path.relative_to(root)))
    return hits
