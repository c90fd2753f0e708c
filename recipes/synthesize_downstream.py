#!/usr/bin/env python3
"""Synthesize the downstream classification corpora (``make corpus-downstream``): keyword
spotting (Speech-Commands style) and intent classification (SLURP style), spoken by the
benchmark's voices so that no test voice is heard in SSL pretraining or downstream training.

Voices: the speakers of ``synthesize_benchmark.py`` (same ``--seed``: the same settings), by
partition: downstream train takes the benchmark's labeled-train speakers, dev its dev speakers,
test its test speakers (espeak-ng and flite ones). The SSL encoder is pretrained on the
benchmark's unlabeled partition, whose base voices none of these share.

**kws** (12 classes): the ten Speech Commands keywords, ``_unknown_`` (other words; the words
of train, dev and test are disjoint, so test asks about unheard words too) and ``_silence_`` (a
second of a shipped noise, babble excepted, at a random level and circular shift; the noises
are 3 s long and each split takes its own second of each, so no noise sample is in two
splits). **intent** (8 intents): spoken commands from
templates with slots (rooms, times, cities, ...); each intent's templates are partitioned,
so test sentences come from templates never heard in training, and slot values are drawn per
utterance.

Few labels: ``train.csv`` holds ``--train_per_class`` utterances per class and
``train_few.csv`` (a subset) ``--few_per_class``; dev and test one utterance per class and
speaker. ``voice`` is the speaker's base voice (timbre; several speakers are settings of one):
the unit a paired bootstrap resamples. Deterministic for a given ``--seed``.

Output (``--out``, default ``data/downstream``)::

    <task>/audio/<split>/<id>.flac
    <task>/{train,train_few,dev,test}.csv   ID,duration,wav,spk_id,voice,label,wrd
    <task>/corpus.json                      utterances, speakers and classes per split

Usage::

    python recipes/synthesize_downstream.py --out data/downstream [--tasks kws intent]
"""
from __future__ import annotations

import argparse
import json
import random
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from synthesize_benchmark import (PLAN, SAMPLE_RATE, command, load_fortunes, make_speakers,
                                  select_sentences, shipped_transcripts, synthesize)

KEYWORDS = ["YES", "NO", "UP", "DOWN", "LEFT", "RIGHT", "ON", "OFF", "STOP", "GO"]
UNKNOWN_WORDS = {  # disjoint per split
    "train": ["BED", "BIRD", "CAT", "DOG", "HAPPY", "HOUSE", "TREE", "WOW", "MARVIN", "SHEILA",
              "FOUR", "FIVE", "SEVEN", "LEARN", "FOLLOW", "VISUAL"],
    "dev": ["EIGHT", "NINE", "BACKWARD", "FORWARD", "ZERO"],
    "test": ["ONE", "TWO", "THREE", "SIX", "MONKEY", "WINDOW", "GARDEN"],
}
UNKNOWN, SILENCE = "_unknown_", "_silence_"

