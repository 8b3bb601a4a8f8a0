"""How many layers a logging step may measure so that NerVE's amortized cost stays within ``max_overhead``.

Cost model. A logging step costs ``fixed + per_layer * layers`` more than a step that does not log (the Gram
products in its forwards, the merge and the eigen-solves); spread over the ``log_freq`` steps of a logging
interval, that is

    amortized(layers) = (fixed + per_layer * layers) / (log_freq * normal_step)

``OverheadBudget`` is fed what the logging steps cost (with the number of layers each measured) and the normal
step time, fits the line, and answers with the largest number of layers whose amortized cost is within the
budget: at least one, so a run never measures nothing (with a warning, once, when even one layer is over and
the ``log_freq`` that would fit). ``StepTimes`` keeps the recent normal step times of one rank.

Both are plain state machines with no clock and no collectives of their own: ``NerveMonitor`` times the steps
and makes every rank feed the budget the same, agreed, numbers, so every rank makes the same choice.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Float round-off must not cost a layer: 0.05 / 0.025 is 1.9999999999999998 in binary.
_ROUNDING = 1e-9


@dataclass(frozen=True)
class Observation:
    layers: int  # layers the logging step measured
    overhead_s: float  # its time beyond a normal step
    warm_up: bool  # the process's first logging step (compilation, solver start-up): kept only until a later one


@dataclass(frozen=True)
class Choice:
    """What the budget chose, and the numbers it chose from."""

    layers: int  # measure this many layers per logging step
    total: int  # of this many tracked layers
    overhead_s: float  # predicted extra time of a logging step measuring ``layers``
    step_s: float  # the normal step time
    amortized: float  # overhead_s / (log_freq * step_s)
    budget: float
    log_freq: int
    from_warm_up: bool = False  # chosen from the warm-up step alone: the next logging step measures again

    @property
    def over_budget(self) -> bool:
        return self.amortized > self.budget * (1 + _ROUNDING)

    @property
    def fitting_log_freq(self) -> int:
        """The smallest log_freq at which this choice's amortized cost is within the budget."""
        return max(1, math.ceil(self.overhead_s / (self.budget * self.step_s) * (1 - _ROUNDING)))

    def describe(self) -> str:
        return (
            f"nerve: measuring {self.layers} of {self.total} layers per logging step (logging step "
            f"~{self.overhead_s * 1e3:.0f} ms over a {self.step_s * 1e3:.0f} ms step, {self.amortized:.1%} at "
            f"log_freq {self.log_freq}; budget {self.budget:.0%})"
        )

    def warning(self) -> str:
        return (
            f"nerve: max_overhead = {self.budget:g} cannot be met at log_freq {self.log_freq}: one layer per "
            f"logging step adds ~{self.overhead_s * 1e3:.0f} ms to a {self.step_s * 1e3:.0f} ms step "
            f"({self.amortized:.1%}); measuring 1 of {self.total} layers per logging step anyway. "
            f"log_freq >= {self.fitting_log_freq} would fit the budget"
        )


class StepTimes:
    """Wall times of one rank's steps that do not log; their median (robust to checkpoints, evaluations and
    the step after a logging step, which pays for its writes) is the normal step time."""

    def __init__(self, window: int = 256):
        self._times: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self._times.append(max(0.0, seconds))

    def median(self) -> float | None:
        return statistics.median(self._times) if self._times else None


