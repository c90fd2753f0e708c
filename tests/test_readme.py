"""Every command and Python snippet of README.md and docs/*.md runs as written after ``make demo``.

The ```bash and ```python blocks are extracted and run from a directory laid out like a fresh
clone after ``make demo``: links to the repository's ``recipes/``, ``modules/``, ``hparams/``,
``data/``, ``benchmarks/`` and ``.venv/``, and a ``results/`` holding the demo's two run folders
(``results/ssl_conformer/1986`` and ``results/ctc_conformer_demo``, as ``recipes/demo.py`` names
them), trained here with tiny sizes for one epoch instead of the demo's ~10-35 minutes.

Commands that train run with overrides appended (tiny sizes, one epoch, a few utterances:
``SHORTENED``); the few that cannot run here are listed in ``NOT_RUN`` with the reason. Blocks
that are not commands (outputs, file layouts) are fenced ```text, ```json or ```yaml.
"""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from modules.compiled_stream import compiler_available
from test_ctc import CTC_TINY
from test_recipe import TINY, slice_csv

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"bash", "python"}
NOT_RUNNABLE = {"text", "json", "yaml"}
LINKED = ["recipes", "modules", "hparams", "data", "benchmarks", ".venv", "Makefile",
          "requirements.txt", "tools"]  # tools: KenLM's programs, where `make kenlm` built them

# a substring of a command -> why the test does not run it (kept short: everything else runs)
NOT_RUN = {
    "make demo": "what the fixture stands in for (tiny runs under the demo's folder names)",
    "make test": "the whole test suite, this file included",
    "make kenlm": "apt-get and a C++ build, 3 minutes (tests/test_ngram.py uses what it builds)",
    "make corpus-labeled": "apt-get installs synthesizers, then writes 559 MB "
                           "(tests/test_benchmark_corpus.py checks the generator)",
    "make lm-text": "apt-get installs text packages, and it needs the benchmark corpus "
                    "(tests/test_lm_text.py checks what it writes)",
    "make ssl-curve": "hours of CPU on the benchmark corpus (tests/test_ssl_curve.py runs a tiny "
                      "curve)",
    "make recognizer": "hours of CPU on the benchmark corpus (tests/test_recognizer.py runs "
                       "its command on a tiny one)",
    "make corpus-downstream": "the benchmark corpus's voices, 10 minutes of synthesis "
                              "(tests/test_synthesize_downstream.py checks the partitions)",
    "exported/ssl_benchmark": "an SSL run on the benchmark corpus (hours), then an hour of "
                              "downstream runs (tests/test_downstream.py runs them tiny)",
    "--nproc_per_node=8": "8 GPUs per node (tests/test_distributed.py runs torchrun on CPU)",
    "#SBATCH": "a Slurm cluster",
    "/data/LibriSpeech": "needs LibriSpeech, which a clone does not have",
    "benchmarks/stream_cost.py": "an hour of benchmark-corpus audio streamed "
                                 "(tests/test_adaptive_stream.py runs it short)",
    "benchmarks/adaptive_context.py": "the benchmark corpus and a recognizer trained on it, half an "
                                      "hour of CPU (tests/test_adaptive_stream.py runs it short)",
    "results/s2s_benchmark": "hours of CPU on the benchmark corpus (tests/test_lm.py and "
                             "tests/test_decoding.py run the recipes and modes tiny)",
    "ablate.py hparams/ablations/": "a 19-minute grid, or a Slurm cluster (tests/test_ablate.py "
                                    "runs a tiny grid)",
}
TINY_DATA = ["--train_csv", "tiny/train.csv", "--valid_csv", "tiny/valid.csv"]
# a substring of a command -> overrides appended to it (later flags win)
SHORTENED = {
    "recipes/train.py hparams/CTC/": [*CTC_TINY, *TINY_DATA, "--test_csv", "tiny/test.csv",
                                      "--number_of_epochs", "1"],
    "recipes/train.py hparams/SSL/": [*TINY, *TINY_DATA, "--number_of_epochs", "1"],
    "recipes/train.py hparams/S2S/": [*CTC_TINY, *TINY_DATA, "--test_csv", "tiny/test.csv",
                                      "--number_of_epochs", "1", "--num_decoder_layers", "1",
                                      "--beam_size", "2"],
    "hparams/LM/ngram.yaml": ["--vocab_size", "26", "--order", "4", *TINY_DATA,
                              "--test_csv", "tiny/test.csv"],
    "hparams/LM/word_ngram.yaml": ["--vocab_size", "26", *TINY_DATA, "--test_csv",
                                   "tiny/test.csv"],
    "recipes/train.py hparams/LM/": ["--d_model", "32", "--nhead", "2", "--num_layers", "1",
                                     "--d_ffn", "64", "--vocab_size", "26", *TINY_DATA,
                                     "--test_csv", "tiny/test.csv", "--number_of_epochs", "1"],
    "benchmarks/decoder_step.py": ["--tokens", "8", "--frames", "20", "--repeats", "1"],
}


