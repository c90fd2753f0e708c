#!/usr/bin/env python3
"""Keeps the finished runs of the SSL curve in progress in this folder, or puts them back.

    python docs/figures/ssl_curve_runs/archive.py save --results <curve output folder>
    python docs/figures/ssl_curve_runs/archive.py restore --results <curve output folder>

(the curve output folder: ``<checkout>/results/ssl_curve/benchmark``).

Per run: ``result.json`` and the run's log, hparams and record; a final run only once its test
decode is done (``test.json``, ``test_utterances.jsonl``: no checkpoint of it is kept); an SSL
run also its best checkpoint (``CKPT.yaml``, ``encoder.ckpt``, ``normalize.ckpt``), so that the
SSL-initialized runs read back with the same checkpoint hash. ``restore`` needs a checkout of
the same commit at the same absolute path as the one that made the runs (their records and
test commands hold absolute run folders). See README.md here.
"""
import argparse
import shutil
import sys
from pathlib import Path

ARCHIVE = Path(__file__).resolve().parent
sys.path.insert(0, str(ARCHIVE.parents[2] / "recipes"))
from provenance import best_ssl_checkpoint  # noqa: E402

RUN_FILES = ["result.json", "test.json", "test_utterances.jsonl", "run/train_log.txt",
             "run/hyperparams.yaml", "run/run_record.json"]
TOP_FILES = ["test_decodes.jsonl", "curve.json", "curve.md", "curve.csv", "curve.png"]


def copy(source: Path, target: Path) -> bool:
    """Copies a file that is new or changed; whether it did."""
    if not source.is_file() or (target.is_file() and target.read_bytes() == source.read_bytes()):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    return True


def kept_files(run: Path) -> list[str]:
    """What is kept of a finished run folder (empty: not yet)."""
    final = run.name.startswith("seed") and run.name != "seed0" and run.parent.name != "ssl"
    if final and not ((run / "test.json").is_file() and (run / "test_utterances.jsonl").is_file()):
        return []  # trained, not yet decoded on test: its checkpoints are not kept here
    files = list(RUN_FILES)
    if run.parent.name == "ssl":
        best = best_ssl_checkpoint(run / "run")
        if best is None:
            raise SystemExit(f"error: {run}/run has no SSL checkpoint to keep")
        files += [str(best.relative_to(run) / name)
                  for name in ("CKPT.yaml", "encoder.ckpt", "normalize.ckpt")]
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["save", "restore"])
    parser.add_argument("--results", type=Path, required=True,
                        help="the curve's output folder (results/ssl_curve/benchmark)")
    args = parser.parse_args()
    source, target = ((args.results, ARCHIVE) if args.mode == "save"
                      else (ARCHIVE, args.results))
    copied = 0
    for result in source.rglob("result.json"):
        run = result.parent
        copied += sum(copy(run / name, target / run.relative_to(source) / name)
                      for name in kept_files(run))
    copied += sum(copy(source / name, target / name) for name in TOP_FILES)
    print(f"{args.mode}: {copied} files copied")


if __name__ == "__main__":
    main()
