#!/usr/bin/env python3
"""Data preparation: LibriSpeech folders, NeMo JSON manifests and noise folders -> SpeechBrain CSVs.

Usage::

    python recipes/prepare_data.py librispeech --data_folder /data/LibriSpeech \\
        --save_folder data/librispeech --splits train-clean-100 dev-clean test-clean
    python recipes/prepare_data.py nemo --manifest train.json --csv data/train.csv
    python recipes/prepare_data.py noise --data_folder /data/noise --csv data/noise.csv

The LibriSpeech CSVs hold ``$data_root/<split>/...`` paths: pass ``data_root=<LibriSpeech
folder>`` to the recipe (see README.md).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import soundfile as sf

from dataio import nemo_manifest_to_csv

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3")


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def prepare_librispeech(data_folder: str | Path, save_folder: str | Path,
                        splits: list[str]) -> list[Path]:
    """Writes ``<save_folder>/<split>.csv`` (``ID,duration,wav,spk_id,wrd``) for each split.

    Expects LibriSpeech's layout: ``<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt``
    next to ``<speaker>-<chapter>-<utt>.flac``.
    """
    data_folder, save_folder = Path(data_folder), Path(save_folder)
    written = []
    for split in splits:
        split_folder = data_folder / split
        if not split_folder.is_dir():
            raise FileNotFoundError(f"{split_folder} not found: is --data_folder the LibriSpeech root?")
        rows = []
        for transcript in sorted(split_folder.glob("*/*/*.trans.txt")):
            for line in transcript.read_text().splitlines():
                if not line.strip():
                    continue
                utt_id, words = line.split(" ", 1)
                audio = transcript.parent / f"{utt_id}.flac"
                if not audio.is_file():
                    raise FileNotFoundError(f"{audio} is listed in {transcript} but missing")
                rows.append([utt_id, f"{sf.info(audio).duration:.3f}",
                             f"$data_root/{audio.relative_to(data_folder).as_posix()}",
                             utt_id.split("-")[0], words.strip()])
        if not rows:
            raise ValueError(f"no *.trans.txt transcripts found under {split_folder}")
        out = save_folder / f"{split}.csv"
        _write_csv(out, ["ID", "duration", "wav", "spk_id", "wrd"], rows)
        written.append(out)
        print(f"{out}: {len(rows)} utterances, {sum(float(r[1]) for r in rows) / 3600:.2f} h")
    return written


def prepare_noise(data_folder: str | Path, csv_path: str | Path) -> Path:
    """Noise manifest for SpeechBrain's ``AddNoise`` (``ID,duration,wav,wav_format,wav_opts``)."""
    data_folder, csv_path = Path(data_folder), Path(csv_path)
    files = sorted(p for p in data_folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise ValueError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {data_folder}")
    rows = [[f"{p.stem}_{i}", f"{sf.info(p).duration:.3f}", str(p.resolve()), p.suffix[1:], ""]
            for i, p in enumerate(files)]
    _write_csv(csv_path, ["ID", "duration", "wav", "wav_format", "wav_opts"], rows)
    return csv_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    libri = commands.add_parser("librispeech", help="LibriSpeech folder -> one CSV per split")
    libri.add_argument("--data_folder", required=True)
    libri.add_argument("--save_folder", required=True)
    libri.add_argument("--splits", nargs="+", default=["train-clean-100", "dev-clean", "test-clean"])
    nemo = commands.add_parser("nemo", help="NeMo JSON manifest -> CSV")
    nemo.add_argument("--manifest", required=True)
    nemo.add_argument("--csv", required=True)
    noise = commands.add_parser("noise", help="folder of noise audio -> noise CSV")
    noise.add_argument("--data_folder", required=True)
    noise.add_argument("--csv", required=True)
    args = parser.parse_args()
    if args.command == "librispeech":
        prepare_librispeech(args.data_folder, args.save_folder, args.splits)
    elif args.command == "nemo":
        print(nemo_manifest_to_csv(args.manifest, args.csv))
    else:
        print(prepare_noise(args.data_folder, args.csv))


if __name__ == "__main__":
    main()
