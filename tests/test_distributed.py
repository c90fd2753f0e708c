"""Scale-out on CPU: torchrun with 2 gloo processes (SSL for both encoders, CTC with a test on
averaged checkpoints, joint CTC / attention and the LM trained on its tokenizer), one context draw per step on every rank, the device each rank takes, and
data pipelines that spawn-started DataLoader workers can unpickle."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from speechbrain.utils.run_opts import RunOptions

from conftest import ROOT
from modules.context import ContextSampler
from test_ctc import CTC_TINY
from test_recipe import CONMAMBA_TINY, CORPUS, TINY, slice_csv

TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun(tmp_path, hparams, *extra, rows=8):
    """``torchrun --standalone --nproc_per_node=2 recipes/train.py <hparams> --device cpu ...``
    (docs/scaling.md, "Multi-GPU and clusters") on a slice of the corpus; returns the finished process."""
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "recipes/train.py",
               f"hparams/{hparams}", "--device", "cpu", "--data_folder", str(CORPUS),
               "--output_folder", str(tmp_path / "out"),
               "--train_csv", slice_csv("train", rows, tmp_path / "train.csv"),
               "--valid_csv", slice_csv("valid", 4, tmp_path / "valid.csv"), *extra]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def summary_lines(run) -> list[dict]:
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("encoder", ["conformer", "conmamba"])
def test_torchrun_ssl_two_processes(tmp_path, encoder):
    tiny = TINY if encoder == "conformer" else CONMAMBA_TINY
    run = torchrun(tmp_path, f"SSL/{encoder}.yaml", *tiny, "--number_of_epochs", "2")
    (summary,) = summary_lines(run)  # printed once, by the main process
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    # 8 utterances, batches of 4, split over 2 ranks: one step per rank and epoch
    log = (tmp_path / "out" / "train_log.txt").read_text()
    assert log.count("epoch: ") == 2
    for line in log.splitlines():
        drawn = line.split("contexts_drawn: ")[1].split(", valid_context")[0]
        assert sum(int(part.rsplit(": ", 1)[1]) for part in drawn.split("; ")) == 1


def test_torchrun_ctc_train_valid_and_test_on_averaged_checkpoints(tmp_path):
    """With the CUDA preset's dynamic batches (split over the ranks by SpeechBrain's wrapper)."""
    run = torchrun(tmp_path, "CTC/conformer_small.yaml", *CTC_TINY, "--number_of_epochs", "2",
                   "--test_csv", slice_csv("test", 3, tmp_path / "test.csv"),
                   "--checkpoints_to_keep", "2", "--average_checkpoints", "2",
                   "--dynamic_batching", "True", "--max_batch_length", "8")
    (summary,) = summary_lines(run)
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    assert 0 <= summary["ctc_cer"] and (tmp_path / "out" / "test_wer.txt").is_file()
    assert len(list((tmp_path / "out" / "save").glob("CKPT+*"))) == 2
    assert (tmp_path / "out" / "save" / "tokenizer" / "26_char.model").is_file()


def test_torchrun_s2s_then_its_language_model(tmp_path):
    run = torchrun(tmp_path, "S2S/conformer_small.yaml", *CTC_TINY, "--number_of_epochs", "1",
                   "--num_decoder_layers", "1", "--decoding", "attention_rescoring",
                   "--beam_size", "2", "--test_csv", slice_csv("test", 3, tmp_path / "test.csv"))
    (summary,) = summary_lines(run)
    assert summary["world_size"] == 2 and 0 <= summary["s2s_cer"]
    (tmp_path / "out").rename(tmp_path / "s2s")
    run = torchrun(tmp_path, "LM/transformer.yaml", "--asr_run", str(tmp_path / "s2s"),
                   "--vocab_size", "26", "--d_model", "32", "--nhead", "2", "--num_layers", "1",
                   "--d_ffn", "64", "--number_of_epochs", "1",
                   "--test_csv", str(tmp_path / "test.csv"))
    (summary,) = summary_lines(run)
    assert summary["world_size"] == 2 and summary["lm_test_perplexity"] > 1.0


def test_torchrun_ctc_probe_of_a_trained_encoder(tmp_path):
    """``--probe_layer 1`` of a 2-layer encoder that trains: the layer above gets no gradient,
    which DDP refuses at the second step unless that layer is frozen (it is)."""
    tiny = [a for a in CTC_TINY]
    tiny[tiny.index("--num_encoder_layers") + 1] = "2"
    run = torchrun(tmp_path, "CTC/conformer_small.yaml", *tiny, "--number_of_epochs", "1",
                   "--probe_layer", "1", "--head_only_fraction", "0.0", "--batch_size", "2",
                   "--test_csv", slice_csv("test", 2, tmp_path / "test.csv"))
    (summary,) = summary_lines(run)
    assert summary["world_size"] == 2 and summary["epochs"] == 1


_RANK = """
import atexit, sys
import torch
sys.path.insert(0, {recipes!r})
import distributed_exit

rank, init_file, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.distributed.init_process_group("gloo", init_method=f"file://{{init_file}}", rank=rank,
                                     world_size=2)
atexit.register(lambda: print(f"rank {{rank}}: exit hook ran", flush=True))
finished = False
try:  # as train.py's main block
    if rank == 1 and mode == "fail":
        raise SystemExit(3)
    finished = True
finally:
    distributed_exit.leave_process_group(finished)
