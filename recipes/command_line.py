"""``train.py``'s command line: device presets, the SSL run's encoder sizes, ``--help`` of the
recipe's own options, precision per device, and loading the hparams with one-line errors."""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch

import speechbrain as sb
import yaml
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import (
    MainProcessContext,
    ddp_barrier,
    get_local_rank,
    if_main_process,
)

from provenance import hparams_data, resolved_hparams_text

ROOT = Path(__file__).resolve().parents[1]

logger = logging.getLogger(__name__)


# Encoder arguments that change no tensor shape: a fine-tuning run may set its own.
NOT_SIZES = {"dropout", "activation_checkpointing", "scan_backend"}


def encoder_keys(hparams_file: str | Path) -> list[str]:
    """The top-level keys that the ``encoder:`` node of an hparams file refers to
    (``!ref <key>``), in order."""
    text = Path(hparams_file).read_text()
    block = re.search(r"^encoder:.*\n((?:[ \t]+.*\n|[ \t]*\n)*)", text, re.MULTILINE)
    return list(dict.fromkeys(re.findall(r"<(\w+)>", block.group(1)))) if block else []


def ssl_encoder_sizes(hparams_file: str, overrides: dict, given: set[str]) -> tuple[dict, str]:
    """With ``--pretrained_ssl``: the overrides plus the SSL run's encoder sizes, and a note.

    The sizes are the keys of the ``encoder:`` node (``d_model``, ``num_encoder_layers``,
    ``d_state``, ...) found in the SSL run's ``hyperparams.yaml``, minus ``NOT_SIZES``. A size
    given on the command line (``given``) is kept; one that differs from the SSL run's stops
    with one line (the weights could not load).

    Returns
    -------
    The overrides, and a line to log (empty when nothing was taken).
    """
    ssl_folder = overrides.get("pretrained_ssl")
    saved = Path(str(ssl_folder)) / "hyperparams.yaml"
    if not ssl_folder or not saved.is_file():  # load_pretrained_ssl names what is missing
        return overrides, ""
    ssl = hparams_data(saved.read_text())
    sizes = {k: ssl[k] for k in encoder_keys(hparams_file) if k in ssl and k not in NOT_SIZES}
    conflicts = [f"--{k} {overrides[k]} (it has {v})" for k, v in sizes.items()
                 if k in given and overrides[k] != v]
    if conflicts:
        raise SystemExit(f"error: --pretrained_ssl {ssl_folder}: its encoder has other sizes than "
                         f"{', '.join(conflicts)}; leave these flags out to take the SSL run's")
    taken = {k: v for k, v in sizes.items() if k not in given}
    note = ("Encoder sizes of the SSL run (%s): %s" % (
        saved, ", ".join(f"{k}={v}" for k, v in taken.items()))) if taken else ""
    return {**overrides, **taken}, note


# Lines to log once logging is set up (create_experiment_directory): decisions of the parsing.
NOTES: list[str] = []
DEVICE_PRESET_HELP = ("hparams/devices/<preset>.yaml: device, precision, batch size, workers "
                      "(default auto: cuda, else mps, else cpu)")


def recipe_options(hparams_file: str | Path) -> str:
    """``--help`` text of the recipe's own options: ``--device_preset`` and the top-level
    plain keys of the hparams file, with their values there and their trailing comments."""
    lines = ["", f"recipe options (any top-level key of {hparams_file}; default = its value):",
             f"  --device_preset {{auto,cpu,cuda,mps}}\n        {DEVICE_PRESET_HELP}"]
    try:
        text = Path(hparams_file).read_text()
    except OSError:
        return f"\n(give an hparams file before --help to list its options: {hparams_file} " \
               "is not readable)"
    for match in re.finditer(r"^([a-z]\w*):[ \t]*([^#\n]*?)[ \t]*(?:#[ \t]*(.*))?$", text,
                             re.MULTILINE):
        key, value, comment = match.groups()
        if not value or value.startswith(("!new:", "!name:", "!apply:")):
            continue  # a mapping or an object: not settable as one value
        value = value.removeprefix("!ref ")
        lines.append(f"  --{key} {value}" + (f"\n        {comment}" if comment else ""))
    mappings = re.findall(r"^([a-z]\w*):[ \t]*(?:#.*)?$", text, re.MULTILINE)
    if mappings:  # set as a YAML mapping: --context_presets "{low: [16, 1]}"
        lines.append(f"  mappings (--key \"{{...}}\"): {', '.join(mappings)}")
    return "\n".join(lines)


