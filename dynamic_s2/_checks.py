"""Argument validators: one home, one phrasing ("``name`` must be …, got …").

Every validator returns the normalised value, so a checked value is the one used (as in
torchvision's ``_check_interpolation``). Wrong types raise :class:`TypeError`, wrong values
:class:`ValueError`; both name the argument and quote the value received.

Examples:
    >>> positive_int("max_batch_tiles", 8)
    8
    >>> positive_int("max_batch_tiles", 0)
    Traceback (most recent call last):
        ...
    ValueError: max_batch_tiles must be a positive int, got 0
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = [
    "boolean",
    "check_scales",
    "index",
    "int_pair",
    "is_int",
    "is_sequence",
    "max_tiles",
    "non_negative_int",
    "one_of",
    "optional",
    "positive_int",
    "positive_number",
    "printable",
    "stats",
]

T = TypeVar("T")


def is_int(value: object) -> bool:
    """True for ints (and numpy integers), False for bools and everything else.

    Examples:
        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_sequence(value: object) -> bool:
    """True for a list, tuple or other sequence that is not a string or bytes.

    Examples:
        >>> is_sequence((1, 2)), is_sequence("ab")
        (True, False)
    """
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def printable(text: object, keep: str = "") -> str:
    r"""``str(text)`` safe to show on a terminal: every non-printable character (escape sequences,
    carriage returns, bidi controls) written as its Python escape, but those in ``keep``.

    File names come from anyone: echoed raw, one could rewrite the terminal or forge lines.

    Examples:
        >>> printable("a\x1b[31mred.png")
        'a\\x1b[31mred.png'
        >>> printable("two\nlines", keep="\n")
        'two\nlines'
    """
    return "".join(
        c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii")
        for c in str(text)
    )


def _int_at_least(name: str, value: Any, minimum: int, what: str) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int ≥ 1.

    Examples:
        >>> positive_int("tile_size", 448)
        448
    """
    return _int_at_least(name, value, 1, "a positive int")


def non_negative_int(name: str, value: Any) -> int:
    """``value`` as an int ≥ 0.

    Examples:
        >>> non_negative_int("workers", 0)
        0
    """
    return _int_at_least(name, value, 0, "an int >= 0")


def positive_number(name: str, value: Any) -> float:
    """``value`` as a finite float above 0 (not a bool).

    Examples:
        >>> positive_number("max_upscale", 2)
        2.0
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"{name} must be a finite number above 0, got {value!r} ({type(value).__name__})"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number above 0, got {value!r}")
    return float(value)


def optional(check: Any, name: str, value: Any) -> Any:
    """``None``, or ``check(name, value)``.

    Examples:
        >>> optional(positive_int, "max_tiles", None) is None
        True
    """
    return None if value is None else check(name, value)


def int_pair(name: str, value: Any) -> tuple[int, int]:
    """A pair of positive ints, e.g. a ``(rows, cols)`` grid or an ``(h, w)`` size.

    Examples:
        >>> int_pair("grid", [2, 3])
        (2, 3)
    """
    if not is_sequence(value) or len(value) != 2 or not all(is_int(v) for v in value):
        raise TypeError(f"{name} must be a pair of positive ints, got {value!r}")
    if not all(v > 0 for v in value):
        raise ValueError(f"{name} must be a pair of positive ints, got {value!r}")
    return (int(value[0]), int(value[1]))


def one_of(name: str, value: Any, choices: Sequence[T]) -> T:
    """``value``, which must be one of ``choices``.

    Examples:
        >>> one_of("fit", "pad", ("stretch", "pad"))
        'pad'
    """
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ValueError(f"{name} must be one of {tuple(choices)!r}, got {value!r}")
    return value  # type: ignore[no-any-return]


