#!/usr/bin/env python3
"""Synthesize the labeled benchmark corpus (``make corpus-labeled``): hours of speech from
hundreds of synthetic voices, with voices and sentences partitioned between unlabeled (SSL),
labeled train, dev and test, so that test voices and sentences are never seen in training.

Text: sentences of the ``fortunes`` package (Debian; the neutral categories of
``FORTUNE_FILES``), none containing or contained in a transcript of the shipped corpus. Each
sentence is spoken once, in one partition; the sentences left over go to the LM text only.

Voices. A *base voice* is a timbre: an espeak-ng variant (``+m3``, ``+klatt4``, ...), a flite
voice or a festival voice (flite's ``kal16`` and festival's ``kal_diphone`` are one person, and
so are the two ``slt`` voices: each pair is one base voice). Base voices are partitioned, so no
timbre is heard in two partitions. A *speaker* (``spk_id``) is one setting of a base voice:
espeak-ng accent x pitch x rate, flite pitch x rate, festival rate; pitch and rate are jittered
per utterance around the speaker's own.

Partitions (``PLAN``): dev and test have the same shape (20 espeak-ng speakers + 4 flite
settings of one voice, 20 utterances each: 480 utterances, 24 speakers); labeled train ~3.3 h,
unlabeled ~5.6 h. Nested labeled subsets (``train_10min`` in ``train_30min`` in ``train_1h`` in
``train``) take every speaker's utterances in turn, so each keeps the voice mix of the whole.

Deterministic for a given ``--seed``: the same files, byte for byte. Generated, not shipped.

Output (``--out``, default ``data/benchmark``)::

    audio/<partition>/<spk>/<id>.flac          16 kHz mono FLAC
    unlabeled_train.csv, unlabeled_valid.csv   SSL (valid: 3 % of the unlabeled speakers)
    train.csv, train_1h.csv, train_30min.csv, train_10min.csv, dev.csv, test.csv
                                               ID,duration,wav,spk_id,wrd,voice
    lm_text.txt                                transcripts of every partition but dev and test,
                                               plus the unused sentences (for LMs, tokenizers)
    corpus.json, CORPUS.md                     hours, utterances, speakers, base voices, sentences

Needs ``apt-get install espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k
festvox-us-slt-hts fortunes`` (the Makefile target installs them).

Usage::

    python recipes/synthesize_benchmark.py --out data/benchmark [--scale 1.0] [--workers 2]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000
FORTUNES = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ["art", "computers", "cookie", "definitions", "education", "food", "fortunes",
                 "goedel", "humorists", "kids", "law", "linuxcookie", "literature", "love",
                 "magic", "medicine", "miscellaneous", "news", "people", "pets", "platitudes",
                 "riddles", "science", "songs-poems", "sports", "startrek", "wisdom", "work",
                 "zippy"]
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc"]
ESPEAK_VARIANTS = [  # espeak-ng's human-sounding variants (no whisper or sound effects)
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt",
    "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "Alex", "Alicia", "Andrea", "Andy", "Annie",
    "Denis", "Diogo", "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario",
    "Michael", "Mike", "Nguyen", "adam", "anika", "announcer", "antonio", "aunty", "belinda",
    "benjamin", "boris", "caleb", "david", "ed", "edward", "edward2", "grandma", "grandpa",
    "gustave", "iven", "iven2", "iven3", "iven4", "john", "linda", "max", "michel", "miguel",
    "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro", "shelby", "steph",
    "steph2", "steph3", "travis", "victor", "zac"]
# espeak-ng variants that share one vocal tract (the same formant lines in espeak-ng-data/voices/!v;
# the klatt variants and caleb set none, so they share the default one): one timbre each, kept in
# one partition. Checked against the installed files by tests/test_benchmark_corpus.py.
SAME_TIMBRE = [["klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "caleb"],
               ["Diogo", "Henrique", "Hugo", "michel", "miguel"], ["Gene", "Gene2"],
               ["edward", "edward2"], ["iven", "iven2", "iven3", "iven4"], ["steph", "steph3"]]
ESPEAK_VOICES = Path("/usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v")
FLITE_MEAN_F0 = {"kal16": 100, "awb": 110, "rms": 100, "slt": 180}
TOOLS = {"espeak-ng": "espeak-ng", "flite": "flite", "text2wave": "festival"}
PARTITIONS = ("test", "dev", "train", "unlabeled")  # sentences are dealt in this order


@dataclass(frozen=True)
class Partition:
    """What one partition gets: base voices, speakers and utterances per speaker."""

    espeak_timbres: int         # espeak-ng base voices (timbres: groups of SAME_TIMBRE variants)
    espeak_speakers: int        # (accent, variant, pitch, rate) settings of their variants
    flite: tuple[str, ...]      # flite base voices: 4 settings each (2 rates x 2 pitches)
    festival: tuple[str, ...]   # festival base voices: 3 settings each (3 rates)
    per_speaker: int            # utterances per speaker


PLAN = {
    "test": Partition(8, 20, ("rms",), (), 20),
    "dev": Partition(8, 20, ("awb",), (), 20),
    "train": Partition(22, 108, ("slt",), ("cmu_us_slt_arctic_hts", "ked_diphone"), 25),
    "unlabeled": Partition(23, 150, ("kal16",), ("kal_diphone",), 32),
}
# One person, two synthesizers: the same base voice (kept in one partition).
BASE_VOICE = {("flite", "kal16"): "kal", ("text2wave", "kal_diphone"): "kal",
              ("flite", "slt"): "slt", ("text2wave", "cmu_us_slt_arctic_hts"): "slt"}
SUBSETS = {"train_10min": 10, "train_30min": 30, "train_1h": 60}  # nested labeled subsets
UNLABELED_VALID_FRACTION = 0.03


@dataclass(frozen=True)
class Speaker:
    spk_id: str
    partition: str
    synthesizer: str   # espeak-ng | flite | text2wave
    voice: str         # espeak-ng "accent+variant", flite or festival voice name
    pitch: int         # espeak-ng pitch (0-99) or flite F0 offset (Hz); 0 for festival
    rate: float        # espeak-ng words per minute, or flite / festival duration stretch

    @property
    def base_voice(self) -> str:
        """The timbre: espeak-ng variant, or flite / festival voice (one person, one name)."""
        if self.synthesizer == "espeak-ng":
            return "espeak:" + timbre_of(self.voice.split("+")[1])
        return BASE_VOICE.get((self.synthesizer, self.voice), f"{self.synthesizer}:{self.voice}")

    @property
    def setting(self) -> str:
        return f"{self.synthesizer}:{self.voice}:p{self.pitch}:r{self.rate}"


def timbre_of(variant: str) -> str:
    """The timbre (first variant of its SAME_TIMBRE group) of an espeak-ng variant."""
    return next((group[0] for group in SAME_TIMBRE if variant in group), variant)


def timbres() -> list[list[str]]:
    """espeak-ng variants grouped by timbre, in ESPEAK_VARIANTS order."""
    groups: dict[str, list[str]] = {}
    for variant in ESPEAK_VARIANTS:
        groups.setdefault(timbre_of(variant), []).append(variant)
    return list(groups.values())


# ------------------------------- text ---------------------------------------
def normalize(sentence: str) -> str:
    """Upper-case words of letters and apostrophes, as the shipped transcripts are written."""
    words = re.sub(r"[^A-Za-z' ]", " ", sentence).upper().split()
    return " ".join(w.strip("'") for w in words if w.strip("'"))


def select_sentences(entries: list[str], avoid: list[str], min_words: int = 4,
                     max_words: int = 20) -> list[tuple[str, str]]:
    """(text to speak, transcript) of distinct prose sentences, none overlapping ``avoid``.

    ``entries``: fortune cookies (attribution lines, starting with ``--``, are dropped).
    """
    avoid = [f" {text} " for text in avoid]
    pairs, seen = [], set()
    for entry in entries:
        lines = [line for line in entry.splitlines() if not line.strip().startswith("--")]
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(" ".join(lines).split())):
            if (re.search(r"[0-9_\[\]()&*/=:;\"<>@#$%^{}|~`+\\]|--|[A-Z]{2,}", sentence)
                    or not sentence[:1].isalpha()):  # "- Someone, on ..." is an attribution
                continue
            transcript = normalize(sentence)
            padded = f" {transcript} "
            if (not min_words <= len(transcript.split()) <= max_words or transcript in seen
                    or any(padded in text or text in padded for text in avoid)):
                continue
            seen.add(transcript)
            pairs.append((sentence, transcript))
    # A sentence inside another (as whole words) would put the same words in two partitions.
    inside = set().union(*map(word_spans, seen)) if seen else set()
    return [(sentence, transcript) for sentence, transcript in pairs if transcript not in inside]


def word_spans(text: str) -> set[str]:
    """Every run of whole words of ``text`` shorter than ``text`` itself."""
    words = text.split()
    return {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)
            if j - i < len(words)}


def load_fortunes() -> list[str]:
    if not FORTUNES.is_dir():
        raise SystemExit(f"{FORTUNES} not found: run `apt-get install fortunes` (or `make "
                         "corpus-labeled`, which installs what is needed)")
    entries = []
    for name in FORTUNE_FILES:
        entries += (FORTUNES / name).read_text(encoding="utf-8", errors="replace").split("\n%\n")
    return entries


def shipped_transcripts(corpus: Path) -> list[str]:
    """Every transcript of the shipped corpus's splits (the benchmark shares none)."""
    texts = []
    for split in ("train", "valid", "test"):
        with open(corpus / f"{split}.csv") as f:
            texts += [row["wrd"] for row in csv.DictReader(f)]
    return texts


