"""recipes/ablate.py: a grid end to end (submitit's local executor, the Slurm launcher's code
path), resume, a stale result refused, a failing cell, the table's columns, equalized parameter
counts, each cell validated at a context it trains on, bad grid files."""
import csv
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from ablate import (
    build_encoder,
    cell_plan,
    cells_of,
    encoder_sizes,
    load_grid,
    parameter_count,
    widest_context,
)
from conftest import ROOT
from modules.context import parse_context
from provenance import current_code_commit
from test_recipe import CORPUS, slice_csv

GRID = {"encoders": ["conformer", "transformer"], "context_sets": {"low": ["low"]},
        "sizes": {"tiny": {"d_model": 32, "nhead": 2, "num_encoder_layers": 1, "d_ffn": 64,
                           "kernel_size": 5, "subsampling_conv_channels": 4}},
        "ssl_epochs": 1, "ctc_epochs": 1, "batch_size": 4,
        "ssl_overrides": {"num_classes": 32},
        "ctc_overrides": {"vocab_size": 26, "beam_size": 2}, "step_time_seconds": [1, 2]}


def tiny_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "audio").symlink_to(CORPUS / "audio")
    for split, rows in (("train", 8), ("valid", 4), ("test", 4)):
        slice_csv(split, rows, corpus / f"{split}.csv")
    return corpus


def ablate(tmp_path, grid, *extra):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    command = [sys.executable, str(ROOT / "recipes" / "ablate.py"), str(path),
               "--output_folder", str(tmp_path / "out"), *extra]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    return run, json.loads(run.stdout.strip().splitlines()[-1])


