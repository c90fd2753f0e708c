"""The SSL recipe run as a first GPU user runs it, for ``gpu_check.py``: dynamic batches over two
epochs, a run killed with SIGKILL after an intra-epoch checkpoint and resumed (validation every
epoch), and two processes under torchrun. Tiny Conformer, a slice of the shipped corpus."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import speechbrain as sb
import torch
import yaml
from speechbrain.dataio.dataset import DynamicItemDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "recipes")]
from train import make_train_loader  # noqa: E402

CORPUS = ROOT / "data" / "espeak_corpus"
TINY = ["--d_model", "32", "--nhead", "2", "--num_encoder_layers", "1", "--d_ffn", "64",
        "--subsampling_conv_channels", "8", "--num_classes", "32"]


def corpus_slice(name: str, rows: int, out: Path) -> str:
    """The first ``rows`` utterances of a shipped manifest, as a manifest of their own."""
    with open(CORPUS / f"{name}.csv") as f:
        lines = list(csv.reader(f))[: rows + 1]
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows(lines)
    return str(out)


def check_dynamic_batches(folder: Path) -> dict:
    """The CUDA preset's dynamic batches (``make_train_loader``, as the recipe builds them):
    epoch 2's batches differ from epoch 1's, over the same utterances."""
    dataset = DynamicItemDataset.from_csv(corpus_slice("train", 60, folder / "batches.csv"),
                                          replacements={"data_root": str(CORPUS)})
    dataset.set_output_keys(["id"])
    brain = sb.Brain(modules={}, run_opts={"device": "cpu", "noprogressbar": True})
    loader = make_train_loader(brain, dataset, {
        "seed": 1, "dynamic_batching": True, "max_batch_length": 20.0, "num_workers": 0})
    epochs = []
    for epoch in (1, 2):
        brain.train_sampler.set_epoch(epoch)
        epochs.append([tuple(batch.id) for batch in loader])
    same_utterances = sorted(sum(epochs[0], ())) == sorted(sum(epochs[1], ()))
    return {"batches": len(epochs[0]), "epochs_differ": epochs[0] != epochs[1],
            "passed": epochs[0] != epochs[1] and same_utterances}


def ssl_command(device: str, precision: str, folder: Path, name: str) -> list[str]:
    """Two epochs of 16 utterances in dynamic batches, a checkpoint after every step."""
    preset = "cuda" if device.startswith("cuda") else "cpu"
    return [sys.executable, str(ROOT / "recipes" / "train.py"),
            str(ROOT / "hparams" / "SSL" / "conformer.yaml"), "--device_preset", preset,
            "--device", device, "--precision", precision, "--data_folder", str(CORPUS),
            "--train_csv", corpus_slice("train", 16, folder / "train.csv"),
            "--valid_csv", corpus_slice("valid", 4, folder / "valid.csv"),
            "--output_folder", str(folder / name), *TINY, "--number_of_epochs", "2",
            "--dynamic_batching", "True", "--max_batch_length", "8", "--num_workers", "0",
            "--ckpt_interval_steps", "1", "--ckpt_interval_minutes", "0"]


def _mid_epoch_checkpoint(save: Path) -> bool:
    """Whether an intra-epoch checkpoint of epoch 1 past its second step is in ``save``."""
    for folder in save.glob("CKPT+*") if save.is_dir() else []:
        try:
            meta = yaml.safe_load((folder / "CKPT.yaml").read_text())
            step = yaml.safe_load((folder / "brain.ckpt").read_text())["step"]
            epoch = int((folder / "counter.ckpt").read_text())
        except (FileNotFoundError, TypeError, ValueError):
            continue  # being renamed into place
        if epoch == 1 and step >= 2 and not meta["end-of-epoch"]:
            return True
    return False


def check_kill_resume(device: str, precision: str, folder: Path) -> dict:
    """An uninterrupted run vs one killed (SIGKILL) after a mid-epoch checkpoint and run again:
    validation losses of both (bit for bit where the kernels are deterministic)."""
    reference = subprocess.run(ssl_command(device, precision, folder, "reference"),
                               capture_output=True, text=True, cwd=ROOT, timeout=600)
    if reference.returncode != 0:
        return {"passed": False, "error": reference.stderr[-2000:]}
    process = subprocess.Popen(ssl_command(device, precision, folder, "killed"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if _mid_epoch_checkpoint(folder / "killed" / "save"):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    if process.wait(timeout=60) != -signal.SIGKILL:
        return {"passed": False, "error": "the run ended before a mid-epoch checkpoint"}
    resumed = subprocess.run(ssl_command(device, precision, folder, "killed"),
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
    if resumed.returncode != 0:
        return {"passed": False, "error": resumed.stderr[-2000:]}
    expected, got = ([h["valid"]["loss"] for h in json.loads(
        (folder / name / "history.json").read_text())] for name in ("reference", "killed"))
    difference = max(abs(a - b) for a, b in zip(expected, got))
    return {"valid_losses": expected, "resumed_valid_losses": got,
            "max_difference": difference, "bit_for_bit": expected == got,
            "passed": len(got) == 2 and difference < 1e-3 * max(abs(v) for v in expected)}


def check_two_processes(device: str, precision: str, folder: Path) -> dict:
    """``torchrun --nproc_per_node=2`` on 2 GPUs (NCCL): one epoch, one summary line."""
    if not device.startswith("cuda") or torch.cuda.device_count() < 2:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return {"passed": True, "skipped": f"needs 2 CUDA GPUs, found {found}"}
    command = ssl_command("cuda", precision, folder, "two_processes")
    command[:2] = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
                   "--nproc_per_node=2", command[1]]
    command[command.index("--number_of_epochs") + 1] = "1"
    del command[command.index("--device"):command.index("--device") + 2]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    summary = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    passed = run.returncode == 0 and len(summary) == 1 and summary[0]["world_size"] == 2
    return {"passed": passed, **({} if passed else {"error": run.stderr[-2000:]})}
