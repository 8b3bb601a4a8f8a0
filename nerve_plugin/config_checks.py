"""Value checks for nerve's TOML sections ([nerve], [muon], [variant]): every failure names the section, the
key, the value and what is allowed, as ``[muon] momentum = 1.5 is not allowed: expected a number in [0, 1)``."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable


def is_number(value) -> bool:
    # bool is an int in Python (a TOML `x = true` must not pass as 1), and NaN passes no range check by failing
    # every comparison.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class SectionChecks:
    def __init__(self, section: str, error: type[ValueError]):
        self.section = section
        self.error = error

    def fail(self, key: str, value, allowed: str):
        raise self.error(f"[{self.section}] {key} = {value!r} is not allowed: expected {allowed}")

    def boolean(self, key: str, value) -> None:
        if not isinstance(value, bool):
            self.fail(key, value, "true or false")

    def integer(self, key: str, value, allowed: str, ok: Callable[[int], bool] = lambda v: True) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
            self.fail(key, value, allowed)

    def number(self, key: str, value, allowed: str, ok: Callable[[float], bool]) -> None:
        if not is_number(value) or not ok(value):
            self.fail(key, value, allowed)

    def choice(self, key: str, value, choices: Iterable) -> None:
        choices = tuple(choices)  # membership by ==, so an unhashable value is refused, not a TypeError
        if value not in choices:
            self.fail(key, value, "one of " + ", ".join(repr(c) for c in choices))

    def choices(self, key: str, value, choices: Iterable, allow_empty: bool = False) -> None:
        """A list of values from ``choices``."""
        choices = tuple(choices)
        if not isinstance(value, list) or (not value and not allow_empty) or any(v not in choices for v in value):
            self.fail(
                key, value, ("a list" if allow_empty else "a non-empty list") + f" of values from {list(choices)}"
            )


def renamed_keys(
    values: dict, renames: dict[str, str], section: str, error: type[ValueError], stacklevel: int = 2
) -> dict:
    """``values`` with keys that were renamed (``renames``: old -> new) under their new name, each old one
    reported by a FutureWarning that names the new key (Python shows a given warning once per place it is
    issued from, so a job sees it once, not at every config it builds). Both names at once is refused: which
    value was meant cannot be known."""
    out = dict(values)
    for old, new in renames.items():
        if old not in out:
            continue
        if new in out:
            raise error(f"[{section}] {old} and {new} are both set: {old} is the old name of {new}; keep {new} only")
        warnings.warn(
            f"[{section}] {old} is deprecated: it is now called {new} ({new} = {out[old]!r})",
            FutureWarning,
            stacklevel=stacklevel + 1,
        )
        out[new] = out.pop(old)
    return out
