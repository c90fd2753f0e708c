"""A newcomer's first hour with ``train.py`` (issue 18): one-line errors, scoring that ignores the
references' case, fine-tuning that takes the SSL run's sizes, ``--help`` with the recipe's
options, and no third-party noise."""
import csv
import subprocess
import sys

import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch

from conftest import ROOT
from test_ctc import CTC_TINY, recipe_brain
from test_recipe import CORPUS, slice_csv

CTC = ROOT / "hparams" / "CTC" / "conformer_small.yaml"


def train(tmp_path, *extra, hparams=CTC):
    """``train.py`` on 4 training / 2 valid / 2 test utterances (tiny sizes)."""
    command = [sys.executable, str(ROOT / "recipes" / "train.py"), str(hparams),
               "--data_folder", str(CORPUS), "--output_folder", str(tmp_path / "out"),
               "--train_csv", slice_csv("train", 4, tmp_path / "train.csv"),
               "--valid_csv", slice_csv("valid", 2, tmp_path / "valid.csv"),
               "--test_csv", slice_csv("test", 2, tmp_path / "test.csv"), *CTC_TINY, *extra]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


def assert_one_error_line(run, *words):
    """Failed, with one ``error:`` line holding ``words`` and no traceback."""
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr[-3000:]
    assert all(word in errors[0] for word in words), errors[0]
    assert "torchvision" not in run.stderr


def write_csv(path, header, rows=()):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return str(path)


def test_ctc_csv_without_wrd_is_one_line(tmp_path):
    with open(CORPUS / "valid.csv") as f:
        rows = [row[:-1] for row in list(csv.reader(f))[1:3]]  # wrd is the last column
    manifest = write_csv(tmp_path / "no_wrd.csv", ["ID", "duration", "wav", "spk_id"], rows)
    assert_one_error_line(train(tmp_path, "--valid_csv", manifest), "--valid_csv", "wrd")


def test_header_only_csv_is_one_line(tmp_path):
    manifest = write_csv(tmp_path / "empty.csv", ["ID", "duration", "wav", "spk_id", "wrd"])
    assert_one_error_line(train(tmp_path, "--train_csv", manifest), "--train_csv", "no entries")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_gpu_is_one_line(tmp_path):
    assert_one_error_line(train(tmp_path, "--device", "cuda"), "--device cuda", "--device cpu")


def fake_ssl_run(folder, **sizes):
    """An SSL run folder's hyperparams.yaml (all that the sizes are read from)."""
    folder.mkdir()
    text = (ROOT / "hparams" / "SSL" / "conformer.yaml").read_text()
    for key, value in sizes.items():
        text = text.replace(f"\n{key}: ", f"\n{key}: {value}  # was ", 1)
    (folder / "hyperparams.yaml").write_text(text)
    return folder


def test_fine_tuning_takes_the_ssl_runs_sizes(tmp_path):
    from command_line import ssl_encoder_sizes

    ssl = fake_ssl_run(tmp_path / "ssl", d_model=48, num_encoder_layers=3, dropout=0.3)
    overrides, note = ssl_encoder_sizes(str(CTC), {"pretrained_ssl": str(ssl), "nhead": 4},
                                        {"pretrained_ssl", "nhead"})
    assert overrides["d_model"] == 48 and overrides["num_encoder_layers"] == 3
    assert overrides["d_ffn"] == 576 and overrides["nhead"] == 4  # given, equal: kept
    assert "dropout" not in overrides and "d_model=48" in note  # no shape: the run's own
    assert ssl_encoder_sizes(str(CTC), {"pretrained_ssl": None}, set()) == (
        {"pretrained_ssl": None}, "")


def test_fine_tuning_with_other_sizes_is_one_line(tmp_path):
    ssl = fake_ssl_run(tmp_path / "ssl", d_model=48)
    run = train(tmp_path, "--pretrained_ssl", str(ssl))  # CTC_TINY gives --d_model 32
    assert_one_error_line(run, "--pretrained_ssl", "--d_model 32 (it has 48)")


def test_help_lists_the_recipes_options(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), str(CTC), "--help"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "--debug" in run.stdout  # SpeechBrain's flags, then the recipe's
    for line in ("--device_preset {auto,cpu,cuda,mps}", "--lr_encoder 0.0004",
                 "encoder peak LR", "--pretrained_ssl null", "--valid_context medium"):
        assert line in run.stdout
    assert "torchvision" not in run.stdout + run.stderr


def scored(brain, batch, references):
    """Valid CER and WER of ``brain`` decoding ``batch`` as the uppercase ``batch.wrd`` (with a
    stray trailing space), scored against ``references``."""
    texts = [f"{text} " for text in batch.wrd]
    brain.decode = lambda log_probs, lengths, stage: texts
    items = [{"id": i, "sig": s, "wrd": w, "tokens": t} for i, s, w, t in zip(
        batch.id, batch.sig[0], references, batch.tokens[0])]
    brain.on_stage_start(sb.Stage.VALID, 1)
    with torch.no_grad():
        brain.compute_objectives(brain.compute_forward(batch, sb.Stage.VALID),
                                 PaddedBatch(items), sb.Stage.VALID)
    return brain.cer_metric.summarize("error_rate"), brain.wer_metric.summarize("error_rate")


def test_lowercase_references_score_as_uppercase(tmp_path, caplog):
    brain, batch = recipe_brain(tmp_path)
    assert scored(brain, batch, batch.wrd) == (0.0, 0.0)
    assert scored(brain, batch, [f"  {w.lower()} " for w in batch.wrd]) == (0.0, 0.0)
    assert not brain.unknown_characters
    with caplog.at_level("WARNING"):
        cer, _ = scored(brain, batch, [f"{w} É" for w in batch.wrd])
        brain.warn_unknown_characters(sb.Stage.VALID)
    assert cer > 0 and caplog.text.count("outside the tokenizer's vocabulary ('É')") == 1


def test_debug_schedule_counts_the_debug_steps(tmp_path, caplog):
    """--debug runs debug_batches batches of debug_epochs epochs: the schedule (and its log
    line) is planned for those steps, not for the full run's."""
    brain, _ = recipe_brain(tmp_path, number_of_epochs=100)
    brain.debug, brain.debug_batches, brain.debug_epochs = True, 2, 2
    with caplog.at_level("INFO"):
        brain.plan_schedule(1000)
    assert brain.hparams.lr_annealing["head"].num_training_steps == 4
    assert "Fine-tuning: 4 optimizer steps" in caplog.text
