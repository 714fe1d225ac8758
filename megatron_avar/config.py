"""Typed configs from YAML files and dotted command-line overrides (one loader for every subcommand).

    config = load_config(SFTConfig, "examples/sft/quickstart.yaml", ["optim.lr=1e-5", "avar.layers=[8,9]"])

A config is a tree of frozen dataclasses whose fields are documented and validated in ``__post_init__``.
The YAML file is a minimal diff over those defaults: a section that sets some of its keys keeps the defaults
of the others, including a field's own default section (``describe.teacher`` defaults to a teacher with
temperature 0.2; ``describe: {teacher: {model: m}}`` keeps that 0.2). Overrides are ``dotted.key=value`` with
the value read as YAML (``1e-5``, ``true``, ``[8, 9]``, ``null``); a number in the key indexes a list that is
already set (``sources.0.limit=100``). Any unknown key, in the file or an override, is an error naming the
key and the allowed ones — never silently ignored. Every value is checked against its field's type hint
before the dataclass validates it, so a wrong one is a one-line ValueError naming the key (list items by
index, as overrides write them), the value, what the field takes and where the value was set (``FILE:LINE``
or the override), e.g.

    train.steps=2.5 (override train.steps=2.5): expected an integer, got a non-integral number
    sources.0.limit="all" (run.yaml:4): expected an integer or null, got a string
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import TypeVar

import yaml

__all__ = ["load_config", "config_from_dict", "config_to_dict", "flat_config", "apply_overrides",
           "read_config_file", "flag_overrides", "refuse_unused_setting", "check_seed", "SEED_LIMIT", "VLLM_SEED_LIMIT",
           "ConfigValues"]

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads ``1e-5`` as a string (its floats need a dot); learning rates are written that way,
    so numbers with an exponent and no dot are floats here too. A key written twice in one mapping is an error
    (PyYAML keeps the last silently: a second ``train:`` section would drop the whole first one)."""

    def construct_mapping(self, node, deep=False):
        first: dict[object, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} repeated (first at line {first[key]}); keep one of them",
                    key_node.start_mark)
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_error(error: yaml.YAMLError) -> tuple[str, str]:
    """(``LINE:COLUMN``, 1-based, or "" when PyYAML gives no place; the problem) of a YAML error."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        problem += f" ({context} at line {context_mark.line + 1})"
    return (f"{mark.line + 1}:{mark.column + 1}" if mark is not None else ""), problem


class ConfigValues(dict):
    """Raw config values (nested dicts, as YAML gives them) plus ``origins``: where each dotted key was set,
    ``FILE:LINE`` or ``override KEY=VALUE``. :func:`read_config_file` and :func:`apply_overrides` fill it in and
    :func:`config_from_dict` names it in errors, so a wrong value says where to fix it."""

    def __init__(self, values=(), origins: dict[str, str] | None = None):
        super().__init__(values)
        self.origins = dict(origins or {})


def _origin(origins: dict[str, str], key: str) -> str | None:
    """Where ``key`` was set: its own entry, else where a key inside it was (``train.steps.x=1`` made
    ``train.steps`` a mapping), else its nearest section's (``train=5`` sets ``train.steps`` too)."""
    if key in origins:
        return origins[key]
    inside = [o for k, o in origins.items() if k.startswith(key + ".")]
    if inside:
        return inside[-1]
    while "." in key:
        key = key.rpartition(".")[0]
        if key in origins:
            return origins[key]
    return None