def test_grid_end_to_end_resume_and_a_failing_cell(tmp_path):
    grid = {**GRID, "data_folder": str(tiny_corpus(tmp_path))}
    run, report = ablate(tmp_path, grid, "--launcher", "submitit-local")
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    out = tmp_path / "out"
    assert [c["cell"] for c in report["cells"]] == ["conformer-low-tiny", "transformer-low-tiny"]
    assert not report["failed"]
    with open(out / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    contexts = ["[8, 0]", "[16, 1]", "[32, 3]", "[64, 7]", "[-1, -1]"]
    expected = {"cell", "parameters", "valid_context", "train_audio_per_second", "peak_memory_mb",
                "test_cer", "test_wer", "step_s 1s", "step_s 2s"} | {
        f"{metric} {c}" for c in contexts for metric in (
            "cer", "wer", "rtf_evaluate_batched", "rtf_benchmark_stream", "chunk_plus_compute_ms")}
    assert expected <= set(rows[0]), expected - set(rows[0])
    for row in rows:
        assert float(row["cer [16, 1]"]) >= 0 and float(row["chunk_plus_compute_ms [16, 1]"]) > 80
        assert row["chunk_plus_compute_ms [-1, -1]"] == ""  # offline: no chunk latency
        assert row["rtf_benchmark_stream [-1, -1]"] == ""  # no stream benchmark offline
        assert float(row["rtf_evaluate_batched [-1, -1]"]) > 0
        assert float(row["rtf_benchmark_stream [16, 1]"]) > 0
        assert float(row["peak_memory_mb"]) > 0 and float(row["step_s 2s"]) > 0
        assert float(row["train_audio_per_second"]) > 0
        assert row["valid_context"] == "[16, 1]"  # the cell trains at "low" only: validated there
    for name in ("ablation.md", "cer_vs_latency.png", "step_time_vs_length.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "ablation.md").read_text()
    for label in ("chunk + measured compute ms [16, 1]", "RTF (evaluate.py, batched) [-1, -1]",
                  "RTF (transcribe.py --mode benchmark, one stream) [16, 1]",
                  "train audio s/s (training stages only)"):
        assert label in table, label
    cell = out / "conformer-low-tiny"
    assert "valid_context: low" in (cell / "ctc" / "hyperparams.yaml").read_text()
    # each result records the CTC run that made it (train.py's summary)
    result = json.loads((cell / "result.json").read_text())
    assert result["record"]["command"][:2] == ["recipes/train.py",
                                               "hparams/CTC/conformer_small.yaml"]
    assert result["record"]["code_commit"] == current_code_commit()
    ssl_encoder = next((cell / "ssl" / "save").glob("CKPT+*")) / "encoder.ckpt"
    assert result["record"]["ssl_checkpoint_sha256"] == hashlib.sha256(
        ssl_encoder.read_bytes()).hexdigest()
    # each cell really trained its own encoder: SSL and CTC outputs, the transformer's yaml
    saved = (out / "transformer-low-tiny" / "ctc" / "hyperparams.yaml").read_text()
    assert "modules.transformer.CausalTransformerEncoder" in saved
    assert (out / "conformer-low-tiny" / "ssl" / "history.json").is_file()

    # resume: finished cells are read back, not rerun
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    run, again = ablate(tmp_path, grid)
    assert run.returncode == 0 and run.stdout.count("not rerun") == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == stamps
    assert again["cells"] == report["cells"]

    # a failing cell is reported; the others still make the table
    broken = {**grid, "encoders": ["conformer"], "context_sets": {"low": ["low"], "broken": [[3, -2]]}}
    run, report = ablate(tmp_path, broken)
    assert run.returncode == 1
    assert list(report["failed"]) == ["conformer-broken-tiny"]
    assert [c["cell"] for c in report["cells"]] == ["conformer-low-tiny"]
    assert "conformer-broken-tiny" in (out / "ablation.md").read_text()
    assert "1 of 2 cells failed" in run.stderr

    # a result made by another command (here: other CTC epochs) is refused, not read back or
    # rerun over; the other cell is read back
    stale = out / "transformer-low-tiny" / "result.json"
    before = stale.read_text()
    run, report = ablate(tmp_path, {**grid, "ctc_epochs": 2})
    assert run.returncode == 1
    assert list(report["failed"]) == ["conformer-low-tiny", "transformer-low-tiny"]
    message = report["failed"]["transformer-low-tiny"]
    assert str(stale) in message and "command found" in message and "delete" in message
    assert stale.read_text() == before and not report["cells"]


def test_each_cell_validates_at_its_widest_trained_streaming_context(tmp_path):
    presets = {"very_low": [8, 0], "low": [16, 1], "medium": [32, 3], "high": [64, 7],
               "unlimited": [-1, -1]}
    assert widest_context(["low"], presets) == "low"
    assert widest_context(["very_low", "low", "medium", "high"], presets) == "high"
    assert widest_context(["low", "unlimited"], presets) == "low"  # streaming first
    assert widest_context([[16, 1], [32, 1]], presets) == [32, 1]  # same chunk: longer left
    assert widest_context([[-1, 3], [64, 7]], presets) == [64, 7]  # longer chunk first
    assert widest_context(["unlimited"], presets) == "unlimited"  # an offline-only cell
    grid = load_grid_from({**GRID, "ssl_epochs": 0, "context_sets": {
        "low": ["low"], "multi": ["very_low", "low", "medium"], "pair": [[4, 0]]}})
    for cell in cells_of(grid, tmp_path):
        plan = cell_plan(grid, cell)
        trained = [list(parse_context(c, presets)) for c in cell["contexts"]]
        assert plan["valid_context"] in trained, (cell["name"], plan["valid_context"])
        assert "--valid_context" in plan["ctc"] and plan["ssl"] is None
    assert [cell_plan(grid, c)["valid_context"] for c in cells_of(grid, tmp_path)[:3]] == [
        [16, 1], [32, 3], [4, 0]]


def test_parameter_counts_are_equalized():
    grid = load_grid_from({**GRID, "encoders": ["conformer", "transformer", "conmamba"]})
    counts = {}
    for encoder in grid["encoders"]:
        sizes = encoder_sizes(grid, encoder, "tiny")
        counts[encoder] = parameter_count(build_encoder(encoder, sizes))
    assert encoder_sizes(grid, "transformer", "tiny")["d_ffn"] > 64  # no convolution: wider FFN
    for encoder, count in counts.items():
        assert abs(count - counts["conformer"]) / counts["conformer"] < 0.05, counts


def load_grid_from(grid):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "grid.yaml"
        path.write_text(yaml.safe_dump(grid))
        return load_grid(path)


@pytest.mark.parametrize("change, message", [
    ({"encoders": ["lstm"]}, "encoders"), ({"contexts": ["low"]}, "unknown keys"),
    ({"sizes": {}}, "'sizes' is missing")])
def test_bad_grid_files_are_named(change, message):
    with pytest.raises(SystemExit, match=message):
        load_grid_from({**GRID, **change})


def test_slurm_job_script_of_a_grid(tmp_path):
    """The Slurm launcher's job header (no cluster here: submitit's own sbatch writer)."""
    from submitit.slurm.slurm import _make_sbatch_string

    from ablate import slurm_parameters

    grid = load_grid_from({**GRID, "nproc_per_node": 8, "slurm": {
        "partition": "gpu", "gpus_per_node": 8, "cpus_per_task": 64, "timeout_min": 600}})
    script = _make_sbatch_string(command="python recipes/ablate.py --run_cell x",
                                 folder=tmp_path, **slurm_parameters(grid))
    for line in ("--partition=gpu", "--gpus-per-node=8", "--cpus-per-task=64",
                 "--ntasks-per-node=1", "--nodes=1", "--time=600"):
        assert f"#SBATCH {line}" in script, line


@pytest.mark.parametrize("grid_file", sorted((ROOT / "hparams" / "ablations").glob("*.yaml")))
def test_shipped_grids_load(grid_file):
    grid = load_grid(grid_file)
    cells = cells_of(grid, Path("out"))
    assert len(cells) == len(grid["encoders"]) * len(grid["context_sets"]) * len(grid["sizes"])


def test_cells_train_under_torchrun_when_asked(monkeypatch):
    import ablate

    calls = []
    monkeypatch.setattr(ablate, "run", lambda script, *args, launcher=(): calls.append(
        (script, launcher)) or {})
    ablate.run_training({"nproc_per_node": 1}, "hparams/SSL/conformer.yaml")
    ablate.run_training({"nproc_per_node": 4}, "hparams/SSL/conformer.yaml")
    assert calls[0] == ("train.py", ())
    assert calls[1][1][:2] == ("-m", "torch.distributed.run")
    assert "--nproc_per_node=4" in calls[1][1]
