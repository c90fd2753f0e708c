"""Learning-rate schedules set before each step: no optimizer's first step at its peak, no step
at 0, and the same rates after a save and load (a resume) as without."""
import sys

import pytest
import torch

from conftest import ROOT
from modules.schedulers import LinearWarmupDecay, NoamWarmup, warmup_steps


def stepped_lrs(schedule, optimizer, steps: int) -> list[float]:
    """The LR each of ``steps`` optimizer steps runs at, set by ``schedule`` as train.py does."""
    used = []
    for _ in range(steps):
        schedule.set_lr(optimizer)
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule(optimizer)
    return used


def optimizer_at(peak: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=peak)  # created at the peak


@pytest.mark.parametrize("warmup, total", [(1, 5), (2, 6), (3, 10), (1, 1)])
def test_linear_schedule_warms_up_below_the_peak_and_never_steps_at_zero(warmup, total):
    used = stepped_lrs(LinearWarmupDecay(1.0, warmup, total), optimizer_at(1.0), total)
    assert used[:warmup] == pytest.approx([(k + 1) / (warmup + 1) for k in range(warmup)])
    assert all(0 < lr < 1.0 for lr in used[:warmup])
    if total > warmup:
        assert used[warmup] == pytest.approx(1.0)
        assert used[-1] == pytest.approx(1 / (total - warmup))
    assert all(lr > 0 for lr in used)


def test_without_warmup_the_first_step_is_at_the_peak():
    assert stepped_lrs(LinearWarmupDecay(1.0, 0, 4), optimizer_at(1.0), 4) == pytest.approx(
        [1.0, 0.75, 0.5, 0.25])


def test_warmup_steps_is_at_least_one_when_asked_for():
    assert warmup_steps(0.1, 4) == 1  # round(0.4) would be 0
    assert warmup_steps(0.1, 100) == 10
    assert warmup_steps(0.0, 100) == 0 and warmup_steps(0.5, 0) == 0


def test_noam_first_step_is_lr_over_warmup_then_the_peak_at_warmup():
    used = stepped_lrs(NoamWarmup(0.001, 4), optimizer_at(0.001), 6)
    assert used[:4] == pytest.approx([0.00025, 0.0005, 0.00075, 0.001])
    assert used[4] == pytest.approx(0.001 * (4 / 5) ** 0.5)
    with pytest.raises(ValueError, match="n_warmup_steps"):
        NoamWarmup(0.001, 0)


@pytest.mark.parametrize("make", [lambda: LinearWarmupDecay(1.0, 3, 10),
                                  lambda: NoamWarmup(1.0, 3)])
def test_a_resumed_schedule_continues_with_the_same_rates(tmp_path, make):
    """Saved after 4 steps, loaded into a fresh schedule and a fresh optimizer (at the peak, as
    a restarted process builds it): the next steps run at the uninterrupted run's rates."""
    uninterrupted = stepped_lrs(make(), optimizer_at(1.0), 8)
    first = make()
    stepped_lrs(first, optimizer_at(1.0), 4)
    first.save(tmp_path / "schedule.ckpt")
    resumed = make()
    resumed.load(tmp_path / "schedule.ckpt")
    assert stepped_lrs(resumed, optimizer_at(1.0), 4) == pytest.approx(uninterrupted[4:])


def test_ssl_recipe_first_step_is_below_the_peak(tmp_path):
    """The SSL Brain (hparams/SSL/conformer.yaml, Noam, 200 warmup steps): its optimizer's first
    step runs at lr / 200 and the second at twice that, not at lr."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from recipe_steps import corpus_batch, recipe_brain

    sizes = {"d_model": 32, "nhead": 2, "num_encoder_layers": 1, "d_ffn": 64,
             "subsampling_conv_channels": 4, "num_classes": 32, "lr": 0.0005}
    brain = recipe_brain("hparams/SSL/conformer.yaml", sizes, "cpu", "fp32", str(tmp_path))
    batch = corpus_batch(brain, 2, 2)
    used = []
    brain.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    brain.fit_batch(batch)
    brain.fit_batch(batch)
    assert used == pytest.approx([0.0005 / 200, 2 * 0.0005 / 200])
