"""One CLI style: every subcommand's flags show their defaults in plain words and mean one thing everywhere."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Literal

import pytest

from accel.cli import HELP, subcommand

#: (name, argv that picks the parser) of every parser a user meets: each subcommand, and search's sparse technique
PARSERS = [(name, name, []) for name in HELP] + [("search --technique sparse", "search", ["--technique", "sparse"])]
#: what must not leak into help: reST roles and literals, Python reprs of types and values
LEAKS = re.compile(r":[a-z]+:`|``|Literal\[|typing\.|<class |<function |\bNone\b|\bTrue\b|\bFalse\b")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    return {label: subcommand(name, list(argv))[1] for label, name, argv in PARSERS}


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            yield action


def _signature(action: argparse.Action) -> tuple:
    """What a flag accepts: its action kind, value type, choices, arity and bare value."""
    kind = getattr(action.type, "__name__", None) if action.type is not None else "str"
    kind = "str" if kind in (None, "<lambda>") and action.choices else kind
    choices = tuple(action.choices) if action.choices else None
    return type(action).__name__, kind, choices, action.nargs, action.const


@pytest.mark.parametrize("label", [label for label, *_ in PARSERS])
def test_every_option_shows_its_default_in_plain_help(label):
    parser = _parsers()[label]
    formatter = parser._get_formatter()
    for action in _options(parser):
        text = formatter._get_help_string(action)
        assert action.help and action.help.strip(), f"{label} {action.option_strings[0]} has no help"
        if not action.required:
            assert "(default: " in text, f"{label} {action.option_strings[0]}: no default in {text!r}"
    rendered = parser.format_help()
    assert "(default: None)" not in rendered and not LEAKS.search(rendered), LEAKS.search(rendered)


def test_a_flag_name_means_one_thing_in_every_subcommand():
    seen: dict[str, dict[str, tuple]] = {}
    for label, parser in _parsers().items():
        for action in _options(parser):
            for option in action.option_strings:
                seen.setdefault(option, {})[label] = _signature(action)
    shared = {option: where for option, where in seen.items() if len(where) > 1}
    assert {"--seed", "--steps", "--model", "--dtype"} <= set(shared)  # the walk found the shared flags
    for option, where in shared.items():
        assert len(set(where.values())) == 1, f"{option} differs between subcommands: {where}"


def test_seed_and_method_mean_the_same_where_they_appear():
    """``--seed`` is the noise seed of sample i (seed + i) everywhere; ``--method`` is one evaluation method, and
    the search's algorithm is ``--algorithm``."""
    parsers = _parsers()
    seeds = {label: a.help for label, p in parsers.items() for a in _options(p) if "--seed" in a.option_strings}
    assert {"eval", "demo", "generate", "search", "search --technique sparse"} <= set(seeds)
    assert all("seed + i" in text for text in seeds.values()), seeds
    methods = {label for label, p in parsers.items() for a in _options(p) if "--method" in a.option_strings}
    assert methods == {"generate"}
    search = subcommand("search", [])[1]
    args = search.parse_args(["--out", "x", "--algorithm", "dp", "--seed", "3", "--search-seed", "5"])
    from accel.caching.search.command import config_from_args

    config = config_from_args(args)
    assert (config.method, config.evaluation.seed, config.seed) == ("dp", 3, 5)


@pytest.mark.parametrize("typed, stored", [("bf16", "bfloat16"), ("fp16", "float16"), ("float32", "float32")])
def test_dtype_takes_the_names_users_type(typed, stored):
    from accel.eval.commands.evaluate import config_of

    parser = subcommand("eval", [])[1]
    assert config_of(parser.parse_args(["--dtype", typed])).runtime.dtype == stored
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "bf17"])


def test_unset_flags_keep_a_config_file_and_given_flags_override_it(tmp_path):
    from accel.eval.commands.evaluate import config_of

    path = tmp_path / "config.json"
    path.write_text('{"seed": 7, "timing": {"repeats": 5}, "methods": ["full", "fora-2"]}')
    parser = subcommand("eval", [])[1]
    config = config_of(parser.parse_args(["--config", str(path), "--timing-warmup", "0", "--methods", "full"]))
    assert (config.seed, config.timing.repeats, config.timing.warmup, config.methods) == (7, 5, 0, ("full",))


@dataclass(frozen=True, kw_only=True)
class Inner:
    """A nested config whose help comes from its docstring.

    Attributes:
        repeats: timed rounds.
    """

    repeats: int = 3


@dataclass(frozen=True, kw_only=True)
class Outer:
    """A config with one field of each kind accel.flags handles."""

    kind: Literal["a", "b"] = field(default="a", metadata={"help": "which kind"})
    fast: bool = field(default=True, metadata={"help": "go fast"})
    orders: tuple[int, ...] = field(default=(0, 1), metadata={"help": "orders"})
    extra: dict = field(default_factory=dict, metadata={"help": "extra"})
    inner: Inner = field(default_factory=Inner)


def test_flags_from_a_config_dataclass():
    """accel.flags on a small nested config: choices, a bool switch, comma tuples, JSON dicts, prefixed groups."""
    from accel.flags import HelpFormatter, add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_config_arguments(parser, Outer)
    config = config_from_args(parser.parse_args(["--kind", "b", "--fast", "false", "--orders", "2,0"]), Outer)
    assert config == Outer(kind="b", fast=False, orders=(2, 0))
    assert config_from_args(parser.parse_args(["--fast", "--inner-repeats", "5"]), Outer).inner.repeats == 5
    assert config_from_args(parser.parse_args([]), Outer, {"kind": "b"}).kind == "b"  # unset flags keep the base
    for bad in (["--kind", "c"], ["--orders", "x"], ["--extra", "[1]"], ["--fast", "maybe"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    text = parser.format_help()
    assert "(default: true)" in text and "(default: 0,1)" in text and "timed rounds (default: 3)" in text
