"""evaluate.py and transcribe.py on a small trained CTC model: JSON contract, streaming == offline,
and the latency-budget choice."""
import csv
import json
import subprocess
import sys

import pytest
from speechbrain.utils.data_utils import batch_pad_right

import evaluate
import transcribe
from dataio import load_audio
from inference import Recognizer
from conftest import ROOT
from test_ctc import CTC_TINY
from test_recipe import CORPUS, slice_csv

AUDIO = str(CORPUS / "audio" / "test" / "spk22" / "spk22-000.flac")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch CTC run; returns its saved hyperparams.yaml, output folder and test CSV."""
    folder = tmp_path_factory.mktemp("ctc")
    test_csv = slice_csv("test", 3, folder / "test.csv")
    command = [sys.executable, str(ROOT / "recipes" / "train.py"),
               str(ROOT / "hparams" / "CTC" / "conformer_small.yaml"),
               "--data_folder", str(CORPUS), "--output_folder", str(folder / "run"),
               "--train_csv", slice_csv("train", 8, folder / "train.csv"),
               "--valid_csv", slice_csv("valid", 3, folder / "valid.csv"), "--test_csv", test_csv,
               "--number_of_epochs", "2", *CTC_TINY]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    return summary["ctc_hparams"], summary["ctc_output_folder"], test_csv


def test_evaluate_json_contract(trained):
    hparams, folder, test_csv = trained
    result = evaluate.main([hparams, "--output_folder", folder, "--test_csv", test_csv,
                            "--context", "low"])
    assert {"wer", "cer", "context", "audio_seconds", "rtf"} <= set(result)
    assert result["context"] == [16, 1] and result["audio_seconds"] > 5 and result["rtf"] > 0
    assert 0 <= result["cer"]


def test_evaluate_several_contexts_writes_table_and_plot(trained):
    hparams, folder, test_csv = trained
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
    recognizer = Recognizer(hparams, folder, device="cpu")
    audio = [load_audio(row["wav"].replace("$data_root", str(CORPUS)))
             for row in csv.DictReader(open(test_csv))]
    wavs, wav_lens = batch_pad_right(audio)
    context = recognizer.context("low")
    alone = [recognizer.transcribe(samples, context) for samples in audio]
    assert all(alone)  # the tiny model spells something: the comparison below can fail
    for streaming in (False, True):
        assert recognizer.transcribe_batch(wavs, wav_lens, context, streaming) == alone
    results = [evaluate.main([hparams, "--output_folder", folder, "--test_csv", test_csv,
                              "--context", "low", "--device", "cpu", "--batch_size", size, *mode])
               for size in ("1", "3") for mode in ([], ["--streaming"])]
    assert [r["streaming"] for r in results] == [False, True, False, True]
    assert len({(r["wer"], r["cer"]) for r in results}) == 1
    with pytest.raises(ValueError, match="--batch_size"):
        evaluate.main([hparams, "--output_folder", folder, "--test_csv", test_csv,
                       "--batch_size", "0"])


def test_streaming_transcript_equals_offline(trained):
    hparams, folder, _ = trained
    for context in ("very_low", "8,3"):
        result = transcribe.main([hparams, "--output_folder", folder, "--audio", AUDIO,
                                  "--context", context])
        assert result["equal_to_offline"] and result["text"] == result["offline_text"]


def test_auto_mode_picks_largest_context_within_measured_latency(trained):
    hparams, folder, _ = trained
    rows = transcribe.main([hparams, "--output_folder", folder, "--audio", AUDIO,
                            "--mode", "benchmark"])["benchmark"]
    assert [r["preset"] for r in rows] == ["very_low", "low", "medium", "high"]
    for row in rows:
        assert row["latency_ms"] == pytest.approx(row["chunk_ms"] + row["compute_ms"], abs=0.11)
    generous = transcribe.main([hparams, "--output_folder", folder, "--audio", AUDIO,
                                "--mode", "auto", "--latency_budget_ms", "100000"])
    assert generous["chosen"]["preset"] == "high" and generous["equal_to_offline"]
    with pytest.raises(ValueError, match="no preset fits"):
        transcribe.main([hparams, "--output_folder", folder, "--audio", AUDIO,
                         "--mode", "auto", "--latency_budget_ms", "10"])


def test_choice_follows_measured_latency_not_chunk_size():
    rows = [{"preset": "low", "context": [16, 1], "chunk_ms": 80, "latency_ms": 95},
            {"preset": "medium", "context": [32, 3], "chunk_ms": 160, "latency_ms": 290},
            {"preset": "high", "context": [64, 7], "chunk_ms": 320, "latency_ms": 330}]
    assert transcribe.choose(rows, 300)["preset"] == "medium"
    rows[1]["latency_ms"] = 310  # measured slower: the budget now only fits "low"
    assert transcribe.choose(rows, 300)["preset"] == "low"
