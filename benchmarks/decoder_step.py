#!/usr/bin/env python3
"""Incremental decoding vs full recomputation: the cost of the next token after a prefix of
``--tokens`` tokens, for the Transformer and the Mamba decoder (``modules.decoders``).

Full recomputation runs the decoder on the whole prefix to get its last position (what a decoder
without a cache does at every beam step); the incremental step runs one token from the cached
state (the Transformer's keys and values, the Mamba decoder's recurrent state). Both on the same
weights, input and beam, side by side in one run; the median of ``--repeats`` timings.

Usage::

    python benchmarks/decoder_step.py [--tokens 100] [--beam 10] [--frames 250] \\
        [--d_model 144] [--layers 4] [--threads 1]

One JSON line at the end.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.decoders import TokenDecoder  # noqa: E402


def median_seconds(function, repeats: int, setup=lambda: None) -> float:
    """Median time of ``function(setup())`` (``setup`` not timed), after one warm-up call."""
    function(setup())
    times = []
    for _ in range(repeats):
        argument = setup()
        began = time.perf_counter()
        function(argument)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@torch.inference_mode()
def measure(mixer: str, args) -> dict:
    torch.manual_seed(0)
    model = TokenDecoder(args.vocab, args.d_model, num_layers=args.layers, nhead=4,
                         d_ffn=4 * args.d_model, dropout=0.0, mixer=mixer).eval()
    memory = torch.randn(args.beam, args.frames, args.d_model)
    counts = torch.full((args.beam,), args.frames)
    prefix = torch.randint(0, args.vocab, (args.beam, args.tokens))
    state = model.start(memory, counts)
    for u in range(args.tokens - 1):
        model.step(prefix[:, u], state)

    def copy_state():  # the state after tokens - 1 steps, afresh for every timed step
        return model.reorder(state, torch.arange(args.beam))

    full = median_seconds(lambda _: model(prefix, memory, counts)[:, -1], args.repeats)
    step = median_seconds(lambda fresh: model.step(prefix[:, -1], fresh), args.repeats,
                          copy_state)
    check = model.step(prefix[:, -1], model.reorder(state, torch.arange(args.beam)))
    error = (check - model(prefix, memory, counts)[:, -1]).abs().max().item()
    return {"mixer": mixer, "full_ms": round(1000 * full, 3), "step_ms": round(1000 * step, 3),
            "speedup": round(full / step, 2), "max_abs_difference": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--beam", type=int, default=10)
    parser.add_argument("--frames", type=int, default=250, help="encoder frames (10 s at 40 ms)")
    parser.add_argument("--d_model", type=int, default=144)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (more than the idle cores slows both sides)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(mixer, args) for mixer in ("attention", "mamba")]
    print("| decoder | full recomputation ms | incremental step ms | speedup |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['mixer']} | {row['full_ms']} | {row['step_ms']} | {row['speedup']}x |")
    print(json.dumps({"settings": vars(args), "decoders": rows}))


if __name__ == "__main__":
    main()
