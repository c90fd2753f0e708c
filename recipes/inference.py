"""A trained CTC or joint CTC / attention (S2S) model for decoding, with any decoding mode of
``modules.decoding`` and an optional language model: offline, or streamed from raw audio chunk
by chunk (``Recognizer.stream``, see ``stream.py``)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Iterable

import speechbrain as sb
import torch
from sentencepiece import SentencePieceProcessor

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "recipes")]  # also as ``recipes.inference``

from run_folder import (  # noqa: E402
    find_run_folder,
    load_run_hparams,
    run_hparams_text,
    tokenizer_model,
)
from stream import Stream  # noqa: E402
from modules.compiled_stream import CompiledStreamStep  # noqa: E402
from modules.context import Context, parse_context, parse_contexts  # noqa: E402
from modules.ctc import greedy_transcripts  # noqa: E402
from modules.decoding import (  # noqa: E402
    DecodingOptions,
    UtteranceDecoder,
    attention_beam_search,
)
from modules.interfaces import encoder_frames, is_model_folder, load_model_folder  # noqa: E402
from modules.lm import LMScorer, check_same_tokenizer  # noqa: E402
from modules.ngram import MODEL_FILE, NGramScorer  # noqa: E402
from modules.word_ngram import (WORD_LIST_FILE, WordNGramScorer, read_word_list,  # noqa: E402
                                tokenizer_pieces)
from provenance import hparams_data  # noqa: E402

logger = logging.getLogger(__name__)


def selection_key(checkpointer) -> str:
    """The meta key that ranks a CTC run's checkpoints: its valid ``"CER"``.

    Checkpoints of runs older than CER selection have only a ``"WER"``: those are ranked by it,
    with a one-line warning.
    """
    checkpoints = checkpointer.list_checkpoints()
    if any("CER" in c.meta for c in checkpoints) or not any("WER" in c.meta for c in checkpoints):
        return "CER"
    logger.warning("%s: checkpoints of an older run, without a valid CER: selected by valid WER",
                   checkpointer.checkpoints_dir)
    return "WER"


def load_averaged_best(checkpointer, modules: dict, count: int, key: str | None = None) -> None:
    """Loads the average of the ``count`` best checkpoints into ``modules``, ranked by ``key``
    (lowest first; default :func:`selection_key`: valid CER)."""
    key = key or selection_key(checkpointer)
    checkpoints = checkpointer.find_checkpoints(min_key=key, max_num_checkpoints=count)
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoint with a valid {key} under "
                                f"{checkpointer.checkpoints_dir}")
    for name, module in modules.items():
        module.load_state_dict(sb.utils.checkpoints.average_checkpoints(checkpoints, name))


class Recognizer:
    """Encoder + CTC head (+ attention decoder of an S2S run) + tokenizer + feature statistics
    of a trained run, in eval mode on ``device``.

    Arguments
    ---------
    run : the run folder (``--output_folder`` of ``recipes/train.py``) or its hyperparams.yaml;
        any copy of it works from any directory and loads its own weights (``run_folder.py``);
        or a model folder exported from it (``recipes/export.py``), which decodes the same.
    device : where to decode ("cpu", "cuda", "cuda:1", "mps").
    decoding : how to decode (default: greedy CTC); ``attention_rescoring`` and ``attention``
        need an S2S run.
    lm : an LM run folder (``hparams/LM/transformer.yaml``, ``ngram.yaml``) trained with this
        run's tokenizer, fused with weight ``decoding.lm_weight``.

    Example
    -------
    >>> recognizer = Recognizer("results/ctc_conformer_demo")  # doctest: +SKIP
    >>> recognizer.transcribe(samples, recognizer.context("low"))  # doctest: +SKIP
    """

    def __init__(self, run: str | Path, device: str = "cpu",
                 decoding: DecodingOptions | None = None, lm: str | Path | None = None):
        self.device = torch.device(check_device(device))
        self.folder = find_run_folder(run)
        if is_model_folder(self.folder):  # exported (recipes/export.py)
            self.hparams = load_model_folder(self.folder)
            self.sp = self.hparams["tokenizer"]
        else:
            self.hparams = load_run_hparams(self.folder)
            self.load_run_weights()
            self.sp = self.hparams["tokenizer"].sp
        for name in ("compute_features", "encoder", "ctc_head", "normalize", "decoder"):
            if name in self.hparams:
                self.hparams[name] = self.hparams[name].to(self.device).eval()
        self.text_normalizer = TextNormalizer(self.sp)
        self._compiled_steps: dict[tuple, CompiledStreamStep] = {}
        self.decoding = decoding or DecodingOptions()
        if self.decoding.needs_decoder and self.decoder is None:
            raise ValueError(f"decoding {self.decoding.decoding} needs an attention decoder, and "
                             f"{self.folder} is a CTC model: give an S2S run (hparams/S2S/*.yaml) "
                             "or decode with ctc_greedy or ctc_prefix_beam")
        self.lm_scorer = None
        if lm is not None and self.decoding.decoding == "ctc_greedy":
            raise ValueError(f"--lm {lm}: greedy CTC decoding uses no language model; decode "
                             "with ctc_prefix_beam, attention_rescoring or attention")
        if lm is not None:
            self.lm_scorer = load_language_model(lm, self.tokenizer_file, self.folder,
                                                 self.sp.get_piece_size(), self.device)
        elif self.decoding.lm_weight > 0:
            raise ValueError(f"lm_weight {self.decoding.lm_weight} without a language model: "
                             "give one (--lm <LM run folder>) or lm_weight 0")

    def load_run_weights(self) -> None:
        """A training run's average of its best checkpoints (by valid CER) and statistics."""
        if "ctc_head" not in self.hparams:
            raise ValueError(f"{self.folder} is a {self.hparams.get('task', 'non-CTC')} run: "
                             "give the folder of a CTC or S2S run (hparams/CTC, hparams/S2S)")
        key = selection_key(self.hparams["checkpointer"])
        self.hparams["checkpointer"].recover_if_possible(min_key=key)  # statistics, etc.
        heads = {name: self.hparams[name] for name in ("ctc_head", "decoder")
                 if name in self.hparams}
        load_averaged_best(self.hparams["checkpointer"], {"encoder": self.encoder, **heads},
                           self.hparams["average_checkpoints"], key)

    @property
    def decoder(self):
        """The attention decoder of an S2S run (None for CTC)."""
        return self.hparams.get("decoder")

    @property
    def bos(self) -> int:
        """The decoder's and LM's begin token (after the tokenizer's ids)."""
        return self.hparams.get("bos_index", self.sp.get_piece_size())

    @property
    def eos(self) -> int:
        return self.hparams.get("eos_index", self.sp.get_piece_size() + 1)

    @property
    def tokenizer_file(self) -> Path:
        """The SentencePiece model file the run decodes with."""
        if is_model_folder(self.folder):
            return self.folder / "tokenizer.ckpt"
        return tokenizer_model(hparams_data(run_hparams_text(self.folder)))

    @property
    def min_samples(self) -> int:
        """The shortest audio the model takes: one encoder frame of features."""
        return self.hparams["compute_features"].min_samples(self.encoder.subsampling_factor)

    @property
    def encoder(self):
        return self.hparams["encoder"]

    def context(self, spec: str | Context) -> Context:
        """A preset name, ``"L,R"`` or pair -> ``(left, right)``."""
        return parse_context(spec, self.hparams["context_presets"])

    def normalize(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Global statistics, frame by frame (streaming-safe)."""
        return self.hparams["normalize"](feats, lengths) if feats.shape[1] else feats

    def log_probs(self, encoded: torch.Tensor) -> torch.Tensor:
        return self.hparams["ctc_head"](encoded).log_softmax(-1)

    @torch.no_grad()
    def transcribe_batch(self, wavs: torch.Tensor, wav_lens: torch.Tensor, context: Context,
                         streaming: bool = False) -> list[str]:
        """Greedy transcripts of a padded batch of audio under ``context``.

        Arguments
        ---------
        wavs : (B, n) audio, zero-padded.
        wav_lens : (B,) relative lengths.
        streaming : encode chunk by chunk (every utterance its own stream, side by side), which
            gives the offline outputs; False: one offline forward.
        """
        feats, lengths, frames = encoder_frames(
            self.hparams["compute_features"], self.encoder, wavs.to(self.device),
            wav_lens.to(self.device), self.hparams["normalize"])
        encode = self.encoder.encode_in_chunks if streaming else self.encoder
        encoded = encode(feats, lengths, context)
        return self.decode(encoded, frames)

    def decode(self, encoded: torch.Tensor, frames: torch.Tensor) -> list[str]:
        """(B, T, D) encoder output and (B,) frame counts -> texts, with ``self.decoding``."""
        log_probs = self.log_probs(encoded)
        if self.decoding.decoding == "ctc_greedy":
            texts = greedy_transcripts(log_probs.cpu(), (frames / encoded.shape[1]).cpu(), self.sp)
            return [collapse_spaces(text) for text in texts]
        if self.decoding.decoding == "attention":
            ids = attention_beam_search(self.decoder, self.hparams["ctc_head"], encoded, frames,
                                        self.decoding, self.bos, self.eos, self.lm_scorer)
        else:
            ids = []
            for row, count in enumerate(frames.tolist()):
                search = self.utterance_decoder()
                search.push(log_probs[row, :count].cpu())
                ids.append(search.finish(encoded[row:row + 1, :count]))
        return [self.text(tokens) for tokens in ids]

    def utterance_decoder(self) -> UtteranceDecoder:
        """One utterance's streaming decoder (first pass, then ``finish``)."""
        return UtteranceDecoder(self.decoding, self.decoder, self.lm_scorer, self.bos, self.eos)

    def text(self, tokens: list[int]) -> str:
        return collapse_spaces(self.sp.decode_ids(tokens))

    def transcribe(self, samples: torch.Tensor, context: Context) -> str:
        """Offline greedy transcript of one (n,) utterance under ``context``."""
        return self.transcribe_batch(samples[None], torch.ones(1), context)[0]

    @property
    def trained_contexts(self) -> list[Context]:
        """The contexts the model was trained under (``att_context_size``)."""
        return parse_contexts(self.hparams["att_context_size"], self.hparams["context_presets"])

    def check_trained(self, context: Context) -> Context:
        """``context``, if the model was trained under it; else a clear error."""
        if context not in self.trained_contexts:
            raise ValueError(f"context {list(context)} was not trained: a stream may switch only "
                             f"to trained contexts, {[list(c) for c in self.trained_contexts]}")
        return context

    def stream(self, context: Context, max_left: int | None = None, controller=None,
               compiled: bool = False) -> "Stream":
        """A ``stream.Stream`` starting under ``context`` (a preset name, ``"L,R"`` or pair; see
        ``Stream`` for ``max_left``, ``controller`` and ``compiled``)."""
        return Stream(self, self.context(context), max_left, controller, compiled)

    def compiled_step(self, context: Context, max_left: int | None = None) -> CompiledStreamStep:
        """The compiled encoder step of ``context`` (caches of ``max_left`` frames for a stream
        that switches), made once per recognizer, context and ``max_left``."""
        context = self.context(context)
        if max_left == context[0]:  # the same caches as the context's own
            max_left = None
        if (context, max_left) not in self._compiled_steps:
            self._compiled_steps[context, max_left] = CompiledStreamStep(self.encoder, context,
                                                                         max_left)
        return self._compiled_steps[context, max_left]


def load_language_model(lm: str | Path, asr_tokenizer: Path, asr_name, vocab_size: int,
                        device: torch.device) -> LMScorer | NGramScorer | WordNGramScorer:
    """The scorer of an LM run: a Transformer LM (its best checkpoint by valid loss, in eval
    mode) or an n-gram (``hparams/LM/ngram.yaml`` over tokens, ``word_ngram.yaml`` over words,
    spelled with the ASR model's pieces, whatever tokenizer its run copied); a token LM trained
    with another tokenizer than the ASR model's is refused in one line."""
    folder = find_run_folder(lm)
    data = hparams_data(run_hparams_text(folder))
    if data.get("task") not in ("lm", "ngram"):
        raise ValueError(f"--lm {lm} is a {data.get('task')} run: give an LM run "
                         "(hparams/LM/transformer.yaml, ngram.yaml or word_ngram.yaml)")
    if data["task"] == "ngram" and data.get("unit", "token") == "word":  # words, any tokenizer
        pieces = tokenizer_pieces(SentencePieceProcessor(model_file=str(asr_tokenizer)))
        word_list = read_word_list(folder / WORD_LIST_FILE) if data.get("word_list") else None
        return WordNGramScorer(folder / MODEL_FILE, folder / "lm.arpa", pieces,
                               data.get("oov_penalty"), word_list,
                               data.get("word_list_penalty") or 0.0)
    check_same_tokenizer(tokenizer_model(data), asr_tokenizer, str(lm), str(asr_name))
    if data["vocab_size"] != vocab_size:
        raise ValueError(f"--lm {lm}: vocab_size {data['vocab_size']}, the ASR model's "
                         f"{vocab_size}")
    if data["task"] == "ngram":
        return NGramScorer(folder / MODEL_FILE, vocab_size)
    hparams = load_run_hparams(folder)
    hparams["checkpointer"].recover_if_possible(min_key="loss")
    return LMScorer(hparams["lm"].to(device).eval(), vocab_size, vocab_size + 1, device)


def collapse_spaces(text: str) -> str:
    """No leading, trailing or repeated spaces (SentencePiece keeps a final word boundary)."""
    return " ".join(text.split())


class TextNormalizer:
    """Text as the tokenizer was trained on it: its letter case, single spaces.

    A model trained on uppercase transcripts outputs uppercase: lowercase references would
    count every letter as an error. Characters outside the tokenizer's pieces cannot be output
    at all; :meth:`unknown_characters` finds them, to report once.

    Arguments
    ---------
    sp : the SentencePiece processor of the tokenizer.

    Example
    -------
    >>> normalizer = TextNormalizer(recognizer.sp)  # doctest: +SKIP
    >>> normalizer("  the cat ")  # doctest: +SKIP
    'THE CAT'
    """

    def __init__(self, sp):
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                  if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))]
        self.characters = set("".join(pieces).replace("\u2581", " "))
        cased = [c for c in self.characters if c.lower() != c.upper()]
        self.case = ("upper" if cased and all(c.isupper() for c in cased) else
                     "lower" if cased and all(c.islower() for c in cased) else None)

    def __call__(self, text: str) -> str:
        text = collapse_spaces(text)
        if self.case == "upper":
            return text.upper()
        return text.lower() if self.case == "lower" else text

    def unknown_characters(self, texts: Iterable[str]) -> list[str]:
        """The characters of the normalized ``texts`` that no piece holds, sorted."""
        return sorted({c for text in texts for c in self(text)} - self.characters - {" "})


def check_device(device: str) -> str:
    """``device`` if PyTorch can use it here, else a one-line ``ValueError`` with the fix."""
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device; use cpu, cuda, cuda:<index> or "
                         "mps") from None
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (kind.index or 0) >= count:
            found = f"{count} CUDA GPU(s)" if count else "no CUDA GPU"
            raise ValueError(f"--device {device}: PyTorch {torch.__version__} sees {found} here; "
                             f"use --device {default_device()}, or leave --device out to detect it")
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device "
                         f"{default_device()}, or leave --device out to detect it")
    return device


def default_device() -> str:
    """CUDA, else MPS, else CPU."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"
