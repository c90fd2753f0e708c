"""Streaming contexts: parsing, the per-batch context sampler, and chunked attention masks.

A context is a pair ``(left, right)`` counted in encoder frames (NeMo's ``att_context_size``):
frames are grouped in chunks of ``right + 1`` frames, and a frame sees its whole chunk plus
``left`` frames before the chunk start. ``left = -1`` means all the past; ``right = -1`` means
the whole utterance is one chunk (offline, ``[-1, -1]``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import ddp_broadcast

logger = logging.getLogger(__name__)

Context = tuple[int, int]
ContextSpec = Union[str, Sequence[int]]


def validate_context(context: Sequence[int], name: str = "context") -> Context:
    """Checks and returns a ``(left, right)`` pair of ints."""
    if (isinstance(context, str) or len(context) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in context)):
        raise ValueError(f"{name} must be a [left, right] pair of ints, got {context!r}")
    left, right = context
    if left < -1 or right < -1:
        raise ValueError(f"{name} {list(context)}: values must be >= -1 (-1 = unlimited)")
    if right == -1 and left != -1:
        raise ValueError(f"{name} {list(context)}: right = -1 (whole utterance) needs left = -1")
    return int(left), int(right)


def parse_context(spec: ContextSpec, presets: Mapping[str, Sequence[int]] | None = None) -> Context:
    """Turns a preset name, an ``"L,R"`` string or an ``[L, R]`` pair into a context.

    Example
    -------
    >>> parse_context("medium", {"medium": [32, 3]})
    (32, 3)
    >>> parse_context("16,0")
    (16, 0)
    """
    presets = presets or {}
    if isinstance(spec, str):
        if spec in presets:
            return validate_context(list(presets[spec]), f"preset {spec!r}")
        try:
            left, right = (int(v) for v in spec.replace("[", "").replace("]", "").split(","))
        except ValueError:
            names = ", ".join(presets) or "none defined"
            raise ValueError(
                f"context {spec!r} is neither a preset ({names}) nor a 'left,right' pair"
            ) from None
        return validate_context((left, right))
    return validate_context(list(spec))


def context_from_dynchunk(config) -> Context:
    """SpeechBrain's ``DynChunkTrainConfig(chunk_size, left_context_size)`` as a ``(left, right)``
    pair: chunks of ``chunk_size`` encoder frames (``right = chunk_size - 1``) that see
    ``left_context_size`` whole chunks before them (``left = chunk_size * left_context_size``;
    None: all the past, ``left = -1``). Both count encoder frames, after subsampling.

    Example
    -------
    >>> from speechbrain.utils.dynamic_chunk_training import DynChunkTrainConfig
    >>> context_from_dynchunk(DynChunkTrainConfig(4, 8))
    (32, 3)
    """
    if not isinstance(config.chunk_size, int) or config.chunk_size < 1:
        raise ValueError(f"DynChunkTrainConfig.chunk_size must be an int >= 1 (encoder frames), "
                         f"got {config.chunk_size!r}")
    left = config.left_context_size_frames()
    if left is not None and left < 0:
        raise ValueError(f"DynChunkTrainConfig.left_context_size must be >= 0 chunks or None, "
                         f"got {config.left_context_size!r}")
    return validate_context((-1 if left is None else left, config.chunk_size - 1))


def parse_contexts(specs, presets: Mapping[str, Sequence[int]] | None = None) -> list[Context]:
    """``att_context_size``-style specs (one spec, or a list of them) -> contexts.

    Example
    -------
    >>> parse_contexts(["low", [8, 0]], {"low": [16, 1]})
    [(16, 1), (8, 0)]
    """
    if isinstance(specs, str) or (len(specs) == 2 and all(isinstance(v, int) for v in specs)):
        specs = [specs]
    return [parse_context(spec, presets) for spec in specs]


def describe_context(context: Context, frame_seconds: float) -> str:
    """Human-readable context in frames and seconds, e.g. ``[16, 0] (left 0.64 s, chunk 0.04 s)``."""
    left, right = context
    if right == -1:
        return f"[{left}, {right}] (full utterance, offline)"
    left_s = "all past" if left == -1 else f"{left * frame_seconds:.2f} s"
    return f"[{left}, {right}] (left {left_s}, chunk {(right + 1) * frame_seconds:.2f} s)"


def chunk_windows(num_frames: int, context: Context, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last frame each frame may attend to (inclusive), before length clipping.

    Returns
    -------
    (first, last): two (T,) long tensors. ``first`` is 0 when the past is unlimited,
    ``last`` is ``T - 1`` for the offline context.
    """
    frames = torch.arange(num_frames, device=device)
    left, right = context
    if right == -1:
        return torch.zeros_like(frames), torch.full_like(frames, num_frames - 1)
    chunk_start = frames - frames % (right + 1)
    last = chunk_start + right
    first = torch.zeros_like(frames) if left == -1 else (chunk_start - left).clamp(min=0)
    return first, last


