"""One stream's encoder step compiled with ``torch.compile``, for a flat, low per-chunk cost.

Eager streaming dispatches ~1,800 small operations per 40 ms chunk at ``[8, 0]`` for a
demo-sized Conformer (``benchmarks/stream_cost.py``): their overhead, not arithmetic, sets the
cost. Compiled once per context, one chunk runs as a few fused kernels and matrix products.
Compilation needs fixed shapes, so the step keeps caches of a fixed size (the left context's
keys and values, zeros before the stream's start, masked; Mamba's last inputs or its state) and
takes the stream's position as a tensor: the mixers' fixed-window steps
(``RotarySelfAttention._fixed_window_step``, ``Mamba._fixed_window_step``). Outputs equal the eager
stream's (hence the offline pass under the same context) to float rounding, tested.
"""
from __future__ import annotations

import logging
import os
import shutil
import types
from dataclasses import dataclass, replace

import torch

from .attention import RotarySelfAttention
from .context import Context
from .encoder import LayerState, StreamingEncoder
from .mamba import Mamba

logger = logging.getLogger(__name__)


def compiler_available() -> bool:
    """Whether a C++ compiler is on the PATH (``$CXX``, g++, c++ or clang++): Inductor needs
    one to compile for the CPU."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return any(shutil.which(name) for name in names)


class CompileError(ValueError):
    """torch.compile could not build the step (no C++ compiler, most often)."""


# The compiled code's wrapper in C++ rather than Python: ~8 % less per chunk here. (Inductor's
# freezing would not apply: the parameters of a compiled function are inputs of its graph, so
# weights loaded later are used, never stale.)
INDUCTOR_OPTIONS = {"cpp_wrapper": True}


@dataclass(frozen=True)
class StepState:
    """A compiled stream's caches: all fixed-size tensors, and whether it has ended."""

    position: torch.Tensor  # () encoder frames seen
    subsampling: tuple[torch.Tensor, ...]
    mixers: tuple[tuple[torch.Tensor, ...], ...]  # per block, ``mixer_caches``
    convolutions: tuple[torch.Tensor, ...]  # per block, (1, D, kernel - 1); empty without one
    finished: bool = False


def mixer_caches(mixer: torch.nn.Module, left: int) -> tuple[str, ...]:
    """The names of a block mixer's fixed-size caches: attention keys and values (1, H, window,
    head_dim); Mamba's convolution frames and its state (``left = -1``) or its last inputs."""
    if isinstance(mixer, RotarySelfAttention):
        return ("k", "v")
    return ("conv", "state") if left == -1 else ("conv", "window")


