"""recipes/curve_report.py on hand-made decodes: the SSL arm's two levels (SSL seeds x
fine-tuning seeds), the checks that refuse runs decoded differently, and the goal's verdict."""
import csv
import json

import pytest

from curve_report import goal_verdict, relative_text, summarize, write_outputs
from stats import paired_cluster_bootstrap, per_utterance_errors

VOICES = [f"v{v}" for v in range(9)]
IDS = [f"{voice}-{u}" for voice in VOICES for u in range(4)]
PAIRS = {"very_low": [8, 0], "high": [64, 7]}


def decoded_run(folder, name, edits_of, ssl_seed, seed, chars=20):
    """A final run whose test decode gives ``edits_of(utterance index)`` character edits of
    ``chars`` at both contexts: its ``test_utterances.jsonl`` and its point entry."""
    path = folder / name / "test_utterances.jsonl"
    path.parent.mkdir(parents=True)
    edits = [edits_of(i) for i in range(len(IDS))]
    with open(path, "w") as f:
        for pair in PAIRS.values():
            for uid, e in zip(IDS, edits):
                f.write(json.dumps({"id": uid, "context": pair, "char_edits": e,
                                    "chars": chars}) + "\n")
    cer = 100 * sum(edits) / (chars * len(IDS))
    return {"name": name, "seed": seed, "ssl_seed": ssl_seed, "dev_cer": 50.0,
            "test": {"contexts": [{"name": n, "pair": p, "cer": cer, "wer": 2 * cer, "rtf": 0.1}
                                  for n, p in PAIRS.items()]}}


