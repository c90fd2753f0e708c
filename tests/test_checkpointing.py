"""Checkpoints under DDP (2 gloo processes on CPU): each rank resumes with its own random states,
only the main rank lists and reads the checkpoint folders, and every rank recovers the one it
picks; SpeechBrain's growing ``importance_keys`` default is gone."""
from __future__ import annotations

import datetime
import errno
import logging
import os
import queue as queue_module
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
import yaml
from speechbrain.utils.checkpoints import Checkpointer

from modules.checkpointing import AtomicCheckpointer, RandomState


def _init_rank(rank: int, init_file: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group(  # a short timeout: a hung collective fails the test
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=60))


def _spawn(target, tmp_path: Path) -> dict:
    """Runs ``target(rank, init_file, save_folder, queue)`` in 2 spawned gloo processes; returns
    what each rank put on the queue, by rank."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=target, args=(rank, str(tmp_path / "init"),
                                                      str(tmp_path / "save"), queue))
                 for rank in range(2)]
    for process in processes:
        process.start()
    results, deadline = {}, time.monotonic() + 180
    try:  # until both have answered, or one has died (then the other may wait in a collective)
        while len(results) < 2 and time.monotonic() < deadline:
            if any(process.exitcode not in (None, 0) for process in processes):
                break
            try:
                results.update([queue.get(timeout=1)])
            except queue_module.Empty:
                pass
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.exitcode is None:
                process.kill()
    assert [process.exitcode for process in processes] == [0, 0], results
    return results


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _draws() -> list:
    return [random.random(), float(np.random.rand()), *torch.rand(3).tolist()]


def _save_draw_and_resume(rank: int, init_file: str, save: str, queue) -> None:
    """Seeded with its rank, saves, draws; scrambled, recovers and draws again."""
    _init_rank(rank, init_file)
    _seed(100 + rank)
    AtomicCheckpointer(save, {"random_state": RandomState()}).save_checkpoint()
    first = _draws()
    _seed(999)
    AtomicCheckpointer(save, {"random_state": RandomState()}).recover_if_possible()
    queue.put((rank, (first, _draws())))
    torch.distributed.destroy_process_group()


def test_each_rank_resumes_with_its_own_random_states(tmp_path):
    draws = _spawn(_save_draw_and_resume, tmp_path)
    assert draws[0][0] != draws[1][0]  # seeded differently
    for rank in (0, 1):
        assert draws[rank][1] == draws[rank][0], f"rank {rank} did not get its own states back"


def _states_after(seed: int) -> dict:
    _seed(seed)
    path = Path(os.environ["STATE_FILE"])
    RandomState()._save(path)
    return torch.load(path, weights_only=False)


def test_random_state_world_size_change_and_old_files(tmp_path, monkeypatch, caplog):
    """A file of 2 ranks loaded by 1 process: rank 0's entry, one warning; an older file with a
    single state (before per-rank states) still loads."""
    monkeypatch.setenv("STATE_FILE", str(tmp_path / "one.ckpt"))
    saved = _states_after(1)
    assert len(saved["ranks"]) == 1
    expected = _draws()
    torch.save({"ranks": [saved["ranks"][0], _states_after(2)["ranks"][0]]}, tmp_path / "two.ckpt")
    _seed(3)
    with caplog.at_level(logging.WARNING, logger="modules.checkpointing"):
        RandomState()._load(tmp_path / "two.ckpt")
    assert _draws() == expected
    assert len(caplog.records) == 1 and "2 processes" in caplog.records[0].getMessage()

    torch.save(saved["ranks"][0], tmp_path / "old.ckpt")  # the format before per-rank states
    _seed(4)
    RandomState()._load(tmp_path / "old.ckpt")
    assert _draws() == expected


def test_keep_recent_does_not_grow_the_importance_keys(tmp_path, monkeypatch):
    """SpeechBrain's ``save_and_keep_only(importance_keys=[])`` appends ``ckpt_recency`` to its
    own default at every call."""
    checkpointer = AtomicCheckpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    seen = []
    delete = checkpointer.delete_checkpoints
    monkeypatch.setattr(checkpointer, "delete_checkpoints",
                        lambda **kwargs: seen.append(list(kwargs["importance_keys"])) or
                        delete(**kwargs))
    for loss in (3.0, 2.0, 1.0):
        checkpointer.save_and_keep_only(meta={"loss": loss}, min_keys=["loss"], num_to_keep=1)
    assert [len(keys) for keys in seen] == [1, 1, 1]
    assert len(list(tmp_path.glob("CKPT+*"))) == 1  # the latest is also the best here


def _list_on_main_only(rank: int, init_file: str, save: str, queue) -> None:
    """Rank 1 cannot read the checkpoint folder (as with a stale NFS cache): saving, deleting and
    recovering still work, and both ranks load the checkpoint rank 0 picks."""
    _init_rank(rank, init_file)
    if rank == 1:
        def stale(*args, **kwargs):
            raise OSError(errno.ESTALE, "Stale file handle", save)
        Checkpointer._list_checkpoint_dirs = stale
        Checkpointer._construct_checkpoint_objects = stale
    model = torch.nn.Linear(2, 2)
    checkpointer = AtomicCheckpointer(save, {"model": model})
    for loss in (3.0, 1.0, 2.0):
        with torch.no_grad():
            model.weight.fill_(loss)
        checkpointer.save_and_keep_only(meta={"loss": loss}, min_keys=["loss"], num_to_keep=1)
    with torch.no_grad():
        model.weight.zero_()
    recovered = checkpointer.recover_if_possible(min_key="loss")
    listed = sorted(str(c.path) for c in checkpointer.list_checkpoints())
    queue.put((rank, (str(recovered.path), model.weight[0, 0].item(), listed)))
    torch.distributed.destroy_process_group()


def test_only_the_main_rank_lists_checkpoints(tmp_path):
    results = _spawn(_list_on_main_only, tmp_path)
    assert results[0] == results[1]
    path, weight, listed = results[0]
    meta = yaml.safe_load((Path(path) / "CKPT.yaml").read_text())
    assert meta["loss"] == weight == 1.0  # the best by loss, its weights loaded on both ranks
    assert len(listed) == 2  # the best and the most recent
    assert sorted(str(p) for p in (tmp_path / "save").glob("CKPT+*")) == listed
