"""Adaptive streaming context: picks the context of a stream's next chunk while it runs.

The stream reports every chunk (:class:`ChunkReport`) and asks :class:`ContextController` for
the context of the next one. Policies combine; each is optional:

- ``"latency"``: predicted latency = chunk duration + predicted compute must fit
  ``latency_budget_ms``.
- ``"load"``: a load factor, the EMA of measured compute / calibrated compute of the context the
  chunk ran under (``load <- (1 - a) * load + a * ratio``, ``a = load_smoothing`` per chunk,
  starting at 1), scales every calibrated compute. A context is admissible only if its predicted
  compute fits ``headroom`` x its chunk duration (so no chunk misses its real-time deadline).
  Without ``"load"`` the load factor stays 1.
- ``"snr"``: the running SNR sets a minimum left context: ``snr_levels`` are ``(below_db,
  min_left)`` steps; entering a noisier step happens as soon as the SNR drops below its
  threshold, leaving it needs ``threshold + snr_hysteresis_db``, so an SNR hovering at a
  threshold does not flap. An unknown SNR (None or NaN) sets no requirement.

Decision rule, every chunk:

1. admissible = the contexts that fit every active constraint (latency budget, load headroom).
2. With ``"snr"``: among the admissible contexts whose left reaches the required left (if
   none, those with the largest left), the one with the lowest predicted compute per second of
   audio: clean audio runs cheap, noisy audio buys left context.
3. Without ``"snr"``: the most accurate admissible context.
4. Nothing admissible ("nothing fits"): with ``"load"``, among the contexts within headroom the
   lowest latency, else the cheapest compute per second of audio; without ``"load"``, the
   lowest latency.

Cost is compute per second of audio, ``compute_ms / chunk_ms``, from the calibrated numbers: it
is never assumed that a smaller context is cheaper (on CPU small chunks cost more per second of
audio, through per-chunk overhead). Ties go to the more accurate context.

Accuracy order: ``accuracy_rank`` (best first, e.g. from the dev CER of each context), else the
ASSUMPTION that a longer chunk, then a longer left context, is more accurate.

Switching (no flapping): a switch happens at once when the current context breaks a constraint
(a forced downgrade), or when the choice is no more accurate and no more costly than the current
context (a safe step down). Any other switch (an upgrade: more accurate or more costly) happens
only once the same choice has held for ``upgrade_after`` consecutive chunks, and, where the report
gives a device utilization >= ``busy_utilization``, an upgrade to a costlier context waits (the
count restarts). Device utilization does not enter the load factor: NVML counts the stream's own
kernels too, so it is a "device saturated" signal, not a slowdown factor. A context whose
calibration is too optimistic can still cycle (forced out, upgraded back), at most once every
``upgrade_after`` chunks.

Every switch has a reason naming the policy and its numbers, e.g. ``load: [64, 7] predicted
241.3 ms > 0.7 x 320 ms chunk (load x3.02)``. The controller keeps the log itself:
``controller.switches``, one dict per switch (``time`` = stream seconds, ``from``, ``to``,
``reason``), the first one being the initial choice (``from`` None).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from modules.context import Context, validate_context

POLICIES = ("latency", "snr", "load")


@dataclass(frozen=True)
class ChunkReport:
    """What the stream measured on one chunk.

    Arguments
    ---------
    context : the context the chunk ran under.
    chunk_seconds : audio duration of the chunk (``(right + 1) * frame_seconds``, shorter for a
        last chunk).
    compute_seconds : measured wall time to encode and decode the chunk.
    stream_seconds : audio time at the end of the chunk.
    snr_db : running SNR estimate of the incoming audio (None: not known yet).
    utilization : device utilization 0..1 where measured (:func:`device_utilization`), else None.
    """

    context: Context
    chunk_seconds: float
    compute_seconds: float
    stream_seconds: float
    snr_db: float | None
    utilization: float | None = None


@dataclass(frozen=True)
class Decision:
    """The context of the next chunk, and why it changed (None when it did not)."""

    context: Context
    reason: str | None


def device_utilization(device: torch.device | str) -> float | None:
    """Utilization 0..1 of a CUDA device over NVML's last sample period, else None.

    Optional: it needs the ``nvidia-ml-py`` package (``import pynvml``), which is not a
    requirement of this project; without it, on other devices or when NVML fails, None.

    Example
    -------
    >>> device_utilization("cpu") is None
    True
    """
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip or not torch.cuda.is_available():
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        return torch.cuda.utilization(device) / 100
    except (pynvml.NVMLError, RuntimeError, ModuleNotFoundError):
        return None


class ContextController:
    """Chooses the context of a stream's next chunk from combined policies (module docstring).

    One controller per stream: call :meth:`first_context`, then :meth:`next_context` after
    every chunk.

    Arguments
    ---------
    contexts : the ``(left, right)`` contexts the stream may switch between (finite values).
    frame_seconds : duration of one encoder frame (0.04 s for our models).
    compute_ms : calibrated compute per chunk of every context on this machine, unloaded (ms).
    policies : any non-empty subset of ``"latency"``, ``"snr"``, ``"load"``.
    latency_budget_ms : the latency budget; required by, and only used by, ``"latency"``.
    accuracy_rank : the contexts, most accurate first (default: longer chunk, then longer left).
    headroom : ``"load"``: predicted compute must be <= headroom x chunk duration (0 < h <= 1).
    load_smoothing : ``"load"``: weight of the newest chunk in the load factor's EMA (0 < a <= 1).
    busy_utilization : a reported utilization at or above this holds back costlier upgrades.
    snr_levels : ``"snr"``: ``(below_db, min_left)`` steps, thresholds decreasing, lefts
        non-decreasing (default: below 20 dB the middle left of ``contexts``, below 10 dB the
        largest); above the first threshold no left is required.
    snr_hysteresis_db : ``"snr"``: dB above a threshold needed to leave its step.
    upgrade_after : consecutive chunks an upgrade must hold before it is taken.

    Example
    -------
    >>> controller = ContextController([(8, 0), (32, 3)], 0.04, policies=["latency"],
    ...                                compute_ms={(8, 0): 2.0, (32, 3): 4.0},
    ...                                latency_budget_ms=300)
    >>> controller.first_context()
    (32, 3)
    """

    def __init__(
        self,
        contexts: Sequence[Sequence[int]],
        frame_seconds: float,
        *,
        compute_ms: Mapping[Context, float],
        policies: Iterable[str],
        latency_budget_ms: float | None = None,
        accuracy_rank: Sequence[Sequence[int]] | None = None,
        headroom: float = 0.7,
        load_smoothing: float = 0.5,
        busy_utilization: float = 0.9,
        snr_levels: Sequence[tuple[float, int]] | None = None,
        snr_hysteresis_db: float = 3.0,
        upgrade_after: int = 5,
    ):
        self.contexts = _check_contexts(contexts)
        self.frame_seconds = _check_positive("frame_seconds", frame_seconds)
        self.compute_ms = _check_compute(compute_ms, self.contexts)
        self.policies = _check_policies(policies)
        self.latency_budget_ms = _check_budget(latency_budget_ms, self.policies)
        self.rank = _check_rank(accuracy_rank, self.contexts)
        self.headroom = _check_fraction("headroom", headroom)
        self.load_smoothing = _check_fraction("load_smoothing", load_smoothing)
        self.busy_utilization = _check_fraction("busy_utilization", busy_utilization)
        self.snr_levels = _check_snr_levels(snr_levels, self.contexts, self.policies)
        if not math.isfinite(snr_hysteresis_db) or snr_hysteresis_db < 0:
            raise ValueError(f"snr_hysteresis_db must be a finite value >= 0, got "
                             f"{snr_hysteresis_db!r}")
        self.snr_hysteresis_db = float(snr_hysteresis_db)
        if isinstance(upgrade_after, bool) or not isinstance(upgrade_after, int) \
                or upgrade_after < 1:
            raise ValueError(f"upgrade_after must be an int >= 1 (chunks), got {upgrade_after!r}")
        self.upgrade_after = upgrade_after
        self._reset()

    def _reset(self) -> None:
        self.load_factor = 1.0
        self.current: Context | None = None
        self.switches: list[dict] = []
        self._snr_db: float | None = None
        self._snr_level = 0
        self._pending: Context | None = None
        self._held = 0

    def first_context(self) -> Context:
        """Starts (or restarts) the stream: the context of its first chunk, unloaded and with
        an unknown SNR; logged as the first entry of ``switches``."""
        self._reset()
        self.current, reason = self._choose()
        self.switches.append({"time": 0.0, "from": None, "to": self.current, "reason": reason})
        return self.current

    def next_context(self, report: ChunkReport) -> Decision:
        """Takes the report of the chunk that just ran, returns the context of the next one.

        ``report.context`` is taken as the current context (what the stream actually ran)."""
        ran = self._check_report(report)
        self.current = ran  # what the stream actually ran is the truth
        if "load" in self.policies:
            ratio = report.compute_seconds * 1000 / self.compute_ms[ran]
            self.load_factor += self.load_smoothing * (ratio - self.load_factor)
        if "snr" in self.policies:
            self._update_snr(report.snr_db)
        target, why = self._choose()
        if target == ran:
            self._pending, self._held = None, 0  # an upgrade must hold on consecutive chunks
            return Decision(ran, None)
        reason = self._switch_reason(ran, target, why, report.utilization)
        if reason is None:
            return Decision(ran, None)
        self.switches.append({"time": report.stream_seconds, "from": ran, "to": target,
                              "reason": reason})
        self.current, self._pending, self._held = target, None, 0
        return Decision(target, reason)

    # -- predictions -------------------------------------------------------------------------

    def chunk_ms(self, context: Context) -> float:
        """Audio duration of one chunk of ``context`` (ms)."""
        return (context[1] + 1) * self.frame_seconds * 1000

    def predicted_compute_ms(self, context: Context) -> float:
        """Calibrated compute per chunk scaled by the current load factor (ms)."""
        return self.compute_ms[context] * self.load_factor

    def predicted_latency_ms(self, context: Context) -> float:
        """Chunk duration + predicted compute (ms)."""
        return self.chunk_ms(context) + self.predicted_compute_ms(context)

    def cost(self, context: Context) -> float:
        """Calibrated compute per second of audio (ms per ms); the load factor scales all
        contexts alike, so it does not change their order."""
        return self.compute_ms[context] / self.chunk_ms(context)

    # -- the decision rule -------------------------------------------------------------------

    def _violations(self, context: Context) -> list[str]:
        """The constraints ``context`` breaks now, each as a reason naming its numbers."""
        broken, name = [], list(context)
        chunk, compute = self.chunk_ms(context), self.predicted_compute_ms(context)
        if "latency" in self.policies and chunk + compute > self.latency_budget_ms:
            broken.append(f"latency: {name} predicted {chunk:.0f} + {compute:.1f} ms = "
                          f"{chunk + compute:.0f} ms > {self.latency_budget_ms:g} ms budget")
        if "load" in self.policies and not self._within_headroom(context):
            broken.append(f"load: {name} predicted {compute:.1f} ms > {self.headroom:g} x "
                          f"{chunk:.0f} ms chunk (load x{self.load_factor:.2f})")
        return broken

    def _within_headroom(self, context: Context) -> bool:
        return self.predicted_compute_ms(context) <= self.headroom * self.chunk_ms(context)

    def _choose(self) -> tuple[Context, str]:
        """The rule's context for the next chunk, and why."""
        admissible = [c for c in self.contexts if not self._violations(c)]
        if not admissible:
            return self._nothing_fits()
        if "snr" in self.policies:
            return self._cheapest_with_left(admissible)
        best = min(admissible, key=self.rank.__getitem__)
        return best, f"most accurate that fits: {list(best)} ({self._fit(best)})"

    def _cheapest_with_left(self, admissible: list[Context]) -> tuple[Context, str]:
        need = self._required_left()
        pool = [c for c in admissible if c[0] >= need]
        if not pool:
            largest = max(c[0] for c in admissible)
            pool = [c for c in admissible if c[0] == largest]
        best = min(pool, key=lambda c: (self.cost(c), self.rank[c]))
        what = "cheapest such" if best[0] >= need else "none admissible, largest left"
        per_second = self.cost(best) * self.load_factor * 1000
        return best, (f"{self._snr_text()}: {what} {list(best)} ({per_second:.0f} ms compute "
                      "per s of audio)")

    def _nothing_fits(self) -> tuple[Context, str]:
        within = [c for c in self.contexts if self._within_headroom(c)]
        if "load" in self.policies and not within:
            best = min(self.contexts, key=lambda c: (self.cost(c), self.rank[c]))
            what = "the cheapest per second of audio"
        else:
            pool = within if "load" in self.policies else self.contexts
            best = min(pool, key=lambda c: (self.predicted_latency_ms(c), self.rank[c]))
            what = "the lowest latency" + (" within headroom" if "load" in self.policies else "")
        return best, f"nothing fits: {'; '.join(self._violations(best))}; running {what}"

    def _fit(self, context: Context) -> str:
        """How ``context`` fits the active constraints, with numbers."""
        chunk, compute = self.chunk_ms(context), self.predicted_compute_ms(context)
        parts = []
        if "latency" in self.policies:
            parts.append(f"latency {chunk + compute:.0f} <= {self.latency_budget_ms:g} ms")
        if "load" in self.policies:
            parts.append(f"compute {compute:.1f} <= {self.headroom:g} x {chunk:.0f} ms at load "
                         f"x{self.load_factor:.2f}")
        return ", ".join(parts)

    def _switch_reason(self, current: Context, target: Context, why: str,
                       utilization: float | None) -> str | None:
        """The reason to switch now, or None while an upgrade is held back."""
        forced = self._violations(current)
        if forced:
            then = why if why.startswith("nothing fits") else str(list(target))
            return f"{'; '.join(forced)} -> {then}"
        if self.rank[target] >= self.rank[current] and self.cost(target) <= self.cost(current):
            return why  # a safe step down
        busy = utilization is not None and utilization >= self.busy_utilization
        if busy and self.cost(target) > self.cost(current):
            self._pending, self._held = None, 0
            return None
        if target != self._pending:
            self._pending, self._held = target, 0
        self._held += 1
        return f"{why}; held {self._held} chunks" if self._held >= self.upgrade_after else None

    # -- SNR ---------------------------------------------------------------------------------

    def _update_snr(self, snr_db: float | None) -> None:
        """Moves the SNR step: down at once, up only past threshold + hysteresis."""
        self._snr_db = None if snr_db is None or math.isnan(snr_db) else float(snr_db)
        if self._snr_db is None:
            self._snr_level = 0
            return
        raw = sum(self._snr_db < below for below, _ in self.snr_levels)
        level = max(self._snr_level, raw)  # a noisier step: at once
        while level > raw and self._snr_db >= self.snr_levels[level - 1][0] + \
                self.snr_hysteresis_db:
            level -= 1
        self._snr_level = level

    def _required_left(self) -> int:
        return self.snr_levels[self._snr_level - 1][1] if self._snr_level else 0

    def _snr_text(self) -> str:
        if self._snr_db is None:
            return "snr: not known yet, no left needed"
        if not self._snr_level:
            return f"snr: {self._snr_db:.1f} dB >= {self.snr_levels[0][0]:g} dB, no left needed"
        below, left = self.snr_levels[self._snr_level - 1]
        if self._snr_db < below:
            return f"snr: {self._snr_db:.1f} dB < {below:g} dB, needs left >= {left}"
        return (f"snr: {self._snr_db:.1f} dB < {below + self.snr_hysteresis_db:g} dB ({below:g} + "
                f"{self.snr_hysteresis_db:g} dB hysteresis), needs left >= {left}")

    def _check_report(self, report: ChunkReport) -> Context:
        context = tuple(report.context)
        if context not in self.rank:
            raise ValueError(f"report: context {list(context)} is not one of the controller's "
                             f"contexts {[list(c) for c in self.contexts]}")
        if not math.isfinite(report.compute_seconds) or report.compute_seconds < 0:
            raise ValueError(f"report: compute_seconds must be finite and >= 0, got "
                             f"{report.compute_seconds!r}")
        if report.utilization is not None and not 0 <= report.utilization <= 1:
            raise ValueError(f"report: utilization must be in [0, 1] or None, got "
                             f"{report.utilization!r}")
        return context


