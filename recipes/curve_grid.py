"""The SSL curve's grid file (``hparams/curves/*.yaml``, checked key by key), the names, paths
and manifests of its runs, the corpus check and the runs' locks, shared by ``ssl_curve.py`` and
``ssl_attempt.py``."""
from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
from pathlib import Path

import yaml

from demo import ROOT, SSL_SIZES
from provenance import sha256_file

GRID_KEYS = {"corpus", "output_folder", "encoders", "ssl", "steps", "validations", "fine_tune",
             "arms", "test_contexts", "probe_layers", "bootstrap_resamples"}
OPTIONAL_KEYS = {"topline": [], "valid_every": 1, "cpu_budget_hours": None, "goals": {},
                 "ssl_tuned_for": []}


def load_grid(path: Path) -> dict:
    """The curve's grid file, checked: each problem named with its key."""
    if not path.is_file():
        raise SystemExit(f"error: grid file {path} not found (see hparams/curves/)")
    grid = {**OPTIONAL_KEYS, **yaml.safe_load(path.read_text())}
    unknown = set(grid) - GRID_KEYS - set(OPTIONAL_KEYS)
    missing = GRID_KEYS - set(grid)
    if unknown or missing:
        raise SystemExit(f"error: {path}: unknown keys {sorted(unknown)}, missing keys "
                         f"{sorted(missing)}")
    for encoder, sizes in grid["encoders"].items():
        if encoder not in SSL_SIZES:
            raise SystemExit(f"error: {path}: encoders: {encoder!r} is not one of "
                             f"{list(SSL_SIZES)}")
        for size in sizes:
            if size not in grid["steps"]:
                raise SystemExit(f"error: {path}: size {size!r} of {encoder} has no steps")
    if set(grid["arms"]) != {"ssl", "scratch"}:
        raise SystemExit(f"error: {path}: arms must be ssl and scratch")
    sizes = {size for sizes in grid["encoders"].values() for size in sizes}
    if not set(grid["topline"]) <= sizes:
        raise SystemExit(f"error: {path}: topline {grid['topline']}: not sizes of the encoders "
                         f"({sorted(sizes)})")
    for encoder, sizes in grid["encoders"].items():
        if set(sizes) & set(grid["topline"]) and set(sizes) <= set(grid["topline"]):
            raise SystemExit(f"error: {path}: topline: {encoder} has no other size to take "
                             "the topline's setting from")
    if not (isinstance(grid["valid_every"], int) and grid["valid_every"] >= 1):
        raise SystemExit(f"error: {path}: valid_every must be a whole number >= 1")
    return grid


def rel(path: Path) -> str:
    """A path as the commands write it: relative to the repository when inside it (links are
    kept, so a linked corpus folder still reads as ``data/benchmark``)."""
    path = Path(os.path.abspath(path))
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def repeated_manifest(source: Path, out: Path, min_utterances: int) -> int:
    """Writes ``source``'s rows repeated (IDs suffixed ``_r<k>``) about ``min_utterances`` times
    over (the nearest whole number of repeats, at least one: a set barely smaller than that
    is not doubled); returns the number of rows written."""
    with open(source) as f:
        rows = list(csv.DictReader(f))
    repeats = max(1, round(min_utterances / len(rows)))
    write_manifest([{**row, "ID": f"{row['ID']}_r{k}" if repeats > 1 else row["ID"]}
                    for k in range(repeats) for row in rows], out)
    return repeats * len(rows)


def write_manifest(rows: list[dict], out: Path) -> None:
    """Writes ``rows`` as a CSV manifest, aside and renamed: a run of a curve (or the other
    process of an attempt) beside this one may be reading it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(out)


def setting_tag(setting: dict) -> str:
    return "_".join(f"{key}{value}" for key, value in setting.items())


def run_name(encoder: str, size: str, arm: str, setting: dict, seed: int,
             ssl_seed: int | None) -> str:
    return (f"{encoder}/{size}/{arm}" + (f"_ssl{ssl_seed}" if ssl_seed else "")
            + f"/{setting_tag(setting)}/seed{seed}")


def plain_yaml(text: str) -> dict:
    """The top-level ``key: plain value`` lines of a HyperPyYAML file (its tags skipped)."""
    lines = [line for line in text.splitlines()
             if line[:1].isalpha() and ":" in line and "!" not in line.split("#")[0]]
    return yaml.safe_load("\n".join(lines)) or {}


def overrides(values: dict) -> list[str]:
    """``--key value`` arguments (lists in YAML flow style)."""
    return [a for key, value in values.items()
            for a in (f"--{key}", json.dumps(value) if isinstance(value, list) else str(value))]


def hours_of(manifest: Path) -> float:
    with open(manifest) as f:
        return sum(float(row["duration"]) for row in csv.DictReader(f)) / 3600


def check_corpus(corpus: Path, sums: Path) -> str:
    """Every file ``sums`` lists (``sha256sum`` lines, paths relative to ``corpus``; a folder,
    named with a trailing ``/``, by :func:`tree_sha256`) hashes as listed; a line saying so for
    the report, or SystemExit naming the first that does not."""
    if not sums.is_file():
        raise SystemExit(f"error: --corpus_sha256 {sums}: no such file")
    lines = [line.split(maxsplit=1) for line in sums.read_text().splitlines() if line.strip()]
    for digest, name in lines:
        name = name.strip().lstrip("*").split(" ")[0]  # a folder's line adds how it was made
        path = corpus / name
        if name.endswith("/"):
            found = tree_sha256(corpus, name) if path.is_dir() else "missing"
        else:
            found = sha256_file(path) if path.is_file() else "missing"
        if found != digest:
            raise SystemExit(f"error: {path}: sha256 {found}, {sums} says {digest}: not the "
                             "corpus the runs were made on (rebuild it with make "
                             "corpus-labeled, at the runs' commit)")
    return f"the {len(lines)} files of {rel(sums)} checked against {rel(corpus)}"


@contextlib.contextmanager
def locked(path: Path, wait: bool):
    """An exclusive lock on ``path`` (a file, made if needed) for the ``with`` block; yields
    whether it was taken (always, when ``wait``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def tree_sha256(corpus: Path, folder: str) -> str:
    """sha256 of the ``sha256sum`` lines of every file under ``corpus/folder``, sorted by path:
    ``cd corpus && find folder -type f | sort | xargs sha256sum | sha256sum``."""
    files = sorted(str(p.relative_to(corpus)) for p in (corpus / folder).rglob("*")
                   if p.is_file() and not p.is_symlink())
    lines = "".join(f"{sha256_file(corpus / f)}  {f}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()
