"""Our models behind SpeechBrain's stock inference classes: the modules and functions that an
exported model folder's ``hyperparams.yaml`` (``recipes/export.py``) names.

- ``speechbrain.inference.ASR.EncoderASR`` calls ``encoder(wavs, wav_lens)`` and then
  ``decoding_function(log_probs, wav_lens)``: :class:`OfflineCTC` and :func:`greedy_ctc_tokens`.
- ``speechbrain.inference.ASR.StreamingASR`` calls ``fea_streaming_extractor(chunk)``,
  ``enc.forward_streaming(x, enc.make_streaming_context(DynChunkTrainConfig))``, ``proj_enc(x)``
  and ``decoding_function(x, make_decoder_streaming_context())``: :class:`AudioChunks`,
  :class:`StreamingCTC`, the CTC head with a log-softmax, and :func:`greedy_ctc_tokens` with a
  :class:`GreedyCTCContext`.
- :class:`SSLEncoder` (a ``Pretrained`` of our own) returns every layer's output of an SSL
  encoder at a chosen context, for downstream tasks.

The chunk size of a stream is known only where the ``DynChunkTrainConfig`` arrives, in the
encoder's streaming context: features, their normalization and the cutting into encoder chunks
therefore all happen in :class:`StreamingCTC`; the feature "extractor" passes the audio through.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from speechbrain.decoders import ctc_greedy_decode
from speechbrain.inference.interfaces import Pretrained
from speechbrain.utils.parameter_transfer import Pretrainer
from speechbrain.utils.filter_analysis import FilterProperties

from .context import Context, parse_context
from .features import FbankStream, StreamingFbank


def encoder_frames(compute_features: StreamingFbank, encoder, wavs: torch.Tensor,
                   wav_lens: torch.Tensor | None, normalize) -> tuple[torch.Tensor, ...]:
    """Normalized features of a padded batch: (B, T, n_mels), their relative lengths (B,) and
    the number of encoder frames of each utterance (B,) (``Recognizer.transcribe_batch``'s)."""
    if wav_lens is None:
        wav_lens = torch.ones(wavs.shape[0], device=wavs.device)
    frames = compute_features.num_frames(torch.round(wav_lens * wavs.shape[1]).long())
    feats = compute_features(wavs)
    lengths = frames / feats.shape[1]
    if feats.shape[1]:
        feats = normalize(feats, lengths)
    return feats, lengths, -(-frames // encoder.subsampling_factor)


class OfflineCTC(torch.nn.Module):
    """Audio -> CTC log-probabilities in one offline pass under a fixed context (chunks and a
    limited left context, as in training): ``EncoderASR``'s ``encoder``.

    Arguments
    ---------
    compute_features : the run's ``StreamingFbank``.
    normalize : the run's feature normalization (global statistics).
    encoder : the streaming encoder.
    head : the CTC head (d_model -> vocabulary + 1, blank at 0).
    context : the ``[left, right]`` pair (or preset name with ``presets``) to decode under.
    presets : the run's ``context_presets``.
    """

    def __init__(self, compute_features, normalize, encoder, head, context,
                 presets: dict | None = None):
        super().__init__()
        self.compute_features, self.normalize = compute_features, normalize
        self.encoder, self.head = encoder, head
        self.context: Context = parse_context(context, presets)

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) audio, (B,) relative lengths -> (B, T', V + 1) log-probabilities. Frames past
        an utterance's end are a certain blank, so decoding the padded length is decoding the
        utterance (``EncoderASR`` would cut at ``round(wav_lens * T')``, a frame off at times)."""
        feats, lengths, valid = encoder_frames(self.compute_features, self.encoder, wavs,
                                               wav_lens, self.normalize)
        log_probs = self.head(self.encoder(feats, lengths, self.context)).log_softmax(-1)
        return blank_after(log_probs, valid)


def blank_after(log_probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T, V + 1) log-probabilities with the frames from ``valid`` (B,) on set to blank."""
    padding = torch.arange(log_probs.shape[1], device=log_probs.device)[None] >= valid[:, None]
    blank = torch.full_like(log_probs[:1, :1], torch.finfo(log_probs.dtype).min)
    blank[..., 0] = 0.0
    return torch.where(padding[..., None], blank, log_probs)


@dataclass
class GreedyCTCContext:
    """Best-path CTC state carried across the chunks of a batch of streams: the last output
    index of each (a token repeated across a chunk boundary collapses, as in one pass)."""

    previous: list[int] = field(default_factory=list)

    def push(self, log_probs: torch.Tensor, blank_index: int = 0) -> list[list[int]]:
        """(B, C, V + 1) log-probabilities of the next frames -> new output indices per stream."""
        best = log_probs.argmax(-1).tolist()
        if not self.previous:
            self.previous = [blank_index] * len(best)  # a first token is never collapsed
        indices = []
        for row, frames in enumerate(best):
            new = []
            for index in frames:
                if index != self.previous[row] and index != blank_index:
                    new.append(index)
                self.previous[row] = index
            indices.append(new)
        return indices


def greedy_ctc_tokens(log_probs: torch.Tensor, lengths_or_context, blank_index: int = 0
                      ) -> list[list[int]]:
    """Best-path token ids of the tokenizer per row (the head's outputs are the tokenizer's ids
    with the blank inserted at ``blank_index``).

    One function for both of SpeechBrain's calls: ``EncoderASR`` passes relative lengths (not
    needed: :class:`OfflineCTC` makes padding blank), ``StreamingASR`` the stream's
    :class:`GreedyCTCContext`.
    """
    if isinstance(lengths_or_context, GreedyCTCContext):
        indices = lengths_or_context.push(log_probs, blank_index)
    else:
        full = torch.ones(log_probs.shape[0], device=log_probs.device)
        indices = ctc_greedy_decode(log_probs, full, blank_id=blank_index)
    return [[i - (i > blank_index) for i in row] for row in indices]


def decode_streaming(tokenizer, tokens: list[int], context) -> str:
    """The text of one stream's new ``tokens``, with the space before a word-initial piece kept
    except at the very start (``context``: SpeechBrain's
    ``SentencePieceDecoderStreamingContext``). SpeechBrain's ``spm_decode_preserve_leading_space``
    does this, but asks SentencePiece for an output type that its current releases removed."""
    if not tokens:
        return ""
    text = tokenizer.decode_ids(tokens)
    if context.emitted_symbol_count and tokenizer.id_to_piece(tokens[0]).startswith("\u2581"):
        text = " " + text
    context.emitted_symbol_count += len(tokens)
    return text


class AudioChunks:
    """``StreamingASR``'s ``fea_streaming_extractor``: passes each audio chunk through
    (:class:`StreamingCTC` computes the features) and tells SpeechBrain the chunk length.

    ``StreamingASR`` cuts ``(properties.stride - 1) * chunk_size`` samples per chunk, so the
    stride here is one more than the samples per encoder frame (hop x subsampling).

    Arguments
    ---------
    hop_samples : samples per feature frame (160 at 16 kHz, 10 ms).
    subsampling_factor : feature frames per encoder frame.
    """

    def __init__(self, hop_samples: int, subsampling_factor: int):
        self.properties = FilterProperties(window_size=1, stride=hop_samples * subsampling_factor + 1)

    def make_streaming_context(self) -> None:
        return None

    def get_recommended_final_chunk_count(self, chunk_size: int) -> int:
        """SpeechBrain appends this many chunks of zeros: one, which is how :class:`StreamingCTC`
        learns that a stream whose only chunk was short has ended (and is then ignored)."""
        return 1

    def __call__(self, chunk: torch.Tensor, context=None, lengths=None) -> torch.Tensor:
        return chunk


@dataclass
class AudioStreamState:
    """What :class:`StreamingCTC` carries between chunks."""

    encoder: object  # the encoder's StreamingState
    front_end: FbankStream
    chunk_samples: int
    pending: torch.Tensor | None = None  # normalized feature frames not yet in a chunk
    ended: bool = False


class StreamingCTC(torch.nn.Module):
    """Audio chunks -> encoder frames: ``StreamingASR``'s ``enc``.

    A chunk shorter than the configured one ends the stream: the features still waiting are
    encoded as the last, shorter chunk (exactly as ``Stream.finish``), and the zero chunk
    SpeechBrain appends after it is ignored. An audio length that is an exact multiple of the
    chunk gives no short chunk: SpeechBrain's zero chunk is then encoded like audio (silence),
    as with SpeechBrain's own streaming models.

    Arguments
    ---------
    compute_features, normalize, encoder : as for :class:`OfflineCTC`.
    """

    def __init__(self, compute_features, normalize, encoder):
        super().__init__()
        self.compute_features, self.normalize, self.encoder = compute_features, normalize, encoder

    def make_streaming_context(self, config) -> AudioStreamState:
        """A stream under SpeechBrain's ``DynChunkTrainConfig`` (``context_from_dynchunk``) or
        our ``[left, right]`` pair."""
        state = self.encoder.make_streaming_context(config)
        chunk_samples = self.encoder.chunk_frames(state) * self.compute_features.hop_samples
        return AudioStreamState(state, FbankStream(self.compute_features), chunk_samples)

    def forward_streaming(self, chunk: torch.Tensor, state: AudioStreamState) -> torch.Tensor:
        """(B, n) audio, at most one chunk -> (B, frames, d_model) newly completed encoder frames
        (possibly none)."""
        outputs = []
        if not state.ended:
            feats = self.front_end(chunk, state)
            state.pending = feats if state.pending is None else torch.cat([state.pending, feats], 1)
            size = self.encoder.chunk_frames(state.encoder)
            while state.pending.shape[1] >= size:
                outputs.append(self.encoder.forward_streaming(state.pending[:, :size], state.encoder))
                state.pending = state.pending[:, size:]
            if chunk.shape[-1] < state.chunk_samples:  # the last chunk of the audio
                if state.pending.shape[1]:
                    outputs.append(self.encoder.forward_streaming(state.pending, state.encoder))
                state.ended = True
        if not outputs:
            return chunk.new_zeros(chunk.shape[0], 0, self.encoder.d_model)
        return torch.cat(outputs, dim=1)

    def front_end(self, chunk: torch.Tensor, state: AudioStreamState) -> torch.Tensor:
        feats = state.front_end.push(chunk)
        return self.normalize(feats, None) if feats.shape[1] else feats


class CheckedPretrainer(Pretrainer):
    """SpeechBrain's ``Pretrainer`` whose failures name the model folder's file at fault and
    the fix, instead of a fetch or ``load_state_dict`` traceback: a missing file, weights of
    other sizes, a tokenizer whose vocabulary does not fit the CTC head."""

    def collect_files(self, default_source=None, *args, **kwargs):
        if default_source is not None and Path(str(default_source)).is_dir():  # a local folder
            self.check_files(Path(str(default_source)))
        return super().collect_files(default_source, *args, **kwargs)

    def _call_load_hooks(self, paramfiles):
        """SpeechBrain's loading, one file at a time, so that a failure names its file."""
        loadables = self.loadables
        try:
            for name in loadables:
                self.loadables = {name: loadables[name]}
                try:
                    super()._call_load_hooks(paramfiles)
                except RuntimeError as error:
                    mismatch = [line.strip() for line in str(error).splitlines()
                                if "size mismatch" in line or "key" in line.lower()]
                    raise ValueError(f"{name}.ckpt of the model folder does not fit its "
                                     f"hyperparams.yaml ({(mismatch or [str(error)])[0]}); "
                                     "export the run again (recipes/export.py)") from None
        finally:
            self.loadables = loadables

    def load_collected(self):
        super().load_collected()
        self.check_vocabulary()

    def load_from(self, folder: str | Path) -> None:
        """Loads every loadable from ``<folder>/<name>.ckpt`` in place: no collecting, no
        links (how our own scripts read an exported folder), with the same checks."""
        self.check_files(Path(folder))
        self._call_load_hooks({name: Path(folder) / f"{name}.ckpt" for name in self.loadables})
        self.check_vocabulary()

    def check_files(self, folder: Path) -> None:
        for name in self.loadables:
            if not (folder / f"{name}.ckpt").is_file():
                raise FileNotFoundError(f"{folder / name}.ckpt: missing from the model folder; "
                                        "export the run again (recipes/export.py) or copy the "
                                        "whole folder")

    def check_vocabulary(self) -> None:
        tokenizer, head = self.loadables.get("tokenizer"), self.loadables.get("ctc_head")
        if tokenizer is not None and head is not None and (
                tokenizer.get_piece_size() + 1 != head.out_features):
            raise ValueError(f"tokenizer.ckpt has {tokenizer.get_piece_size()} pieces but "
                             f"ctc_head.ckpt outputs {head.out_features - 1} + blank: they come "
                             "from different runs; export the run again (recipes/export.py)")


class SSLEncoder(Pretrained):
    """An exported SSL encoder: every layer's output for a batch of audio at a chosen context
    (the downstream layer sum, SUPERB style).

    Example
    -------
    >>> ssl = SSLEncoder.from_hparams(source="exported/ssl_conformer")  # doctest: +SKIP
    >>> layers = ssl.encode_layers(wavs, wav_lens, context=[32, 3])  # doctest: +SKIP
    >>> layers.shape  # (layers, B, T', d_model)  # doctest: +SKIP
    """

    HPARAMS_NEEDED = ["context", "context_presets"]
    MODULES_NEEDED = ["compute_features", "normalize", "encoder"]

    @torch.no_grad()
    def encode_layers(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None,
                      context=None) -> torch.Tensor:
        """(B, n) audio, (B,) relative lengths -> (L, B, T', d_model) block outputs under
        ``context`` (a pair or preset name; None: the exported ``context``). Frames past an
        utterance's end are padding."""
        context = parse_context(self.hparams.context if context is None else context,
                                self.hparams.context_presets)
        wavs = wavs.to(self.device).float()
        wav_lens = None if wav_lens is None else wav_lens.to(self.device)
        feats, lengths, _ = encoder_frames(self.mods.compute_features, self.mods.encoder,
                                           wavs, wav_lens, self.mods.normalize)
        return torch.stack(self.mods.encoder(feats, lengths, context, all_layers=True))

    def encode_file(self, path: str, context=None) -> torch.Tensor:
        """(L, 1, T', d_model) block outputs of one audio file (resampled to the model's rate)."""
        return self.encode_layers(self.load_audio(path)[None], None, context)


MODEL_HPARAMS = "hyperparams.yaml"


def is_model_folder(folder: str | Path) -> bool:
    """A folder written by ``recipes/export.py``: hyperparams.yaml and the encoder's weights."""
    return (Path(folder) / MODEL_HPARAMS).is_file() and (
        Path(folder) / "encoder_network.ckpt").is_file()


def load_model_folder(folder: str | Path) -> dict:
    """The hparams of an exported CTC model folder, its weights loaded (``CheckedPretrainer``),
    under the names a training run's hparams use (``encoder``, ``ctc_head``, ``normalize``,
    ``compute_features``, ``tokenizer``, ``context_presets``, ``att_context_size``,
    ``valid_context``, ``sample_rate``), for ``recipes/inference.Recognizer``."""
    from hyperpyyaml import load_hyperpyyaml

    with open(Path(folder) / MODEL_HPARAMS) as f:
        hparams = load_hyperpyyaml(f)
    if "ctc_head" not in hparams:
        raise ValueError(f"{folder} is an exported SSL encoder: load it with "
                         "modules.interfaces.SSLEncoder; a CTC model is needed here")
    hparams["pretrainer"].load_from(folder)
    return {**hparams, "encoder": hparams["encoder_network"], "data_folder": ".",
            "att_context_size": hparams["trained_contexts"], "valid_context": hparams["context"]}
