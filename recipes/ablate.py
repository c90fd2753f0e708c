#!/usr/bin/env python3
"""Architecture ablations: one command runs a grid of encoder x context set x size, each cell with
the same budget, and writes the tables and plots of the comparison.

Every cell (``<encoder>-<context set>-<size>``) runs, in its own folder of the grid's output::

    recipes/train.py hparams/SSL/<encoder>.yaml     (if ssl_epochs > 0)
    recipes/train.py hparams/CTC/<encoder>_small.yaml  [--pretrained_ssl <SSL output>]
    recipes/evaluate.py <CTC output>/hyperparams.yaml --context all --streaming
    recipes/transcribe.py ... --mode benchmark        (measured per-chunk latency of each preset)

with the cell's encoder sizes (``equalize_parameters``: each encoder's ``d_ffn`` set so that its
parameter count matches the reference encoder's), its training contexts, and the grid's epochs,
batch size and overrides; then the encoder's training step time (forward + backward) at several
sequence lengths. Each cell validates (and so selects its checkpoints) at the widest streaming
context it trains on (longest chunk, then longest left context), not at a preset it never saw.

A finished cell has ``result.json``, which records the CTC run that made it (commit, command,
SSL checkpoint: ``recipes/provenance.py``), and is read back, not rerun, if that record matches
the CTC command the grid would run now at this code commit (and SSL checkpoint); a mismatched
one is refused and reported like a failed cell (delete its folder to rerun it). A failed cell is
reported and the grid goes on (running the command again retries it).

Launchers: ``local`` (default) runs the cells one after another here; ``slurm`` submits each as a
Slurm job through submitit (settings under ``slurm:`` in the grid file; ``nproc_per_node > 1``
runs the cell's training under torchrun); ``submitit-local`` runs the same submitit path as local
processes (what the tests use).

Usage::

    python recipes/ablate.py hparams/ablations/tiny.yaml [--launcher local|slurm|submitit-local] \\
        [--output_folder results/ablations/tiny] [--cells conformer-low-tiny ...]

Writes ``<output>/ablation.{md,csv}``, ``<output>/cer_vs_latency.png`` and
``<output>/step_time_vs_length.png``; the last stdout line is JSON (the rows and the failures).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml
from hyperpyyaml import load_hyperpyyaml

from demo import ROOT, SSL_SIZES, run
from modules.context import ContextSpec, parse_context
from provenance import check_result, current_code_commit, ssl_checkpoint_fields, write_result

ENCODERS = list(SSL_SIZES)
GRID_KEYS = {"encoders", "context_sets", "sizes", "seed", "ssl_epochs", "ctc_epochs",
             "batch_size", "data_folder", "train_csv", "valid_csv", "test_csv", "output_folder",
             "equalize_parameters", "reference_encoder", "ssl_overrides", "ctc_overrides",
             "step_time_seconds", "step_time_context", "nproc_per_node", "device", "slurm"}


def load_grid(path: Path) -> dict:
    """The grid file, checked: every problem named with the key and what to do."""
    if not path.is_file():
        raise SystemExit(f"error: grid file {path} not found (see hparams/ablations/)")
    try:
        grid = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SystemExit(f"error: {path} is not valid YAML: {error}") from None
    if not isinstance(grid, dict):
        raise SystemExit(f"error: {path} must be a mapping of grid keys ({sorted(GRID_KEYS)})")
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise SystemExit(f"error in {path}: unknown keys {sorted(unknown)}; known: {sorted(GRID_KEYS)}")
    for key in ("encoders", "context_sets", "sizes", "ctc_epochs"):
        if not grid.get(key):
            raise SystemExit(f"error in {path}: {key!r} is missing or empty")
    bad = [e for e in grid["encoders"] if e not in ENCODERS]
    if bad:
        raise SystemExit(f"error in {path}: encoders {bad} unknown; choose from {ENCODERS}")
    reference = grid.setdefault("reference_encoder", grid["encoders"][0])
    if reference not in ENCODERS:
        raise SystemExit(f"error in {path}: reference_encoder {reference!r} not in {ENCODERS}")
    grid.setdefault("seed", 1986)
    grid.setdefault("ssl_epochs", 0)
    grid.setdefault("batch_size", 8)
    grid.setdefault("data_folder", "data/espeak_corpus")
    for split in ("train", "valid", "test"):  # relative paths: to the repository root
        manifest = grid.get(f"{split}_csv", f"{grid['data_folder']}/{split}.csv")
        grid[f"{split}_csv"] = str(ROOT / manifest)
    grid.setdefault("equalize_parameters", True)
    grid.setdefault("ssl_overrides", {})
    grid.setdefault("ctc_overrides", {})
    grid.setdefault("step_time_seconds", [4, 8, 16, 32])
    grid.setdefault("step_time_context", "medium")
    grid.setdefault("nproc_per_node", 1)
    grid.setdefault("device", "cpu")
    grid.setdefault("slurm", {})
    return grid


def as_arguments(overrides: dict) -> list[str]:
    """``{key: value}`` -> ``["--key", "value"]`` (lists, dicts and None as YAML flow)."""
    return [a for key, value in overrides.items() for a in (
        f"--{key}", value if isinstance(value, str) else yaml.safe_dump(
            value, default_flow_style=True).strip().removesuffix("\n...").strip())]


def ssl_hparams(encoder: str, sizes: dict) -> dict:
    """``hparams/SSL/<encoder>.yaml`` loaded at ``sizes`` (its encoder untrained)."""
    with tempfile.TemporaryDirectory() as scratch, \
            open(ROOT / "hparams" / "SSL" / f"{encoder}.yaml") as f:
        return load_hyperpyyaml(f, {**sizes, "output_folder": scratch})


def build_encoder(encoder: str, sizes: dict) -> torch.nn.Module:
    return ssl_hparams(encoder, sizes)["encoder"]


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def encoder_sizes(grid: dict, encoder: str, size: str) -> dict:
    """The size keys ``encoder`` takes, from the grid's size (the yaml's defaults for the rest);
    with ``equalize_parameters``, ``d_ffn`` moved so that the parameter count matches the
    reference encoder's at that size (the count is linear in ``d_ffn``; multiples of 16)."""
    sizes = {key: value for key, value in grid["sizes"][size].items()
             if key in SSL_SIZES[encoder]}
    reference = grid["reference_encoder"]
    if not grid["equalize_parameters"] or encoder == reference:
        return sizes
    target = parameter_count(build_encoder(reference, encoder_sizes(
        {**grid, "equalize_parameters": False}, reference, size)))
    d_ffn = int(sizes.get("d_ffn") or ssl_hparams(encoder, sizes)["d_ffn"])
    low = parameter_count(build_encoder(encoder, {**sizes, "d_ffn": d_ffn}))
    high = parameter_count(build_encoder(encoder, {**sizes, "d_ffn": 2 * d_ffn}))
    per_unit = (high - low) / d_ffn
    return {**sizes, "d_ffn": max(16, int(round((d_ffn + (target - low) / per_unit) / 16)) * 16)}


