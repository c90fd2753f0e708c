"""Checkpoints that survive a hard kill and a shared filesystem: atomic checkpoint folders, listed
by the main process alone, every process's random states and a run's CPU time across resumes.

SpeechBrain's ``Checkpointer`` writes the meta file ``CKPT.yaml`` first and the parameter files
after it, so a process killed while saving leaves a folder that looks complete and is the
newest: the next run would try to resume from it and fail (or load half a model). It also
deletes old checkpoints file by file, so a kill while deleting leaves a listed checkpoint with
files missing. Here a checkpoint is written into a hidden folder and renamed into place once
every file is in it, and renamed out of the listing before its files are removed; renames are
atomic, so every listed checkpoint folder is a complete one.

Under DDP, SpeechBrain has every process list the folder and read every ``CKPT.yaml``; on a
shared filesystem another node's stale directory cache can then fail (ESTALE, FileNotFoundError)
or see another list. Here only the main process lists and reads them: it deletes old checkpoints
alone and picks the one every process recovers.
"""
from __future__ import annotations

import functools
import json
import logging
import random
import resource
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from speechbrain.utils.checkpoints import (
    Checkpoint,
    Checkpointer,
    ckpt_recency,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import (
    MainProcessContext,
    ddp_barrier,
    ddp_prevent_block,
    if_main_process,
    main_process_only,
)

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"  # not "CKPT...": SpeechBrain never lists these folders


class AtomicCheckpointer(Checkpointer):
    """A ``Checkpointer`` whose checkpoint folders appear and disappear whole, and which only the
    main process lists.

    Folders left behind by a killed save or deletion (``.partial-CKPT+...``) are removed at the
    next save. Under DDP, :meth:`list_checkpoints` (and so ``find_checkpoint(s)``) is a
    collective: call it on every process (or inside ``run_on_main``). Arguments as for
    SpeechBrain's ``Checkpointer``.
    """

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None,  # noqa: B006 (parent's API)
                        verbosity=logging.INFO):
        if if_main_process():
            for stale in self.checkpoints_dir.glob(PARTIAL_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        saved = super().save_checkpoint(meta, end_of_epoch, name, verbosity=logging.DEBUG)
        ddp_barrier()  # savers that run on every process have written their files
        if saved is None:  # not the main process
            return None
        final = saved.path.with_name(saved.path.name[len(PARTIAL_PREFIX):])
        saved.path.rename(final)
        kind = "end-of-epoch" if end_of_epoch else "intra-epoch"
        logger.log(verbosity, "Saved an %s checkpoint in %s", kind, final)
        return Checkpoint(final, saved.meta,
                          {key: final / path.name for key, path in saved.paramfiles.items()})

    def save_and_keep_only(self, meta: dict | None = None, end_of_epoch: bool = True,
                           name: str | None = None, num_to_keep: int = 1,
                           keep_recent: bool = True, importance_keys: Sequence[Callable] = (),
                           max_keys: Sequence[str] = (), min_keys: Sequence[str] = (),
                           ckpt_predicate: Callable | None = None,
                           verbosity: int = logging.INFO) -> None:
        """SpeechBrain's ``save_and_keep_only`` (same arguments), without its mutable default:
        there ``importance_keys=[]`` gains one ``ckpt_recency`` at every call."""
        self.save_checkpoint(meta=meta or {}, end_of_epoch=end_of_epoch, name=name,
                             verbosity=verbosity)
        self.delete_checkpoints(
            num_to_keep=num_to_keep, max_keys=list(max_keys), min_keys=list(min_keys),
            importance_keys=[*importance_keys, *([ckpt_recency] if keep_recent else [])],
            ckpt_predicate=ckpt_predicate, verbosity=verbosity)

    def list_checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint, as listed and read by the main process (sent to the others)."""
        return main_process_only(super().list_checkpoints)()

    def recover_if_possible(self, importance_key: Callable | None = None,
                            max_key: str | None = None, min_key: str | None = None,
                            ckpt_predicate: Callable | None = None) -> Checkpoint | None:
        """SpeechBrain's ``recover_if_possible``: the main process picks the checkpoint and sends
        it to the others, so that every process loads the same one."""
        chosen = main_process_only(self.find_checkpoint)(importance_key, max_key, min_key,
                                                         ckpt_predicate)
        if chosen is None:
            logger.info("Would load a checkpoint here, but none found yet.")
        else:
            self.load_checkpoint(chosen)
        return chosen

    def delete_checkpoints(self, *, num_to_keep=1, min_keys=None, max_keys=None,
                           importance_keys=(ckpt_recency,), ckpt_predicate=None,
                           verbosity=logging.INFO):
        """SpeechBrain's ``delete_checkpoints`` (same arguments: for each key, the best
        ``num_to_keep`` are kept), by the main process alone, each folder renamed out of the
        listing before its removal.

        Written out because SpeechBrain's version calls ``Checkpointer._delete_checkpoint`` by
        name, which a subclass cannot replace, and lists on every process.
        """
        if num_to_keep < 0:
            raise ValueError("Number of checkpoints to keep must be positive.")
        if if_main_process():
            keys = ([{"min_key": key} for key in min_keys or []]
                    + [{"max_key": key} for key in max_keys or []]
                    + [{"importance_key": key} for key in importance_keys])
            with MainProcessContext():  # the listing is for this process only: no broadcast
                self._delete_unkept(keys, num_to_keep, ckpt_predicate, verbosity)
        ddp_barrier()  # no process goes on (to save, or to recover) while old ones are removed

    def _delete_unkept(self, keys: list[dict], num_to_keep: int,
                       ckpt_predicate: Callable | None, verbosity: int) -> None:
        candidates, kept = set(), set()
        for key in keys:
            ranked = self.find_checkpoints(ckpt_predicate=ckpt_predicate, **key)
            candidates.update(ranked)
            kept.update(ranked[:num_to_keep])
        for checkpoint in candidates - kept:
            trash = checkpoint.path.with_name(PARTIAL_PREFIX + checkpoint.path.name)
            checkpoint.path.rename(trash)
            shutil.rmtree(trash)
            logger.log(verbosity, "Deleted checkpoint in %s", checkpoint.path)

    def _new_checkpoint_dirpath(self):
        path = super()._new_checkpoint_dirpath()
        return path.with_name(PARTIAL_PREFIX + path.name)

    def _custom_checkpoint_dirpath(self, name):
        path = super()._custom_checkpoint_dirpath(name)
        return path.with_name(PARTIAL_PREFIX + path.name)


def _rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _mps_available() -> bool:
    return hasattr(torch, "mps") and torch.backends.mps.is_available()


def _get_states() -> dict:
    """This process's generator states (CUDA: the current device only)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "mps": torch.mps.get_rng_state() if _mps_available() else None}