def boolean(name: str, value: Any) -> bool:
    """``value``, which must be a bool.

    Examples:
        >>> boolean("overwrite", False)
        False
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def index(name: str, value: Any, length: int) -> int:
    """``value`` as an index into ``length`` items, negative indices counted from the end.

    Examples:
        >>> index("output_scale", -1, 3)
        2
    """
    if not is_int(value):
        raise TypeError(f"{name} must be an int index, got {value!r} ({type(value).__name__})")
    if not -length <= value < length:
        raise ValueError(
            f"{name} must index one of {length} items (-{length}..{length - 1}), got {value!r}"
        )
    return int(value) % length


def stats(name: str, value: Any, channels: int | None = None) -> float | tuple[float, ...] | None:
    """Per-channel normalisation ``mean`` or ``std``: ``None``, a number, or one per channel.

    ``std`` values must be non-zero; all must be finite. With ``channels``, a sequence must have
    exactly that length.

    Examples:
        >>> stats("mean", [0.5, 0.5, 0.5])
        (0.5, 0.5, 0.5)
        >>> stats("std", 0.0)
        Traceback (most recent call last):
            ...
        ValueError: std must be finite and non-zero, got 0.0
    """
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        values: tuple[float, ...] = (float(value),)
    elif is_sequence(value) and len(value) > 0:
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{name} must be a number or one number per channel, got {value!r}")
        values = tuple(float(v) for v in value)
    else:
        raise TypeError(f"{name} must be a number or one number per channel, got {value!r}")
    if not all(math.isfinite(v) and (name != "std" or v != 0.0) for v in values):
        what = "finite and non-zero" if name == "std" else "finite"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if not is_sequence(value):
        return values[0]
    if channels is not None and len(values) != channels:
        raise ValueError(f"{name} needs {channels} values (one per channel), got {value!r}")
    return values


#: The smallest pixel scale: smaller numbers are relative factors of the original S2-Wrapper.
MIN_SCALE = 16


def check_scales(scales: Any) -> tuple[int, ...]:
    """Pixel scales: ints >= :data:`MIN_SCALE`, strictly increasing, as a tuple.

    Examples:
        >>> check_scales([448, 896])
        (448, 896)
    """
    if isinstance(scales, int | float) and not isinstance(scales, bool):
        scales = (scales,)
    if not is_sequence(scales):
        raise TypeError(
            f"scales must be a sequence of int pixel sizes such as (448, 896, 1344), got {scales!r}"
        )
    if len(scales) == 0:
        raise ValueError("scales must not be empty; give pixel sizes such as (448, 896, 1344)")
    for s in scales:
        if isinstance(s, float) or (is_int(s) and s < MIN_SCALE):
            raise ValueError(
                f"scales are pixel sizes (ints >= {MIN_SCALE}, e.g. (448, 896, 1344)), got "
                f"{tuple(scales)!r}; relative factors such as (1, 2) or (0.5, 1.0) belong to the "
                "original S2-Wrapper: use dynamic_s2.s2wrapper.forward for those"
            )
        if not is_int(s):
            raise TypeError(f"scales must be ints (pixel sizes), got {s!r} in {tuple(scales)!r}")
    out = tuple(int(s) for s in scales)
    if any(a >= b for a, b in itertools.pairwise(out)):
        raise ValueError(f"scales must be strictly increasing without duplicates, got {out!r}")
    return out


def _tile_count(name: str, value: Any, limit: int) -> int:
    count = positive_int(name, value)
    if count > limit:
        raise ValueError(f"{name} must be at most MAX_TILES = {limit} per scale, got {count!r}")
    return count


def max_tiles(value: Any, n_scales: int, limit: int) -> tuple[int, ...] | int | None:
    """A tile budget: ``None``, one int, or one non-decreasing int per scale, each <= ``limit``.

    Examples:
        >>> max_tiles([2, 6], 2, 100)
        (2, 6)
    """
    if value is None:
        return None
    if is_int(value):
        return _tile_count("max_tiles", value, limit)
    if is_sequence(value):
        if len(value) != n_scales:
            raise ValueError(
                f"max_tiles must have one entry per scale ({n_scales}), got {tuple(value)!r}"
            )
        caps = tuple(_tile_count("max_tiles", m, limit) for m in value)
        if any(a > b for a, b in itertools.pairwise(caps)):
            raise ValueError(f"max_tiles per scale must be non-decreasing, got {caps!r}")
        return caps
    raise TypeError(f"max_tiles must be None, an int or one int per scale, got {value!r}")
