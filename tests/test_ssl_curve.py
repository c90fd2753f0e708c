"""recipes/ssl_curve.py end to end on a tiny benchmark-shaped corpus made from the shipped one
(two sizes, both arms, two seeds, tiny model, and a scratch-only topline): dev-only grids,
test-only finals, intervals and the paired bootstrap, resume by read-back, refusal of a stale
result; and its statistics."""
import csv
import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT
from curve_report import cost_summary
from layer_ranks import effective_rank
from curve_grid import load_grid, repeated_manifest, setting_tag
from ssl_curve import Curve
from stats import paired_cluster_bootstrap, per_utterance_errors, t_interval

SHIPPED = ROOT / "data" / "espeak_corpus"
TINY = {"d_model": 32, "nhead": 2, "num_encoder_layers": 2, "d_ffn": 64, "kernel_size": 5,
        "subsampling_conv_channels": 4}


def tiny_benchmark(folder):
    """Manifests shaped like data/benchmark's, over the shipped audio."""
    folder.mkdir()
    (folder / "audio").symlink_to(SHIPPED / "audio")
    rows = {}
    for split in ("train", "valid", "test"):
        with open(SHIPPED / f"{split}.csv") as f:
            rows[split] = list(csv.DictReader(f))
    manifests = {"unlabeled_train": rows["train"][80:112], "unlabeled_valid": rows["valid"][:4],
                 "train": rows["train"], "train_small": rows["train"][:8],
                 "train_mid": rows["train"][:16], "dev": rows["valid"][:8],
                 "test": rows["test"]}
    for name, subset in manifests.items():
        with open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(subset[0]))
            writer.writeheader()
            writer.writerows(subset)
    return folder


def curve(tmp_path, grid):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "ssl_curve.py"), str(path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=1200)
    return run


