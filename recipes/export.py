#!/usr/bin/env python3
"""Exports a trained run as a self-contained SpeechBrain model folder.

Usage::

    python recipes/export.py <run folder> --out <model folder>

A CTC run (``hparams/CTC/*.yaml``) becomes a folder that SpeechBrain's stock classes load::

    from speechbrain.inference.ASR import EncoderASR, StreamingASR
    asr = EncoderASR.from_hparams(source="<model folder>", savedir="<cache>")
    asr.transcribe_file("audio.wav")
    streaming = StreamingASR.from_hparams(source="<model folder>", savedir="<cache>")
    streaming.transcribe_file_streaming("audio.wav", DynChunkTrainConfig(4, 8),
                                        use_torchaudio_streaming=False)

An SSL run (``hparams/SSL/*.yaml``) becomes a folder that ``modules.interfaces.SSLEncoder``
loads (every layer's output at a chosen context, for downstream tasks).

The folder holds ``hyperparams.yaml`` (an inference file with a ``Pretrainer``), the weights
(a CTC run's average of its best checkpoints, as ``evaluate.py`` decodes with; an SSL run's
best checkpoint, as ``--pretrained_ssl`` loads), the feature statistics, the tokenizer, a model
card ``README.md`` and ``training_record.json`` (commit and command of the run). Nothing in it
refers to the run folder or to this machine: copy it anywhere. Loading it needs this
repository importable (``pip install -e <repo>``: the ``modules`` package). The last stdout
line is JSON: the folder and its files.
"""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import quiet  # noqa: F401  (before SpeechBrain: drops its torchvision line)
import torch
from ruamel.yaml import YAML

from cli import RecipeParser, run_cli
from inference import ROOT, Recognizer
from modules.context import parse_context, parse_contexts
from provenance import best_ssl_checkpoint
from run_folder import find_run_folder, run_hparams_text, run_record

ARCHITECTURE_KEYS = ("compute_features", "normalize", "encoder")
CARD = "README.md"


def architecture(text: str) -> dict[str, str]:
    """The YAML text of the run's ``compute_features``, ``normalize``, ``encoder`` and (CTC)
    ``ctc_head`` nodes, references already resolved by ``train.py``, anchors dropped."""
    yaml = YAML()
    data = yaml.load(text)
    nodes = {}
    for key in (*ARCHITECTURE_KEYS, "ctc_head"):
        if key in data:
            stream = io.StringIO()
            yaml.dump({key: data[key]}, stream)
            nodes[key] = re.sub(r" &id\d+", "", stream.getvalue()).rstrip() + "\n"
    return nodes


