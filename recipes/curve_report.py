"""The SSL curve's statistics and outputs (``recipes/ssl_curve.py``): per-size test summaries
(t-intervals, paired bootstraps, sign-flip tests), the cost by kind of run, and ``curve.md``
tables, ``curve.csv``, ``curve.json`` and the ``curve.png`` plot, with the issue's goal verdict
per labeled size."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from stats import (paired_cluster_bootstrap, paired_sign_flip, per_utterance_errors,
                   runs_and_voices_bootstrap, t_interval)


def summarize(point: dict, grid: dict, folder: Path) -> list[dict]:
    """Per test context: each arm's CER/WER mean with a t-interval over its fine-tuning runs
    (the same estimand for both arms: the spread of one fine-tuning run; for the SSL arm it is
    conditional on its SSL encoders, so the per-SSL-seed means and a t-interval over them are
    beside it), and, when both arms ran, SSL minus scratch: the paired voice bootstrap and the
    exact sign-flip test over voices (edits averaged over each arm's runs), a bootstrap over
    runs and voices together (``runs_and_voices_bootstrap``: the SSL seeds, the fine-tuning
    seeds and the test voices) and the difference per SSL seed.

    ``folder``: the curve's output folder (the runs' ``test_utterances.jsonl``). Raises
    ValueError when the runs were decoded at different contexts or on other utterances than
    ``test.csv``'s, when a run's per-utterance edits do not add up to its test CER, or when the
    SSL seeds have different numbers of fine-tuning runs."""
    voice_of = voices(Path(grid["corpus"]) / "test.csv")
    rows = []
    for index, context in enumerate(grid["test_contexts"]):
        row, edits = {"context": context, "pair": None}, {}
        for arm, data in point["arms"].items():
            measured = [r["test"]["contexts"][index] for r in data["runs"]]
            groups: dict = {}
            for run, decoded in zip(data["runs"], measured):
                row["pair"] = row["pair"] or decoded["pair"]
                if min(decoded["pair"]) < 0:  # evaluate.py decodes such a context offline
                    raise ValueError(f"{run['name']}: test context {context} {decoded['pair']}"
                                     " is offline: the curve reports streaming contexts")
                if decoded["pair"] != row["pair"]:
                    raise ValueError(f"{run['name']}: decoded at {decoded['pair']} where the "
                                     f"other runs of {context} were at {row['pair']}")
                groups.setdefault(run["ssl_seed"], []).append(
                    run_edits(folder / run["name"] / "test_utterances.jsonl", row["pair"],
                              voice_of, decoded["cer"]))
            for metric in ("cer", "wer"):
                row[f"{arm}_{metric}"] = t_interval([m[metric] for m in measured])
            edits[arm] = groups
            if arm == "ssl":
                means = {str(seed): statistics.fmean(
                    m["cer"] for r, m in zip(data["runs"], measured) if r["ssl_seed"] == seed)
                    for seed in groups}
                row["ssl_cer_per_ssl_seed"] = means
                row["ssl_cer_over_ssl_seeds"] = t_interval(list(means.values()))
        if len(edits) == 2:
            if len({len(group) for group in edits["ssl"].values()}) > 1:
                raise ValueError(f"{point['encoder']} {point['size']}: SSL seeds with different "
                                 "numbers of fine-tuning runs (their pooled mean would weigh "
                                 "them unequally)")
            resamples = grid["bootstrap_resamples"]
            ssl_all = per_utterance_errors([r for g in edits["ssl"].values() for r in g])
            scratch_all = per_utterance_errors(edits["scratch"][None])
            bootstrap = paired_cluster_bootstrap(ssl_all, scratch_all, voice_of,
                                                 resamples=resamples)
            # the percentile bootstrap's p is anti-conservative with 9 voices: kept under a
            # name that says which it is; the sign-flip p is the one the goal reads
            bootstrap["bootstrap_p"] = bootstrap.pop("p_value")
            row["ssl_minus_scratch"] = {
                **bootstrap,
                "sign_flip_p": paired_sign_flip(ssl_all, scratch_all, voice_of)["p_value"]}
            row["ssl_minus_scratch_runs_and_voices"] = runs_and_voices_bootstrap(
                list(edits["ssl"].values()), [edits["scratch"][None]], voice_of,
                resamples=resamples)
            row["ssl_minus_scratch_per_ssl_seed"] = {
                str(seed): pooled_rate(per_utterance_errors(group)) - pooled_rate(scratch_all)
                for seed, group in edits["ssl"].items()}
        rows.append(row)
    return rows


def run_edits(path: Path, pair: list[int], voice_of: dict[str, str],
              cer: float) -> dict[str, tuple[int, int]]:
    """One run's per-utterance edits at ``pair`` (``utterance_edits``), checked: every test
    utterance once, and their pooled rate equal to the run's reported test ``cer``."""
    found = utterance_edits(path, pair)
    if set(found) != set(voice_of):
        raise ValueError(f"{path}: {len(found)} utterances at {pair}, test.csv has "
                         f"{len(voice_of)} (another test set, or a partial decode)")
    if abs(pooled_rate(found) - cer) > 1e-6:
        raise ValueError(f"{path}: its edits at {pair} give CER {pooled_rate(found):.4f}, its "
                         f"test.json says {cer:.4f} (a stale file: decode the run again)")
    return found