def cells_of(grid: dict, output: Path) -> list[dict]:
    """Every cell of the grid with its command-line settings."""
    cells = []
    for encoder, (context_name, contexts), size in itertools.product(
            grid["encoders"], grid["context_sets"].items(), grid["sizes"]):
        if isinstance(contexts, (str, int)) or (
                len(contexts) == 2 and all(isinstance(v, int) for v in contexts)):
            contexts = [contexts]  # one preset or one [left, right] pair
        name = f"{encoder}-{context_name}-{size}"
        cells.append({"name": name, "encoder": encoder, "context_set": context_name,
                      "contexts": contexts, "size": size, "folder": str(output / name)})
    return cells


def run_training(grid: dict, *script_args: str) -> dict:
    """``train.py`` with the cell's arguments; under torchrun when ``nproc_per_node > 1``."""
    launcher = () if grid["nproc_per_node"] <= 1 else (
        "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={grid['nproc_per_node']}")
    return run("train.py", *script_args, launcher=launcher)


def step_times(encoder: torch.nn.Module, n_mels: int, seconds: list[float], context,
               device: str) -> dict:
    """Median wall time of one training step of the encoder (forward + backward of the mean
    square of its outputs, batch 1) per input length in seconds (100 feature frames each): a
    measurement of the architecture, whatever its weights."""
    encoder = encoder.to(device).train()
    times = {}
    for length in seconds:
        feats = torch.randn(1, int(length * 100), n_mels, device=device)
        runs = []
        for _ in range(4):  # the first one pays one-time allocations: not counted
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            begin = time.perf_counter()
            encoder(feats, context=context).square().mean().backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - begin)
        times[str(length)] = round(statistics.median(runs[1:]), 4)
    return times


