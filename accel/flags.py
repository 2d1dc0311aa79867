"""Command-line flags generated from config dataclasses: one style for every ``accel`` subcommand.

Each leaf field of a (nested) frozen config becomes one ``--flag``, built by transformers' ``HfArgumentParser``
(choices from a ``Literal``, ``Optional`` unwrapped, a bool as a switch that also takes ``true``/``false``);
this module adds what it lacks: nested configs flattened (``timing.repeats`` -> ``--timing-repeats``, or
unprefixed), comma lists for tuples, JSON for dicts, a field's own parser (``metadata["parse"]``), and flags that
stay ``None`` when not given, so a ``--config`` file or a command's own defaults are overridden only by the flags
a user typed. Help text comes from ``metadata["help"]`` or the class docstring's ``Attributes:`` section, with
its reST markup removed, and :class:`HelpFormatter` shows every default in the words a user would type.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass

from accel.textconfig import attribute_docs

#: metadata keys read here (the rest of a field's metadata is not passed on to argparse)
_OWN_KEYS = ("help", "cli", "prefix", "parse", "flag")


@dataclass(frozen=True)
class Flag:
    """One leaf field of a config as a flag.

    Attributes:
        dest: the dotted field path, e.g. ``timing.repeats`` (the argparse ``dest``).
        flag: the option string, e.g. ``--timing-repeats``.
        field: the dataclass field.
        kind: its type without ``Optional``, e.g. ``int`` or ``tuple[str, ...]``.
        owner: the config class that declares it.
    """

    dest: str
    flag: str
    field: dataclasses.Field
    kind: typing.Any
    owner: type


def _strip_optional(annotation):
    """``str | None`` -> ``str``; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def config_flags(cls: type, unprefixed: tuple[str, ...] = (), names: dict[str, str] | None = None) -> list[Flag]:
    """The flags of every leaf field of ``cls``, nested configs' fields included.

    A nested config's flags carry its field name as a prefix (``--timing-repeats``) unless the field's metadata
    says ``{"prefix": False}`` or its name is in ``unprefixed``; ``names`` maps a dotted field path to another
    flag name (``{"budget_seconds": "budget"}``). Fields with ``{"cli": False}`` have no flag.
    """
    names = names or {}
    rows: list[Flag] = []

    def walk(owner: type, prefix: str, flag_prefix: str) -> None:
        hints = typing.get_type_hints(owner)
        for f in dataclasses.fields(owner):
            kind = _strip_optional(hints[f.name])
            if dataclasses.is_dataclass(kind):
                keep = f.metadata.get("prefix", True) and f.name not in unprefixed
                walk(kind, f"{prefix}{f.name}.", f"{flag_prefix}{f.name}-" if keep else flag_prefix)
            elif f.metadata.get("cli", True):
                dest = prefix + f.name
                flag = "--" + names.get(dest, flag_prefix + f.name).replace("_", "-")
                rows.append(Flag(dest, flag, f, kind, owner))

    walk(cls, "", "")
    return rows


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off) as a flag value."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from None


def _comma_list(item: type):
    """A flag value ``a,b,c`` as a tuple of ``item``s."""

    def parse(text: str) -> tuple:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        try:
            return tuple(item(part) for part in parts)
        except ValueError:
            message = f"expected {item.__name__} values separated by commas, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    parse.__name__ = f"comma-separated {item.__name__} list"
    return parse


