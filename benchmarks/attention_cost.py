#!/usr/bin/env python3
"""Cost of limited-context training: our banded Conformer vs SpeechBrain's ConformerEncoder.

Forward + backward time and peak memory at several audio lengths, with the same chunked,
limited-left-context mask for both (default ``[32, 3]``: 1.28 s left, 0.16 s chunks at 40 ms
frames). Both stacks get the same (1, T, d_model) input, i.e. the frames after subsampling;
SpeechBrain's mask comes from its own ``make_transformer_src_mask`` with a
``DynChunkTrainConfig`` that selects the same keys. Each measurement runs in a fresh process so
that its peak resident memory is its own.

Usage::

    python benchmarks/attention_cost.py [--seconds 40 160] [--layers 6] [--d_model 144]
"""
import argparse
import sys
from pathlib import Path

import torch

from isolated import time_and_peak_memory

ROOT = Path(__file__).resolve().parents[1]


def build(kind: str, seconds: float, args):
    """Model and input; returns one forward + backward run of the layer stack."""
    sys.path.insert(0, str(ROOT))
    from modules.attention import RotarySelfAttention
    from modules.encoder import MacaronBlock

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(1, int(seconds * 100) // 4, args.d_model, requires_grad=True)
    context = (args.left, args.right)
    if kind.startswith("ours"):
        banded = kind == "ours"
        model = torch.nn.ModuleList(
            MacaronBlock(args.d_model, args.d_ffn, args.kernel_size, 0.0,
                         RotarySelfAttention(args.d_model, args.nhead))
            for _ in range(args.layers))

        def forward(h):
            for layer in model:
                h = layer(h, context, banded=banded)
            return h
    else:
        from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
        from speechbrain.lobes.models.transformer.TransformerASR import make_transformer_src_mask
        from speechbrain.nnet.attention import RelPosEncXL
        from speechbrain.utils.dynamic_chunk_training import DynChunkTrainConfig

        model = ConformerEncoder(num_layers=args.layers, d_model=args.d_model, d_ffn=args.d_ffn,
                                 nhead=args.nhead, kernel_size=args.kernel_size, dropout=0.0,
                                 causal=True, attention_type="RelPosMHAXL")
        positions = RelPosEncXL(args.d_model)
        chunk = args.right + 1
        config = DynChunkTrainConfig(chunk_size=chunk, left_context_size=args.left // chunk)

        def forward(h):
            mask = make_transformer_src_mask(h, dynchunktrain_config=config)
            return model(h, src_mask=mask, pos_embs=positions(h))[0]

    def run():
        forward(x).pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
        x.grad = None
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[40, 160])
    parser.add_argument("--left", type=int, default=32, help="left context, encoder frames")
    parser.add_argument("--right", type=int, default=3, help="chunk size - 1, encoder frames")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d_model", type=int, default=144)
    parser.add_argument("--nhead", type=int, default=4)
    parser.add_argument("--d_ffn", type=int, default=576)
    parser.add_argument("--kernel_size", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    kinds = {"ours": "ours (banded)", "ours-dense": "ours (dense mask)",
             "speechbrain": "SpeechBrain ConformerEncoder"}
    print(f"{args.layers} layers, d_model {args.d_model}, {args.nhead} heads, context "
          f"[{args.left}, {args.right}] = {args.left * 0.04:.2f} s left, "
          f"{(args.right + 1) * 0.04:.2f} s chunks; {args.threads} threads; fwd + bwd, batch 1")
    results = {(k, s): time_and_peak_memory(build, (k, s, args), args.repeats)
               for s in args.seconds for k in kinds}
    print("\n| audio | " + " | ".join(f"{v}: s / MiB" for v in kinds.values()) +
          " | speed-up vs SpeechBrain | memory ratio |")
    print("|---" * (len(kinds) + 3) + "|")
    for s in args.seconds:
        cells = [f"{results[k, s][0]:.2f} / {results[k, s][1]:.0f}" for k in kinds]
        ours, sb = results["ours", s], results["speechbrain", s]
        print(f"| {s:.0f} s | " + " | ".join(cells) +
              f" | {sb[0] / ours[0]:.1f}x | {sb[1] / max(ours[1], 1):.1f}x |")
    if len(args.seconds) > 1:
        low, high = args.seconds[0], args.seconds[-1]
        for k, name in kinds.items():
            print(f"{name}: time({high:.0f} s) / time({low:.0f} s) = "
                  f"{results[k, high][0] / results[k, low][0]:.2f} (audio ratio {high / low:.0f})")


if __name__ == "__main__":
    main()
