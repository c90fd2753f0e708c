#!/usr/bin/env python3
"""Downstream tasks (keyword spotting, intent) on an exported SSL encoder, compared with the
same encoder randomly initialized and with fbank features, several seeds each; test accuracy
with t-intervals, paired voice-bootstrap differences, and the streaming decision latency.

Usage::

    make corpus-downstream
    python recipes/export.py <SSL run> --out exported/ssl_benchmark
    python recipes/downstream.py --ssl_model exported/ssl_benchmark \\
        [--tasks kws intent] [--upstreams ssl random fbank] [--seeds 1 2 3] [--context medium] \\
        [--grid lr=0.002,0.01,0.03 ...] [--overrides number_of_epochs=2 ...]

Each upstream is tuned on its own: every ``--grid`` setting trains once (``--grid_seed``) and
the one of best dev accuracy runs with each of ``--seeds``, scored on test. Each run is
``recipes/train.py hparams/downstream/<task>.yaml`` (frozen encoder, learnable layer sum, the
task's ``train_few.csv``: 8 examples per class); its ``result.json`` records the
command, code commit, SSL checkpoint hash and a hash of the task's manifests, and is read back
(not rerun) when they match.
Writes ``<output_folder>/<task>/summary.{json,md}``; the last stdout line is the summary as JSON.

Streaming (``streaming_latency``): the seed-1 model classifies test clips chunk by chunk (a
running mean over everything heard since the clip began); its decisions are checked against its
offline ones. The table gives the chunk (a partial decision after each) and the median compute
of a chunk on one CPU thread: when a clip ends, its last (partial) chunk is pushed at once, so
the decision comes that compute after the end of the audio. This is latency on pre-segmented
clips; spotting words in a continuing stream (windows, resets, false alarms) is not measured.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

import quiet  # noqa: F401  (before SpeechBrain)
from cli import RecipeParser, run_cli
from demo import ROOT, run
from provenance import (check_result, current_code_commit, sha256_file, ssl_checkpoint_fields,
                        write_result)
from stats import paired_cluster_bootstrap, paired_sign_flip, t_interval

TASKS = ("kws", "intent")
UPSTREAMS = ("ssl", "random", "fbank")


def flags(pairs: list[str]) -> list[str]:
    """``["lr=0.01"]`` -> ``["--lr", "0.01"]``."""
    return [a for pair in pairs for a in (f"--{pair.split('=', 1)[0]}", pair.split("=", 1)[1])]


def grid_settings(grid: list[str]) -> list[list[str]]:
    """``["lr=0.002,0.01", "hidden_size=64,256"]`` -> every combination, as KEY=VALUE lists."""
    axes = [[f"{key}={value}" for value in values.split(",")]
            for key, values in (axis.split("=", 1) for axis in grid)]
    return [list(setting) for setting in itertools.product(*axes)]


def train(task: str, upstream: str, seed: int, setting: list[str], folder: Path, args,
          expected: dict, tuning: bool = False) -> dict:
    """One run (``recipes/train.py`` under ``folder``), or its stored result when its record
    matches (else a one-line refusal). ``tuning``: a grid run, whose final scoring is on dev
    too (no test figure exists before the setting is chosen)."""
    ssl = ["--ssl_model", args.ssl_model] if upstream == "ssl" else []
    data = Path(args.data_root) / task
    dev_as_test = ["--test_csv", str(data / "dev.csv")] if tuning else []
    arguments = [f"hparams/downstream/{task}.yaml", "--upstream", upstream, "--seed", str(seed),
                 "--context", args.context, "--data_folder", str(data), *dev_as_test,
                 *ssl, *flags(args.overrides + setting), "--output_folder", str(folder / "run")]
    path = folder / "result.json"
    corpus = manifests_sha256(ROOT / data)  # a regenerated corpus is another experiment
    stored = check_result(path, {**expected, "command": ["recipes/train.py", *arguments],
                                 "ssl_checkpoint_sha256": expected["ssl_checkpoint_sha256"]
                                 if upstream == "ssl" else None, "manifests_sha256": corpus})
    if stored is None:
        start = time.time()
        summary = run("train.py", *arguments)
        stored = {**{k: v for k, v in summary.items() if k != "record"},
                  "wall_seconds": round(time.time() - start, 1)}
        write_result(path, stored, {**summary["record"], "manifests_sha256": corpus})
    return stored


def manifests_sha256(folder: Path) -> str:
    """One hash of a task's manifests (train_few, dev, test), which name every clip."""
    digest = hashlib.sha256()
    for name in ("train_few.csv", "dev.csv", "test.csv"):
        digest.update(sha256_file(folder / name).encode())
    return digest.hexdigest()


