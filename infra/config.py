"""Typed configuration machinery shared by every stage.

Configs are plain dataclasses whose fields are declared with :func:`field` (a default plus a one-line doc).
Precedence is explicit: dataclass defaults < YAML recipe < ``section.key=value`` overrides.
Unknown keys and ill-typed values are errors that name the offending dotted path.

NOTE: this module knows nothing about diffusion models; it is imported by models-free code (infra, workers,
pipelines) and must stay free of import-time side effects.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, ill-typed or out of range. The message names the field."""


def field(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None) -> Any:
    """A documented dataclass field. Use ``factory=`` for mutable defaults (lists, nested configs)."""
    md = {"doc": doc}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def require(cond: bool, name: str, message: str) -> None:
    """Raise ConfigError('<name>: <message>') unless ``cond``; used in ``__post_init__`` validators."""
    if not cond:
        raise ConfigError(f"{name}: {message}")


# ----------------------------------------------------------------------------------------------- conversion
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` (from YAML/JSON/CLI) to the annotated type ``tp`` or raise ConfigError naming ``path``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool) and not any(a is value for a in allowed):
            # YAML 1.1 reads a bare on/off/yes/no/true/false as a boolean, in recipes and --key=value alike
            words = [w for w in (("on", "yes", "true") if value else ("off", "no", "false")) if w in allowed]
            value = words[0] if words else value
        if value not in allowed:
            raise ConfigError(f"{path}: must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad types raise ConfigError naming the key."""
    data = dict(data or {})
    links = getattr(cls, "derived_fields", None)
    if links:  # fields another part of the system fills in (e.g. stage links of a workflow): placeholders if absent
        data = _with_defaults(data, links)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)} "
                          f"(valid keys of {cls.__name__}: {', '.join(sorted(known))})")
    kwargs = {name: _coerce(val, hints[name], f"{path}.{name}" if path else name) for name, val in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # ConfigError, or a torch-side config (models/) that reports "<field>: <problem>"
        raise ConfigError(f"{path}.{e}" if path and not str(e).startswith(path) else str(e)) from None


def _with_defaults(data: dict, dotted: dict[str, Any]) -> dict:
    out = json.loads(json.dumps(data))
    for key, value in dotted.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault(last, value)
    return out


def to_dict(cfg: Any) -> dict:
    """Plain JSON-able dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(cfg: Any, length: int = 16) -> str:
    """Stable content hash of a config (canonical JSON, sorted keys)."""
    blob = json.dumps(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def section_type(tp: Any) -> type | None:
    """The dataclass a field holds (also through ``Optional[...]``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def field_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """``{"section.key": "doc"}`` for every (nested) field; used by the CLI help and the docs test."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        sub = section_type(hints[f.name])
        if sub is not None:
            out.update(field_docs(sub, name + "."))
        else:
            out[name] = f.metadata.get("doc", "")
    return out


# ------------------------------------------------------------------------------------ YAML and overrides
def load_yaml(path: str | Path) -> dict:
    """Read a YAML recipe; a missing file or a non-mapping top level is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (value parsed as YAML) onto a nested dict, returning a new dict."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.lstrip("-").partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Any:
    """defaults < YAML recipe (``path``) < overrides -> validated instance of ``cls``."""
    data = dict(base or {})
    if path:
        data.update(load_yaml(path))
    return from_dict(cls, apply_overrides(data, overrides or []))
