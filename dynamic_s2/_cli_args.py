"""Argument types and the pipeline-option flags of the ``dynamic-s2`` command.

The flags of the pipeline options are made from the fields of
:class:`~dynamic_s2.options.S2Options` (looked up when the parser is built), so there is no second
list of option names here.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from . import options


class _UsageError(Exception):
    """A bad argument found after parsing; reported like an argparse error (exit status 2)."""


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from an option's parser: its ``ValueError`` becomes a usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _add_option_flags(
    p: argparse.ArgumentParser, *stages: str, without: tuple[str, ...] = ()
) -> None:
    """One flag per :class:`~dynamic_s2.options.S2Options` field of ``stages``, but those named in
    ``without`` (options the command cannot honour: they are not offered).

    Each flag's default is the field's default, so the parsed namespace holds every option.
    """
    group = p.add_argument_group("pipeline options (see dynamic_s2.S2Options)")
    for f in dataclasses.fields(options.S2Options):
        meta = f.metadata
        if meta["stage"] not in stages:
            continue
        if f.name in without:  # not offered, but the namespace still holds every option
            p.set_defaults(**{f.name: f.default})
            continue
        flag = "--" + f.name.replace("_", "-")
        default_text = "" if f.default is None or f.default is False else f" (default {f.default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default}
        if f.default is False and meta["parse"] is None and meta["choices"] is None:
            kwargs["action"] = "store_true"
        elif meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["type"] = _flag_type(meta["parse"])
            kwargs["metavar"] = meta["metavar"]
        group.add_argument(flag, help=meta["help"] + default_text, **kwargs)


def _options(args: argparse.Namespace) -> options.S2Options:
    """The :class:`~dynamic_s2.options.S2Options` given by the flags."""
    names = {f.name for f in dataclasses.fields(options.S2Options)}
    given = {k: v for k, v in vars(args).items() if k in names}
    try:
        return options.S2Options(**given)
    except (ValueError, TypeError) as exc:
        raise _UsageError(str(exc)) from exc
