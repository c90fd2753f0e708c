#!/usr/bin/env python3
"""The one entry point of every task: the hparams file's ``task`` picks the Brain.

``task: ssl``: streaming self-supervised pretraining (``ssl_brain.py``, BEST-RQ / NEST-style
masked-token prediction); ``task: ctc``: CTC fine-tuning or training from scratch
(``ctc_brain.py``); ``task: s2s``: joint CTC / attention with a Transformer or Mamba decoder
(``s2s_brain.py``); ``task: lm``: a token language model for fusion, on transcripts, with an
ASR run's tokenizer (``lm_brain.py``); ``task: ngram``: the same text counted into a KenLM
n-gram (``ngram_lm.py``, no Brain); ``task: classify``: downstream utterance classification on an exported SSL
encoder, a random one or features (``classify_brain.py``). All extend ``streaming_brain.py``;
the command line (device presets, the SSL run's sizes, ``--help``) is ``command_line.py``. The encoder, masker, quantizer, context sampler
and schedule are all defined in the hparams file; this file holds the data pipeline, the
training loop's setup and the JSON summary.

Usage::

    python recipes/train.py hparams/SSL/conformer.yaml [--device_preset cpu|cuda|mps] \\
        [--debug] [--any_hparam value ...]
    torchrun --nproc_per_node=8 recipes/train.py hparams/SSL/conformer.yaml ...   # DDP

The last line printed to stdout (by the main process only) is one JSON object summarizing the run.
"""
from __future__ import annotations

import distributed_exit  # first: its exit hook must run after every other one
import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

import quiet  # noqa: F401  before SpeechBrain: silences its import-time torchvision warning
import speechbrain as sb
from speechbrain.dataio.sampler import DynamicBatchSampler, ReproducibleRandomSampler
from speechbrain.utils.distributed import if_main_process, run_on_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataio import (  # noqa: E402
    AudioFileError,
    AudioReader,
    LabelIndex,
    ManifestError,
    TextTokens,
    check_manifest,
    check_manifest_file,
    dataset_from_manifest,
)
from inference import TextNormalizer, check_device, selection_key  # noqa: E402
from provenance import (  # noqa: E402
    best_ssl_checkpoint,
    check_resume,
    hparams_data,
    run_record,
    write_json_atomic,
)
from modules.checkpointing import CpuSeconds, RandomState  # noqa: E402

from command_line import NOTES, load_hparams, parse_command_line, resolve_hparams  # noqa: E402
from classify_brain import ClassifyBrain  # noqa: E402
from ctc_brain import CTCBrain  # noqa: E402
from lm_brain import LMBrain, prepare_tokenizer, text_datasets  # noqa: E402
from ngram_lm import train_ngram  # noqa: E402
from s2s_brain import S2SBrain, check_decoding  # noqa: E402
from ssl_brain import SSLBrain  # noqa: E402

logger = logging.getLogger(__name__)

BRAINS = {"ssl": SSLBrain, "ctc": CTCBrain, "s2s": S2SBrain, "lm": LMBrain,
          "classify": ClassifyBrain}
# Tasks that test after training (on test_csv); tasks that read transcripts with audio.
TESTED = ("ctc", "s2s", "lm", "classify")
TRANSCRIBED = ("ctc", "s2s")


