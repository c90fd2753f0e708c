"""The benchmark corpus (recipes/synthesize_benchmark.py): voices, sentences and nested subsets
partitioned as promised, the partition check catching every kind of overlap, byte-for-byte
rebuilds."""
import csv
import hashlib
import random
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from synthesize_benchmark import (ESPEAK_VARIANTS, ESPEAK_VOICES, FORTUNES, PLAN, SUBSETS, TOOLS,
                                  make_speakers, nested_subsets, partition_errors,
                                  plan_utterances, select_sentences, timbre_of)

BENCHMARK = ROOT / "data" / "benchmark"


def planned_rows():
    """The full-size plan on made-up sentences, as manifest rows (2-4 s per utterance)."""
    rng = random.Random(0)
    sentences = [(f"sentence {i}.", f"SENTENCE {i}") for i in range(12000)]
    speakers = make_speakers(rng, PLAN)
    utterances, unused = plan_utterances(sentences, speakers, PLAN)
    rows = {}
    for utt in utterances:
        speaker = utt["speaker"]
        rows.setdefault(utt["partition"], []).append(
            {"ID": utt["id"], "duration": f"{rng.uniform(2, 4):.3f}", "spk_id": speaker.spk_id,
             "wrd": utt["wrd"], "voice": f"{speaker.setting}|{speaker.base_voice}"})
    return rows, unused


def test_plan_partitions_voices_and_sentences_with_dev_and_test_of_the_same_shape():
    rows, unused = planned_rows()
    assert partition_errors(rows, unused) == []
    for split in ("dev", "test"):
        assert len(rows[split]) >= 400
        assert len({r["spk_id"] for r in rows[split]}) >= 16
        # every base voice of the split is used (espeak-ng variants and the flite voice)
        assert len({r["voice"].split("|")[1] for r in rows[split]}) == \
            PLAN[split].espeak_timbres + len(PLAN[split].flite)
    shape = {split: (len(rows[split]), len({r["spk_id"] for r in rows[split]}))
             for split in ("dev", "test")}
    assert shape["dev"] == shape["test"]
    assert len({r["spk_id"] for split in rows.values() for r in split}) >= 300  # hundreds
    texts = [r["wrd"] for split in rows.values() for r in split] + unused
    assert len(texts) == len(set(texts)) == 12000  # each sentence once, none lost


def test_partition_check_names_every_kind_of_overlap():
    rows, unused = planned_rows()
    leaked = {split: [dict(r) for r in split_rows] for split, split_rows in rows.items()}
    leaked["train"][0]["wrd"] = leaked["test"][0]["wrd"]
    leaked["train"][1]["voice"] = leaked["dev"][0]["voice"]
    leaked["unlabeled"][0]["spk_id"] = leaked["test"][5]["spk_id"]
    errors = partition_errors(leaked, unused + [rows["dev"][3]["wrd"]])
    assert any(e.startswith("sentence") and "test" in e for e in errors)
    assert any(e.startswith("voice setting") for e in errors)
    assert any(e.startswith("base voice") for e in errors)
    assert any(e.startswith("speaker") for e in errors)
    assert any("in the LM or training text" in e for e in errors)


def test_nested_subsets_are_nested_and_keep_the_voice_mix():
    rows, _ = planned_rows()
    train = rows["train"]
    subsets = nested_subsets(train, SUBSETS)
    ids = {name: [r["ID"] for r in subset] for name, subset in subsets.items()}
    ordered = sorted(SUBSETS, key=SUBSETS.get)
    for smaller, larger in zip(ordered, ordered[1:]):
        assert ids[larger][:len(ids[smaller])] == ids[smaller]  # a prefix: nested
    speakers = {r["spk_id"] for r in train}
    for name, subset in subsets.items():
        minutes = sum(float(r["duration"]) for r in subset) / 60
        assert SUBSETS[name] <= minutes < SUBSETS[name] + 0.1
        counts = {}
        for r in subset:
            counts[r["spk_id"]] = counts.get(r["spk_id"], 0) + 1
        # every speaker's share is within one utterance of every other's
        assert max(counts.values()) - min(counts.values()) <= 1
        assert set(counts) == speakers or len(subset) < len(speakers)
    broken = {**rows, "train_10min": subsets["train_10min"],
              "train_1h": subsets["train_1h"][5:]}  # misses some of train_10min
    assert any("train_10min is not contained in train_1h" in e
               for e in partition_errors(broken))