def widest_context(contexts: list[ContextSpec], presets: dict) -> ContextSpec:
    """The widest streaming context of ``contexts`` (longest chunk, then longest left; -1 is
    unlimited), as given (preset name or pair); the widest of all if none streams (an
    offline-only cell)."""
    def width(spec) -> tuple[float, float]:
        left, right = parse_context(spec, presets)
        return (math.inf if right < 0 else right, math.inf if left < 0 else left)

    streaming = [spec for spec in contexts if parse_context(spec, presets)[1] >= 0]
    return max(streaming or contexts, key=width)


def cell_plan(grid: dict, cell: dict) -> dict:
    """What a cell runs: its encoder ``sizes``, the ``valid_context`` it validates at (a pair),
    and the ``train.py`` arguments of its ``ssl`` (None without SSL) and ``ctc`` runs."""
    folder = Path(cell["folder"])
    encoder = cell["encoder"]
    sizes = encoder_sizes(grid, encoder, cell["size"])
    presets = ssl_hparams(encoder, sizes)["context_presets"]
    valid = widest_context(cell["contexts"], presets)
    # the cell's contexts, uniformly drawn, for SSL and CTC alike
    common = ["--data_folder", grid["data_folder"], "--train_csv", grid["train_csv"],
              "--valid_csv", grid["valid_csv"], "--seed", str(grid["seed"]),
              "--batch_size", str(grid["batch_size"]), "--device_preset", grid["device"],
              *as_arguments({"att_context_size": cell["contexts"], "att_context_probs": None,
                             "valid_context": valid, **sizes})]
    ssl, ctc_extra = None, []
    if grid["ssl_epochs"] > 0:
        ssl = [f"hparams/SSL/{encoder}.yaml", *common,
               "--number_of_epochs", str(grid["ssl_epochs"]),
               "--output_folder", str(folder / "ssl"),
               *as_arguments(grid["ssl_overrides"])]
        ctc_extra = ["--pretrained_ssl", str(folder / "ssl")]
    ctc = [f"hparams/CTC/{encoder}_small.yaml", *common, *ctc_extra,
           "--test_csv", grid["test_csv"], "--number_of_epochs", str(grid["ctc_epochs"]),
           "--output_folder", str(folder / "ctc"), *as_arguments(grid["ctc_overrides"])]
    return {"sizes": sizes, "valid_context": list(parse_context(valid, presets)), "ssl": ssl,
            "ctc": ctc}


def expected_record(grid: dict, cell: dict) -> dict:
    """The record a cell's ``result.json`` must carry to be read back: the CTC command it would
    run now, this code commit (when git knows it) and, with SSL, the SSL checkpoint in its
    folder."""
    expected = {"command": ["recipes/train.py", *cell_plan(grid, cell)["ctc"]]}
    code_commit = current_code_commit()
    if code_commit is not None:
        expected["code_commit"] = code_commit
    ssl_folder = Path(cell["folder"]) / "ssl" if grid["ssl_epochs"] > 0 else None
    expected["ssl_checkpoint_sha256"] = ssl_checkpoint_fields(ssl_folder)["ssl_checkpoint_sha256"]
    return expected


