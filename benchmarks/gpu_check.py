#!/usr/bin/env python3
"""One-command GPU check (under 10 minutes on one GPU): what the CPU test suite cannot show.

1. ``fused``: mamba-ssm / causal-conv1d kernels (``pip install -r requirements-cuda.txt``) equal
   our chunked scan, values and gradients, full and chunk-limited contexts, in float32 and
   under bf16 autocast (against the float32 scan).
2. ``streaming``: streaming == offline on the device, both encoders, float32.
3. ``quantizer``: bf16-autocast targets equal the float32 ones.
4. ``steps``: bf16 steps of the SSL and CTC recipes for the Conformer and ConMamba at every
   preset: finite losses, step time, throughput, peak memory.
5. ``scaling``: step time and peak memory vs utterance length (SSL, ``medium``), both encoders.

Usage::

    python benchmarks/gpu_check.py [--device cuda] [--precision bf16] [--quick]

The last stdout line is one JSON object; ``passed`` is false (and the exit code 1) when a check
fails. ``--quick --device cpu`` runs the same code with tiny models (tests/test_benchmarks.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from recipe_steps import corpus_batch, recipe_brain, timed_steps
from modules import mamba as mamba_module  # noqa: E402 (recipe_steps puts the root on the path)
from modules.conformer import CausalConformerEncoder  # noqa: E402
from modules.conmamba import ConMambaEncoder  # noqa: E402
from modules.mamba import Mamba  # noqa: E402
from modules.quantizer import RandomProjectionQuantizer  # noqa: E402

PRESETS = ["very_low", "low", "medium", "high", "unlimited"]
TINY = {"d_model": 32, "nhead": 2, "num_encoder_layers": 1, "d_ffn": 64,
        "subsampling_conv_channels": 8, "d_state": 4, "num_classes": 32}
RECIPES = {("SSL", "conformer"): "hparams/SSL/conformer.yaml",
           ("SSL", "conmamba"): "hparams/SSL/conmamba.yaml",
           ("CTC", "conformer"): "hparams/CTC/conformer_small.yaml",
           ("CTC", "conmamba"): "hparams/CTC/conmamba_small.yaml"}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def check_fused(device: str, quick: bool) -> dict:
    """Fused kernels vs our chunked scan: one Mamba layer, values and gradients."""
    if mamba_module.selective_scan_fn is None or mamba_module.causal_conv1d_fn is None:
        return {"available": False, "passed": True,
                "note": "mamba-ssm / causal-conv1d not importable: pip install -r requirements-cuda.txt"}
    if not device.startswith("cuda"):
        return {"available": False, "passed": True, "note": "fused kernels need CUDA"}
    d_model, frames = (32, 200) if quick else (256, 2000)
    fused = Mamba(d_model, scan_backend="auto").to(device)
    chunked = Mamba(d_model, scan_backend="chunked").to(device)
    chunked.load_state_dict(fused.state_dict())
    x = torch.randn(2, frames, d_model, device=device)
    rows = []
    for context in [(-1, -1), (8, 0), (16, 1), (32, 3), (64, 7)]:
        reference = chunked(x, context)
        ref_grads = torch.autograd.grad(reference.square().sum(), list(chunked.parameters()))
        row = {"context": list(context)}
        for precision in ("fp32", "bf16"):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = fused(x, context)
            grads = torch.autograd.grad(out.float().square().sum(), list(fused.parameters()))
            row[f"{precision}_output"] = relative_difference(out, reference)
            row[f"{precision}_gradients"] = max(relative_difference(g, r)
                                                for g, r in zip(grads, ref_grads))
        row["passed"] = (max(row["fp32_output"], row["fp32_gradients"]) < 1e-3
                         and max(row["bf16_output"], row["bf16_gradients"]) < 5e-2)
        rows.append(row)
    return {"available": True, "rows": rows, "passed": all(r["passed"] for r in rows)}


def check_streaming(device: str) -> dict:
    """Streaming == offline on the device (float32), both encoders, three contexts."""
    sizes = dict(d_model=64, num_encoder_layers=3, d_ffn=128, kernel_size=7,
                 subsampling_conv_channels=16, dropout=0.0)
    encoders = {"conformer": CausalConformerEncoder(nhead=4, **sizes),
                "conmamba": ConMambaEncoder(d_state=8, **sizes)}
    feats = torch.randn(2, 803, 80, device=device)
    lengths = torch.tensor([1.0, 0.6], device=device)
    rows = []
    for name, encoder in encoders.items():
        encoder = encoder.to(device).eval()
        for context in [(8, 0), (16, 1), (32, 3)]:
            with torch.no_grad():
                offline = encoder(feats, lengths, context)
                streamed = encoder.encode_in_chunks(feats, lengths, context)
            valid = [offline.shape[1], -(-round(0.6 * 803) // 4)]
            diff = max(float((streamed[b, :n] - offline[b, :n]).abs().max())
                       for b, n in enumerate(valid))
            rows.append({"encoder": name, "context": list(context), "max_difference": diff,
                         "passed": diff < 1e-4})
    return {"rows": rows, "passed": all(r["passed"] for r in rows)}


def check_quantizer(device: str) -> dict:
    """bf16 autocast must not change the targets."""
    quantizer = RandomProjectionQuantizer(n_mels=80, subsampling_factor=4, num_classes=8192).to(device)
    feats = torch.randn(8, 3000, 80, device=device)
    expected = quantizer(feats)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got = quantizer(feats)
    changed = float((got != expected).float().mean())
    return {"changed_fraction": changed, "passed": changed == 0.0}


def check_steps(device: str, precision: str, quick: bool, folder: str) -> dict:
    """A few steps of each recipe at every preset, and step time vs length."""
    overrides = TINY if quick else {}
    batch_size, seconds = (2, 3) if quick else (8, 12)
    rows, scaling = [], []
    for (task, encoder), hparams in RECIPES.items():
        brain = recipe_brain(hparams, overrides, device, precision, f"{folder}/{task}_{encoder}")
        batch = corpus_batch(brain, batch_size, seconds)
        for context in PRESETS:
            result = timed_steps(brain, batch, context, steps=2)
            finite = all(torch.isfinite(torch.tensor(result["losses"])).tolist())
            rows.append({"task": task, "encoder": encoder, "context": context,
                         "losses": [round(v, 4) for v in result["losses"]],
                         "step_seconds": round(result["step_seconds"], 4),
                         "audio_seconds_per_second": round(
                             result["audio_seconds"] / result["step_seconds"], 1),
                         "peak_mib": result["peak_mib"], "passed": finite})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if task == "SSL":
            for length in ([2, 4] if quick else [15, 30, 60, 120, 240]):
                result = timed_steps(brain, corpus_batch(brain, 4, length), "medium", steps=2)
                scaling.append({"encoder": encoder, "seconds_per_utterance": length,
                                "batch": 4, "step_seconds": round(result["step_seconds"], 4),
                                "peak_mib": result["peak_mib"]})
                print(json.dumps(scaling[-1]), file=sys.stderr, flush=True)
        del brain
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"rows": rows, "scaling": scaling, "passed": all(r["passed"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--quick", action="store_true", help="tiny models (a check of the script)")
    args = parser.parse_args()
    start = time.time()
    report = {"device": args.device, "precision": args.precision, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    with tempfile.TemporaryDirectory() as folder:
        report["fused"] = check_fused(args.device, args.quick)
        report["streaming"] = check_streaming(args.device)
        report["quantizer"] = check_quantizer(args.device)
        report["steps"] = check_steps(args.device, args.precision, args.quick, folder)
    report["seconds"] = round(time.time() - start, 1)
    report["passed"] = all(report[key]["passed"]
                           for key in ("fused", "streaming", "quantizer", "steps"))
    print(json.dumps(report))
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
