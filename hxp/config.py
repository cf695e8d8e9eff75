"""Layered configuration: defaults < stack files < HXP__ environment < explicit overrides.

Every effective value keeps its provenance (file:line, environment variable or `--set`), every
error names the file, line and field path, and each effective config has a content hash.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import ValidationError

from hxp.errors import Issue, Location, StackFileError, StackValidationError
from hxp.spec import CURRENT_VERSION, Stack, part_name

MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 200_000
MAX_DEPTH = 64
ENV_PREFIX = "HXP__"

PathKey = tuple[str, ...]
Data = dict[str, Any]


def format_path(path: Sequence[str | int]) -> str:
    """`('services', 'cache', 'health')` -> `services.cache.health`; list items by index."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# --------------------------------------------------------------------------- YAML with marks


@dataclass
class Document:
    """One parsed source: its data, and the location of every value in it."""

    source: str
    data: Data
    locations: dict[PathKey, Location] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    def location_of(self, path: Sequence[str | int]) -> Location | None:
        return _nearest(self.locations, tuple(str(p) for p in path))


def _nearest(locations: Mapping[PathKey, Location], path: PathKey) -> Location | None:
    for cut in range(len(path), -1, -1):
        loc = locations.get(path[:cut])
        if loc is not None:
            return loc
    return None