@pytest.fixture
def curve_folder(tmp_path):
    (tmp_path / "corpus").mkdir()
    with open(tmp_path / "corpus" / "test.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["ID", "spk_id", "voice"])
        writer.writeheader()
        writer.writerows({"ID": uid, "spk_id": uid.split("-")[0],
                          "voice": f"espeak-ng:x|espeak:{uid.split('-')[0]}"} for uid in IDS)
    grid = {"corpus": str(tmp_path / "corpus"), "test_contexts": list(PAIRS),
            "bootstrap_resamples": 400}
    return tmp_path, grid


def point_of(folder, ssl_edits: dict, scratch_edits: list, hours=0.167):
    """``ssl_edits``: {SSL seed: [edits function per fine-tuning seed]}."""
    ssl_runs = [decoded_run(folder, f"ssl_ssl{s}/seed{k}", fn, s, k)
                for s, fns in ssl_edits.items() for k, fn in enumerate(fns, 1)]
    scratch_runs = [decoded_run(folder, f"scratch/seed{k}", fn, None, k)
                    for k, fn in enumerate(scratch_edits, 1)]
    return {"encoder": "conformer", "size": "train_10min", "labeled_hours": hours, "grid": [],
            "arms": {"ssl": {"setting": {"lr": 0.001}, "runs": ssl_runs},
                     "scratch": {"setting": {"lr": 0.001}, "runs": scratch_runs}}}


def test_two_ssl_seeds_are_summarized_at_both_levels_and_judged_per_seed(curve_folder):
    folder, grid = curve_folder
    # SSL seed 1 far better than scratch (5 vs 10 edits), seed 2 as bad (10): the pooled
    # difference is large and significant over voices, but one pretraining run did not help.
    point = point_of(folder, {1: [lambda i: 5, lambda i: 5 + i % 2],
                              2: [lambda i: 10 + i % 2, lambda i: 10]},
                     [lambda i: 10, lambda i: 10 + i % 2, lambda i: 10])
    point["summary"] = summarize(point, grid, folder)
    row = point["summary"][0]
    assert row["pair"] == [8, 0] and row["ssl_cer"]["n"] == 4 and row["scratch_cer"]["n"] == 3
    assert row["ssl_cer_over_ssl_seeds"]["n"] == 2
    assert row["ssl_cer_over_ssl_seeds"]["mean"] == pytest.approx(row["ssl_cer"]["mean"])
    assert set(row["ssl_cer_per_ssl_seed"]) == {"1", "2"}
    per_seed = row["ssl_minus_scratch_per_ssl_seed"]
    assert per_seed["1"] < 0 <= per_seed["2"]
    d = row["ssl_minus_scratch"]
    assert "bootstrap_p" in d and "p_value" not in d  # the anti-conservative p, named so
    assert d["difference"] == pytest.approx((per_seed["1"] + per_seed["2"]) / 2)
    verdict = goal_verdict(point)
    assert verdict.startswith("not met") and "SSL seed 2 not below scratch" in verdict
    # Written out: seeds labeled, points in pp, the csv carries the verdict's statistics.
    header = {"grid": "g.yaml", "code_commit": "b" * 40, "runs_commit": "a" * 40,
              "command": "c", "machine": "m", "cpu_budget_hours": 8, "test_held_back": False,
              "cost": {"cpu_hours": 1.0, "runs": 7, "test_decodes": 7,
                       "serial_wall_hours": 1.0, "cpu_hours_by_kind": {}}}
    write_outputs([point], [], {}, header, {"lr": [0.001]}, folder / "curve")
    text = (folder / "curve.md").read_text()
    assert "s1 " in text and "s2 " in text and "pp" in text and "report by code commit" in text
    with open(folder / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"sign_flip_p", "difference_runs_voices_high", "relative", "goal"} <= set(rows[0])
    assert rows[0]["goal"].startswith("not met")


def test_a_goal_is_met_only_when_every_condition_holds(curve_folder):
    folder, grid = curve_folder
    point = point_of(folder, {1: [lambda i: 5, lambda i: 6], 2: [lambda i: 6, lambda i: 5]},
                     [lambda i: 10, lambda i: 11, lambda i: 10])
    point["summary"] = summarize(point, grid, folder)
    assert goal_verdict(point).startswith("met (target -20 %")
    assert goal_verdict({**point, "labeled_hours": 0.5}).startswith("no goal stated")
    # 10 % better at 1 hour is met, at 10 minutes it is not, and the text says why.
    ten = point_of(folder / "ten", {1: [lambda i: 9, lambda i: 9], 2: [lambda i: 9,
                                                                      lambda i: 9]},
                   [lambda i: 10, lambda i: 10, lambda i: 10])
    ten["summary"] = summarize(ten, grid, folder / "ten")
    assert goal_verdict({**ten, "labeled_hours": 1.0}).startswith("met (target -10 %")
    assert "very_low [8, 0] relative -10.0 %" in goal_verdict(ten)
    assert relative_text({"relative": -0.196, "relative_low": -0.3, "relative_high": -0.1}) \
        == "-19.6 % [-30.0, -10.0]"


def test_runs_decoded_differently_are_refused(curve_folder):
    folder, grid = curve_folder
    point = point_of(folder, {1: [lambda i: 5]}, [lambda i: 10])
    # a run whose test.json CER no longer matches its per-utterance file (a stale file)
    point["arms"]["ssl"]["runs"][0]["test"]["contexts"][0]["cer"] += 1
    with pytest.raises(ValueError, match="stale"):
        summarize(point, grid, folder)
    point["arms"]["ssl"]["runs"][0]["test"]["contexts"][0]["cer"] -= 1
    # the arms decoded at different contexts
    point["arms"]["scratch"]["runs"][0]["test"]["contexts"][0]["pair"] = [16, 1]
    with pytest.raises(ValueError, match="decoded at"):
        summarize(point, grid, folder)
    # SSL seeds with different numbers of fine-tuning runs
    uneven = point_of(folder / "uneven", {1: [lambda i: 5, lambda i: 5], 2: [lambda i: 5]},
                      [lambda i: 10])
    with pytest.raises(ValueError, match="numbers of fine-tuning runs"):
        summarize(uneven, grid, folder / "uneven")
    # a decode of fewer utterances than test.csv has
    lines = (folder / "scratch/seed1/test_utterances.jsonl").read_text().splitlines()
    (folder / "scratch/seed1/test_utterances.jsonl").write_text("\n".join(lines[1:]) + "\n")
    point["arms"]["scratch"]["runs"][0]["test"]["contexts"][0]["pair"] = [8, 0]
    with pytest.raises(ValueError, match="test.csv has 36"):
        summarize(point, grid, folder)


def test_scores_against_other_references_are_refused():
    a = {"u": (1, 10), "v": (2, 10)}
    with pytest.raises(ValueError, match="references of different lengths"):
        per_utterance_errors([a, {"u": (1, 11), "v": (2, 10)}])
    with pytest.raises(ValueError, match="references of different lengths"):
        paired_cluster_bootstrap(a, {"u": (1, 10), "v": (2, 12)}, {"u": "x", "v": "y"})