@pytest.fixture(scope="module")
def tiny_curve(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("curve")
    grid = {"corpus": str(tiny_benchmark(tmp_path / "corpus")),
            "output_folder": str(tmp_path / "out"),
            "encoders": {"conformer": ["train_small", "train_mid", "train"]},
            "topline": ["train"], "valid_every": 2,
            "ssl": {"hparams": "hparams/SSL/{encoder}.yaml", "seeds": [1],
                    "overrides": {**TINY, "num_classes": 32, "number_of_epochs": 1}},
            "steps": {"train_small": 2, "train_mid": 4, "train": 2}, "validations": 2,
            "fine_tune": {"hparams": "hparams/CTC/{encoder}_small.yaml", "batch_size": 4,
                          "grid_seed": 0, "seeds": [1, 2], "grid": {"lr": [0.001],
                                                    "spec_augment_prob": [0.0, 1.0]},
                          "overrides": {"beam_size": 1}},
            "arms": {"ssl": {"head_only_fraction": 0.25}, "scratch": {"head_only_fraction": 0.0}},
            "test_contexts": ["very_low", "high"], "probe_layers": [],
            "bootstrap_resamples": 200, "cpu_budget_hours": 1, "goals": {"train_small": 0.2}}
    run = curve(tmp_path, grid)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return tmp_path, grid, run


def test_tiny_curve_tunes_on_dev_tests_on_test_and_reports_intervals(tiny_curve):
    tmp_path, grid, run = tiny_curve
    out = tmp_path / "out"
    report = json.loads((out / "curve.json").read_text())
    assert [p["size"] for p in report["points"]] == ["train_small", "train_mid", "train"]
    *curve_points, topline = report["points"]
    # The topline: scratch alone, no grid of its own (the scratch choice of the largest other
    # size), its seeds, intervals but no SSL difference.
    assert list(topline["arms"]) == ["scratch"] and topline["grid"] == []
    assert topline["setting_from"] == "conformer train_mid, scratch arm"
    assert topline["arms"]["scratch"]["setting"] == curve_points[1]["arms"]["scratch"]["setting"]
    assert [r["seed"] for r in topline["arms"]["scratch"]["runs"]] == [1, 2]
    assert all(row["scratch_cer"]["n"] == 2 and "ssl_minus_scratch" not in row
               for row in topline["summary"])
    assert "| conformer | train (" in (out / "curve.md").read_text()
    assert "- conformer train: lr" in (out / "curve.md").read_text()
    for point in curve_points:
        for arm in ("ssl", "scratch"):
            final = point["arms"][arm]
            chosen = [g for g in point["grid"] if g["arm"] == arm]
            assert len(chosen) == 2  # its own grid
            best = min(chosen, key=lambda g: g["dev_cer"])
            assert final["setting"]["spec_augment_prob"] == best["spec_augment_prob"]
            assert [r["seed"] for r in final["runs"]] == [1, 2]
        for row in point["summary"]:
            assert row["ssl_cer"]["n"] == row["scratch_cer"]["n"] == 2
            d = row["ssl_minus_scratch"]
            assert d["low"] <= d["difference"] <= d["high"] and d["clusters"] == 2
            assert d["utterances"] == 20
    # Grid runs never see test; final runs are decoded on test at the lowest / highest preset.
    # Fine-tuning validates on every 2nd dev utterance and reports on all of dev.
    for result in out.rglob("result.json"):
        record = json.loads(result.read_text())["record"]
        command = record["command"]
        if "--test_csv" in command:
            assert command[command.index("--test_csv") + 1].endswith("/dev.csv")
            assert command[command.index("--valid_csv") + 1].endswith("dev_every2.csv")
        assert record["code_commit"] is None or len(record["code_commit"]) == 40
    tests = list(out.rglob("test.json"))
    assert tests and all(json.loads(t.read_text())["contexts"][0]["pair"] == [8, 0]
                         for t in tests)
    assert "SSL - scratch" in (out / "curve.md").read_text()
    assert (out / "curve.png").is_file() and report["cost"]["cpu_hours"] > 0
    assert not report["test_held_back"] and "within" in (out / "curve.md").read_text()
    # The goal is judged where the grid file names one; steps and the machine are on record.
    assert curve_points[0]["goal_target"] == 0.2 and curve_points[1]["goal_target"] is None
    assert "- conformer train_small: " in (out / "curve.md").read_text()
    assert [p["steps"] for p in curve_points] == [2, 4] and report["runs_machines"]
    for point in curve_points:
        for row in point["summary"]:
            both = row["ssl_minus_scratch_runs_and_voices"]
            assert both["low"] <= row["ssl_minus_scratch"]["difference"] <= both["high"]
            assert 0 < row["ssl_minus_scratch"]["sign_flip_p"] <= 1
            assert list(row["ssl_minus_scratch_per_ssl_seed"]) == ["1"]  # one SSL seed: the whole
            assert row["ssl_minus_scratch_per_ssl_seed"]["1"] == pytest.approx(
                row["ssl_minus_scratch"]["difference"])
    # Every test decode is logged, once per final run (2 sizes x 2 arms x 2 seeds + topline).
    log = (out / "test_decodes.jsonl").read_text().splitlines()
    assert len(log) == 10 and all(json.loads(line)["command"][0] == "recipes/evaluate.py"
                                  for line in log)
    assert "random init" in report["ranks"]["conformer"]


def test_report_only_reads_every_run_back_and_trains_nothing(tiny_curve):
    tmp_path, grid, _ = tiny_curve
    out = tmp_path / "out"
    script = [sys.executable, str(ROOT / "recipes" / "ssl_curve.py"), str(tmp_path / "grid.yaml")]
    report = subprocess.run([*script, "--report_only"], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "recipes/train.py" not in report.stdout
    made = json.loads((out / "report" / "curve.json").read_text())
    assert made["points"] == json.loads((out / "curve.json").read_text())["points"]
    assert not made["test_held_back"] and made["runs_commit"] == made["code_commit"]
    # Runs made by another commit are refused, a commit not in the repository is named; a run
    # not finished is not trained.
    first = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], capture_output=True,
                           text=True, cwd=ROOT).stdout.split()
    cases = [("0" * 40, "not a commit")] + [(first[0], "code_commit")] * bool(first)
    for commit, message in cases:
        other = subprocess.run([*script, "--report_only", "--runs_commit", commit],
                               capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert other.returncode != 0 and message in other.stderr, other.stderr[-2000:]
    log = (out / "test_decodes.jsonl").read_text()
    result = next(out.rglob("train_small/scratch/*/seed2/result.json"))
    result.rename(result.with_name("aside.json"))
    try:
        missing = subprocess.run([*script, "--report_only"], capture_output=True, text=True,
                                 cwd=ROOT, timeout=600)
    finally:
        result.with_name("aside.json").rename(result)
    assert missing.returncode != 0 and f"{result} not found" in missing.stderr
    assert (out / "test_decodes.jsonl").read_text() == log  # nothing decoded


def test_rerun_reads_back_and_a_stale_result_is_refused(tiny_curve):
    tmp_path, grid, _ = tiny_curve
    out = tmp_path / "out"
    before = json.loads((out / "curve.json").read_text())
    again = curve(tmp_path, grid)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "recipes/train.py" not in again.stdout  # nothing retrained
    after = json.loads((out / "curve.json").read_text())
    assert after["points"] == before["points"]
    # A partial command (one size) reads its runs back but shows no test figure.
    partial = subprocess.run([sys.executable, str(ROOT / "recipes" / "ssl_curve.py"),
                              str(tmp_path / "grid.yaml"), "--sizes", "train_small"],
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert partial.returncode == 0, partial.stderr[-2000:]
    held = json.loads((out / "curve.json").read_text())
    assert held["test_held_back"] and all(not p["summary"] for p in held["points"])
    assert all("test" not in run and "dev_cer" in run for p in held["points"]
               for arm in p["arms"].values() for run in arm["runs"])
    assert "held back" in (out / "curve.md").read_text()
    assert len((out / "test_decodes.jsonl").read_text().splitlines()) == 10  # no new decode
    # The topline alone takes its setting from the largest other size's scratch grid (read
    # back); without the scratch arm it has nothing to run.
    for flags, arms in ((["--sizes", "train"], ["scratch"]), (["--arms", "ssl"], [])):
        run = subprocess.run([sys.executable, str(ROOT / "recipes" / "ssl_curve.py"),
                              str(tmp_path / "grid.yaml"), *flags],
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "recipes/train.py" not in run.stdout
        topline = json.loads((out / "curve.json").read_text())["points"][-1]
        assert topline["size"] == "train" and list(topline["arms"]) == arms
        assert ("setting_from" in topline) == bool(arms)
    stale = next(out.rglob("train_small/scratch/*/seed2/result.json"))
    original = stale.read_text()
    for field, change in (("command", lambda r: r["command"].__setitem__(-1, "elsewhere")),
                          ("manifest_sha256", lambda r: r["manifest_sha256"].__setitem__(
                              "--train_csv", "0" * 64))):  # made from another manifest
        stored = json.loads(original)
        change(stored["record"])
        stale.write_text(json.dumps(stored))
        refused = curve(tmp_path, grid)
        assert refused.returncode != 0
        assert str(stale) in refused.stderr + refused.stdout and field in refused.stderr


def test_ssl_only_trains_the_ssl_runs_and_reports_their_cost(tiny_curve):
    tmp_path, grid, _ = tiny_curve
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "ssl_curve.py"),
                          str(tmp_path / "grid.yaml"), "--ssl_only"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["cpu_hours"] > 0  # read back


def test_repeated_manifest_keeps_ids_unique(tmp_path):
    rows = repeated_manifest(SHIPPED / "valid.csv", tmp_path / "x.csv", 55)  # 2.75 x: 3
    with open(tmp_path / "x.csv") as f:
        ids = [r["ID"] for r in csv.DictReader(f)]
    assert rows == len(ids) == 60 and len(set(ids)) == 60


def test_t_interval_and_paired_bootstrap():
    interval = t_interval([40.0, 42.0, 44.0])
    assert interval["mean"] == 42.0 and 4.9 < interval["half_width"] < 5.0  # t(2) = 4.30
    assert t_interval([40.0])["half_width"] is None
    # B is worse by 2 edits in every utterance of 10 speakers: the interval excludes zero.
    a = {f"s{s}-{u}": (s % 3, 20) for s in range(10) for u in range(4)}
    b = {k: (edits + 2, chars) for k, (edits, chars) in a.items()}
    speaker_of = {k: k.split("-")[0] for k in a}
    result = paired_cluster_bootstrap(a, b, speaker_of, resamples=500)
    assert result["high"] < 0 and result["p_value"] < 0.01 and result["clusters"] == 10
    # Identical systems: the difference is 0 and the interval contains it.
    same = paired_cluster_bootstrap(a, dict(a), speaker_of, resamples=500)
    assert same["low"] <= 0 <= same["high"] and same["p_value"] == 1.0
    averaged = per_utterance_errors([{"u": (1, 10)}, {"u": (3, 10)}])
    assert averaged == {"u": (2.0, 10)}
    with pytest.raises(ValueError):
        per_utterance_errors([{"u": (1, 10)}, {"v": (1, 10)}])


def test_effective_rank_counts_the_directions_variance_spans():
    g = torch.Generator().manual_seed(0)
    assert abs(effective_rank(torch.randn(4000, 16, generator=g)) - 16) < 1
    collapsed = torch.randn(4000, 2, generator=g) @ torch.randn(2, 16, generator=g)
    assert effective_rank(collapsed) < 2.5


@pytest.mark.parametrize("change, message", [
    ({"topline": ["train_2h"]}, "topline"),
    ({"encoders": {"conformer": ["train"]}}, "no other size"),
    ({"valid_every": 0}, "valid_every"),
    ({"valid_evry": 2}, "unknown keys"),
])
def test_a_bad_grid_names_its_key(tmp_path, change, message):
    grid = yaml.safe_load((ROOT / "hparams" / "curves" / "benchmark.yaml").read_text())
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**grid, **change}))
    with pytest.raises(SystemExit, match=message):
        load_grid(path)
    assert load_grid(ROOT / "hparams" / "curves" / "benchmark.yaml")["topline"] == ["train"]