class _Converter:
    """Turns a composed YAML node tree into plain data, recording each value's line."""

    def __init__(self, source: str, loader: yaml.SafeLoader) -> None:
        self.source = source
        self.loader = loader
        self.locations: dict[PathKey, Location] = {}
        self.visited = 0
        self.active: set[int] = set()

    def error(self, node: yaml.Node, message: str, path: PathKey = ()) -> StackFileError:
        loc = Location(self.source, node.start_mark.line + 1)
        return StackFileError([Issue(message, format_path(path), loc)])

    def convert(self, node: yaml.Node, path: PathKey) -> Any:
        self.visited += 1
        if self.visited > MAX_NODES:
            raise self.error(node, f"document too large: more than {MAX_NODES} values")
        if len(path) > MAX_DEPTH:
            raise self.error(node, f"nesting deeper than {MAX_DEPTH} levels", path)
        if id(node) in self.active:
            raise self.error(node, "recursive YAML alias", path)
        self.locations[path] = Location(self.source, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            value = self.loader.construct_object(node, deep=True)
            if not isinstance(value, str | int | float | bool | type(None)):
                value = str(node.value)
            return value
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.convert(child, (*path, str(i))) for i, child in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
        finally:
            self.active.discard(id(node))
        raise self.error(node, "unsupported YAML node", path)

    def _mapping(self, node: yaml.MappingNode, path: PathKey) -> Data:
        seen_lines: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(key_node, "a mapping key must be a plain string", path)
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = str(key_node.value)
            if key in seen_lines:
                raise self.error(
                    key_node,
                    f"duplicate key {key!r} (first defined on line {seen_lines[key]})",
                    (*path, key),
                )
            seen_lines[key] = key_node.start_mark.line + 1
        # Merge keys (`<<: *base`) come first after flattening; explicit keys then win.
        self.loader.flatten_mapping(node)
        out: Data = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            out[key] = self.convert(value_node, (*path, key))
        return out


def parse_document(text: str | bytes, source: str) -> Document:
    """Parse one stack document, keeping the line of every value; errors name source:line."""
    if isinstance(text, bytes):
        if len(text) > MAX_FILE_BYTES:
            raise StackFileError(
                [
                    Issue(
                        f"file too large: {len(text) / 1024 / 1024:.1f} MiB "
                        f"(the limit is {MAX_FILE_BYTES // 1024 // 1024} MiB)",
                        location=Location(source),
                    )
                ]
            )
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StackFileError(
                [Issue(f"not UTF-8 text (byte {exc.start})", location=Location(source))]
            ) from None
    if len(text) > MAX_FILE_BYTES:
        raise StackFileError([Issue("document too large", location=Location(source))])
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:  # a character YAML forbids: binary, not text
        where = Location(source, text.count("\n", 0, exc.position) + 1)
        raise StackFileError(
            [
                Issue(
                    f"not a text file: control character {exc.character:#04x} "
                    f"(binary data?) at character {exc.position}",
                    location=where,
                )
            ]
        ) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise StackFileError([Issue("empty stack file", location=Location(source))])
        converter = _Converter(source, loader)
        data = converter.convert(node, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise StackFileError(
            [Issue(f"YAML syntax error: {problem}", location=Location(source, line))]
        ) from None
    except yaml.YAMLError as exc:
        raise StackFileError([Issue(f"YAML error: {exc}", location=Location(source))]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise StackFileError(
            [
                Issue(
                    f"a stack file must be a mapping at the top, not {type(data).__name__}",
                    location=Location(source, 1),
                )
            ]
        )
    return Document(source, data, converter.locations)


def read_document(path: str | Path) -> Document:
    """Read and parse a stack file; a missing or unreadable file is an input error."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            size = p.stat().st_size / 1024 / 1024
            raise StackFileError(
                [
                    Issue(
                        f"file too large: {size:.1f} MiB "
                        f"(the limit is {MAX_FILE_BYTES // 1024 // 1024} MiB)",
                        location=Location(str(path)),
                    )
                ]
            )
        raw = p.read_bytes()
    except IsADirectoryError:
        raise StackFileError([Issue("is a directory", location=Location(str(path)))]) from None
    except OSError as exc:
        raise StackFileError(
            [Issue(f"cannot read: {exc.strerror}", location=Location(str(path)))]
        ) from None
    return migrate(parse_document(raw, str(path)))


# --------------------------------------------------------------------------- format migration


def _rename(doc: Document, old: PathKey, new: PathKey) -> None:
    """Move the recorded locations of `old` and everything under it to `new`."""
    moved = {
        new + key[len(old) :]: loc for key, loc in doc.locations.items() if key[: len(old)] == old
    }
    for key in [k for k in doc.locations if k[: len(old)] == old]:
        del doc.locations[key]
    doc.locations.update(moved)


def _migrate_1_to_2(doc: Document) -> None:
    """v1 kept units in lists with `name`, called health `healthcheck`, backend `type`."""
    data = doc.data
    for kind in ("services", "models"):
        units = data.get(kind)
        if isinstance(units, list):
            mapping: Data = {}
            for i, item in enumerate(units):
                if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                    loc = doc.location_of((kind, str(i)))
                    raise StackFileError(
                        [Issue("a version 1 unit needs a name", f"{kind}[{i}]", loc)]
                    )
                name = item.pop("name")
                if name in mapping:
                    raise StackFileError(
                        [
                            Issue(
                                f"duplicate unit name {name!r}",
                                f"{kind}[{i}]",
                                doc.location_of((kind, str(i))),
                            )
                        ]
                    )
                mapping[name] = item
                _rename(doc, (kind, str(i)), (kind, name))
            data[kind] = mapping
            doc.notices.append(f"{doc.source}: {kind} converted from a list to a mapping by name")
        for name, unit in (data.get(kind) or {}).items():
            if isinstance(unit, dict) and "healthcheck" in unit:
                if "health" in unit:
                    raise StackFileError(
                        [
                            Issue(
                                "both healthcheck (v1) and health (v2) given",
                                f"{kind}.{name}",
                                doc.location_of((kind, name)),
                            )
                        ]
                    )
                unit["health"] = unit.pop("healthcheck")
                _rename(doc, (kind, name, "healthcheck"), (kind, name, "health"))
                doc.notices.append(f"{doc.source}: {kind}.{name}.healthcheck renamed to health")
    for name, host in (data.get("hosts") or {}).items():
        if isinstance(host, dict) and "type" in host and "backend" not in host:
            host["backend"] = host.pop("type")
            _rename(doc, ("hosts", name, "type"), ("hosts", name, "backend"))
            doc.notices.append(f"{doc.source}: hosts.{name}.type renamed to backend")
    data["version"] = 2


MIGRATIONS = {1: _migrate_1_to_2}


def migrate(doc: Document) -> Document:
    """Bring a parsed document to the current format version, noting each change."""
    version = doc.data.get("version", CURRENT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise StackFileError(
            [Issue(f"invalid version {version!r}", "version", doc.location_of(("version",)))]
        )
    if version > CURRENT_VERSION:
        raise StackFileError(
            [
                Issue(
                    f"format version {version} is newer than this hxp supports "
                    f"({CURRENT_VERSION}); upgrade hxp",
                    "version",
                    doc.location_of(("version",)),
                )
            ]
        )
    if version < 1:
        raise StackFileError(
            [Issue(f"invalid version {version}", "version", doc.location_of(("version",)))]
        )
    start = version
    while version < CURRENT_VERSION:
        MIGRATIONS[version](doc)
        version += 1
    if start < CURRENT_VERSION:
        doc.notices.insert(
            0,
            f"{doc.source}: migrated from format version {start} to {CURRENT_VERSION} "
            f"(rewrite the file with `hxp config migrate -f {doc.source}`)",
        )
    return doc


# --------------------------------------------------------------------------- merging


def _is_named_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in value)
    )


def _drop_under(prov: dict[PathKey, Location], path: PathKey) -> None:
    for key in [k for k in prov if k[: len(path)] == path and len(k) > len(path)]:
        del prov[key]


def _record(
    prov: dict[PathKey, Location],
    path: PathKey,
    value: Any,
    doc: Document | None,
    src_path: PathKey,
    fallback: Location,
) -> None:
    """Record the provenance of `value` (and all values below it) written at `path`."""
    loc = doc.locations.get(src_path, fallback) if doc is not None else fallback
    prov[path] = loc
    if isinstance(value, dict):
        for k, v in value.items():
            _record(prov, (*path, k), v, doc, (*src_path, k), fallback)
    elif isinstance(value, list):
        named = _is_named_list(value)
        for i, v in enumerate(value):
            key = v["name"] if named else str(i)
            _record(prov, (*path, key), v, doc, (*src_path, str(i)), fallback)


def _merge(
    base: Any,
    over: Any,
    prov: dict[PathKey, Location],
    path: PathKey,
    doc: Document | None,
    src_path: PathKey,
    fallback: Location,
) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v, prov, (*path, k), doc, (*src_path, k), fallback)
        return out
    if _is_named_list(base) and _is_named_list(over):
        items = {i["name"]: i for i in base}
        order = [i["name"] for i in base]
        for idx, item in enumerate(over):
            name = item["name"]
            if name not in items:
                order.append(name)
            items[name] = _merge(
                items.get(name), item, prov, (*path, name), doc, (*src_path, str(idx)), fallback
            )
        return [items[n] for n in order]
    _drop_under(prov, path)
    _record(prov, path, over, doc, src_path, fallback)
    return copy.deepcopy(over)


def _set_path(
    data: Data, path: Sequence[str], value: Any, source: str, prov: dict[PathKey, Location]
) -> Data:
    """Apply one override (`a.b.c = value`); into a list of named items, a segment is a name."""
    if not path or any(p == "" for p in path):
        raise StackValidationError([Issue("empty key in override path", location=Location(source))])

    def walk(node: Any, rest: Sequence[str], done: PathKey) -> Any:
        if not rest:
            return _merge(None, value, prov, done, None, (), Location(source))
        head, tail = rest[0], rest[1:]
        if _is_named_list(node):
            names = [i["name"] for i in node]
            if head not in names:
                raise StackValidationError(
                    [
                        Issue(
                            f"no item named {head!r} (have {names})",
                            format_path(done),
                            Location(source),
                        )
                    ]
                )
            return [walk(i, tail, (*done, head)) if i["name"] == head else i for i in node]
        if node is None:
            node = {}
        if not isinstance(node, dict):
            raise StackValidationError(
                [
                    Issue(
                        f"cannot set a key inside a {type(node).__name__}",
                        format_path(done),
                        Location(source),
                    )
                ]
            )
        out = dict(node)
        out[head] = walk(node.get(head), tail, (*done, head))
        return out

    result = walk(data, list(path), ())
    assert isinstance(result, dict)
    return result


def parse_override_value(raw: str) -> Any:
    """An override's value is read as a YAML scalar or flow collection (`3`, `true`, `[a, b]`)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if raw.strip() == "":
        return ""
    return value


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, list[str], Any]]:
    """`HXP__services__cache__replicas=3` -> (source, path, value), sorted for determinism."""
    out = []
    for key in sorted(environ):
        if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX):
            path = key[len(ENV_PREFIX) :].split("__")
            out.append((f"env {key}", path, parse_override_value(environ[key])))
    return out


