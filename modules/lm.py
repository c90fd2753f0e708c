"""An external token language model for decoding: SpeechBrain's ``TransformerLM`` trained on
text with the ASR model's own tokenizer (``hparams/LM/transformer.yaml``), scoring next tokens
for shallow fusion in the CTC prefix beam and the attention beam search.

The LM's vocabulary is the decoder's: the tokenizer's ids, then ``bos`` (``vocab_size``) and
``eos`` (``vocab_size + 1``). SpeechBrain's ``TransformerLM`` masks token 0 as padding (the
tokenizer's unknown piece, which normalized text never holds); batches are padded on the
right, which a causal model never attends.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def lm_io(token_lists: list[list[int]], bos: int, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> LM inputs ``bos, t_1 .. t_n`` and targets ``t_1 .. t_n, eos``, each
    (B, U + 1) for the longest U; padding: ``eos`` in the inputs, -1 (ignored) in the targets.

    Example
    -------
    >>> lm_io([[3, 4], [5]], bos=7, eos=8)
    (tensor([[7, 3, 4],
            [7, 5, 8]]), tensor([[ 3,  4,  8],
            [ 5,  8, -1]]))
    """
    longest = max((len(tokens) for tokens in token_lists), default=0) + 1
    inputs = torch.full((len(token_lists), longest), eos, dtype=torch.long)
    targets = torch.full_like(inputs, -1)
    for row, tokens in enumerate(token_lists):
        inputs[row, :len(tokens) + 1] = torch.tensor([bos, *tokens], dtype=torch.long)
        targets[row, :len(tokens) + 1] = torch.tensor([*tokens, eos], dtype=torch.long)
    return inputs, targets


def target_scores(log_probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """(B, U, V) log-probabilities and (B, U) targets (-1: padding) -> each row's summed
    log-probability of its targets."""
    picked = log_probs.gather(-1, targets.clamp(min=0).to(log_probs.device)[..., None])[..., 0]
    return (picked * (targets.to(log_probs.device) >= 0)).sum(-1).tolist()


class LMScorer:
    """Next-token log-probabilities of token-id prefixes, for shallow fusion.

    Arguments
    ---------
    lm : a causal LM, (N, U) token ids -> (N, U, vocab) logits (SpeechBrain's ``TransformerLM``).
    bos, eos : its begin and end tokens.
    device : where the LM runs.

    Example
    -------
    >>> from speechbrain.lobes.models.transformer.TransformerLM import TransformerLM
    >>> lm = TransformerLM(12, d_model=16, nhead=2, num_encoder_layers=1, d_ffn=32).eval()
    >>> LMScorer(lm, bos=10, eos=11)([[], [3, 4]]).shape
    torch.Size([2, 12])
    """

    def __init__(self, lm: torch.nn.Module, bos: int, eos: int, device: str | torch.device = "cpu"):
        self.lm, self.bos, self.eos, self.device = lm, bos, eos, device

    @torch.no_grad()
    def __call__(self, prefixes: list[list[int]]) -> torch.Tensor:
        """Token-id prefixes -> (N, vocab) log-probabilities of the token after each (CPU)."""
        inputs, _ = lm_io(prefixes, self.bos, self.eos)
        logits = self.lm(inputs.to(self.device)).float()
        last = torch.tensor([len(prefix) for prefix in prefixes], device=logits.device)
        return logits[torch.arange(len(prefixes)), last].log_softmax(-1).cpu()

    def sentence_scores(self, token_lists: list[list[int]]) -> list[float]:
        """Log-probability of each whole sentence, ``eos`` included."""
        inputs, targets = lm_io(token_lists, self.bos, self.eos)
        with torch.no_grad():
            log_probs = self.lm(inputs.to(self.device)).float().log_softmax(-1).cpu()
        return target_scores(log_probs, targets)

    def search_scorer(self):
        """The scorer of SpeechBrain's beam search over the search vocabulary of
        ``modules.decoding.SearchVocabulary`` (ids, bos, eos, blank)."""
        from speechbrain.decoders.scorer import TransformerLMScorer

        from .decoding import SearchVocabulary  # decoding imports this module
        return TransformerLMScorer(SearchVocabulary(self.lm, ctc=False).eval())


def file_digest(path: str | Path) -> str:
    """sha256 of a file (a tokenizer model)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def piece_table(model: str | Path) -> list[tuple]:
    """Each id's piece, score and kind: what maps text to ids (the model file also records the
    trainer's input paths, which differ between two runs that made the same tokenizer)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    return [(sp.id_to_piece(i), sp.get_score(i), sp.is_control(i), sp.is_unknown(i),
             sp.is_unused(i), sp.is_byte(i)) for i in range(sp.get_piece_size())]


def check_same_tokenizer(lm_tokenizer: str | Path, asr_tokenizer: str | Path, lm_name: str,
                         asr_name: str) -> None:
    """The LM reads the ASR model's tokens only if both tokenizers are the same model file or
    have the same piece table (two runs training the same tokenizer on the same transcripts);
    else one line naming both and the fix."""
    if file_digest(lm_tokenizer) != file_digest(asr_tokenizer) and \
            piece_table(lm_tokenizer) != piece_table(asr_tokenizer):
        raise ValueError(f"the LM {lm_name} was trained with another tokenizer ({lm_tokenizer}) "
                         f"than the ASR model {asr_name} ({asr_tokenizer}): its token ids mean "
                         f"other pieces; train the LM with --asr_run {asr_name}")
