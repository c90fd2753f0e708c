#!/usr/bin/env python3
"""One-command GPU check (under 10 minutes on one GPU): what the CPU test suite cannot show.

1. ``fused``: mamba-ssm / causal-conv1d kernels (``pip install -r requirements-cuda.txt``) equal
   our chunked scan, values and gradients, full and chunk-limited contexts, in float32 and
   under bf16 autocast (against the float32 scan). ``backend`` is the scan that ran; skipped
   where the packages are not installed or the device is not CUDA, failed where they are
   installed but do not import.
2. ``windowed_bf16``: Mamba's eager windowed scan (no kernels) under bf16 autocast is as close
   to float32 as the same windows scanned one by one (the window correction is subtracted in
   float32).
3. ``streaming``: streaming == offline on the device, both encoders, float32 with TF32 off.
4. ``quantizer``: bf16-autocast targets equal the float32 ones.
5. ``steps``: steps of the SSL and CTC recipes for the Conformer and ConMamba at every preset
   (bf16 where the GPU has it natively, else fp16 with gradient scaling): finite losses, step
   time, throughput, peak memory; ``scaling``: step time and peak memory vs utterance length.
6. ``syncs``: host syncs of one SSL step, counted by ``torch.cuda.set_sync_debug_mode`` (a
   measurement, not a pass/fail check; CUDA only).
7. ``dynamic_batches``: the CUDA preset's batches differ between epochs.
8. ``kill_resume``: the SSL recipe on the device (dynamic batches, validation each epoch),
   uninterrupted vs killed with SIGKILL after a mid-epoch checkpoint and run again.
9. ``two_processes``: torchrun with 2 processes over NCCL (skipped with fewer than 2 GPUs).

Usage::

    python benchmarks/gpu_check.py [--device cuda] [--precision auto|fp32|bf16|fp16] [--quick]

The last stdout line is one JSON object; ``passed`` is false (and the exit code 1) when a check
fails. ``--quick --device cpu`` runs the same code with tiny models (tests/test_benchmarks.py).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from recipe_runs import check_dynamic_batches, check_kill_resume, check_two_processes
from recipe_steps import corpus_batch, recipe_brain, timed_steps
from modules import mamba as mamba_module  # noqa: E402 (recipe_steps puts the root on the path)
from modules.conformer import CausalConformerEncoder  # noqa: E402
from modules.conmamba import ConMambaEncoder  # noqa: E402
from modules.context import PiecewiseContext  # noqa: E402
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
    """Fused kernels vs our chunked scan: one Mamba layer, values and gradients.

    ``backend``: the scan that ``scan_backend: auto`` runs on ``device``. Skipped (passed) where
    mamba-ssm / causal-conv1d are not installed or the device is not CUDA; failed where they are
    installed but do not import (``auto`` would quietly run the eager scan).
    """
    backend = Mamba(8).backend_for(device)
    error = mamba_module.fused_kernels_error()
    if error is not None or not device.startswith("cuda"):
        failed = mamba_module.FUSED_IMPORT_ERROR is not None
        reason = error or "the fused kernels need CUDA"
        print(f"fused: {'FAILED' if failed else 'skipped'}, {reason}; Mamba (scan_backend: "
              f"auto) runs the {backend} scan here", file=sys.stderr, flush=True)
        return {"available": False, "backend": backend, "passed": not failed,
                "error" if failed else "skipped": reason}
    d_model, frames = (32, 200) if quick else (256, 2000)
    fused = Mamba(d_model, scan_backend="fused").to(device)
    chunked = Mamba(d_model, scan_backend="chunked").to(device)
    chunked.load_state_dict(fused.state_dict())
    x = torch.randn(2, frames, d_model, device=device)
    rows = []
    for context in [(-1, -1), (8, 0), (16, 1), (32, 3), (64, 7)]:
        reference = chunked(x, context)
        ref_grads = torch.autograd.grad(reference.square().sum(), list(chunked.parameters()))
        row = {"context": list(context), "backend": fused.backend_for(device, context)}
        for precision in ("fp32", "bf16"):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = fused(x, context)
            grads = torch.autograd.grad(out.float().square().sum(), list(fused.parameters()))
            row[f"{precision}_output"] = relative_difference(out, reference)
            row[f"{precision}_gradients"] = max(relative_difference(g, r)
                                                for g, r in zip(grads, ref_grads))
        row["passed"] = (row["backend"] == "fused"
                         and max(row["fp32_output"], row["fp32_gradients"]) < 1e-3
                         and max(row["bf16_output"], row["bf16_gradients"]) < 5e-2)
        rows.append(row)
    print(f"fused: Mamba (scan_backend: auto) runs the {backend} scan here", file=sys.stderr,
          flush=True)
    return {"available": True, "backend": backend, "rows": rows,
            "passed": all(r["passed"] for r in rows)}


def check_windowed_bf16(device: str) -> dict:
    """Mamba's windowed scan (one full scan minus a float32 correction) under bf16 autocast vs
    float32, against the same windows scanned one by one from a zero state under bf16 (no
    subtraction): both see the same bf16-rounded projections, so a larger error is the
    cancellation that a correction subtracted from a bf16 output would bring."""
    torch.manual_seed(0)
    layer = Mamba(32, d_state=8, scan_backend="chunked").to(device)
    with torch.no_grad():
        layer.D.zero_()  # the scan alone: the skip path would hide its error
        layer.dt_proj.bias.fill_(-7.0)  # slow decays: long-lived states to cancel
    x = torch.randn(2, 400, 32, device=device)
    rows = []
    with torch.no_grad():
        for context in [(8, 3), (16, 3)]:
            reference = layer(x, context)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                windowed = layer(x, context)
                direct = layer(x, PiecewiseContext([[context]]))
            rows.append({"context": list(context),
                         "windowed_error": relative_difference(windowed, reference),
                         "direct_error": relative_difference(direct, reference)})
            rows[-1]["passed"] = rows[-1]["windowed_error"] <= 1.5 * rows[-1]["direct_error"]
    return {"rows": rows, "passed": all(r["passed"] for r in rows)}


def check_streaming(device: str) -> dict:
    """Streaming == offline on the device, both encoders, three contexts; float32 with TF32 off
    (TF32 matmuls round to 10 mantissa bits, and would differ between the two computations)."""
    if device.startswith("cuda"):
        allowed = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            return _streaming_rows(device)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allowed
    return _streaming_rows(device)


def _streaming_rows(device: str) -> dict:
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
    return {"rows": rows, "tf32": False, "passed": all(r["passed"] for r in rows)}


def check_quantizer(device: str) -> dict:
    """bf16 autocast must not change the targets."""
    quantizer = RandomProjectionQuantizer(n_mels=80, subsampling_factor=4, num_classes=8192).to(device)
    feats = torch.randn(8, 3000, 80, device=device)
    expected = quantizer(feats)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got = quantizer(feats)
    changed = float((got != expected).float().mean())
    return {"changed_fraction": changed, "passed": changed == 0.0}


def _recipe_steps(task: str, encoder: str, hparams: str, overrides: dict, device: str,
                  precision: str, quick: bool, folder: str, rows: list, scaling: list) -> None:
    """One recipe's rows (every preset) and, for SSL, its scaling rows, appended as measured."""
    batch_size, seconds = (2, 3) if quick else (8, 12)
    brain = recipe_brain(hparams, overrides, device, precision, folder)
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