# ------------------------------- plan ---------------------------------------
def make_speakers(rng: random.Random, plan: dict[str, Partition]) -> list[Speaker]:
    """Every partition's speakers, base voices disjoint between partitions."""
    groups = timbres()
    rng.shuffle(groups)
    if sum(plan[name].espeak_timbres for name in PARTITIONS) > len(groups):
        raise ValueError(f"the plan asks for more than the {len(groups)} espeak-ng timbres")
    speakers = []
    for name in PARTITIONS:
        part = plan[name]
        # Timbres in turn (each one's first variant, then the seconds, ...): all are used.
        taken, groups = groups[:part.espeak_timbres], groups[part.espeak_timbres:]
        mine = [group[i] for i in range(max(map(len, taken))) for group in taken if i < len(group)]
        # Variants in turn, each with its accents in a random order: every variant is used.
        accents = {variant: rng.sample(ACCENTS, len(ACCENTS)) for variant in mine}
        pairs = [f"{accents[variant][round_]}+{variant}" for round_ in range(len(ACCENTS))
                 for variant in mine]
        if part.espeak_speakers > len(pairs):
            raise ValueError(f"{name}: {part.espeak_speakers} espeak-ng speakers from "
                             f"{len(pairs)} accent x variant pairs")
        settings = [("espeak-ng", pair, rng.randint(25, 75), rng.randint(130, 200))
                    for pair in pairs[:part.espeak_speakers]]
        settings += [("flite", voice, pitch, stretch) for voice in part.flite
                     for stretch in (0.95, 1.15) for pitch in (-15, 15)]
        settings += [("text2wave", voice, 0, stretch) for voice in part.festival
                     for stretch in (0.9, 1.0, 1.15)]
        prefix = {"test": "te", "dev": "dv", "train": "tr", "unlabeled": "un"}[name]
        speakers += [Speaker(f"{prefix}{i:03d}", name, *setting)
                     for i, setting in enumerate(settings)]
    return speakers