def pooled_rate(errors: dict[str, tuple[float, int]]) -> float:
    """Error rate (%) of ``{id: (edits, reference length)}``: total edits over total length."""
    return 100 * sum(e for e, _ in errors.values()) / sum(n for _, n in errors.values())


def voices(manifest: Path) -> dict[str, str]:
    """Utterance id -> its base voice (the bootstrap's cluster: speakers that are settings of
    one timbre are not independent); the speaker id where the manifest has no ``voice``."""
    with open(manifest) as f:
        return {row["ID"]: row["voice"].split("|")[-1] if row.get("voice") else row["spk_id"]
                for row in csv.DictReader(f)}


def utterance_edits(path: Path, pair: list[int]) -> dict[str, tuple[int, int]]:
    """``{id: (character edits, reference characters)}`` of one test decode at one context."""
    edits = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record["context"] == pair:
                if record["id"] in edits:
                    raise ValueError(f"{path}: utterance {record['id']} twice at {pair}")
                edits[record["id"]] = (record["char_edits"], record["chars"])
    if not edits:
        raise ValueError(f"{path}: no utterance decoded at context {pair}")
    return edits


def held_back(point: dict) -> dict:
    """``point`` without a test figure: no summary, and its final runs without their test
    decodes (dev CER and seeds kept)."""
    arms = {arm: {**data, "runs": [{k: v for k, v in run.items() if k != "test"}
                                   for run in data["runs"]]}
            for arm, data in point["arms"].items()}
    return {**point, "summary": [], "arms": arms}


def cost_summary(costs: dict[str, dict], grid: dict) -> dict:
    """CPU-hours by encoder and kind of run (SSL, each arm's grid and final runs, topline, test
    decodes, probes), their sum, and the serial wall-clock hours (the runs' own, summed:
    processes side by side take less)."""
    grid_seed = grid["fine_tune"]["grid_seed"]
    kinds: dict[str, float] = {}
    for name, cost in costs.items():
        parts = name.split("/")
        if name.endswith("(test)"):
            kind = f"{parts[0]} test decodes"
        elif parts[1] in ("ssl", "probes"):
            kind = f"{parts[0]} {parts[1]}"
        elif parts[1] in grid.get("topline", []):
            kind = f"{parts[0]} topline runs"
        else:
            stage = "grid" if parts[-1] == f"seed{grid_seed}" else "final"
            kind = f"{parts[0]} {parts[2].split('_')[0]} arm, {stage} runs"
        kinds[kind] = kinds.get(kind, 0.0) + cost["cpu_seconds"] / 3600
    return {"cpu_hours": round(sum(kinds.values()), 3),
            "serial_wall_hours": round(sum(c["wall_seconds"] for c in costs.values()) / 3600, 3),
            "runs": sum(not name.endswith("(test)") for name in costs),
            "test_decodes": sum(name.endswith("(test)") for name in costs),
            "cpu_hours_by_kind": {k: round(v, 3) for k, v in sorted(kinds.items())}}


def interval_text(interval: dict) -> str:
    if interval["half_width"] is None:
        return f"{interval['mean']:.1f} (n=1)"
    return f"{interval['mean']:.1f} ± {interval['half_width']:.1f} (n={interval['n']})"


