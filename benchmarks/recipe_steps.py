"""Training steps of the recipes themselves, for ``throughput.py`` and ``gpu_check.py``.

A step is ``Brain.fit_batch`` of ``recipes/train.py``'s SSL or CTC Brain, built from its hparams
file: features, quantizer targets, masking, the encoder under the step's context, autocast, the
backward pass, gradient clipping and the optimizer, on a batch of real speech from the shipped
corpus (its utterances joined end to end to the length asked for).
"""
from __future__ import annotations

import csv
import re
import statistics
import sys
import time
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "recipes")]
from dataio import load_audio  # noqa: E402
from modules.context import ContextSampler, parse_context  # noqa: E402
from train import BRAINS, load_hparams  # noqa: E402

CORPUS = ROOT / "data" / "espeak_corpus"


def recipe_brain(hparams_file: str, overrides: dict, device: str, precision: str,
                 output_folder: str) -> sb.Brain:
    """The recipe's Brain for ``hparams_file`` (relative to the repository), ready to step.

    Overrides of keys the file does not have (``nhead`` for ConMamba) are left out, with a note.
    """
    keys = set(re.findall(r"^(\w+):", (ROOT / hparams_file).read_text(), flags=re.MULTILINE))
    if set(overrides) - keys:
        print(f"{hparams_file}: no {sorted(set(overrides) - keys)}, left out", file=sys.stderr)
    hparams = load_hparams(str(ROOT / hparams_file), {
        "output_folder": output_folder, "data_folder": str(CORPUS),
        **{key: value for key, value in overrides.items() if key in keys}})
    brain = BRAINS[hparams["task"]](
        modules=hparams["modules"], opt_class=hparams.get("optimizer"), hparams=hparams,
        run_opts={"device": device, "precision": precision, "noprogressbar": True},
        checkpointer=hparams["checkpointer"])
    brain.init_optimizers()
    if hparams["task"] == "ctc":  # LR schedule of a 1000-step run, past the head-only phase
        brain.plan_schedule(1000 // hparams["number_of_epochs"] or 1)
        brain.optimizer_step = brain.head_only_steps
    brain.hparams.epoch_counter.current = 1  # in epoch 1: feature statistics frozen
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    return brain


def corpus_batch(brain: sb.Brain, batch_size: int, seconds: float) -> PaddedBatch:
    """``batch_size`` items of at least ``seconds`` of speech: shipped training utterances joined
    end to end (with their words and CTC tokens for a CTC Brain)."""
    with open(CORPUS / "train.csv") as f:
        rows = list(csv.DictReader(f))
    sp = brain.hparams.tokenizer.sp if hasattr(brain.hparams, "tokenizer") else None
    items, next_row = [], 0
    for index in range(batch_size):
        pieces, words = [], []
        while sum(len(p) for p in pieces) < seconds * brain.hparams.sample_rate:
            row = rows[next_row % len(rows)]
            next_row += 1
            pieces.append(load_audio(row["wav"].replace("$data_root", str(CORPUS))))
            words.append(row["wrd"])
        item = {"id": f"joined{index}", "sig": torch.cat(pieces)}
        if sp is not None:
            item["wrd"] = " ".join(words)
            item["tokens"] = torch.LongTensor(sp.encode_as_ids(item["wrd"])) + 1
        items.append(item)
    batch = PaddedBatch(items)  # on the CPU, as the recipe's loader gives it
    wavs, wav_lens = (t.to(brain.device) for t in batch.sig)  # (PaddedBatch.to is in place)
    with torch.no_grad():  # feature statistics, as the recipe's pass before training sets them
        brain.compute_features(wavs, wav_lens, update_stats=True)
    return batch


def timed_steps(brain: sb.Brain, batch: PaddedBatch, context, steps: int,
                warmup: int = 1) -> dict:
    """``warmup + steps`` optimizer steps under one fixed ``context`` (a preset or pair).

    Returns
    -------
    step_seconds (median of the timed steps), losses (all), audio_seconds (per step),
    peak_mib (CUDA: peak allocated memory over the timed steps; None elsewhere).
    """
    presets = brain.hparams.context_presets
    brain.hparams.context_sampler = ContextSampler([list(parse_context(context, presets))])
    cuda = brain.device.startswith("cuda")
    times, losses = [], []
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
            if step == warmup:
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        losses.append(float(brain.fit_batch(batch)))  # ends with the loss on the CPU
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    wav_lens = batch.sig[1]
    audio = float(wav_lens.sum()) * batch.sig[0].shape[1] / brain.hparams.sample_rate
    return {"step_seconds": statistics.median(times[warmup:]), "losses": losses,
            "audio_seconds": round(audio, 2),
            "peak_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20) if cuda else None}