def _yaml_lines(node, prefix: str, path, origins: dict[str, str]) -> None:
    """Record ``FILE:LINE`` of every mapping key and list item under ``node``, nested ones too (list items by
    index: ``sources.0``, ``sources.0.path``)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                origins[prefix + key_node.value] = f"{path}:{key_node.start_mark.line + 1}"
                _yaml_lines(value_node, f"{prefix}{key_node.value}.", path, origins)
    elif isinstance(node, yaml.SequenceNode):
        for index, item_node in enumerate(node.value):
            origins[f"{prefix}{index}"] = f"{path}:{item_node.start_mark.line + 1}"
            _yaml_lines(item_node, f"{prefix}{index}.", path, origins)


class _Mismatch(Exception):
    """A value that does not fit a type hint (turned into a ValueError naming the field by the caller)."""


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _describe(hint, plural: bool = False) -> str:
    """What a type hint accepts, in the words of a YAML user: "an integer", "a list of integers", ..."""
    if _is_union(hint):
        members = sorted(typing.get_args(hint), key=lambda m: m is type(None))  # "or null" last
        return " or ".join(_describe(m, plural) for m in members)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return ("one of " if not plural else "values among ") + ", ".join(json.dumps(a) for a in args)
    if origin in (list, tuple) or hint in (list, tuple):
        if not args:
            return "lists" if plural else "a list"
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            inner = f"{len(args)} {_describe(args[0], True)}" if len(set(args)) == 1 else \
                "[" + ", ".join(_describe(a) for a in args) + "]"
        else:
            inner = _describe(args[0], True)
        return ("lists of " if plural else "a list of ") + inner
    if origin is dict or hint is dict:
        if not args:
            return "mappings" if plural else "a mapping"
        inner = f"{_describe(args[0], True)} to {_describe(args[1], True)}"
        return ("mappings of " if plural else "a mapping of ") + inner
    if dataclasses.is_dataclass(hint):
        keys = ", ".join(sorted(f.name for f in dataclasses.fields(hint) if f.init and not f.name.startswith("_")))
        return f"sections (mappings of {keys})" if plural else f"a section (a mapping of {keys})"
    words = {bool: ("true or false", "true/false values"), int: ("an integer", "integers"),
             float: ("a number", "numbers"), str: ("a string", "strings"), type(None): ("null", "nulls")}
    if hint in words:
        return words[hint][plural]
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return "paths" if plural else "a path"
    name = getattr(hint, "__name__", str(hint))
    return f"{name} values" if plural else f"a {name}"


def _accepts_int(hint) -> bool:
    return hint is int or _is_union(hint) and any(_accepts_int(m) for m in typing.get_args(hint))


def _got(value, hint) -> str:
    """What ``value`` is, in the words of :func:`_describe`."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, float):
        return "a non-integral number" if _accepts_int(hint) and not value.is_integer() else "a number"
    for kind, words in ((int, "an integer"), (str, "a string"), (type(None), "null"), (list, "a list"),
                        (tuple, "a list"), (dict, "a mapping")):
        if isinstance(value, kind):
            return words
    return f"a {type(value).__name__}"