def choose(task: str, upstream: str, args, expected: dict) -> dict:
    """The ``--grid`` setting of best dev accuracy for this task and upstream (its own tuning),
    each setting trained once with ``--grid_seed``; ties go to the first setting."""
    settings = grid_settings(args.grid)
    if len(settings) == 1:
        return {"setting": settings[0], "dev_accuracy": None, "grid_edge": False}
    dev = {}
    for setting in settings:
        name = "_".join(setting).replace("=", "")  # lr0.01
        folder = Path(args.output_folder) / task / upstream / "grid" / name
        result = train(task, upstream, args.grid_seed, setting, folder, args, expected,
                       tuning=True)
        dev[" ".join(setting)] = 100 * result["valid_accuracy_best"]
    best = max(settings, key=lambda setting: dev[" ".join(setting)])
    # A best value at the end of an axis of three or more may hide a better one beyond it.
    axes = [axis.split("=", 1)[1].split(",") for axis in args.grid]
    edge = any(len(values) > 2 and pair.split("=", 1)[1] in (values[0], values[-1])
               for values, pair in zip(axes, best))
    return {"setting": best, "dev_accuracy": dev, "grid_edge": edge}


def predictions(run_output: str | Path) -> dict[str, tuple[str, str]]:
    """``{utterance: (label, predicted)}`` of a run's test set."""
    with open(Path(run_output) / "test_predictions.csv", newline="") as f:
        return {row["ID"]: (row["label"], row["predicted"]) for row in csv.DictReader(f)}


def voices(manifest: Path) -> dict[str, str]:
    """``{utterance: base voice}`` (the ``voice`` column; ``spk_id`` in manifests without it):
    the bootstrap's clusters, since the settings of one voice are not independent speakers."""
    with open(manifest, newline="") as f:
        return {row["ID"]: row.get("voice") or row["spk_id"] for row in csv.DictReader(f)}


def load_trained(run_output: str | Path) -> dict:
    """The hparams of a finished downstream run, its best checkpoint (by valid error) loaded."""
    from hyperpyyaml import load_hyperpyyaml

    with open(Path(run_output) / "hyperparams.yaml") as f:
        hparams = load_hyperpyyaml(f, {"ssl_model": None})  # the run's weights, not the export
    checkpointer = hparams["checkpointer"]
    if hparams["upstream"] == "fbank":
        for name in ("encoder", "layer_sum"):
            checkpointer.recoverables.pop(name)
    if checkpointer.recover_if_possible(min_key="error") is None:
        raise FileNotFoundError(f"{run_output}: no checkpoint to measure the latency with")
    for name in ("encoder", "layer_sum", "classifier", "normalize"):
        hparams[name].eval()
    return hparams


def stratified(rows: list[dict], count: int) -> list[dict]:
    """``count`` rows taking each class in turn (the first row of every label, then the second,
    ...): a latency sample with every class, not the first labels only."""
    rank: dict[str, int] = {}
    ranked = []
    for index, row in enumerate(rows):
        rank[row["label"]] = rank.get(row["label"], -1) + 1
        ranked.append((rank[row["label"]], index, row))
    return [row for _, _, row in sorted(ranked, key=lambda item: item[:2])[:count]]