def dataio_prepare(hparams: dict) -> dict:
    """``DynamicItemDataset``s (train, valid, and test for CTC) reading validated audio as ``sig``.

    For CTC, items also carry ``wrd`` and ``tokens`` (tokenizer ids + 1; 0 is the blank); for
    classification, ``label_encoded`` (the ``label`` column's index in ``label_encoder``).
    """
    compute_features = hparams["compute_features"]
    # Shortest usable audio: enough samples for one encoder frame of features.
    min_samples = compute_features.min_samples(hparams["subsampling_factor"])
    names = ["train", "valid"] + (["test"] if hparams["task"] in TESTED else [])
    datasets = {}
    for name in names:
        manifest = hparams[f"{name}_csv"]
        dataset = dataset_from_manifest(manifest, hparams["data_folder"], hparams["output_folder"])
        if hparams["check_audio"]:  # on the main process; torchrun stops the others on error
            run_on_main(check_manifest, [dataset, manifest, hparams["sample_rate"], min_samples])
        datasets[name] = dataset
    if hparams["sorting"] in ("ascending", "descending"):
        datasets["train"] = datasets["train"].filtered_sorted(
            sort_key="duration", reverse=hparams["sorting"] == "descending")
        hparams["train_dataloader_opts"]["shuffle"] = False
    for name in names[1:]:
        datasets[name] = datasets[name].filtered_sorted(sort_key="duration")

    sb.dataio.dataset.add_dynamic_item(list(datasets.values()),
                                       AudioReader(hparams["sample_rate"], min_samples),
                                       takes="wav", provides="sig")
    keys = ["id", "sig"]
    if hparams["task"] in TRANSCRIBED:
        sb.dataio.dataset.add_dynamic_item(list(datasets.values()),
                                           TextTokens(hparams["tokenizer"].sp,
                                                      TextNormalizer(hparams["tokenizer"].sp)),
                                           takes="wrd", provides=["wrd", "tokens"])
        keys += ["wrd", "tokens"]
    if hparams["task"] == "classify":
        encode_labels(datasets, hparams)
        keys.append("label_encoded")
    sb.dataio.dataset.set_output_keys(list(datasets.values()), keys)
    return datasets


def encode_labels(datasets: dict, hparams: dict) -> None:
    """The classes of the training set, in ``<save_folder>/label_encoder.txt`` (kept across
    resumes), as ``label_encoded``; a label of valid or test unseen in training, or a class count
    other than ``num_classes``, stops with a line naming the manifest and the fix."""
    label_encoder = hparams["label_encoder"]
    path = Path(hparams["save_folder"]) / "label_encoder.txt"
    run_on_main(label_encoder.load_or_create,
                kwargs={"path": path, "from_didatasets": [datasets["train"]],
                        "output_key": "label"})
    if not if_main_process():  # DDP: what the main process wrote
        label_encoder.load(path)
    if len(label_encoder) != hparams["num_classes"]:
        raise ManifestError(f"{hparams['train_csv']}: {len(label_encoder)} classes in its label "
                            f"column but num_classes is {hparams['num_classes']}; pass "
                            f"--num_classes {len(label_encoder)}")
    for name in ("valid", "test"):
        with datasets[name].output_keys_as(["label"]):
            labels = {item["label"] for item in datasets[name]}
        unknown = sorted(labels - set(label_encoder.lab2ind))
        if unknown:
            raise ManifestError(f"{hparams[name + '_csv']}: labels {unknown} never occur in "
                                f"--train_csv {hparams['train_csv']}; the classifier cannot "
                                "output them: give every class training examples")
    sb.dataio.dataset.add_dynamic_item(
        list(datasets.values()), LabelIndex(label_encoder), takes="label", provides="label_encoded")