def _show(value) -> str:
    """``value`` as the user would write it (JSON is YAML), cut short when long."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _convert(hint, value, key: str, origins: dict[str, str], default=None):
    """``value`` checked against ``hint``; raises _Mismatch when it does not fit. The conversions are the exact
    ones only: an int where a float is wanted, an integral float (YAML's ``1e3``) where an int is, a string
    where a path is. true/false is never a number: bool subclasses int in Python, but ``steps: true`` is a
    mistake, not 1 (YAML 1.1 also reads yes/no/on/off as booleans). ``default``: the field's default value; a
    mapping given for a section updates it when it is a section too (keys not given keep its values)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        for member in args:
            try:
                return _convert(member, value, key, origins, default)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is typing.Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch
    if hint is type(None):
        if value is None:
            return value
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str:
        # a number where a string is wanted is refused, not stringified: YAML 1.1 has already changed it
        # (01:00:00 is read as 3600, 0123 as 83), so the fix is quoting it
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(hint, type) and issubclass(hint, PurePath):
        if isinstance(value, (str, PurePath)):
            return hint(value)
        raise _Mismatch
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return _from_dict(hint, value, f"{key}.", origins, default if isinstance(default, hint) else None)
        raise _Mismatch
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if not args:
            return value
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch
            items = [_convert(a, v, f"{key}.{i}", origins) for i, (a, v) in enumerate(zip(args, value))]
        else:
            items = [_convert(args[0], v, f"{key}.{i}", origins) for i, v in enumerate(value)]
        return type(value)(items)  # a list stays a list: __post_init__ methods decide about tuples
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        if not args:
            return value
        return {_convert(args[0], k, key, origins): _convert(args[1], v, f"{key}.{k}", origins)
                for k, v in value.items()}
    if isinstance(hint, type) and origin is None and hint is not typing.Any:
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value  # a hint this loader does not read (Any, Callable, ...): the dataclass validates it


def _where(key: str, origins: dict[str, str]) -> str:
    origin = _origin(origins, key)
    return f" ({origin})" if origin else ""


def _section_default(field: dataclasses.Field):
    """The default of a section-typed field as an instance (``default_factory`` called), else None."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return None
    return value if dataclasses.is_dataclass(value) and not isinstance(value, type) else None


def _from_dict(cls: type[T], values: dict, where: str, origins: dict[str, str], base=None) -> T:
    """``cls`` from ``values``; ``base``: an instance of ``cls`` whose values the keys not given keep (a field's
    default section, e.g. ``DescribeConfig.teacher``), instead of the class defaults."""
    if base is not None:
        cls = type(base)  # a subclass instance as the default keeps its own fields and defaults
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass: configs are dataclasses")
    if not isinstance(values, dict):
        section = where.rstrip(".")
        raise ValueError(f"{section or 'the config'}={_show(values)}{_where(section, origins)}: expected "
                         f"{_describe(cls)}, got {_got(values, cls)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    unknown = sorted(str(k) for k in set(values) - set(fields))  # str: YAML keys may be numbers (`2: x`)
    if unknown:
        located = [f"{where}{k}: {o}" for k in unknown if (o := _origin(origins, where + k))]
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                         f"allowed in {where.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}"
                         + (f" ({'; '.join(located)})" if located else ""))
    kwargs = {}
    for name, value in values.items():
        key, hint = where + name, hints[name]
        if value is None and dataclasses.is_dataclass(hint):
            value = {}  # a section left empty in YAML (`train:` with its keys commented out) keeps its defaults
        default = _section_default(fields[name]) if isinstance(value, dict) else None
        try:
            kwargs[name] = _convert(hint, value, key, origins, default)
        except _Mismatch:
            raise ValueError(f"{key}={_show(value)}{_where(key, origins)}: expected {_describe(hint)}, "
                             f"got {_got(value, hint)}") from None
    if base is not None:
        kwargs.update({f.name: getattr(base, f.name) for f in dataclasses.fields(base)
                       if f.init and f.name not in kwargs})
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"config key(s) {', '.join(where + m for m in missing)} must be set")
    try:
        return cls(**kwargs)
    except ValueError as error:
        # the section's own validation names fields, not where they were set: add that for the fields it names
        message = str(error)
        located = [f"{where}{n}: {o}" for n in values if (o := _origin(origins, where + n))
                   and re.search(rf"(?<![\w.]){re.escape(where + n)}(?![\w])", message)]
        if not located:
            raise
        raise ValueError(f"{message} ({'; '.join(located)})") from error


def config_from_dict(cls: type[T], values: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, recursing into dataclass-typed fields. Every value is
    checked against its field's type hint first (ValueError naming the dotted key, the value, what the field
    takes and, for :class:`ConfigValues`, where the value was set), so ``__post_init__`` sees the declared types."""
    return _from_dict(cls, values, where, getattr(values, "origins", {}))


def _list_index(items: list, part: str, override: str, name: str) -> int:
    """``part`` of an override key as an index into the list ``items`` set at ``name``; ValueError otherwise."""
    if part.isdigit() and int(part) < len(items):
        return int(part)
    where = f"indexes from 0 to {len(items) - 1}" if items else "no index: it is empty"
    raise ValueError(f"override {override!r}: {name} is a list of {len(items)} item(s), so {part!r} is not one of "
                     f"its items ({where}); set the whole list instead ({name}=[...])")


def _override_child(node, part: str, next_part: str, override: str, name: str):
    """The section or list at ``part`` of ``node`` (a mapping or a list; created as an empty section when absent)
    that the rest of an override's key walks into; ``name``: the dotted key of ``part``."""
    if isinstance(node, list):
        child = node[_list_index(node, part, override, name.rpartition(".")[0])]
    else:
        child = node.get(part)
        if child is None:  # absent, or a section left empty in YAML (`train:`)
            if next_part.isdigit():
                raise ValueError(f"override {override!r}: {name} is not set here (its default applies), so it has "
                                 f"no item {next_part}; set the whole list instead ({name}=[...])")
            child = node[part] = {}
    if not isinstance(child, (dict, list)):
        raise ValueError(f"override {override!r}: {name} is not a section or a list")
    return child


def apply_overrides(values: dict, overrides: list[str]) -> ConfigValues:
    """A copy of ``values`` with each ``a.b.c=value`` applied (value parsed as YAML); origins recorded. A number
    in the key indexes a list already set (``sources.0.limit=100``): the item must exist."""
    import copy

    result = ConfigValues(copy.deepcopy(dict(values)), getattr(values, "origins", {}))
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {override!r} is not of the form dotted.key=value")
        key = key.strip()
        try:
            value = _load_yaml(raw)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or error
            raise ValueError(f"override {override!r}: the value is not valid YAML ({problem}); quote strings with "
                             "special characters, write lists as [8, 9]") from None
        parts = key.split(".")
        node = result
        for depth, part in enumerate(parts[:-1]):
            node = _override_child(node, part, parts[depth + 1], override, ".".join(parts[:depth + 1]))
        if isinstance(node, list):
            node[_list_index(node, parts[-1], override, ".".join(parts[:-1]))] = value
        else:
            node[parts[-1]] = value
        result.origins = {k: o for k, o in result.origins.items() if k != key and not k.startswith(key + ".")}
        result.origins[key] = f"override {override}"
    return result


def read_config_file(path: str | Path | None) -> ConfigValues:
    """The mapping in the YAML file at ``path`` ({} for None), with the file:line of every key; ValueError
    when the file is missing, is not valid YAML (file:line:column) or does not hold a mapping."""
    if path is None:
        return ConfigValues()
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.yaml"))[:5]
        raise ValueError(f"config file {path} is a folder: give a YAML file"
                         + (f" (it holds {', '.join(inside)})" if inside else ""))
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {error.start}): give the YAML file") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        values = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        place, problem = _yaml_error(error)
        raise ValueError(f"{path}:{place + ':' if place else ''} invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    if values is None:
        return ConfigValues()
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys at the top level, got {_got(values, dict)}")
    origins: dict[str, str] = {}
    _yaml_lines(node, "", path, origins)
    return ConfigValues(values, origins)


def flag_overrides(args, flag_keys: dict[str, str]) -> list[str]:
    """``key=value`` overrides (JSON values) for the command-line flags that were given: ``flag_keys`` maps an
    argparse destination to its dotted config key; flags left at None are skipped."""
    import json

    return [f"{key}={json.dumps(getattr(args, dest))}" for dest, key in flag_keys.items()
            if getattr(args, dest) is not None]


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path`` (if any), then by ``overrides``. Every error
    is a ValueError of one line naming the key, the value, what is expected and where it was set."""
    return config_from_dict(cls, apply_overrides(read_config_file(path), list(overrides)))


def config_to_dict(config) -> dict:
    """The resolved config as plain data (for run directories, logs and manifests): sections as dicts, tuples
    as lists, sections inside lists too."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config) if not f.name.startswith("_")}


def flat_config(values: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a :func:`config_to_dict` result (``{"optim": {"lr": 1e-5}}`` -> ``{"optim.lr": 1e-5}``);
    lists stay values. What comparisons of two configs name their differences by."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# Seeds: torch.manual_seed takes a 64-bit integer (a negative one stands for seed + 2**64) and the trainers add small
# offsets to it (100 per pipeline stage, megatron's 2718 + tensor-parallel rank), so 0 <= seed < 2**63 loses
# nothing; vLLM also seeds numpy, whose seeds are 32-bit.
SEED_LIMIT = 2**63
VLLM_SEED_LIMIT = 2**32


def check_seed(seed: int, key: str, *, limit: int = SEED_LIMIT, where: str = "") -> None:
    """ValueError naming the setting ``key`` unless 0 <= ``seed`` < ``limit`` (``where``: e.g. " with the vllm
    backend"): checked with the config, not by torch or vLLM once processes have started or a model has loaded."""
    if not 0 <= seed < limit:
        raise ValueError(f"{key} must be in [0, 2**{limit.bit_length() - 1}){where}, got {seed}")


def refuse_unused_setting(section, key: str, *, used: bool, here: str, only_with: str, why: str = "") -> None:
    """Refuse a setting the run would ignore (yet record in its config as if it applied): ValueError when the field
    ``key`` (dotted, e.g. "loss.max_len") of the config section ``section`` (a dataclass instance) differs from its
    default while ``used`` is False. The one line names the key and its value, the setting of this config that
    leaves it unused (``here``, e.g. "loss.aggregation=token_mean"), the setting that uses it (``only_with``) and
    what for (``why``), and the fix: remove it (or set its default, as an override of a YAML file's value can), or
    set ``only_with``. Called by a section's ``__post_init__``, where the rest of its validation lives."""
    name = key.rpartition(".")[2]
    default = {f.name: f.default for f in dataclasses.fields(section)}[name]
    assert default is not dataclasses.MISSING, f"{key} has no plain default"
    value = getattr(section, name)
    if used or value == default:
        return
    raise ValueError(f"{key}={_show(value)} has no effect with {here}: only {only_with} uses it"
                     f"{f' ({why})' if why else ''}. Remove {key} (or set its default, {key}={_show(default)}), or set "
                     f"{only_with}")


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
