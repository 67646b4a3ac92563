"""Config loading shared by the edge and cloud services.

A service describes its config as a frozen dataclass whose fields are either settings
(``str``, ``int``, ``float``, ``bool``, ``X | None``, ``Literal[...]`` or ``tuple[X, ...]``)
or sections: fields whose type is itself a frozen dataclass of settings (one level deep).
``load_config`` reads a TOML file into it, then lets an environment variable override every
key: ``PREFIX_KEY`` for top-level keys and ``PREFIX_SECTION_KEY`` for keys in a section
(``FYNLO_EDGE_SYNC_BATCH_MAX_CHANGES`` sets ``[sync] batch_max_changes``).

Environment values are text and are converted to the field's type: booleans accept
``1/0/true/false/yes/no/on/off``; for ``X | None`` the empty string means ``None``; tuples
are comma-separated. Keys missing from both take the dataclass defaults. Unknown TOML keys,
values of the wrong type and values the dataclass itself rejects (``ValueError`` in
``__post_init__``) raise ``ConfigError`` naming the dotted key.

Every setting should carry ``field(metadata={"doc": "..."})``; ``config_keys`` lists them
with type, default and doc so a test can fail when one is undocumented.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, Union

__all__ = [
    "REQUIRED",
    "ConfigError",
    "ConfigKey",
    "config_keys",
    "env_var_name",
    "load_config",
]

T = TypeVar("T")

REQUIRED: Any = dataclasses.MISSING
"""The ``default`` that ``config_keys`` reports for a key without one."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_SCALARS: tuple[type, ...] = (str, int, float, bool)


class ConfigError(ValueError):
    """A config key is unknown, missing or has a value that cannot be used."""

    code = "config_invalid"

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key {key!r}: {message}")
        self.key = key
        self.message = message


class ConfigKey(NamedTuple):
    """One documented setting: dotted key, type name, default and doc."""

    key: str
    type_name: str
    default: Any
    doc: str


# -- type handling ------------------------------------------------------------------------


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError:
        # Annotations naming classes local to a function cannot be resolved by name; fall back
        # to whatever objects the dataclass fields hold.
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _optional_inner(tp: Any) -> Any | None:
    """Return ``X`` for ``X | None``, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _check_supported(tp: Any, where: str) -> None:
    inner = _optional_inner(tp)
    if inner is not None:
        tp = inner
    if tp in _SCALARS:
        return
    origin = typing.get_origin(tp)
    if origin is Literal and all(isinstance(a, str | int) for a in typing.get_args(tp)):
        return
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in _SCALARS:
            return
    raise TypeError(f"config field {where}: unsupported type {tp!r}")


def _type_name(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} | None"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"tuple[{_type_name(typing.get_args(tp)[0])}, ...]"
    return getattr(tp, "__name__", repr(tp))


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _from_toml(key: str, tp: Any, value: object) -> object:
    """Check a TOML value against the field type (TOML values are already typed)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return _from_toml(key, inner, value)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool):
            raise ConfigError(key, f"expected one of {choices!r}, got {_describe(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected an array, got {_describe(value)}")
        item = typing.get_args(tp)[0]
        return tuple(_from_toml(f"{key}[{i}]", item, v) for i, v in enumerate(value))
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(key, f"expected {_type_name(tp)}, got {_describe(value)}")


def _from_text(key: str, tp: Any, text: str) -> object:
    """Convert an environment variable's text to the field type."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if text == "" else _from_text(key, inner, text)
    origin = typing.get_origin(tp)
    if origin is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == text.strip():
                return choice
        raise ConfigError(key, f"expected one of {typing.get_args(tp)!r}, got {text!r}")
    if origin is tuple:
        item = typing.get_args(tp)[0]
        parts = [p.strip() for p in text.split(",")] if text.strip() else []
        return tuple(_from_text(f"{key}[{i}]", item, p) for i, p in enumerate(parts))
    if tp is bool:
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ConfigError(key, f"expected a boolean (1/0/true/false/yes/no), got {text!r}")
    if tp is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ConfigError(key, f"expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text.strip())
        except ValueError:
            raise ConfigError(key, f"expected a number, got {text!r}") from None
    return text


# -- public API ---------------------------------------------------------------------------


def env_var_name(env_prefix: str, dotted_key: str) -> str:
    """Name of the environment variable overriding ``dotted_key`` (``sync.x`` -> ``P_SYNC_X``)."""
    parts = [env_prefix.rstrip("_")] if env_prefix.rstrip("_") else []
    parts += dotted_key.split(".")
    return "_".join(parts).upper()


def _build(
    cls: type[T],
    table: Mapping[str, object],
    env_prefix: str,
    environ: Mapping[str, str],
    section: str | None,
) -> T:
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    dotted = (lambda name: f"{section}.{name}") if section else (lambda name: name)

    for name in table:
        if name not in fields:
            known = ", ".join(sorted(fields)) or "(none)"
            raise ConfigError(dotted(name), f"unknown key; known keys here: {known}")

    values: dict[str, object] = {}
    for name, fld in fields.items():
        tp = hints[name]
        key = dotted(name)
        if section is None and _is_section(tp):
            sub = table.get(name, {})
            if not isinstance(sub, dict):
                raise ConfigError(key, f"expected a [{name}] table, got {_describe(sub)}")
            values[name] = _build(tp, sub, env_prefix, environ, name)
            continue
        _check_supported(tp, f"{cls.__name__}.{name}")
        env_name = env_var_name(env_prefix, key)
        if env_name in environ:
            try:
                values[name] = _from_text(key, tp, environ[env_name])
            except ConfigError as exc:
                raise ConfigError(exc.key, f"{exc.message} (from ${env_name})") from None
        elif name in table:
            values[name] = _from_toml(key, tp, table[name])
        elif fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
            raise ConfigError(key, f"required key missing (set it in the file or ${env_name})")

    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(section or "<config>", str(exc)) from exc


def load_config(
    cls: type[T],
    path: str | Path | None,
    env_prefix: str,
    *,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Read ``path`` (TOML, optional) into dataclass ``cls``, then apply env overrides."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    table: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(str(path), "config file not found") from None
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read config file: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"invalid TOML: {exc}") from None
    return _build(cls, table, env_prefix, os.environ if environ is None else environ, None)


def config_keys(cls: type) -> list[ConfigKey]:
    """List every setting of ``cls`` as (dotted key, type name, default, doc)."""
    out: list[ConfigKey] = []
    hints = _type_hints(cls)
    for fld in dataclasses.fields(cls):
        tp = hints[fld.name]
        if _is_section(tp):
            sub_hints = _type_hints(tp)
            for sub in dataclasses.fields(tp):
                _check_supported(sub_hints[sub.name], f"{tp.__name__}.{sub.name}")
                out.append(_key(f"{fld.name}.{sub.name}", sub_hints[sub.name], sub))
        else:
            _check_supported(tp, f"{cls.__name__}.{fld.name}")
            out.append(_key(fld.name, tp, fld))
    return out


def _key(dotted: str, tp: Any, fld: dataclasses.Field[Any]) -> ConfigKey:
    if fld.default is not dataclasses.MISSING:
        default: Any = fld.default
    elif fld.default_factory is not dataclasses.MISSING:
        default = fld.default_factory()
    else:
        default = REQUIRED
    doc = str(fld.metadata.get("doc", "")).strip()
    return ConfigKey(dotted, _type_name(tp), default, doc)