def run_cell(grid: dict, cell: dict) -> dict:
    """SSL (optional), CTC, per-context streaming evaluation, latency and step times of one
    cell; writes ``<cell folder>/result.json`` with the CTC run's record."""
    folder = Path(cell["folder"])
    encoder = cell["encoder"]
    plan = cell_plan(grid, cell)
    sizes = plan["sizes"]
    ssl = run_training(grid, *plan["ssl"]) if plan["ssl"] else None
    ctc = run_training(grid, *plan["ctc"])
    test_csv = grid["test_csv"]
    evaluation = run("evaluate.py", ctc["ctc_hparams"], "--output_folder", ctc["ctc_output_folder"],
                     "--test_csv", test_csv, "--context", "all", "--streaming",
                     "--device", grid["device"])
    with open(test_csv) as f:
        first_test = next(csv.DictReader(f))["wav"].replace("$data_root",
                                                             str(ROOT / grid["data_folder"]))
    latency = run("transcribe.py", ctc["ctc_hparams"], "--output_folder", ctc["ctc_output_folder"],
                  "--audio", first_test, "--mode", "benchmark", "--device", grid["device"])
    architecture = ssl_hparams(encoder, sizes)
    context = parse_context(grid["step_time_context"], architecture["context_presets"])
    result = {
        **{k: cell[k] for k in ("name", "encoder", "context_set", "contexts", "size")},
        "sizes": sizes, "parameters": parameter_count(architecture["encoder"]),
        "valid_context": plan["valid_context"],
        "ssl_epochs": grid["ssl_epochs"], "ctc_epochs": ctc["epochs"],
        # the training stages alone: validation, the statistics pass and the test left out
        "train_audio_per_second": round(ctc["train_audio_seconds"]
                                        / max(ctc["train_stage_seconds"], 1e-9), 2),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in (ssl, ctc) if r),
        "test_cer": ctc["ctc_cer"], "test_wer": ctc["ctc_wer"],
        # rtf: evaluate.py's, compute over audio of the test set decoded in batches
        "per_context": [{k: r[k] for k in ("context", "wer", "cer", "rtf", "chunk_seconds")}
                        for r in evaluation["results"]],
        # latency_ms (chunk + measured compute) and rtf of one stream: transcribe.py's benchmark
        "latency": latency["benchmark"],
        "step_time_context": list(context),
        "step_seconds": step_times(architecture["encoder"], architecture["n_mels"],
                                   grid["step_time_seconds"], context, grid["device"]),
    }
    write_result(folder / "result.json", result, ctc["record"])
    return result


RTF_BATCHED = "RTF (evaluate.py, batched)"
RTF_STREAM = "RTF (transcribe.py --mode benchmark, one stream)"
LATENCY = "chunk + measured compute ms"


def flat_row(result: dict) -> dict:
    """One CSV row: the cell, its costs, and per context CER / WER, the two RTFs (evaluate.py's
    on the batched test set, transcribe.py's benchmark of one stream) and the latency (chunk
    duration + measured compute per chunk; none offline)."""
    row = {"cell": result["name"], "encoder": result["encoder"],
           "context_set": result["context_set"], "size": result["size"],
           "parameters": result["parameters"],
           "valid_context": str(result.get("valid_context", "")),
           "ssl_epochs": result["ssl_epochs"], "ctc_epochs": result["ctc_epochs"],
           "train_audio_per_second": result["train_audio_per_second"],
           "peak_memory_mb": result["peak_memory_mb"],
           "test_cer": round(result["test_cer"], 2), "test_wer": round(result["test_wer"], 2)}
    benchmark = {str(r["context"]): r for r in result["latency"]}
    for r in result["per_context"]:
        context = str(r["context"])
        row[f"cer {context}"] = round(r["cer"], 2)
        row[f"wer {context}"] = round(r["wer"], 2)
        row[f"rtf_evaluate_batched {context}"] = r["rtf"]
        row[f"rtf_benchmark_stream {context}"] = benchmark.get(context, {}).get("rtf", "")
        row[f"chunk_plus_compute_ms {context}"] = benchmark.get(context, {}).get("latency_ms", "")
    for length, seconds in result["step_seconds"].items():
        row[f"step_s {length}s"] = seconds
    return row


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(v) for v in row) + " |" for row in rows)]


