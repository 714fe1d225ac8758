"""Typed configs from YAML files and dotted command-line overrides (one loader for every subcommand).

    config = load_config(SFTConfig, "examples/sft/quickstart.yaml", ["optim.lr=1e-5", "avar.layers=[8,9]"])

A config is a tree of frozen dataclasses whose fields are documented and validated in ``__post_init__``.
The YAML file is a minimal diff over those defaults. Overrides are ``dotted.key=value`` with the value read
as YAML (``1e-5``, ``true``, ``[8, 9]``, ``null``). Any unknown key, in the file or an override, is an
error naming the key and the allowed ones — never silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import TypeVar

import yaml

__all__ = ["load_config", "config_from_dict", "config_to_dict", "apply_overrides", "read_config_file",
           "flag_overrides"]

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads ``1e-5`` as a string (its floats need a dot); learning rates are written that way,
    so numbers with an exponent and no dot are floats here too."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _dataclass_type(annotation) -> type | None:
    """The dataclass in an annotation (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def config_from_dict(cls: type[T], values: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, recursing into dataclass-typed fields."""
    if not isinstance(values, dict):
        raise ValueError(f"config section {where or '<root>'!r} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                         f"allowed in {where.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        nested = _dataclass_type(hints[name])
        if nested is not None and isinstance(value, dict):
            value = config_from_dict(nested, value, f"{where}{name}.")
        kwargs[name] = value
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"config key(s) {', '.join(where + m for m in missing)} must be set")
    return cls(**kwargs)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """A copy of ``values`` with each ``a.b.c=value`` applied (value parsed as YAML)."""
    import copy

    values = copy.deepcopy(values)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {override!r} is not of the form dotted.key=value")
        *parents, leaf = key.strip().split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {part!r} is not a section")
        node[leaf] = _load_yaml(raw)
    return values


def read_config_file(path: str | Path | None) -> dict:
    """The mapping in the YAML file at ``path`` ({} for None); ValueError when the file is missing."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    return _load_yaml(path.read_text()) or {}


def flag_overrides(args, flag_keys: dict[str, str]) -> list[str]:
    """``key=value`` overrides (JSON values) for the command-line flags that were given: ``flag_keys`` maps an
    argparse destination to its dotted config key; flags left at None are skipped."""
    import json

    return [f"{key}={json.dumps(getattr(args, dest))}" for dest, key in flag_keys.items()
            if getattr(args, dest) is not None]


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path`` (if any), then by ``overrides``."""
    return config_from_dict(cls, apply_overrides(read_config_file(path), list(overrides)))


def config_to_dict(config) -> dict:
    """The resolved config as plain data (for run directories and logs)."""
    return {f.name: (config_to_dict(v) if dataclasses.is_dataclass(v := getattr(config, f.name)) else
                     list(v) if isinstance(v, tuple) else v)
            for f in dataclasses.fields(config) if not f.name.startswith("_")}
