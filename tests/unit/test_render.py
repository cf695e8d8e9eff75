"""Rendering: quoting filters, hostile values and names, and the template engine (fast, pure).

Hostile values are rendered for every target and read back the way the consumer reads them:
systemd's unquoting (specifiers, C escapes, `$` expansion), YAML plus Compose interpolation,
YAML plus Kubernetes `$(VAR)` expansion. What comes back must equal what went in.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from hxp.errors import InputError, OutputCheckError, StackValidationError, TemplateError
from hxp.render import (
    RenderedFile,
    Renderer,
    builtin_templates_dir,
    compose_str,
    k8s_arg,
    render_stack,
    systemd_arg,
    systemd_text,
    systemd_value,
    write_files,
    yaml_str,
)
from hxp.spec import Stack
from hxp.units import UnitInstance, expand_units
from hxp_cli import main
from tests.support.render_data import (
    HOSTILE_PROGRAM,
    HOSTILE_STACK,
    HOSTILE_VALUES,
    hostile_env,
    stack_from_data,
)

TEMPLATE = "systemd/unit.service.j2"
HEADER = "{# hxp-template version=1 #}\n"

# --------------------------------------------------------------------------- consumers' rules


_C_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "s": " ",
    "\\": "\\",
    '"': '"',
    "'": "'",
}


def _specifiers(text: str) -> str:
    """systemd resolves %-specifiers over the whole value first; only %% may appear."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "%":
            nxt = text[i + 1 : i + 2]
            assert nxt == "%", f"unescaped specifier %{nxt} in {text!r}"
            out.append("%")
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _cunescape(text: str, i: int) -> tuple[str, int]:
    """One C escape at text[i] == '\\' (systemd's cunescape_one); returns (char, next index)."""
    c = text[i + 1 : i + 2]
    if c in _C_ESCAPES:
        return _C_ESCAPES[c], i + 2
    if c == "x":
        return chr(int(text[i + 2 : i + 4], 16)), i + 4
    if c == "u":
        return chr(int(text[i + 2 : i + 6], 16)), i + 6
    if c == "U":
        return chr(int(text[i + 2 : i + 10], 16)), i + 10
    if c in "01234567" and c:
        return chr(int(text[i + 1 : i + 4], 8)), i + 4
    raise AssertionError(f"invalid escape \\{c} in {text!r}")


def systemd_words(text: str) -> list[str]:
    """Split a value the way systemd's extract_first_word(UNQUOTE|CUNESCAPE) does."""
    text = _specifiers(text)
    words: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return words
        word: list[str] = []
        while i < n and text[i] not in " \t":
            c = text[i]
            if c in "\"'":
                quote, i = c, i + 1
                while True:
                    assert i < n, f"unterminated quote in {text!r}"
                    if text[i] == quote:
                        i += 1
                        break
                    if text[i] == "\\":
                        ch, i = _cunescape(text, i)
                    else:
                        ch, i = text[i], i + 1
                    word.append(ch)
            elif c == "\\":
                ch, i = _cunescape(text, i)
                word.append(ch)
            else:
                word.append(c)
                i += 1
        words.append("".join(word))


def systemd_exec_env(arg: str) -> str:
    """systemd's replace_env_argv at exec time: `$$` -> `$`; `${X}` and a whole-word `$X` expand."""
    assert not re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", arg), f"{arg!r} would be expanded"
    out, i = [], 0
    while i < len(arg):
        if arg[i] == "$":
            nxt = arg[i + 1 : i + 2]
            assert nxt != "{", f"${{...}} in {arg!r} would be expanded"
            if nxt == "$":
                out.append("$")
                i += 2
                continue
        out.append(arg[i])
        i += 1
    return "".join(out)


