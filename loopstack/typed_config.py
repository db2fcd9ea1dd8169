"""Typed configs from plain dicts: dataclasses in, one-line errors out.

A config section is a dataclass whose fields are declared with `param(...)` (a default plus optional
bounds and a help text). `build(cls, data, origin)` turns a nested dict (from YAML) into the
dataclass tree, checking every key and value; `override(cfg, "a.b=value")` applies one `--set`.
Errors are `ConfigError`s that name the file or flag, the dotted key, the value and what was expected.
No torch here: the CLI imports this for `--help` and `config show`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from loopstack.errors import ConfigError

_MISSING = dataclasses.MISSING


def param(default: Any = _MISSING, *, min: float | None = None, max: float | None = None,
          help: str = "", default_factory: Any = _MISSING) -> Any:
    """A config field with an optional range check and a one-line description."""
    meta = {"min": min, "max": max, "help": help}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return inner + (" or null" if len(args) < len(get_args(tp)) else "")
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any, key: str, origin: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float only)."""
    def bad() -> ConfigError:
        return ConfigError(f"{origin}: {key} = {value!r}: expected {_type_name(tp)}")

    org = get_origin(tp)
    if tp is Any:
        return value
    if org is Literal:
        if value in get_args(tp):
            return value
        raise bad()
    if org in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, origin)
            except ConfigError:
                pass
        raise bad()
    if org is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad()
        (item,) = get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if org is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: {key} = {value!r}: expected a mapping of {tp.__name__} fields")
        return build(tp, value, origin, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise bad()


def _check_range(f: dataclasses.Field, value: Any, key: str, origin: str) -> None:
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if lo is not None and value < lo:
        raise ConfigError(f"{origin}: {key} = {value!r}: expected a value >= {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{origin}: {key} = {value!r}: expected a value <= {hi}")


def _unknown_key(cls: type, name: str, origin: str, prefix: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"
    return ConfigError(f"{origin}: unknown key '{prefix}{name}'{hint}")


def build(cls: type, data: dict | None, origin: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking keys, types and ranges."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise _unknown_key(cls, str(name), origin, prefix)
        key = prefix + name
        kwargs[name] = _coerce(hints[name], value, key, origin)
        _check_range(fields[name], kwargs[name], key, origin)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as err:  # sections raise without knowing the file: add it
            raise ConfigError(f"{origin}: {prefix}{err}") from None
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """`'model.loops=8'` -> `('model.loops', 8)`; the value is read as YAML (so 3e-4, true, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set model.loops=8")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating mappings on the way."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = value


def to_dict(cfg: Any) -> Any:
    """The dataclass tree as plain dicts/lists (what `config show` prints and runs save)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every leaf field: documentation for `config keys`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, _type_name(tp), to_dict(default), f.metadata.get("help", "")))
    return rows
