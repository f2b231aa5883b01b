"""Mapping -> typed dataclass: every key checked against the dataclass's fields and types, so a
mistake fails with one line that names the key. Knows nothing of the run config's contents."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Sequence

import yaml


class ConfigError(ValueError):
    """A configuration problem a person can fix; the message names the key."""


def apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"Override '{item}' must look like 'section.key=value' (e.g. train.lr=1e-4).")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override '{item}': '{part}' is not a section.")
    node[parts[-1]] = yaml.safe_load(value)


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, naming the offending key on any mismatch."""
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'the config'}' must be a mapping of keys, got {raw!r}.")
    if "from_dict" in vars(cls):  # a dataclass that parses part of its mapping itself
        return cls.from_dict(raw, prefix)
    return fields_from_dict(cls, raw, prefix)


def fields_from_dict(cls: type, raw: dict[str, Any], prefix: str, extra: Sequence[str] = ()) -> Any:
    """`from_dict` for the dataclass's init fields of a simple type; `extra`: further keys its own
    `from_dict` handles (named in the unknown-key message only)."""
    where = prefix.rstrip(".") or "the config"
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("config_key", True)]
    names += list(extra)
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"Unknown config key '{prefix}{key}'.{hint} Valid keys under {where}: {', '.join(names)}."
            )
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, dict):  # e.g. Union[str, DataFile]: a mapping picks the dataclass
            inner = [a for a in inner if dataclasses.is_dataclass(a)] or inner
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no / off / yes / on as a boolean
            words = [a for a in args if isinstance(a, str) and yaml.safe_load(a) is value]
            if len(words) == 1:
                return words[0]
        if value not in args:
            raise ConfigError(f"Config key '{key}' must be one of {list(args)}, got {value!r}.")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"Config key '{key}' must be a list, got {value!r}.")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"Config key '{key}' must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"Config key '{key}' must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML reads `1e-4` (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"Config key '{key}' must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"Config key '{key}' must be a string, got {value!r}.")
        return value
    raise ConfigError(f"Config key '{key}' has an unsupported type {tp}.")  # pragma: no cover