@torch.no_grad()
def streaming_latency(run_output: str | Path, manifest: Path, utterances: int,
                      threads: int = 1) -> dict:
    """The streaming decision on ``utterances`` test clips (every class in turn): whether it
    equals the offline one, how often a partial decision comes (the chunk; fbank: every 10 ms
    frame) and the compute of a chunk (median over chunks, after one warm-up clip, on
    ``threads`` CPU threads): the wait from the end of a clip to its decision. Features are
    computed before and not timed: they are the same for every upstream (a 25 ms window every
    10 ms, so each frame looks 15 ms past its hop).
    """
    from dataio import load_audio
    from modules.context import parse_context
    from modules.downstream import StreamingClassifier
    from modules.interfaces import encoder_frames

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    hparams = load_trained(run_output)
    fbank = hparams["upstream"] == "fbank"
    encoder = None if fbank else hparams["encoder"]
    layer_sum = None if fbank else hparams["layer_sum"]
    context = parse_context(hparams["context"], hparams["context_presets"])
    data_root = ROOT / hparams["data_folder"]  # train.py ran in ROOT
    with open(manifest, newline="") as f:
        rows = stratified(list(csv.DictReader(f)), utterances)
    chunk_seconds, agree, chunk_compute = [], 0, []
    for number, row in enumerate([rows[0], *rows]):  # the first: warm-up, not counted
        wav = load_audio(row["wav"].replace("$data_root", str(data_root)), hparams["sample_rate"])
        feats, _, _ = encoder_frames(hparams["compute_features"], hparams["encoder"], wav[None],
                                     None, hparams["normalize"])  # encoder: its subsampling
        if fbank:
            offline = hparams["classifier"](feats)
        else:
            offline = hparams["classifier"](layer_sum(hparams["encoder"](feats, None, context,
                                                                         all_layers=True)))
        stream = StreamingClassifier(encoder, layer_sum, hparams["classifier"], context)
        size = stream.chunk_frames
        for start in range(0, feats.shape[1], size):
            began = time.perf_counter()
            stream.push(feats[:, start:start + size])
            streamed = stream.logits()  # a decision after every chunk
            if number > 0:
                chunk_compute.append(time.perf_counter() - began)
        if number > 0:
            chunk_seconds.append(size * hparams["compute_features"].hop_samples
                                 / hparams["sample_rate"])
            agree += int(streamed.argmax(-1).item() == offline.argmax(-1).item())
    torch.set_num_threads(previous_threads)
    chunk_ms = 1000 * statistics.fmean(chunk_seconds)
    compute_ms = 1000 * statistics.median(chunk_compute)
    return {"chunk_ms": round(chunk_ms, 1), "compute_ms_per_chunk": round(compute_ms, 2),
            "utterances": len(rows), "streamed_equals_offline": f"{agree}/{len(rows)}",
            "threads": threads}


def compare(task_runs: dict[str, list[dict]], cluster_of: dict[str, str], resamples: int
            ) -> dict[str, dict]:
    """Per upstream other than ssl: its test error minus the ssl one's (per utterance, errors
    averaged over seeds), with the voice-cluster bootstrap's interval and the p-value of the
    sign-flip test over voices (which keeps its level with few voices; the bootstrap's does
    not)."""
    def errors(runs):
        tables = [predictions(r["output_folder"]) for r in runs]
        return {uid: (statistics.fmean(float(t[uid][0] != t[uid][1]) for t in tables), 1)
                for uid in tables[0]}

    if "ssl" not in task_runs:
        return {}
    ssl, compared = errors(task_runs["ssl"]), {}
    for upstream, runs in task_runs.items():
        if upstream != "ssl":
            other = errors(runs)
            test = paired_sign_flip(other, ssl, cluster_of)
            compared[upstream] = {**paired_cluster_bootstrap(other, ssl, cluster_of, resamples),
                                  "p_value": test["p_value"], "p_exact": test["exact"]}
    return compared


def voice_count(summary: dict) -> str:
    counts = {row["vs_ssl"]["clusters"] for rows in summary["tasks"].values()
              for row in rows.values() if row.get("vs_ssl")}
    return "/".join(map(str, sorted(counts))) or "-"


def latency_threads(summary: dict) -> int:
    return next(row["latency"]["threads"] for rows in summary["tasks"].values()
                for row in rows.values())


