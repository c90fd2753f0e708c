"""The benchmark's extra LM text (recipes/prepare_lm_text.py): prose sentences from the text
packages, none a dev or test transcript or a near copy of one, none repeating a spoken one."""
import csv
import subprocess
import sys

import pytest

import prepare_lm_text
from conftest import ROOT
from prepare_lm_text import (DHAMMAPADA, EXTRA_FORTUNES, FORTUNES, NEAR_RUN, NearCopies,
                             clean_sentences, dhammapada_verses, lm_sentences, ngrams)

BENCHMARK = ROOT / "data" / "benchmark"
HELD_OUT = ["TO BE OR NOT TO BE", "SMALL WORDS COUNT TOO AND MORE",
            "WHEN THE GOING GETS TOUGH THE TOUGH GET GOING", "IT IS EASIER TO FIGHT FOR PRINCIPLES"]


def test_digits_markup_attributions_and_near_copies_are_left_out():
    entries = ['He said: "the cat sat" on the mat. The dog barked at the moon!\n-- Someone',
               "Version 2 is out. Type rm -rf * to win. Ask NASA about it.",
               "Ask NASA about it.",
               "To be or not to be, that is the bottom line. Or not to be.",
               "Whole. Small words count too.",
               "When the going gets tough, the tough go shopping.",    # one word changed
               "It's easier to fight for principles than to live up to them.",  # a long run
               "It is easier to fight.",                               # 5 words in a row
               "When the going is tough the tough get going."]         # word pairs
    assert clean_sentences(entries, NearCopies(HELD_OUT)) == [
        "HE SAID THE CAT SAT ON THE MAT", "THE DOG BARKED AT THE MOON", "ASK NASA ABOUT IT"]


def test_near_copies_are_runs_inside_around_or_most_word_pairs():
    near = NearCopies(HELD_OUT)
    assert near("TO BE OR NOT") and near("THAT IS TO BE OR NOT TO BE INDEED")
    assert near("EASIER TO FIGHT FOR PRINCIPLES ALWAYS")
    assert not near("WE FIGHT FOR PRINCIPLES ALWAYS")
    assert near("WHEN THE GOING GETS ROUGH THE TOUGH GET GOING")
    assert not near("THE TOUGH GET GOING AWAY") and not near("THE GOING GETS ROUGH")
    assert len(ngrams("A B C D E F".split(), NEAR_RUN)) == 2


def test_the_dhammapada_is_its_verses_without_numbers():
    text = ("Introduction. Copyright (c) 1993.\n(An Anthology of Verses)\n\n1. The Pairs\n\n"
            "Mind precedes its objects. To speak with\na defiled mind is pain. 1\n\n"
            "Hatred is never settled by hatred.\n2\n\nThe End. (Translation)\nend of file\n")
    assert [v.split() for v in dhammapada_verses(text)] == [
        [], ["1.", "The", "Pairs"], "Mind precedes its objects. To speak with a defiled mind is "
        "pain.".split(), "Hatred is never settled by hatred.".split(), []]


def write_manifest(path, texts):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "spk_id", "wrd", "voice"])
        writer.writerows((f"{path.stem}{i}", f"{path.stem}_spk", text, f"{path.stem}|{path.stem}")
                         for i, text in enumerate(texts))


def test_adds_unspoken_corpus_sentences_and_package_text_but_no_spoken_or_held_out_one(
        tmp_path, monkeypatch):
    spoken = {"unlabeled_train": ["A CAT SAT DOWN"], "unlabeled_valid": ["A DOG RAN OFF"],
              "train": ["THE SUN IS HOT"], "dev": ["WE GO HOME NOW"],
              "test": ["IT IS LATE AT NIGHT NOW"]}
    for name, texts in spoken.items():
        write_manifest(tmp_path / f"{name}.csv", texts)
    (tmp_path / "lm_text.txt").write_text(
        "A CAT SAT DOWN\nTHE SUN IS HOT\nNOBODY SPOKE THIS\nIT IS LATE AT NIGHT\n")
    monkeypatch.setattr(prepare_lm_text, "extra_entries", lambda: [
        "The sun is hot. Then we go home now, said she. Birds sing at dawn. Birds sing at dawn."
        " Nobody spoke this."])
    added, counts = lm_sentences(tmp_path)
    assert added == ["NOBODY SPOKE THIS", "BIRDS SING AT DAWN"]
    assert counts == {"corpus_unspoken": 1, "packages": 1, "sentences": 2, "words": 7}


def test_missing_corpus_and_packages_are_named(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="make corpus-labeled"):
        lm_sentences(tmp_path)
    monkeypatch.setattr(prepare_lm_text, "FORTUNES", tmp_path)
    monkeypatch.setattr(prepare_lm_text, "DHAMMAPADA", tmp_path / "none.txt")
    with pytest.raises(SystemExit, match="apt-get install fortune-anarchism fortunes "
                                         "display-dhammapada"):
        prepare_lm_text.extra_entries()


@pytest.mark.skipif(not (BENCHMARK / "test.csv").is_file() or not DHAMMAPADA.is_file()
                    or not all((FORTUNES / name).is_file() for name in EXTRA_FORTUNES),
                    reason="needs the benchmark corpus and the text packages (make lm-text)")
def test_generated_lm_text_shares_no_run_of_words_with_dev_and_test(tmp_path):
    out = tmp_path / "lm_extra.csv"
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "prepare_lm_text.py"),
                          "--corpus", str(BENCHMARK), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(out) as f:
        added = [row["wrd"] for row in csv.DictReader(f)]
    held_out = []
    for name in ("dev", "test"):
        with open(BENCHMARK / f"{name}.csv") as f:
            held_out += [row["wrd"] for row in csv.DictReader(f)]
    assert len(added) > 5000 and len(set(added)) == len(added)
    runs = {run for text in held_out for run in ngrams(text.split(), NEAR_RUN)}
    assert not any(runs.intersection(ngrams(text.split(), NEAR_RUN)) for text in added)
    assert not any(text in held_out for text in added)