def systemd_exec_start(value: str) -> list[str]:
    words = systemd_words(value)
    assert words, "empty ExecStart"
    assert words[0][:1] not in ("-", "@", ":", "+", "!", "|"), "program read as a prefix flag"
    assert ";" not in re.findall(r"(?:^|\s)(;)(?:\s|$)", value), "unquoted ';' splits ExecStart"
    # The program path is taken literally; the arguments go through variable expansion.
    return [words[0], *(systemd_exec_env(w) for w in words[1:])]


def parse_unit(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file (all sections), values unparsed, in order.

    systemd ends lines at \n only (not at U+0085 or U+2028, which str.splitlines() splits at).
    """
    keys: dict[str, list[str]] = {}
    for line in text.split("\n"):
        assert not line.endswith("\\"), f"line continuation: {line!r}"
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=value line: {line!r}"
        keys.setdefault(key, []).append(value)
    return keys


def systemd_environment(values: list[str]) -> dict[str, str]:
    env = {}
    for value in values:
        for word in systemd_words(value):
            key, sep, val = word.partition("=")
            assert sep, word
            env[key] = val
    return env


def compose_interpolate(value: str) -> str:
    """Compose interpolation: `$$` -> `$`; any other `$` would interpolate (a failure here)."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$":
            assert value[i + 1 : i + 2] == "$", f"Compose would interpolate {value!r}"
            out.append("$")
            i += 2
            continue
        out.append(value[i])
        i += 1
    return "".join(out)


def k8s_expand(value: str, mapping: Callable[[str], str] = lambda n: f"<EXPANDED {n}>") -> str:
    """Kubernetes' expansion.Expand, as the kubelet applies it to command, args and exec probes."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            nxt = value[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    out.append(mapping(value[i + 2 : end]))
                    i = end + 1
                    continue
                out.append("$(")
                i += 2
                continue
            out.append("$" + nxt)
            i += 2
            continue
        out.append(value[i])
        i += 1
    return "".join(out)


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", '"plain"'),
        ('a"b', '"a\\"b"'),
        ("back\\slash", '"back\\\\slash"'),
        ("%n", '"%%n"'),
        ("$HOME", '"$$HOME"'),
        ("${HOME}", '"$${HOME}"'),
        ("; rm -rf /", '"; rm -rf /"'),
        ('\\"%$', '"\\\\\\"%%$$"'),
        ("", '""'),
    ],
)
def test_systemd_arg(value: str, expected: str) -> None:
    assert systemd_arg(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("K=plain", '"K=plain"'),
        ('K=a"b', '"K=a\\"b"'),
        ("K=back\\slash", '"K=back\\\\slash"'),
        ("K=%n", '"K=%%n"'),
        ("K=$HOME", '"K=$HOME"'),  # Environment= does not expand variables
    ],
)
def test_systemd_value(value: str, expected: str) -> None:
    assert systemd_value(value) == expected


def test_systemd_text_escapes_specifiers_only() -> None:
    assert systemd_text('hxp 100% "x" $y') == 'hxp 100%% "x" $y'


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_systemd_arg_reads_back(value: str) -> None:
    assert systemd_exec_start(f"/bin/true {systemd_arg(value)}") == ["/bin/true", value]


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_systemd_value_reads_back(value: str) -> None:
    assert systemd_environment([systemd_value(f"K={value}")]) == {"K": value}


@pytest.mark.parametrize(
    ("value", "expected"),
    [("$HOME", '"$$HOME"'), ("a$$b", '"a$$$$b"'), ("no dollar", '"no dollar"')],
)
def test_compose_str_escapes_dollar(value: str, expected: str) -> None:
    assert compose_str(value) == expected


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_yaml_str_round_trips(value: str) -> None:
    text = yaml_str(value)
    assert yaml.safe_load(text) == value
    assert yaml.safe_load(f"key: {text}\n") == {"key": value}
    assert yaml.safe_load(f"- [{text}, {text}]\n") == [[value, value]]
    assert json.loads(text) == value  # also plain JSON, so Go YAML readers agree


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_compose_str_and_k8s_arg_round_trip(value: str) -> None:
    assert compose_interpolate(yaml.safe_load(compose_str(value))) == value
    assert k8s_expand(yaml.safe_load(k8s_arg(value))) == value


@pytest.mark.parametrize("value", ["a\u0085b", "a\u2028b", "a\u009bb", "\ud800", "\uffff", "\x7f"])
def test_yaml_str_escapes_what_yaml_readers_refuse_or_fold(value: str) -> None:
    text = yaml_str(value)
    assert text.isascii()
    assert yaml.safe_load(text) == value


@pytest.mark.parametrize("value", [5, 1.5, True, None])
def test_yaml_str_makes_strings_of_scalars(value: Any) -> None:
    assert yaml.safe_load(yaml_str(value)) == str(value)


# --------------------------------------------------------------------------- hostile values


def _units(stack: Stack) -> dict[str, UnitInstance]:
    return {u.name: u for u in expand_units(stack)}


def _files(stack: Stack, target: str) -> dict[str, str]:
    return {f.path: f.content for f in render_stack(stack, target)}  # type: ignore[arg-type]


def test_hostile_stack_really_is_hostile(hostile_stack: Stack) -> None:
    units = _units(hostile_stack)
    assert units["yes"].argv == (HOSTILE_PROGRAM, *HOSTILE_VALUES)
    assert units["null"].argv[-len(HOSTILE_VALUES) :] == HOSTILE_VALUES
    assert dict(units["yes"].env) == hostile_env()


def test_systemd_hostile_argv_and_env_read_back(hostile_stack: Stack) -> None:
    files = _files(hostile_stack, "systemd")
    units = _units(hostile_stack)
    for name in ("yes", "null"):
        unit = units[name]
        keys = parse_unit(files[unit.systemd_name])
        assert len(keys["ExecStart"]) == 1
        assert systemd_exec_start(keys["ExecStart"][0]) == list(unit.argv)
        env = systemd_environment(keys["Environment"])
        assert {k: env[k] for k, _ in unit.env} == dict(unit.env)


def test_systemd_hostile_lines_exactly(hostile_stack: Stack) -> None:
    text = _files(hostile_stack, "systemd")["hxp-hostile-yes.service"]
    lines = text.splitlines()
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert exec_start.startswith(
        'ExecStart="/bin/echo" "; rm -rf /" "&& reboot" "| tee /etc/passwd" "$$HOME" '
        '"$${HOME}" "$$(rm -rf /)" "$$(HOME)" "$$$$(HOME)" "$$" "$$$$" "a$$" "`id`" "%%n" '
        '"%%%%" "100%%" "%%{HOME}" "a\\"b" "it\'s" "\'single\'" "\\"" "\'" "back\\\\slash" '
        '"\\\\" "\\\\\\\\" "\\\\n" "\\\\x41" "\\\\;" ";" "{{ 7*7 }}" "{%% raw %%}" '
    )
    assert 'Environment="V03=$HOME"' in lines
    assert 'Environment="V12=%%n"' in lines
    assert 'Environment="V16=a\\"b"' in lines
    assert 'Environment="V21=back\\\\slash"' in lines
    assert 'Environment="V28={{ 7*7 }}"' in lines
    assert "49" not in exec_start


def test_systemd_depends_on_names_every_replica_in_both_slots(hostile_stack: Stack) -> None:
    """Ordering holds whichever blue-green slot (`x` or `x-g`) each dependency instance runs
    in, and no Wants= makes systemd start a dependency hxp did not ask for."""
    keys = parse_unit(_files(hostile_stack, "systemd")["hxp-hostile-2024.service"])
    assert keys["After"] == [
        "hxp-hostile-0x10-0.service",
        "hxp-hostile-0x10-0-g.service",
        "hxp-hostile-0x10-1.service",
        "hxp-hostile-0x10-1-g.service",
        "hxp-hostile-null.service",
        "hxp-hostile-null-g.service",
        "network-online.target",
    ]
    assert keys["Wants"] == ["network-online.target"]
    assert "Requires" not in keys
    assert "BindsTo" not in keys


def test_compose_hostile_values_read_back(hostile_stack: Stack) -> None:
    doc = yaml.safe_load(_files(hostile_stack, "compose")["compose.yaml"])
    units = _units(hostile_stack)
    # Unit names that YAML 1.1 reads as booleans, numbers or null stay strings.
    assert list(doc["services"]) == ["0x10", "2024", "yes", "null"]
    assert list(doc["networks"]) == ["hostile"]
    assert list(doc["volumes"]) == ["2024-01-01", "null-cache"]  # a model's cache volume
    assert list(doc["services"]["2024"]["depends_on"]) == ["0x10", "null"]
    for name in ("yes", "null"):
        svc, unit = doc["services"][name], units[name]
        assert [compose_interpolate(a) for a in svc["command"]] == list(unit.container_args)
        env = {k: compose_interpolate(v) for k, v in svc["environment"].items()}
        assert env == dict(unit.container_env)
        assert dict(unit.env).items() <= env.items()
        assert all(isinstance(k, str) for k in svc["environment"])
    test = doc["services"]["yes"]["healthcheck"]["test"]
    assert [compose_interpolate(a) for a in test] == ["CMD", HOSTILE_PROGRAM, *HOSTILE_VALUES]


def test_k8s_hostile_values_read_back(hostile_stack: Stack) -> None:
    files = _files(hostile_stack, "k8s")
    units = _units(hostile_stack)
    for name in ("yes", "null"):
        docs = {d["kind"]: d for d in yaml.safe_load_all(files[f"{name}.yaml"])}
        unit = units[name]
        # envFrom values are not expanded
        assert docs["ConfigMap"]["data"] == dict(unit.container_env)
        assert dict(unit.env).items() <= docs["ConfigMap"]["data"].items()
        container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
        assert [k8s_expand(a) for a in container["args"]] == list(unit.container_args)
        if name == "yes":
            probe = container["readinessProbe"]["exec"]["command"]
            assert [k8s_expand(a) for a in probe] == [HOSTILE_PROGRAM, *HOSTILE_VALUES]


@pytest.mark.parametrize("target", ["systemd", "compose", "k8s"])
def test_jinja_syntax_in_values_is_not_evaluated(hostile_stack: Stack, target: str) -> None:
    text = "".join(_files(hostile_stack, target).values())
    assert "{{ 7*7 }}" in text
    assert "{# comment #}" in text
    assert re.search(r"(?<!V)\b49\b", text) is None  # V49 is an env key


def test_program_that_systemd_would_read_as_a_flag_is_rejected(
    hostile_stack_data: dict[str, Any],
) -> None:
    for program in ("-/bin/echo", "@/bin/echo", "+/bin/echo", "!/bin/echo", ":x", "/bin/$x"):
        data = copy.deepcopy(hostile_stack_data)
        data["services"]["yes"]["command"] = [program, "x"]
        with pytest.raises(StackValidationError, match=r"services\.yes\.command"):
            stack_from_data(data)
        data = copy.deepcopy(hostile_stack_data)
        data["models"]["null"]["python"] = program
        with pytest.raises(StackValidationError, match=r"models\.null\.python"):
            stack_from_data(data)


# --------------------------------------------------------------------------- hostile names

HOSTILE_NAMES = (
    "../etc",
    "a/b",
    "a b",
    "A",
    "a;b",
    "a%n",
    "$x",
    "`x`",
    "-a",
    "a-",
    "a.b",
    "é",
    "a\nb",
    "{{x}}",
    "",
    "a" * 64,
)


def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _rename_key(data: dict[str, Any], path: tuple[str, ...], old: str, new: str) -> None:
    node: Any = data
    for part in path:
        node = node[part]
    node[new] = node.pop(old)


def _rename_unit(data: dict[str, Any], kind: str, old: str, new: str) -> None:
    """Rename a unit and every depends_on that names it, so only the name itself is wrong."""
    _rename_key(data, (kind,), old, new)
    for units in (data["services"], data["models"]):
        for unit in units.values():
            unit["depends_on"] = [new if d == old else d for d in unit.get("depends_on", [])]


def _rename_host(data: dict[str, Any], old: str, new: str) -> None:
    _rename_key(data, ("hosts",), old, new)
    for units in (data["services"], data["models"]):
        for unit in units.values():
            if unit["host"] == old:
                unit["host"] = new


_NAME = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_ENV_KEY = r"[A-Za-z_][A-Za-z0-9_]*"
_USER = r"[a-z_][a-z0-9_-]{0,31}"

# Every place a name reaches a file name, a unit file line, a YAML key or a command line:
# (field path the error must name, what a valid value looks like, how to put the value there).
NAME_FIELDS: list[tuple[str, str, Callable[[dict[str, Any], str], None]]] = [
    ("stack", _NAME, lambda d, v: _set(d, ("stack",), v)),
    ("services.", _NAME, lambda d, v: _rename_unit(d, "services", "yes", v)),
    ("models.", _NAME, lambda d, v: _rename_unit(d, "models", "null", v)),
    ("hosts.", _NAME, lambda d, v: _rename_host(d, "local", v)),
    (
        "services.2024.depends_on.0",
        _NAME,
        lambda d, v: _set(d, ("services", "2024", "depends_on"), [v]),
    ),
    (
        "services.2024.volumes.0.name",
        _NAME,
        lambda d, v: _set(d, ("services", "2024", "volumes", 0, "name"), v),
    ),
    ("services.yes.ports.", _NAME, lambda d, v: _set(d, ("services", "yes", "ports"), {v: 1})),
    ("services.yes.env.", _ENV_KEY, lambda d, v: _set(d, ("services", "yes", "env"), {v: "x"})),
    (
        "services.yes.secret_env.",
        _ENV_KEY,
        lambda d, v: _set(d, ("services", "yes", "secret_env"), {v: "blk"}),
    ),
    (
        "services.yes.secret_env.K",
        _NAME,
        lambda d, v: _set(d, ("services", "yes", "secret_env"), {"K": v}),
    ),
    ("models.null.served_name", _NAME, lambda d, v: _set(d, ("models", "null", "served_name"), v)),
    (
        "models.null.vllm.quantization",
        _NAME,
        lambda d, v: _set(d, ("models", "null", "vllm", "quantization"), v),
    ),
    ("services.yes.user", _USER, lambda d, v: _set(d, ("services", "yes", "user"), v)),
]


# (field, hostile value) pairs; values that are valid in a field (an env key "A") are left out.
NAME_CASES = [
    pytest.param(where, put, hostile, id=f"{where}-{hostile!r}")
    for where, valid, put in NAME_FIELDS
    for hostile in HOSTILE_NAMES
    if not re.fullmatch(valid, hostile)
]


@pytest.mark.parametrize(("where", "put", "hostile"), NAME_CASES)
def test_hostile_names_are_rejected_before_rendering(
    hostile_stack_data: dict[str, Any],
    where: str,
    put: Callable[[dict[str, Any], str], None],
    hostile: str,
) -> None:
    data = copy.deepcopy(hostile_stack_data)
    put(data, hostile)
    with pytest.raises(InputError) as info:
        stack_from_data(data)
    message = str(info.value)
    assert info.value.exit_code == 2
    assert f" {where}" in message, message
    assert "invalid" in message or "at least 1 character" in message, message
    assert re.match(r"hostile\.yaml:\d+ ", message), message  # names the file and line


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", "yes", "workdir"), "relative/dir"),
        (("services", "yes", "workdir"), "/srv/../etc"),
        (("services", "yes", "workdir"), "/srv/a b"),
        (("services", "yes", "workdir"), "/srv/%n"),
        (("services", "yes", "workdir"), "/srv/$HOME"),
        (("services", "yes", "workdir"), "/srv/a;b"),
        (("services", "yes", "workdir"), '/srv/"x"'),
        (("services", "yes", "image"), "Bad:Image"),
        (("services", "yes", "image"), "img;rm -rf /"),
        (("services", "yes", "image"), "img $x"),
        (("services", "yes", "ingress_host"), "a b"),
        (("services", "yes", "ingress_host"), "a;b"),
        (("models", "null", "model"), "../../etc/passwd"),
        (("models", "null", "model"), "org/a b"),
        (("models", "null", "revision"), "../main"),
        (("models", "null", "revision"), "main; rm"),
        # ssh and docker exec command lines
        (("hosts", "local", "address"), "-oProxyCommand=sh"),
        (("hosts", "local", "address"), "host name"),
        (("hosts", "local", "ssh_user"), "-oProxyCommand=sh"),
        (("hosts", "local", "ssh_user"), "root;id"),
        (("hosts", "local", "container"), "-it"),
        (("hosts", "local", "container"), "c;id"),
        (("templates_dir",), "relative"),
        (("templates_dir",), "/a/../b"),
        (("templates_dir",), "/a b"),
        (("services", "yes", "command"), ["/bin/echo", "a\nb"]),
        (("services", "yes", "command"), ["/bin/echo", "a\x00b"]),
        (("services", "yes", "command"), ["/bin/echo", "\x1b[31mred"]),
        (("services", "yes", "env"), {"K": "a\nb"}),
        (("services", "yes", "env"), {"K": "a\rb"}),
        (("models", "null", "vllm", "extra_args"), ["a\nb"]),
    ],
    ids=repr,
)
def test_hostile_paths_and_values_are_rejected(
    hostile_stack_data: dict[str, Any], path: tuple[str, ...], value: Any
) -> None:
    data = copy.deepcopy(hostile_stack_data)
    _set(data, path, value)
    with pytest.raises(InputError) as info:
        stack_from_data(data)
    assert info.value.exit_code == 2
    assert path[-1] in str(info.value)


def test_cli_render_of_a_hostile_name_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = copy.deepcopy(HOSTILE_STACK)
    _rename_key(data, ("services",), "yes", "../../evil")
    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text(yaml.safe_dump(data, allow_unicode=True))
    out = tmp_path / "out"
    for target in ("systemd", "compose", "k8s"):
        code = main(["render", "-f", str(stack_file), "--target", target, "--out", str(out)])
        assert code == 2
        err = capsys.readouterr().err
        assert "services" in err
        assert "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.yaml"]


@pytest.mark.parametrize("path", ["../x.service", "/etc/x.service", "a/../../x", ".."])
def test_write_files_never_leaves_the_output_directory(tmp_path: Path, path: str) -> None:
    out = tmp_path / "out"
    f = RenderedFile(path=path, content="x", template="t", template_version=1)
    with pytest.raises(OutputCheckError, match="refusing to write outside"):
        write_files([f], out)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


# --------------------------------------------------------------------------- template engine


def _user_template(tmp_path: Path, body: str, name: str = TEMPLATE) -> Path:
    path = tmp_path / "templates" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return tmp_path / "templates"


def _render_one(templates: Path, stack: Stack) -> str:
    unit = expand_units(stack)[0]
    return Renderer(templates).render(TEMPLATE, stack=stack, unit=unit).content


def test_builtin_templates_all_carry_a_version_header() -> None:
    names = sorted(
        str(p.relative_to(builtin_templates_dir())) for p in builtin_templates_dir().rglob("*.j2")
    )
    expected = {"compose/compose.yaml.j2", "k8s/unit.yaml.j2", "systemd/unit.service.j2"}
    assert expected <= set(names)
    for name in names:
        first = (builtin_templates_dir() / name).read_text().splitlines()[0]
        assert re.match(r"\{#-?\s*hxp-template\s+version=\d+", first), name


def test_user_template_overrides_the_builtin(tmp_path: Path, hostile_stack: Stack) -> None:
    templates = _user_template(
        tmp_path, "{#- hxp-template version=7 -#}\ncustom {{ unit.name }} of {{ stack.stack }}\n"
    )
    files = render_stack(hostile_stack, "systemd", Renderer(templates))
    assert files[0].content == "custom 0x10-0 of hostile\n"
    assert files[0].template_version == 7
    # Templates the directory does not have still come from the built-in set.
    compose = render_stack(hostile_stack, "compose", Renderer(templates))
    assert compose[0].content.startswith("# Rendered by hxp ")


def test_stack_templates_dir_is_used(tmp_path: Path, hostile_stack_data: dict[str, Any]) -> None:
    templates = _user_template(tmp_path, HEADER + "from the stack's templates_dir\n")
    data = copy.deepcopy(hostile_stack_data)
    data["templates_dir"] = str(templates)
    files = render_stack(stack_from_data(data), "systemd")
    assert {f.content for f in files} == {"from the stack's templates_dir\n"}


def test_missing_templates_dir_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(StackValidationError, match="templates_dir"):
        Renderer(tmp_path / "nope")


def test_template_without_header_is_refused(tmp_path: Path, hostile_stack: Stack) -> None:
    templates = _user_template(tmp_path, "{# just a comment #}\nExecStart=/bin/sh\n")
    with pytest.raises(TemplateError) as info:
        _render_one(templates, hostile_stack)
    message = str(info.value)
    assert f"{templates / TEMPLATE}:1" in message
    assert "version header" in message
    assert info.value.exit_code == 2


def test_header_must_be_on_the_first_line(tmp_path: Path, hostile_stack: Stack) -> None:
    templates = _user_template(tmp_path, "\n" + HEADER + "x\n")
    with pytest.raises(TemplateError, match="version header"):
        _render_one(templates, hostile_stack)


@pytest.mark.parametrize(
    ("body", "line", "what"),
    [
        (HEADER + "line 2\n{{ no_such_variable }}\n", 3, "no_such_variable"),
        (HEADER + "\n\n\n{{ unit.no_such_field }}\n", 5, "no_such_field"),
        (
            HEADER + "{% for x in [1] %}\n{{ x }}\n{{ stack.nope.deeper }}\n{% endfor %}\n",
            4,
            "nope",
        ),
    ],
)
def test_undefined_names_the_template_file_and_line(
    tmp_path: Path, hostile_stack: Stack, body: str, line: int, what: str
) -> None:
    templates = _user_template(tmp_path, body)
    with pytest.raises(TemplateError) as info:
        _render_one(templates, hostile_stack)
    message = str(info.value)
    assert f"{templates / TEMPLATE}:{line} " in message
    assert what in message


def test_undefined_in_a_builtin_template_names_it(hostile_stack: Stack) -> None:
    with pytest.raises(TemplateError) as info:
        Renderer().render(TEMPLATE, stack=hostile_stack)  # no `unit`
    assert re.search(r"templates/systemd/unit\.service\.j2:\d+ ", str(info.value))
    assert "unit" in str(info.value)


@pytest.mark.parametrize(
    ("body", "line"),
    [
        (HEADER + "ok\n{% if %}\n", 3),
        (HEADER + "{% for x in y %}\nno end\n", 3),
        (HEADER + "\n{{ unit.name }\n", 3),
    ],
)
def test_syntax_error_names_file_and_line(
    tmp_path: Path, hostile_stack: Stack, body: str, line: int
) -> None:
    templates = _user_template(tmp_path, body)
    with pytest.raises(TemplateError) as info:
        _render_one(templates, hostile_stack)
    assert f"{templates / TEMPLATE}:{line} template syntax error" in str(info.value)


SANDBOX_ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ lipsum.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ range.__self__ }}",
    "{{ stack.__class__ }}",
    "{{ stack|attr('__class__') }}",
    "{{ stack['__class__'] }}",
    "{{ unit.__dataclass_fields__ }}",
    "{{ '{0.__class__}'.format(stack) }}",
    "{{ '%s'.format_map({}) }}{{ ''.format.__self__.__class__ }}",
    "{{ unit.spec.__dict__ }}",
    # pydantic's API on models: parse_raw/parse_file unpickle and read files.
    "{{ stack.parse_raw('{}') }}",
    "{{ stack.parse_file('/etc/hostname') }}",
    "{{ stack['parse_raw'] }}",
    "{{ stack|attr('parse_file') }}",
    "{{ stack.model_validate({}) }}",
    "{{ stack.model_dump() }}",
    "{{ unit.spec.model_fields }}",
    "{{ unit.host_spec.copy(update={'backend': 'docker'}) }}",
    "{{ stack.construct() }}",
]


@pytest.mark.filterwarnings("ignore:Accessing the 'model_fields' attribute")
@pytest.mark.parametrize("expression", SANDBOX_ESCAPES)
def test_sandbox_escapes_are_template_errors(
    tmp_path: Path, hostile_stack: Stack, expression: str
) -> None:
    templates = _user_template(tmp_path, HEADER + "\n" + expression + "\n")
    with pytest.raises(TemplateError) as info:
        _render_one(templates, hostile_stack)
    assert f"{templates / TEMPLATE}:" in str(info.value)


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_sandbox_cannot_unpickle_through_pydantic(tmp_path: Path, hostile_stack: Stack) -> None:
    """parse_raw(..., allow_pickle=True) on a model would run arbitrary code."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Marker(str(marker)), protocol=0).decode("latin-1")
    templates = _user_template(
        tmp_path,
        HEADER + "{{ stack.parse_raw(p.encode('latin-1'), content_type='application/pickle', "
        "allow_pickle=True) }}\n",
    )
    unit = expand_units(hostile_stack)[0]
    with pytest.raises(TemplateError, match="unsafe"):
        Renderer(templates).render(TEMPLATE, stack=hostile_stack, unit=unit, p=payload)
    assert not marker.exists()


def test_templates_still_read_fields_and_stack_methods(
    tmp_path: Path, hostile_stack: Stack
) -> None:
    templates = _user_template(
        tmp_path,
        HEADER + "{{ stack.stack }} {{ stack.unit('yes').replicas }} {{ unit.spec.image }} "
        "{{ stack.models['null'].model }} {{ unit.host_spec.backend }}\n",
    )
    assert _render_one(templates, hostile_stack) == "hostile 1 local/echo:1 org/model process\n"


def test_yaml_output_that_does_not_parse_names_file_and_line(
    tmp_path: Path, hostile_stack: Stack
) -> None:
    templates = _user_template(
        tmp_path, HEADER + "a: 1\nb: [unclosed\n", name="compose/compose.yaml.j2"
    )
    with pytest.raises(OutputCheckError, match=r"compose\.yaml:\d+ \(from compose/compose"):
        render_stack(hostile_stack, "compose", Renderer(templates))


def test_k8s_render_refuses_names_longer_than_a_kubernetes_label(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unit = "u" * 40
    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text(
        yaml.safe_dump(
            {
                "version": 2,
                "stack": "s" * 30,
                "hosts": {"h": {}},
                "services": {unit: {"host": "h", "image": "busybox:1", "command": ["sleep", "1"]}},
            }
        )
    )
    out = tmp_path / "out"
    assert main(["render", "-f", str(stack_file), "--target", "k8s", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"services.{unit}" in err
    assert "71 characters" in err
    assert "Traceback" not in err
    assert not out.exists()
    # The other targets have no such limit.
    assert main(["render", "-f", str(stack_file), "--target", "compose", "--out", str(out)]) == 0