def plan_utterances(sentences: list[tuple[str, str]], speakers: list[Speaker],
                    plan: dict[str, Partition]) -> tuple[list[dict], list[str]]:
    """Deals the (shuffled) sentences to the partitions' speakers, each sentence once.

    Returns the utterances (``id, partition, speaker, text, wrd``) and the transcripts of the
    sentences no one speaks (LM text only).
    """
    sentences = list(sentences)
    utterances = []
    for name in PARTITIONS:
        for speaker in (s for s in speakers if s.partition == name):
            for index in range(plan[name].per_speaker):
                if not sentences:
                    raise SystemExit(f"out of sentences while planning {name}")
                text, transcript = sentences.pop(0)
                utterances.append({"id": f"{speaker.spk_id}-{index:03d}", "partition": name,
                                   "speaker": speaker, "text": text, "wrd": transcript})
    return utterances, [transcript for _, transcript in sentences]


def nested_subsets(rows: list[dict], minutes: dict[str, float]) -> dict[str, list[dict]]:
    """Nested subsets of ``rows`` (smallest first) with the voice mix of the whole.

    Utterances are taken in rounds: every speaker's first utterance, then every speaker's
    second, ...; a subset is the shortest prefix of that order reaching its minutes, so a smaller
    subset is a prefix of a larger one.
    """
    rank: dict[str, int] = {}
    order = []
    for row in rows:
        rank[row["spk_id"]] = rank.get(row["spk_id"], -1) + 1
        order.append((rank[row["spk_id"]], row))
    order = [row for _, row in sorted(order, key=lambda pair: pair[0])]  # stable: speaker order
    subsets = {}
    for name, limit in sorted(minutes.items(), key=lambda item: item[1]):
        seconds, count = 0.0, 0
        while count < len(order) and seconds < limit * 60:
            seconds += float(order[count]["duration"])
            count += 1
        subsets[name] = order[:count]
    return subsets


