"""The SSL curve's outputs (``recipes/ssl_curve.py``): ``curve.md`` tables, ``curve.csv``,
``curve.json`` and the ``curve.png`` plot, with the issue's goal verdict per labeled size."""
from __future__ import annotations

import csv
import json
from pathlib import Path


def interval_text(interval: dict) -> str:
    if interval["half_width"] is None:
        return f"{interval['mean']:.1f} (n=1)"
    return f"{interval['mean']:.1f} ± {interval['half_width']:.1f} (n={interval['n']})"


def write_outputs(points: list[dict], probes: list[dict], ranks: dict, costs: dict,
                  header: dict, grid_axes: dict, stem: Path) -> None:
    """``curve.md`` (tables), ``curve.csv`` (one row per size, arm and context), ``curve.json``
    (everything) and ``curve.png`` (CER against labeled hours, both arms, intervals)."""
    lines = [f"# SSL low-resource curve ({header['grid']})", "",
             f"Code commit {header['code_commit']}; command `{header['command']}`.",
             f"Cost: {header['cpu_hours']:.2f} CPU-hours, {header['wall_hours']:.2f} h wall "
             f"({len(costs)} runs).", "",
             "Test CER % (streaming, greedy; mean ± 95 % t-interval over runs, or over SSL-seed "
             "means when there are several SSL seeds) and SSL minus "
             "scratch (pooled CER of per-utterance edits averaged over runs; 95 % paired "
             "bootstrap interval over test voices):", "",
             "| encoder | labeled | context | SSL | scratch | SSL - scratch [95 % CI] | "
             "relative [95 % CI] | p |", "|---|---|---|---|---|---|---|---|"]
    rows = []
    for point in points:
        for row in point["summary"]:
            d = row.get("ssl_minus_scratch")  # none for the topline: scratch alone
            ssl = interval_text(row["ssl_cer"]) if "ssl_cer" in row else "-"
            difference = (f"{d['difference']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] | "
                          f"{relative_text(d)} | {d['p_value']:.3f}") if d else "- | - | -"
            lines.append(
                f"| {point['encoder']} | {point['size']} ({point['labeled_hours']:.2f} h) | "
                f"{row['context']} {row['pair']} | {ssl} | "
                f"{interval_text(row['scratch_cer'])} | {difference} |")
            for arm in point["arms"]:
                rows.append({"encoder": point["encoder"], "size": point["size"],
                             "labeled_hours": point["labeled_hours"], "context": row["context"],
                             "arm": arm, **{f"setting_{k}": v for k, v in
                                            point["arms"][arm]["setting"].items()},
                             "runs": row[f"{arm}_cer"]["n"],
                             "test_cer_mean": round(row[f"{arm}_cer"]["mean"], 2),
                             "test_cer_half_width": row[f"{arm}_cer"]["half_width"],
                             "test_wer_mean": round(row[f"{arm}_wer"]["mean"], 2),
                             **{key: round(d[field], 2) if d else None for key, field in
                                (("ssl_minus_scratch", "difference"),
                                 ("difference_low", "low"), ("difference_high", "high"))}})
    verdicts = [f"- {p['encoder']} {p['size']}: {goal_verdict(p)}" for p in points
                if p["summary"] and "ssl_minus_scratch" in p["summary"][0]]
    if verdicts:
        lines += ["", "Goal (issue 17): SSL at least 20 % (labeled <= 15 min) or 10 % (>= 1 h) "
                  "relatively better in test CER, the 95 % interval of the difference below 0, at "
                  "every reported context at once:", "", *verdicts]
    lines += ["", "Grid (dev CER %, grid seed; each arm's lowest is its setting; a setting at "
              "the edge of a grid axis is marked *):", "",
              "| encoder | labeled | arm | setting | dev CER |", "|---|---|---|---|---|"]
    for point in points:
        for g in point["grid"]:
            setting = ", ".join(f"{k} {v}" for k, v in g.items() if k not in ("arm", "dev_cer"))
            chosen = point["arms"].get(g["arm"], {}).get("setting")
            mark = ""
            if chosen and all(g[k] == v for k, v in chosen.items()):
                mark = " (chosen" + (", at a grid edge *)" if at_edge(chosen, grid_axes) else ")")
            lines.append(f"| {point['encoder']} | {point['size']} | {g['arm']} | {setting} | "
                         f"{g['dev_cer']:.1f}{mark} |")
    if probes:
        lines += ["", "Probes (frozen encoder, CTC head on layer k; dev CER %):", "",
                  "| encoder | trained on | init | layer | dev CER |", "|---|---|---|---|---|"]
        lines += [f"| {p['encoder']} | {p['size']} | {p['init']} | {p['layer']} | "
                  f"{p['dev_cer']:.1f} |" for p in probes]
    for encoder, found in ranks.items():
        layers = len(next(iter(found.values())))
        lines += ["", f"Effective rank of {encoder} layer outputs (dev, 200 utterances):", "",
                  "| encoder | " + " | ".join(f"layer {k}" for k in range(1, layers + 1)) + " |",
                  "|---|" + "---|" * layers]
        lines += [f"| {name} | " + " | ".join(f"{v:.0f}" for v in values) + " |"
                  for name, values in found.items()]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if rows:
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps(
        {**header, "points": points, "probes": probes, "ranks": ranks, "costs": costs},
        indent=1))
    plot(points, stem.with_suffix(".png"))