def set_overrides(items: Iterable[str]) -> list[tuple[str, list[str], Any]]:
    """`--set a.b=value` -> (source, path, value); a malformed item is an input error."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise StackValidationError(
                [
                    Issue(
                        f"override {item!r} must look like path.to.key=value",
                        location=Location("--set"),
                    )
                ]
            )
        out.append((f"--set {key}", key.strip().split("."), parse_override_value(raw)))
    return out


# --------------------------------------------------------------------------- the effective config


@dataclass(frozen=True)
class EffectiveConfig:
    """The merged, validated stack with where each value came from."""

    stack: Stack
    data: Data
    provenance: Mapping[PathKey, Location]
    sources: tuple[str, ...]
    notices: tuple[str, ...]

    @property
    def content_hash(self) -> str:
        return config_hash(self.stack)

    def provenance_rows(self) -> list[tuple[str, Any, str]]:
        """(field path, effective value, origin) for every leaf of the effective config."""
        rows: list[tuple[str, Any, str]] = []

        def walk(value: Any, path: PathKey) -> None:
            if isinstance(value, dict) and value:
                for k in value:
                    walk(value[k], (*path, k))
                return
            if _is_named_list(value):
                for item in value:
                    walk({k: v for k, v in item.items()}, (*path, item["name"]))
                return
            loc = self.provenance.get(path)
            rows.append((_display_path(path), value, str(loc) if loc is not None else "default"))

        walk(self.stack.model_dump(mode="json", exclude_none=True), ())
        return rows


def _display_path(path: PathKey) -> str:
    return ".".join(path)


def config_hash(stack: Stack) -> str:
    """A content hash of the effective stack: equal configs hash equal, whatever their files."""
    payload = json.dumps(stack.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


#: Unit fields added after hxp 0.1.0, with their defaults: a field at its default stays out of
#: the unit hash, so upgrading hxp does not make every deployed unit look changed (and
#: blue-green replace a whole fleet). Set to anything else, it counts like any field.
HASH_NEUTRAL_DEFAULTS: dict[str, Any] = {
    "simulator_gpus": 0,
    "pin_kv_cache_memory": True,
    "hf_config": None,
    "sleep_mode": False,
}
#: Unit fields that say how a deploy treats the unit, not what runs: never in the unit hash
#: (changing a unit's bake period alone restarts nothing).
DEPLOY_POLICY_FIELDS = ("bake",)


def unit_config_hash(stack: Stack, unit: str) -> str:
    """The hash of one unit's spec (plus its host), for drift detection and no-op reasons."""
    spec = stack.unit(unit)
    fields = spec.model_dump(mode="json")
    for name, default in HASH_NEUTRAL_DEFAULTS.items():
        if name in fields and fields[name] == default:
            del fields[name]
    if isinstance(fields.get("health"), dict):  # read by the health sweep only: no restart
        fields["health"].pop("stall_window", None)
    # The autoscaler's settings change no process, and the replica count it owns must not
    # make every replica look changed (hxp.autoscale: apply keeps the autoscaler's count).
    if fields.pop("autoscale", None) is not None:
        fields.pop("replicas", None)
    for name in DEPLOY_POLICY_FIELDS:
        fields.pop(name, None)
    fields.pop("part_of", None)  # which declared unit a part belongs to changes no process
    payload = {
        "unit": fields,
        "host": stack.hosts[spec.host].model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _pydantic_issues(
    exc: ValidationError, prov: Mapping[PathKey, Location], fallback: Location | None
) -> list[Issue]:
    issues = []
    for err in exc.errors(include_url=False):
        loc_path = tuple(str(p) for p in err["loc"] if not _is_union_tag(p))
        msg = str(err["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required field missing"
        # Model-level validators report "path: message" lines of their own.
        lines = msg.split("\n")
        for line in lines:
            m = re.match(r"^([a-z][\w.\-]*): (.*)$", line)
            if m and not loc_path:
                p = tuple(m.group(1).split("."))
                issues.append(Issue(m.group(2), m.group(1), _nearest(prov, p) or fallback))
            else:
                shown = line
                if err["type"] not in ("extra_forbidden", "missing") and "input" in err:
                    value = err["input"]
                    if isinstance(value, str | int | float) and repr(value)[:60] not in shown:
                        shown = f"{line} (got {value!r:.60})"
                issues.append(
                    Issue(shown, format_path(loc_path), _nearest(prov, loc_path) or fallback)
                )
    return issues


def _is_union_tag(part: Any) -> bool:
    # pydantic inserts union member names such as 'literal['auto']', 'list[...]' or
    # 'constrained-int', and '[key]' for dict keys, in locs. Match only those shapes, so that
    # an operator's key that merely contains '[' (or an escape sequence) is still shown.
    if not isinstance(part, str):
        return False
    return (
        part == "[key]"
        or re.fullmatch(r"[a-z][a-z-]*\[.*\]", part, re.DOTALL) is not None
        or part in ("int", "str", "float", "bool", "constrained-int", "constrained-float")
    )


def _locate_parts(data: Data, prov: dict[PathKey, Location]) -> None:
    """The parts of a unit declared with `hosts:` (hxp.spec.spread_hosts) are where the unit
    is: a problem in part `chat-m1` points at the lines of `chat`."""
    for kind in ("services", "models"):
        units = data.get(kind)
        if not isinstance(units, dict):
            continue
        for name, unit in units.items():
            hosts = unit.get("hosts") if isinstance(unit, dict) else None
            if not isinstance(hosts, list):
                continue
            declared = (kind, name)
            for host in hosts:
                part = (kind, part_name(name, host))
                prov.update(
                    {part + key[2:]: loc for key, loc in list(prov.items()) if key[:2] == declared}
                )


def build_config(
    documents: Sequence[Document],
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> EffectiveConfig:
    """Merge documents, environment and explicit overrides into one validated stack."""
    prov: dict[PathKey, Location] = {}
    data: Data = {}
    notices: list[str] = []
    for doc in documents:
        data = _merge(data, doc.data, prov, (), doc, (), Location(doc.source))
        notices.extend(doc.notices)
    for source, path, value in [*env_overrides(environ or {}), *set_overrides(overrides)]:
        data = _set_path(data, path, value, source, prov)
    data.setdefault("version", CURRENT_VERSION)
    _locate_parts(data, prov)
    try:
        stack = Stack.model_validate(data)
    except ValidationError as exc:
        fallback = Location(", ".join(d.source for d in documents)) if documents else None
        raise StackValidationError(_pydantic_issues(exc, prov, fallback)) from None
    return EffectiveConfig(
        stack=stack,
        data=data,
        provenance=prov,
        sources=tuple(d.source for d in documents),
        notices=tuple(notices),
    )


def load_config(
    files: Sequence[str | Path],
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> EffectiveConfig:
    """Read stack files (later wins), apply HXP__ environment and `--set` overrides, validate."""
    if not files:
        raise StackFileError("no stack file given (use -f FILE)")
    return build_config([read_document(f) for f in files], environ, overrides)


_LOADED: dict[tuple[Any, ...], EffectiveConfig] = {}
_LOADED_MAX = 8


def load_config_cached(
    files: Sequence[str | Path],
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> EffectiveConfig:
    """load_config, remembered by the files' contents, the HXP__ variables and the overrides.

    One process often loads the same stack several times: the CLI checks it, then the flow
    run's name and its load task read it again; a sweep reads it every minute. Parsing and
    validating a 50-unit file costs ~0.2 s, a 1,000-unit one ~0.7 s; a changed file is read
    again. The EffectiveConfig handed out is shared: treat it as read-only (it is frozen).
    """
    try:
        digests = tuple(hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files)
    except OSError:
        return load_config(files, environ, overrides)  # says which file, and why
    env = tuple((k, v) for k, v in sorted((environ or {}).items()) if k.startswith(ENV_PREFIX))
    key = (tuple(str(f) for f in files), digests, env, tuple(overrides))
    hit = _LOADED.get(key)
    if hit is None:
        hit = load_config(files, environ, overrides)
        if len(_LOADED) >= _LOADED_MAX:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = hit
    return hit


def dump_stack_yaml(data: Data) -> str:
    """Serialise plain stack data as YAML in the file's key order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


# --------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class ConfigSnapshot:
    """An applied configuration, as the store keeps it for history and rollback."""

    stack: str
    content_hash: str
    config: Data
    sources: tuple[str, ...]
    created_at: str

    @classmethod
    def of(cls, effective: EffectiveConfig, now: datetime | None = None) -> ConfigSnapshot:
        return cls(
            stack=effective.stack.stack,
            content_hash=effective.content_hash,
            config=effective.stack.model_dump(mode="json"),
            sources=effective.sources,
            created_at=(now or datetime.now(UTC)).isoformat(),
        )

    def restore(self) -> Stack:
        """The stack exactly as it was applied."""
        return Stack.model_validate(self.config)


class SnapshotSink(Protocol):
    """Where applied configs go (the store implements it)."""

    def save_snapshot(self, snapshot: ConfigSnapshot) -> None: ...

    def latest_snapshot(self, stack: str) -> ConfigSnapshot | None: ...
