"""A token language model for shallow fusion (``hparams/LM/transformer.yaml``): SpeechBrain's
``TransformerLM`` trained on transcripts with the tokenizer of an ASR run (``asr_run``), its
model file copied into the LM's run folder so that decoding can check that both share it."""
from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

import speechbrain as sb
from speechbrain.utils.distributed import ddp_all_reduce, if_main_process

from dataio import ManifestError, TextTokens, check_manifest_file, dataset_from_manifest
from inference import TextNormalizer
from run_folder import find_run_folder, run_hparams_text, tokenizer_model
from provenance import hparams_data
from s2s_brain import decoder_io
from streaming_brain import append_history
from modules.lm import file_digest
from modules.schedulers import warmup_steps

logger = logging.getLogger(__name__)


def asr_tokenizer(asr_run: str | None) -> Path:
    """The SentencePiece model file of the ASR run ``asr_run``; one line if there is none."""
    if not asr_run:
        raise SystemExit("error: --asr_run: give the ASR run (a CTC or S2S --output_folder) "
                         "whose tokenizer the LM shares")
    try:
        folder = find_run_folder(asr_run)
    except ValueError as error:
        raise SystemExit(f"error: --asr_run {error}") from None
    model = tokenizer_model(hparams_data(run_hparams_text(folder)))
    if model is None or not model.is_file():
        raise SystemExit(f"error: --asr_run {asr_run}: no tokenizer model in the run "
                         f"({model}); give a CTC or S2S run folder with its save/tokenizer")
    return model


def prepare_tokenizer(unbuilt: dict) -> Path:
    """Copies the ASR run's tokenizer to where the LM's SentencePiece entry loads it from
    (``<save_folder>/tokenizer``), so that loading the hparams never trains another one; a
    resumed LM whose copy differs from ``asr_run``'s is refused."""
    source = asr_tokenizer(unbuilt.get("asr_run"))
    target = tokenizer_model(unbuilt)
    if source.name != target.name:
        kind = source.stem.split("_", 1)
        raise SystemExit(f"error: --asr_run {unbuilt['asr_run']}: its tokenizer is "
                         f"{source.name} but the LM's hparams say {target.name}; pass "
                         f"--vocab_size {kind[0]} --token_type {kind[-1]}")
    if target.is_file():
        if file_digest(target) != file_digest(source):
            raise SystemExit(f"error: {target} (this LM run's tokenizer) differs from --asr_run "
                             f"{unbuilt['asr_run']}'s {source}: the LM was trained for another "
                             "ASR model; give another --output_folder")
        return target
    if if_main_process():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return target


def text_datasets(hparams: dict) -> dict:
    """``DynamicItemDataset``s of transcripts (``wrd`` -> ``tokens``): train from ``train_csv``
    and ``more_text_csvs``; valid and test. Training text sharing a sentence with valid or test
    is refused (the LM would have read the test)."""
    normalizer = TextNormalizer(hparams["tokenizer"].sp)
    sources = [hparams["train_csv"], *hparams["more_text_csvs"]]
    for path in sources:
        check_manifest_file(path, ["ID", "wrd"], "--train_csv / --more_text_csvs")
    rows: dict[str, dict] = {}
    for path in sources:
        replacements = {"data_root": str(hparams["data_folder"])}  # paths are not read
        for key, row in sb.dataio.dataio.load_data_csv(path, replacements).items():
            if key in rows:
                raise ManifestError(f"{path}: utterance ID {key} also in another text CSV; "
                                    "IDs must be unique across train_csv and more_text_csvs")
            rows[key] = {"wrd": row["wrd"]}
    datasets = {"train": sb.dataio.dataset.DynamicItemDataset(rows)}
    training_text = {normalizer(row["wrd"]) for row in rows.values()}
    for name in ("valid", "test"):
        path = hparams[f"{name}_csv"]
        datasets[name] = dataset_from_manifest(path, hparams["data_folder"],
                                               hparams["output_folder"])
        with datasets[name].output_keys_as(["wrd"]):
            shared = {normalizer(item["wrd"]) for item in datasets[name]} & training_text
        if shared:
            raise ManifestError(f"--{name}_csv {path}: {len(shared)} of its sentences are in "
                                f"the LM's training text (e.g. {sorted(shared)[0]!r}); remove "
                                "them from train_csv / more_text_csvs")
    sb.dataio.dataset.add_dynamic_item(list(datasets.values()),
                                       TextTokens(hparams["tokenizer"].sp, normalizer),
                                       takes="wrd", provides=["wrd", "tokens"])
    sb.dataio.dataset.set_output_keys(list(datasets.values()), ["id", "wrd", "tokens"])
    return datasets


class LMBrain(sb.Brain):
    """Next-token cross-entropy of a causal LM over ``bos, tokens`` -> ``tokens, eos``; one
    AdamW with linear warmup and decay; checkpoints kept by valid loss; perplexity per token
    (``eos`` included)."""

    def plan_schedule(self, steps_per_epoch: int) -> None:
        epochs = self.hparams.number_of_epochs
        if self.debug:
            steps_per_epoch = min(steps_per_epoch, self.debug_batches)
            epochs = min(epochs, self.debug_epochs)
        schedule = self.hparams.lr_annealing
        schedule.num_training_steps = max(1, steps_per_epoch * epochs)
        schedule.num_warmup_steps = warmup_steps(self.hparams.warmup_fraction,
                                                 schedule.num_training_steps)

    def on_fit_batch_start(self, batch, should_step):
        if should_step:  # the rate of this very step, set before it
            self.hparams.lr_annealing.set_lr(self.optimizer)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        if should_step:
            self.hparams.lr_annealing(self.optimizer)

    def compute_forward(self, batch, stage):
        tokens, lengths = batch.tokens
        inputs, targets = decoder_io(tokens, lengths, self.hparams.bos_index,
                                     self.hparams.eos_index)
        return self.modules.lm(inputs.to(self.device)), targets.to(self.device)

    def compute_objectives(self, predictions, batch, stage):
        logits, targets = predictions
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-1,
                              reduction="sum")
        count = int((targets >= 0).sum())
        self.nll_sum += float(nll.detach())
        self.token_count += count
        return nll / max(count, 1)

    def on_stage_start(self, stage, epoch=None):
        self.nll_sum, self.token_count = 0.0, 0

    def on_stage_end(self, stage, stage_loss, epoch=None):
        totals = torch.tensor([self.nll_sum, float(self.token_count)], device=self.device)
        if torch.distributed.is_initialized():  # every rank's share of the stage
            totals = ddp_all_reduce(totals, torch.distributed.ReduceOp.SUM)
        per_token = float(totals[0] / totals[1].clamp(min=1))
        stats = {"loss": per_token, "perplexity": math.exp(per_token)}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        if stage == sb.Stage.VALID:
            lr = self.optimizer.param_groups[0]["lr"]
            self.hparams.train_logger.log_stats(stats_meta={"epoch": epoch, "lr": lr},
                                                train_stats=self.train_stats, valid_stats=stats)
            if if_main_process():
                append_history(self.hparams.output_folder,
                               {"epoch": epoch, "train": self.train_stats, "valid": stats})
            self.checkpointer.save_and_keep_only(meta={"loss": per_token}, min_keys=["loss"],
                                                 num_to_keep=self.hparams.checkpoints_to_keep)
        else:
            self.test_stats = stats
            self.hparams.train_logger.log_stats(stats_meta={"test": "best valid loss"},
                                                test_stats=stats)

