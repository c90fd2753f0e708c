"""A newcomer's first hour with evaluate.py and transcribe.py (issue 18): a run folder that works
from anywhere and loads its own weights, one-line errors for bad input, single-file use, scoring
that follows the tokenizer, and evaluation outputs that never overwrite each other."""
import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

import cli
import evaluate
import transcribe
from conftest import ROOT
from test_inference import AUDIO, short_clip, tiny_ctc_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The shared tiny run folder (relative paths in its hyperparams.yaml) and its test CSV."""
    return tiny_ctc_run(tmp_path_factory)


def cli_error(main, argv, monkeypatch) -> str:
    """What ``run_cli`` stops with: the one-line message (any other exception fails the test,
    as a traceback would)."""
    monkeypatch.setattr(sys, "argv", ["script", *argv])
    with pytest.raises(SystemExit) as stopped:
        cli.run_cli(main)
    message = stopped.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    return message


def write_csv(path, rows, header=("ID", "duration", "wav", "spk_id", "wrd")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_run_folder_works_from_any_directory(run, tmp_path):
    """``transcribe.py <run> --audio f`` with no other argument, from another directory: the
    run's relative paths are its own; nothing is written where it runs."""
    folder, _ = run
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "transcribe.py"), str(folder),
                           "--audio", AUDIO], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["equal_to_offline"] and result["text"] == result["text"].strip()
    assert list(tmp_path.iterdir()) == []  # no stray results/ or tokenizer folder


def test_copied_run_loads_its_own_weights(run, tmp_path, monkeypatch):
    """A copy, used from the directory where the original's relative paths resolve, decodes
    with the copy's checkpoints; a copy without its tokenizer says so instead of training one."""
    folder, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for checkpoint in copy.glob("save/CKPT+*/ctc_head.ckpt"):
        state = torch.load(checkpoint)
        state["bias"][:] = -100.0
        state["bias"][0] = 100.0  # the blank always wins: empty transcripts
        torch.save(state, checkpoint)
    monkeypatch.chdir(folder.parents[1])  # "results/ctc" here is the original run
    original = transcribe.main([str(folder), "--audio", AUDIO, "--quiet"])
    copied = transcribe.main([str(copy / "hyperparams.yaml"), "--audio", AUDIO, "--quiet"])
    assert original["text"] and copied["text"] == ""
    shutil.rmtree(copy / "save" / "tokenizer")
    message = cli_error(transcribe.main, [str(copy), "--audio", AUDIO], monkeypatch)
    assert "tokenizer" in message and "copy the whole run folder" in message
    assert not (copy / "save" / "tokenizer").exists()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    sf.write(folder / "short.wav", np.zeros(160, dtype="float32"), 16000)  # 0.01 s
    speech = sf.read(AUDIO, dtype="float32")[0][:24000]  # 1.5 s
    speech = torchaudio.functional.resample(torch.from_numpy(speech), 16000, 44100).numpy()
    sf.write(folder / "stereo44k.wav", np.stack([speech, 0.5 * speech], 1), 44100)
    (folder / "clips").mkdir()
    return folder


@pytest.mark.parametrize("script, args, expected", [
    ("transcribe", ["{run}", "--audio", "{bad}/short.wav"], ["short.wav", "shorter", "longer"]),
    ("transcribe", ["{run}", "--audio", "{bad}/clips"], ["clips", "folder", "evaluate.py"]),
    ("transcribe", ["{run}", "--audio", AUDIO, "--contxt", "low"],
     ["--contxt", "did you mean --context?"]),
    ("evaluate", ["{run}", "--test_csv", "{test_csv}", "--contxt", "low"],
     ["--contxt", "did you mean --context?"]),
    ("transcribe", [str(ROOT / "hparams" / "CTC" / "conformer_small.yaml"), "--audio", AUDIO],
     ["conformer_small.yaml", "not a trained run", "give the run folder"]),
    ("transcribe", ["{run}", "--audio", AUDIO, "--latency_budget_ms", "200"],
     ["--latency_budget_ms", "--mode auto"]),
    ("transcribe", ["{run}", "--audio", AUDIO, "--mode", "benchmark", "--context", "low"],
     ["--context", "drop --context"]),
    ("evaluate", ["{run}", "--test_csv", "{bad}/no_wrd.csv"], ["no_wrd.csv", "no wrd column"]),
    ("evaluate", ["{run}", "--test_csv", "{bad}/header_only.csv"],
     ["header_only.csv", "no utterances"]),
])
def test_bad_input_gives_one_line(run, bad_files, monkeypatch, script, args, expected):
    folder, test_csv = run
    write_csv(bad_files / "no_wrd.csv", [["a", "1.0", AUDIO, "spk"]],
              ("ID", "duration", "wav", "spk_id"))
    write_csv(bad_files / "header_only.csv", [])
    argv = [a.format(run=folder, bad=bad_files, test_csv=test_csv) for a in args]
    message = cli_error({"evaluate": evaluate, "transcribe": transcribe}[script].main, argv,
                        monkeypatch)
    assert "\n" not in message and all(part in message for part in expected), message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_gives_one_line(run, monkeypatch):
    message = cli_error(transcribe.main, [str(run[0]), "--audio", AUDIO, "--device", "cuda"],
                        monkeypatch)
    assert "\n" not in message and "--device cuda" in message and "--device cpu" in message


