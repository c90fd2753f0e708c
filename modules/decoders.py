"""Attention decoders over a streaming encoder's output: a Transformer decoder and a Mamba
decoder, trained on whole token sequences and run one token at a time with a cache.

Both read tokens (B, U) and the encoder output (B, T, D) with its frame counts (B,), and give
logits (B, U, vocab). Every layer is pre-LayerNorm: token mixing (causal self-attention with
rotary positions, or a unidirectional Mamba), cross-attention to the encoder frames (padding
frames masked), a feed-forward module.

Incremental decoding (``start`` / ``step`` / ``reorder``): the cross-attention keys and values
are projected once per utterance; the Transformer keeps every layer's past keys and values
(a step costs O(prefix)); the Mamba decoder keeps its recurrent state and convolution tail
(a step costs O(1) in the prefix). A cached step equals the full recomputation (tests).

Written here rather than taken from SpeechBrain: its ``TransformerDecoder`` recomputes the whole
prefix at every step (no key/value cache) and has no Mamba decoder; ConMamba's Mamba decoder
ignores the encoder's padding and also recomputes the prefix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import RotaryEmbedding
from .layers import FeedForward
from .lm import lm_io, target_scores
from .mamba import Mamba

DecoderState = dict  # "memory" (keys and values per layer), "mask", "layers", "position"


def key_padding_mask(frame_counts: torch.Tensor, frames: int) -> torch.Tensor:
    """(B,) frame counts -> (B, 1, 1, frames) bool, True where a frame may be attended.

    Example
    -------
    >>> key_padding_mask(torch.tensor([2, 3]), 3)[:, 0, 0]
    tensor([[ True,  True, False],
            [ True,  True,  True]])
    """
    return (torch.arange(frames, device=frame_counts.device)[None] < frame_counts[:, None]
            )[:, None, None]


def check_heads(d_model: int, nhead: int) -> None:
    if d_model % nhead:
        raise ValueError(f"d_model {d_model} is not divisible by nhead {nhead}")


class CrossAttention(torch.nn.Module):
    """Queries from the tokens, keys and values from the encoder frames (no positions: the
    encoder's own carry them)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        check_heads(d_model, nhead)
        self.nhead, self.dropout = nhead, dropout
        self.query = torch.nn.Linear(d_model, d_model)
        self.key_value = torch.nn.Linear(d_model, 2 * d_model)
        self.out = torch.nn.Linear(d_model, d_model)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, H, T, D / H)."""
        return x.unflatten(-1, (self.nhead, -1)).transpose(1, 2)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) encoder frames -> keys and values, each (B, H, T, D / H)."""
        key, value = self.key_value(memory).chunk(2, dim=-1)
        return self.heads(key), self.heads(value)

    def forward(self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        """(B, U, D) queries, projected ``memory``, (B, 1, 1, T) mask -> (B, U, D)."""
        key, value = memory
        y = F.scaled_dot_product_attention(self.heads(self.query(x)), key, value, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2))


