"""A trained run folder, loadable from any working directory and from any copy of it.

``recipes/train.py`` saves ``<output_folder>/hyperparams.yaml`` with every reference resolved:
the paths of the checkpoints, the tokenizer and the logs are written out as they were given
(often relative to the directory training ran in). Here the folder that holds the
``hyperparams.yaml`` *is* the run: its recorded ``output_folder`` is replaced by that folder
everywhere in the file, so a copy loads its own weights and tokenizer, never the original's;
data paths (``data_folder``, the manifests) are resolved against the directory the run was
trained in (``cwd`` in ``run_record.json`` when recorded), else the repository root.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

from hyperpyyaml import load_hyperpyyaml

from modules.ngram import MODEL_FILE as NGRAM_MODEL
from provenance import hparams_data

ROOT = Path(__file__).resolve().parents[1]
HPARAMS = "hyperparams.yaml"
DATA_KEYS = ("data_folder", "train_csv", "valid_csv", "test_csv", "tokenizer_csv", "noise_csv")


def is_run_folder(folder: Path) -> bool:
    """A folder written by ``train.py``: ``hyperparams.yaml`` and checkpoints under ``save/``."""
    return (folder / HPARAMS).is_file() and any((folder / "save").glob("CKPT+*"))


def find_run_folder(path: str | Path, output_folder: str | Path | None = None) -> Path:
    """The run folder named by ``path`` (the folder or its ``hyperparams.yaml``), absolute; an
    exported model folder (``recipes/export.py``) is taken as it is.

    Arguments
    ---------
    path : what the user gave as the model.
    output_folder : the older ``--output_folder <run>`` argument, if given: only for the hint
        when ``path`` is a recipe's hparams file.

    Raises
    ------
    ValueError : one line naming ``path`` and what to give instead.
    """
    given = Path(path)
    folder = given if given.is_dir() else given.parent
    if not given.exists():
        raise ValueError(f"{path}: no such run folder or file; give the --output_folder of a "
                         "recipes/train.py run (it holds hyperparams.yaml and save/)")
    if given.is_file() and given.name != HPARAMS or not (folder / HPARAMS).is_file():
        hint = output_folder if output_folder and is_run_folder(Path(output_folder)) else None
        example = f", e.g. {hint}" if hint else " (the --output_folder of recipes/train.py)"
        raise ValueError(f"{path} is not a trained run: give the run folder{example}, which holds "
                         "the hyperparams.yaml and checkpoints the model was trained with")
    if (folder / "encoder_network.ckpt").is_file():  # a model folder from recipes/export.py
        return folder.resolve()
    if (folder / NGRAM_MODEL).is_file():  # an n-gram LM (hparams/LM/ngram.yaml): no checkpoints
        return folder.resolve()
    if (folder / "kenlm_log.txt").is_file():
        raise ValueError(f"{folder}: no {NGRAM_MODEL}: this n-gram run did not finish (see "
                         f"{folder / 'kenlm_log.txt'}); run hparams/LM/ngram.yaml again")
    if not any((folder / "save").glob("CKPT+*")):
        raise ValueError(f"{folder}: no checkpoint under {folder / 'save'}; the run has not "
                         "finished an epoch, or the folder was copied without save/")
    return folder.resolve()


def run_record(folder: Path) -> dict:
    """``run_record.json`` of the run (empty when absent or unreadable)."""
    try:
        return json.loads((folder / "run_record.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def data_bases(folder: Path) -> list[Path]:
    """Where relative data paths of the run may start: the directory it was trained in (when
    recorded), the repository root (``make demo`` and the tests train there), this one."""
    recorded = run_record(folder).get("cwd")
    return [Path(p) for p in (recorded, ROOT, Path.cwd()) if p]


def resolve_data_path(value: str, bases: list[Path]) -> str:
    """``value`` if absolute, else the first existing ``base / value``; the first base if none."""
    if Path(value).is_absolute():
        return value
    for base in bases:
        if (base / value).exists():
            return str(base / value)
    return str(bases[0] / value)


def relocated_text(text: str, recorded: str, folder: Path) -> str:
    """``text`` with the path ``recorded`` (and paths under it) replaced by ``folder``, where it
    starts a YAML value after a space (``key: <path>``, ``- <path>``, or an indented line: the
    YAML writer folds a long value onto the next line)."""
    pattern = re.compile(r"(?<=\s)" + re.escape(recorded.rstrip("/"))
                         + r"(?=/|\s|$)", re.MULTILINE)
    return pattern.sub(lambda _: str(folder), text)


def run_hparams_text(folder: Path) -> str:
    """The run's hyperparams.yaml, its output and save folders pointing at ``folder``."""
    text = (folder / HPARAMS).read_text()
    data = hparams_data(text)
    recorded_output = str(data.get("output_folder") or "")
    recorded_save = str(data.get("save_folder") or "")
    if recorded_save and not recorded_save.startswith(recorded_output.rstrip("/") + "/"):
        text = relocated_text(text, recorded_save, folder / "save")  # --save_folder elsewhere
    if recorded_output:
        text = relocated_text(text, recorded_output, folder)
    return text


def tokenizer_model(data: dict) -> Path | None:
    """The SentencePiece model file a loaded ``tokenizer`` entry reads (None without one)."""
    spec = data.get("tokenizer")
    if not isinstance(spec, dict):
        return None
    args = next(iter(spec.values()))
    if not isinstance(args, dict) or "model_dir" not in args:
        return None
    model_type = args.get("model_type", "unigram")  # SpeechBrain's default
    return Path(args["model_dir"]) / f"{args['vocab_size']}_{model_type}.model"


def load_run_hparams(folder: Path) -> dict:
    """The run's hparams, built (modules, tokenizer, checkpointer) from its own folder.

    Raises
    ------
    ValueError : one line when the run's tokenizer model is missing (loading would train a new
        one, which the weights were not trained with).
    """
    text = run_hparams_text(folder)
    model = tokenizer_model(hparams_data(text))
    if model is not None and not model.is_file():
        raise ValueError(f"{folder}: the run's tokenizer {model} is missing; copy the whole run "
                         "folder (save/tokenizer included)")
    hparams = load_hyperpyyaml(io.StringIO(text))
    bases = data_bases(folder)
    for key in DATA_KEYS:
        if isinstance(hparams.get(key), str):
            hparams[key] = resolve_data_path(hparams[key], bases)
    hparams["output_folder"] = str(folder)
    return hparams