def inference_yaml(hparams: dict, nodes: dict[str, str], task: str) -> str:
    """``hyperparams.yaml`` of the exported folder."""
    presets = {name: list(pair) for name, pair in hparams["context_presets"].items()}
    encoder = nodes["encoder"].replace("encoder:", "encoder_network:", 1)
    head = f"""# Exported by recipes/export.py from a {task.upper()} run; model card: README.md.
# Needs this repository importable (pip install -e <repo>) for the modules.* classes.
sample_rate: {hparams["sample_rate"]}
context_presets: {json.dumps(presets)}
trained_contexts: {json.dumps([list(c) for c in trained_contexts(hparams)])}
# EncoderASR and SSLEncoder run under `context` (the run's validation context); another one:
# from_hparams(..., overrides={{"context": [8, 0]}}).
context: {json.dumps(list(default_context(hparams)))}

{nodes["compute_features"]}
{nodes["normalize"]}
{encoder}
"""
    if task == "ssl":
        return head + """modules:
    compute_features: !ref <compute_features>
    normalize: !ref <normalize>
    encoder: !ref <encoder_network>

pretrainer: !new:modules.interfaces.CheckedPretrainer
    loadables:
        encoder_network: !ref <encoder_network>
        normalize: !ref <normalize>
"""
    subsampling = hparams["encoder"].subsampling_factor
    hop = hparams["compute_features"].hop_samples
    return head + f"""{nodes["ctc_head"]}
tokenizer: !new:sentencepiece.SentencePieceProcessor

# speechbrain.inference.ASR.EncoderASR: one offline pass under <context>, greedy CTC.
encoder: !new:modules.interfaces.OfflineCTC
    compute_features: !ref <compute_features>
    normalize: !ref <normalize>
    encoder: !ref <encoder_network>
    head: !ref <ctc_head>
    context: !ref <context>
    presets: !ref <context_presets>
decoding_function: !name:modules.interfaces.greedy_ctc_tokens  # greedy CTC
    blank_index: 0

# speechbrain.inference.ASR.StreamingASR: chunk by chunk under a DynChunkTrainConfig(chunk
# frames, left chunks) = context [chunk * left, chunk - 1] (encoder frames of {subsampling * hop / 16:.0f} ms).
fea_streaming_extractor: !new:modules.interfaces.AudioChunks
    hop_samples: {hop}
    subsampling_factor: {subsampling}
enc: !new:modules.interfaces.StreamingCTC
    compute_features: !ref <compute_features>
    normalize: !ref <normalize>
    encoder: !ref <encoder_network>
proj_enc: !new:torch.nn.Sequential
    - !ref <ctc_head>
    - !new:torch.nn.LogSoftmax
        dim: -1
make_decoder_streaming_context: !name:modules.interfaces.GreedyCTCContext
make_tokenizer_streaming_context: !name:speechbrain.tokenizers.SentencePiece.SentencePieceDecoderStreamingContext
tokenizer_decode_streaming: !name:modules.interfaces.decode_streaming

modules:
    encoder: !ref <encoder>
    enc: !ref <enc>
    proj_enc: !ref <proj_enc>

pretrainer: !new:modules.interfaces.CheckedPretrainer
    loadables:
        encoder_network: !ref <encoder_network>
        ctc_head: !ref <ctc_head>
        normalize: !ref <normalize>
        tokenizer: !ref <tokenizer>
"""


def trained_contexts(hparams: dict) -> list[tuple[int, int]]:
    return parse_contexts(hparams["att_context_size"], hparams["context_presets"])


def default_context(hparams: dict) -> tuple[int, int]:
    """The run's validation context (the one its checkpoints were selected at)."""
    return parse_context(hparams["valid_context"], hparams["context_presets"])


def export_ctc(folder: Path, out: Path) -> dict:
    """Averaged weights, statistics and tokenizer of a CTC run (what ``evaluate.py`` decodes)."""
    recognizer = Recognizer(folder)
    hparams = recognizer.hparams
    torch.save(recognizer.encoder.state_dict(), out / "encoder_network.ckpt")
    torch.save(hparams["ctc_head"].state_dict(), out / "ctc_head.ckpt")
    hparams["normalize"]._save(out / "normalize.ckpt")
    (out / "tokenizer.ckpt").write_bytes(recognizer.sp.serialized_model_proto())
    return hparams


def export_ssl(folder: Path, out: Path) -> dict:
    """The best SSL checkpoint's encoder and statistics (what ``--pretrained_ssl`` loads)."""
    from hyperpyyaml import load_hyperpyyaml

    checkpoint = best_ssl_checkpoint(folder)
    if checkpoint is None:
        raise ValueError(f"{folder}: no SSL checkpoint under {folder / 'save'}")
    for name, target in (("encoder", "encoder_network"), ("normalize", "normalize")):
        shutil.copyfile(checkpoint / f"{name}.ckpt", out / f"{target}.ckpt")
    return load_hyperpyyaml(io.StringIO(run_hparams_text(folder)))


