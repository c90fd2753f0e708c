"""evaluate.py and transcribe.py on a small trained CTC model: JSON contract, streaming == offline,
and the latency-budget choice."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
from speechbrain.utils.data_utils import batch_pad_right

import evaluate
import transcribe
from dataio import load_audio
from inference import Recognizer
from run_folder import is_run_folder
from conftest import ROOT
from test_ctc import CTC_TINY
from test_recipe import CORPUS, slice_csv

AUDIO = str(CORPUS / "audio" / "test" / "spk22" / "spk22-000.flac")


def tiny_ctc_run(tmp_path_factory) -> tuple[Path, str]:
    """One 2-epoch tiny CTC run per test session (shared by the modules that decode), trained
    as ``make demo`` trains: relative output and data paths, from the directory it runs in.

    Returns the run folder and a 3-utterance test CSV.
    """
    base = tmp_path_factory.getbasetemp() / "tiny_ctc"
    run, test_csv = base / "results" / "ctc", base / "test.csv"
    if is_run_folder(run):
        return run, str(test_csv)
    base.mkdir(exist_ok=True)
    if not (base / "data").exists():
        (base / "data").symlink_to(ROOT / "data")
    slice_csv("test", 3, test_csv)
    command = [sys.executable, str(ROOT / "recipes" / "train.py"),
               str(ROOT / "hparams" / "CTC" / "conformer_small.yaml"),
               "--data_folder", "data/espeak_corpus", "--output_folder", "results/ctc",
               "--train_csv", slice_csv("train", 8, base / "train.csv"),
               "--valid_csv", slice_csv("valid", 3, base / "valid.csv"),
               "--test_csv", str(test_csv), "--number_of_epochs", "2", *CTC_TINY]
    done = subprocess.run(command, capture_output=True, text=True, cwd=base, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, str(test_csv)


def short_clip(tmp_path_factory, seconds: float = 1.5) -> str:
    """The first ``seconds`` of ``AUDIO``: streaming tests at small chunks stay fast."""
    path = tmp_path_factory.getbasetemp() / f"clip_{seconds}s.wav"
    if not path.is_file():
        samples, rate = sf.read(AUDIO, dtype="float32")
        sf.write(path, samples[:int(seconds * rate)], rate)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shared tiny run: its hyperparams.yaml, run folder and test CSV."""
    run, test_csv = tiny_ctc_run(tmp_path_factory)
    return str(run / "hyperparams.yaml"), str(run), test_csv


def test_evaluate_json_contract(trained):
    hparams, folder, test_csv = trained
    result = evaluate.main([folder, "--test_csv", test_csv, "--context", "low"])
    assert {"wer", "cer", "context", "audio_seconds", "rtf"} <= set(result)
    assert result["context"] == [16, 1] and result["audio_seconds"] > 5 and result["rtf"] > 0
    assert 0 <= result["cer"]


def test_evaluate_several_contexts_writes_table_and_plot(trained):
    hparams, folder, test_csv = trained
    # the older form, the run's hyperparams.yaml and the same run as --output_folder, still works
    result = evaluate.main([hparams, "--output_folder", folder, "--test_csv", test_csv,
                            "--context", "all", "--streaming"])
    contexts = [r["context"] for r in result["results"]]
    assert contexts == [[8, 0], [16, 1], [32, 3], [64, 7], [-1, -1]]
    assert [r["streaming"] for r in result["results"]] == [True] * 4 + [False]
    assert open(result["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(open(result["table_csv"]).read().splitlines()) == 6
    assert "| [32, 3] | [32, 3] (left 1.28 s, chunk 0.16 s) | streaming |" in open(
        result["table_md"]).read()


def test_batched_and_streamed_decoding_give_the_same_transcripts(trained):
    """A padded batch or one utterance at a time, offline or chunk by chunk: the same
    transcripts (the test split's utterances have different lengths)."""
    hparams, folder, test_csv = trained
    recognizer = Recognizer(folder, device="cpu")
    audio = [load_audio(row["wav"].replace("$data_root", str(CORPUS)))
             for row in csv.DictReader(open(test_csv))]
    wavs, wav_lens = batch_pad_right(audio)
    context = recognizer.context("low")
    alone = [recognizer.transcribe(samples, context) for samples in audio]
    assert all(alone)  # the tiny model spells something: the comparison below can fail
    for streaming in (False, True):
        assert recognizer.transcribe_batch(wavs, wav_lens, context, streaming) == alone
    results = [evaluate.main([hparams, "--test_csv", test_csv, "--context", "low",
                              "--device", "cpu", "--batch_size", size, *mode])
               for size, mode in (("1", []), ("3", ["--streaming"]))]
    assert [r["streaming"] for r in results] == [False, True]
    assert len({(r["wer"], r["cer"]) for r in results}) == 1
    with pytest.raises(SystemExit, match="--batch_size"):
        evaluate.main([hparams, "--test_csv", test_csv, "--batch_size", "0"])


def test_streaming_transcript_equals_offline(trained, tmp_path_factory):
    hparams, folder, _ = trained
    for context in ("very_low", "8,3"):
        result = transcribe.main([folder, "--audio", short_clip(tmp_path_factory),
                                  "--context", context, "--quiet"])
        assert result["equal_to_offline"] and result["text"] == result["offline_text"]


def test_auto_mode_picks_largest_context_within_measured_latency(trained, tmp_path_factory,
                                                                monkeypatch):
    clip = short_clip(tmp_path_factory)
    hparams, folder, _ = trained
    rows = transcribe.main([folder, "--audio", clip, "--mode", "benchmark"])["benchmark"]
    assert [r["preset"] for r in rows] == ["very_low", "low", "medium", "high"]
    for row in rows:
        assert row["latency_ms"] == pytest.approx(row["chunk_ms"] + row["compute_ms"], abs=0.11)
    monkeypatch.setattr(transcribe, "benchmark", lambda *args, **options: rows)  # measured once above
    generous = transcribe.main([folder, "--audio", clip, "--mode", "auto",
                                "--latency_budget_ms", "100000"])
    assert generous["chosen"]["preset"] == "high" and generous["equal_to_offline"]
    with pytest.raises(ValueError, match="no preset fits"):
        transcribe.main([folder, "--audio", clip, "--mode", "auto", "--latency_budget_ms", "10"])


def test_choice_follows_measured_latency_not_chunk_size():
    rows = [{"preset": "low", "context": [16, 1], "chunk_ms": 80, "latency_ms": 95},
            {"preset": "medium", "context": [32, 3], "chunk_ms": 160, "latency_ms": 290},
            {"preset": "high", "context": [64, 7], "chunk_ms": 320, "latency_ms": 330}]
    assert transcribe.choose(rows, 300)["preset"] == "medium"
    rows[1]["latency_ms"] = 310  # measured slower: the budget now only fits "low"
    assert transcribe.choose(rows, 300)["preset"] == "low"


def test_a_moved_run_reads_its_own_files_even_where_yaml_folded_a_long_path():
    """hyperparams.yaml folds a long value onto an indented next line: relocated too."""
    from pathlib import Path

    from run_folder import relocated_text

    text = "output_folder: /x/out\nsave_folder:\n    /x/out/save\nother: /x/outer\n- /x/out/y\n"
    assert relocated_text(text, "/x/out", Path("/new")) == \
        "output_folder: /new\nsave_folder:\n    /new/save\nother: /x/outer\n- /new/y\n"