def test_attributions_shipped_sentences_and_sentences_inside_others_are_left_out():
    entries = ["The cat sat on the mat all day.\n- Professor Someone, commenting on cats",
               "A parlor utensil for subduing the impenitent visitor, said he.",
               "To be or not to be. To be or not to be, that is the bottom line."]
    pairs = select_sentences(entries, ["A PARLOR UTENSIL FOR SUBDUING THE IMPENITENT VISITOR"])
    assert [t for _, t in pairs] == ["THE CAT SAT ON THE MAT ALL DAY",
                                     "TO BE OR NOT TO BE THAT IS THE BOTTOM LINE"]


def test_a_test_sentence_inside_a_training_one_is_caught():
    rows = {"train": [{"ID": "a", "spk_id": "tr0", "wrd": "TO BE OR NOT TO BE THAT IS IT",
                       "voice": "x|x"}],
            "test": [{"ID": "b", "spk_id": "te0", "wrd": "TO BE OR NOT TO BE", "voice": "y|y"}]}
    assert any("in the LM or training text" in e for e in partition_errors(rows))
    rows["train"][0]["wrd"], rows["test"][0]["wrd"] = "OR NOT", "TO BE OR NOT TO BE"
    assert any("contains a training sentence" in e for e in partition_errors(rows))


@pytest.mark.skipif(not ESPEAK_VOICES.is_dir(), reason="espeak-ng is not installed")
def test_espeak_variants_with_one_vocal_tract_are_one_timbre():
    """Variants whose voice files have the same formant lines sound like one person."""
    by_formants = {}
    for variant in ESPEAK_VARIANTS:
        lines = (ESPEAK_VOICES / variant).read_text(errors="replace").splitlines()
        formants = tuple(sorted(" ".join(line.split()) for line in lines
                                if line.strip().startswith("formant")))
        by_formants.setdefault(formants, set()).add(timbre_of(variant))
    assert all(len(timbres) == 1 for timbres in by_formants.values())


@pytest.mark.skipif(not (BENCHMARK / "test.csv").is_file(),
                    reason="the benchmark corpus is generated by `make corpus-labeled`")
def test_generated_corpus_partitions_are_disjoint():
    splits = {}
    for path in BENCHMARK.glob("*.csv"):
        with open(path) as f:
            splits[path.stem] = list(csv.DictReader(f))
    lm_text = (BENCHMARK / "lm_text.txt").read_text().splitlines()
    lm_text += [row["wrd"] for row in splits.pop("lm_extra", [])]  # make lm-text
    assert partition_errors(splits, lm_text) == []
    assert len(splits["test"]) >= 400 and len({r["spk_id"] for r in splits["test"]}) >= 16


@pytest.mark.skipif(any(shutil.which(tool) is None for tool in TOOLS) or not FORTUNES.is_dir(),
                    reason="needs the synthesizers and fortunes: make corpus-labeled installs them")
def test_rebuilds_byte_for_byte(tmp_path):
    digests = []
    for name in ("a", "b"):
        run = subprocess.run([sys.executable, str(ROOT / "recipes" / "synthesize_benchmark.py"),
                              "--out", str(tmp_path / name), "--scale", "0.04",
                              "--shipped", str(ROOT / "data" / "espeak_corpus")],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        files = sorted(p for p in (tmp_path / name).rglob("*") if p.is_file())
        digests.append({str(p.relative_to(tmp_path / name)): hashlib.sha256(p.read_bytes())
                        .hexdigest() for p in files})
    assert digests[0] == digests[1] and len(digests[0]) > 300
