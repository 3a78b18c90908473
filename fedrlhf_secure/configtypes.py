"""Strict conversion of plain mappings (parsed YAML) into typed dataclasses.

Validation happens once, at the boundary: an unknown key, a wrong type or a value a dataclass's
``__post_init__`` rejects becomes a :class:`ConfigError` that names the file and the dotted key,
and the code inside trusts the resulting objects.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from .errors import InputError  # noqa: E402  (re-exported: the family lives in errors.py)


class ConfigError(InputError):
    """A configuration problem, with the file and the dotted key it concerns."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        where = ": ".join(p for p in (source, key) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.source = source
        self.key = key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, *, key: str, source: str | None) -> Any:
    """Convert ``value`` to type ``tp`` or raise a :class:`ConfigError` naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"expected one of {_type_name(tp)}, got {value!r}", source=source, key=key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, key=key, source=source)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:  # an optional value: the one real type's message is the specific one
            raise errors[0]
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", source=source, key=key)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, key=key, source=source)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", source=source, key=key)
        args = typing.get_args(tp)
        item_t = args[0] if args else Any
        items = [convert(item_t, v, key=f"{key}[{i}]", source=source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {value!r}", source=source, key=key)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true or false, got {value!r}", source=source, key=key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"expected an integer, got {value!r}", source=source, key=key)
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"expected a number, got {value!r}", source=source, key=key)
        if not math.isfinite(number):
            # an infinite ε would calibrate noise forever; no setting of this project means "unbounded"
            raise ConfigError(f"expected a finite number, got {value!r}", source=source, key=key)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"expected a string, got {value!r}", source=source, key=key)
    raise ConfigError(f"unsupported config type {tp!r}", source=source, key=key)


def from_mapping(cls: type, data: Any, *, key: str = "", source: str | None = None) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types are errors."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping for {cls.__name__}, got {data!r}", source=source, key=key or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        bad = ", ".join(f"{key + '.' if key else ''}{u}" for u in unknown)
        raise ConfigError(f"unknown key {bad}; known keys here: {', '.join(sorted(fields))}", source=source)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = convert(hints[name], value, key=f"{key}.{name}" if key else name, source=source)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc), source=source, key=key or None) from exc


def to_mapping(obj: Any) -> Any:
    """The inverse of :func:`from_mapping`: plain dicts/lists suitable for YAML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj
