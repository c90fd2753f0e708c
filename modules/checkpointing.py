"""Checkpoints that survive a hard kill: atomic checkpoint folders and saved random states.

SpeechBrain's ``Checkpointer`` writes the meta file ``CKPT.yaml`` first and the parameter files
after it, so a process killed while saving leaves a folder that looks complete and is the
newest: the next run would try to resume from it and fail (or load half a model). It also
deletes old checkpoints file by file, so a kill while deleting leaves a listed checkpoint with
files missing. Here a checkpoint is written into a hidden folder and renamed into place once
every file is in it, and renamed out of the listing before its files are removed; renames are
atomic, so every listed checkpoint folder is a complete one.
"""
from __future__ import annotations

import logging
import random
import shutil

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
from speechbrain.utils.distributed import ddp_barrier, if_main_process

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"  # not "CKPT...": SpeechBrain never lists these folders


class AtomicCheckpointer(Checkpointer):
    """A ``Checkpointer`` whose checkpoint folders appear and disappear whole.

    Folders left behind by a killed save or deletion (``.partial-CKPT+...``) are removed at the
    next save. Arguments as for SpeechBrain's ``Checkpointer``.
    """

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None,  # noqa: B006 (parent's API)
                        verbosity=logging.INFO):
        if if_main_process():
            for stale in self.checkpoints_dir.glob(PARTIAL_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        saved = super().save_checkpoint(meta, end_of_epoch, name, verbosity=logging.DEBUG)
        if saved is not None:  # the main process
            final = saved.path.with_name(saved.path.name[len(PARTIAL_PREFIX):])
            saved.path.rename(final)
            saved = Checkpoint(final, saved.meta,
                               {key: final / path.name for key, path in saved.paramfiles.items()})
            kind = "end-of-epoch" if end_of_epoch else "intra-epoch"
            logger.log(verbosity, "Saved an %s checkpoint in %s", kind, final)
        ddp_barrier()  # every rank lists the renamed folder next (to delete old ones alike)
        return saved

    def delete_checkpoints(self, *, num_to_keep=1, min_keys=None, max_keys=None,
                           importance_keys=(ckpt_recency,), ckpt_predicate=None,
                           verbosity=logging.INFO):
        """SpeechBrain's ``delete_checkpoints`` (same arguments: for each key, the best
        ``num_to_keep`` are kept), each folder renamed out of the listing before its removal.

        Written out because SpeechBrain's version calls ``Checkpointer._delete_checkpoint`` by
        name, which a subclass cannot replace.
        """
        if num_to_keep < 0:
            raise ValueError("Number of checkpoints to keep must be positive.")
        keys = ([{"min_key": key} for key in min_keys or []]
                + [{"max_key": key} for key in max_keys or []]
                + [{"importance_key": key} for key in importance_keys])
        candidates, kept = set(), set()
        for key in keys:
            candidates.update(self.find_checkpoints(ckpt_predicate=ckpt_predicate, **key))
            kept.update(self.find_checkpoints(ckpt_predicate=ckpt_predicate,
                                              max_num_checkpoints=num_to_keep, **key))
        ddp_barrier()  # every rank has listed them before any is removed
        if if_main_process():
            for checkpoint in candidates - kept:
                trash = checkpoint.path.with_name(PARTIAL_PREFIX + checkpoint.path.name)
                checkpoint.path.rename(trash)
                shutil.rmtree(trash)
                logger.log(verbosity, "Deleted checkpoint in %s", checkpoint.path)
        ddp_barrier()

    def _new_checkpoint_dirpath(self):
        path = super()._new_checkpoint_dirpath()
        return path.with_name(PARTIAL_PREFIX + path.name)

    def _custom_checkpoint_dirpath(self, name):
        path = super()._custom_checkpoint_dirpath(name)
        return path.with_name(PARTIAL_PREFIX + path.name)


@register_checkpoint_hooks
class RandomState:
    """The global random generators (Python, NumPy, torch CPU and CUDA) as a recoverable.

    Masking, dropout and noise draw from them: restoring them with the model, optimizer and
    data position makes a resumed run continue with the draws the interrupted one would have
    made. Under DDP the main process saves its own states (CUDA: its own device) and every rank
    restores them.
    """

    @mark_as_saver
    def _save(self, path):
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None},
                   path)

    @mark_as_loader
    def _load(self, path, end_of_epoch=False):
        state = torch.load(path, weights_only=False)
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])  # this process's device
