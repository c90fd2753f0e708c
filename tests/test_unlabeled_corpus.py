"""The unlabeled SSL set: text never in the labeled splits, many voices, byte-for-byte rebuilds."""
import csv
import hashlib
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from synthesize_unlabeled import (ESPEAK_VARIANTS, FORTUNES, TOOLS, labeled_transcripts,
                                  make_voices, select_sentences)
from synthesize_corpus import VARIANTS

CORPUS = ROOT / "data" / "espeak_corpus"


def test_sentences_overlapping_a_labeled_transcript_are_left_out():
    labeled = ["A PARLOR UTENSIL FOR SUBDUING THE IMPENITENT VISITOR", "TO BE OR NOT"]
    entries = [
        "Abstainer, n.: A parlor utensil for subduing the impenitent visitor.\n\t-- Bierce",
        "He said: to be or not to be, that is the question here.",  # contains a labeled one
        "The cat sat on the mat all day. It was happy there.\n-- Anonymous",
        "Short one.",  # under 4 words
    ]
    pairs = select_sentences(entries, labeled)
    assert [t for _, t in pairs] == ["THE CAT SAT ON THE MAT ALL DAY", "IT WAS HAPPY THERE"]


def test_voices_are_many_and_none_is_a_shipped_one():
    import random

    voices = make_voices(random.Random(0), 160)
    assert len(voices) > 8 * len(labeled_speakers())
    espeak = {voice.split("+")[1] for synthesizer, voice, _ in voices if synthesizer == "espeak-ng"}
    assert espeak <= set(ESPEAK_VARIANTS) and not espeak & set(VARIANTS)


def labeled_speakers():
    with open(CORPUS / "train.csv") as f:
        return {row["spk_id"] for row in csv.DictReader(f)}


@pytest.mark.skipif(any(shutil.which(tool) is None for tool in TOOLS) or not FORTUNES.is_dir(),
                    reason="needs the synthesizers and fortunes: make corpus-unlabeled installs them")
def test_rebuilds_byte_for_byte(tmp_path):
    digests = []
    for name in ("a", "b"):
        run = subprocess.run([sys.executable, str(ROOT / "recipes" / "synthesize_unlabeled.py"),
                              "--out", str(tmp_path / name), "--hours", "0.01"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        files = sorted(p for p in (tmp_path / name).rglob("*") if p.is_file())
        digests.append({str(p.relative_to(tmp_path / name)): hashlib.sha256(p.read_bytes())
                        .hexdigest() for p in files})
    assert digests[0] == digests[1] and len(digests[0]) > 50
    with open(tmp_path / "a" / "train.csv") as f:
        rows = list(csv.DictReader(f))
    labeled = set(labeled_transcripts(CORPUS))
    assert not {row["wrd"] for row in rows} & labeled
    assert len({row["spk_id"] for row in rows}) > 50