def make_train_loader(brain: sb.Brain, train_set, hparams: dict):
    """The training DataLoader, its order drawn from ``seed`` and new every epoch.

    Shuffling uses a ``ReproducibleRandomSampler`` and dynamic batching (``dynamic_batching``) a
    ``DynamicBatchSampler``, both seeded with ``seed``: a sampler draws its order from
    ``seed + epoch`` when ``set_epoch`` is called. SpeechBrain calls it on
    ``brain.train_sampler`` before each epoch but, in a single process, sets that attribute only
    for the sampler it makes itself (not for a batch sampler), so it is set here: otherwise every
    epoch would repeat the first one's batches. Under DDP SpeechBrain wraps the sampler (the
    wrapper passes ``set_epoch`` on). A resumed run regenerates its epoch's order and skips the
    batches already done (the loader's position is checkpointed).
    """
    seed = hparams["seed"]
    if hparams["dynamic_batching"]:
        sampler = DynamicBatchSampler(
            train_set, max_batch_length=hparams["max_batch_length"], num_buckets=20,
            length_func=lambda item: float(item["duration"]), shuffle=True, seed=seed)
        options = {"num_workers": hparams["num_workers"], "batch_sampler": sampler}
    else:
        options = dict(hparams["train_dataloader_opts"])
        sampler = None
        if options.pop("shuffle", False):
            sampler = options["sampler"] = ReproducibleRandomSampler(train_set, seed=seed)
    # The loader's own generator: starting an epoch draws a seed from it (for its workers), not
    # from the global generator that masks and dropout use (restored with checkpoints), so a run
    # resumed in the middle of an epoch makes the same draws as an uninterrupted one.
    options["generator"] = torch.Generator().manual_seed(seed)
    options["pin_memory"] = str(brain.device).startswith("cuda")  # copies that do not block
    loader = brain.make_dataloader(train_set, sb.Stage.TRAIN, **options)
    if brain.train_sampler is None:
        brain.train_sampler = sampler
    return loader


def load_pretrained_ssl(hparams: dict, ssl_folder: str) -> None:
    """Loads the encoder and the feature statistics of the best SSL checkpoint (Pretrainer)."""
    checkpoint = best_ssl_checkpoint(ssl_folder)
    if checkpoint is None:
        raise FileNotFoundError(f"--pretrained_ssl {ssl_folder}: no checkpoint under "
                                f"{Path(ssl_folder) / 'save'}; give an SSL output folder")
    pretrainer = sb.utils.parameter_transfer.Pretrainer(
        collect_in=Path(hparams["save_folder"]) / "pretrained_ssl",
        loadables={"encoder": hparams["encoder"], "normalize": hparams["normalize"]},
        paths={name: str(checkpoint / f"{name}.ckpt") for name in ("encoder", "normalize")})
    run_on_main(pretrainer.collect_files)
    try:
        pretrainer.load_collected()
    except RuntimeError as error:  # shapes differ: PyTorch lists every mismatching tensor
        if "size mismatch" not in str(error):
            raise
        first = [line.strip() for line in str(error).splitlines() if "size mismatch" in line][0]
        raise SystemExit(f"error: --pretrained_ssl {ssl_folder}: its encoder has other sizes "
                         f"than this run's ({first}); give the SSL "
                         "run's sizes (its hyperparams.yaml: d_model, num_encoder_layers, ...)"
                         ) from None
    logger.info("Encoder and feature statistics loaded from %s", checkpoint)


def check_manifests(hparams: dict) -> None:
    """Each manifest of the run exists, has a row and the columns the task reads (CTC: ``wrd``
    too, classification ``label``); else one ``ManifestError`` line naming the file and its ``--<name>_csv``."""
    names = ["train_csv", "valid_csv"]
    columns = ["ID", "duration", "wav"]
    if hparams.get("task") in ("lm", "ngram"):  # text (train_csv, more_text_csvs: lm_brain.py)
        names, columns = ["valid_csv", "test_csv"], ["ID", "wrd"]
    if hparams.get("task") in TRANSCRIBED:
        names += ["test_csv", "tokenizer_csv"]
        columns.append("wrd")
    if hparams.get("task") == "classify":
        names.append("test_csv")
        columns.append("label")
    for name in names:
        if hparams.get(name):
            check_manifest_file(hparams[name], columns, f"--{name}")


