"""Stacks for the render tests: the examples, and a stack full of hostile values and names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hxp.config import build_config, parse_document
from hxp.spec import Stack

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = {
    "demo": REPO / "examples" / "demo" / "stack.yaml",
    "gpu-fleet": REPO / "examples" / "gpu-fleet" / "stack.yaml",
}

# Values that must come out of every target exactly as they went in: shell, systemd specifiers
# and variables, Compose interpolation, Kubernetes $(VAR) references, Jinja syntax, YAML syntax
# and YAML 1.1 booleans/nulls/numbers, quotes, backslashes, C escapes, odd whitespace, unicode
# (including characters YAML folds as line breaks or refuses when written raw).
HOSTILE_VALUES: tuple[str, ...] = (
    "; rm -rf /",
    "&& reboot",
    "| tee /etc/passwd",
    "$HOME",
    "${HOME}",
    "$(rm -rf /)",
    "$(HOME)",
    "$$(HOME)",
    "$",
    "$$",
    "a$",
    "`id`",
    "%n",
    "%%",
    "100%",
    "%{HOME}",
    'a"b',
    "it's",
    "'single'",
    '"',
    "'",
    "back\\slash",
    "\\",
    "\\\\",
    "\\n",
    "\\x41",
    "\\;",
    ";",
    "{{ 7*7 }}",
    "{% raw %}",
    "{# comment #}",
    "x: y",
    "#c",
    " #c",
    "- item",
    "[1, 2]",
    "{a: b}",
    "true",
    "no",
    "null",
    "~",
    "0x10",
    "012",
    "1e3",
    "1_000",
    ".inf",
    "2024-01-01",
    "*ref",
    "&anchor",
    "!tag",
    "!!python/object/apply:os.system ['id']",
    "@at",
    "-dash",
    "--flag=$X",
    "<<: *x",
    "---",
    "...",
    "",
    " ",
    " lead",
    "trail ",
    "a\tb",
    "héllo ☃ 日本語",
    "😀",
    "a\u0085b",
    "a\u2028b",
    "a\u2029b",
    "a\u009bb",
    "\ufeffbom",
    "\u00a0nbsp",
)

# Env keys that YAML 1.1 (PyYAML, Kubernetes' YAML reader) reads as booleans or null when unquoted.
HOSTILE_ENV_KEYS: tuple[str, ...] = ("ON", "NO", "Yes", "TRUE", "NULL", "Null", "_")


def hostile_env() -> dict[str, str]:
    env = {f"V{i:02d}": value for i, value in enumerate(HOSTILE_VALUES)}
    env.update({key: f"value of {key}" for key in HOSTILE_ENV_KEYS})
    return env


# The program must exist on the machine that runs `systemd-analyze verify`.
HOSTILE_PROGRAM = "/bin/echo"

HOSTILE_STACK: dict[str, Any] = {
    "version": 2,
    "stack": "hostile",
    "hosts": {"local": {"backend": "process"}},
    "services": {
        # Unit names that YAML 1.1 reads as a boolean or a number when unquoted.
        "yes": {
            "host": "local",
            "command": [HOSTILE_PROGRAM, *HOSTILE_VALUES],
            "image": "local/echo:1",
            "env": hostile_env(),
            "ports": {"http": 18090},
            "health": {"command": [HOSTILE_PROGRAM, *HOSTILE_VALUES], "interval": "2s"},
        },
        "0x10": {
            "host": "local",
            "command": [HOSTILE_PROGRAM, "replica"],
            "image": "local/echo:1",
            "replicas": 2,
            "depends_on": ["yes"],
        },
        "2024": {
            "host": "local",
            "command": [HOSTILE_PROGRAM, "plain"],
            "image": "local/echo:1",
            "depends_on": ["0x10", "null"],
            # Compose names the volume "2024-01-01": a date, unquoted.
            "volumes": [{"name": "01-01", "target": "/data"}],
        },
    },
    "models": {
        "null": {
            "host": "local",
            "model": "org/model",
            "port": 18100,
            "env": hostile_env(),
            "vllm": {"extra_args": list(HOSTILE_VALUES)},
        },
    },
}


def stack_from_data(data: dict[str, Any], source: str = "hostile.yaml") -> Stack:
    """Validate a stack given as data, through the same YAML parser the CLI uses.

    Non-ASCII is written as escapes: raw U+0085 in a YAML 1.1 file is a line break.
    """
    text = yaml.safe_dump(data, allow_unicode=False, sort_keys=False)
    return build_config([parse_document(text, source)], environ={}).stack