def test_a_choice_at_an_lr_edge_extends_the_grid(tmp_path):
    grid = load_grid(ROOT / "hparams" / "curves" / "benchmark.yaml")
    curve = Curve(grid, tmp_path)
    dev = {setting_tag(s): cer for s, cer in zip(curve.grid_points(), [52.5, 53.4, 63.1, 56.7])}
    points, chosen = curve.arm_grid(dev)  # lowest at lr 0.0005, the grid's lower edge
    assert chosen is None and points[-1] == {"lr": 0.00025, "spec_augment_prob": 0.0}
    dev[setting_tag(points[-1])] = 53.0  # worse: the choice is inside the LRs tried
    points, chosen = curve.arm_grid(dev)
    assert chosen == {"lr": 0.0005, "spec_augment_prob": 0.0} and len(points) == 5
    dev[setting_tag(points[-1])] = 50.0  # better: extended again, up to edge_extensions (2)
    points, chosen = curve.arm_grid(dev)
    assert chosen is None and points[-1]["lr"] == 0.000125
    dev[setting_tag(points[-1])] = 49.0
    points, chosen = curve.arm_grid(dev)
    assert chosen["lr"] == 0.000125 and len(points) == 6  # still at an edge: flagged, not run
    high = {setting_tag(s): cer for s, cer in zip(curve.grid_points(), [52.0, 51.6, 52.4, 51.0])}
    points, chosen = curve.arm_grid(high)
    assert chosen is None and points[-1] == {"lr": 0.004, "spec_augment_prob": 1.0}


