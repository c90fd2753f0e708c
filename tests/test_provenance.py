"""recipes/provenance.py: the record of a run (with and without git), and the read-back that
refuses a result made by another run."""
import hashlib
import json
import os
import re

import pytest
import torch
from speechbrain.utils.checkpoints import Checkpointer

import provenance
from conftest import ROOT
from provenance import (check_result, hparams_data, hparams_differences, manifest_hashes,
                        run_record, write_result)

HPARAMS = str(ROOT / "hparams" / "CTC" / "conformer_small.yaml")
SHA1 = re.compile(r"[0-9a-f]{40}")


def fake_ssl_run(folder, losses=(2.0, 1.0)):
    """An SSL output folder with one checkpoint per valid loss; returns the best one's folder."""
    checkpointer = Checkpointer(folder / "save", {"encoder": torch.nn.Linear(2, 2)})
    saved = []
    for loss in losses:
        torch.nn.init.normal_(checkpointer.recoverables["encoder"].weight)
        saved.append(checkpointer.save_checkpoint(meta={"loss": loss}))
    return min(zip(losses, saved))[1].path


def test_run_record_fields(tmp_path):
    best = fake_ssl_run(tmp_path / "ssl")
    argv = [HPARAMS, "--lr_head", "0.001", "--pretrained_ssl", str(tmp_path / "ssl")]
    record = run_record(argv, HPARAMS, {"lr_head": 0.001, "output_folder": str(tmp_path / "o")},
                        str(tmp_path / "ssl"))
    assert SHA1.fullmatch(record["commit"]) and SHA1.fullmatch(record["code_commit"])
    assert isinstance(record["dirty"], bool) and record["cwd"] == os.getcwd()
    assert "logical CPUs" in record["machine"]  # CPU time is the cost on this CPU
    assert record["command"] == ["recipes/train.py", *argv]
    assert record["ssl_checkpoint"] == str(best.resolve())
    assert record["ssl_checkpoint_sha256"] == hashlib.sha256(
        (best / "encoder.ckpt").read_bytes()).hexdigest()
    other = run_record(argv, HPARAMS, {"lr_head": 0.002, "output_folder": str(tmp_path / "o")},
                       None)
    assert re.fullmatch(r"[0-9a-f]{64}", record["hparams_sha256"])
    assert other["hparams_sha256"] != record["hparams_sha256"]  # the resolved hparams differ
    assert other["ssl_checkpoint"] is None and other["ssl_checkpoint_sha256"] is None
    assert record["manifest_sha256"] == {}  # no manifest on its command line


def test_the_record_hashes_the_manifests_of_the_command(tmp_path):
    (tmp_path / "train.csv").write_text("ID,duration,wav\na,1.0,a.wav\n")
    argv = [HPARAMS, "--train_csv", str(tmp_path / "train.csv"),
            f"--valid_csv={tmp_path / 'absent.csv'}", "--lr_head", "0.001"]
    record = run_record(argv, HPARAMS, {"output_folder": str(tmp_path / "o")}, None)
    digest = hashlib.sha256((tmp_path / "train.csv").read_bytes()).hexdigest()
    assert record["manifest_sha256"] == {"--train_csv": digest, "--valid_csv": None}
    # relative paths from the given folder; an edited manifest has another hash
    assert manifest_hashes(["--train_csv", "train.csv"], tmp_path) == {"--train_csv": digest}
    (tmp_path / "train.csv").write_text("ID,duration,wav\nb,1.0,b.wav\n")
    assert manifest_hashes(["--train_csv", "train.csv"], tmp_path)["--train_csv"] != digest


@pytest.mark.parametrize("how", ["not a repository", "no git binary"])
def test_run_record_without_git(tmp_path, monkeypatch, how):
    if how == "not a repository":
        monkeypatch.setattr(provenance, "ROOT", tmp_path)
    else:
        monkeypatch.setenv("PATH", str(tmp_path))
    record = run_record([HPARAMS], HPARAMS, {}, None)
    assert record["commit"] is None and record["code_commit"] is None and record["dirty"] is None
    assert record["hparams_sha256"] and record["command"][-1] == HPARAMS


RECORD = {"commit": "a" * 40, "code_commit": "b" * 40, "dirty": False,
          "command": ["recipes/train.py", "hparams/CTC/conformer_small.yaml", "--seed", "1"],
          "hparams_sha256": "c" * 64, "ssl_checkpoint": "/x/CKPT+1",
          "ssl_checkpoint_sha256": "d" * 64}
EXPECTED = {key: RECORD[key] for key in ("command", "code_commit", "ssl_checkpoint_sha256")}


def test_a_matching_result_is_read_back(tmp_path):
    path = tmp_path / "cell" / "result.json"
    assert check_result(path, EXPECTED) is None  # not there yet
    path.parent.mkdir()
    write_result(path, {"test_cer": 40.0}, RECORD)
    assert json.loads(path.read_text()) == {"test_cer": 40.0, "record": RECORD}
    assert not list(path.parent.glob("*.partial"))
    assert check_result(path, EXPECTED)["test_cer"] == 40.0
    # the commit of a README change (HEAD) and the rest of the record are not compared
    assert check_result(path, {**EXPECTED, "dirty": False})["test_cer"] == 40.0


@pytest.mark.parametrize("field, value", [
    ("command", ["recipes/train.py", "hparams/CTC/conformer_small.yaml", "--seed", "2"]),
    ("code_commit", "e" * 40), ("ssl_checkpoint_sha256", "f" * 64),
    ("ssl_checkpoint_sha256", None)])
def test_a_result_of_another_run_is_refused(tmp_path, field, value):
    path = tmp_path / "cell" / "result.json"
    path.parent.mkdir()
    write_result(path, {"test_cer": 40.0}, RECORD)
    with pytest.raises(SystemExit) as refused:
        check_result(path, {**EXPECTED, field: value})
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and f"{field} found" in message
    assert f"delete {path.parent}" in message


def test_a_result_without_record_is_refused(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"test_cer": 40.0}))
    with pytest.raises(SystemExit, match="no record"):
        check_result(path, EXPECTED)


def test_hparams_differences_name_the_keys():
    saved = hparams_data("lr_head: 0.002\nseed: 1\nopt: !name:torch.optim.AdamW\n    lr: 0.002\n")
    new = hparams_data("lr_head: 0.001\nseed: 1\nopt: !name:torch.optim.AdamW\n    lr: 0.001\n")
    assert hparams_differences(saved, new) == ["lr_head (0.002 -> 0.001)", "opt"]
    assert hparams_differences(saved, saved) == []


def test_a_run_is_not_resumed_with_other_code(tmp_path, monkeypatch):
    """Same hparams but another code commit: refused; the same commit: resumed."""
    out = tmp_path / "run"
    (out / "save" / "CKPT+x").mkdir(parents=True)
    text = f"output_folder: {out}\nsave_folder: {out / 'save'}\nlr: 0.001\n"
    (out / "hyperparams.yaml").write_text(text)
    (out / "run_record.json").write_text(json.dumps({"code_commit": "a" * 40}))
    monkeypatch.setattr(provenance, "current_code_commit", lambda: "b" * 40)
    with pytest.raises(SystemExit, match="code commit aaaaaaaaaaaa"):
        provenance.check_resume(text)
    monkeypatch.setattr(provenance, "current_code_commit", lambda: "a" * 40)
    assert provenance.check_resume(text) is True
