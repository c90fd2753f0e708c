"""What ``evaluate.py`` writes: tables, a CER/WER-vs-latency plot and per-utterance hypotheses,
named after the test set and the options so that one evaluation never overwrites another's."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Mapping, Sequence

Context = tuple[int, int]  # (left, right), as in modules/context.py

TABLE_COLUMNS = ["context", "context_seconds", "chunk_seconds", "streaming", "decoding", "cer",
                 "wer", "rtf", "audio_seconds", "first_partial_ms", "final_latency_ms",
                 "second_pass_ms", "deadline_miss_fraction", "latency_utterances"]


def context_name(context: Context, presets: Mapping[str, Sequence[int]]) -> str:
    """The preset's name, else ``L_R`` (``-1_-1`` offline)."""
    for name, pair in presets.items():
        if tuple(pair) == tuple(context):
            return name
    return f"{context[0]}_{context[1]}"


def output_stem(folder: str | Path, manifest: str | Path, contexts: str | list[Context],
                presets: Mapping[str, Sequence[int]], streaming: bool,
                decoding: str = "ctc_greedy") -> Path:
    """``<folder>/eval_<manifest stem>_<contexts>_<streaming|offline>[_<decoding>]``;
    ``contexts``: the decoded pairs, or ``"all"``; greedy CTC is not named."""
    names = contexts if isinstance(contexts, str) else "+".join(
        context_name(c, presets) for c in contexts)
    mode = "streaming" if streaming else "offline"
    suffix = "" if decoding == "ctc_greedy" else f"_{decoding}"
    return Path(folder) / f"eval_{Path(manifest).stem}_{names}_{mode}{suffix}"


def write_outputs(results: list[dict], stem: Path, title: str,
                  utterances: Path | None = None) -> dict:
    """Tables, plot and hypotheses of ``results`` (one per context); returns their paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    utterances = utterances or stem.with_suffix(".jsonl")
    write_utterances(results, utterances)
    write_tables(results, stem)
    plot_error_rates(results, stem.with_suffix(".png"), title)
    return {"table_md": str(stem.with_suffix(".md")), "table_csv": str(stem.with_suffix(".csv")),
            "plot": str(stem.with_suffix(".png")), "hypotheses": str(utterances)}


def write_utterances(results: list[dict], path: Path) -> None:
    """One JSON line per (context, utterance): id, ref, hyp, cer, wer and the edits (for paired
    statistics)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        for result in results:
            for utterance in result["utterances"]:
                f.write(json.dumps({**utterance, "context": result["context"],
                                    "streaming": result["streaming"]}) + "\n")
    partial.replace(path)


def write_tables(results: list[dict], stem: Path) -> None:
    """The same rows as CSV and as a markdown table."""
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, TABLE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    lines = ["| context | frames and seconds | encoder | decoding | CER % | WER % | RTF | "
             "first partial ms | final result ms |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['context_seconds']} | "
              f"{'streaming' if r['streaming'] else 'offline'} | {r.get('decoding', 'ctc_greedy')} | "
              f"{r['cer']:.2f} | {r['wer']:.2f} | {r['rtf']:.3f} | "
              f"{_shown(r.get('first_partial_ms'))} | {_shown(r.get('final_latency_ms'))} |"
              for r in results]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _shown(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def plot_error_rates(results: list[dict], path: Path, title: str) -> None:
    """CER and WER against the chunk duration (algorithmic latency); offline contexts as
    horizontal lines. The axis starts at 0 and spans at least 0-100 %, so that small
    differences look small."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    chunked = sorted((r for r in results if r["chunk_seconds"]), key=lambda r: r["chunk_seconds"])
    offline = [r for r in results if not r["chunk_seconds"]]
    for metric, style, color in (("cer", "o-", "tab:blue"), ("wer", "s--", "tab:orange")):
        if chunked:
            axis.plot([r["chunk_seconds"] for r in chunked], [r[metric] for r in chunked], style,
                      color=color, label=f"{metric.upper()} per context")
        for r in offline:
            axis.axhline(r[metric], linestyle=":", color=color,
                         label=f"{metric.upper()} offline {r['context']}")
    for r in chunked:
        axis.annotate(str(r["context"]), (r["chunk_seconds"], r["cer"]), fontsize=8,
                      textcoords="offset points", xytext=(3, -10))
    highest = max(max(r["cer"], r["wer"]) for r in results)
    axis.set_ylim(0, max(100.0, highest * 1.05))
    axis.set_xlim(0, 1.25 * chunked[-1]["chunk_seconds"] if chunked else 1.0)
    axis.set_xlabel("chunk duration (algorithmic latency), s")
    axis.set_ylabel("error rate, %")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
