"""The SSL recipe end to end on a slice of the shipped corpus: JSON summary, resume, bad audio."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT
from modules.selective_scan import compiled_scan_available

CORPUS = ROOT / "data" / "espeak_corpus"
TINY = ["--d_model", "32", "--nhead", "2", "--num_encoder_layers", "1", "--d_ffn", "64",
        "--subsampling_conv_channels", "4", "--num_classes", "32", "--batch_size", "4",
        "--warmup_steps", "2", "--device_preset", "cpu"]
CONMAMBA_TINY = [a for i, a in enumerate(TINY) if "--nhead" not in TINY[max(i - 1, 0):i + 1]] + [
    "--d_state", "4"]


def slice_csv(name, rows, out):
    with open(CORPUS / f"{name}.csv") as f:
        reader = list(csv.reader(f))
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows(reader[: rows + 1])
    return str(out)


def train(tmp_path, *extra, hparams="conformer.yaml", tiny=TINY):
    command = [sys.executable, str(ROOT / "recipes" / "train.py"),
               str(ROOT / "hparams" / "SSL" / hparams),
               "--data_folder", str(CORPUS), "--output_folder", str(tmp_path / "out"),
               "--train_csv", slice_csv("train", 8, tmp_path / "train.csv"),
               "--valid_csv", slice_csv("valid", 4, tmp_path / "valid.csv"), *tiny, *extra]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_ssl_recipe_runs_and_resumes(tmp_path):
    """A run stopped after its first epoch (8 utterances in batches of 4: 2 steps an epoch) is
    resumed by the same command; the same folder under other hparams is refused, untouched."""
    run = train(tmp_path, "--number_of_epochs", "2", "--optimizer_step_limit", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    for key in ("ssl_valid_loss_first", "ssl_valid_loss_last", "ssl_masked_acc",
                "train_seconds", "output_folder"):
        assert key in summary
    assert summary["epochs"] == 1 and np.isfinite(summary["ssl_valid_loss_last"])
    assert summary["train_audio_seconds"] > 0 and summary["train_stage_seconds"] > 0
    record = json.loads((tmp_path / "out" / "run_record.json").read_text())
    assert summary["record"] == record and record["ssl_checkpoint"] is None
    hparams_file = str(ROOT / "hparams" / "SSL" / "conformer.yaml")
    assert record["command"][:2] == ["recipes/train.py", hparams_file]
    assert record["command"][-2:] == ["--optimizer_step_limit", "2"]
    log = (tmp_path / "out" / "train_log.txt").read_text()
    assert "contexts_drawn" in log and " s, chunk " in log  # contexts logged in seconds
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    for stats in (history[0]["train"], history[0]["valid"]):  # what masking really did
        assert 0.1 < stats["masked_fraction"] < 0.6 and 0 <= stats["masked_seeing_future"] <= 1
    saved = tmp_path / "out" / "hyperparams.yaml"
    written = (saved.read_text(), saved.stat().st_mtime_ns)

    changed = train(tmp_path, "--number_of_epochs", "3", "--lr", "0.001")
    assert changed.returncode != 0 and "Traceback" not in changed.stderr
    error = changed.stderr.strip().splitlines()[-1]
    assert "number_of_epochs (2 -> 3)" in error and "lr (0.0005 -> 0.001)" in error
    assert "another --output_folder" in error
    assert (saved.read_text(), saved.stat().st_mtime_ns) == written

    resumed = train(tmp_path, "--number_of_epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Loading a checkpoint" in resumed.stdout + resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 2
    assert summary["ssl_valid_loss_first"] == json.loads(run.stdout.strip().splitlines()[-1])[
        "ssl_valid_loss_first"]
    assert (saved.read_text(), saved.stat().st_mtime_ns) == written  # not rewritten


def test_ssl_recipe_debug_with_denoising_and_nemo_manifest(tmp_path):
    rows = list(csv.DictReader(open(CORPUS / "train.csv")))[:8]
    manifest = tmp_path / "train.json"
    manifest.write_text("".join(json.dumps({
        "audio_filepath": str(CORPUS / r["wav"].replace("$data_root/", "")),
        "duration": float(r["duration"]), "text": r["wrd"]}) + "\n" for r in rows))
    run = train(tmp_path, "--debug", "--denoising", "True", "--train_csv", str(manifest),
                "--att_context_size", "[[4, 0], unlimited]", "--att_context_probs", "[0.5, 0.5]")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 2 and "temporary" in summary["checkpoints"]  # none kept


@pytest.mark.parametrize("kind", ["stereo", "nan"])
def test_bad_audio_in_manifest_stops_with_a_clear_message(tmp_path, kind):
    """Stereo is caught by the check before training; NaN samples when the file is read."""
    bad = tmp_path / f"{kind}.wav"
    if kind == "stereo":
        sf.write(bad, np.zeros((16000, 2)), 16000)
    else:
        audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
        audio[500] = np.nan
        sf.write(bad, audio, 16000, subtype="FLOAT")
    train_csv = slice_csv("train", 4, tmp_path / "bad_train.csv")
    with open(train_csv, "a", newline="") as f:
        csv.writer(f).writerow(["bad", "1.0", str(bad), "spk", "X"])
    run = train(tmp_path, "--train_csv", train_csv, "--number_of_epochs", "1")
    assert run.returncode != 0
    assert str(bad) in run.stderr
    assert ("2 channels" if kind == "stereo" else "NaN") in run.stderr
    assert "Traceback" not in run.stderr


def test_bad_hparams_value_is_reported(tmp_path):
    run = train(tmp_path, "--debug", "--att_context_probs", "[0.5, 0.6]",
                "--att_context_size", "[[4, 0], [8, 1]]")
    assert run.returncode != 0 and "sum to 1" in run.stderr and "Traceback" not in run.stderr


def test_ssl_recipe_trains_conmamba_unchanged(tmp_path):
    run = train(tmp_path, "--debug", hparams="conmamba.yaml", tiny=CONMAMBA_TINY)  # backend auto
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 2 and np.isfinite(summary["ssl_valid_loss_last"])
    backend = "compiled CPU scan" if compiled_scan_available("cpu") else "chunked scan"
    assert f"Mamba scan backend: {backend}" in run.stdout + run.stderr