def model_card(folder: Path, hparams: dict, task: str, record: dict, files: list[str]) -> str:
    """README.md: data, sizes, contexts, results found in the run folder, how to load."""
    encoder = hparams["encoder"]
    parameters = sum(p.numel() for p in encoder.parameters())
    frame_ms = encoder.subsampling_factor * 10
    contexts = "\n".join(
        f"| {name} | [{left}, {right}] | {'all' if left == -1 else f'{left * frame_ms / 1000:.2f} s'} "
        f"| {(right + 1) * frame_ms} ms |"
        for name, (left, right) in ((n, tuple(p)) for n, p in hparams["context_presets"].items())
        if (left, right) in trained_contexts(hparams))
    results = sorted(folder.glob("eval_*.md"))
    results_text = "\n\n".join(f"From `{p.name}` (recipes/evaluate.py on this run):\n\n"
                               + p.read_text().strip() for p in results) or (
        "No evaluation was found in the run folder: run `recipes/evaluate.py <run> --test_csv "
        "<csv> --context all --streaming` before exporting to have its table here.")
    load = ("""```python
from speechbrain.inference.ASR import EncoderASR, StreamingASR
from speechbrain.utils.dynamic_chunk_training import DynChunkTrainConfig

asr = EncoderASR.from_hparams(source="<this folder>", savedir="<a cache folder>")
print(asr.transcribe_file("audio.wav"))          # offline, under `context` of hyperparams.yaml

streaming = StreamingASR.from_hparams(source="<this folder>", savedir="<a cache folder>")
config = DynChunkTrainConfig(4, 8)                # chunks of 4 frames, 8 chunks of left: [32, 3]
for piece in streaming.transcribe_file_streaming("audio.wav", config,
                                                 use_torchaudio_streaming=False):
    print(piece, end="", flush=True)
```""" if task == "ctc" else """```python
from modules.interfaces import SSLEncoder

ssl = SSLEncoder.from_hparams(source="<this folder>", savedir="<a cache folder>")
layers = ssl.encode_file("audio.wav", context=[32, 3])   # (layers, 1, frames, d_model)
```""")
    return f"""# {folder.name}: {'streaming CTC recognizer' if task == 'ctc' else 'streaming SSL encoder'}

Exported by `recipes/export.py` from the run `{folder.name}`.

- Task: {task}; encoder `{type(encoder).__name__}`, {len(encoder.layers)} layers, d_model
  {encoder.d_model}, {parameters / 1e6:.2f} M parameters; encoder frames of {frame_ms} ms.
- Trained on: `{Path(str(hparams.get("train_csv"))).name}` (validation
  `{Path(str(hparams.get("valid_csv"))).name}`), sample rate
  {hparams["sample_rate"]} Hz.
- Code: commit `{record.get("code_commit") or record.get("commit") or "unknown"}`; command
  `{" ".join(record.get("command", [])) if isinstance(record.get("command"), list) else record.get("command", "unknown")}`
  (all of it in `training_record.json`).
- Files: {", ".join(f"`{f}`" for f in files)}.

## Contexts it was trained under

A context `[left, right]` counts encoder frames: chunks of `right + 1` frames that also see
`left` frames before them. SpeechBrain's `DynChunkTrainConfig(chunk, left_chunks)` is
`[chunk * left_chunks, chunk - 1]`.

| preset | [left, right] | left | chunk |
|---|---|---|---|
{contexts}

## Results

{results_text}

## Load it

Needs this model's code importable: `pip install -e <the repository>` (the `modules` package).

{load}
"""


def main(argv: list[str]) -> dict:
    parser = RecipeParser(prog="recipes/export.py",
                          description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the --output_folder of a recipes/train.py CTC or SSL run")
    parser.add_argument("--out", required=True, help="the model folder to write (made; an "
                        "existing one must be empty)")
    args = parser.parse_strict(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: not empty; give a new folder")
    folder = find_run_folder(args.run)
    text = run_hparams_text(folder)
    task = "ctc" if re.search(r"^ctc_head:", text, re.MULTILINE) else (
        "ssl" if re.search(r"^task: ssl", text, re.MULTILINE) else None)
    if task is None:
        raise ValueError(f"{folder}: neither a CTC nor an SSL run; nothing to export")
    out.mkdir(parents=True, exist_ok=True)
    hparams = export_ctc(folder, out) if task == "ctc" else export_ssl(folder, out)
    (out / "hyperparams.yaml").write_text(inference_yaml(hparams, architecture(text), task))
    # No machine paths: the training directory dropped, the repository's own paths relative.
    record = json.loads(json.dumps({k: v for k, v in run_record(folder).items() if k != "cwd"}
                                   ).replace(f"{ROOT}/", ""))
    (out / "training_record.json").write_text(json.dumps(record, indent=1) + "\n")
    files = sorted(p.name for p in out.iterdir()) + [CARD]
    (out / CARD).write_text(model_card(folder, hparams, task, record, files))
    return {"model_folder": str(out), "task": task, "files": sorted(files)}


if __name__ == "__main__":
    run_cli(main)