def chunk_attention_mask(num_frames: int, context: Context, device=None) -> torch.Tensor:
    """(T, T) bool mask, True where query frame t may attend to key frame k."""
    first, last = chunk_windows(num_frames, context, device)
    keys = torch.arange(num_frames, device=device)
    return (keys[None, :] >= first[:, None]) & (keys[None, :] <= last[:, None])


@dataclass(frozen=True)
class PiecewiseContext:
    """Contexts that change at chunk boundaries: the offline reference of a switched stream.

    Row ``b`` of a batch is cut into successive chunks; chunk ``k`` has ``right_k + 1`` frames and
    its frames see their whole chunk plus the ``left_k`` frames before its start (``left = -1``:
    all the past), where ``(left_k, right_k) = schedules[b][k]``. Past the last listed chunk the
    last context goes on. A stream whose context switches between chunks computes exactly the
    offline pass under this context (``StreamingEncoder.switch_context``).

    Arguments
    ---------
    schedules : per batch row, the context of each successive chunk (one row: every row).

    Example
    -------
    >>> first, last = PiecewiseContext([[(2, 1), (0, 0), (1, 2)]]).windows(6)
    >>> first.tolist(), last.tolist()
    ([[0, 0, 2, 2, 2, 2]], [[1, 1, 2, 5, 5, 5]])
    """

    schedules: tuple[tuple[Context, ...], ...]

    def __init__(self, schedules: Sequence[Sequence[Sequence[int]]]):
        rows = tuple(tuple(validate_context(tuple(c), f"chunk {k} of row {b}")
                           for k, c in enumerate(row)) for b, row in enumerate(schedules))
        if not rows or not all(rows):
            raise ValueError("a piecewise context needs at least one chunk context per row")
        for row in rows:
            for context in row:
                if context[1] == -1:
                    raise ValueError(f"piecewise context: {list(context)} is offline (right = -1), "
                                     "it has no chunk to switch at; use finite pairs")
        object.__setattr__(self, "schedules", rows)

    def contexts(self) -> set[Context]:
        """Every context the schedules use."""
        return {context for row in self.schedules for context in row}

    def map(self, function: Callable[[Context], Context]) -> "PiecewiseContext":
        """The same chunks with ``function`` applied to every context (e.g. a per-layer cap)."""
        return PiecewiseContext([[function(c) for c in row] for row in self.schedules])

    def windows(self, num_frames: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last frame each frame may attend to (inclusive): two (B, T) long tensors
        (B = number of rows)."""
        firsts, lasts = [], []
        for row in self.schedules:
            first, last, start, k = [], [], 0, 0
            while start < num_frames:
                left, right = row[min(k, len(row) - 1)]
                end = start + right + 1
                first += [0 if left == -1 else max(0, start - left)] * (right + 1)
                last += [end - 1] * (right + 1)
                start, k = end, k + 1
            firsts.append(first[:num_frames])
            lasts.append(last[:num_frames])
        return (torch.tensor(firsts, dtype=torch.long, device=device),
                torch.tensor(lasts, dtype=torch.long, device=device))


@register_checkpoint_hooks
class ContextSampler:
    """Draws one streaming context per training batch, seeded and reproducible.

    The same draw is handed to the encoder's attention and to the masker (see
    ``recipes/train.py``), so they never disagree. Under DDP every process draws the main
    process's context without any message per step: the samplers start from the same seed
    (and the same checkpointed state) and draw once per training step; ``check_in_sync``
    verifies it once per epoch.

    Arguments
    ---------
    att_context_size : a ``[left, right]`` pair, a preset name, or a list of them.
    att_context_probs : probability of each context (default: uniform). Must sum to 1
        within 1e-6 (``[0.1] * 10`` is accepted).
    presets : preset name -> ``[left, right]`` in encoder frames.
    frame_seconds : duration of one encoder frame, for log lines.
    seed : seed of the sampler's own random generator (saved in checkpoints).

    Example
    -------
    >>> sampler = ContextSampler([[16, 0], [32, 1]], [0.5, 0.5], seed=1)
    >>> sampler.sample() in [(16, 0), (32, 1)]
    True
    """

    def __init__(
        self,
        att_context_size: ContextSpec | Sequence[ContextSpec],
        att_context_probs: Sequence[float] | None = None,
        presets: Mapping[str, Sequence[int]] | None = None,
        frame_seconds: float = 0.04,
        seed: int = 0,
    ):
        specs = att_context_size
        if isinstance(specs, str) or (len(specs) == 2 and all(isinstance(v, int) for v in specs)):
            specs = [specs]
        self.contexts = [parse_context(s, presets) for s in specs]
        if not self.contexts:
            raise ValueError("att_context_size is empty: give at least one [left, right] pair")
        if att_context_probs is None:
            att_context_probs = [1.0 / len(self.contexts)] * len(self.contexts)
        probs = [float(p) for p in att_context_probs]
        if len(probs) != len(self.contexts):
            raise ValueError(
                f"att_context_probs has {len(probs)} values for {len(self.contexts)} contexts"
            )
        if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
            raise ValueError(f"att_context_probs {probs} must be >= 0 and sum to 1 (sum {sum(probs)})")
        self.probs = torch.tensor(probs, dtype=torch.float64)
        self.frame_seconds = frame_seconds
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = [0] * len(self.contexts)
        logger.info("Context sampler: %s", self.describe())

    def sample(self) -> Context:
        """One context for the next batch (under DDP: the same on every rank, see the class)."""
        index = int(torch.multinomial(self.probs, 1, generator=self.generator))  # CPU: no sync
        self.counts[index] += 1
        return self.contexts[index]

    def check_in_sync(self) -> None:
        """Under DDP, raises unless this process's sampler is in the main process's state (so
        that it draws the same contexts); one broadcast. Nothing to check in a single process."""
        if not torch.distributed.is_initialized():
            return
        state = self.generator.get_state()
        if not torch.equal(ddp_broadcast(state), state):
            raise RuntimeError(
                f"the context sampler of rank {torch.distributed.get_rank()} is not in the main "
                "process's state: every process must run with the same hparams seed and resume "
                "from the same checkpoint")

    def describe(self, counts: Iterable[int] | None = None) -> str:
        """Every context in frames and seconds, with its probability (or draw count)."""
        values = counts if counts is not None else [f"p={p:.3g}" for p in self.probs.tolist()]
        return "; ".join(f"{describe_context(c, self.frame_seconds)}: {v}"
                         for c, v in zip(self.contexts, values))

    def pop_counts(self) -> str:
        """Draw counts since the last call, for the epoch's log line; resets them."""
        text = self.describe(self.counts)
        self.counts = [0] * len(self.contexts)
        return text

    @mark_as_saver
    def _save(self, path):
        torch.save({"generator": self.generator.get_state(), "counts": self.counts}, path)

    @mark_as_loader
    def _load(self, path, end_of_epoch=False):
        state = torch.load(path)
        self.generator.set_state(state["generator"])
        self.counts = state["counts"]


def set_dynamic_context(model: torch.nn.Module | Mapping, preset_or_pair: ContextSpec,
                        presets: Mapping[str, Sequence[int]] | None = None) -> Context:
    """Fixes the context of every context-aware part of ``model`` (encoder and masker together).

    Any submodule with a ``set_context(context)`` method is switched. ``model`` may be an
    ``nn.Module`` or a dict of them (a Brain's ``modules``).

    Returns
    -------
    The context that was set.
    """
    context = parse_context(preset_or_pair, presets)
    roots = model.values() if isinstance(model, Mapping) else [model]
    switched = 0
    for root in roots:
        for module in root.modules():
            if hasattr(module, "set_context"):
                module.set_context(context)
                switched += 1
    if switched == 0:
        raise ValueError("set_dynamic_context: the model has no module with set_context()")
    return context