def _set_states(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # this process's device
    if state.get("mps") is not None and _mps_available():
        torch.mps.set_rng_state(state["mps"])


@functools.partial(register_checkpoint_hooks, save_on_main_only=False)  # all gather; main writes
class RandomState:
    """The global random generators of every process (Python, NumPy, torch CPU, CUDA for the
    process's device, MPS) as a recoverable.

    Masking, dropout and noise draw from them: restoring them with the model, optimizer and
    data position makes a resumed run continue with the draws the interrupted one would have
    made. Under DDP every process's states are gathered into one file (written by the main
    process) and each process restores its own entry.

    "Bit for bit" (a resumed run ends where an uninterrupted one ends) holds with the same world
    size, the same devices (type, model, one per rank as before), the same software versions and
    deterministic kernels. It does not hold when the world size changes (every process then
    restores rank 0's states, with a warning), on other devices or versions, with
    nondeterministic kernels (e.g. CUDA atomics, cuDNN autotuning), for the CUDA generators of
    other devices than the current one, or for generators outside these (``torch.Generator``
    objects, which their owners must checkpoint). Files written before per-process states hold
    one state, which every process restores.
    """

    @mark_as_saver
    def _save(self, path: str | Path) -> None:
        states = [_get_states()]
        if not ddp_prevent_block():  # every process runs this saver, none inside run_on_main
            states = [None] * _rank_and_world_size()[1]
            torch.distributed.all_gather_object(states, _get_states())
        if if_main_process():
            torch.save({"ranks": states}, path)

    @mark_as_loader
    def _load(self, path: str | Path, end_of_epoch: bool = False) -> None:
        saved = torch.load(path, weights_only=False)
        if "ranks" not in saved:  # a file from before per-process states
            _set_states(saved)
            return
        rank, world_size = _rank_and_world_size()
        if len(saved["ranks"]) != world_size:
            rank = 0
            if if_main_process():
                logger.warning("Random states saved by %d processes, restored in %d: every "
                               "process takes rank 0's (not bit for bit)",
                               len(saved["ranks"]), world_size)
        _set_states(saved["ranks"][rank])


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process (every thread) and of its finished children
    (data loader workers)."""
    own, children = (resource.getrusage(who)
                     for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@register_checkpoint_hooks  # saved by the main process
class CpuSeconds:
    """A run's CPU time across the processes that trained it, as a recoverable: a checkpoint
    stores the run's total at its save, and a resumed process adds its own time to the total of
    the checkpoint it resumed from.

    Work done after an interrupted process's last checkpoint is not counted (the resumed
    process redoes it, and that is). The main process's time: under DDP, one rank's.
    """

    def __init__(self) -> None:
        self.before_resume = 0.0  # the run's CPU seconds up to the checkpoint resumed from
        self.settled = False      # a resume was loaded, or this process has saved

    def total(self) -> float:
        """The run's CPU seconds so far."""
        return self.before_resume + process_cpu_seconds()

    @mark_as_saver
    def _save(self, path: str | Path) -> None:
        self.settled = True
        Path(path).write_text(json.dumps({"cpu_seconds": round(self.total(), 3)}))

    @mark_as_loader
    def _load(self, path: str | Path, end_of_epoch: bool = False) -> None:
        # Only the resume counts: a later load (the best checkpoints, for the test) restores an
        # earlier total that this process's own time already covers.
        if not self.settled:
            self.before_resume = json.loads(Path(path).read_text())["cpu_seconds"]
            self.settled = True
