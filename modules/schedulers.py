"""Learning-rate schedules whose value is set *before* each optimizer step.

SpeechBrain's schedulers are called after a step and set the learning rate of the next one, so
the first step runs at whatever rate the optimizer was created with: the peak, in these hparams
(and with a fresh Adam state). Here a schedule is a function of ``k``, the number of steps the
optimizer has already taken: ``set_lr(optimizer)`` applies the rate of step ``k`` before the step
and ``scheduler(optimizer)`` counts it afterwards (SpeechBrain's call, same checkpoint format).
The count is checkpointed, so the first step after a resume, intra-epoch included, runs at the
rate the uninterrupted run would have used.
"""
from __future__ import annotations

import torch
from speechbrain.nnet.schedulers import LinearWarmupScheduler, NoamScheduler


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Sets ``lr`` in every parameter group of ``optimizer``; returns it."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def warmup_steps(fraction: float, steps: int) -> int:
    """Warmup length of a ``steps``-step schedule: ``round(fraction * steps)``, and at least one
    step whenever ``fraction > 0`` and there is a step to take (0 when ``fraction`` is 0)."""
    if fraction <= 0 or steps <= 0:
        return 0
    return max(1, round(fraction * steps))


class LinearWarmupDecay(LinearWarmupScheduler):
    """Linear warmup to the peak ``initial_value``, then linear decay to 0 at the end of the run.

    Step ``k`` (0-based: the optimizer has taken ``k`` steps) of a schedule with ``W`` warmup
    steps out of ``T`` runs at ``peak * min((k + 1) / (W + 1), (T - k) / (T - W))``: the ``W``
    warmup steps are below the peak (the first at ``peak / (W + 1)``, never 0, so no step is
    wasted), step ``W`` is at the peak, and the rate falls linearly to reach 0 at step ``T``, one
    past the last (the last step runs at ``peak / (T - W)``). ``W = 0``: no warmup, the first
    step at the peak.

    Arguments and checkpoint format: SpeechBrain's ``LinearWarmupScheduler`` (``initial_value``,
    ``num_warmup_steps``, ``num_training_steps``; ``current_step`` = ``k``), so checkpoints of
    either load into the other.

    Example
    -------
    >>> schedule = LinearWarmupDecay(1.0, 2, 6)
    >>> [round(schedule.calculate_lr(k), 3) for k in range(7)]
    [0.333, 0.667, 1.0, 0.75, 0.5, 0.25, 0.0]
    """

    def calculate_lr(self, current_step: int) -> float:
        """The rate of step ``current_step`` (0-based)."""
        warmup, total = self.num_warmup_steps, self.num_training_steps
        rising = (current_step + 1) / (warmup + 1)
        falling = (total - current_step) / max(1, total - warmup)
        return self.lr0 * max(0.0, min(rising, falling))

    def set_lr(self, optimizer: torch.optim.Optimizer) -> float:
        """Before a step: the rate of the step the optimizer is about to take."""
        return apply_lr(optimizer, self.calculate_lr(self.current_step))


class NoamWarmup(NoamScheduler):
    """The Transformer's schedule (Vaswani et al.) with its 1-based step number: step ``k``
    (0-based) runs at ``lr_initial * sqrt(W) * min((k + 1) ** -0.5, (k + 1) * W ** -1.5)``,
    rising linearly from ``lr_initial / W`` to the peak ``lr_initial`` at step ``W - 1``, then
    falling as ``1 / sqrt(k + 1)`` (``model_size`` given: ``model_size ** -0.5`` replaces
    ``sqrt(W)``, as in SpeechBrain). SpeechBrain's ``NoamScheduler`` runs the first step at the
    optimizer's initial rate, the peak; here ``set_lr`` before each step gives it
    ``lr_initial / W``.

    Arguments and checkpoint format: SpeechBrain's ``NoamScheduler`` (``n_steps`` = ``k``).

    Example
    -------
    >>> schedule = NoamWarmup(1.0, 4)
    >>> [round(schedule.lr_of_step(k), 3) for k in range(6)]
    [0.25, 0.5, 0.75, 1.0, 0.894, 0.816]
    """

    def __init__(self, lr_initial: float, n_warmup_steps: int, model_size: int | None = None):
        if n_warmup_steps < 1:  # the formula divides by it
            raise ValueError(f"NoamWarmup: n_warmup_steps must be >= 1, got {n_warmup_steps}")
        super().__init__(lr_initial, n_warmup_steps, model_size)

    def scale_of_step(self, step: int) -> float:
        """The factor of ``lr_initial`` at step ``step`` (0-based)."""
        number = step + 1  # the paper's step_num
        return self.normalize * min(number ** -0.5, number * self.n_warmup_steps ** -1.5)

    def lr_of_step(self, step: int) -> float:
        """The rate of step ``step`` (0-based)."""
        return self.lr_initial * self.scale_of_step(step)

    def _get_lr_scale(self) -> float:
        # SpeechBrain's __call__ counts a step, then sets lr_initial * this for the next one:
        # the rate of step n_steps.
        return self.scale_of_step(self.n_steps)

    def set_lr(self, optimizer: torch.optim.Optimizer) -> float:
        """Before a step: the rate of the step the optimizer is about to take."""
        return apply_lr(optimizer, self.lr_of_step(self.n_steps))
