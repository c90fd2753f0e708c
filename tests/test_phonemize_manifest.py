"""Phoneme manifests for the letters-vs-phonemes diagnostic (recipes/phonemize_manifest.py)."""
import csv
import shutil
from pathlib import Path

import pytest

from phonemize_manifest import espeak_language, phonemize, phonemize_manifest


def test_language_follows_the_voice_that_spoke():
    assert espeak_language("espeak-ng:en-029+Marco:p36:r139|espeak:Marco") == "en-029"
    assert espeak_language("espeak-ng:en-gb-scotland:p40:r150|espeak:default") == "en-gb-scotland"
    assert espeak_language("flite:slt:p-15:r0.95|slt") == "en-us"
    assert espeak_language("text2wave:kal_diphone:p0:r1.0|kal16") == "en-us"


def write_manifest(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_phonemized_rows_keep_everything_but_the_transcript(tmp_path):
    rows = [{"ID": "a", "duration": "1.0", "wav": "$data_root/a.flac", "spk_id": "s1",
             "wrd": "THE CAT SAT", "voice": "espeak-ng:en-us+m3:p50:r160|espeak:m3"},
            {"ID": "b", "duration": "1.0", "wav": "$data_root/b.flac", "spk_id": "s2",
             "wrd": "IT'S A DOG", "voice": "flite:slt:p0:r1.0|slt"}]
    write_manifest(tmp_path / "in.csv", rows)
    characters = phonemize_manifest(tmp_path / "in.csv", tmp_path / "out" / "in.csv", 1)
    out = list(csv.DictReader((tmp_path / "out" / "in.csv").open()))
    assert [{k: v for k, v in r.items() if k != "wrd"} for r in out] == [
        {k: v for k, v in r.items() if k != "wrd"} for r in rows]
    assert len(out[0]["wrd"].split()) == 3 and out[0]["wrd"].islower()  # one IPA word per word
    assert "ð" in out[0]["wrd"] and "æ" in out[0]["wrd"]
    assert not set("ˈˌ:") & characters and " " not in characters


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_one_length_mark_for_every_accent():
    scottish = phonemize(("rather", "en-gb-scotland"))
    assert ":" not in scottish and "ː" in scottish


def test_a_manifest_without_voices_is_refused(tmp_path):
    write_manifest(tmp_path / "in.csv", [{"ID": "a", "wav": "a.flac", "wrd": "HELLO"}])
    with pytest.raises(SystemExit, match="in.csv: needs rows with `wrd` and `voice`"):
        phonemize_manifest(tmp_path / "in.csv", tmp_path / "out.csv", 1)