def test_a_process_that_waited_skips_held_runs_again(tmp_path, monkeypatch):
    """Two copies side by side: a copy with nothing free blocks on the first run the other
    holds, and once that arrives goes on without blocking, rather than queue behind each."""
    grid = load_grid(ROOT / "hparams" / "curves" / "benchmark.yaml")
    grid["corpus"] = str(tmp_path)
    grid["fine_tune"].update(grid={"lr": [0.001], "spec_augment_prob": [0.0]}, edge_extensions=0)
    (tmp_path / "train_10min.csv").write_text("ID,duration,wav\na,600.0,a.wav\n")
    held = {1, 2}  # final runs the other copy trains; each is done once waited for
    calls = []

    class Fake(Curve):
        def fine_tune(self, name, encoder, size, arm, setting, seed, ssl_seed, extra=None,
                      wait=True):
            calls.append((seed, wait))
            if seed in held and not wait:
                return None
            held.discard(seed)
            return {"ctc_cer": 50.0, "cost": {}}

        def test(self, name, trained, wait=True):
            return {"contexts": []}

    monkeypatch.setattr("ssl_curve.summarize", lambda *args: [])
    Fake(grid, tmp_path, arms=("scratch",)).size_point("conformer", "train_10min")
    finals = [call for call in calls if call[0] != 0]
    assert finals[:3] == [(1, False), (2, False), (3, False)]  # 3 is free: no wait
    assert finals[3:6] == [(1, False), (2, False), (1, True)]  # nothing free: wait on 1
    assert finals[6] == (2, False)  # 1 arrived: 2 is skipped while held, not waited on
    assert finals[-1] == (2, True) and not held


def test_cost_summary_splits_by_kind_of_run():
    costs = {"conformer/ssl/seed1": {"cpu_seconds": 3600, "wall_seconds": 3700},
             "conformer/train_10min/scratch/lr0.0005_x/seed0": {"cpu_seconds": 1800,
                                                                "wall_seconds": 1900},
             "conformer/train_10min/ssl_ssl1/lr0.002_x/seed1": {"cpu_seconds": 900,
                                                                "wall_seconds": 1000},
             "conformer/train_10min/ssl_ssl1/lr0.002_x/seed1 (test)": {"cpu_seconds": 360,
                                                                       "wall_seconds": 400},
             "conformer/train/scratch/lr0.002_x/seed1": {"cpu_seconds": 720,
                                                         "wall_seconds": 800}}
    cost = cost_summary(costs, {"fine_tune": {"grid_seed": 0}, "topline": ["train"]})
    assert cost["cpu_hours_by_kind"] == {"conformer ssl": 1.0,
                                         "conformer scratch arm, grid runs": 0.5,
                                         "conformer ssl arm, final runs": 0.25,
                                         "conformer test decodes": 0.1,
                                         "conformer topline runs": 0.2}
    assert cost["runs"] == 4 and cost["test_decodes"] == 1 and cost["cpu_hours"] == 2.05