def test_evaluate_lists_every_bad_file_and_never_scores_a_short_clip(run, bad_files, tmp_path,
                                                                     monkeypatch):
    folder, test_csv = run
    manifest = write_csv(tmp_path / "bad.csv", [
        ["short", "0.01", str(bad_files / "short.wav"), "x", "HI"],
        ["stereo", "4.9", str(bad_files / "stereo44k.wav"), "x", "HI"],
        ["missing", "1.0", str(tmp_path / "missing.wav"), "x", "HI"]])
    message = cli_error(evaluate.main, [str(folder), "--test_csv", manifest], monkeypatch)
    assert message.startswith("error: 3 bad audio file(s) in")
    assert all(name in message for name in ("short.wav", "stereo44k.wav", "missing.wav"))
    assert not list(folder.glob("eval_bad_*"))  # nothing scored


def test_single_file_use(run, bad_files, capsys, tmp_path_factory):
    """A 44.1 kHz stereo file is converted with one note; partials only when they change;
    --quiet prints nothing but the result; --context -1,-1 is a value (decoded offline)."""
    folder, _ = run
    result = transcribe.main([str(folder), "--audio", str(bad_files / "stereo44k.wav"),
                              "--quiet"])
    captured = capsys.readouterr()
    assert captured.out == "" and result["equal_to_offline"]
    assert captured.err.count("averaged to mono, resampled from 44100 to 16000 Hz") == 1
    clip = short_clip(tmp_path_factory)
    transcribe.main([str(folder), "--audio", clip, "--context", "very_low"])
    partials = [line.split("] ", 1)[-1] for line in capsys.readouterr().out.splitlines()]
    assert partials and all(a != b for a, b in zip(partials, partials[1:]))
    assert len(partials) < 1.5 / 0.04  # one line per chunk would be 38
    offline = transcribe.main([str(folder), "--audio", clip, "--context", "-1,-1", "--quiet"])
    assert offline["context"] == [-1, -1] and not offline["streamed"] and offline["text"]


def test_references_scored_as_the_tokenizer_was_trained(run, tmp_path, capsys):
    """Lowercase references with stray spaces score like the uppercase ones; characters the
    tokenizer never saw are reported once; hypotheses have no surrounding spaces."""
    folder, test_csv = run
    rows = list(csv.reader(open(test_csv)))
    lower = write_csv(tmp_path / "lower.csv", [r[:4] + [f"  {r[4].lower()}  "] for r in rows[1:]])
    odd = write_csv(tmp_path / "odd.csv", [r[:4] + [r[4] + " Ü2"] for r in rows[1:]])
    scores = [evaluate.main([str(folder), "--test_csv", path, "--context", "low",
                             "--output_folder", str(tmp_path)]) for path in (test_csv, lower, odd)]
    assert (scores[0]["cer"], scores[0]["wer"]) == (scores[1]["cer"], scores[1]["wer"])
    assert capsys.readouterr().err.count("never saw ('2' 'Ü')") == 1
    for line in open(scores[0]["hypotheses"]):
        utterance = json.loads(line)
        assert utterance["hyp"] == " ".join(utterance["hyp"].split())
        assert utterance["ref"].isupper() and {"id", "cer", "wer"} <= set(utterance)


def test_evaluate_outputs_are_named_after_the_options(run, tmp_path):
    """One context gets its table, plot and hypotheses too; another evaluation of the same CSV
    with other options writes other files."""
    folder, test_csv = run
    out = str(tmp_path)
    one = evaluate.main([str(folder), "--test_csv", test_csv, "--context", "low",
                         "--output_folder", out])
    assert one["table_md"].endswith("eval_test_low_offline.md")
    first = open(one["table_md"]).read()
    several = evaluate.main([str(folder), "--test_csv", test_csv, "--context", "high",
                             "--context", "-1,-1", "--streaming", "--output_folder", out])
    assert several["plot"].endswith("eval_test_high+unlimited_streaming.png")
    assert open(one["table_md"]).read() == first  # untouched
    for result in (one, several):
        assert open(result["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in open(several["hypotheses"])]
    assert [line["context"] for line in lines] == [[64, 7]] * 3 + [[-1, -1]] * 3
    assert "| CER % | WER % |" in first and "| offline |" in first