class OverheadBudget:
    """The amortized-overhead budget of ``[nerve] max_overhead``: fed the measured logging steps, answers how
    many layers the next logging step measures.

    ``max_overhead``: the fraction of training time NerVE may add (0.05: 5%); 0 turns the budget off (every
    tracked layer at every logging step). ``history``: how many recent logging steps the fit uses.
    """

    def __init__(self, max_overhead: float, log_freq: int, history: int = 16):
        self.max_overhead = max_overhead
        self.log_freq = log_freq
        self._observations: deque[Observation] = deque(maxlen=history)
        self._last_layers: int | None = None
        self._warned = False

    @property
    def active(self) -> bool:
        # With log_freq = 1 every step logs: no normal step to time, nothing to amortize over.
        return self.max_overhead > 0 and self.log_freq > 1

    def observe(self, layers: int, overhead_s: float, warm_up: bool = False) -> None:
        """A logging step that measured ``layers`` layers took ``overhead_s`` more than a normal step."""
        if layers < 1 or not math.isfinite(overhead_s):
            return
        # The warm-up step's compilation and solver start-up would make every layer look expensive for good.
        kept = [o for o in self._observations if not o.warm_up]
        self._observations.clear()
        self._observations.extend(kept)
        self._observations.append(Observation(layers, max(0.0, overhead_s), warm_up))

    def fit(self) -> tuple[float, float] | None:
        """(fixed_s, per_layer_s) of the recent logging steps, both >= 0; None before the first one.

        One point per layer count (the median of its logging steps, robust to one slow step), then a least-squares
        line. The first logging step at a count may pay start-up costs of its own (a solver's new batch shape:
        kernel compilation, graph capture), so it counts only until a second one at that count exists. With a
        single layer count the whole cost is taken as per-layer: an overestimate for more layers, an
        underestimate for fewer, corrected by the next logging step, which measures another count.
        """
        by_count: dict[int, list[float]] = {}
        for o in self._observations:
            by_count.setdefault(o.layers, []).append(o.overhead_s)
        if not by_count:
            return None
        points = sorted((k, statistics.median(v[1:] or v)) for k, v in by_count.items())
        if len(points) == 1:
            ((k, y),) = points
            return 0.0, y / k
        n = len(points)
        mean_k = sum(k for k, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        slope = sum((k - mean_k) * (y - mean_y) for k, y in points) / sum((k - mean_k) ** 2 for k, _ in points)
        fixed = mean_y - slope * mean_k
        if slope <= 0:  # cost not growing with layers (noise): a constant cost
            return mean_y, 0.0
        if fixed < 0:  # a line through the origin instead
            return 0.0, sum(k * y for k, y in points) / sum(k * k for k, _ in points)
        return fixed, slope

    def choose(self, total: int, step_s: float | None, cap: int = 0) -> Choice | None:
        """The layers per logging step for ``total`` tracked layers, at most ``cap`` (0: no cap); None while
        there is nothing to decide from (no logging step or no normal step timed yet)."""
        fitted = self.fit()
        if not self.active or fitted is None or step_s is None or step_s <= 0 or total < 1:
            return None
        fixed, per_layer = fitted
        upper = min(cap, total) if cap else total
        allowance = self.max_overhead * self.log_freq * step_s
        if per_layer > 0:
            layers = math.floor((allowance - fixed) / per_layer + _ROUNDING)
        else:
            layers = upper if fixed <= allowance * (1 + _ROUNDING) else 0
        layers = max(1, min(upper, layers))
        overhead = fixed + per_layer * layers
        return Choice(
            layers,
            total,
            overhead,
            step_s,
            overhead / (self.log_freq * step_s),
            self.max_overhead,
            self.log_freq,
            from_warm_up=all(o.warm_up for o in self._observations),
        )

    def update(self, total: int, step_s: float | None, cap: int = 0, announce: bool = True) -> int | None:
        """``choose``, logging one INFO line when the choice changes and a warning, once, when even one layer
        is over budget (``announce``: this rank logs). Returns the layers per logging step, None: undecided."""
        choice = self.choose(total, step_s, cap)
        if choice is None:
            return None
        if announce and choice.layers != self._last_layers:
            logger.info(choice.describe())
        # Not from the warm-up step: its start-up costs say nothing yet about what a layer costs.
        warn = choice.over_budget and not choice.from_warm_up and not self._warned
        if announce and warn:
            logger.warning(choice.warning())
        self._warned = self._warned or warn
        self._last_layers = choice.layers
        return choice.layers