def peak_memory(device: str) -> float:
    """Peak memory of this process in MB: allocated GPU memory on CUDA, resident memory else."""
    if str(device).startswith("cuda"):
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def main(argv: list[str]) -> dict | None:
    """Trains (CTC, classification: then tests); returns the summary on the main process, None on the others."""
    hparams_file, run_opts, overrides = parse_command_line(argv)
    try:
        check_device(run_opts.device)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    sb.utils.distributed.ddp_init_group(run_opts)  # before the hparams load (see load_hparams)
    # Before loading (which writes into the output folder): a folder with checkpoints is resumed
    # only under the hparams it ran with.
    resolved = resolve_hparams(hparams_file, overrides)
    resuming = check_resume(resolved)
    unbuilt = hparams_data(resolved)  # checked before the tokenizer trains on a manifest
    check_manifests(unbuilt)
    if unbuilt.get("task") == "s2s":
        check_decoding(unbuilt.get("decoding"))
    if unbuilt.get("task") in ("lm", "ngram"):  # the ASR run's tokenizer, where loading finds it
        run_on_main(prepare_tokenizer, args=[unbuilt])
    hparams = load_hparams(hparams_file, overrides)
    if hparams["task"] not in (*BRAINS, "ngram"):
        raise SystemExit(f"error: task {hparams['task']!r} in {hparams_file}; known: "
                         f"{[*BRAINS, 'ngram']}")
    # <output_folder>/hyperparams.yaml: the experiment as run (overrides applied), which
    # evaluate.py and transcribe.py take as their hparams file; written once, not on a resume.
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=None if resuming else hparams_file,
                                   overrides=overrides)
    for note in NOTES:
        logger.info(note)
    record = None
    if if_main_process():  # what produced this run; also in the summary
        record = run_record(argv, hparams_file, overrides,
                            hparams.get("pretrained_ssl") or hparams.get("ssl_model"))
        write_json_atomic(Path(hparams["output_folder"]) / "run_record.json", record)
    if hparams["task"] in TRANSCRIBED + ("lm", "ngram"):
        pieces = hparams["tokenizer"].sp.get_piece_size()
        if pieces != hparams["vocab_size"]:
            raise SystemExit(f"error: the {hparams['token_type']} tokenizer of {hparams_file} has "
                             f"{pieces} tokens but vocab_size is {hparams['vocab_size']}; "
                             f"pass --vocab_size {pieces}")
    if hparams["task"] == "ngram":  # counted by KenLM, no Brain (ngram_lm.py)
        datasets = text_datasets(hparams)
        return {**train_ngram(hparams, datasets), "record": record} if if_main_process() \
            else None
    # Masks, dropout and noise continue exactly after a resume; optional, so that checkpoints
    # written before it existed still load.
    hparams["checkpointer"].add_recoverable("random_state", RandomState(), optional_load=True)
    cpu = CpuSeconds()  # the run's cost across resumes (optional: older checkpoints lack it)
    hparams["checkpointer"].add_recoverable("cpu_seconds", cpu, optional_load=True)
    datasets = text_datasets(hparams) if hparams["task"] == "lm" else dataio_prepare(hparams)
    if hparams.get("pretrained_ssl"):
        load_pretrained_ssl(hparams, hparams["pretrained_ssl"])
    brain = BRAINS[hparams["task"]](modules=hparams["modules"], opt_class=hparams.get("optimizer"),
                                    hparams=hparams, run_opts=run_opts,
                                    checkpointer=hparams["checkpointer"])
    brain.train_set = datasets["train"]
    train_loader = make_train_loader(brain, datasets["train"], hparams)
    if hparams["task"] in TESTED:
        brain.plan_schedule(len(train_loader) // hparams["grad_accumulation_factor"])
    start = time.time()
    brain.fit(brain.hparams.epoch_counter, train_loader, datasets["valid"],
              valid_loader_kwargs=hparams["valid_dataloader_opts"])
    train_seconds = round(time.time() - start, 1)
    if hparams["task"] in TESTED:
        min_key = {"classify": "error", "lm": "loss"}.get(hparams["task"]) or selection_key(
            brain.checkpointer)
        brain.evaluate(datasets["test"], min_key=min_key,
                       test_loader_kwargs=hparams["valid_dataloader_opts"])
    if not if_main_process():
        return None
    history = json.loads((Path(hparams["output_folder"]) / "history.json").read_text())
    output_folder = str(Path(hparams["output_folder"]).resolve())
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    peak_memory_mb = peak_memory(brain.device)
    # The training stages alone (no validation, statistics pass or test): for throughput.
    common = {key: round(sum(h.get(key, 0.0) for h in history), 1)
              for key in ("train_stage_seconds", "train_audio_seconds")}
    # CPU time of the run (main process) across resumes, the part before this process apart.
    common.update(cpu_seconds=round(cpu.total(), 1),
                  cpu_seconds_before_resume=round(cpu.before_resume, 1), record=record)
    if brain.debug and not brain.debug_persistently:
        # SpeechBrain wrote them to a temporary folder, deleted at exit: say so, not only the
        # output folder (its logs stay).
        common["checkpoints"] = "none kept: --debug checkpoints are temporary (deleted at exit)"
        logger.warning("--debug: checkpoints were temporary and are deleted; %s holds logs only "
                       "(cannot be evaluated or resumed); run without --debug to keep them",
                       output_folder)
    if hparams["task"] == "ssl":
        return {
            "ssl_valid_loss_first": history[0]["valid"]["loss"],
            "ssl_valid_loss_last": history[-1]["valid"]["loss"],
            "ssl_masked_acc": history[-1]["valid"]["masked_acc"],
            "ssl_chance_acc": 1.0 / hparams["num_classes"],
            "ssl_code_usage": history[-1]["valid"]["code_usage"],
            "epochs": len(history),
            "train_seconds": train_seconds,
            "world_size": world_size,
            "peak_memory_mb": peak_memory_mb,
            "output_folder": output_folder,
            **common,
        }
    if hparams["task"] == "classify":
        return {
            "test_accuracy": brain.test_stats["accuracy"],
            "valid_accuracy_best": max(h["valid"]["accuracy"] for h in history),
            "valid_accuracy_last": history[-1]["valid"]["accuracy"],
            "upstream": hparams["upstream"], "context": list(brain.context),
            "epochs": len(history), "train_seconds": train_seconds, "world_size": world_size,
            "peak_memory_mb": peak_memory_mb, "output_folder": output_folder, **common,
        }
    if hparams["task"] == "lm":
        return {
            "lm_test_perplexity": brain.test_stats["perplexity"],
            "lm_valid_perplexity_best": min(h["valid"]["perplexity"] for h in history),
            "epochs": len(history), "train_seconds": train_seconds, "world_size": world_size,
            "lm_hparams": str(Path(output_folder) / "hyperparams.yaml"),
            "lm_output_folder": output_folder, **common,
        }
    task = hparams["task"]  # ctc_* or s2s_* keys; valid: greedy CTC, test: the decoding's
    return {
        f"{task}_wer": brain.test_stats["WER"], f"{task}_cer": brain.test_stats["CER"],
        f"{task}_valid_wer_first": history[0]["valid"]["WER"],
        f"{task}_valid_wer_last": history[-1]["valid"]["WER"],
        f"{task}_valid_cer_first": history[0]["valid"]["CER"],
        f"{task}_valid_cer_last": history[-1]["valid"]["CER"],
        **({"decoding": hparams["decoding"]} if task == "s2s" else {}),
        "epochs": len(history), "train_seconds": train_seconds, "world_size": world_size,
        "peak_memory_mb": peak_memory_mb, f"{task}_hparams": str(Path(output_folder) / "hyperparams.yaml"),
        f"{task}_output_folder": output_folder, **common,
    }


if __name__ == "__main__":
    finished = False
    try:
        result = main(sys.argv[1:])
        if result is not None:
            print(json.dumps(result))
        finished = True
    except (AudioFileError, FileNotFoundError, ManifestError) as error:
        # Also raised inside DataLoader workers: keep the message, drop the worker traceback.
        raise SystemExit(f"error: {str(error).strip().splitlines()[-1] if 'Traceback' in str(error) else error}")
    finally:
        if torch.distributed.is_initialized():
            distributed_exit.leave_process_group(finished)