def relative_text(d: dict) -> str:
    """``-12 % [-20, -4]``; ``-`` where scratch makes no error (undefined)."""
    if d["relative"] is None:
        return "-"
    return (f"{100 * d['relative']:+.0f} % [{100 * d['relative_low']:+.0f}, "
            f"{100 * d['relative_high']:+.0f}]")


def goal_verdict(point: dict) -> str:
    """Whether a size meets the issue's goal at every reported context (a conjunction: no
    multiple-comparison correction needed within a size)."""
    target = 0.2 if point["labeled_hours"] <= 0.25 else 0.1
    met = all(row["ssl_minus_scratch"]["relative"] is not None
              and row["ssl_minus_scratch"]["relative"] <= -target
              and row["ssl_minus_scratch"]["high"] < 0 for row in point["summary"])
    return f"{'met' if met else 'not met'} (target -{100 * target:.0f} % relative)"


def at_edge(setting: dict, axes: dict) -> bool:
    """Whether the chosen peak LR is the lowest or highest the grid tried (the best may lie
    beyond it)."""
    return "lr" in axes and setting["lr"] in (min(axes["lr"]), max(axes["lr"]))


def plot(points: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in points if p["summary"]]  # measured on test
    if not points:
        return
    contexts = [row["context"] for row in points[0]["summary"]]
    figure, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), sharey=True,
                                squeeze=False)
    for axis, index in zip(axes[0], range(len(contexts))):
        for encoder in dict.fromkeys(p["encoder"] for p in points):
            mine = sorted((p for p in points if p["encoder"] == encoder),
                          key=lambda p: p["labeled_hours"])
            for arm, style in (("ssl", "o-"), ("scratch", "s--")):
                measured = [p for p in mine if f"{arm}_cer" in p["summary"][index]]
                if not measured:
                    continue
                values = [p["summary"][index][f"{arm}_cer"] for p in measured]
                axis.errorbar([p["labeled_hours"] for p in measured],
                              [v["mean"] for v in values],
                              yerr=[v["half_width"] or 0 for v in values], fmt=style, capsize=4,
                              label=f"{encoder}, {'from SSL' if arm == 'ssl' else 'from scratch'}")
        row = points[0]["summary"][index]
        axis.set_title(f"test, streaming {row['context']} {row['pair']}")
        axis.set_xscale("log")
        axis.set_xlabel("labeled speech, hours")
        axis.set_ylabel("CER %, mean and 95 % t-interval")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