def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, text) of every fenced block of a markdown file."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```") and language is None:
            language, start, lines = line[3:].strip(), number, []
        elif line.startswith("```"):
            blocks.append((language, start, "\n".join(lines)))
            language = None
        elif language is not None:
            lines.append(line)
    assert language is None, f"{path.name}: a fence opened at line {start} is never closed"
    return blocks


def bash_commands(text: str) -> list[str]:
    """The commands of a bash block (continuation lines joined, comments dropped); a script
    (``#!`` first) is one command."""
    if text.startswith("#!"):
        return [text]
    commands, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        commands.append(re.sub(r"\s+#.*$", "", current).strip())
        current = ""
    return commands


def snippets() -> list:
    params = []
    for path in DOCUMENTS:
        for language, line, text in fenced_blocks(path):
            if language not in RUNNABLE:
                continue
            where = f"{path.relative_to(ROOT)}:{line}"
            if language == "python":
                params.append(pytest.param("python", text, id=where))
            else:
                params += [pytest.param("bash", command, id=f"{where}:{command[:40]}")
                           for command in bash_commands(text)]
    return params


def kenlm_built() -> bool:
    """Whether ``make kenlm`` ran: the n-gram LM's programs and Python module."""
    return (ROOT / "tools" / "kenlm" / "bin" / "lmplz").is_file() and \
        importlib.util.find_spec("kenlm") is not None


def not_run_reason(command: str) -> str | None:
    return next((why for key, why in NOT_RUN.items() if key in command), None)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A directory that looks like a clone after ``make demo``, with tiny demo runs."""
    base = tmp_path_factory.mktemp("clone")
    for name in LINKED:
        if (ROOT / name).exists():
            (base / name).symlink_to(ROOT / name)
    (base / "tiny").mkdir()
    slice_csv("train", 8, base / "tiny" / "train.csv")
    slice_csv("valid", 3, base / "tiny" / "valid.csv")
    slice_csv("test", 3, base / "tiny" / "test.csv")
    train = [sys.executable, "recipes/train.py"]
    # recipes/demo.py: SSL into the yaml's own folder, then CTC from it into ctc_<encoder>_demo
    for command in ([*train, "hparams/SSL/conformer.yaml", *TINY, *TINY_DATA,
                     "--number_of_epochs", "1"],
                    [*train, "hparams/CTC/conformer_small.yaml", "--pretrained_ssl",
                     "results/ssl_conformer/1986", "--output_folder", "results/ctc_conformer_demo",
                     *CTC_TINY, *TINY_DATA, "--test_csv", "tiny/test.csv",
                     "--number_of_epochs", "1"]):
        done = subprocess.run(command, capture_output=True, text=True, cwd=base, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    return base


def environment() -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python`
    return env


@pytest.mark.parametrize("language, text", snippets())
def test_documented_snippet_runs(clone, language, text):
    if language == "python":
        command = [sys.executable, "-c", text]
    else:
        reason = not_run_reason(text)
        if reason:
            pytest.skip(f"not run: {reason}")
        if ("hparams/LM/ngram.yaml" in text or "hparams/LM/word_ngram.yaml" in text) and \
                not kenlm_built():
            pytest.skip("KenLM is not built here: run `make kenlm`")
        if "--compiled" in text and not compiler_available():
            pytest.skip("no C++ compiler here, which torch.compile needs")
        extra = next((args for key, args in SHORTENED.items() if key in text), [])
        command = ["bash", "-euo", "pipefail", "-c", " ".join([text, *map(shlex.quote, extra)])]
    done = subprocess.run(command, capture_output=True, text=True, cwd=clone, timeout=300,
                          env=environment())
    assert done.returncode == 0, f"{text}\n---\n{done.stderr[-3000:]}{done.stdout[-2000:]}"


def test_every_block_is_marked_and_every_exception_is_used():
    """Every fence names its language (runnable or not), and every NOT_RUN / SHORTENED entry
    still matches a documented command (the lists do not go stale)."""
    commands = []
    for path in DOCUMENTS:
        for language, line, text in fenced_blocks(path):
            assert language in RUNNABLE | NOT_RUNNABLE, (
                f"{path.name}:{line}: fence the block as ```bash or ```python (run by this "
                f"test) or ```text (not run), not ```{language}")
            if language == "bash":
                commands += bash_commands(text)
    for key in [*NOT_RUN, *SHORTENED]:
        assert any(key in command for command in commands), f"{key!r} matches no command"