class CausalSelfAttention(torch.nn.Module):
    """Causal self-attention over tokens with rotary positions; ``cache`` holds the past keys
    and values (rotated at their own positions) for incremental decoding."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        check_heads(d_model, nhead)
        self.nhead, self.dropout = nhead, dropout
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.out = torch.nn.Linear(d_model, d_model)
        self.rotary = RotaryEmbedding(d_model // nhead)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """(B, U, D) -> (B, U, D). With ``cache`` (updated in place; empty at the first step)
        ``x`` continues the cached tokens."""
        past = 0 if not cache else cache["key"].shape[2]
        positions = torch.arange(past, past + x.shape[1], device=x.device)
        query, key, value = (t.unflatten(-1, (self.nhead, -1)).transpose(1, 2)
                             for t in self.qkv(x).chunk(3, dim=-1))
        query, key = self.rotary(query, positions), self.rotary(key, positions)
        if cache is not None:
            if past:
                key = torch.cat([cache["key"], key], dim=2)
                value = torch.cat([cache["value"], value], dim=2)
            cache["key"], cache["value"] = key, value
        # New tokens see every cached one and the new ones up to themselves.
        mask = None
        if x.shape[1] > 1:
            mask = torch.ones(x.shape[1], past + x.shape[1], dtype=torch.bool,
                              device=x.device).tril(past)
        y = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2))


class DecoderLayer(torch.nn.Module):
    """Token mixing (``mixer``: "attention" or "mamba"), cross-attention, feed-forward; each a
    pre-LayerNorm residual."""

    def __init__(self, mixer: str, d_model: int, nhead: int, d_ffn: int, dropout: float,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 scan_backend: str = "auto"):
        super().__init__()
        self.norm_mix = torch.nn.LayerNorm(d_model)
        if mixer == "attention":
            self.mix = CausalSelfAttention(d_model, nhead, dropout)
        elif mixer == "mamba":
            self.mix = Mamba(d_model, d_state, d_conv, expand, scan_backend=scan_backend)
        else:
            raise ValueError(f"decoder mixer {mixer!r}: give 'attention' or 'mamba'")
        self.mixer = mixer
        self.norm_cross = torch.nn.LayerNorm(d_model)
        self.cross = CrossAttention(d_model, nhead, dropout)
        self.feed_forward = FeedForward(d_model, d_ffn, dropout)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """(B, U, D) tokens -> (B, U, D); ``cache`` (in place) continues a decoded prefix."""
        mixed = self.norm_mix(x)
        if self.mixer == "attention":
            mixed = self.mix(mixed, cache)
        elif cache is None:
            mixed = self.mix(mixed)
        else:  # the recurrent state and the convolution tail carry the prefix
            mixed = self.mix.forward_streaming(mixed, cache, (-1, -1))
        x = x + self.dropout(mixed)
        x = x + self.dropout(self.cross(self.norm_cross(x), memory, mask))
        return x + self.feed_forward(x)


class TokenDecoder(torch.nn.Module):
    """Autoregressive decoder over an encoder's output: token embedding, ``num_layers``
    ``DecoderLayer``, a final LayerNorm and the output projection.

    Arguments
    ---------
    vocab_size : output classes (the tokenizer's vocabulary with bos and eos).
    d_model : model dimension (the encoder's).
    num_layers, nhead, d_ffn, dropout : layer sizes.
    mixer : "attention" (Transformer decoder) or "mamba" (Mamba decoder).
    d_state, d_conv, expand, scan_backend : the Mamba mixer's (see ``modules.mamba.Mamba``).

    Example
    -------
    >>> decoder = TokenDecoder(vocab_size=10, d_model=16, num_layers=1, nhead=2, d_ffn=32)
    >>> decoder(torch.tensor([[1, 4, 5]]), torch.randn(1, 7, 16), torch.tensor([7])).shape
    torch.Size([1, 3, 10])
    """

    def __init__(self, vocab_size: int, d_model: int, num_layers: int = 4, nhead: int = 4,
                 d_ffn: int = 1024, dropout: float = 0.1, mixer: str = "attention",
                 d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 scan_backend: str = "auto"):
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = torch.nn.Embedding(vocab_size, d_model)
        self.layers = torch.nn.ModuleList(
            DecoderLayer(mixer, d_model, nhead, d_ffn, dropout, d_state, d_conv, expand,
                         scan_backend) for _ in range(num_layers))
        self.norm = torch.nn.LayerNorm(d_model)
        self.output = torch.nn.Linear(d_model, vocab_size)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}): got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]; the decoder's "
                             "vocab_size must be the tokenizer's (with bos and eos)")

    @staticmethod
    def _check_memory(memory: torch.Tensor, frame_counts: torch.Tensor) -> None:
        if memory.shape[0] != frame_counts.shape[0] or frame_counts.max() > memory.shape[1] \
                or frame_counts.min() < 1:
            raise ValueError(f"frame_counts {frame_counts.tolist()} for encoder output "
                             f"{tuple(memory.shape)}: one count in 1..T per utterance")

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor,
                frame_counts: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: (B, U) tokens (bos first), (B, T, D) encoder output, (B,) frame
        counts -> (B, U, vocab) logits; position u predicts token u + 1."""
        self._check_tokens(tokens)
        self._check_memory(memory, frame_counts)
        mask = key_padding_mask(frame_counts, memory.shape[1])
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x, layer.cross.project_memory(memory), mask)
        return self.output(self.norm(x))

    def start(self, memory: torch.Tensor, frame_counts: torch.Tensor) -> DecoderState:
        """The state of an empty prefix for each of B utterances (repeat ``memory`` for beams
        first, or ``reorder`` the state)."""
        self._check_memory(memory, frame_counts)
        return {"memory": [layer.cross.project_memory(memory) for layer in self.layers],
                "mask": key_padding_mask(frame_counts, memory.shape[1]),
                "layers": [{} for _ in self.layers]}

    def step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """(B,) next tokens -> (B, vocab) logits of the token after them; ``state`` is updated
        in place. The tokens are not range-checked here (a search's own outputs; a check would
        sync the device at every step): ``forward`` checks them."""
        x = self.embedding(tokens)[:, None]
        for layer, memory, cache in zip(self.layers, state["memory"], state["layers"]):
            x = layer(x, memory, state["mask"], cache)
        return self.output(self.norm(x))[:, 0]

    @staticmethod
    def reorder(state: DecoderState, index: torch.Tensor) -> DecoderState:
        """The state of the hypotheses ``index`` (B',) picks (beam search), as a new state."""
        def pick(value):
            if isinstance(value, torch.Tensor):
                return value.index_select(0, index)
            if isinstance(value, (list, tuple)):
                return type(value)(pick(v) for v in value)
            if isinstance(value, dict):
                return {k: pick(v) for k, v in value.items()}
            return value

        return pick(state)


@torch.no_grad()
def attention_rescoring(decoder: TokenDecoder, memory: torch.Tensor, frame_count: int,
                        nbest: list[tuple[list[int], float]], bos: int, eos: int,
                        ctc_weight: float = 0.5) -> list[tuple[list[int], float, float]]:
    """The second pass of two-pass decoding (WeNet U2's attention rescoring): the n-best of
    a CTC prefix beam search scored by one teacher-forced pass of the decoder over all of them.

    Arguments
    ---------
    decoder : the attention decoder.
    memory : (1, T, D) the utterance's encoder output; ``frame_count`` its frames.
    nbest : (decoder token ids, CTC log-score) per hypothesis.
    bos, eos : the decoder's begin and end tokens.
    ctc_weight : score = ``ctc_weight * CTC + (1 - ctc_weight) * attention`` log-scores.

    Returns
    -------
    (tokens, combined score, attention log-score) per hypothesis, best first.
    """
    if not nbest:
        raise ValueError("attention_rescoring: no hypothesis to rescore")
    inputs, targets = lm_io([list(tokens) for tokens, _ in nbest], bos, eos)
    counts = torch.full((len(nbest),), frame_count, device=memory.device)
    log_probs = decoder(inputs.to(memory.device), memory.expand(len(nbest), -1, -1),
                        counts).log_softmax(-1)
    attention = target_scores(log_probs, targets)
    scored = [(list(tokens), ctc_weight * ctc + (1 - ctc_weight) * att, att)
              for (tokens, ctc), att in zip(nbest, attention)]
    return sorted(scored, key=lambda item: -item[1])
