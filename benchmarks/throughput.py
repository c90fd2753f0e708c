#!/usr/bin/env python3
"""Training throughput of the recipes: audio seconds per second of compute, per encoder and context.

Each cell is a few optimizer steps of the SSL recipe (``hparams/SSL/<encoder>.yaml`` by default,
the Brain of ``recipes/train.py``: features, targets, masking, encoder, heads, backward,
optimizer) on one batch of real speech from the shipped corpus, under one fixed context;
the median step time gives the throughput, ``batch audio seconds / step seconds``.

Usage::

    python benchmarks/throughput.py [--device cuda] [--precision bf16] [--task SSL|CTC] \\
        [--batch_size 8] [--seconds 12] [--steps 3] [--contexts very_low low medium high unlimited] \\
        [--override d_model=256 --override num_encoder_layers=12 ...]

Prints a markdown table, then one JSON line (``rows``).
"""
import argparse
import json
import tempfile

import torch
import yaml

from recipe_steps import corpus_batch, recipe_brain, timed_steps

ENCODERS = {"SSL": {"conformer": "hparams/SSL/conformer.yaml", "conmamba": "hparams/SSL/conmamba.yaml"},
            "CTC": {"conformer": "hparams/CTC/conformer_small.yaml",
                    "conmamba": "hparams/CTC/conmamba_small.yaml"}}
PRESETS = ["very_low", "low", "medium", "high", "unlimited"]


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs, values in YAML."""
    try:
        return {key: yaml.safe_load(value) for key, value in (p.split("=", 1) for p in pairs)}
    except ValueError:
        raise SystemExit(f"error: --override takes key=value, got {pairs}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--task", default="SSL", choices=list(ENCODERS))
    parser.add_argument("--encoders", nargs="+", default=["conformer", "conmamba"],
                        choices=["conformer", "conmamba"])
    parser.add_argument("--contexts", nargs="+", default=PRESETS)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=12.0, help="audio per batch item")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    parser.add_argument("--override", action="append", default=[], help="hparam=value")
    args = parser.parse_args()
    overrides = parse_overrides(args.override)
    rows = []
    print("| encoder | context | step s | audio s / s | peak MiB |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for encoder in args.encoders:
            brain = recipe_brain(ENCODERS[args.task][encoder], overrides, args.device,
                                 args.precision, folder)
            batch = corpus_batch(brain, args.batch_size, args.seconds)
            parameters = sum(p.numel() for p in brain.hparams.encoder.parameters())
            for context in args.contexts:
                result = timed_steps(brain, batch, context, args.steps)
                rows.append({"encoder": encoder, "context": context,
                             "encoder_parameters": parameters,
                             "step_seconds": round(result["step_seconds"], 4),
                             "audio_seconds_per_second": round(
                                 result["audio_seconds"] / result["step_seconds"], 1),
                             "batch_audio_seconds": result["audio_seconds"],
                             "peak_mib": result["peak_mib"]})
                row = rows[-1]
                print(f"| {encoder} | {context} | {row['step_seconds']:.3f} | "
                      f"{row['audio_seconds_per_second']:.1f} | {row['peak_mib'] or '-'} |",
                      flush=True)
    print(json.dumps({"device": args.device, "precision": args.precision, "task": args.task,
                      "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