SLOTS = {
    "room": ["KITCHEN", "BEDROOM", "LIVING ROOM", "BATHROOM", "HALLWAY", "OFFICE", "GARAGE"],
    "time": ["SIX AM", "SEVEN THIRTY", "NOON", "NINE PM", "HALF PAST EIGHT", "TEN FIFTEEN"],
    "city": ["LONDON", "PARIS", "TOKYO", "BOSTON", "MADRID", "CAIRO", "SYDNEY", "DENVER"],
    "artist": ["THE BEATLES", "MOZART", "ADELE", "MILES DAVIS", "QUEEN", "BACH", "SHAKIRA"],
    "person": ["MOM", "JOHN", "DOCTOR SMITH", "MY SISTER", "ALICE", "THE OFFICE", "GRANDPA"],
    "item": ["MILK", "EGGS", "BREAD", "COFFEE", "APPLES", "RICE", "BATTERIES", "SOAP"],
}
# Per intent: templates in the order train, train, train, train, dev, test (partitioned).
INTENTS = {
    "lights_on": ["TURN ON THE LIGHTS IN THE {room}", "SWITCH THE {room} LIGHTS ON",
                  "LIGHTS ON PLEASE", "CAN YOU LIGHT UP THE {room}",
                  "MAKE IT BRIGHT IN THE {room}", "I NEED SOME LIGHT IN THE {room}"],
    "lights_off": ["TURN OFF THE LIGHTS IN THE {room}", "SWITCH THE {room} LIGHTS OFF",
                   "LIGHTS OUT", "KILL THE LIGHTS IN THE {room}",
                   "MAKE THE {room} DARK", "NO MORE LIGHT IN THE {room} PLEASE"],
    "set_alarm": ["SET AN ALARM FOR {time}", "WAKE ME UP AT {time}",
                  "ALARM AT {time} PLEASE", "I WANT AN ALARM AT {time}",
                  "GET ME UP AT {time} TOMORROW", "PUT AN ALARM ON FOR {time}"],
    "weather": ["WHAT IS THE WEATHER IN {city}", "IS IT RAINING IN {city}",
                "HOW HOT IS IT IN {city} TODAY", "WEATHER FORECAST FOR {city}",
                "DO I NEED AN UMBRELLA IN {city}", "WILL IT BE SUNNY IN {city} TOMORROW"],
    "play_music": ["PLAY SOME {artist}", "PUT ON MUSIC BY {artist}", "I WANT TO HEAR {artist}",
                   "START PLAYING {artist}", "LET ME LISTEN TO {artist}",
                   "COULD YOU PLAY A SONG BY {artist}"],
    "call": ["CALL {person}", "PHONE {person} NOW", "RING {person} PLEASE",
             "START A CALL WITH {person}", "GET {person} ON THE LINE", "DIAL {person} FOR ME"],
    "shopping": ["ADD {item} TO MY SHOPPING LIST", "PUT {item} ON THE LIST",
                 "WE NEED {item}", "REMEMBER TO BUY {item}", "I RAN OUT OF {item}",
                 "NOTE THAT WE SHOULD GET {item}"],
    "volume": ["TURN THE VOLUME UP", "MAKE IT LOUDER", "VOLUME UP PLEASE",
               "I CANNOT HEAR IT RAISE THE VOLUME", "PUMP UP THE SOUND",
               "CAN YOU INCREASE THE VOLUME A BIT"],
}
TEMPLATE_SPLIT = {"train": slice(0, 4), "dev": slice(4, 5), "test": slice(5, 6)}


def benchmark_speakers(seed: int, shipped: Path) -> dict[str, list]:
    """The benchmark's speakers (``synthesize_benchmark.py --seed``: its random draws replayed),
    espeak-ng and flite ones, by downstream split."""
    rng = random.Random(seed)
    rng.shuffle(select_sentences(load_fortunes(), shipped_transcripts(shipped)))
    speakers = [s for s in make_speakers(rng, PLAN) if s.synthesizer in ("espeak-ng", "flite")]
    return {"train": [s for s in speakers if s.partition == "train"],
            "dev": [s for s in speakers if s.partition == "dev"],
            "test": [s for s in speakers if s.partition == "test"]}


def kws_items(split: str, speakers: list, per_class: int | None, rng: random.Random
              ) -> list[tuple]:
    """(speaker, label, text) of one split: per_class utterances per class (train) or one per
    class and speaker (dev, test); text None is silence."""
    items = []
    for label in KEYWORDS + [UNKNOWN, SILENCE]:
        chosen = rng.sample(speakers * 4, per_class) if per_class else speakers
        for speaker in chosen:
            text = label if label in KEYWORDS else (
                rng.choice(UNKNOWN_WORDS[split]) if label == UNKNOWN else None)
            items.append((speaker, label, text))
    return items


def intent_items(split: str, speakers: list, per_class: int | None, rng: random.Random
                 ) -> list[tuple]:
    items = []
    for intent, templates in INTENTS.items():
        chosen = rng.sample(speakers * 4, per_class) if per_class else speakers
        for speaker in chosen:
            template = rng.choice(templates[TEMPLATE_SPLIT[split]])
            text = template.format(**{k: rng.choice(v) for k, v in SLOTS.items()})
            items.append((speaker, intent, text))
    return items


SILENCE_SECOND = {"train": 0, "dev": 1, "test": 2}  # which second of each noise a split uses


