"""Every module of a recipe's hparams follows the Brain to its device.

The first GPU run found the feature extractor's filterbank left on the CPU (it is not one of the
Brain's ``modules``): on the CPU nothing shows it. A Brain built on the ``meta`` device does:
any tensor of its hparams' modules left elsewhere would meet the audio on another device.
"""
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_check import TINY  # noqa: E402
from recipe_steps import recipe_brain  # noqa: E402


@pytest.mark.parametrize("hparams_file", [
    "hparams/SSL/conformer.yaml", "hparams/SSL/conmamba.yaml", "hparams/CTC/conformer_small.yaml",
    "hparams/S2S/conmamba_mamba_small.yaml"])
def test_recipe_modules_follow_the_brain_device(hparams_file, tmp_path):
    brain = recipe_brain(hparams_file, TINY, "meta", "fp32", str(tmp_path))
    elsewhere = {name: sorted({t.device.type for t in [*module.parameters(), *module.buffers()]}
                              - {"meta"})
                 for name, module in vars(brain.hparams).items()
                 if isinstance(module, torch.nn.Module)}
    assert not {name: devices for name, devices in elsewhere.items() if devices}
