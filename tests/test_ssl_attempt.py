"""recipes/ssl_attempt.py on a tiny corpus: one SSL run with snapshots at two epochs, each
fine-tuned as the curve's SSL arm, a scratch row, dev CER only; and a rerun that reads back."""
import json
import subprocess
import sys

import yaml

from conftest import ROOT
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