def check_steps(device: str, precision: str, quick: bool, folder: str) -> dict:
    """A few steps of each recipe at every preset, and step time vs length."""
    overrides = TINY if quick else {}
    rows, scaling = [], []
    for (task, encoder), hparams in RECIPES.items():
        try:
            _recipe_steps(task, encoder, hparams, overrides, device, precision, quick,
                          f"{folder}/{task}_{encoder}", rows, scaling)
        except Exception as error:  # the other recipes still run
            rows.append({"task": task, "encoder": encoder, "passed": False,
                         "error": f"{type(error).__name__}: {error}",
                         "traceback": traceback.format_exc()[-2000:]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"rows": rows, "scaling": scaling, "passed": all(r["passed"] for r in rows)}


def count_syncs(device: str, precision: str, folder: str) -> dict:
    """Host syncs of one SSL step (after a first one): ``torch.cuda.set_sync_debug_mode`` warns
    at each (its own notice that the mode is a prototype is not one); counted by the Python
    line that made them."""
    if not device.startswith("cuda"):
        return {"skipped": "host syncs are counted on CUDA only"}
    brain = recipe_brain(RECIPES[("SSL", "conformer")], TINY, device, precision, folder)
    batch = corpus_batch(brain, 4, 5)
    timed_steps(brain, batch, "medium", steps=1, warmup=0)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            brain.fit_batch(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                if "called a synchronizing" in str(w.message))
    return {"syncs_per_step": sum(sites.values()), "sites": dict(sites)}


def default_precision(device: str) -> str:
    """bf16 where the GPU has it natively, fp16 (with gradient scaling) on other GPUs; bf16 on
    the CPU (autocast)."""
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "fp16"
    return "bf16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 where the GPU has it natively, else fp16")
    parser.add_argument("--quick", action="store_true", help="tiny models (a check of the script)")
    args = parser.parse_args()
    precision = default_precision(args.device) if args.precision == "auto" else args.precision
    start = time.time()
    report = {"device": args.device, "precision": precision, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    with tempfile.TemporaryDirectory() as folder:
        checks = {
            "fused": lambda: check_fused(args.device, args.quick),
            "windowed_bf16": lambda: check_windowed_bf16(args.device),
            "streaming": lambda: check_streaming(args.device),
            "quantizer": lambda: check_quantizer(args.device),
            "steps": lambda: check_steps(args.device, precision, args.quick, folder),
            "syncs": lambda: count_syncs(args.device, precision, f"{folder}/syncs"),
            "dynamic_batches": lambda: check_dynamic_batches(Path(folder)),
            "kill_resume": lambda: check_kill_resume(args.device, precision, Path(folder)),
            "two_processes": lambda: check_two_processes(args.device, precision, Path(folder)),
        }
        for name, check in checks.items():
            try:
                report[name] = check()
            except Exception as error:  # one failed check must not hide the others' results
                report[name] = {"passed": False, "error": f"{type(error).__name__}: {error}",
                                "traceback": traceback.format_exc()[-3000:]}
            print(json.dumps({name: report[name]}), file=sys.stderr, flush=True)
    report["seconds"] = round(time.time() - start, 1)
    report["passed"] = all(report[name].get("passed", True) for name in checks)
    print(json.dumps(report))
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