# -- argument checks ---------------------------------------------------------------------------

def _check_contexts(contexts: Sequence[Sequence[int]]) -> list[Context]:
    checked = [validate_context(tuple(c), f"contexts[{i}]") for i, c in enumerate(contexts)]
    if not checked:
        raise ValueError("contexts is empty: give at least one (left, right) context")
    for context in checked:
        if -1 in context:
            raise ValueError(f"contexts: {list(context)} is unlimited (-1); an adaptive stream "
                             "needs finite contexts, whose calibrated compute per chunk is fixed")
    if len(set(checked)) != len(checked):
        raise ValueError(f"contexts has duplicates: {[list(c) for c in checked]}")
    return checked


def _check_compute(compute_ms: Mapping[Context, float], contexts: list[Context]) -> dict:
    given = {tuple(k): v for k, v in compute_ms.items()}
    missing = [list(c) for c in contexts if c not in given]
    if missing:
        raise ValueError(f"compute_ms has no calibrated compute for {missing}; measure every "
                         "context (recipes/transcribe.py --mode benchmark)")
    return {c: _check_positive(f"compute_ms[{list(c)}]", given[c]) for c in contexts}


def _check_policies(policies: Iterable[str]) -> frozenset[str]:
    names = [policies] if isinstance(policies, str) else list(policies)
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose among {list(POLICIES)}")
    if not names:
        raise ValueError(f"policies is empty: give at least one of {list(POLICIES)}")
    return frozenset(names)


