#!/usr/bin/env python3
"""Activation checkpointing: peak memory and step time with and without, against utterance length.

A step is one forward + backward pass of an encoder in train mode (the sizes of
``hparams/SSL/<encoder>.yaml``, dropout included; ``--quick``: tiny ones) on a batch of random
features, under one context (default ``[-1, -1]``, offline: the largest activations). For each
encoder and length, the step without and with ``activation_checkpointing`` runs side by side in
the same invocation, each in a fresh spawned process, so that its peak is its own:

- step time: the fastest of ``--repeats`` steps after a warm-up (the minimum: other jobs on a
  shared machine only ever add time);
- peak memory of the steps above what the model and its input hold before them (the parameter
  gradients, the same with and without, are part of it). CUDA: ``torch.cuda.max_memory_allocated``
  (the caching allocator's count of live tensors). CPU: the peak resident set, VmHWM, reset
  through ``/proc/self/clear_refs`` just before the steps (Linux only): what runs out on a CPU;
  ``tracemalloc`` would not see it (torch allocates in C++, outside Python's allocator), and
  ``ru_maxrss`` cannot be reset past the imports. One-time costs (the lazy imports of the first
  checkpoint, ~200 MiB resident) are paid before, on a few frames.

Usage::

    python benchmarks/activation_checkpointing.py [--device cuda] [--encoders conformer conmamba]
        [--seconds 15 30 60] [--batch_size 4] [--context -1 -1] [--repeats 3] [--quick]

Prints one JSON line per encoder and length: both steps and the ratios with / without.
"""
import argparse
import inspect
import json
import multiprocessing
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from modules.conformer import CausalConformerEncoder  # noqa: E402
from modules.conmamba import ConMambaEncoder  # noqa: E402

ENCODERS = {"conformer": CausalConformerEncoder, "conmamba": ConMambaEncoder}
TINY = {"d_model": 32, "nhead": 2, "num_encoder_layers": 2, "d_ffn": 64,
        "subsampling_conv_channels": 8}


def ssl_sizes(encoder: str) -> dict:
    """The constructor arguments that ``hparams/SSL/<encoder>.yaml`` sets to plain values."""
    class Loader(yaml.SafeLoader):
        """Reads the plain keys; ``!new:`` / ``!ref`` nodes are not built."""
    Loader.add_multi_constructor("!", lambda loader, tag, node: None)
    hparams = yaml.load((ROOT / "hparams" / "SSL" / f"{encoder}.yaml").read_text(), Loader)
    accepted = inspect.signature(ENCODERS[encoder]).parameters
    return {key: value for key, value in hparams.items()
            if key in accepted and key != "activation_checkpointing" and value is not None}


def _resident_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak(device: torch.device) -> float:
    """Starts counting the peak afresh; returns the memory in use now (MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _resident_mib("VmRSS")


def _peak(device: torch.device) -> float:
    """Peak memory (MiB) since ``_reset_peak``."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _resident_mib("VmHWM")


def _measure(encoder: str, sizes: dict, checkpointing: bool, seconds: float, args, queue) -> None:
    """One configuration, in its own process: (fastest step seconds, peak MiB above the start)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = ENCODERS[encoder](**sizes, activation_checkpointing=checkpointing).to(device).train()
    feats = torch.randn(args.batch_size, round(seconds * 100), sizes.get("n_mels", 80),
                        device=device)
    context = tuple(args.context)

    def step(x: torch.Tensor) -> float:
        start = time.perf_counter()
        model(x, context=context).square().mean().backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    # One-time costs out of both figures (lazy imports: ~200 MiB resident at the first
    # checkpoint on the CPU), on a few frames so that the peak's baseline stays clean.
    step(feats[:, :32])
    start_mib = _reset_peak(device)
    times = [step(feats) for _ in range(args.repeats + 1)]  # the first step warms up
    queue.put((min(times[1:]), _peak(device) - start_mib))


def measure(encoder: str, sizes: dict, checkpointing: bool, seconds: float, args):
    """``_measure`` in a fresh spawned process."""
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    child = spawn.Process(target=_measure,
                          args=(encoder, sizes, checkpointing, seconds, args, queue))
    child.start()
    child.join()  # the result is a small tuple: the child never blocks on the queue
    if child.exitcode != 0:
        raise SystemExit(f"{encoder}, {seconds} s, checkpointing {checkpointing}: "
                         f"the measuring process failed (exit code {child.exitcode})")
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--seconds", type=float, nargs="+",
                        help="audio per utterance; default 15 30 60 on CUDA, 5 10 20 on the CPU, "
                             "2 4 with --quick")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--context", type=int, nargs=2, default=[-1, -1], metavar=("LEFT", "RIGHT"),
                        help="encoder frames; default offline")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after a warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny encoders ({', '.join(f'{k} {v}' for k, v in TINY.items())})")
    args = parser.parse_args()
    if args.seconds is None:
        args.seconds = [2, 4] if args.quick else [15, 30, 60] if args.device == "cuda" else [
            5, 10, 20]
    for encoder in args.encoders:
        sizes = ssl_sizes(encoder)
        if args.quick:
            sizes.update({k: v for k, v in TINY.items() if k in sizes})
        parameters = sum(p.numel() for p in ENCODERS[encoder](**sizes).parameters())
        for seconds in args.seconds:
            (time_off, mib_off), (time_on, mib_on) = (
                measure(encoder, sizes, checkpointing, seconds, args)
                for checkpointing in (False, True))
            print(json.dumps({
                "encoder": encoder, "seconds": seconds, "batch_size": args.batch_size,
                "context": args.context, "encoder_parameters": parameters,
                "device": args.device, "threads": args.threads,
                "step_seconds_off": round(time_off, 4), "step_seconds_on": round(time_on, 4),
                "time_ratio": round(time_on / time_off, 3),
                "peak_mib_off": round(mib_off, 1), "peak_mib_on": round(mib_on, 1),
                "memory_ratio": round(mib_on / max(mib_off, 1e-9), 3)}), flush=True)


if __name__ == "__main__":
    main()
