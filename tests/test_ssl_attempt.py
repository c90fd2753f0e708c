"""recipes/ssl_attempt.py on a tiny corpus: one SSL run with snapshots at two epochs, each
fine-tuned as the curve's SSL arm, a scratch row, dev CER only; and a rerun that reads back."""
import csv
import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from ssl_attempt import Attempt
from test_ssl_curve import TINY, tiny_benchmark


def test_attempt_snapshots_each_epoch_and_fine_tunes_it(tmp_path):
    grid = {"corpus": str(tiny_benchmark(tmp_path / "corpus")),
            "output_folder": str(tmp_path / "unused"),
            "encoders": {"conformer": ["train_small"]},
            "ssl": {"hparams": "hparams/SSL/{encoder}.yaml", "seeds": [1],
                    "overrides": {**TINY, "num_classes": 32, "number_of_epochs": 1}},
            "steps": {"train_small": 2}, "validations": 1,
            "fine_tune": {"hparams": "hparams/CTC/{encoder}_small.yaml", "batch_size": 4,
                          "grid_seed": 0, "seeds": [1], "grid": {"lr": [0.001],
                                                                 "spec_augment_prob": [0.0]},
                          "overrides": {"beam_size": 1}},
            "arms": {"ssl": {"head_only_fraction": 0.5}, "scratch": {"head_only_fraction": 0.0}},
            "test_contexts": ["very_low"], "probe_layers": [], "bootstrap_resamples": 10}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    command = [sys.executable, str(ROOT / "recipes" / "ssl_attempt.py"), str(path), "--name", "a",
               "--output_folder", str(tmp_path / "out"), "--size", "train_small",
               "--ssl_overrides", "number_of_epochs=2", "--snapshot_epochs", "1", "2",
               "--settings", "lr=0.001,spec_augment_prob=0.0,lr_encoder=0.0005",
               "--scratch", "lr=0.001,spec_augment_prob=0.0"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = tmp_path / "out" / "a"
    report = json.loads((folder / "attempt.json").read_text())
    assert [(r["arm"], r["snapshot"]) for r in report["rows"]] == [
        ("scratch", None), ("ssl", "ssl1_epoch1"), ("ssl", "ssl1_epoch2")]
    assert report["ssl_overrides"] == {"number_of_epochs": 2}  # as asked
    # what made each figure: the runs' records, the SSL run's history, the machine
    assert all("recipes/train.py" in row["record"]["command"] for row in report["rows"])
    assert "--seed" in report["ssl_run_record"]["command"]
    assert [e["epoch"] for e in report["ssl_history"]] == [1, 2]
    assert "torch" in report["machine"]
    snapshots = folder / "conformer" / "ssl" / "seed1" / "snapshots"
    counters = [(c / "counter.ckpt").read_text().strip()
                for e in (1, 2) for c in (snapshots / f"epoch{e}" / "save").glob("CKPT+*")]
    assert counters == ["1", "2"]
    # each SSL row was fine-tuned from its own snapshot
    for row, epoch in zip(report["rows"][1:], (1, 2)):
        record = json.loads((folder / row["run"] / "result.json").read_text())
        command_line = " ".join(record["record"]["command"])
        assert f"snapshots/epoch{epoch}" in command_line
        assert "--lr_encoder 0.0005 --lr_head 0.001" in command_line  # a peak set apart
    rerun = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "recipes/train.py" not in rerun.stdout  # all read back, nothing retrained


def write_manifest(path, ids):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"])
        writer.writerows([i, "1.0", f"$data_root/{i}.flac", i[:2], "SOME WORDS"] for i in ids)


def test_ssl_manifests_join_partitions_as_audio_only(tmp_path, monkeypatch):
    """``--ssl_manifests``: the SSL run pretrains on the named partitions, transcripts dropped."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_manifest(corpus / "unlabeled_train.csv", ["un-0", "un-1"])
    write_manifest(corpus / "train.csv", ["tr-0"])
    grid = {"corpus": str(corpus), "ssl": {"hparams": "hparams/SSL/{encoder}.yaml", "seeds": [1],
                                           "overrides": {"number_of_epochs": 4}}}
    attempt = Attempt(grid, tmp_path / "a", {}, [4], {}, ["unlabeled_train", "train"])
    with open(attempt.ssl_train_csv) as f:
        rows = list(csv.DictReader(f))
    assert [r["ID"] for r in rows] == ["un-0", "un-1", "tr-0"]
    assert {r["wrd"] for r in rows} == {""}
    commands = []
    monkeypatch.setattr(Attempt, "_run", lambda self, name, script, args, *rest: commands.append(
        args) or {"output_folder": "x"})
    attempt.ssl("conformer", 1)
    assert commands[0][commands[0].index("--train_csv") + 1].endswith("a/manifests/ssl_train.csv")
    # the default is the curve's unlabeled partition
    default = Attempt(grid, tmp_path / "b", {}, [4], {})
    assert default.ssl_train_csv == corpus / "unlabeled_train.csv"


def test_ssl_manifests_refuse_a_missing_scoring_or_overlapping_partition(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_manifest(corpus / "unlabeled_train.csv", ["un-0"])
    write_manifest(corpus / "copy.csv", ["un-0"])
    grid = {"corpus": str(corpus), "ssl": {"hparams": "x", "seeds": [1], "overrides": {}}}
    with pytest.raises(SystemExit, match="no .*trian.csv"):
        Attempt(grid, tmp_path / "a", {}, [1], {}, ["unlabeled_train", "trian"])
    with pytest.raises(SystemExit, match="dev is for scoring"):
        Attempt(grid, tmp_path / "a", {}, [1], {}, ["unlabeled_train", "dev"])
    with pytest.raises(SystemExit, match="share utterance IDs"):
        Attempt(grid, tmp_path / "a", {}, [1], {}, ["unlabeled_train", "copy"])
