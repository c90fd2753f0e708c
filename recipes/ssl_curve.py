#!/usr/bin/env python3
"""Does SSL pay off? The low-resource curve on the benchmark corpus, SSL-initialized against
from-scratch CTC, each arm tuned on dev on its own (``make ssl-curve``; hours, not a test).

For every encoder of the grid file (``hparams/curves/*.yaml``) and every labeled size:

1. **SSL** (``hparams/SSL/<encoder>.yaml``) on ``unlabeled_train``, one run per SSL seed (only
   the seeds a step needs are trained, when it needs them).
2. **Grid, on dev.** Each arm (``ssl``: from the first SSL seed's encoder; ``scratch``: random
   init) fine-tunes with CTC at every grid point (peak LR x SpecAugment ...) with ``grid_seed``,
   the same optimizer steps for both arms; ``train.py``'s own test set is ``dev.csv``, so a
   run's ``ctc_cer`` is its dev CER (greedy, averaged best checkpoints, which are also chosen by
   dev CER; per-epoch validation may read every ``valid_every``-th dev utterance). The arm's
   setting is its lowest dev CER. Test is never read here, and ``--dev_only`` stops here (for
   iterating on a recipe). The ``topline`` sizes (all labeled data) run the scratch arm alone,
   without a grid: at the scratch arm's choice of the encoder's largest other size.
3. **Final runs, on test.** The chosen setting of each arm with every fine-tuning seed (x every
   SSL seed for ``ssl``; none of them a grid run, so no dev winner is reported), each decoded on
   ``test.csv`` by ``evaluate.py --streaming`` at the ``test_contexts`` with per-utterance edits.
4. **Statistics** (``curve_report.py``): per size, arm and context, the test CER/WER mean with
   a 95 % t-interval over fine-tuning runs (and, for SSL, over SSL-seed means); the
   SSL-minus-scratch CER difference (per-utterance edits averaged over runs) with 95 % paired
   bootstrap intervals that resample test voices (base voices: timbres), and runs with them,
   the exact sign-flip p over voices, and the goal's verdict.
5. **Diagnostics on dev**: frozen-encoder CTC probes (SSL vs random encoder) and the effective
   rank of every layer's output.

Every run is its own folder with ``result.json`` (metrics, cost, and the record of the command,
commit and SSL checkpoint that made it): the command resumes, and refuses a stored result whose
record differs from the run it would start now. Writes ``<output>/curve.{md,csv,json,png}``
after every size; the last stdout line is JSON. ``--report_only`` trains and decodes nothing:
it reads every finished run back (made by ``--runs_commit``, e.g. a pinned checkout's) and
writes the report, with this checkout's report code, to ``<output>/report/``.

Usage::

    python recipes/ssl_curve.py hparams/curves/benchmark.yaml [--output_folder ...] \\
        [--encoders conformer] [--sizes train_10min] [--arms scratch ssl] [--ssl_seeds 1] \\
        [--dev_only] [--ssl_only] [--report_only [--runs_commit SHA]]
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import resource
import sys
import time
from pathlib import Path

from curve_grid import (check_corpus, hours_of, load_grid, locked, overrides, plain_yaml, rel,
                        repeated_manifest, run_name, setting_tag, write_manifest)
from curve_report import cost_summary, held_back, summarize, write_outputs
from demo import ROOT, SSL_SIZES, run
from layer_ranks import layer_ranks
from provenance import (check_result, current_code_commit, git, machine_description,
                        manifest_hashes, ssl_checkpoint_fields, write_json_atomic, write_result)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Curve:
    """Runs (or reads back) the SSL, fine-tuning and test runs of one grid file."""

    def __init__(self, grid: dict, folder: Path, arms: tuple[str, ...] = ("scratch", "ssl"),
                 ssl_seeds: list[int] | None = None, dev_only: bool = False,
                 report_only: bool = False, runs_commit: str | None = None):
        self.grid, self.folder, self.arms, self.dev_only = grid, folder, arms, dev_only
        self.ssl_seeds = ssl_seeds or grid["ssl"]["seeds"]
        self.corpus = Path(grid["corpus"])
        self.ssl_train_csv = self.corpus / "unlabeled_train.csv"
        # report_only: read finished runs back (made by runs_commit), never run anything
        self.report_only = report_only
        self.code_commit = runs_commit or current_code_commit()
        self.without_manifest_hashes: set[str] = set()  # runs read back from older records
        self.machines: set[str] = set()  # where the runs ran, from records that name it
        self.ssl_runs: dict[tuple[str, int], dict] = {}
        self.costs: dict[str, dict] = {}

    # ------------------------------ runs ----------------------------------
    def _run(self, name: str, script: str, args: list[str], ssl_sha256: str | None,
             wait: bool = True) -> dict | None:
        """``recipes/<script> args`` once: a stored result with the same record (command, code
        commit, SSL checkpoint, manifests' hashes) is read back; one with another record is
        refused. None when another process holds the run and ``wait`` is False."""
        path = self.folder / name / "result.json"
        expected = {"command": [f"recipes/{script}", *args], "code_commit": self.code_commit,
                    "ssl_checkpoint_sha256": ssl_sha256,
                    "manifest_sha256": manifest_hashes(args, ROOT)}
        if self.report_only:
            return self._read_back(name, path, expected)
        with locked(path.parent / ".lock", wait) as owned:
            if not owned:
                return None
            stored = check_result(path, expected)
            if stored is None:
                start_wall, start_cpu = time.time(), cpu_seconds()
                summary = run(script, *args)
                # A resumed run's earlier processes: their CPU time to the checkpoint resumed
                # from (train.py keeps it in the checkpoints); their wall time is not kept.
                earlier = summary.get("cpu_seconds_before_resume", 0.0)
                cost = {"wall_seconds": round(time.time() - start_wall, 1),
                        "cpu_seconds": round(cpu_seconds() - start_cpu + earlier, 1)}
                stored = {**{k: v for k, v in summary.items() if k != "record"}, "cost": cost}
                write_result(path, stored, summary["record"])
                stored["record"] = summary["record"]
        self.account(name, stored)
        return stored

    def account(self, name: str, stored: dict) -> None:
        """A run's cost, and its machine where its record names it."""
        self.costs[name] = stored["cost"]
        if stored["record"].get("machine"):
            self.machines.add(stored["record"]["machine"])

    def _read_back(self, name: str, path: Path, expected: dict) -> dict:
        """``--report_only``: the stored result, checked like a run's; records older than the
        manifest hashes (code before they were kept) are read without them, and listed."""
        if path.is_file() and "manifest_sha256" not in json.loads(path.read_text()).get(
                "record", {}):
            expected = {k: v for k, v in expected.items() if k != "manifest_sha256"}
            self.without_manifest_hashes.add(name)
        stored = check_result(path, expected)
        if stored is None:
            raise SystemExit(f"error: {path} not found: --report_only reads finished runs only "
                             "(run the curve to the end first)")
        self.account(name, stored)
        return stored

    def run_folder(self, name: str) -> Path:
        """Where run ``name`` trains (its ``--output_folder``): read from here, not from its
        result's absolute path, so that a curve's runs read back from another checkout."""
        return self.folder / name / "run"

    def ssl(self, encoder: str, seed: int, wait: bool = True) -> dict | None:
        """The SSL run of ``encoder`` with ``seed`` (trained the first time it is needed; None
        while another process trains it and ``wait`` is False)."""
        if (encoder, seed) not in self.ssl_runs:
            spec = self.grid["ssl"]
            name = f"{encoder}/ssl/seed{seed}"
            args = [spec["hparams"].format(encoder=encoder), "--data_folder", rel(self.corpus),
                    "--train_csv", rel(self.ssl_train_csv),
                    "--valid_csv", rel(self.corpus / "unlabeled_valid.csv"),
                    "--seed", str(seed), *overrides(spec["overrides"]),
                    "--output_folder", rel(self.run_folder(name))]
            result = self._run(name, "train.py", args, None, wait)
            if result is None:
                return None
            # its folder as this checkout names it (the result holds the absolute path where
            # it ran, another checkout's for a curve read back from elsewhere)
            self.ssl_runs[(encoder, seed)] = {**result,
                                              "output_folder": str(self.run_folder(name))}
        return self.ssl_runs[(encoder, seed)]

    def encoder_sizes(self, encoder: str) -> list[str]:
        """``--key value`` of the SSL encoder's sizes: every CTC run (both arms) uses them."""
        path = ROOT / self.grid["ssl"]["hparams"].format(encoder=encoder)
        hparams = {**plain_yaml(path.read_text()), **self.grid["ssl"]["overrides"]}
        return [a for key in SSL_SIZES[encoder] for a in (f"--{key}", str(hparams[key]))]

    def train_manifest(self, size: str) -> tuple[Path, int]:
        """The size's manifest, repeated to make up about an epoch of steps / validations; and
        the number of epochs that gives at least the size's optimizer steps."""
        batch = self.grid["fine_tune"]["batch_size"]
        steps, validations = self.grid["steps"][size], self.grid["validations"]
        source = self.corpus / f"{size}.csv"
        manifest = self.folder / "manifests" / f"{size}.csv"
        rows = repeated_manifest(source, manifest, math.ceil(steps / validations) * batch)
        return manifest, math.ceil(steps / math.ceil(rows / batch))

    def optimizer_steps(self, size: str) -> int:
        """The optimizer steps every run at ``size`` takes (at least the grid's ``steps``)."""
        manifest, epochs = self.train_manifest(size)
        with open(manifest) as f:
            rows = sum(1 for _ in csv.DictReader(f))
        return epochs * math.ceil(rows / self.grid["fine_tune"]["batch_size"])

    def valid_manifest(self) -> Path:
        """The per-epoch validation set: every ``valid_every``-th dev utterance (validation
        only picks and averages checkpoints; a run's reported dev CER is on all of dev)."""
        dev = self.corpus / "dev.csv"
        every = self.grid["valid_every"]
        if every == 1:
            return dev
        with open(dev) as f:
            rows = list(csv.DictReader(f))[::every]
        manifest = self.folder / "manifests" / f"dev_every{every}.csv"
        write_manifest(rows, manifest)
        return manifest

    def fine_tune(self, name: str, encoder: str, size: str, arm: str, setting: dict, seed: int,
                  ssl_seed: int | None, extra: dict | None = None, wait: bool = True
                  ) -> dict | None:
        """One CTC run; its test set is dev, so its ``ctc_cer`` is the dev CER (None while
        another process holds it, or the SSL run it needs, and ``wait`` is False)."""
        spec = self.grid["fine_tune"]
        manifest, epochs = self.train_manifest(size)
        args = [spec["hparams"].format(encoder=encoder), *self.encoder_sizes(encoder),
                "--data_folder", rel(self.corpus), "--train_csv", rel(manifest),
                "--valid_csv", rel(self.valid_manifest()),
                "--test_csv", rel(self.corpus / "dev.csv"),
                "--tokenizer_csv", rel(self.corpus / "train.csv"),
                "--number_of_epochs", str(epochs), "--batch_size", str(spec["batch_size"]),
                "--seed", str(seed),  # lr: both peaks, unless a setting gives one apart
                "--lr_encoder", str(setting.get("lr_encoder", setting["lr"])),
                "--lr_head", str(setting.get("lr_head", setting["lr"])),
                *overrides({k: v for k, v in setting.items()
                            if k not in ("lr", "lr_encoder", "lr_head")}),
                *overrides(spec["overrides"]), *overrides(self.grid["arms"][arm]),
                *overrides(extra or {})]
        ssl_sha256 = None
        if ssl_seed is not None:
            ssl = self.ssl(encoder, ssl_seed, wait)
            if ssl is None:
                return None
            ssl_folder = Path(ssl["output_folder"])
            ssl_sha256 = ssl_checkpoint_fields(ssl_folder)["ssl_checkpoint_sha256"]
            args += ["--pretrained_ssl", rel(ssl_folder)]
        args += ["--output_folder", rel(self.run_folder(name))]
        result = self._run(name, "train.py", args, ssl_sha256, wait)
        return None if result is None else {**result, "name": name}

    def test(self, name: str, trained: dict, wait: bool = True) -> dict | None:
        """Streaming test decode at the test contexts (``evaluate.py``): CER/WER per context,
        and every utterance's edits in ``<run>/test_utterances.jsonl`` (None while another
        process decodes it and ``wait`` is False)."""
        if self.report_only:
            return self._test(name, trained)
        with locked(self.folder / name / ".test.lock", wait) as owned:
            return self._test(name, trained) if owned else None

    def _test(self, name: str, trained: dict) -> dict:
        run_folder = self.run_folder(name)
        utterances = self.folder / name / "test_utterances.jsonl"
        args = [rel(run_folder / "hyperparams.yaml"), "--output_folder", rel(run_folder),
                "--test_csv", rel(self.corpus / "test.csv"), "--streaming", "--device", "cpu",
                "--utterances", rel(utterances)]
        for context in self.grid["test_contexts"]:
            args += ["--context", context]
        path = self.folder / name / "test.json"
        command = ["recipes/evaluate.py", *args]
        if path.is_file() and utterances.is_file():
            stored = json.loads(path.read_text())
            if stored["command"] == command and stored["trained"] == trained["cost"]:
                self.costs[f"{name} (test)"] = stored["cost"]
                return stored
        if self.report_only:
            raise SystemExit(f"error: {path} not found or made for another run: --report_only "
                             "reads finished test decodes only")
        # Every read of test is logged, append-only, before it happens: a decode that is
        # repeated (a changed command, a retrained run) stays on record.
        with open(self.folder / "test_decodes.jsonl", "a") as log:
            log.write(json.dumps({"run": name, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime()),
                                  "code_commit": self.code_commit, "command": command}) + "\n")
        start_wall, start_cpu = time.time(), cpu_seconds()
        evaluation = run("evaluate.py", *args)
        results = evaluation.get("results", [evaluation])
        stored = {"command": command, "trained": trained["cost"],
                  "cost": {"wall_seconds": round(time.time() - start_wall, 1),
                           "cpu_seconds": round(cpu_seconds() - start_cpu, 1)},
                  "contexts": [{"name": spec, "pair": r["context"], "cer": r["cer"],
                                "wer": r["wer"], "rtf": r["rtf"]}
                               for spec, r in zip(self.grid["test_contexts"], results)]}
        write_json_atomic(path, stored)
        self.costs[f"{name} (test)"] = stored["cost"]
        return stored

    # --------------------------- the curve --------------------------------
    def grid_points(self) -> list[dict]:
        grid = self.grid["fine_tune"]["grid"]
        return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]

    def arm_grid(self, dev: dict[str, float]) -> tuple[list[dict], dict | None]:
        """An arm's grid points so far and its choice (None until every point has a dev CER).

        ``dev``: dev CER by setting tag. When the lowest lies at the lowest or highest peak LR
        tried, one point beyond it (half or twice that LR, the rest of the setting kept) joins
        the grid, up to ``edge_extensions`` times: the same rule for both arms, so neither is
        left at an edge the other had explored.
        """
        points, limit = self.grid_points(), self.grid["fine_tune"].get("edge_extensions", 0)
        for extension in range(limit + 1):
            if any(setting_tag(s) not in dev for s in points):
                return points, None
            best = min(points, key=lambda s: dev[setting_tag(s)])
            lrs = sorted({s["lr"] for s in points})
            if extension == limit or best["lr"] not in (lrs[0], lrs[-1]) or len(lrs) < 2:
                return points, best
            points.append({**best, "lr": best["lr"] / 2 if best["lr"] == lrs[0]
                           else best["lr"] * 2})
        raise AssertionError("unreachable")

    def size_point(self, encoder: str, size: str) -> dict:
        """Grid on dev, then the chosen settings' final runs on test, for one labeled size.

        Runs held by another process (a second curve started beside this one) are skipped and
        taken up again later: this process blocks only when nothing else is left to do.
        """
        seeds, ssl_seeds = self.grid["fine_tune"]["seeds"], self.ssl_seeds
        # Grid runs: their own seed (finals never reuse a run that won on dev), and always the
        # grid's first SSL seed (every process and every --ssl_seeds choose on the same runs).
        grid_seed, grid_ssl = self.grid["fine_tune"]["grid_seed"], self.grid["ssl"]["seeds"][0]
        point = {"encoder": encoder, "size": size, "grid": [], "arms": {},
                 "labeled_hours": round(hours_of(self.corpus / f"{size}.csv"), 3),
                 "steps": self.optimizer_steps(size),
                 "goal_target": self.grid["goals"].get(size)}
        tuned_for = self.grid["ssl_tuned_for"]
        if tuned_for and encoder not in tuned_for:
            point["caveat"] = (f"the SSL recipe was tuned on dev for {', '.join(tuned_for)}, "
                               f"not for {encoder}")
        # The topline (all labeled data) is a supervised reference, not an arm of the
        # comparison: the scratch arm alone, at its choice of the largest other size.
        topline = None
        if size in self.grid["topline"]:
            if "scratch" not in self.arms:
                point.update(summary=[])  # nothing of the topline's arm asked for
                return point
            topline = self.topline_setting(encoder, point)
        arms = [a for a in self.arms if a == "scratch" or topline is None]
        dev: dict[str, dict[str, float]] = {arm: {} for arm in arms}
        finals: dict[tuple, dict] = {}
        wait = False
        while True:
            before = sum(map(len, dev.values())) + len(finals)
            complete = True
            for arm in arms:
                first_ssl = grid_ssl if arm == "ssl" else None
                points, chosen = [], topline
                while topline is None:  # grid points, extended at an edge as results come in
                    points, chosen = self.arm_grid(dev[arm])
                    todo = [s for s in points if setting_tag(s) not in dev[arm]]
                    for setting in todo:
                        name = run_name(encoder, size, arm, setting, grid_seed, first_ssl)
                        result = self.fine_tune(name, encoder, size, arm, setting, grid_seed,
                                                first_ssl, wait=wait)
                        if result is not None:
                            dev[arm][setting_tag(setting)] = result["ctc_cer"]
                            wait = False  # a wait has paid off: skip held runs again
                    if not todo or all(setting_tag(s) not in dev[arm] for s in todo):
                        break  # chosen, or waiting on runs another process holds
                point["grid"] = [g for g in point["grid"] if g["arm"] != arm] + [
                    {"arm": arm, **s, "dev_cer": dev[arm][setting_tag(s)]}
                    for s in points if setting_tag(s) in dev[arm]]
                if chosen is None:
                    complete = False
                    continue
                point["arms"][arm] = {"setting": chosen, "runs": []}
                if self.dev_only:
                    continue
                for ssl_seed in (ssl_seeds if arm == "ssl" else [None]):
                    for seed in seeds:
                        key = (arm, ssl_seed, seed)
                        if key in finals:
                            continue
                        name = run_name(encoder, size, arm, chosen, seed, ssl_seed)
                        result = self.fine_tune(name, encoder, size, arm, chosen, seed, ssl_seed,
                                                wait=wait)
                        test = result and self.test(name, result, wait)
                        if test is None:
                            complete = False
                            continue
                        finals[key] = {"name": name, "seed": seed, "ssl_seed": ssl_seed,
                                       "dev_cer": result["ctc_cer"], "test": test}
                        wait = False
                point["arms"][arm]["runs"] = [
                    finals[(arm, s_, seed)] for s_ in (ssl_seeds if arm == "ssl" else [None])
                    for seed in seeds if (arm, s_, seed) in finals]
            if complete:
                break
            # nothing moved: block on the first run another process holds (then, as soon as
            # one arrives, skip held runs again: two processes do not queue behind each other)
            wait = sum(map(len, dev.values())) + len(finals) == before
        measured = point["arms"] and all(a["runs"] for a in point["arms"].values())
        point["summary"] = summarize(point, self.grid, self.folder) if measured else []
        return point

    def topline_setting(self, encoder: str, point: dict) -> dict:
        """The scratch arm's choice at ``encoder``'s largest size that is not a topline (its dev
        grid read back, or run if it has not been); recorded in ``point["setting_from"]``."""
        sizes = [s for s in self.grid["encoders"][encoder] if s not in self.grid["topline"]]
        source = max(sizes, key=lambda s: hours_of(self.corpus / f"{s}.csv"))
        dev_only, arms = self.dev_only, self.arms
        self.dev_only, self.arms = True, ("scratch",)
        try:
            chosen = self.size_point(encoder, source)["arms"]["scratch"]["setting"]
        finally:
            self.dev_only, self.arms = dev_only, arms
        point["setting_from"] = f"{encoder} {source}, scratch arm"  # what the report says
        return chosen

    def probes(self, encoder: str) -> list[dict]:
        """Frozen-encoder CTC probes on the smallest size (dev CER): SSL vs random encoder."""
        size = min(self.grid["encoders"][encoder], key=lambda s: self.grid["steps"][s])
        setting = {"lr": max(self.grid["fine_tune"]["grid"]["lr"]), "spec_augment_prob": 0.0}
        found = []
        for init, ssl_seed in (("ssl", self.ssl_seeds[0]), ("random", None)):
            for layer in self.grid["probe_layers"]:
                name = f"{encoder}/probes/{init}_layer{layer}"
                result = self.fine_tune(name, encoder, size, "scratch", setting,
                                        self.grid["fine_tune"]["seeds"][0], ssl_seed,
                                        {"freeze_encoder": True, "probe_layer": layer})
                found.append({"encoder": encoder, "init": init, "layer": layer,
                              "size": size, "dev_cer": result["ctc_cer"]})
        return found

    def ranks(self, encoder: str) -> dict:
        """Effective rank of every layer's output on dev: each SSL seed's encoder and a random
        one (``layer_ranks``)."""
        ranks = {}
        for seed in self.ssl_seeds:
            if (encoder, seed) in self.ssl_runs:
                folder = Path(self.ssl_runs[(encoder, seed)]["output_folder"])
                ranks.update(layer_ranks(folder, self.corpus / "dev.csv", f"ssl seed {seed}"))
        return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grid", type=Path, help="hparams/curves/<name>.yaml")
    parser.add_argument("--output_folder", type=Path, help="default: the grid's output_folder")
    parser.add_argument("--encoders", nargs="+", help="only these encoders of the grid")
    parser.add_argument("--sizes", nargs="+", help="only these labeled sizes of the grid")
    parser.add_argument("--arms", nargs="+", choices=["scratch", "ssl"],
                        default=["scratch", "ssl"],
                        help="only these arms (e.g. scratch here while --ssl_only runs beside)")
    parser.add_argument("--ssl_seeds", nargs="+", type=int,
                        help="only these of the grid's SSL seeds (e.g. a first pass with one)")
    parser.add_argument("--dev_only", action="store_true",
                        help="stop after the grids (dev CER only): for iterating on the recipe "
                             "without seeing test")
    parser.add_argument("--ssl_only", action="store_true",
                        help="only the SSL pretraining runs (all SSL seeds of the encoders)")
    parser.add_argument("--report_only", action="store_true",
                        help="train and decode nothing: read every finished run back and write "
                             "the report with this checkout's code to <output_folder>/report/")
    parser.add_argument("--runs_commit",
                        help="with --report_only: the code commit that made the runs (e.g. a "
                             "pinned checkout's; default: this checkout's)")
    parser.add_argument("--corpus_sha256", type=Path,
                        help="with --report_only: a sha256sum file of the corpus's manifests "
                             "(e.g. docs/figures/ssl_curve_runs/corpus_sha256.txt), checked "
                             "first; needed when run records predate manifest hashes")
    args = parser.parse_args()
    for flag in ("runs_commit", "corpus_sha256"):
        if getattr(args, flag) and not args.report_only:
            raise SystemExit(f"error: --{flag} is for --report_only (a curve that trains runs "
                             "with this checkout's code records its own)")
    if args.report_only and args.ssl_only:
        raise SystemExit("error: --report_only and --ssl_only: the SSL runs have no report")
    if args.runs_commit:
        full = git("rev-parse", "--verify", "--quiet", f"{args.runs_commit}^{{commit}}")
        if not full:
            raise SystemExit(f"error: --runs_commit {args.runs_commit}: not a commit of this "
                             "repository")
        args.runs_commit = full
    grid = load_grid(args.grid)
    corpus = Path(grid["corpus"])
    if not (corpus / "test.csv").is_file():
        raise SystemExit(f"error: {corpus}/test.csv not found: run `make corpus-labeled`")
    folder = args.output_folder or Path(grid["output_folder"])
    if args.ssl_seeds and not set(args.ssl_seeds) <= set(grid["ssl"]["seeds"]):
        raise SystemExit(f"error: --ssl_seeds {args.ssl_seeds}: the grid's are "
                         f"{grid['ssl']['seeds']}")
    corpus_check = check_corpus(corpus, args.corpus_sha256) if args.corpus_sha256 else None
    curve = Curve(grid, folder, tuple(args.arms), args.ssl_seeds, args.dev_only,
                  args.report_only, args.runs_commit)
    header = {"grid": rel(args.grid), "code_commit": current_code_commit(),
              "runs_commit": curve.code_commit,
              "command": " ".join(["python", "recipes/ssl_curve.py", *sys.argv[1:]]),
              "machine": machine_description(), "cpu_budget_hours": grid["cpu_budget_hours"]}
    # Test figures are written only once every point of the grid file is measured, so that no
    # recipe choice still to come (a later size, the other encoder) can follow a test figure.
    whole = not (args.encoders or args.sizes or args.ssl_seeds or args.dev_only
                 or args.ssl_only or set(args.arms) != {"scratch", "ssl"})
    points, probes, ranks = [], [], {}

    def save(final: bool = False):
        shown = points if final and whole else [held_back(p) for p in points]
        header["test_held_back"] = not (final and whole)
        header["cost"] = cost_summary(curve.costs, grid)
        header["runs_without_manifest_hashes"] = len(curve.without_manifest_hashes)
        if curve.without_manifest_hashes and not corpus_check:
            raise SystemExit("error: run records without manifest hashes (older code): give "
                             "--corpus_sha256 to check the corpus they were read against")
        header["corpus_check"] = corpus_check
        header["runs_machines"] = sorted(curve.machines)
        write_outputs(shown, probes, ranks, header, grid["fine_tune"]["grid"], stem)

    stem = folder / "report" / "curve" if args.report_only else folder / "curve"

    for encoder, sizes in grid["encoders"].items():
        if args.encoders and encoder not in args.encoders:
            continue
        if args.ssl_only:
            for seed in curve.ssl_seeds:
                curve.ssl(encoder, seed)
            continue
        for size in sizes:
            if args.sizes and size not in args.sizes:
                continue
            points.append(curve.size_point(encoder, size))
            save()
            print(json.dumps({"point": f"{encoder} {size}", "grid": points[-1]["grid"]}),
                  flush=True)
        if grid["probe_layers"] and "ssl" in args.arms:
            probes += curve.probes(encoder)
        found = curve.ranks(encoder)
        if found:
            ranks[encoder] = found
        save()
    save(final=True)
    print(json.dumps({"table_md": str(stem.with_suffix(".md")),
                      "plot": str(stem.with_suffix(".png")),
                      "cpu_hours": header["cost"]["cpu_hours"], "points": len(points),
                      "test_held_back": header["test_held_back"]}))


if __name__ == "__main__":
    main()