def write_tables(results: list[dict], failures: dict, output: Path) -> None:
    rows = [flat_row(r) for r in results]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(output / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    contexts = list(dict.fromkeys(str(r["context"]) for res in results for r in res["per_context"]))
    streamed = [c for c in contexts if any(row.get(f"chunk_plus_compute_ms {c}") for row in rows)]
    lengths = list(dict.fromkeys(k for res in results for k in res["step_seconds"]))

    def cell(row, key, form="{}"):
        value = row.get(key, "")
        return "-" if value in ("", None) else form.format(value)

    lines = markdown_table(
        ["cell", "parameters", "valid context", "train audio s/s (training stages only)",
         "peak memory MB", "test CER (beam)", *(f"CER / WER {c}" for c in contexts)],
        [[row["cell"], f"{row['parameters'] / 1e6:.2f} M", row["valid_context"],
          f"{row['train_audio_per_second']:.1f}", f"{row['peak_memory_mb']:.0f}",
          f"{row['test_cer']:.1f}",
          *(f"{row[f'cer {c}']:.1f} / {row[f'wer {c}']:.1f}" if f"cer {c}" in row else ""
            for c in contexts)] for row in rows])
    lines += ["", *markdown_table(
        ["cell", *(f"{LATENCY} {c}" for c in streamed), *(f"step s at {n} s" for n in lengths)],
        [[row["cell"], *(cell(row, f"chunk_plus_compute_ms {c}") for c in streamed),
          *(cell(row, f"step_s {n}s") for n in lengths)] for row in rows])]
    lines += ["", *markdown_table(
        ["cell", *(f"{RTF_BATCHED} {c}" for c in contexts),
         *(f"{RTF_STREAM} {c}" for c in streamed)],
        [[row["cell"], *(cell(row, f"rtf_evaluate_batched {c}") for c in contexts),
          *(cell(row, f"rtf_benchmark_stream {c}") for c in streamed)] for row in rows])]
    if failures:
        lines += ["", "Failed cells (run the command again to retry them; a refused result "
                  "says what to delete):", ""]
        lines += [f"- {name}: {error}" for name, error in failures.items()]
    (output / "ablation.md").write_text("\n".join(lines) + "\n")


def write_plots(results: list[dict], output: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: f"C{i}" for i, name in enumerate(ENCODERS)}
    styles = ["-", "--", ":", "-."]
    variants = list(dict.fromkeys((r["context_set"], r["size"]) for r in results))
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for result in results:
        points = sorted((r["latency_ms"], next(c["cer"] for c in result["per_context"]
                                               if c["context"] == r["context"]))
                        for r in result["latency"])
        axis.plot(*zip(*points), marker="o", color=colors[result["encoder"]],
                  linestyle=styles[variants.index((result["context_set"], result["size"]))
                                   % len(styles)], label=result["name"])
    axis.set_xlabel("latency per chunk, ms (chunk + measured compute)")
    axis.set_ylabel("test CER, % (greedy, streaming)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output / "cer_vs_latency.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4))
    for encoder, size in dict.fromkeys((r["encoder"], r["size"]) for r in results):
        result = next(r for r in results if (r["encoder"], r["size"]) == (encoder, size))
        lengths = [float(n) for n in result["step_seconds"]]
        axis.plot(lengths, list(result["step_seconds"].values()), marker="o",
                  color=colors[encoder], label=f"{encoder} ({size}, {result['parameters'] / 1e6:.2f} M, "
                                               f"context {result['step_time_context']})")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("utterance length, s")
    axis.set_ylabel("encoder training step, s (batch 1)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output / "step_time_vs_length.png", dpi=120)
    plt.close(figure)


def error_line(error: BaseException) -> str:
    """One line for the table: the recipe's own ``error: ...`` line when the message has one."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    recipe_errors = [line for line in lines if line.startswith("error")]
    return f"{type(error).__name__}: {(recipe_errors or lines or [''])[-1]}"


def slurm_parameters(grid: dict) -> dict:
    """submitit ``SlurmExecutor`` parameters of one cell's job from the grid's ``slurm:`` section
    (``partition``, ``gpus_per_node``, ``cpus_per_task``, ``mem``, ``account``, ``timeout_min``
    ...). One task per job: a cell with ``nproc_per_node > 1`` starts its processes with torchrun."""
    settings = dict(grid["slurm"])
    return {"job_name": "ablate", "nodes": 1, "ntasks_per_node": 1,
            "time": settings.pop("timeout_min", 240), **settings}


def launch(grid: dict, cells: list[dict], launcher: str, grid_path: Path,
           output: Path) -> dict[str, str]:
    """Runs the cells without a ``result.json``; returns ``{cell: error}`` for those that failed."""
    failures = {}
    if launcher == "local":
        for cell in cells:
            try:
                run_cell(grid, cell)
            except (Exception, SystemExit) as error:  # a failed cell must not stop the grid
                traceback.print_exc()
                failures[cell["name"]] = error_line(error)
        return failures
    import submitit
    from submitit.helpers import CommandFunction

    if launcher == "slurm":
        executor = submitit.SlurmExecutor(folder=output / "submitit")
        executor.update_parameters(**slurm_parameters(grid))
    else:
        executor = submitit.LocalExecutor(folder=output / "submitit")
        executor.update_parameters(timeout_min=grid["slurm"].get("timeout_min", 240))
    jobs = [executor.submit(CommandFunction(
        [sys.executable, str(Path(__file__).resolve()), str(grid_path), "--output_folder",
         str(output), "--run_cell", cell["name"]], cwd=str(ROOT), env=dict(os.environ)))
        for cell in cells]
    for job, cell in zip(jobs, cells):
        print(f"{cell['name']}: job {job.job_id} (logs {job.paths.stdout.parent})", flush=True)
    for job, cell in zip(jobs, cells):
        try:
            job.result()
        except Exception as error:
            failures[cell["name"]] = f"{error_line(error)} (job {job.job_id}, {job.paths.stderr})"
    return failures


def read_back(grid: dict, cells: list[dict]) -> tuple[dict, dict]:
    """``({cell: result}, {cell: error})``: the finished cells whose result was made by the run
    asked for now, and those whose result was not (refused: not rerun over, not tabulated)."""
    finished, stale = {}, {}
    for cell in cells:
        path = Path(cell["folder"]) / "result.json"
        if not path.is_file():
            continue
        try:
            finished[cell["name"]] = check_result(path, expected_record(grid, cell))
            print(f"{cell['name']}: finished before ({path}), not rerun")
        except (Exception, SystemExit) as error:  # one stale cell must not stop the grid
            stale[cell["name"]] = error_line(error)
            print(f"{cell['name']}: {stale[cell['name']]}", file=sys.stderr)
    return finished, stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grid", type=Path, help="hparams/ablations/<grid>.yaml")
    parser.add_argument("--launcher", choices=["local", "slurm", "submitit-local"], default="local")
    parser.add_argument("--output_folder", type=Path, default=None,
                        help="default: the grid's output_folder")
    parser.add_argument("--cells", nargs="*", default=None, help="run only these cells")
    parser.add_argument("--run_cell", default=None, help=argparse.SUPPRESS)  # a launched job
    args = parser.parse_args()
    grid = load_grid(args.grid)
    output = (args.output_folder or Path(grid.get("output_folder")
                                         or f"results/ablations/{args.grid.stem}")).resolve()
    output.mkdir(parents=True, exist_ok=True)
    cells = cells_of(grid, output)
    names = [c["name"] for c in cells]
    wanted = args.cells if args.run_cell is None else [args.run_cell]
    unknown = set(wanted or []) - set(names)
    if unknown:
        raise SystemExit(f"error: cells {sorted(unknown)} are not in {args.grid}; its cells: {names}")
    cells = [c for c in cells if wanted is None or c["name"] in wanted]
    if args.run_cell is not None:
        finished = Path(cells[0]["folder"]) / "result.json"
        if finished.is_file():  # read back (a stale one is refused), not rerun over
            check_result(finished, expected_record(grid, cells[0]))
        else:
            run_cell(grid, cells[0])
        return
    finished, stale = read_back(grid, cells)
    todo = [c for c in cells if c["name"] not in finished and c["name"] not in stale]
    failures = launch(grid, todo, args.launcher, args.grid.resolve(), output) if todo else {}
    failures = {**stale, **failures}
    results = [json.loads((Path(c["folder"]) / "result.json").read_text()) for c in cells
               if c["name"] not in failures]
    if results:
        write_tables(results, failures, output)
        write_plots(results, output)
    print(json.dumps({"cells": [flat_row(r) for r in results], "failed": failures,
                      "table_md": str(output / "ablation.md"), "table_csv": str(output / "ablation.csv"),
                      "plots": [str(output / "cer_vs_latency.png"),
                                str(output / "step_time_vs_length.png")]}))
    if failures:
        raise SystemExit(f"error: {len(failures)} of {len(cells)} cells failed: "
                         + "; ".join(f"{k}: {v}" for k, v in failures.items()))


if __name__ == "__main__":
    main()
