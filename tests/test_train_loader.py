"""The training loader of recipes/train.py: a new order every epoch, drawn from the hparams
``seed``, and the same order for the rest of an epoch after a resume (issue 21, defect 2)."""
import pytest
import speechbrain as sb
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.checkpoints import Checkpointer

from train import make_train_loader

DURATIONS = [1.0 + 0.37 * (i % 11) for i in range(40)]


def loader_and_brain(seed: int, dynamic: bool):
    data = {f"utt{i:02d}": {"duration": d} for i, d in enumerate(DURATIONS)}
    dataset = DynamicItemDataset(data)
    dataset.set_output_keys(["id"])
    hparams = {"seed": seed, "dynamic_batching": dynamic, "max_batch_length": 8.0,
               "num_workers": 0, "train_dataloader_opts": {"batch_size": 4, "shuffle": True}}
    brain = sb.Brain(modules={}, run_opts={"device": "cpu", "noprogressbar": True})
    return make_train_loader(brain, dataset, hparams), brain


def epoch_batches(loader, brain, epoch: int) -> list[tuple]:
    """What SpeechBrain's fit does before each epoch, then the epoch's batches."""
    brain.train_sampler.set_epoch(epoch)
    return [tuple(batch.id) for batch in loader]


@pytest.mark.parametrize("dynamic", [False, True], ids=["shuffled", "dynamic_batches"])
def test_each_epoch_has_its_own_order_drawn_from_the_seed(dynamic):
    loader, brain = loader_and_brain(seed=3, dynamic=dynamic)
    first, second = epoch_batches(loader, brain, 1), epoch_batches(loader, brain, 2)
    assert first != second
    assert sorted(i for b in first for i in b) == sorted(i for b in second for i in b)
    again, brain_again = loader_and_brain(seed=3, dynamic=dynamic)
    assert epoch_batches(again, brain_again, 2) == second  # reproducible
    other, brain_other = loader_and_brain(seed=4, dynamic=dynamic)
    assert epoch_batches(other, brain_other, 1) != first  # the hparams seed, not a default


@pytest.mark.parametrize("dynamic", [False, True], ids=["shuffled", "dynamic_batches"])
def test_a_resumed_epoch_continues_in_the_same_order(tmp_path, dynamic):
    loader, brain = loader_and_brain(seed=3, dynamic=dynamic)
    epoch_batches(loader, brain, 1)
    brain.train_sampler.set_epoch(2)
    iterator = iter(loader)
    done = [tuple(next(iterator).id) for _ in range(3)]
    Checkpointer(tmp_path, {"loader": loader}).save_checkpoint(end_of_epoch=False)
    rest = [tuple(batch.id) for batch in iterator]

    resumed, resumed_brain = loader_and_brain(seed=3, dynamic=dynamic)
    Checkpointer(tmp_path, {"loader": resumed}).recover_if_possible()
    assert done + epoch_batches(resumed, resumed_brain, 2) == done + rest