def _check_budget(budget: float | None, policies: frozenset[str]) -> float | None:
    if "latency" not in policies:
        if budget is not None:
            raise ValueError("latency_budget_ms is used only by the 'latency' policy; add it to "
                             "policies or drop latency_budget_ms")
        return None
    if budget is None:
        raise ValueError("the 'latency' policy needs latency_budget_ms")
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"latency_budget_ms must be a finite value > 0, got {budget!r}")
    return float(budget)


def _check_rank(rank: Sequence[Sequence[int]] | None, contexts: list[Context]) -> dict:
    if rank is None:  # ASSUMPTION: a longer chunk, then a longer left context, is more accurate
        order = sorted(contexts, key=lambda c: (c[1], c[0]), reverse=True)
    else:
        order = [tuple(c) for c in rank]
        if len(order) != len(contexts) or set(order) != set(contexts):
            raise ValueError(f"accuracy_rank {[list(c) for c in order]} must list every context "
                             f"once, best first: {[list(c) for c in contexts]}")
    return {context: index for index, context in enumerate(order)}


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_fraction(name: str, value: float) -> float:
    if _check_positive(name, value) > 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _check_snr_levels(levels: Sequence[tuple[float, int]] | None, contexts: list[Context],
                      policies: frozenset[str]) -> list[tuple[float, int]]:
    if "snr" not in policies and levels is not None:
        raise ValueError("snr_levels is used only by the 'snr' policy; add it to policies or "
                         "drop snr_levels")
    lefts = sorted({left for left, _ in contexts})
    if levels is None:
        return [(20.0, lefts[len(lefts) // 2]), (10.0, lefts[-1])]
    try:
        checked = [(float(db), left) for db, left in levels]
    except (TypeError, ValueError):
        checked = []
    dbs, needs = [db for db, _ in checked], [left for _, left in checked]
    bad = (not checked or not all(math.isfinite(db) for db in dbs)
           or any(a <= b for a, b in zip(dbs, dbs[1:]))
           or not all(isinstance(n, int) and 0 <= n <= lefts[-1] for n in needs)
           or any(a > b for a, b in zip(needs, needs[1:])))
    if bad:
        raise ValueError(f"snr_levels {list(levels)} must be (below_db, min_left) steps with "
                         f"finite, strictly decreasing dB and int lefts non-decreasing within "
                         f"0..{lefts[-1]} (the largest left of contexts)")
    return checked
