#!/usr/bin/env python3
"""``make demo``: SSL pretraining, CTC fine-tuning from it, then evaluation at every preset.

Runs, on the shipped corpus::

    recipes/train.py hparams/SSL/<encoder>.yaml
    recipes/train.py hparams/CTC/<encoder>_small.yaml --pretrained_ssl <SSL output> (its sizes)
    recipes/evaluate.py <CTC output>/hyperparams.yaml --test_csv <test split> --context all --streaming

and prints, as its last stdout line, one JSON object: the SSL summary plus ``ctc_wer``,
``ctc_cer``, ``ctc_hparams``, ``ctc_output_folder`` and the per-context table and plot.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the saved hparams name classes of modules/
# The SSL encoders' sizes: train.py gives a fine-tuning run those of its --pretrained_ssl run;
# ssl_curve.py passes them explicitly (its scratch arm has no SSL run).
SSL_SIZES = {"conformer": ["d_model", "nhead", "num_encoder_layers", "d_ffn", "kernel_size",
                           "subsampling_conv_channels"],
             "transformer": ["d_model", "nhead", "num_encoder_layers", "d_ffn",
                             "subsampling_conv_channels"],
             "conmamba": ["d_model", "num_encoder_layers", "d_ffn", "kernel_size",
                          "subsampling_conv_channels", "d_state", "d_conv", "expand"]}


def run(script: str, *args: str, launcher: tuple[str, ...] = ()) -> dict:
    """Runs a recipe script (under ``python <launcher>``, e.g. ``-m torch.distributed.run ...``),
    echoing its output; returns its last stdout line as JSON."""
    command = [sys.executable, *launcher, str(ROOT / "recipes" / script), *args]
    print("$", " ".join(command), flush=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    last = ""
    for line in process.stdout:
        print(line, end="", flush=True)
        last = line.strip() or last
    if process.wait() != 0:
        raise SystemExit(f"error: {script} failed (exit {process.returncode}); see above")
    return json.loads(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", choices=list(SSL_SIZES), default="conformer")
    parser.add_argument("--ctc_epochs", type=int, default=25)
    args = parser.parse_args()
    ssl = run("train.py", f"hparams/SSL/{args.encoder}.yaml")
    # 25 epochs on the 9.1-minute train split: the encoder at the head's LR (the yaml's 5x lower one leaves the
    # SSL encoder under-fitted: 73.6 vs 66.6 % CER) and no SpecAugment (too short a run for it to
    # pay: 62.4 % without); README, "CTC fine-tuning, multi-latency evaluation". The encoder's sizes: the SSL run's.
    ctc = run("train.py", f"hparams/CTC/{args.encoder}_small.yaml",
              "--pretrained_ssl", ssl["output_folder"], "--number_of_epochs", str(args.ctc_epochs),
              "--lr_encoder", "0.002", "--spec_augment_prob", "0.0",
              "--output_folder", f"results/ctc_{args.encoder}_demo")
    evaluation = run("evaluate.py", ctc["ctc_hparams"], "--output_folder", ctc["ctc_output_folder"],
                     "--test_csv", "data/espeak_corpus/test.csv", "--context", "all", "--streaming")
    print(json.dumps({**ssl, "ctc_wer": ctc["ctc_wer"], "ctc_cer": ctc["ctc_cer"],
                      "ctc_epochs": ctc["epochs"], "ctc_train_seconds": ctc["train_seconds"],
                      "ctc_hparams": ctc["ctc_hparams"], "ctc_output_folder": ctc["ctc_output_folder"],
                      "ctc_table": evaluation["table_md"], "ctc_plot": evaluation["plot"]}))


if __name__ == "__main__":
    main()
