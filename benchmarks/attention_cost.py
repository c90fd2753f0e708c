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
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(kind: str, args):
    """The layer stack to time, and a function running it once (forward + backward)."""
    sys.path.insert(0, str(ROOT))
    from modules.conformer import ConformerBlock

    context = (args.left, args.right)
    if kind.startswith("ours"):
        banded = kind == "ours"
        layers = torch.nn.ModuleList(
            ConformerBlock(args.d_model, args.nhead, args.d_ffn, args.kernel_size, 0.0)
            for _ in range(args.layers))

        def run(x):
            for layer in layers:
                x = layer(x, context, None, banded)
            return x
        return layers, run

    from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
    from speechbrain.lobes.models.transformer.TransformerASR import make_transformer_src_mask
    from speechbrain.nnet.attention import RelPosEncXL
    from speechbrain.utils.dynamic_chunk_training import DynChunkTrainConfig

    encoder = ConformerEncoder(num_layers=args.layers, d_model=args.d_model, d_ffn=args.d_ffn,
                               nhead=args.nhead, kernel_size=args.kernel_size, dropout=0.0,
                               causal=True, attention_type="RelPosMHAXL")
    positions = RelPosEncXL(args.d_model)
    chunk = args.right + 1
    config = DynChunkTrainConfig(chunk_size=chunk, left_context_size=args.left // chunk)

    def run(x):
        mask = make_transformer_src_mask(x, dynchunktrain_config=config)
        return encoder(x, src_mask=mask, pos_embs=positions(x))[0]
    return encoder, run


def measure(kind: str, seconds: float, args, queue) -> None:
    """Runs in a child process: median time of fwd+bwd and peak RSS above the start."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, run = build(kind, args)
    frames = int(seconds * 100) // 4
    x = torch.randn(1, frames, args.d_model, requires_grad=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeats + 1):  # the first run warms up
        start = time.perf_counter()
        run(x).pow(2).mean().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        x.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    queue.put((statistics.median(times[1:]), peak / 1024))


def in_child(kind: str, seconds: float, args) -> tuple[float, float]:
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    child = spawn.Process(target=measure, args=(kind, seconds, args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


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
    results = {(k, s): in_child(k, s, args) for s in args.seconds for k in kinds}
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