def markdown(summary: dict) -> str:
    lines = [f"Code `{summary['code_commit']}`; `{summary['command']}`; SSL model "
             f"`{summary['ssl_model']}` (encoder sha256 {str(summary['ssl_sha256'])[:12]}); "
             f"context {summary['context']}; compute on {latency_threads(summary)} CPU "
             "thread(s); differences: voice-bootstrap interval, p of the exact sign-flip test "
             f"over the test set's {voice_count(summary)} base voices, uncorrected.", "",
             "| task | upstream | chosen on dev | test accuracy % (95 % CI over seeds) | error vs "
             "ssl, points [95 % CI over voices], p | dev accuracy % (best epoch) | chunk ms | "
             "ms from the clip's end to the decision | streamed = offline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, rows in summary["tasks"].items():
        for upstream, row in rows.items():
            interval = row["test_accuracy"]
            half = interval["half_width"]
            accuracy = f"{interval['mean']:.1f}" + (f" ± {half:.1f}" if half is not None else "")
            diff = row.get("vs_ssl")
            versus = "-" if diff is None else (f"{diff['difference']:+.1f} [{diff['low']:+.1f}, "
                                               f"{diff['high']:+.1f}], p {diff['p_value']:.3f}")
            latency = row["latency"]
            setting = (" ".join(row["tuning"]["setting"]) or "-") + (
                " (grid edge)" if row["tuning"]["grid_edge"] else "")
            lines.append(f"| {task} | {upstream} | {setting} | {accuracy} (n={interval['n']}) | "
                         f"{versus} | "
                         f"{row['dev_accuracy']['mean']:.1f} | {latency['chunk_ms']:.0f} | "
                         f"{latency['compute_ms_per_chunk']:.1f} | "
                         f"{latency['streamed_equals_offline']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict:
    parser = RecipeParser(prog="recipes/downstream.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ssl_model", help="exported SSL folder (recipes/export.py); needed "
                        "for the ssl upstream")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--upstreams", nargs="+", choices=UPSTREAMS, default=list(UPSTREAMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--context", default="medium", help="the encoder's context preset")
    parser.add_argument("--data_root", default="data/downstream",
                        help="the corpora: <data_root>/<task>/{train_few,dev,test}.csv")
    parser.add_argument("--output_folder", default="results/downstream")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="hparams of every run (e.g. number_of_epochs=2)")
    parser.add_argument("--grid", nargs="*", default=["lr=0.002,0.01,0.03"], metavar="KEY=V1,V2",
                        help="hparams tuned per task and upstream on dev (best dev accuracy, "
                        "one run each with --grid_seed; default %(default)s)")
    parser.add_argument("--grid_seed", type=int, default=0)
    parser.add_argument("--latency_utterances", type=int, default=48,
                        help="test utterances streamed (every class in turn)")
    parser.add_argument("--latency_threads", type=int, default=1)
    parser.add_argument("--bootstrap_resamples", type=int, default=10000)
    args = parser.parse_strict(argv)
    if "ssl" in args.upstreams and not args.ssl_model:
        raise ValueError("--ssl_model: give the exported SSL folder (recipes/export.py <SSL run> "
                         "--out <folder>), or leave ssl out of --upstreams")
    for name in ("overrides", "grid"):
        if any("=" not in pair for pair in getattr(args, name)):
            raise ValueError(f"--{name} {getattr(args, name)}: give KEY=VALUE pairs")
    sha = ssl_checkpoint_fields(args.ssl_model)["ssl_checkpoint_sha256"] if args.ssl_model else None
    expected = {"code_commit": current_code_commit(), "ssl_checkpoint_sha256": sha}
    out = Path(args.output_folder)
    summary = {"command": " ".join(["recipes/downstream.py", *argv]),
               "code_commit": expected["code_commit"], "ssl_model": args.ssl_model,
               "ssl_sha256": sha, "context": args.context, "tasks": {}}
    for task in args.tasks:
        runs, chosen = {}, {}
        for upstream in args.upstreams:
            chosen[upstream] = choose(task, upstream, args, expected)
            runs[upstream] = [train(task, upstream, seed, chosen[upstream]["setting"],
                                    out / task / upstream / f"seed{seed}", args, expected)
                              for seed in args.seeds]
        test_csv = ROOT / args.data_root / task / "test.csv"
        versus = compare(runs, voices(test_csv), args.bootstrap_resamples)
        summary["tasks"][task] = {upstream: {
            "test_accuracy": t_interval([100 * r["test_accuracy"] for r in task_runs]),
            "dev_accuracy": t_interval([100 * r["valid_accuracy_best"] for r in task_runs]),
            "vs_ssl": versus.get(upstream), "tuning": chosen[upstream],
            "latency": streaming_latency(task_runs[0]["output_folder"], test_csv,
                                         args.latency_utterances, args.latency_threads),
            "runs": [{k: r[k] for k in ("output_folder", "test_accuracy", "wall_seconds")}
                     for r in task_runs]} for upstream, task_runs in runs.items()}
        one = {**summary, "tasks": {task: summary["tasks"][task]}}
        (out / task / "summary.json").write_text(json.dumps(one, indent=1))
        (out / task / "summary.md").write_text(markdown(one))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    run_cli(main)