def partition_errors(splits: dict[str, list[dict]], lm_text: list[str] | None = None) -> list[str]:
    """What breaks the partitioning: a speaker, voice setting, base voice or sentence in two
    partitions, dev/test text in the LM text, or a nested subset not nested / not in ``train``.

    ``splits``: manifest rows (``spk_id``, ``wrd``, ``voice`` = ``setting|base voice``) by file
    stem: ``unlabeled_*``, ``train*``, ``dev``, ``test``.
    """
    errors = []
    by_partition: dict[str, list[dict]] = {}
    for stem, rows in splits.items():
        if not stem.startswith("train_"):  # subsets are checked below
            by_partition.setdefault(stem.split("_")[0], []).extend(rows)
    keys = {"speaker": lambda r: r["spk_id"], "voice setting": lambda r: r["voice"].split("|")[0],
            "base voice": lambda r: r["voice"].split("|")[1], "sentence": lambda r: r["wrd"]}
    for what, key in keys.items():
        owners: dict[str, str] = {}
        for partition, rows in by_partition.items():
            for value in {key(r) for r in rows}:
                if owners.setdefault(value, partition) != partition:
                    errors.append(f"{what} {value!r} in {owners[value]} and {partition}")
    training = {r["wrd"] for name in ("train", "unlabeled") for r in by_partition.get(name, [])}
    training |= set(lm_text or [])
    inside_training = set().union(*map(word_spans, training)) if training else set()
    for partition in ("dev", "test"):
        for text in {r["wrd"] for r in by_partition.get(partition, [])}:
            if text in training or text in inside_training:
                errors.append(f"{partition} sentence {text!r} in the LM or training text")
            elif word_spans(text) & training:
                errors.append(f"{partition} sentence {text!r} contains a training sentence")
    train_ids = [r["ID"] for r in by_partition.get("train", [])]
    subsets = sorted((stem for stem in splits if stem.startswith("train_")),
                     key=lambda stem: len(splits[stem]))
    for smaller, larger in zip(subsets, subsets[1:] + ["train"]):
        ids = [r["ID"] for r in splits[larger]] if larger != "train" else train_ids
        if not {r["ID"] for r in splits[smaller]} <= set(ids):
            errors.append(f"{smaller} is not contained in {larger}")
    return errors


# ------------------------------ synthesis -----------------------------------
def command(speaker: Speaker, text: str, wav: str, rng: random.Random
            ) -> tuple[list[str], str | None]:
    """The command line that writes ``wav``, and its stdin (festival reads the text from a
    file: it cannot write a WAV header to a pipe)."""
    if speaker.synthesizer == "espeak-ng":
        return (["espeak-ng", "-v", speaker.voice, "-p", str(speaker.pitch + rng.randint(-6, 6)),
                 "-s", str(speaker.rate + rng.randint(-15, 15)), "-w", wav, text], None)
    if speaker.synthesizer == "flite":
        mean = FLITE_MEAN_F0[speaker.voice] + speaker.pitch + rng.randint(-5, 5)
        return (["flite", "-voice", speaker.voice, "--setf", f"duration_stretch={speaker.rate}",
                 "--setf", f"int_f0_target_mean={mean}", "-t", text, "-o", wav], None)
    return (["text2wave", "-eval", f"(voice_{speaker.voice})", "-eval",
             f"(Parameter.set 'Duration_Stretch {speaker.rate})", "-o", wav], text)


def synthesize(job: tuple) -> float:
    """Runs one command, writes a 16 kHz FLAC; returns its duration in seconds."""
    argv, stdin, wav, path = job
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(argv, input=stdin.encode() if stdin else None, check=True, capture_output=True)
    audio, rate = sf.read(wav, dtype="float32")
    Path(wav).unlink()
    if len(audio) == 0:
        raise RuntimeError(f"{' '.join(argv)}: no audio")
    if rate != SAMPLE_RATE:
        audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, SAMPLE_RATE).numpy()
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return len(audio) / SAMPLE_RATE


def write_manifest(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["ID", "duration", "wav", "spk_id", "wrd", "voice"])
        writer.writeheader()
        writer.writerows(rows)


