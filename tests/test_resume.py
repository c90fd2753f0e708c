"""Preemption: a kill -9 in the middle of an epoch loses at most one checkpoint interval, and the
same command resumes with the same sampler, data order and random draws, ending exactly where an
uninterrupted run ends (its CPU time counting both processes); a kill while a checkpoint is
written leaves the previous one newest."""
import json
import subprocess
import sys
import textwrap
import time

import torch
import yaml

from conftest import ROOT
from modules.checkpointing import AtomicCheckpointer
from test_recipe import CORPUS, TINY, slice_csv

# 16 utterances in batches of 2: 8 steps per epoch, a checkpoint after every step.
ARGS = TINY + ["--number_of_epochs", "2", "--batch_size", "2", "--ckpt_interval_steps", "1",
               "--ckpt_interval_minutes", "0"]


def ssl_command(tmp_path, name):
    return [sys.executable, str(ROOT / "recipes" / "train.py"),
            str(ROOT / "hparams" / "SSL" / "conformer.yaml"), "--data_folder", str(CORPUS),
            "--output_folder", str(tmp_path / name),
            "--train_csv", slice_csv("train", 16, tmp_path / "train.csv"),
            "--valid_csv", slice_csv("valid", 4, tmp_path / "valid.csv"), *ARGS]


def checkpoint_position(folder):
    """(epoch, step, end_of_epoch) of a checkpoint folder, or None while it is being replaced."""
    try:
        meta = yaml.safe_load((folder / "CKPT.yaml").read_text())
        step = yaml.safe_load((folder / "brain.ckpt").read_text())["step"]
        epoch = int((folder / "counter.ckpt").read_text())
    except (FileNotFoundError, TypeError, ValueError):
        return None
    return epoch, step, meta["end-of-epoch"]


def newest_checkpoint(save):
    return AtomicCheckpointer(save).find_checkpoint().path  # by the time in its meta file


def test_kill_9_mid_epoch_resumes_exactly(tmp_path):
    reference = subprocess.run(ssl_command(tmp_path, "reference"), capture_output=True,
                               text=True, cwd=ROOT, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    process = subprocess.Popen(ssl_command(tmp_path, "killed"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    save = tmp_path / "killed" / "save"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a mid-epoch checkpoint of epoch 1 is past step 3
        positions = [checkpoint_position(f) for f in save.glob("CKPT+*")] if save.is_dir() else []
        if any(p and p[0] == 1 and p[1] >= 3 and not p[2] for p in positions):
            process.kill()  # SIGKILL
            break
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    assert process.wait(timeout=60) == -9
    killed_at = newest_checkpoint(save)
    epoch, step, end_of_epoch = checkpoint_position(killed_at)
    assert epoch == 1 and not end_of_epoch and 3 <= step < 8
    killed_cpu = json.loads((killed_at / "cpu_seconds.ckpt").read_text())["cpu_seconds"]

    resumed = subprocess.run(ssl_command(tmp_path, "killed"), capture_output=True, text=True,
                             cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Loading a checkpoint from {killed_at}" in resumed.stdout + resumed.stderr
    expected, got = (json.loads((tmp_path / name / "history.json").read_text())
                     for name in ("reference", "killed"))
    assert [h["valid"] for h in got] == [h["valid"] for h in expected]  # bit for bit
    # The run's CPU time counts the killed process to its last checkpoint, then the resumed one.
    first, resumed_summary = (json.loads(run.stdout.strip().splitlines()[-1])
                              for run in (reference, resumed))
    assert first["cpu_seconds_before_resume"] == 0 < first["cpu_seconds"]
    assert resumed_summary["cpu_seconds_before_resume"] == round(killed_cpu, 1) > 0
    assert resumed_summary["cpu_seconds"] > resumed_summary["cpu_seconds_before_resume"]


KILLED_WHILE_SAVING = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, {root!r})
    from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks
    from modules import checkpointing as checkpoint_module
    from modules.checkpointing import AtomicCheckpointer

    @register_checkpoint_hooks
    class DiesWhileSaving:
        armed = False

        @mark_as_saver
        def _save(self, path):
            open(path, "w").write("half written")
            if self.armed:
                os.kill(os.getpid(), signal.SIGKILL)

        @mark_as_loader
        def _load(self, path, end_of_epoch):
            pass

    model, dies = torch.nn.Linear(3, 3), DiesWhileSaving()
    checkpointer = AtomicCheckpointer(sys.argv[1], {{"model": model, "zz_dies": dies}})
    checkpointer.save_checkpoint(meta={{"n": 1}})
    if sys.argv[2] == "deleting":  # killed once the old folder is out of the listing
        checkpoint_module.shutil.rmtree = lambda path: os.kill(os.getpid(), signal.SIGKILL)
        checkpointer.save_and_keep_only(meta={{"n": 2}}, num_to_keep=1)
    with torch.no_grad():
        model.weight += 1
    dies.armed = True
    checkpointer.save_checkpoint(meta={{"n": 2}})  # killed after model.ckpt is written
""")


def test_kill_while_saving_keeps_the_previous_checkpoint_newest(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(KILLED_WHILE_SAVING.format(root=str(ROOT)))
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "save"), "saving"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr[-2000:]
    partial = list((tmp_path / "save").glob(".partial-CKPT+*"))
    assert len(partial) == 1 and (partial[0] / "model.ckpt").is_file()  # the interrupted save

    model = torch.nn.Linear(3, 3)
    checkpointer = AtomicCheckpointer(tmp_path / "save", {"model": model})
    assert [c.meta["n"] for c in checkpointer.list_checkpoints()] == [1]
    loaded = checkpointer.recover_if_possible()
    first = torch.load(loaded.paramfiles["model"])
    assert all(torch.equal(v, first[k]) for k, v in model.state_dict().items())
    checkpointer.save_checkpoint(meta={"n": 3})  # the next save clears the leftover
    assert not list((tmp_path / "save").glob(".partial-*"))
    assert sorted(c.meta["n"] for c in checkpointer.list_checkpoints()) == [1, 3]


def test_kill_while_deleting_leaves_no_checkpoint_with_missing_files(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(KILLED_WHILE_SAVING.format(root=str(ROOT)))
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "save"), "deleting"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr[-2000:]
    checkpoints = AtomicCheckpointer(tmp_path / "save").list_checkpoints()
    assert [c.meta["n"] for c in checkpoints] == [2]  # the old one is out of the listing
    assert set(checkpoints[0].paramfiles) == {"model", "zz_dies"}