def p_text(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def seed_text(values: dict[str, float], form: str) -> str:
    """``s1 48.2, s2 49.0``: a figure per SSL seed, labeled."""
    return ", ".join(f"s{seed} {form.format(v)}" for seed, v in values.items()) or "-"


def difference_columns(d: dict | None, both: dict | None) -> dict:
    """curve.csv's SSL-minus-scratch columns (None for a point without both arms)."""
    fields = {"ssl_minus_scratch": (d, "difference"), "difference_low": (d, "low"),
              "difference_high": (d, "high"), "difference_runs_voices_low": (both, "low"),
              "difference_runs_voices_high": (both, "high"), "relative": (d, "relative"),
              "relative_low": (d, "relative_low"), "relative_high": (d, "relative_high"),
              "sign_flip_p": (d, "sign_flip_p")}
    return {key: None if source is None or source[field] is None
            else round(source[field], 4) for key, (source, field) in fields.items()}


def write_outputs(points: list[dict], probes: list[dict], ranks: dict, header: dict,
                  grid_axes: dict, stem: Path) -> None:
    """``curve.md`` (tables), ``curve.csv`` (one row per size, arm and context), ``curve.json``
    (everything) and ``curve.png`` (CER against labeled hours, both arms, intervals)."""
    lines = [f"# SSL low-resource curve ({header['grid']})", "",
             f"Runs made by code commit {header['runs_commit']}"
             + (f", report by code commit {header['code_commit']}"
                if header["code_commit"] != header["runs_commit"] else "")
             + f"; command `{header['command']}`; report made on {header['machine']}. "
             + runs_machines_text(header.get("runs_machines", []))
             + (f" {header['runs_without_manifest_hashes']} runs' records predate manifest "
                "hashes: read back without them, "
                + (header.get("corpus_check") or "the corpus unchecked") + "."
                if header.get("runs_without_manifest_hashes") else ""),
             "", *cost_lines(header["cost"], header["cpu_budget_hours"])]
    verdicts = [goal_verdict(p) if p["summary"] and "ssl_minus_scratch" in p["summary"][0]
                else None for p in points]  # None: held back, or the topline (no comparison)
    verdict_lines: list[str] = []
    if header["test_held_back"]:
        lines += ["", "Test figures are held back until every point of the grid file is "
                  "measured (dev grids only below)."]
    else:
        lines += ["", "Summary (test CER %, streaming, greedy; means over fine-tuning runs; the "
                  "difference's 95 % interval over test voices, SSL seeds and runs; details "
                  "below):", "", *summary_table(points, verdicts)]
        lines += ["", "Test CER % (streaming, greedy). SSL and scratch: each arm's mean ± 95 % "
                  "t-interval over its fine-tuning runs (the SSL arm's span its SSL seeds, so "
                  "its interval is conditional on those SSL encoders; the interval over the "
                  "per-SSL-seed means, and each SSL seed's mean, beside it). SSL - scratch, in "
                  "CER points (pp): pooled CER of per-utterance edits averaged over each arm's "
                  "runs, with a 95 % bootstrap interval over test voices alone, one over "
                  "voices, SSL seeds and fine-tuning runs together, the relative difference "
                  "(over voices), the difference of each SSL seed's runs, and the exact "
                  "sign-flip p over voices:", "",
                  "| encoder | labeled | context | SSL | SSL over SSL-seed means | SSL per SSL "
                  "seed | scratch | SSL - scratch, pp [voices] | [voices + runs] | relative "
                  "[voices] | per SSL seed, pp | sign-flip p |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for point, verdict in zip(points, verdicts):
        if verdict:
            verdict_lines.append(f"- {point['encoder']} {point['size']}: {verdict}")
        for row in point["summary"]:
            d = row.get("ssl_minus_scratch")  # none for the topline: scratch alone
            both = row.get("ssl_minus_scratch_runs_and_voices")
            ssl = interval_text(row["ssl_cer"]) if "ssl_cer" in row else "-"
            over_seeds = (interval_text(row["ssl_cer_over_ssl_seeds"])
                          if "ssl_cer_over_ssl_seeds" in row else "-")
            per_seed = seed_text(row.get("ssl_cer_per_ssl_seed", {}), "{:.1f}")
            if d:
                difference = (f"{d['difference']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] | "
                              f"[{both['low']:+.1f}, {both['high']:+.1f}] | "
                              f"{relative_text(d)} | "
                              f"{seed_text(row['ssl_minus_scratch_per_ssl_seed'], '{:+.1f}')} | "
                              f"{p_text(d['sign_flip_p'])}")
            else:
                difference = "- | - | - | - | -"
            untuned = " (topline: setting not tuned at this size)" * ("setting_from" in point)
            lines.append(
                f"| {point['encoder']} | {point['size']} ({point['labeled_hours']:.2f} h, "
                f"{point['steps']} steps){untuned} | {row['context']} {row['pair']} | {ssl} | "
                f"{over_seeds} | {per_seed} | {interval_text(row['scratch_cer'])} | "
                f"{difference} |")
            rows += csv_rows(point, row, verdict)
    if verdict_lines:
        lines += ["", "Goal (the grid file's `goals`, a relative target per labeled size): SSL "
                  "at least that much better in test CER at every reported context at once, "
                  "the 95 % interval over voices and runs below 0, the sign-flip p below 0.05, "
                  "and every SSL seed's own runs below scratch (a verdict about these SSL "
                  "pretraining runs, not about SSL pretraining in general):", "",
                  *verdict_lines]
    lines += ["", "Grid (dev CER % on all of dev at the validation context, grid seed, the SSL "
              "arm from the first SSL seed; each arm's lowest is its setting; a chosen peak LR "
              "at the edge of the LRs tried, after the grid's extensions, is marked *):", "",
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
        lines += ["", "Probes (frozen encoder, CTC head on layer k, one fine-tuning seed, the "
                  "first SSL seed; dev CER %, dev also choosing their checkpoints):", "",
                  "| encoder | trained on | init | layer | dev CER |", "|---|---|---|---|---|"]
        lines += [f"| {p['encoder']} | {p['size']} | {p['init']} | {p['layer']} | "
                  f"{p['dev_cer']:.1f} |" for p in probes]
    for encoder, found in ranks.items():
        layers = len(next(iter(found.values())))
        lines += ["", f"Effective rank of {encoder} layer outputs (dev: 200 utterances spread "
                  "evenly over dev.csv; the random encoder with torch seed 0; each SSL "
                  "seed's best checkpoint):", "",
                  "| encoder | " + " | ".join(f"layer {k}" for k in range(1, layers + 1)) + " |",
                  "|---|" + "---|" * layers]
        lines += [f"| {name} | " + " | ".join(f"{v:.0f}" for v in values) + " |"
                  for name, values in found.items()]
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".csv", ".png"):  # none left from an earlier report that showed more
        stem.with_suffix(suffix).unlink(missing_ok=True)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if rows:
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps(
        {**header, "points": points, "probes": probes, "ranks": ranks}, indent=1))
    plot(points, stem.with_suffix(".png"))


def summary_table(points: list[dict], verdicts: list[str | None]) -> list[str]:
    """The short table (for the README): per size and context, each arm's mean, SSL minus
    scratch with its interval over voices and runs, relative, and the goal's verdict (one per
    point, None for the topline) in a word."""
    lines = ["| encoder | labeled | context | scratch CER (WER) | SSL-init CER (WER) | SSL - "
             "scratch, CER pp [95 %] | relative | goal |", "|---|---|---|---|---|---|---|---|"]
    for point, verdict in zip(points, verdicts):
        verdict = verdict.split(" (")[0] if verdict else "topline"
        for row in point["summary"]:
            d, both = row.get("ssl_minus_scratch"), row.get("ssl_minus_scratch_runs_and_voices")
            ssl = arm_text(row, "ssl") if "ssl_cer" in row else "-"
            difference = (f"{d['difference']:+.1f} [{both['low']:+.1f}, {both['high']:+.1f}] | "
                          f"{relative_text(d).split(' [')[0]}") if d else "- | -"
            lines.append(f"| {point['encoder']} | {hours_label(point['labeled_hours'])} | "
                         f"{row['context']} {row['pair']} | {arm_text(row, 'scratch')} | "
                         f"{ssl} | {difference} | {verdict} |")
    return lines


def arm_text(row: dict, arm: str) -> str:
    """``48.2 (97.5)``: an arm's mean test CER and (WER)."""
    return f"{row[f'{arm}_cer']['mean']:.1f} ({row[f'{arm}_wer']['mean']:.1f})"


def csv_rows(point: dict, row: dict, verdict: str | None) -> list[dict]:
    """curve.csv's rows of one size and context: one per arm, with its role (an arm of the
    comparison, or the topline with the size its setting comes from), steps, intervals, the
    difference's statistics and the goal's verdict."""
    d, both = row.get("ssl_minus_scratch"), row.get("ssl_minus_scratch_runs_and_voices")
    rows = []
    for arm in point["arms"]:
        measured = row[f"{arm}_cer"]
        over_seeds = row.get("ssl_cer_over_ssl_seeds") if arm == "ssl" else None
        rows.append({
            "encoder": point["encoder"], "size": point["size"],
            "labeled_hours": point["labeled_hours"], "steps": point["steps"],
            "role": "topline" if "setting_from" in point else "arm",
            "setting_from": point.get("setting_from"), "context": row["context"],
            "pair": row["pair"], "arm": arm,
            **{f"setting_{k}": v for k, v in point["arms"][arm]["setting"].items()},
            "runs": measured["n"], "test_cer_mean": round(measured["mean"], 2),
            "test_cer_half_width": measured["half_width"],
            "test_cer_over_ssl_seed_means_half_width":
                over_seeds["half_width"] if over_seeds else None,
            "test_wer_mean": round(row[f"{arm}_wer"]["mean"], 2),
            **difference_columns(d, both),
            **{f"ssl_minus_scratch_ssl_seed{seed}": round(value, 4) for seed, value in
               row.get("ssl_minus_scratch_per_ssl_seed", {}).items()},
            "goal": verdict})
    return rows


def cost_lines(cost: dict, budget: float | None) -> list[str]:
    """The cost paragraph: CPU-hours in all and by kind of run, against the budget."""
    verdict = "" if budget is None else (
        f" (budget {budget:g} CPU-hours: {'within' if cost['cpu_hours'] <= budget else 'over'})")
    kinds = "; ".join(f"{kind} {hours:.2f}" for kind, hours in cost["cpu_hours_by_kind"].items())
    return [f"Cost of the finished runs read here: {cost['cpu_hours']:.2f} CPU-hours{verdict}, "
            f"{cost['runs']} training runs and {cost['test_decodes']} test decodes, "
            f"{cost['serial_wall_hours']:.2f} h of wall clock run after run (less with processes "
            f"side by side). CPU-hours by kind: {kinds or 'none yet'}. Not counted: runs lost "
            "or restarted before these, work after a run's last checkpoint when it was "
            "interrupted, dev attempts at the recipe made apart from the curve, and the layer "
            "ranks (computed by the report)."]


def runs_machines_text(machines: list[str]) -> str:
    """Where the runs ran, from their records (older code did not record it)."""
    if not machines:
        return "The runs' records do not name their machine."
    return f"Runs made on: {'; '.join(machines)}." \
        + (" (CPU-hours on different CPUs do not compare.)" if len(machines) > 1 else "")


def relative_text(d: dict) -> str:
    """``-12.3 % [-20.1, -4.0]``; ``-`` where scratch makes no error (undefined)."""
    if d["relative"] is None:
        return "-"
    return (f"{100 * d['relative']:+.1f} % [{100 * d['relative_low']:+.1f}, "
            f"{100 * d['relative_high']:+.1f}]")


def goal_verdict(point: dict) -> str:
    """Whether a size meets its goal (``point["goal_target"]``: the relative CER reduction the
    grid file's ``goals`` name for the size) at every reported context (a conjunction: no
    multiple-comparison correction needed within a size), and which conditions fail; with the
    point's ``caveat`` (e.g. an SSL recipe tuned for another encoder) after it."""
    target = point.get("goal_target")
    caveat = f" ({point['caveat']})" if point.get("caveat") else ""
    if target is None:
        return "no goal stated for this size in the grid file" + caveat
    failures = []
    for row in point["summary"]:
        d, both = row["ssl_minus_scratch"], row["ssl_minus_scratch_runs_and_voices"]
        where = f"{row['context']} {row['pair']}"
        if d["relative"] is None or d["relative"] > -target:
            failures.append(f"{where} relative {relative_text(d).split(' [')[0]}")
        if both["high"] >= 0:
            failures.append(f"{where} interval over voices and runs reaches "
                            f"{both['high']:+.1f} pp")
        if d["sign_flip_p"] >= 0.05:
            failures.append(f"{where} sign-flip p {p_text(d['sign_flip_p'])}")
        behind = [s for s, v in row["ssl_minus_scratch_per_ssl_seed"].items() if v >= 0]
        if behind:
            failures.append(f"{where} SSL seed {', '.join(behind)} not below scratch")
    seeds = len(point["summary"][0]["ssl_minus_scratch_per_ssl_seed"])
    if failures:
        return (f"not met (target -{100 * target:.0f} % relative): " + "; ".join(failures)
                + caveat)
    return (f"met (target -{100 * target:.0f} % relative; for these {seeds} SSL pretraining "
            f"runs){caveat}")


def plot(points: list[dict], path: Path) -> None:
    """Per test context, two panels: each arm's test CER against labeled hours (log scale;
    scratch: t-interval over its fine-tuning runs; SSL: thick, the same over its runs, which
    holds its SSL encoders fixed, and thin, the t-interval over its SSL-seed means), the
    topline as a separate marker; and below, SSL minus scratch in CER points with the interval
    over test voices and runs together (the one the goal reads). Series at one size are drawn
    side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in points if p["summary"]]  # measured on test
    if not points:
        return
    contexts = [row["context"] for row in points[0]["summary"]]
    figure, axes = plt.subplots(2, len(contexts), figsize=(5.5 * len(contexts), 7),
                                sharex=True, sharey="row", squeeze=False,
                                gridspec_kw={"height_ratios": [2, 1]})
    encoders = list(dict.fromkeys(p["encoder"] for p in points))
    series = [(e, arm) for e in encoders for arm in ("ssl", "scratch")]
    # side by side on the log axis: a few per cent of an octave apart
    shift = {key: 1.06 ** (i - (len(series) - 1) / 2) for i, key in enumerate(series)}
    hours = sorted({p["labeled_hours"] for p in points})
    for column in range(len(contexts)):
        top, bottom = axes[0][column], axes[1][column]
        for encoder in encoders:
            color = None  # the encoder's SSL colour, for its difference below
            mine = sorted((p for p in points if p["encoder"] == encoder),
                          key=lambda p: p["labeled_hours"])
            arms_points = [p for p in mine if "setting_from" not in p]
            for arm, style in (("ssl", "o-"), ("scratch", "s--")):
                measured = [p for p in arms_points if f"{arm}_cer" in p["summary"][column]]
                if not measured:
                    continue
                x = [p["labeled_hours"] * shift[(encoder, arm)] for p in measured]
                rows = [p["summary"][column] for p in measured]
                label = f"{encoder}, {'from SSL' if arm == 'ssl' else 'from scratch'}"
                line = top.errorbar(x, [r[f"{arm}_cer"]["mean"] for r in rows],
                                    yerr=[r[f"{arm}_cer"]["half_width"] or 0 for r in rows],
                                    fmt=style, capsize=0, elinewidth=3, label=label)
                if arm == "ssl":
                    color = line[0].get_color()
                    top.errorbar(x, [r["ssl_cer_over_ssl_seeds"]["mean"] for r in rows],
                                 yerr=[r["ssl_cer_over_ssl_seeds"]["half_width"] or 0
                                       for r in rows], fmt="none", capsize=4, elinewidth=1,
                                 ecolor=color)
            compared = [p for p in arms_points if "ssl_minus_scratch" in p["summary"][column]]
            if compared:
                both = [p["summary"][column]["ssl_minus_scratch_runs_and_voices"]
                        for p in compared]
                difference = [p["summary"][column]["ssl_minus_scratch"]["difference"]
                              for p in compared]
                bottom.errorbar([p["labeled_hours"] * shift[(encoder, "ssl")] for p in compared],
                                difference,
                                yerr=[[d - b["low"] for d, b in zip(difference, both)],
                                      [b["high"] - d for d, b in zip(difference, both)]],
                                fmt="o", capsize=4, color=color, label=encoder)
            for p in mine:
                if "setting_from" in p:  # a reference point, not tuned at its size: no line
                    value = p["summary"][column]["scratch_cer"]
                    top.errorbar([p["labeled_hours"]], [value["mean"]],
                                 yerr=[value["half_width"] or 0], fmt="k^", capsize=4,
                                 label=f"{encoder}, topline (scratch, {p['setting_from']} "
                                       "setting)")
        row = points[0]["summary"][column]
        top.set_title(f"test, streaming {row['context']} {row['pair']}")
        bottom.axhline(0, color="grey", linewidth=0.8)
        bottom.set_xscale("log")
        bottom.set_xticks(hours, [hours_label(h) for h in hours])
        bottom.minorticks_off()
        bottom.set_xlabel("labeled speech")
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    axes[0][0].set_ylabel("CER %, mean ± 95 % t-interval\n(SSL thin: over SSL-seed means)")
    axes[1][0].set_ylabel("SSL - scratch, CER points\n(95 %: voices and runs)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def hours_label(hours: float) -> str:
    """``10 min``, ``1.0 h``: a labeled size for the plot's axis."""
    return f"{60 * hours:.0f} min" if hours < 1 else f"{hours:.1f} h"
