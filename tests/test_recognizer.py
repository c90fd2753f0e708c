"""`make recognizer`: the Makefile's command, run as written on a tiny benchmark-shaped corpus
(tiny sizes, one epoch), ends with the JSON line that `recipes/evaluate.py` takes, and that
run decodes another CSV."""
import json
import re
import shlex
import subprocess
import sys

from conftest import ROOT
from test_ssl_curve import tiny_benchmark

# the benchmark's sizes and length, made tiny; every other flag stays as the Makefile has it
TINY = {"--d_model": "32", "--nhead": "2", "--num_encoder_layers": "1", "--d_ffn": "64",
        "--subsampling_conv_channels": "4", "--number_of_epochs": "1"}


def makefile_command(target: str) -> list[str]:
    """The recipe of ``target`` in the Makefile, one command, its continuations joined."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    recipe = re.search(rf"^{target}:[^\n]*\n\t([^\n]+)", text, re.M).group(1)
    return shlex.split(recipe.replace("$(PY)", sys.executable))


def test_make_recognizer_trains_and_its_run_decodes_another_csv(tmp_path):
    command = makefile_command("recognizer")
    assert command[1:3] == ["recipes/train.py", "hparams/CTC/conformer_small.yaml"]
    corpus = tiny_benchmark(tmp_path / "benchmark")
    for key, value in TINY.items():
        command[command.index(key) + 1] = value
    command = [str(corpus) + a[len("data/benchmark"):] if a.startswith("data/benchmark") else a
               for a in command]
    command[command.index("--output_folder") + 1] = str(tmp_path / "recognizer")
    run = subprocess.run(command + ["--device_preset", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["ctc_output_folder"] == str(tmp_path / "recognizer")
    # what the Makefile's comment promises: evaluate.py decodes any other CSV with it
    decoded = subprocess.run(
        [sys.executable, "recipes/evaluate.py", summary["ctc_hparams"],
         "--test_csv", str(corpus / "dev.csv"), "--context", "very_low", "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert decoded.returncode == 0, decoded.stderr[-3000:]
    assert 0 <= json.loads(decoded.stdout.strip().splitlines()[-1])["cer"] <= 100
