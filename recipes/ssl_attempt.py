#!/usr/bin/env python3
"""One attempt at the SSL recipe, judged on dev ("diagnose and iterate", docs/benchmark.md).

Pretrains the curve's SSL encoder with changed hparams (``--ssl_overrides``), keeps a copy of
its end-of-epoch checkpoint at each of ``--snapshot_epochs`` (one run shows how the gain moves
with pretraining length: the Noam schedule does not depend on the run's length, so epoch 4 of a
12-epoch run is the 4-epoch run; the run keeps every end-of-epoch checkpoint), and fine-tunes every snapshot exactly as the curve's SSL arm
does (same manifest, steps, decoder, ``grid_seed``) at each ``--settings`` point; ``--scratch``
adds the scratch arm at its settings, under the same overrides (e.g. ``--precision``). Only dev
CER is computed: test is for the curve's final runs. Every run keeps its record and resumes
(``ssl_curve.py``'s machinery); ``<output>/<name>/attempt.{json,md}`` holds the table.

Usage::

    python recipes/ssl_attempt.py hparams/curves/benchmark.yaml --name length \\
        --ssl_overrides number_of_epochs=12 --snapshot_epochs 4 8 12 --precision bf16 \\
        --settings lr=0.002,spec_augment_prob=1.0 --scratch lr=0.0005,spec_augment_prob=0.0
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import yaml

from curve_grid import load_grid, rel, run_name, write_manifest
from provenance import ROOT, machine_description, write_json_atomic
from ssl_curve import Curve


def parse_setting(text: str) -> dict:
    """``lr=0.002,spec_augment_prob=1.0`` -> ``{"lr": 0.002, "spec_augment_prob": 1.0}``."""
    setting = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: setting {text!r}: write key=value pairs separated by commas")
        setting[key.strip()] = yaml.safe_load(value)
    if "lr" not in setting:
        raise SystemExit(f"error: setting {text!r} has no lr (the peak LR of encoder and head)")
    return setting


def checkpoint_epoch(checkpoint: Path) -> int | None:
    """The epoch of an end-of-epoch SSL checkpoint (one with a valid loss), else None."""
    meta = yaml.safe_load((checkpoint / "CKPT.yaml").read_text()) if (
        checkpoint / "CKPT.yaml").is_file() else None
    counter = checkpoint / "counter.ckpt"
    if not meta or "loss" not in meta or not counter.is_file():
        return None
    return int(counter.read_text().strip())


def snapshot(run_folder: Path, epochs: set[int], out: Path, stop: threading.Event) -> None:
    """Copies each end-of-epoch checkpoint of ``epochs`` (with the run's hyperparams.yaml, which
    ``--pretrained_ssl`` reads) to ``out/epoch<N>``, polling until ``stop``. SpeechBrain writes a
    checkpoint's meta file before its tensors: a checkpoint is copied once its files stay the same
    over one poll; at ``stop`` (the run has ended) every one left is copied."""
    seen: dict[Path, list] = {}
    while True:
        finished = stop.is_set()
        for checkpoint in sorted((run_folder / "save").glob("CKPT+*")):
            try:  # an intra-epoch checkpoint is deleted by the next one
                files = sorted((f.name, f.stat().st_size) for f in checkpoint.iterdir())
                epoch = checkpoint_epoch(checkpoint)
            except FileNotFoundError:
                continue
            stable, seen[checkpoint] = seen.get(checkpoint) == files, files
            target = out / f"epoch{epoch}"
            if epoch in epochs and (stable or finished) and not target.exists():
                partial = out / f".epoch{epoch}.partial"
                shutil.rmtree(partial, ignore_errors=True)
                shutil.copytree(checkpoint, partial / "save" / checkpoint.name)
                shutil.copy(run_folder / "hyperparams.yaml", partial / "hyperparams.yaml")
                partial.rename(target)
                print(f"snapshot: epoch {epoch} -> {target}", flush=True)
        if finished:
            return
        stop.wait(10)


def unlabeled_manifest(sources: list[Path], out: Path) -> Path:
    """Writes the rows of ``sources`` as one SSL manifest, with the transcripts left empty (SSL
    reads none; a labeled partition joins as audio only). Dev and test are refused: their voices
    stay unheard until the decode that scores them."""
    rows = []
    for source in sources:
        if source.stem in ("dev", "test"):
            raise SystemExit(f"error: --ssl_manifests: {source.stem} is for scoring; pretraining "
                             "on its audio would let the encoder hear the voices it is scored on")
        if not source.is_file():
            raise SystemExit(f"error: --ssl_manifests: no {source} (a manifest of the corpus, "
                             "e.g. unlabeled_train or train)")
        with open(source) as f:
            rows += [{**row, "wrd": ""} for row in csv.DictReader(f)]
    if len({row["ID"] for row in rows}) < len(rows):
        raise SystemExit(f"error: --ssl_manifests: {[str(s) for s in sources]} share utterance IDs")
    write_manifest(rows, out)
    return out


def with_records(report: dict, folder: Path) -> dict:
    """``report`` with what made each figure: every row's run record, the SSL run's record and
    its per-epoch valid loss and masked accuracy, and the machine."""
    def record(result: Path) -> dict | None:  # None: not finished (the other process's run)
        return json.loads(result.read_text()).get("record") if result.is_file() else None

    ssl_run = ROOT / report["ssl_run"]
    history = json.loads((ssl_run / "history.json").read_text()) if (
        ssl_run / "history.json").is_file() else []
    return {**report,
            "rows": [{**row, "record": record(folder / row["run"] / "result.json")}
                     for row in report["rows"]],
            "ssl_run_record": record(ssl_run.parent / "result.json"),
            "ssl_history": [{"epoch": e["epoch"], "valid_loss": e["valid"]["loss"],
                             "valid_masked_acc": e["valid"]["masked_acc"],
                             "train_stage_seconds": e.get("train_stage_seconds")}
                            for e in history],
            "machine": machine_description()}


def wait_for(path: Path) -> Path:
    while not path.is_dir():
        time.sleep(30)
    return path


class Attempt(Curve):
    """The curve's SSL run with changed hparams and snapshots; fine-tuning as the curve's."""

    def __init__(self, grid: dict, folder: Path, ssl_overrides: dict, epochs: list[int],
                 extra: dict, ssl_manifests: list[str] | None = None):
        merged = {**grid["ssl"]["overrides"], **ssl_overrides}
        # every end-of-epoch checkpoint stays (the run would keep only its lowest-loss one), so
        # that each snapshot is there to copy however fast the epochs go
        merged["checkpoints_to_keep"] = int(merged.get("number_of_epochs", max(epochs))) + 1
        grid = {**grid, "ssl": {**grid["ssl"], "overrides": merged}}
        super().__init__(grid, folder, dev_only=True)
        self.epochs, self.extra = epochs, extra
        if ssl_manifests:
            self.ssl_train_csv = unlabeled_manifest(
                [self.corpus / f"{name}.csv" for name in ssl_manifests],
                folder / "manifests" / "ssl_train.csv")

    def snapshots(self, encoder: str, seed: int) -> dict[int, Path]:
        """Trains the SSL run (or reads it back) while copying its snapshots."""
        run_folder = self.folder / f"{encoder}/ssl/seed{seed}/run"
        out = self.folder / f"{encoder}/ssl/seed{seed}/snapshots"
        stop = threading.Event()
        watcher = threading.Thread(target=snapshot, args=(run_folder, set(self.epochs), out, stop))
        watcher.start()
        try:
            self.ssl(encoder, seed)
        finally:
            stop.set()
            watcher.join()
        missing = [e for e in self.epochs if not (out / f"epoch{e}").is_dir()]
        if missing:
            raise SystemExit(f"error: no snapshot of epochs {missing} in {out} (a run resumed "
                             "after those epochs keeps none: start the attempt in a new folder)")
        return {e: out / f"epoch{e}" for e in self.epochs}

    def follow(self, encoder: str, seed: int, epoch: int) -> Path:
        """The snapshot of ``epoch`` that another process makes, once it exists."""
        return wait_for(self.folder / f"{encoder}/ssl/seed{seed}/snapshots/epoch{epoch}")

    def dev_cer(self, encoder: str, size: str, arm: str, setting: dict, ssl_folder: Path | None,
                tag: str) -> dict:
        seed = self.grid["fine_tune"]["grid_seed"]
        name = run_name(encoder, size, arm, setting, seed, None).replace(
            f"/{arm}/", f"/{arm}{tag}/")
        if ssl_folder is not None:  # the snapshot stands in for the curve's SSL run
            self.ssl_runs[(encoder, 0)] = {"output_folder": str(ssl_folder)}
        result = self.fine_tune(name, encoder, size, arm, setting, seed,
                                0 if ssl_folder is not None else None, self.extra)
        return {"arm": arm, "snapshot": tag.lstrip("_") or None, **setting,
                "dev_cer": result["ctc_cer"], "cpu_minutes": round(
                    result["cost"]["cpu_seconds"] / 60, 1), "run": name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grid", type=Path, help="hparams/curves/<name>.yaml (corpus, sizes, spec)")
    parser.add_argument("--name", required=True, help="the attempt's folder under the output")
    parser.add_argument("--output_folder", type=Path, default=Path("results/ssl_attempts"))
    parser.add_argument("--encoder", default="conformer")
    parser.add_argument("--size", default="train_10min", help="labeled size of the grid")
    parser.add_argument("--ssl_seed", type=int, default=1)
    parser.add_argument("--ssl_overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="hparams of the SSL run that differ from the curve's")
    parser.add_argument("--ssl_manifests", nargs="*", default=[], metavar="NAME",
                        help="corpus manifests the SSL run pretrains on, as audio only "
                             "(default: the curve's unlabeled_train)")
    parser.add_argument("--snapshot_epochs", nargs="*", type=int, default=[])
    parser.add_argument("--settings", nargs="*", default=[], metavar="KEY=VALUE,...",
                        help="fine-tuning settings of the SSL arm (lr, spec_augment_prob, ...)")
    parser.add_argument("--scratch", nargs="*", default=[], metavar="KEY=VALUE,...",
                        help="settings of the scratch arm under the same overrides")
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        help="of every run (bf16 needs a CPU with AMX or a GPU)")
    parser.add_argument("--follow", action="store_true",
                        help="leave the SSL run to another copy of this command: fine-tune each "
                             "snapshot as it appears (two cores: one pretrains, one fine-tunes)")
    args = parser.parse_args()
    grid = load_grid(args.grid)
    if args.encoder not in grid["encoders"] or args.size not in grid["steps"]:
        raise SystemExit(f"error: --encoder {args.encoder} / --size {args.size}: not in {args.grid}")
    ssl_overrides = {}
    for item in args.ssl_overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --ssl_overrides {item!r}: write KEY=VALUE")
        ssl_overrides[key] = yaml.safe_load(value)
    extra = {"precision": args.precision} if args.precision else {}
    if args.precision:
        ssl_overrides["precision"] = args.precision
    folder = args.output_folder / args.name
    attempt = Attempt(grid, folder, ssl_overrides, args.snapshot_epochs, extra,
                      args.ssl_manifests)

    def scratch_rows() -> list[dict]:
        return [attempt.dev_cer(args.encoder, args.size, "scratch", parse_setting(s), None, "")
                for s in args.scratch]

    # the follower takes the scratch runs while the SSL run goes on; the pretrainer reads them
    # back at its end (a run held by the other process is waited for, not run twice)
    rows = scratch_rows() if args.follow else []
    if args.settings and not args.follow:
        snapshots = attempt.snapshots(args.encoder, args.ssl_seed)
    for epoch in args.snapshot_epochs if args.settings else []:
        ssl_folder = attempt.follow(args.encoder, args.ssl_seed, epoch) if args.follow \
            else snapshots[epoch]
        rows += [attempt.dev_cer(args.encoder, args.size, "ssl", parse_setting(s), ssl_folder,
                                 f"_ssl{args.ssl_seed}_epoch{epoch}") for s in args.settings]
    if not args.follow:
        rows = scratch_rows() + rows
    report = {"command": " ".join(["python", "recipes/ssl_attempt.py", *sys.argv[1:]]),
              "code_commit": attempt.code_commit, "ssl_overrides": ssl_overrides,
              "ssl_train_csv": rel(attempt.ssl_train_csv),
              "ssl_run": rel(folder / f"{args.encoder}/ssl/seed{args.ssl_seed}/run"),
              "rows": rows, "finished": time.strftime("%Y-%m-%d %H:%M")}
    write_json_atomic(folder / "attempt.json", with_records(report, folder))
    lines = [f"`{report['command']}` (code {str(attempt.code_commit)[:7]})", "",
             "| arm | snapshot | setting | dev CER % | CPU-min |", "|---|---|---|---|---|"]
    for row in rows:
        shown = {k: v for k, v in row.items()
                 if k not in {"arm", "snapshot", "dev_cer", "cpu_minutes", "run", "record"}}
        setting = ", ".join(f"{k} {v}" for k, v in shown.items())
        lines.append(f"| {row['arm']} | {row['snapshot'] or '-'} | {setting} | "
                     f"{row['dev_cer']:.2f} | {row['cpu_minutes']} |")
    (folder / "attempt.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"attempt_md": str(folder / "attempt.md"), "rows": len(rows)}))


if __name__ == "__main__":
    main()
