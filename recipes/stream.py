"""A stream of raw audio -> partial transcripts, chunk by chunk, whose context may switch at any
chunk boundary (by hand, or by an adaptive controller), with bounded memory and flat cost."""
from __future__ import annotations

import time

import torch

from modules.adaptive import ChunkReport, ContextController, device_utilization
from modules.context import Context, PiecewiseContext, describe_context
from modules.ctc import IncrementalGreedyCTC
from modules.features import FbankStream
from modules.snr import RunningSNR


class Stream:
    """Raw audio in pieces of any size -> partial transcripts, equal to offline at the end.

    Arguments
    ---------
    recognizer : a ``inference.Recognizer``.
    context : the context of the first chunk.
    max_left : the largest left context a later ``switch`` may ask for (its caches keep that
        many frames); default: the largest trained left context with a controller, else the
        stream keeps ``context``.
    controller : a ``modules.adaptive.ContextController`` that picks each next chunk's context
        from the chunk just encoded (its compute time, the audio's running SNR).
    compiled : run the encoder's chunk step compiled (``modules.compiled_stream``: about half
        the per-chunk compute of the demo model on a CPU, after a one-time compilation of tens
        of seconds per context the stream runs).

    Decoding follows the recognizer's (``modules.decoding``): greedy CTC and the CTC prefix
    beam give partial transcripts chunk by chunk; ``attention_rescoring`` also keeps the
    utterance's encoder output, which ``finish`` rescores the beam's n-best with (its
    ``second_pass_seconds``). ``first_partial`` records when the transcript first held text
    (audio seconds and that chunk's compute). With greedy CTC, memory stays bounded: the caches
    of ``max_left`` frames, the features of one chunk, the transcript's text and one open
    word's token ids; no log-probabilities are kept.
    ``switches`` lists every change of context (audio time, from, to, reason) and ``stats`` the
    chunks, audio, compute and deadline misses (compute longer than the chunk) per context.
    The final transcript equals the offline pass under the piecewise context the stream ran.
    """

    def __init__(self, recognizer, context: Context, max_left: int | None = None,
                 controller: ContextController | None = None, compiled: bool = False):
        self.recognizer = recognizer
        self.encoder = recognizer.encoder
        self.front_end = FbankStream(recognizer.hparams["compute_features"])
        if max_left is None and controller is not None:
            max_left = max(left for left, _ in recognizer.trained_contexts)
        self.state = self.encoder.make_streaming_context(
            recognizer.check_trained(context) if max_left is not None else context, max_left)
        # compiled: the encoder steps of ``modules.compiled_stream`` (the recognizer's, shared
        # by its streams), whose caches are ``step_state``; ``state`` then keeps the context.
        self.compiled = compiled
        self.step = recognizer.compiled_step(context, max_left) if compiled else None
        self.step_state = self.step.initial_state() if compiled else None
        if compiled:  # every step it may run, compiled now: not inside a chunk's compute
            reachable = [c for c in recognizer.trained_contexts if 0 <= c[0] <= max_left] \
                if max_left is not None else []
            for step in {self.step, *(recognizer.compiled_step(c, max_left) for c in reachable)}:
                step.warm_up()
        decoding = recognizer.decoding.decoding
        self.decoder = IncrementalGreedyCTC(recognizer.sp) if decoding == "ctc_greedy" else \
            BeamText(recognizer)
        self.memory: list[torch.Tensor] | None = [] if decoding == "attention_rescoring" else None
        self.first_partial: dict | None = None
        self.second_pass_seconds: float | None = None
        self.controller = controller
        self.snr = RunningSNR(recognizer.hparams["sample_rate"]) if (
            controller is not None and "snr" in controller.policies) else None
        self.snr_db: float | None = None
        self.pending: torch.Tensor | None = None
        self.ended = False  # finish() was called
        self.seconds = 0.0  # audio encoded so far
        self.switches: list[dict] = []
        self.runs: list[list] = []  # [context, chunks] per stretch between switches
        self.stats: dict[Context, dict] = {}

    @property
    def context(self) -> Context:
        """The context of the next chunk."""
        return self.state.context

    @property
    def chunk(self) -> int:
        """Feature frames of the next chunk."""
        return self.encoder.chunk_frames(self.state)

    def switch(self, context, reason: str = "requested") -> None:
        """Runs the next chunks under ``context`` (a preset name, ``"L,R"`` or pair): a context
        the model was trained for, with a left context within the stream's ``max_left``."""
        context = self.recognizer.check_trained(self.recognizer.context(context))
        if context == self.context:
            return
        if self.state.max_left is None:
            raise ValueError("this stream keeps its context: start it with "
                             "recognizer.stream(context, max_left=...) to switch")
        previous = self.context
        self.encoder.switch_context(self.state, context)  # checks it, and keeps it
        if self.compiled:
            self.step = self.recognizer.compiled_step(context, self.state.max_left)
        self.switches.append({"time": round(self.seconds, 3), "from": list(previous),
                              "to": list(context), "reason": reason})

    @torch.inference_mode()
    def push(self, samples: torch.Tensor) -> str:
        """Feeds (n,) new samples; returns the transcript of every complete chunk so far."""
        if samples.dim() != 1:
            raise ValueError(f"push takes (n,) samples of one stream, got shape "
                             f"{tuple(samples.shape)}")
        if self.ended:
            raise ValueError("this stream has ended (finish() was called): start a new one with "
                             "recognizer.stream(...)")
        begin = time.perf_counter()
        if self.snr is not None:
            self.snr_db = self.snr.push(samples)
        feats = self.recognizer.normalize(
            self.front_end.push(samples[None].to(self.recognizer.device)))
        self.pending = feats if self.pending is None else torch.cat([self.pending, feats], dim=1)
        while self.pending.shape[1] >= self.chunk:
            chunk, self.pending = self.pending[:, :self.chunk], self.pending[:, self.chunk:]
            begin = self._encode(chunk, begin)
        return self.decoder.text()

    @torch.inference_mode()
    def finish(self) -> str:
        """Encodes the last, shorter chunk (and runs the second pass); returns the final
        transcript."""
        self.ended = True
        if self.pending is not None and self.pending.shape[1]:
            self._encode(self.pending, time.perf_counter())
            self.pending = self.pending[:, :0]
        if isinstance(self.decoder, BeamText) and self.decoder.final is None:
            begin = time.perf_counter()  # the beam's end: the LM's end scores, the second pass
            self.decoder.finish(None if self.memory is None else torch.cat(self.memory, dim=1))
            if self.memory is not None:
                self.second_pass_seconds = time.perf_counter() - begin
        return self.decoder.text()

    def text(self) -> str:
        return self.decoder.text()

    def _encode(self, feats: torch.Tensor, begin: float) -> float:
        """Encodes and decodes one chunk; records its compute since ``begin``, then lets the
        controller pick the next context. Returns the time it ended."""
        context = self.context
        if self.step is not None:
            encoded, self.step_state = self.step(feats, self.step_state)
            self.state.finished = self.step_state.finished
        else:
            encoded = self.encoder.forward_streaming(feats, self.state)
        if self.memory is not None:
            self.memory.append(encoded)
        self.decoder.push(self.recognizer.log_probs(encoded))
        end = time.perf_counter()
        chunk_seconds = feats.shape[1] * 0.01  # 10 ms feature hop
        self.seconds += chunk_seconds
        if self.first_partial is None and self.decoder.text():
            self.first_partial = {"audio_seconds": round(self.seconds, 3),
                                  "compute_seconds": end - begin}
        stats = self.stats.setdefault(context, {"chunks": 0, "audio_seconds": 0.0,
                                                "compute_seconds": 0.0, "deadline_misses": 0})
        stats["chunks"] += 1
        stats["audio_seconds"] += chunk_seconds
        stats["compute_seconds"] += end - begin
        stats["deadline_misses"] += end - begin > chunk_seconds
        if self.runs and self.runs[-1][0] == context:
            self.runs[-1][1] += 1
        else:
            self.runs.append([context, 1])
        if self.controller is not None and not self.state.finished:
            decision = self.controller.next_context(ChunkReport(
                context=context, chunk_seconds=chunk_seconds, compute_seconds=end - begin,
                stream_seconds=self.seconds, snr_db=self.snr_db,
                utilization=device_utilization(self.recognizer.device)))  # CUDA + NVML only
            if decision.context != self.context:
                self.switch(decision.context, decision.reason)
        return time.perf_counter()

    def piecewise_context(self) -> PiecewiseContext:
        """The context of every chunk encoded so far: the stream's offline reference."""
        if not self.runs:
            return PiecewiseContext([[self.context]])
        return PiecewiseContext([[c for c, chunks in self.runs for _ in range(chunks)]])

    def summary(self) -> dict:
        """Switches and per-context statistics, JSON-ready."""
        frame = self.encoder.frame_seconds
        return {"switches": self.switches, "contexts": [
            {"context": list(c), "context_seconds": describe_context(c, frame), **s,
             "compute_per_audio_second": round(s["compute_seconds"] / max(s["audio_seconds"], 1e-9), 5)}
            for c, s in self.stats.items()]}


class BeamText:
    """A CTC prefix beam (and second pass) with ``IncrementalGreedyCTC``'s interface:
    ``push`` log-probabilities, ``text`` the best transcript so far (the final one once
    ``finish`` has rescored the n-best)."""

    def __init__(self, recognizer):
        self.recognizer = recognizer
        self.search = recognizer.utterance_decoder()
        self.final: str | None = None

    def push(self, log_probs: torch.Tensor) -> None:
        """(1, C, V + 1) log-probabilities of the next frames."""
        self.search.push(log_probs.cpu())

    def finish(self, memory: torch.Tensor) -> None:
        """The second pass over (1, T, D), the utterance's encoder output."""
        self.final = self.recognizer.text(self.search.finish(memory))

    def text(self) -> str:
        if self.final is not None:
            return self.final
        return self.recognizer.text(self.search.partial())
