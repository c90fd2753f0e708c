"""The GPU check and the throughput and activation checkpointing benchmarks run end to end (on
the CPU, tiny models): their JSON contract, not their timings."""
import json
import subprocess
import sys

import torch

from conftest import ROOT


def run_script(*args):
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_gpu_check_script_runs_its_checks():
    report = run_script("benchmarks/gpu_check.py", "--device", "cpu", "--quick")
    assert report["passed"] and report["quantizer"]["changed_fraction"] == 0.0
    assert not report["fused"]["available"]  # no CUDA here: reported, not guessed
    assert {r["encoder"] for r in report["streaming"]["rows"]} == {"conformer", "conmamba"}
    steps = report["steps"]["rows"]
    assert {(r["task"], r["encoder"]) for r in steps} == {
        (task, encoder) for task in ("SSL", "CTC") for encoder in ("conformer", "conmamba")}
    assert {r["context"] for r in steps} == {"very_low", "low", "medium", "high", "unlimited"}
    assert all(len(r["losses"]) == 3 and r["step_seconds"] > 0 for r in steps)
    assert [r["seconds_per_utterance"] for r in report["steps"]["scaling"]] == [2, 4, 2, 4]
    assert report["precision"] == "bf16" and report["streaming"]["tf32"] is False
    assert report["windowed_bf16"]["passed"] and report["dynamic_batches"]["epochs_differ"]
    assert report["kill_resume"]["bit_for_bit"]  # on the CPU, deterministic kernels
    assert "skipped" in report["two_processes"] and "skipped" in report["syncs"]


def test_throughput_rows():
    report = run_script("benchmarks/throughput.py", "--steps", "1", "--batch_size", "2",
                        "--seconds", "3", "--contexts", "very_low", "unlimited",
                        "--override", "d_model=32", "--override", "nhead=2",
                        "--override", "num_encoder_layers=1", "--override", "d_ffn=64")
    assert [(r["encoder"], r["context"]) for r in report["rows"]] == [
        ("conformer", "very_low"), ("conformer", "unlimited"),
        ("conmamba", "very_low"), ("conmamba", "unlimited")]
    assert all(r["audio_seconds_per_second"] > 0 and r["batch_audio_seconds"] >= 6
               for r in report["rows"])


def test_activation_checkpointing_rows():
    run = subprocess.run([sys.executable, "benchmarks/activation_checkpointing.py", "--quick",
                          "--encoders", "conformer", "--seconds", "2", "--repeats", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.strip().splitlines()]
    assert [(r["encoder"], r["seconds"]) for r in rows] == [("conformer", 2)]
    row = rows[0]
    assert row["step_seconds_off"] > 0 and row["step_seconds_on"] > 0
    assert row["peak_mib_off"] > 0 and row["peak_mib_on"] > 0
    assert abs(row["time_ratio"] * row["step_seconds_off"] / row["step_seconds_on"] - 1) < 0.02


def test_windowed_bf16_check_catches_a_bf16_subtraction(monkeypatch):
    """The check fails where the window correction is subtracted from a bf16-rounded scan."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check
    from modules import mamba

    assert gpu_check.check_windowed_bf16("cpu")["passed"]
    windowed_scan = mamba.Mamba._windowed_scan

    def rounded_before_subtraction(self, u, delta, B, C, left, chunk, compiled):
        out = windowed_scan(self, u, delta, B, C, left, chunk, compiled)
        if u.dtype != torch.bfloat16:
            return out
        full = mamba.selective_scan(u.float(), delta, self._A(), B, C)[0]
        return (full.to(torch.bfloat16).float() - (full - out.float())).to(u.dtype)

    monkeypatch.setattr(mamba.Mamba, "_windowed_scan", rounded_before_subtraction)
    assert not gpu_check.check_windowed_bf16("cpu")["passed"]