def describe(splits: dict[str, list[dict]], lm_lines: int) -> dict:
    """Hours, utterances, speakers, base voices and sentences per manifest."""
    stats = {}
    for stem, rows in splits.items():
        stats[stem] = {"hours": round(sum(float(r["duration"]) for r in rows) / 3600, 3),
                       "utterances": len(rows), "speakers": len({r["spk_id"] for r in rows}),
                       "base_voices": len({r["voice"].split("|")[1] for r in rows}),
                       "sentences": len({r["wrd"] for r in rows})}
    stats["lm_text"] = {"sentences": lm_lines}
    return stats


def write_card(out: Path, stats: dict, seed: int) -> None:
    lines = [f"# Benchmark corpus (synthesize_benchmark.py --seed {seed})", "",
             "| manifest | hours | utterances | speakers | base voices | sentences |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {stem}.csv | {s['hours']:.2f} | {s['utterances']} | {s['speakers']} | "
              f"{s['base_voices']} | {s['sentences']} |"
              for stem, s in stats.items() if stem != "lm_text"]
    lines += ["", f"lm_text.txt: {stats['lm_text']['sentences']} sentences (no dev or test one).",
              "Speakers, voice settings, base voices and sentences are disjoint between "
              "unlabeled, train, dev and test; train_10min in train_30min in train_1h in train."]
    (out / "CORPUS.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/benchmark"))
    parser.add_argument("--shipped", type=Path, default=Path("data/espeak_corpus"),
                        help="the shipped corpus, whose transcripts the text avoids")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="utterances per speaker x scale (tests use a tiny one)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing synthesizers: apt-get install {' '.join(missing)}")
    plan = {name: dataclasses.replace(p, per_speaker=max(1, round(p.per_speaker * args.scale)))
            for name, p in PLAN.items()}
    rng = random.Random(args.seed)
    sentences = select_sentences(load_fortunes(), shipped_transcripts(args.shipped))
    rng.shuffle(sentences)
    speakers = make_speakers(rng, plan)
    utterances, unused = plan_utterances(sentences, speakers, plan)
    jobs, rows = [], []
    for utt in utterances:
        speaker = utt["speaker"]
        rel = f"audio/{utt['partition']}/{speaker.spk_id}/{utt['id']}.flac"
        path = str(args.out / rel)
        argv, stdin = command(speaker, utt["text"], f"{path}.wav", rng)
        jobs.append((argv, stdin, f"{path}.wav", path))
        rows.append({"ID": utt["id"], "duration": None, "wav": f"$data_root/{rel}",
                     "spk_id": speaker.spk_id, "wrd": utt["wrd"],
                     "voice": f"{speaker.setting}|{speaker.base_voice}",
                     "partition": utt["partition"]})
    torch.set_num_threads(1)
    with Pool(args.workers) as pool:
        for index, duration in enumerate(pool.imap(synthesize, jobs, chunksize=16)):
            rows[index]["duration"] = f"{duration:.3f}"
            if (index + 1) % 500 == 0:
                print(f"{index + 1} / {len(jobs)} utterances", flush=True)
    splits: dict[str, list[dict]] = {}
    unlabeled = [r for r in rows if r["partition"] == "unlabeled"]
    unlabeled_speakers = list(dict.fromkeys(r["spk_id"] for r in unlabeled))
    valid_speakers = set(unlabeled_speakers[::round(1 / UNLABELED_VALID_FRACTION)])
    splits["unlabeled_train"] = [r for r in unlabeled if r["spk_id"] not in valid_speakers]
    splits["unlabeled_valid"] = [r for r in unlabeled if r["spk_id"] in valid_speakers]
    for name in ("train", "dev", "test"):
        splits[name] = [r for r in rows if r["partition"] == name]
    splits.update(nested_subsets(splits["train"], SUBSETS))
    for rows_ in splits.values():
        for row in rows_:
            row.pop("partition", None)
    lm_text = sorted({r["wrd"] for name in ("unlabeled_train", "unlabeled_valid", "train")
                      for r in splits[name]} | set(unused))
    errors = partition_errors(splits, lm_text)
    if errors:
        raise SystemExit("partitions overlap:\n" + "\n".join(errors[:20]))
    for stem, rows_ in splits.items():
        write_manifest(args.out / f"{stem}.csv", rows_)
    (args.out / "lm_text.txt").write_text("\n".join(lm_text) + "\n")
    stats = describe(splits, len(lm_text))
    (args.out / "corpus.json").write_text(json.dumps({"seed": args.seed, "scale": args.scale,
                                                      "manifests": stats}, indent=1) + "\n")
    write_card(args.out, stats, args.seed)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