"""


@pytest.mark.parametrize("mode", ["finish", "fail"])
def test_ranks_leave_together_or_say_that_another_failed(tmp_path, mode):
    """Finished ranks meet, run every exit hook and exit 0 (no C++ teardown); when one rank
    fails, the finished one says so in one line and exits 1 instead of hanging."""
    script = tmp_path / "rank.py"
    script.write_text(_RANK.format(recipes=str(ROOT / "recipes")))
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "init"), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    (out0, err0), (out1, _) = (rank.communicate(timeout=120) for rank in ranks)
    if mode == "finish":
        assert [rank.returncode for rank in ranks] == [0, 0]
        assert "rank 0: exit hook ran" in out0 and "rank 1: exit hook ran" in out1
    else:
        assert [rank.returncode for rank in ranks] == [1, 3]
        assert "error: rank 0 finished, but another process did not" in err0


def _draw_contexts(rank: int, init_file: str, seeds: list[int], queue) -> None:
    """One gloo process: a sampler seeded with ``seeds[rank]`` checks that it is in step with
    the main process's, then draws 30 contexts (no message per draw)."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2)
    sampler = ContextSampler([[8, 0], [16, 1], [32, 3], [64, 7]], seed=seeds[rank])
    try:
        sampler.check_in_sync()
        queue.put((rank, [sampler.sample() for _ in range(30)]))
    except RuntimeError as error:
        queue.put((rank, str(error)))
    torch.distributed.destroy_process_group()


def _spawn_samplers(tmp_path, seeds):
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_draw_contexts,
                                 args=(rank, str(tmp_path / "init"), seeds, queue))
                 for rank in range(2)]
    for process in processes:
        process.start()
    draws = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return draws


def test_every_rank_draws_the_main_process_contexts(tmp_path):
    """Same seed on every rank (as the recipes load it): the same draws, without a broadcast per
    step; a rank whose sampler is out of step is refused before it trains."""
    draws = _spawn_samplers(tmp_path, [5, 5])
    main = ContextSampler([[8, 0], [16, 1], [32, 3], [64, 7]], seed=5)
    assert draws[0] == draws[1] == [main.sample() for _ in range(30)]
    assert len(set(draws[1])) > 1
    (tmp_path / "other").mkdir()
    draws = _spawn_samplers(tmp_path / "other", [5, 6])
    assert isinstance(draws[1], str) and "rank 1" in draws[1] and "same hparams seed" in draws[1]


@pytest.mark.parametrize("device, local_rank, expected", [
    ("cuda", "1", ("cuda:1", "nccl")), ("cuda", None, ("cuda:0", "nccl")),
    ("cuda:3", "1", ("cuda:3", "nccl")), ("cpu", "1", ("cpu", "gloo")), ("mps", None, ("mps", "gloo"))])
def test_each_process_takes_its_own_device(monkeypatch, device, local_rank, expected):
    from command_line import resolve_device

    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    _, run_opts, _ = RunOptions.from_command_line_args(["x.yaml"])
    resolved = resolve_device(run_opts, {"device": device})  # the device preset's value
    assert (resolved.device, resolved.distributed_backend) == expected
    _, run_opts, _ = RunOptions.from_command_line_args(["x.yaml", "--device", device,
                                                        "--distributed_backend", "mpi"])
    assert resolve_device(run_opts, {"device": "cpu"}).distributed_backend == "mpi"


def test_data_pipelines_load_in_spawned_workers(tmp_path):
    """macOS / MPS start DataLoader workers with spawn: the pipelines must pickle."""
    from hyperpyyaml import load_hyperpyyaml
    from speechbrain.dataio.dataloader import make_dataloader
    from train import dataio_prepare

    overrides = {"data_folder": str(CORPUS), "output_folder": str(tmp_path),
                 "train_csv": slice_csv("train", 4, tmp_path / "train.csv"),
                 "valid_csv": slice_csv("valid", 2, tmp_path / "valid.csv"),
                 "test_csv": slice_csv("test", 2, tmp_path / "test.csv"), "vocab_size": 26}
    with open(ROOT / "hparams" / "CTC" / "conformer_small.yaml") as f:
        hparams = load_hyperpyyaml(f, overrides)
    datasets = dataio_prepare(hparams)
    spawned = next(iter(make_dataloader(datasets["train"], batch_size=2, num_workers=1,
                                        multiprocessing_context="spawn")))
    local = next(iter(make_dataloader(datasets["train"], batch_size=2)))
    assert spawned.id == local.id and spawned.wrd == local.wrd
    for key in ("sig", "tokens"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(spawned, key), getattr(local, key)))


@pytest.mark.parametrize("native_bf16, argv, expected", [
    (True, [], "bf16"), (False, [], "fp16"), (False, ["--precision", "bf16"], "bf16")])
def test_cuda_preset_takes_fp16_where_bf16_is_not_native(monkeypatch, native_bf16, argv, expected):
    """V100 / T4: the preset's bf16 becomes fp16 (SpeechBrain then scales the gradients);
    an explicit --precision is kept."""
    from command_line import parse_command_line

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    _, run_opts, overrides = parse_command_line(
        ["hparams/SSL/conformer.yaml", "--device_preset", "cuda", *argv])
    precision = run_opts.precision if argv else overrides["precision"]
    assert precision == expected and run_opts.device == "cuda:0"


@pytest.mark.parametrize("native_bf16, argv, warned", [
    (False, ["--precision", "bf16"], True), (True, ["--precision", "bf16"], False),
    (False, [], False)])
def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog, native_bf16, argv, warned):
    """An AVX2-only CPU emulates bf16 (a matrix product ~20x slower than fp32): say so."""
    import command_line

    monkeypatch.setattr(command_line, "cpu_has_native_bf16", lambda: native_bf16)
    with caplog.at_level("WARNING", logger="command_line"):
        command_line.parse_command_line(["hparams/SSL/conformer.yaml", "--device_preset", "cpu", *argv])
    assert ("no native bf16" in caplog.text) == warned