def parse_command_line(argv: list[str]) -> tuple[str, object, dict]:
    """hparams file, SpeechBrain run options, and the overrides: ``hparams/devices/<preset>.yaml``
    (``--device_preset``, default: detected) < command line. ``--pretrained_ssl``: the SSL
    run's encoder sizes, unless given (:func:`ssl_encoder_sizes`)."""
    NOTES.clear()
    if "-h" in argv or "--help" in argv:  # SpeechBrain's generic flags, then the recipe's own
        try:
            sb.parse_arguments(argv)
        finally:
            print(recipe_options(argv[0]) if argv and not argv[0].startswith("-") else
                  "\n(give an hparams file before --help to list the recipe's options)")
    preset = "auto"
    if "--device_preset" in argv:
        index = argv.index("--device_preset")
        preset = argv[index + 1] if index + 1 < len(argv) else ""
        argv = argv[:index] + argv[index + 2:]
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    if isinstance(run_opts.optimizer_step_limit, str):  # SpeechBrain 1.1.2 leaves it a string
        run_opts = dataclasses.replace(run_opts,
                                       optimizer_step_limit=int(run_opts.optimizer_step_limit))
    if preset == "auto":
        preset = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    preset_file = ROOT / "hparams" / "devices" / f"{preset}.yaml"
    if not preset_file.is_file():
        raise SystemExit(f"error: --device_preset {preset!r}: no {preset_file}")
    merged = yaml.safe_load(preset_file.read_text())
    declared = hparams_data(Path(hparams_file).read_text()) if Path(hparams_file).is_file() else {}
    if declared:  # a recipe without a device (the n-gram LM counts on the CPU) takes none of it
        merged = {key: value for key, value in merged.items() if key in declared}
    given = yaml.safe_load(overrides) or {}
    merged.update(given)
    merged, note = ssl_encoder_sizes(hparams_file, merged, set(given))
    if note:
        NOTES.append(note)
    logger.info("Device preset %s: %s", preset, preset_file)
    run_opts = resolve_device(run_opts, merged)
    if "precision" not in run_opts.overridden_args and "precision" in merged:
        merged["precision"] = native_precision(merged["precision"], run_opts.device)
    precision = run_opts.precision if "precision" in run_opts.overridden_args else merged.get(
        "precision")
    if precision == "bf16" and str(run_opts.device) == "cpu" and not cpu_has_native_bf16():
        logger.warning("This CPU (%s) has no native bf16 (AVX512-BF16 or AMX): bf16 matrix "
                       "products are emulated, ~20x slower than fp32 on an AVX2 EPYC; "
                       "use --precision fp32", torch.backends.cpu.get_cpu_capability())
    return hparams_file, run_opts, merged


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_precision(precision: str | None, device: str) -> str | None:
    """``precision``, except bf16 on a CUDA GPU without native bf16 (V100, T4: emulated, slow):
    fp16 there, which SpeechBrain trains with a GradScaler."""
    if (precision == "bf16" and str(device).startswith("cuda") and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        logger.warning("%s has no native bf16: training in fp16 with gradient scaling "
                       "(--precision bf16 forces bf16)", torch.cuda.get_device_name(device))
        return "fp16"
    return precision


def resolve_device(run_opts, overrides: dict):
    """``run_opts`` with this process's device (and the DDP backend, unless given).

    A device without an index (``cuda``, from the preset or ``--device``) becomes this rank's
    GPU under torchrun, ``cuda:<LOCAL_RANK>`` (``cuda:0`` in a single process). Without
    ``--distributed_backend``, CUDA uses NCCL and other devices gloo.
    """
    device = run_opts.device if "device" in run_opts.overridden_args else overrides.get("device")
    device = device or sb.utils.distributed.infer_device()
    if device == "cuda":
        device = f"cuda:{get_local_rank() or 0}"
    backend = run_opts.distributed_backend
    if "distributed_backend" not in run_opts.overridden_args:
        backend = "nccl" if device.startswith("cuda") else "gloo"
    chosen = run_opts.overridden_args | {"device", "distributed_backend"}
    return dataclasses.replace(run_opts, device=device, distributed_backend=backend,
                               overridden_args=chosen)


def resolve_hparams(hparams_file: str, overrides: dict) -> str:
    """The resolved hparams text (what ``hyperparams.yaml`` holds); a bad value: one line."""
    try:
        return resolved_hparams_text(hparams_file, overrides)
    except (KeyError, ValueError, TypeError) as error:
        raise SystemExit(f"error in {hparams_file} (or its overrides): {error}") from None


def load_hparams(hparams_file: str, overrides: dict) -> dict:
    """Loads the hparams file with the overrides; a bad value stops with one clear line.

    Under DDP the main process loads it first, alone: loading creates folders and trains the
    CTC tokenizer, which the other processes then find ready (and only read).
    """
    hparams = None
    for main_turn in (True, False):
        if if_main_process() == main_turn:
            with MainProcessContext():  # SpeechBrain's collectives inside become no-ops
                try:
                    with open(hparams_file) as f:
                        hparams = load_hyperpyyaml(f, overrides)
                except (KeyError, ValueError, TypeError) as error:
                    raise SystemExit(f"error in {hparams_file} (or its overrides): {error}") from None
        ddp_barrier()
    return hparams
