#!/usr/bin/env python3
"""Selective scan, forward + backward: ours (compiled and chunked) vs a per-frame loop vs mambapy.

B = 4, d_inner = 512, d_state = 16 by default, at L = 500 / 2000 / 8000; each measurement in its
own process (peak memory, and the best time of --repeats runs after a warm-up: other jobs on the
machine only ever add time; the compiled kernel is built before both are measured), plus the
largest difference of outputs and gradients to the loop. mambapy (pure-PyTorch Blelloch scan,
https://github.com/alxndrTL/mamba.py) is installed by requirements.txt.

Usage::

    python benchmarks/mamba_scan.py [--lengths 500 2000 8000]
"""
import argparse
import sys
from pathlib import Path

import torch

from isolated import time_and_peak_memory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from modules.selective_scan import (compiled_scan_available, selective_scan,  # noqa: E402
                                    selective_scan_sequential)


def mambapy_scan(u, delta, A, B, C):
    """mambapy's selective scan without the skip term: pscan over (B, L, D, N)."""
    from mambapy.pscan import pscan

    deltaA = torch.exp(A * delta.unsqueeze(-1))
    BX = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
    return (pscan(deltaA, BX) @ C.unsqueeze(-1)).squeeze(3)


SCANS = {"compiled": lambda *a: selective_scan(*a, compiled=True)[0],
         "chunked": lambda *a: selective_scan(*a)[0],
         "loop": lambda *a: selective_scan_sequential(*a)[0],
         "mambapy": mambapy_scan}


def inputs(batch: int, length: int, d_inner: int, d_state: int):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, length, d_inner, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(batch, length, d_inner, generator=g) - 2)
    A = -torch.rand(d_inner, d_state, generator=g) * 15 - 1
    B = torch.randn(batch, length, d_state, generator=g)
    C = torch.randn(batch, length, d_state, generator=g)
    return [t.requires_grad_() for t in (u, delta, A, B, C)]


def build(name: str, shape: tuple, threads: int):
    torch.set_num_threads(threads)
    tensors = inputs(*shape)

    def run():
        SCANS[name](*tensors).pow(2).mean().backward()
        for t in tensors:
            t.grad = None
    if name == "compiled":
        run()  # builds the kernel (or loads the cached build), outside the measured time
    return run


def max_differences(shape: tuple) -> dict:
    """Largest |difference| to the loop over the output and every gradient, for each scan."""
    results = {}
    for scan in SCANS:
        tensors = inputs(*shape)
        y = SCANS[scan](*tensors)
        y.pow(2).mean().backward()
        results[scan] = [y.detach()] + [t.grad for t in tensors]
    return {name: max((a - b).abs().max().item() for a, b in zip(values, results["loop"]))
            for name, values in results.items() if name != "loop"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[500, 2000, 8000])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--d_inner", type=int, default=512)
    parser.add_argument("--d_state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if not compiled_scan_available("cpu"):
        raise SystemExit("error: the compiled scan needs a C++ compiler (apt-get install g++)")
    print(f"selective scan fwd + bwd, B={args.batch}, d_inner={args.d_inner}, "
          f"d_state={args.d_state}, {args.threads} threads, float32")
    print("\n| L | " + " | ".join(f"{n}: s / MiB" for n in SCANS) + " | compiled vs loop "
          "| compiled vs mambapy | chunked vs loop | max diff to loop: compiled / chunked / mambapy |")
    print("|---" * (len(SCANS) + 5) + "|")
    for length in args.lengths:
        shape = (args.batch, length, args.d_inner, args.d_state)
        res = {name: time_and_peak_memory(build, (name, shape, args.threads), args.repeats, min)
               for name in SCANS}
        diffs = " / ".join(f"{d:.1e}" for d in max_differences(shape).values())
        cells = " | ".join(f"{res[n][0]:.3f} / {res[n][1]:.0f}" for n in SCANS)
        ratios = " | ".join(f"{res[slow][0] / res[fast][0]:.1f}x" for fast, slow in
                            [("compiled", "loop"), ("compiled", "mambapy"), ("chunked", "loop")])
        print(f"| {length} | {cells} | {ratios} | {diffs} |", flush=True)


if __name__ == "__main__":
    main()