class CompiledStreamStep:
    """The chunk step of an attention encoder (Conformer or Transformer) for one stream under
    one context, compiled on its first call or ``warm_up`` (tens of seconds on a CPU; later
    streams of the same step reuse it).

    A stream may switch between the steps of several contexts built with the same ``max_left``:
    their states are interchangeable (caches of ``max_left`` frames, of which each step sees its
    own left context), and the switched stream equals the offline pass under the piecewise
    context, as ``StreamingEncoder.switch_context`` does eagerly.

    Arguments
    ---------
    encoder : a Conformer, Transformer or unidirectional ConMamba encoder, in eval mode.
    context : a streamable ``[left, right]`` (bounded caches: a finite left context in every
        layer).
    max_left : the caches' size in frames, for a stream that switches (``context``'s left must
        be finite and at most it); None: the context's own left.

    Example
    -------
    >>> from modules.conformer import CausalConformerEncoder
    >>> encoder = CausalConformerEncoder(n_mels=80, d_model=32, nhead=2, num_encoder_layers=1,
    ...                                  d_ffn=64, subsampling_conv_channels=8).eval()
    >>> step = CompiledStreamStep(encoder, (4, 1))
    >>> state = step.initial_state()
    >>> step.chunk_frames  # feature frames per chunk
    8
    >>> # encoded, state = step(feats, state)  # (1, 8, 80) -> (1, 2, 32); compiles once
    """

    def __init__(self, encoder: StreamingEncoder, context: Context, max_left: int | None = None):
        mixers = [getattr(block, "mixer", None) for block in encoder.layers]
        if not isinstance(encoder, StreamingEncoder) or not all(
                type(m) in (RotarySelfAttention, Mamba) for m in mixers):
            raise ValueError(f"compiled streaming needs a Conformer, Transformer or "
                             f"unidirectional ConMamba encoder; {type(encoder).__name__} with "
                             f"{type(mixers[0]).__name__} blocks streams eagerly")
        context = encoder.check_context(context)
        layer_contexts = encoder.layer_contexts(context)
        encoder.check_streamable(context, layer_contexts)  # bounded caches, hence fixed-size
        if encoder.training:
            raise ValueError("compiled streaming is for inference: call encoder.eval() first")
        weight = next(encoder.parameters())
        self.dtype, self.device = weight.dtype, weight.device
        device = weight.device
        if device.type != "cpu":
            logger.warning("compiled streaming is measured on CPUs only: on %s it is unverified",
                           device)
        self.encoder, self.context = encoder, context
        self.lefts = [left for left, _ in layer_contexts]
        self.windows = self.lefts
        if max_left is not None:
            if context[0] == -1 or context[0] > max_left:
                raise ValueError(f"context {list(context)}: a stream that switches needs a finite "
                                 f"left context within its max_left ({max_left} frames)")
            self.windows = [left for left, _ in encoder.layer_contexts((max_left, 0))]
        self.chunk_frames = (context[1] + 1) * encoder.subsampling_factor
        # Dynamo keeps compiled code per code object, with a recompile limit shared by every
        # step built from it: each step compiles a copy of its own.
        step = self._step.__func__
        own = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__)
        self._compiled = torch.compile(types.MethodType(own, self), fullgraph=True,
                                       dynamic=False, options=INDUCTOR_OPTIONS)
        self._warm = False

    def initial_state(self) -> StepState:
        """The caches of a new stream: zeros, as the offline pass pads before frame 0."""
        weight = next(self.encoder.parameters())
        with torch.inference_mode():  # as the stream's later states; shapes by one call
            _, subsampling = self.encoder.subsampling(
                weight.new_zeros(1, self.encoder.subsampling_factor, self.encoder.subsampling.n_mels), None)
            zeros = [weight.new_zeros(c.shape) for c in subsampling]  # contiguous
            mixers = tuple(tuple(weight.new_zeros(shape) for shape in _cache_shapes(
                block.mixer, window, self.encoder.d_model)) for block, window in zip(
                self.encoder.layers, self.windows))
            convolutions = tuple(
                weight.new_zeros(1, self.encoder.d_model, block.conv.kernel_size - 1)
                if hasattr(block, "conv") else weight.new_zeros(0) for block in self.encoder.layers)
            return StepState(torch.zeros((), dtype=torch.long, device=weight.device),
                             tuple(zeros), mixers, convolutions)

    def warm_up(self) -> None:
        """Compiles the step now (a throwaway chunk of zeros), not during a stream's first
        chunk, where it would count as that chunk's compute."""
        if self._warm:
            return
        logger.info("compiling the stream step for %s (once per context; cached on disk by "
                    "torch.compile)", list(self.context))
        # torch.utils.cpp_extension warns of a missing CUDA runtime on every CPU compile
        extension_logger = logging.getLogger("torch.utils.cpp_extension")
        level = extension_logger.level
        extension_logger.setLevel(logging.ERROR)
        try:
            self(torch.zeros(1, self.chunk_frames, self.encoder.subsampling.n_mels,
                             dtype=self.dtype, device=self.device), self.initial_state())
        finally:
            extension_logger.setLevel(level)

    def __call__(self, feats: torch.Tensor, state: StepState) -> tuple[torch.Tensor, StepState]:
        """(1, frames, n_mels) normalized features of the next chunk (a shorter one ends the
        stream) -> (1, encoder frames, d_model) and the stream's next state."""
        if state.finished:
            raise ValueError("this stream has ended (its last chunk was shorter): start a new one "
                             "with initial_state()")
        frames = feats.shape[1]
        n_mels = self.encoder.subsampling.n_mels
        if (feats.dim() != 3 or feats.shape[0] != 1 or not 0 < frames <= self.chunk_frames
                or feats.shape[2] != n_mels
                or (feats.dtype, feats.device) != (self.dtype, self.device)):
            raise ValueError(f"a compiled stream takes chunks of (1, <= {self.chunk_frames}, "
                             f"{n_mels}) {self.dtype} features on {self.device}, got "
                             f"{tuple(feats.shape)} {feats.dtype} on {feats.device}")
        valid = -(-frames // self.encoder.subsampling_factor)
        try:
            encoded, position, *caches = self._run(feats, valid, state)
        except Exception as error:
            if not self._warm:
                raise self._compile_error(error) from error
            # A state this step did not make (copied, loaded, from another step): the compiled
            # code takes fresh inference tensors of its own states' layout, or refuses it.
            encoded, position, *caches = self._run(feats, valid, self._own_layout(state))
        self._warm = True
        return encoded[:, :valid], replace(state, position=position, subsampling=caches[0],
                                           mixers=caches[1], convolutions=caches[2],
                                           finished=frames < self.chunk_frames)

    def _run(self, feats: torch.Tensor, valid: int, state: StepState) -> tuple:
        with torch.inference_mode(), torch.compiler.set_stance(
                skip_guard_eval_unsafe=self._warm):
            # A fresh inference tensor, laid out like the states (zeros after a shorter chunk,
            # as the offline pass pads the last group).
            chunk = feats.new_zeros(1, self.chunk_frames, feats.shape[2])
            chunk[:, :feats.shape[1]] = feats
            # Once compiled, the inputs' layouts never change: no guard left to check.
            return self._compiled(chunk, torch.tensor(valid, device=feats.device),
                                  state.position, state.subsampling, state.mixers,
                                  state.convolutions)

    def _own_layout(self, state: StepState) -> StepState:
        """``state`` as fresh contiguous inference tensors, if it has this step's shapes."""
        def tensors(s: StepState) -> list:
            return [s.position, *s.subsampling, *(t for m in s.mixers for t in m),
                    *s.convolutions]

        if ([(t.shape, t.dtype, t.device) for t in tensors(state)]
                != [(t.shape, t.dtype, t.device) for t in tensors(self.initial_state())]):
            raise ValueError(f"this state does not fit the compiled step of {list(self.context)} "
                             "(made by another step or model?): start from its initial_state()")
        with torch.inference_mode():
            def fresh(t):
                return t.clone(memory_format=torch.contiguous_format)
            return replace(state, position=fresh(state.position),
                           subsampling=tuple(map(fresh, state.subsampling)),
                           mixers=tuple(tuple(map(fresh, m)) for m in state.mixers),
                           convolutions=tuple(map(fresh, state.convolutions)))

    def _compile_error(self, error: Exception) -> Exception:
        """One line for a failed first call; the C++ compiler named where it is the cause."""
        text = str(error).strip()
        summary = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
        compiler = "compiler" in text.lower() or "cpp" in type(error).__name__.lower()
        hint = ("torch.compile needs a C++ compiler on the CPU (apt-get install g++): install "
                "one, or " if compiler else "")
        return CompileError(f"compiling the stream step for {list(self.context)} failed "
                            f"({summary}); {hint}stream without compiling (drop --compiled)")

    def _step(self, feats, valid, position, subsampling, mixers, convolutions):
        """The compiled chunk: every block's own ``forward_streaming`` on fixed-size caches."""
        x, new_subsampling = self.encoder.subsampling(feats, list(subsampling))
        new_mixers, new_convolutions = [], []
        for block, window, left, caches, conv in zip(self.encoder.layers, self.windows,
                                                     self.lefts, mixers, convolutions):
            names = mixer_caches(block.mixer, left)
            state = LayerState(mixer={"window_size": window, "left": left, "position": position,
                                      "valid": valid, **dict(zip(names, caches))},
                               conv=conv if hasattr(block, "conv") else None)
            x = block.forward_streaming(x, state, self.context)
            new_mixers.append(tuple(state.mixer[name] for name in names))
            new_convolutions.append(conv if state.conv is None else state.conv)
        # Fresh buffers with standard strides, like the first state's zeros: every call's
        # inputs then have the same layout (a view's strides would fail the compiled guards).
        def fresh(t):
            return t.clone(memory_format=torch.contiguous_format)
        return (x, position + x.shape[1], tuple(map(fresh, new_subsampling)),
                tuple(tuple(map(fresh, m)) for m in new_mixers),
                tuple(map(fresh, new_convolutions)))


def _cache_shapes(mixer: torch.nn.Module, window: int, d_model: int) -> list[tuple]:
    """The shapes of ``mixer_caches(mixer, window)``, of one stream."""
    if isinstance(mixer, RotarySelfAttention):
        return [(1, mixer.nhead, window, d_model // mixer.nhead)] * 2
    conv = (1, mixer.d_inner, mixer.d_conv - 1)
    return [conv, (1, mixer.d_inner, mixer.d_state) if window == -1 else
            (1, window, mixer.d_inner)]
