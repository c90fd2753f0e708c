"""Audio loading with clear errors, manifest checks, and SpeechBrain datasets from manifests."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Callable

import soundfile as sf
import speechbrain as sb
import torch


class AudioFileError(ValueError):
    """A manifest entry whose audio cannot be used; the message names the file and the fix."""


class ManifestError(ValueError):
    """A manifest that cannot be used as a whole; the message names the file and the fix."""


def check_manifest_file(path: str | Path, columns: list[str], flag: str = "the manifest"
                        ) -> None:
    """A manifest with at least one entry and, for a CSV, the ``columns``; else one line.

    Arguments
    ---------
    path : a SpeechBrain CSV or a NeMo JSON-lines manifest (``.json``, ``.jsonl``; its columns
        are made by :func:`nemo_manifest_to_csv`).
    columns : the CSV columns the task reads.
    flag : the option that names the file, for the message (``--train_csv``).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{flag} {path}: not found; see README.md for data preparation")
    with open(path, newline="") as f:
        if path.suffix in (".json", ".jsonl"):
            if not any(line.strip() for line in f):
                raise ManifestError(f"{flag} {path}: no entries; give a manifest with at least "
                                    "one line")
            return
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        has_row = any(any(cell.strip() for cell in row) for row in reader)
    missing = [c for c in columns if c not in header]
    if missing:
        raise ManifestError(f"{flag} {path}: no column {', '.join(missing)} (header: "
                            f"{','.join(header) or 'empty'}); a CSV needs {','.join(columns)}")
    if not has_row:
        raise ManifestError(f"{flag} {path}: a header and no entries; give a manifest with at "
                            "least one row")


def load_audio(path: str, sample_rate: int = 16000, min_samples: int = 1) -> torch.Tensor:
    """Reads a mono audio file as a float32 (samples,) tensor, or raises ``AudioFileError``.

    Rejects: missing, undecodable or empty files, another sample rate, more than one channel,
    fewer than ``min_samples`` samples, and NaN / infinite samples.
    """
    _check_header(path, sample_rate, min_samples)
    try:
        audio, _ = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as error:
        raise AudioFileError(f"{path}: cannot be decoded ({error}); re-encode it as WAV/FLAC") from None
    audio = torch.from_numpy(audio[:, 0])
    if not torch.isfinite(audio).all():
        raise AudioFileError(f"{path}: contains NaN or infinite samples; fix or remove this file")
    return audio


def _check_header(path: str, sample_rate: int, min_samples: int) -> None:
    """The checks that need only the file header."""
    if not os.path.isfile(path):
        raise AudioFileError(f"{path}: file not found; check the manifest's paths and data root")
    if os.path.getsize(path) == 0:
        raise AudioFileError(f"{path}: file is empty; remove it from the manifest")
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError) as error:
        raise AudioFileError(f"{path}: not a readable audio file ({error}); re-encode it as WAV/FLAC") from None
    if info.samplerate != sample_rate:
        raise AudioFileError(
            f"{path}: sample rate {info.samplerate} Hz, expected {sample_rate} Hz; "
            f"resample it, e.g. `sox in.wav -r {sample_rate} out.wav`")
    if info.channels != 1:
        raise AudioFileError(
            f"{path}: {info.channels} channels, expected mono; downmix it, e.g. `sox in.wav -c 1 out.wav`")
    if info.frames < min_samples:
        raise AudioFileError(
            f"{path}: {info.frames} samples ({info.frames / sample_rate * 1000:.0f} ms) is shorter than "
            f"one encoder frame ({min_samples} samples); remove it from the manifest")


def check_manifest(dataset: sb.dataio.dataset.DynamicItemDataset, name: str,
                   sample_rate: int = 16000, min_samples: int = 1, max_listed: int = 10) -> None:
    """Checks every file's header before training starts, and lists all the bad ones at once."""
    problems = []
    with dataset.output_keys_as(["wav"]):
        for item in dataset:
            try:
                _check_header(item["wav"], sample_rate, min_samples)
            except AudioFileError as error:
                problems.append(str(error))
    if problems:
        listed = "\n  ".join(problems[:max_listed])
        more = f"\n  ... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        raise AudioFileError(f"{len(problems)} bad audio file(s) in {name}:\n  {listed}{more}")


class AudioReader:
    """Dataset pipeline ``wav -> sig``: ``load_audio`` with the recipe's settings.

    A class rather than a closure so that DataLoader workers started with ``spawn`` (macOS,
    MPS) can pickle it.
    """

    def __init__(self, sample_rate: int, min_samples: int = 1):
        self.sample_rate, self.min_samples = sample_rate, min_samples

    def __call__(self, wav: str) -> torch.Tensor:
        return load_audio(wav, self.sample_rate, self.min_samples)


class TextTokens:
    """Dataset pipeline ``wrd -> wrd, tokens``: tokenizer ids + 1 (index 0 is the CTC blank).

    ``normalize`` (e.g. ``inference.TextNormalizer``) maps the text to the tokenizer's case and
    spacing before encoding: lowercase references of an uppercase model are not all unknown
    tokens. ``wrd`` stays as written. Picklable like ``AudioReader`` (so is the SentencePiece
    processor it holds), as long as ``normalize`` is.
    """

    def __init__(self, sp, normalize: Callable[[str], str] | None = None):
        self.sp, self.normalize = sp, normalize

    def __call__(self, wrd: str):
        yield wrd
        text = self.normalize(wrd) if self.normalize is not None else wrd
        yield torch.LongTensor(self.sp.encode_as_ids(text)) + 1


class LabelIndex:
    """A ``label`` -> (1,) class index of ``label_encoder`` (a class: picklable, see
    ``AudioReader``)."""

    def __init__(self, label_encoder):
        self.label_encoder = label_encoder

    def __call__(self, label: str) -> torch.Tensor:
        return torch.LongTensor([self.label_encoder.encode_label(label)])


def nemo_manifest_to_csv(manifest: str | Path, csv_path: str | Path) -> Path:
    """Converts a NeMo JSON-lines manifest (``audio_filepath, duration, text``) to a CSV.

    Relative ``audio_filepath`` values are resolved against the manifest's folder.
    """
    manifest, csv_path = Path(manifest), Path(csv_path)
    rows = []
    with open(manifest) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                audio = Path(entry["audio_filepath"])
                duration = float(entry["duration"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(
                    f"{manifest}:{line_number}: not a NeMo manifest line with audio_filepath "
                    f"and duration ({error})") from None
            if not audio.is_absolute():
                audio = manifest.parent / audio
            utt_id = f"{audio.stem}_{line_number}"
            rows.append([utt_id, f"{duration:.3f}", str(audio), entry.get("speaker", "unknown"),
                         entry.get("text", "")])
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    partial = csv_path.with_suffix(f".{os.getpid()}.tmp")  # DDP ranks may convert at once
    with open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"])
        writer.writerows(rows)
    os.replace(partial, csv_path)
    return csv_path


def dataset_from_manifest(path: str | Path, data_root: str | Path, work_folder: str | Path
                          ) -> sb.dataio.dataset.DynamicItemDataset:
    """A ``DynamicItemDataset`` from a SpeechBrain CSV or a NeMo JSON manifest.

    ``$data_root`` in the CSV's paths is replaced by ``data_root``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found; see README.md for data preparation")
    if path.suffix in (".json", ".jsonl"):
        path = nemo_manifest_to_csv(path, Path(work_folder) / f"{path.stem}.csv")
    return sb.dataio.dataset.DynamicItemDataset.from_csv(
        csv_path=str(path), replacements={"data_root": str(data_root)})
