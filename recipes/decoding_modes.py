#!/usr/bin/env python3
"""The decoding modes of one joint CTC / attention model compared on a test set, the LM weight
of each LM system chosen on dev first (issue 22's results table).

Systems: greedy CTC, the CTC prefix beam, two-pass attention rescoring, the attention beam
search, and the last three with LM fusion. On ``--dev_csv`` at ``--tune_context`` (lowest WER,
then CER): the CTC beam and rescoring choose their ``length_bonus`` from ``--length_bonuses``,
with and without the LM (with it, jointly with ``lm_weight`` from ``--lm_weights``); the
attention search (length-normalized) chooses only its ``lm_weight``. A choice on the edge of
what was tried is tried one grid step past that edge, the other value kept (up to
``--edge_extensions`` times, 2 by default; an LM weight stays above 0), so that no arm is
tuned up to a wall. The CTC weight and beam are the model's hparams (``ctc_weight_decode``;
``beam_size`` unless ``--beam_size``), not tuned.
Then every system decodes ``--test_csv`` once at each of ``--contexts`` (the attention search,
the costliest, at ``--attention_contexts``), the encoder streamed chunk by chunk (offline at
``unlimited``), with first-partial and final-result latency measured on
``--latency_utterances`` utterances (``evaluate.py``). Differences (rescoring vs prefix beam, LM
vs none, and the attention search and rescoring with the LM vs greedy CTC: declared before any
test decoding)
are paired over utterances, clustered by test voice (the base voice of the manifest's ``voice``
column, else ``spk_id``): cluster-bootstrap interval of the difference and of the relative
difference, exact sign-flip p-value (uncorrected: few voices, read them with care).

Usage::

    python recipes/decoding_modes.py --asr_run <S2S run> --lm <LM run> \\
        --dev_csv data/benchmark/dev.csv --test_csv data/benchmark/test.csv \\
        --output_folder results/decoding_modes [--contexts very_low,medium,high,unlimited] \\
        [--lm_weights 0.3,0.6] [--length_bonuses 0,1] [--beam_size 10] [--dev_every 4] \\
        [--test_every 2] [--systems ctc_greedy,attention+lm,...] [--threads 1]

``--dev_every`` / ``--test_every`` N keep every Nth utterance of a manifest (the CPU budget;
every voice stays). ``--systems`` decodes some systems only (two processes can share the
work); a run with all of them then reads every kept result back and writes the tables.

Resumable: each finished decoding is kept (``<output_folder>/<split>/<system>.json``) and read
back only for the same code commit, command, manifest content and model checkpoints. Writes ``decoding_modes.json`` and
``decoding_modes.md``; the last stdout line is the JSON.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import torch

import quiet  # noqa: F401
import evaluate
from eval_outputs import _shown
from provenance import current_commit, current_code_commit, script_command, sha256_file
from stats import paired_cluster_bootstrap, paired_sign_flip

SYSTEMS = [("ctc_greedy", False), ("ctc_prefix_beam", False), ("attention_rescoring", False),
           ("attention", False), ("ctc_prefix_beam", True), ("attention_rescoring", True),
           ("attention", True)]
COMPARISONS = [("attention_rescoring", "ctc_prefix_beam"),
               ("ctc_prefix_beam+lm", "ctc_prefix_beam"),
               ("attention_rescoring+lm", "attention_rescoring"),
               ("attention+lm", "attention"),
               ("attention+lm", "ctc_greedy"),
               ("attention_rescoring+lm", "ctc_greedy")]
BONUSED = ("ctc_prefix_beam", "attention_rescoring")  # the decodings a length bonus acts on


def name(decoding: str, lm: bool) -> str:
    return decoding + ("+lm" if lm else "")


def decode(args, split: str, system: str, manifest: str, contexts: list[str],
           weights: tuple[float, float] | None, latency: int) -> dict:
    """One ``evaluate.py`` pass, kept in ``<output>/<split>/<system>.json`` (read back only for
    the same code commit and command)."""
    decoding, with_lm = system.split("+")[0], system.endswith("+lm")
    folder = Path(args.output_folder) / split
    tag = system if weights is None else f"{system}_w{weights[0]}_b{weights[1]}"
    argv = [args.asr_run, "--test_csv", manifest, "--decoding", decoding, "--streaming",
            "--output_folder", str(folder / tag), "--latency_utterances", str(latency),
            "--utterances", str(folder / f"{tag}.jsonl"), "--device", "cpu"]
    for context in contexts:
        argv += ["--context", context]
    if with_lm:
        argv += ["--lm", args.lm, "--lm_weight", str(weights[0])]
    if weights is not None:
        argv += ["--length_bonus", str(weights[1])]
    if args.beam_size is not None:
        argv += ["--beam_size", str(args.beam_size)]
    record = {"code_commit": current_code_commit(), "argv": argv,
              "manifest_sha256": sha256_file(manifest), "models": args.model_digests}
    path = folder / f"{tag}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["record"] == record:
            return saved["result"]
    if args.report_only:
        return None
    result = evaluate.main(argv)
    results = result.get("results", [result])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"record": record, "result": {"results": results,
                                                             "hypotheses": result["hypotheses"]}},
                               indent=1))
    return {"results": results, "hypotheses": result["hypotheses"]}


def tune(args, system: str, dev: str, pairs: list[tuple[float, float]]
         ) -> tuple[dict, tuple[float, float]] | None:
    """``system``'s dev results for ``pairs`` (LM weight, length bonus) and the chosen pair
    (lowest WER, then CER); a choice on the grid's edge extends it one step past that edge, up to
    ``--edge_extensions`` times. None under ``--report_only`` while a pair is not decoded."""
    decoding, with_lm = system.split("+")[0], system.endswith("+lm")
    for extension in range(args.edge_extensions + 1):
        decoded = {pair: decode(args, "dev", system, dev, [args.tune_context], pair, 0)
                   for pair in pairs}
        if any(result is None for result in decoded.values()):
            return None
        results = {pair: result["results"][0] for pair, result in decoded.items()}
        choice = min(pairs, key=lambda pair: (results[pair]["wer"], results[pair]["cer"]))
        beyond = [pair for pair in past_edges(pairs, choice, with_lm, decoding in BONUSED)
                  if pair not in pairs]
        if not beyond or extension == args.edge_extensions:
            return results, choice
        pairs = pairs + beyond


def past_edge(tried: list[float], chosen: float) -> float | None:
    """One grid step past the edge of ``tried`` that ``chosen`` sits on (the step between that
    edge and its neighbour); None when it lies inside or only one value was tried."""
    values = sorted(set(tried))
    if len(values) < 2 or values[0] < chosen < values[-1]:
        return None
    if chosen == values[-1]:
        return round(chosen + values[-1] - values[-2], 6)
    return round(chosen - (values[1] - values[0]), 6)


def past_edges(pairs: list[tuple[float, float]], chosen: tuple[float, float], with_lm: bool,
               bonused: bool) -> list[tuple[float, float]]:
    """The (LM weight, length bonus) pairs that extend a dev grid whose choice sits on its edge:
    one step past it in that coordinate, the other kept at the choice (an LM weight stays above
    0; the no-LM systems tune the bonus alone)."""
    weight, bonus = chosen
    beyond = []
    if with_lm:
        past = past_edge([w for w, _ in pairs], weight)
        beyond += [(past, bonus)] if past is not None and past > 0 else []
    if bonused:
        past = past_edge([b for _, b in pairs], bonus)
        beyond += [(weight, past)] if past is not None else []
    return beyond


def voices(manifest: str) -> dict[str, str]:
    """Utterance id -> its voice (the base voice after ``|`` in ``voice``, else ``spk_id``)."""
    with open(manifest, newline="") as f:
        return {row["ID"]: row["voice"].split("|")[-1] if row.get("voice") else row["spk_id"]
                for row in csv.DictReader(f)}


def word_errors(hypotheses: str) -> dict[tuple, dict[str, tuple[int, int]]]:
    """``{context: {id: (word edits, reference words)}}`` of an ``evaluate.py`` hypotheses file."""
    errors: dict[tuple, dict] = {}
    for line in Path(hypotheses).read_text().splitlines():
        row = json.loads(line)
        errors.setdefault(tuple(row["context"]), {})[row["id"]] = (row["word_edits"],
                                                                   row["words"])
    return errors


def compare(test: dict, manifest: str) -> list[dict]:
    """Paired WER differences per context (A - B, percent points; negative: A better)."""
    cluster_of = voices(manifest)
    errors = {system: word_errors(result["hypotheses"]) for system, result in test.items()}
    rows = []
    for a, b in [(a, b) for a, b in COMPARISONS if a in test and b in test]:
        for context in [c for c in errors[a] if c in errors[b]]:
            boot = paired_cluster_bootstrap(errors[a][context], errors[b][context], cluster_of)
            flip = paired_sign_flip(errors[a][context], errors[b][context], cluster_of)
            rows.append({"a": a, "b": b, "context": list(context), "wer_a": round(boot["a"], 2),
                         "wer_b": round(boot["b"], 2), "difference": round(boot["difference"], 2),
                         "low": round(boot["low"], 2), "high": round(boot["high"], 2),
                         **{key: None if boot[key] is None else round(boot[key], 3)
                            for key in ("relative", "relative_low", "relative_high")},
                         "sign_flip_p": flip["p_value"], "voices": flip["clusters"]})
    return rows


def markdown(summary: dict) -> str:
    weights = {s: f"{c['lm_weight']}, {c['length_bonus']}"
               for s, c in summary["chosen_on_dev"].items()}
    lines = ["| system | LM weight, length bonus (dev) | context | WER % | CER % | RTF | "
             "first partial ms | final result ms | second pass ms | deadline misses |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for system, result in summary["test"].items():
        for r in result["results"]:
            lines.append(
                f"| {system} | {weights.get(system, '-')} | {r['context']} | "
                f"{r['wer']:.2f} | {r['cer']:.2f} | {r['rtf']:.3f} | "
                f"{_shown(r.get('first_partial_ms'))} | "
                f"{_shown(r.get('final_latency_ms'))} | "
                f"{_shown(r.get('second_pass_ms'))} | "
                f"{_shown(r.get('deadline_miss_fraction'), '.1%')} |")
    if summary["missing"]:
        lines.append(f"\nNot decoded (no kept result): {', '.join(summary['missing'])}.")
    lines += ["", "| A | B | context | WER A | WER B | A - B [95 % interval] | relative "
              "[95 % interval] | sign-flip p |", "|---|---|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        relative = "-" if c["relative"] is None else (
            f"{100 * c['relative']:+.1f} % [{100 * c['relative_low']:+.1f}, "
            f"{100 * c['relative_high']:+.1f}]")
        lines.append(f"| {c['a']} | {c['b']} | {c['context']} | {c['wer_a']} | {c['wer_b']} | "
                     f"{c['difference']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] | {relative} | "
                     f"{c['sign_flip_p']:.4f} |")
    return "\n".join(lines) + "\n"


def parse_arguments(argv: list[str]):
    parser = argparse.ArgumentParser(prog="decoding_modes.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asr_run", required=True, help="an S2S run folder")
    parser.add_argument("--lm", required=True, help="an LM run trained with its tokenizer")
    parser.add_argument("--dev_csv", required=True)
    parser.add_argument("--test_csv", required=True)
    parser.add_argument("--output_folder", required=True)
    parser.add_argument("--contexts", default="very_low,medium,high,unlimited")
    parser.add_argument("--tune_context", default="medium")
    parser.add_argument("--lm_weights", default="0.3,0.6")
    parser.add_argument("--length_bonuses", default="0,1")
    parser.add_argument("--edge_extensions", type=int, default=2,
                        help="times a dev choice on the edge of the LM weight or length bonus grid "
                             "extends it one step past that edge (0: the grid as given)")
    parser.add_argument("--attention_contexts", default=None,
                        help="contexts of the attention systems (default: --contexts)")
    parser.add_argument("--beam_size", type=int, default=None,
                        help="every system's beam (default: the model's beam_size)")
    parser.add_argument("--dev_every", type=int, default=1)
    parser.add_argument("--test_every", type=int, default=1)
    parser.add_argument("--systems", default=None, help="default: all")
    parser.add_argument("--report_only", action="store_true",
                        help="decode nothing: tables of the kept results, the rest listed missing")
    parser.add_argument("--latency_utterances", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (timings)")
    return parser.parse_args(argv)


def subset(manifest: str, every: int, path: Path) -> str:
    """Every ``every``-th utterance of ``manifest`` in ``path`` (the manifest itself for 1);
    written atomically and only when it changes (processes sharing the work read it)."""
    if every == 1:
        return manifest
    lines = Path(manifest).read_text().splitlines()
    text = "\n".join([lines[0], *lines[1::every]]) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(text)
        partial.replace(path)
    return str(path)


def model_digests(args) -> dict:
    """sha256 of the model files the decodings load (both runs' ``save/CKPT+*``, an n-gram's
    ``lm.bin`` and, for a word n-gram's lexicon, ``lm.arpa``)."""
    return {str(path): sha256_file(path) for folder in (args.asr_run, args.lm)
            for pattern in ("save/CKPT+*/*.ckpt", "lm.bin", "lm.arpa")
            for path in sorted(Path(folder).glob(pattern))}


def main(argv: list[str]) -> dict:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_folder)
    args.model_digests = model_digests(args)
    dev = subset(args.dev_csv, args.dev_every, out / "dev_subset.csv")
    test_csv = subset(args.test_csv, args.test_every, out / "test_subset.csv")
    systems = [(d, lm) for d, lm in SYSTEMS
               if args.systems is None or name(d, lm) in args.systems.split(",")]
    grid = [float(w) for w in args.lm_weights.split(",")]
    bonuses = [float(b) for b in args.length_bonuses.split(",")]
    tuning, chosen = {}, {}
    for decoding, with_lm in systems:
        if not with_lm and decoding not in BONUSED:
            continue
        system = name(decoding, with_lm)
        pairs = [(w, b) for w in (grid if with_lm else [0.0])
                 for b in (bonuses if decoding in BONUSED else [0.0])]
        tuned = tune(args, system, dev, pairs)
        if tuned is not None:  # else --report_only, not tuned yet
            tuning[system], chosen[system] = tuned
    contexts = args.contexts.split(",")
    attention_contexts = (args.attention_contexts or args.contexts).split(",")
    test = {name(d, lm): decode(args, "test", name(d, lm), test_csv,
                                attention_contexts if d == "attention" else contexts,
                                chosen.get(name(d, lm)), args.latency_utterances)
            for d, lm in systems if not lm and d not in BONUSED or name(d, lm) in chosen}
    missing = [name(d, lm) for d, lm in SYSTEMS if test.get(name(d, lm)) is None]
    test = {system: result for system, result in test.items() if result is not None}
    if len(systems) < len(SYSTEMS):
        return {"decoded": list(test)}
    summary = {
        "commit": current_commit(), "code_commit": current_code_commit(),
        "command": script_command(Path(__file__), argv), "threads": args.threads,
        "asr_run": args.asr_run, "lm": args.lm,
        "asr_run_record": evaluate_record(args.asr_run), "lm_run_record": evaluate_record(args.lm),
        "test_csv": test_csv, "test_csv_sha256": sha256_file(test_csv), "dev_csv": dev,
        "dev_csv_sha256": sha256_file(dev),
        "chosen_on_dev": {s: {"lm_weight": w, "length_bonus": b} for s, (w, b) in chosen.items()},
        "dev_tuning": {s: [{"lm_weight": w, "length_bonus": b, "wer": r["wer"], "cer": r["cer"]}
                           for (w, b), r in t.items()] for s, t in tuning.items()},
        "test": test, "missing": missing,
        "comparisons": compare(test, test_csv)}
    (out / "decoding_modes.json").write_text(json.dumps(summary, indent=1))
    (out / "decoding_modes.md").write_text(markdown(summary))
    return {"table_md": str(out / "decoding_modes.md"), "chosen_on_dev": summary["chosen_on_dev"],
            "json": str(out / "decoding_modes.json")}


def evaluate_record(folder: str) -> dict:
    path = Path(folder) / "run_record.json"
    return json.loads(path.read_text()) if path.is_file() else {}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
