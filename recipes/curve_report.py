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


def p_text(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def write_outputs(points: list[dict], probes: list[dict], ranks: dict, header: dict,
                  grid_axes: dict, stem: Path) -> None:
    """``curve.md`` (tables), ``curve.csv`` (one row per size, arm and context), ``curve.json``
    (everything) and ``curve.png`` (CER against labeled hours, both arms, intervals)."""
    lines = [f"# SSL low-resource curve ({header['grid']})", "",
             f"Code commit {header['code_commit']}; command `{header['command']}`; "
             f"{header['machine']}.", "", *cost_lines(header["cost"], header["cpu_budget_hours"])]
    if header["test_held_back"]:
        lines += ["", "Test figures are held back until every point of the grid file is "
                  "measured (dev grids only below)."]
    else:
        lines += ["", "Test CER % (streaming, greedy): each arm's mean ± 95 % t-interval over its "
                  "fine-tuning runs (the SSL arm's runs span its SSL seeds; its per-SSL-seed "
                  "means beside it); SSL minus scratch: pooled CER of per-utterance edits "
                  "averaged over each arm's runs, with a 95 % bootstrap interval over test "
                  "voices alone and one over voices, SSL seeds and fine-tuning runs together, "
                  "and the exact sign-flip p over voices:", "",
                  "| encoder | labeled | context | SSL | SSL per SSL seed | scratch | "
                  "SSL - scratch [voices] | [voices + runs] | relative [voices] | p |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for point in points:
        for row in point["summary"]:
            d = row.get("ssl_minus_scratch")  # none for the topline: scratch alone
            ssl = interval_text(row["ssl_cer"]) if "ssl_cer" in row else "-"
            per_seed = ", ".join(f"{v:.1f}" for v in row.get("ssl_cer_per_ssl_seed", {}).values())
            if d:
                both = row["ssl_minus_scratch_runs_and_voices"]
                difference = (f"{d['difference']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] | "
                              f"[{both['low']:+.1f}, {both['high']:+.1f}] | "
                              f"{relative_text(d)} | {p_text(d['sign_flip_p'])}")
            else:
                difference = "- | - | - | -"
            untuned = " (topline: setting not tuned at this size)" if "setting_from" in point else ""
            lines.append(
                f"| {point['encoder']} | {point['size']} ({point['labeled_hours']:.2f} h){untuned} | "
                f"{row['context']} {row['pair']} | {ssl} | {per_seed or '-'} | "
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
                  "relatively better in test CER at every reported context at once, the 95 % "
                  "interval over voices and runs below 0 and the sign-flip p below 0.05:", "",
                  *verdicts]
    lines += ["", "Grid (dev CER %, grid seed; each arm's lowest is its setting; a chosen peak "
              "LR at the edge of the LRs tried, after the grid's extensions, is marked *):", "",
              "| encoder | labeled | arm | setting | dev CER |", "|---|---|---|---|---|"]
    for point in points:
        for g in point["grid"]:
            setting = ", ".join(f"{k} {v}" for k, v in g.items() if k not in ("arm", "dev_cer"))
            chosen = point["arms"].get(g["arm"], {}).get("setting")
            mark = ""
            if chosen and all(g[k] == v for k, v in chosen.items()):
                tried = [x["lr"] for x in point["grid"] if x["arm"] == g["arm"]]
                mark = " (chosen" + (", at a grid edge *)" if chosen["lr"] in (
                    min(tried), max(tried)) and "lr" in grid_axes else ")")
            lines.append(f"| {point['encoder']} | {point['size']} | {g['arm']} | {setting} | "
                         f"{g['dev_cer']:.1f}{mark} |")
    toplines = [p for p in points if "setting_from" in p]
    if toplines:
        lines += ["", "Toplines (scratch alone, no grid of their own):", ""]
        lines += [f"- {p['encoder']} {p['size']}: "
                  + ", ".join(f"{k} {v}" for k, v in p["arms"]["scratch"]["setting"].items())
                  + f" (the choice of {p['setting_from']})" for p in toplines]
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
        {**header, "points": points, "probes": probes, "ranks": ranks}, indent=1))
    plot(points, stem.with_suffix(".png"))


def cost_lines(cost: dict, budget: float | None) -> list[str]:
    """The cost paragraph: CPU-hours in all and by kind of run, against the budget."""
    verdict = "" if budget is None else (
        f" (budget {budget:g} CPU-hours: {'within' if cost['cpu_hours'] <= budget else 'over'})")
    kinds = "; ".join(f"{kind} {hours:.2f}" for kind, hours in cost["cpu_hours_by_kind"].items())
    return [f"Cost: {cost['cpu_hours']:.2f} CPU-hours{verdict}, {cost['runs']} training runs and "
            f"{cost['test_decodes']} test decodes, {cost['serial_wall_hours']:.2f} h of wall "
            f"clock run after run (less with processes side by side). CPU-hours by kind: "
            f"{kinds or 'none yet'}."]


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
              and row["ssl_minus_scratch_runs_and_voices"]["high"] < 0
              and row["ssl_minus_scratch"]["sign_flip_p"] < 0.05 for row in point["summary"])
    return f"{'met' if met else 'not met'} (target -{100 * target:.0f} % relative)"


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
            toplines = [p for p in mine if "setting_from" in p]
            mine = [p for p in mine if "setting_from" not in p]
            for arm, style in (("ssl", "o-"), ("scratch", "s--")):
                measured = [p for p in mine if f"{arm}_cer" in p["summary"][index]]
                if not measured:
                    continue
                values = [p["summary"][index][f"{arm}_cer"] for p in measured]
                axis.errorbar([p["labeled_hours"] for p in measured],
                              [v["mean"] for v in values],
                              yerr=[v["half_width"] or 0 for v in values], fmt=style, capsize=4,
                              label=f"{encoder}, {'from SSL' if arm == 'ssl' else 'from scratch'}")
            for p in toplines:  # a reference point, not tuned at its size: no line to it
                value = p["summary"][index]["scratch_cer"]
                axis.errorbar([p["labeled_hours"]], [value["mean"]],
                              yerr=[value["half_width"] or 0], fmt="k^", capsize=4,
                              label=f"{encoder}, topline (from scratch, {p['setting_from']} setting)")
        row = points[0]["summary"][index]
        axis.set_title(f"test, streaming {row['context']} {row['pair']}")
        axis.set_xscale("log")
        axis.set_xlabel("labeled speech, hours")
        axis.set_ylabel("CER %, mean and 95 % t-interval over runs")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