def silence(job: tuple) -> float:
    """One second of a shipped noise (the split's own second, circularly shifted), at a random
    level: the ``_silence_`` class."""
    noise_path, second, shift, gain, path = job
    noise, rate = sf.read(noise_path, dtype="float32")
    if len(noise) < (second + 1) * SAMPLE_RATE or rate != SAMPLE_RATE:
        raise ValueError(f"{noise_path}: the silence class needs 3 s of 16 kHz noise")
    clip = np.roll(noise[second * SAMPLE_RATE:(second + 1) * SAMPLE_RATE], shift) * gain
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, clip, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return len(clip) / SAMPLE_RATE


def make_job(job: tuple) -> float:
    return silence(job[1:]) if job[0] == "silence" else synthesize(job[1:])


def build(task: str, out: Path, speakers: dict[str, list], noises: list[Path], args) -> dict:
    rng = random.Random(f"{args.seed}-{task}")
    make_items = kws_items if task == "kws" else intent_items
    rows, jobs = [], []
    for split in ("train", "dev", "test"):
        per_class = args.train_per_class if split == "train" else None
        for index, (speaker, label, text) in enumerate(
                make_items(split, speakers[split], per_class, rng)):
            uid = f"{task}-{split}-{index:04d}"
            rel = f"audio/{split}/{uid}.flac"
            path = str(out / rel)
            if text is None:
                noise = rng.choice(noises)
                jobs.append(("silence", str(noise), SILENCE_SECOND[split],
                             rng.randrange(SAMPLE_RATE), 10 ** rng.uniform(-2.5, -0.5), path))
            else:
                argv, stdin = command(speaker, text.lower(), f"{path}.wav", rng)
                jobs.append(("speech", argv, stdin, f"{path}.wav", path))
            rows.append({"ID": uid, "duration": None, "wav": f"$data_root/{rel}",
                         "spk_id": speaker.spk_id, "voice": speaker.base_voice, "label": label,
                         "wrd": text or "",
                         "split": split})
    torch.set_num_threads(1)
    with Pool(args.workers) as pool:
        for index, duration in enumerate(pool.imap(make_job, jobs, chunksize=8)):
            rows[index]["duration"] = f"{duration:.3f}"
    splits = {split: [r for r in rows if r["split"] == split] for split in ("train", "dev", "test")}
    few = []
    for label in dict.fromkeys(r["label"] for r in splits["train"]):
        few += [r for r in splits["train"] if r["label"] == label][:args.few_per_class]
    splits["train_few"] = few
    stats = {}
    for name, subset in splits.items():
        write_manifest(out / f"{name}.csv", subset)
        stats[name] = {"utterances": len(subset), "speakers": len({r["spk_id"] for r in subset}),
                       "voices": len({r["voice"] for r in subset}),
                       "classes": len({r["label"] for r in subset}),
                       "minutes": round(sum(float(r["duration"]) for r in subset) / 60, 2)}
    (out / "corpus.json").write_text(json.dumps({"seed": args.seed, "task": task,
                                                 "splits": stats}, indent=1) + "\n")
    return stats


def write_manifest(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["ID", "duration", "wav", "spk_id", "voice", "label", "wrd"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/downstream"))
    parser.add_argument("--tasks", nargs="+", choices=["kws", "intent"], default=["kws", "intent"])
    parser.add_argument("--shipped", type=Path, default=Path("data/espeak_corpus"),
                        help="the shipped corpus (its noises make the silence class)")
    parser.add_argument("--seed", type=int, default=2026, help="the benchmark's seed")
    parser.add_argument("--train_per_class", type=int, default=32)
    parser.add_argument("--few_per_class", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    speakers = benchmark_speakers(args.seed, args.shipped)
    # Babble is speech of the shipped corpus's espeak-ng voices, one of them a benchmark dev
    # voice: in training silence it would let a dev voice be heard.
    noises = [n for n in sorted((args.shipped / "noise").glob("*.flac")) if n.stem != "babble"]
    if not noises:
        raise SystemExit(f"error: no noise files in {args.shipped / 'noise'} (the shipped corpus)")
    report = {task: build(task, args.out / task, speakers, noises, args) for task in args.tasks}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