def json_object(text: str) -> dict:
    """A flag value as a JSON object (``'{"key": 1}'``)."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, e.g. '{{\"key\": 1}}' ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _checked(parse):
    """``parse`` with a ValueError shown as argparse's own error (its message kept)."""

    def check(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    check.__name__ = getattr(parse, "__name__", "value")
    return check


def _value_type(flag: Flag):
    """What ``HfArgumentParser`` gets as the field's type: the type itself, or a parser where it has none."""
    if "parse" in flag.field.metadata:
        return _checked(flag.field.metadata["parse"])
    origin = typing.get_origin(flag.kind)
    if origin is tuple:
        return _comma_list(typing.get_args(flag.kind)[0])
    if flag.kind is dict or origin is dict:
        return json_object
    return flag.kind


def plain(text: str) -> str:
    """Docstring text as help text: reST roles and literals reduced to their words (``:class:`~a.B``` -> ``B``),
    ``None:`` (a field's value) said as ``omitted:`` (the flag's), True and False as a flag takes them."""
    text = re.sub(r":[a-z]+:`~?([^`]*)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = re.sub(r"``([^`]*)``", r"\1", text).rstrip(".")
    text = re.sub(r"\bNone\b:", "omitted:", text)  # a field left None is a flag left out
    return re.sub(r"\b(True|False)\b", lambda m: m.group(1).lower(), text)


def show_default(value) -> str:
    """A default as a user would type it: ``true``, ``full,fora-2``, ``{}``; None as ``none``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(show_default(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def field_default(f: dataclasses.Field):
    """The field's default value (None if it has none)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    unprefixed: tuple[str, ...] = (),
    overrides: dict[str, dict] | None = None,
) -> None:
    """One ``--flag`` per leaf field of ``cls`` (see :func:`config_flags`), made by ``HfArgumentParser``.

    Every flag is ``None`` when not given (its default is shown in the help, not stored), so
    :func:`config_from_args` keeps whatever a flag left unset.

    Args:
        skip: dotted field paths without a flag.
        unprefixed: nested config fields whose flags carry no prefix.
        overrides: per dotted field path: ``flag`` (another flag name), ``help``, ``parse`` (the value's parser)
            and ``default`` (the default shown, when the command supplies its own).
    """
    from transformers.hf_argparser import HfArgumentParser

    overrides = overrides or {}
    names = {dest: o["flag"] for dest, o in overrides.items() if "flag" in o}
    for flag in config_flags(cls, unprefixed, names):
        if flag.dest in skip:
            continue
        extra = overrides.get(flag.dest, {})
        text = extra.get("help") or flag.field.metadata.get("help") or attribute_docs(flag.owner).get(flag.field.name)
        if not text:
            raise ValueError(f"{flag.owner.__name__}.{flag.field.name} has no help text: document it")
        metadata = {k: v for k, v in flag.field.metadata.items() if k not in _OWN_KEYS}
        metadata.update(dest=flag.dest, help=plain(text).replace("%", "%%"))
        value_type = _checked(extra["parse"]) if "parse" in extra else _value_type(flag)
        if value_type is not bool and typing.get_origin(value_type) is not typing.Literal:
            metadata["metavar"] = extra.get("flag", flag.field.name).upper().replace("-", "_")
        synthetic = dataclasses.field(default=None, metadata=metadata)
        synthetic.name, synthetic.type = flag.flag[2:], value_type
        HfArgumentParser._parse_dataclass_field(parser, synthetic)
        action = parser._actions[-1]
        if synthetic.type is bool:
            action.metavar = "BOOL"
        action.default = None
        action.shown_default = show_default(extra.get("default", field_default(flag.field)))


def config_from_args(args: argparse.Namespace, cls: type, base: dict | None = None, **flag_options):
    """A ``cls`` config from ``base`` (plain JSON values, e.g. a ``--config`` file) overridden by the flags given.

    ``flag_options``: the ``unprefixed`` and ``overrides`` given to :func:`add_config_arguments`.
    """
    names = {dest: o["flag"] for dest, o in flag_options.get("overrides", {}).items() if "flag" in o}
    values = json.loads(json.dumps(base or {}))
    for flag in config_flags(cls, flag_options.get("unprefixed", ()), names):
        given = getattr(args, flag.dest, None)
        if given is None:
            continue
        target = values
        *parents, leaf = flag.dest.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = list(given) if isinstance(given, tuple) else given
    return build_config(values, cls)


def build_config(values: dict, cls: type):
    """A config from plain JSON values (lists become tuples, nested dicts nested configs).

    Raises:
        ValueError: a key that is not a field of ``cls``.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        kind = _strip_optional(hints[name])
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = build_config(value, kind)
        elif typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with every option's default (as a user would type it) and the description and epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.help is argparse.SUPPRESS
            or not action.option_strings
            or action.required
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
            or "(default:" in text
        ):
            return text
        shown = getattr(action, "shown_default", None)
        if shown is None:
            shown = show_default(action.default)
        return f"{text} (default: {shown.replace('%', '%%')})"
