"""Host syncs in a training step (issue 21, defect 5), counted with a CPU stand-in.

On a GPU, an operation whose result the host must read (``.item()``, ``bool(t)``, boolean
indexing, ``nonzero``, ``bincount``...) stops the host until the GPU has caught up. Here every
such operation of one recipe step is recorded with its call site; those of the documented
host-side code (masks, context draws and counts made on CPU tensors by design) are set apart,
and what is left must be exactly the documented remainder (docs/scaling.md, "Multi-GPU and clusters").
Copies between host and device are not seen on the CPU: ``benchmarks/gpu_check.py`` counts
the syncs of a step on the GPU itself (``torch.cuda.set_sync_debug_mode``).
"""
import collections
import sys
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from recipe_steps import corpus_batch, recipe_brain  # noqa: E402
from modules.context import ContextSampler  # noqa: E402

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
         aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
         aten._unique2.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor,
         aten.masked_scatter.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
# (operation, call site) on CPU tensors by design: no GPU sync when the model is on a GPU.
HOST_SIDE = {
    ("_local_scalar_dense", "modules/context.py:sample"),  # CPU generator
    ("_local_scalar_dense", "modules/masker.py:<listcomp>"),  # CPU lengths
    ("nonzero", "modules/masker.py:_keep_visible_in_window"),
    ("nonzero", "modules/heads.py:masked_positions"),  # the host mask
    ("_local_scalar_dense", "recipes/ssl_brain.py:compute_objectives"),  # frame_mask.any(), host
    ("_local_scalar_dense", "recipes/streaming_brain.py:fit_batch"),  # audio seconds, CPU lengths
    ("_local_scalar_dense", "torch/optim"),  # step counters live on the CPU
}
SITES = ("modules/", "recipes/", "speechbrain/", "torch/optim/")
TINY = {"d_model": 32, "nhead": 2, "num_encoder_layers": 1, "d_ffn": 64,
        "subsampling_conv_channels": 8, "num_classes": 32, "d_state": 4}


class HostReads(TorchDispatchMode):
    """Counts host-reading operations by (operation, innermost call site in SITES)."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func in INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if func in READS or boolean_index:
            self.sites[(func.__name__.split(".")[0], self._site())] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _site() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = frame.filename.replace("\\", "/")
            relative = path.split("site-packages/")[-1].replace(str(ROOT).replace("\\", "/") + "/", "")
            if relative.startswith("torch/optim/"):
                return "torch/optim"
            if relative.startswith(SITES) and "/.venv/" not in relative:
                return f"{relative}:{frame.name}"
        return "elsewhere"


def device_side_reads(folder, hparams: str, context, **overrides) -> dict:
    """Host reads of one training step (after a first one) not in HOST_SIDE."""
    brain = recipe_brain(hparams, {**TINY, **overrides}, "cpu", "fp32", str(folder))
    batch = corpus_batch(brain, 2, 3)
    brain.hparams.context_sampler = ContextSampler([list(context)])
    brain.fit_batch(batch)
    with HostReads() as reads:
        brain.fit_batch(batch)
    return {site: n for site, n in reads.sites.items() if site not in HOST_SIDE}


ISFINITE = {("_local_scalar_dense", "speechbrain/core.py:check_loss_isfinite"): 1}


@pytest.mark.parametrize("encoder", ["conformer", "conmamba"])
@pytest.mark.parametrize("context", [(16, 1), (-1, -1)], ids=["limited", "offline"])
def test_ssl_step_reads_only_the_loss_check(tmp_path, encoder, context):
    assert device_side_reads(tmp_path, f"hparams/SSL/{encoder}.yaml", context) == ISFINITE


def test_ctc_step_reads_only_the_loss_check_and_speechbrains_spec_augment(tmp_path):
    hparams = "hparams/CTC/conformer_small.yaml"
    assert device_side_reads(tmp_path / "a", hparams, (16, 1), spec_augment_prob=0.0) == ISFINITE
    augmented = device_side_reads(tmp_path / "b", hparams, (-1, -1), spec_augment_prob=1.0)
    assert {site for _, site in augmented} == {"speechbrain/core.py:check_loss_isfinite",
                                                "speechbrain/augment/augmenter.py:forward",
                                                "speechbrain/augment/freq_domain.py:forward"}
