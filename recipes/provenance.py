"""What produced a result: the commit, the command, the resolved hparams and the SSL checkpoint.

``train.py`` writes :func:`run_record` to ``<output_folder>/run_record.json`` and into its JSON
summary (``"record"``), and refuses to resume a run folder with other hparams
(:func:`check_resume`). Drivers that keep finished results and read them back instead of rerunning
(``ablate.py``) write them with :func:`write_result` and read them with :func:`check_result`,
which refuses a result whose record differs from the run asked for now.

Without git (an exported tree, no ``git`` binary) the git fields are ``None``.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CODE_PATHS = ("modules", "recipes", "hparams")  # what a run's numbers depend on
_MISSING = object()


def git(*args: str) -> str | None:
    """``git <args>`` in the repository: its stripped output, or None without git or a repo."""
    try:
        run = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def current_commit() -> str | None:
    """The sha of HEAD."""
    return git("rev-parse", "HEAD") or None


def current_code_commit() -> str | None:
    """The sha of the last commit touching modules/, recipes/ or hparams/: unlike HEAD, it does
    not move when only the README or the tests change."""
    return git("log", "-1", "--format=%H", "--", *CODE_PATHS) or None


def code_dirty() -> bool | None:
    """Whether modules/, recipes/ or hparams/ have uncommitted changes (untracked files
    included: a run may import them)."""
    status = git("status", "--porcelain", "--", *CODE_PATHS)
    return None if status is None else bool(status)


def machine_description() -> str:
    """The CPU (model, logical cores, AMX or not: bf16 is fast only with it), GPU and torch
    version, for the record of a measured figure."""
    import platform

    import torch

    cpu, amx = platform.processor() or platform.machine(), None
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines()
                   if line.startswith("model name"))
        amx = "amx_tile" in info
    except (OSError, StopIteration):
        pass
    parts = [cpu, f"{os.cpu_count()} logical CPUs"]
    if amx is not None:
        parts.append("AMX" if amx else "no AMX")
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    return ", ".join(parts + [f"torch {torch.__version__}"])


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_hashes(argv: list[str], base: str | Path | None = None) -> dict[str, str | None]:
    """``{"--<name>_csv": sha256}`` of every manifest named on a command line (``--x_csv path``
    or ``--x_csv=path``; relative paths from ``base``, default the working directory; None for
    a file that is not there): what data a run read, so that a result made from other
    manifests (a corpus made again by other synthesizer versions, say) is not read back."""
    hashes = {}
    for index, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if not (name.startswith("--") and name.endswith("_csv")):
            continue
        if not value and index + 1 < len(argv):
            value = argv[index + 1]
        path = Path(base or Path.cwd()) / value
        hashes[name] = sha256_file(path) if path.is_file() else None
    return hashes


def resolved_hparams_text(hparams_file: str | Path, overrides: str | dict) -> str:
    """The hparams file with the overrides applied and references resolved: what SpeechBrain
    saves as ``<output_folder>/hyperparams.yaml``, without its dated header lines."""
    from hyperpyyaml import resolve_references

    with open(hparams_file) as f:
        return resolve_references(f, overrides).getvalue()


def best_ssl_checkpoint(ssl_folder: str | Path) -> Path | None:
    """The SSL run's checkpoint folder of lowest valid loss (the one ``--pretrained_ssl``
    loads), or None when it has none."""
    from speechbrain.utils.checkpoints import Checkpointer

    save = Path(ssl_folder) / "save"
    if not save.is_dir():
        return None
    checkpoint = Checkpointer(save).find_checkpoint(min_key="loss")
    return None if checkpoint is None else checkpoint.path


def ssl_checkpoint_fields(pretrained_ssl: str | Path | None) -> dict:
    """``ssl_checkpoint`` (folder) and ``ssl_checkpoint_sha256`` (of its ``encoder.ckpt``; of an
    exported folder's ``encoder_network.ckpt``)."""
    if pretrained_ssl and (Path(pretrained_ssl) / "encoder_network.ckpt").is_file():
        checkpoint = Path(pretrained_ssl)  # an exported model folder (recipes/export.py)
        encoder = checkpoint / "encoder_network.ckpt"
    else:
        checkpoint = best_ssl_checkpoint(pretrained_ssl) if pretrained_ssl else None
        encoder = checkpoint / "encoder.ckpt" if checkpoint is not None else None
    return {"ssl_checkpoint": str(checkpoint.resolve()) if checkpoint is not None else None,
            "ssl_checkpoint_sha256": sha256_file(encoder) if encoder and encoder.is_file()
            else None}


def script_command(script: str | Path, argv: list[str]) -> list[str]:
    """The command line as a list: the script's path relative to the repository root, then
    ``argv``."""
    path = Path(script).resolve()
    try:
        path = path.relative_to(ROOT)
    except ValueError:  # a script outside the repository: its absolute path
        pass
    return [str(path), *map(str, argv)]


def run_record(argv: list[str], hparams_file: str, overrides: str | dict,
               pretrained_ssl: str | None, *,
               script: str | Path = ROOT / "recipes" / "train.py") -> dict:
    """The provenance of a training run.

    Arguments
    ---------
    argv : the script's arguments (``sys.argv[1:]``).
    hparams_file, overrides : as given to ``load_hyperpyyaml`` (overrides: a YAML string or dict).
    pretrained_ssl : the SSL output folder the run starts from, or None.
    script : the script that runs (default ``recipes/train.py``).

    Returns
    -------
    ``commit`` (HEAD), ``code_commit`` (last commit touching modules/ recipes/ hparams/),
    ``dirty`` (uncommitted changes there), ``command`` (list), ``hparams_sha256`` (of the
    resolved hparams text), ``manifest_sha256`` (of each ``--*_csv`` of the command line:
    :func:`manifest_hashes`), ``ssl_checkpoint`` and ``ssl_checkpoint_sha256`` (of its
    ``encoder.ckpt``; None without SSL), ``cwd`` (the directory it ran in, against which the
    relative paths of its hparams are resolved), ``machine`` (:func:`machine_description`: a
    run's CPU time means something only for its CPU). Git fields are None without git.
    """
    text = resolved_hparams_text(hparams_file, overrides)
    return {"commit": current_commit(), "code_commit": current_code_commit(),
            "dirty": code_dirty(), "command": script_command(script, argv),
            "hparams_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "manifest_sha256": manifest_hashes(argv),
            **ssl_checkpoint_fields(pretrained_ssl), "cwd": os.getcwd(),
            "machine": machine_description()}


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Writes ``data`` to a temporary file renamed into place: a kill leaves the old file."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1))
    partial.replace(path)


def write_result(result_path: str | Path, result: dict, record: dict) -> None:
    """``result`` with its ``"record"``, written atomically."""
    write_json_atomic(result_path, {**result, "record": record})


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else repr(value)


def check_result(result_path: str | Path, expected: dict) -> dict | None:
    """A finished result, if it was made by the run asked for now.

    Arguments
    ---------
    result_path : a JSON file written by :func:`write_result`.
    expected : record fields the result must have (e.g. ``command``, ``code_commit``,
        ``ssl_checkpoint_sha256``); other fields of the record are not compared.

    Returns
    -------
    The result, or None when the file does not exist.

    Raises
    ------
    SystemExit : one line naming the file and the fields that differ (found vs expected), or
        saying that it has no record, and telling to delete its folder to rerun it.
    """
    path = Path(result_path)
    if not path.is_file():
        return None
    rerun = f"delete {path.parent} to rerun it"
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: {path} is not valid JSON ({error}); {rerun}") from None
    record = result.get("record") if isinstance(result, dict) else None
    if not isinstance(record, dict):
        raise SystemExit(f"error: {path} has no record of the run that made it; {rerun}")
    differing = [f"{key} found {_shown(record.get(key))} expected {_shown(value)}"
                 for key, value in expected.items() if record.get(key, _MISSING) != value]
    if differing:
        raise SystemExit(f"error: {path} was made by another run ({'; '.join(differing)}); {rerun}")
    return result


class _TagTolerantLoader(yaml.SafeLoader):
    """Reads HyperPyYAML text as plain data: a tagged node becomes ``{tag: value}``."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {f"!{suffix}": value}


_TagTolerantLoader.add_multi_constructor("!", _tagged)


def hparams_data(text: str) -> dict:
    """Resolved hparams text -> ``{key: value}`` (comments and header lines ignored)."""
    return yaml.load(text, Loader=_TagTolerantLoader) or {}


def hparams_differences(saved: dict, new: dict) -> list[str]:
    """Top-level keys whose values differ; plain values first, as ``key (saved -> new)``, then
    the objects built from them (optimizers, schedules, ...) by name."""
    keys = [k for k in dict.fromkeys([*saved, *new])
            if saved.get(k, _MISSING) != new.get(k, _MISSING)]

    def plain(key):
        return not any(isinstance(d.get(key), (dict, list)) for d in (saved, new))

    def shown(data, key):
        return "absent" if key not in data else repr(data[key])

    return ([f"{k} ({shown(saved, k)} -> {shown(new, k)})" for k in keys if plain(k)]
            + [k for k in keys if not plain(k)])


def check_resume(resolved_text: str) -> bool:
    """Whether this run resumes one in its output folder, refusing one with other hparams.

    A run resumes when ``<output_folder>/hyperparams.yaml`` exists and ``<save_folder>`` holds
    checkpoints. Its hyperparams.yaml is the experiment as it ran, and the checkpoints were made
    under it: resuming under other hparams would mix two experiments in one folder.

    Returns
    -------
    True: resume (same hparams; hyperparams.yaml is kept as is); False: a new run.

    Raises
    ------
    SystemExit : one line naming the keys that differ and asking for another ``--output_folder``.
    """
    new = hparams_data(resolved_text)
    output = Path(str(new.get("output_folder", ".")))
    saved_file = output / "hyperparams.yaml"
    save = Path(str(new.get("save_folder", output / "save")))
    if not saved_file.is_file() or not any(save.glob("CKPT+*")):
        return False
    differing = hparams_differences(hparams_data(saved_file.read_text()), new)
    if differing:
        raise SystemExit(f"error: {output} holds a run with other hparams (checkpoints in {save}); "
                         f"they differ in {', '.join(differing)}; resuming would mix two "
                         "experiments: use another --output_folder (or the run's own hparams)")
    record_file = output / "run_record.json"
    started = json.loads(record_file.read_text()).get("code_commit") if record_file.is_file() \
        else None
    now = current_code_commit()
    if started and now and started != now:
        raise SystemExit(f"error: {output} holds a run started with code commit {started[:12]}; "
                         f"this is {now[:12]}: resuming would train one run with two versions of "
                         "the code; use another --output_folder (or check that commit out)")
    return True
