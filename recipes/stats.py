"""Statistics for comparing recognizers: t-intervals over seeds, and a paired bootstrap over
test utterances that resamples clusters of utterances (voices: utterances of one voice are not
independent).

SciPy's ``stats.t`` gives the quantiles; the cluster bootstrap of a difference of
pooled error rates is written here because neither SciPy's ``bootstrap`` nor SpeechBrain resamples
clusters of utterances for a ratio of sums.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict

import numpy as np
from scipy import stats as scipy_stats


def t_interval(values: list[float], confidence: float = 0.95) -> dict:
    """Mean of ``values`` with its Student-t confidence interval (``half_width`` None for one
    value).

    >>> r = t_interval([10.0, 12.0, 14.0])
    >>> r["mean"], round(r["half_width"], 2)
    (12.0, 4.97)
    """
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "half_width": None, "low": None, "high": None, "n": len(values)}
    sem = statistics.stdev(values) / math.sqrt(len(values))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * sem
    return {"mean": mean, "half_width": half, "low": mean - half, "high": mean + half,
            "n": len(values)}


def per_utterance_errors(runs: list[dict[str, tuple[int, int]]]) -> dict[str, tuple[float, int]]:
    """Edits averaged over runs (seeds) per utterance: ``{id: (mean edits, reference length)}``.

    ``runs``: one ``{utterance id: (edits, reference length)}`` per run, all on the same set.
    """
    ids = set(runs[0])
    for run in runs[1:]:
        if set(run) != ids:
            raise ValueError("runs were scored on different utterances")
    check_lengths(runs)
    return {uid: (statistics.fmean(run[uid][0] for run in runs), runs[0][uid][1]) for uid in ids}


def check_lengths(scored: list[dict[str, tuple[float, int]]]) -> None:
    """Raises ValueError when an utterance's reference length differs between ``scored``
    (runs or systems scored on the same utterances): they were scored against other
    references, so their edits cannot be compared."""
    for uid, (_, length) in scored[0].items():
        if any(other[uid][1] != length for other in scored[1:]):
            raise ValueError(f"utterance {uid} was scored against references of different "
                             "lengths (another test set or text normalization)")


def paired_cluster_bootstrap(errors_a: dict[str, tuple[float, int]],
                             errors_b: dict[str, tuple[float, int]], cluster_of: dict[str, str],
                             resamples: int = 10000, confidence: float = 0.95,
                             seed: int = 0) -> dict:
    """Bootstrap of the difference of pooled error rates ``A - B`` (percent), resampling clusters
    (voices) with replacement and keeping each drawn cluster's utterances paired between A and B.

    Returns the observed difference, its percentile interval, the relative difference
    ``(A - B) / B`` with its interval (None where B makes no error: undefined), and the
    two-sided bootstrap p-value of "no difference".

    >>> a = {f"s{s}-{u}": (1.0, 10) for s in range(8) for u in range(5)}
    >>> b = {k: (2.0, 10) for k in a}
    >>> r = paired_cluster_bootstrap(a, b, {k: k.split("-")[0] for k in a}, resamples=200)
    >>> round(r["difference"], 6), round(r["low"], 6), round(r["high"], 6), r["p_value"]
    (-10.0, -10.0, -10.0, 0.005)
    """
    if set(errors_a) != set(errors_b):
        raise ValueError("A and B were scored on different utterances")
    check_lengths([errors_a, errors_b])
    members: dict[str, list[str]] = defaultdict(list)
    for uid in sorted(errors_a):
        members[cluster_of[uid]].append(uid)
    clusters = sorted(members)
    # Per cluster: summed edits of A, of B, and reference length; a resample sums rows.
    table = np.array([[sum(errors_a[u][0] for u in members[c]),
                       sum(errors_b[u][0] for u in members[c]),
                       sum(errors_a[u][1] for u in members[c])] for c in clusters])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(clusters), size=(resamples, len(clusters)))
    sums = table[draws].sum(axis=1)  # (resamples, 3)
    rate_a, rate_b = 100 * sums[:, 0] / sums[:, 2], 100 * sums[:, 1] / sums[:, 2]
    total = table.sum(axis=0)
    observed_a, observed_b = float(100 * total[0] / total[2]), float(100 * total[1] / total[2])
    tail = (1 - confidence) / 2 * 100
    difference = rate_a - rate_b
    # Two-sided percentile p-value, floored at 1 / resamples (never reported as exactly 0).
    p_value = max(1 / resamples,
                  min(1.0, 2 * min((difference >= 0).mean(), (difference <= 0).mean())))
    relative = {"relative": None, "relative_low": None, "relative_high": None}
    if observed_b > 0:  # a resample where B makes no error has no relative difference: dropped
        ratios = difference[rate_b > 0] / rate_b[rate_b > 0]
        relative = {"relative": (observed_a - observed_b) / observed_b,
                    "relative_low": float(np.percentile(ratios, tail)),
                    "relative_high": float(np.percentile(ratios, 100 - tail))}
    return {"a": observed_a, "b": observed_b, "difference": observed_a - observed_b,
            "low": float(np.percentile(difference, tail)),
            "high": float(np.percentile(difference, 100 - tail)), **relative,
            "p_value": float(p_value), "clusters": len(clusters),
            "utterances": len(errors_a), "resamples": resamples}


def paired_sign_flip(errors_a: dict[str, tuple[float, int]],
                     errors_b: dict[str, tuple[float, int]], cluster_of: dict[str, str],
                     exact_up_to: int = 16, resamples: int = 100000, seed: int = 0) -> dict:
    """Two-sided sign-flip (permutation) test of "A and B have the same error rate", the
    clusters (voices) as the exchangeable units: under the null, each cluster's summed
    difference of edits is as likely negated. Exact over all ``2 ** clusters`` sign patterns up
    to ``exact_up_to`` clusters, else ``resamples`` random ones.

    Unlike the percentile bootstrap, it keeps its level with few clusters (with 9 voices the
    bootstrap rejects a true null about twice as often as it should); its smallest p-value is
    ``2 / 2 ** clusters``.

    >>> a = {f"s{s}-{u}": (1.0, 10) for s in range(8) for u in range(5)}
    >>> b = {k: (2.0, 10) for k in a}
    >>> paired_sign_flip(a, b, {k: k.split("-")[0] for k in a})
    {'p_value': 0.0078125, 'clusters': 8, 'exact': True}
    """
    if set(errors_a) != set(errors_b):
        raise ValueError("A and B were scored on different utterances")
    differences: dict[str, float] = defaultdict(float)
    for uid in errors_a:
        differences[cluster_of[uid]] += errors_a[uid][0] - errors_b[uid][0]
    d = np.array([differences[c] for c in sorted(differences)])
    exact = len(d) <= exact_up_to
    if exact:
        patterns = (np.arange(2 ** len(d))[:, None] >> np.arange(len(d))[None]) & 1
    else:
        patterns = np.random.default_rng(seed).integers(0, 2, size=(resamples, len(d)))
    totals = np.abs(((1 - 2 * patterns) * d).sum(axis=1))
    p_value = float((totals >= abs(d.sum()) - 1e-9).mean())
    return {"p_value": p_value, "clusters": len(d), "exact": exact}


def runs_and_voices_bootstrap(runs_a: list[list[dict[str, tuple[int, int]]]],
                              runs_b: list[list[dict[str, tuple[int, int]]]],
                              cluster_of: dict[str, str], resamples: int = 10000,
                              confidence: float = 0.95, seed: int = 0) -> dict:
    """Bootstrap of the difference of pooled error rates ``A - B`` (percent) that sees the
    training runs as well as the test voices: each resample draws the voices with replacement
    and, for each system, its groups of runs (e.g. SSL seeds) with replacement and then runs
    within each drawn group; a system's rate is the mean over its drawn runs.

    ``runs_a``, ``runs_b``: groups of runs, each run ``{utterance id: (edits, reference
    length)}`` on the same utterances. A system with one group of one run adds no training
    spread. Returns the observed difference (a system's rate: the mean over its groups of each
    group's mean run, so groups weigh the same whatever their number of runs) and its
    percentile interval.

    >>> a = [[{f"s{s}-{u}": (1, 10) for s in range(4) for u in range(3)}]]
    >>> b = [[{k: (2, 10) for k in a[0][0]}], [{k: (4, 10) for k in a[0][0]}]]
    >>> r = runs_and_voices_bootstrap(a, b, {k: k.split("-")[0] for k in a[0][0]}, 500)
    >>> r["difference"], r["low"], r["high"]
    (-20.0, -30.0, -10.0)
    """
    ids = sorted(runs_a[0][0])
    for run in (r for groups in (runs_a, runs_b) for group in groups for r in group):
        if sorted(run) != ids:
            raise ValueError("runs were scored on different utterances")
    check_lengths([r for groups in (runs_a, runs_b) for group in groups for r in group])
    clusters = sorted({cluster_of[u] for u in ids})
    index = {c: i for i, c in enumerate(clusters)}
    chars = np.zeros(len(clusters))
    for u in ids:
        chars[index[cluster_of[u]]] += runs_a[0][0][u][1]

    def table(groups):  # (groups, runs per group, clusters) of summed edits; ragged -> lists
        out = []
        for group in groups:
            rows = np.zeros((len(group), len(clusters)))
            for r, run in enumerate(group):
                for u in ids:
                    rows[r, index[cluster_of[u]]] += run[u][0]
            out.append(rows)
        return out

    rng = np.random.default_rng(seed)
    voice_draws = rng.integers(0, len(clusters), size=(resamples, len(clusters)))
    counts = np.stack([np.bincount(d, minlength=len(clusters)) for d in voice_draws])

    def rates(groups):  # (resamples,) pooled rate of each resample's drawn runs
        edits = np.zeros((resamples, len(clusters)))
        drawn = rng.integers(0, len(groups), size=(resamples, len(groups)))
        for g in range(len(groups)):
            chosen = drawn[:, g]
            for k, rows in enumerate(groups):
                mask = chosen == k
                if not mask.any():
                    continue
                picks = rng.integers(0, len(rows), size=(int(mask.sum()), len(rows)))
                edits[mask] += rows[picks].mean(axis=1)
        edits /= len(groups)
        return 100 * (edits * counts).sum(axis=1) / (chars * counts).sum(axis=1)

    tables_a, tables_b = table(runs_a), table(runs_b)
    difference = rates(tables_a) - rates(tables_b)

    def observed(tables):
        return 100 * np.mean([rows.mean(axis=0).sum() for rows in tables]) / chars.sum()

    tail = (1 - confidence) / 2 * 100
    return {"difference": float(observed(tables_a) - observed(tables_b)),
            "low": float(np.percentile(difference, tail)),
            "high": float(np.percentile(difference, 100 - tail)),
            "clusters": len(clusters), "runs_a": sum(map(len, runs_a)),
            "runs_b": sum(map(len, runs_b)), "resamples": resamples}
