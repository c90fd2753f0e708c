"""The benchmark's extra LM text (recipes/prepare_lm_text.py): prose sentences from the text
packages, none overlapping a dev or test transcript, none repeating a spoken one."""
import csv
import subprocess
import sys

import pytest

import prepare_lm_text
from conftest import ROOT
from prepare_lm_text import DHAMMAPADA, FORTUNES, clean_sentences, lm_sentences
from synthesize_benchmark import partition_errors

BENCHMARK = ROOT / "data" / "benchmark"


def test_held_out_overlap_digits_markup_and_attributions_are_left_out():
    entries = ['He said: "the cat sat" on the mat. The dog barked at the moon!\n-- Someone',
               "Version 2 is out. Type rm -rf * to win. Ask NASA about it.",
               "Ask NASA about it.",
               "To be or not to be, that is the bottom line. Or not to be.",
               "Whole. Small words count too."]
    held_out = ["TO BE OR NOT TO BE", "SMALL WORDS COUNT TOO AND MORE"]
    assert clean_sentences(entries, held_out) == [
        "HE SAID THE CAT SAT ON THE MAT", "THE DOG BARKED AT THE MOON", "ASK NASA ABOUT IT"]


def write_manifest(path, texts):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "spk_id", "wrd", "voice"])
        writer.writerows((f"{path.stem}{i}", f"{path.stem}_spk", text, f"{path.stem}|{path.stem}")
                         for i, text in enumerate(texts))


def test_adds_unspoken_corpus_sentences_and_package_text_but_no_spoken_or_held_out_one(
        tmp_path, monkeypatch):
    spoken = {"unlabeled_train": ["A CAT SAT DOWN"], "unlabeled_valid": ["A DOG RAN OFF"],
              "train": ["THE SUN IS HOT"], "dev": ["WE GO HOME NOW"], "test": ["IT IS LATE"]}
    for name, texts in spoken.items():
        write_manifest(tmp_path / f"{name}.csv", texts)
    (tmp_path / "lm_text.txt").write_text("A CAT SAT DOWN\nTHE SUN IS HOT\nNOBODY SPOKE THIS\n")
    monkeypatch.setattr(prepare_lm_text, "extra_entries", lambda: [
        "The sun is hot. Then we go home now, said she. Birds sing at dawn. Birds sing at dawn."])
    added, counts = lm_sentences(tmp_path)
    assert added == ["NOBODY SPOKE THIS", "BIRDS SING AT DAWN"]
    assert counts == {"corpus_unspoken": 1, "packages": 1, "sentences": 2, "words": 7}


def test_a_missing_corpus_is_named(tmp_path):
    with pytest.raises(SystemExit, match="make corpus-labeled"):
        lm_sentences(tmp_path)


@pytest.mark.skipif(not (BENCHMARK / "test.csv").is_file() or not FORTUNES.is_dir()
                    or not DHAMMAPADA.is_file(),
                    reason="needs the benchmark corpus and the text packages (make lm-text)")
def test_generated_lm_text_shares_nothing_with_dev_and_test(tmp_path):
    out = tmp_path / "lm_extra.csv"
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "prepare_lm_text.py"),
                          "--corpus", str(BENCHMARK), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(out) as f:
        added = [row["wrd"] for row in csv.DictReader(f)]
    splits = {}
    for name in ("dev", "test"):
        with open(BENCHMARK / f"{name}.csv") as f:
            splits[name] = list(csv.DictReader(f))
    assert len(added) > 5000 and len(set(added)) == len(added)
    assert partition_errors(splits, added) == []
