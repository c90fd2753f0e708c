#!/usr/bin/env python3
"""Does SSL pay off? SSL on unlabeled speech, then CTC on little labeled speech, against the same
CTC from scratch with the same budget (``make ssl-gain``; an experiment of about 2.5 h on 2 CPU
cores, not a test).

1. SSL (``hparams/SSL/<encoder>.yaml``) on the unlabeled set (``make corpus-unlabeled``).
2. CTC (``hparams/CTC/<encoder>_small.yaml`` at the SSL sizes) on the shipped train split (9.1
   min) and on a 3-minute subset of it (its first speakers), initialized from the SSL encoder or
   at random, with the same peak learning rates and the same number of optimizer steps, for
   every seed.
3. Test CER of each run: the recipe's own (beam search, averaged checkpoints) and, per context,
   ``evaluate.py --context all --streaming``.
4. Linear probes (frozen encoder, CTC head on layer ``k``) of the SSL and of a random encoder,
   and the effective rank of each layer's output on the test split (dimensional collapse).

Every run has its own output folder and resumes, so running the command again only finishes
what is missing. Writes ``<output>/ssl_gain.{md,csv,png}``; the last stdout line is JSON.

Usage::

    python recipes/ssl_gain.py [--unlabeled data/unlabeled_corpus] [--seeds 1 2] \\
        [--ssl_epochs 12] [--ctc_steps 500] [--output_folder results/ssl_gain]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.data_utils import batch_pad_right

from dataio import load_audio
from demo import ROOT, SSL_SIZES, run

LABELED = ROOT / "data" / "espeak_corpus"


def minutes_of(manifest: Path) -> float:
    with open(manifest) as f:
        return sum(float(row["duration"]) for row in csv.DictReader(f)) / 60


def labeled_subset(minutes: float, out: Path) -> Path:
    """The shipped train split's first speakers, whole, up to ``minutes``."""
    with open(LABELED / "train.csv") as f:
        rows = list(csv.DictReader(f))
    speakers = list(dict.fromkeys(row["spk_id"] for row in rows))
    kept, seconds = [], 0.0
    for speaker in speakers:
        mine = [row for row in rows if row["spk_id"] == speaker]
        if kept and seconds + sum(float(r["duration"]) for r in mine) > minutes * 60:
            break
        kept += mine
        seconds += sum(float(r["duration"]) for r in mine)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return out


def fine_tune(encoder: str, name: str, train_csv: Path, steps: int, batch_size: int, seed: int,
              sizes: list[str], folder: Path, extra: list[str]) -> dict:
    """One CTC run of ``steps`` optimizer steps, then its per-context streaming evaluation; a
    finished run (its ``result.json``) is read back, not rerun."""
    output = folder / name / str(seed)
    if (output / "result.json").is_file():
        return json.loads((output / "result.json").read_text())
    with open(train_csv) as f:
        utterances = sum(1 for _ in csv.DictReader(f))
    epochs = math.ceil(steps / math.ceil(utterances / batch_size))
    ctc = run("train.py", f"hparams/CTC/{encoder}_small.yaml", *sizes, *extra,
              "--train_csv", str(train_csv), "--tokenizer_csv", str(LABELED / "train.csv"),
              "--number_of_epochs", str(epochs), "--seed",
              str(seed), "--batch_size", str(batch_size), "--output_folder", str(output))
    evaluation = run("evaluate.py", ctc["ctc_hparams"], "--output_folder", ctc["ctc_output_folder"],
                     "--test_csv", str(LABELED / "test.csv"), "--context", "all", "--streaming",
                     "--device", "cpu")
    result = {"test_cer": ctc["ctc_cer"], "test_wer": ctc["ctc_wer"],
              "per_context": {str(r["context"]): r["cer"] for r in evaluation["results"]}}
    (output / "result.json").write_text(json.dumps(result))
    return result


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalized singular values of centered (N, D) ``x``: how many
    directions its variance really spans (D at most)."""
    singular = torch.linalg.svdvals(x - x.mean(0))
    p = singular / singular.sum()
    return float(torch.exp(-(p * p.clamp(min=1e-12).log()).sum()))


@torch.no_grad()
def layer_ranks(ssl_folder: Path, context=(32, 3)) -> dict:
    """Effective rank of every layer's output on the test split, SSL encoder vs the same
    architecture at random initialization."""
    with open(ssl_folder / "hyperparams.yaml") as f:
        hparams = load_hyperpyyaml(f)
    random_encoder = hparams["encoder"]
    with open(ssl_folder / "hyperparams.yaml") as f:
        trained = load_hyperpyyaml(f)
    checkpoint = Checkpointer(ssl_folder / "save").find_checkpoint(min_key="loss")
    trained["encoder"].load_state_dict(torch.load(checkpoint.path / "encoder.ckpt"))
    trained["normalize"]._load(checkpoint.path / "normalize.ckpt")
    with open(LABELED / "test.csv") as f:
        audio = [load_audio(row["wav"].replace("$data_root", str(LABELED)))
                 for row in csv.DictReader(f)]
    wavs, wav_lens = batch_pad_right(audio)
    feats = trained["normalize"].eval()(trained["compute_features"](wavs))
    frames = torch.round(wav_lens * feats.shape[1] / trained["subsampling_factor"]).long()
    ranks = {}
    for name, encoder in (("ssl", trained["encoder"]), ("random", random_encoder)):
        encoder.eval()
        ranks[name] = []
        for layer in range(1, len(encoder.layers) + 1):
            out = encoder(feats, wav_lens, context, num_layers=layer)
            valid = torch.cat([out[b, :n] for b, n in enumerate(frames)])
            ranks[name].append(round(effective_rank(valid), 1))
    return {"context": list(context), "d_model": trained["d_model"], **ranks}


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and spread over seeds of every (labeled set, initialization)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["labeled_minutes"], r["init"]), []).append(r)
    rows = []
    for (minutes, init), members in sorted(groups.items()):
        cers = [m["test_cer"] for m in members]
        row = {"labeled_minutes": round(minutes, 1), "init": init, "seeds": len(members),
               "test_cer_mean": round(statistics.mean(cers), 2),
               "test_cer_min": round(min(cers), 2), "test_cer_max": round(max(cers), 2)}
        for context in members[0]["per_context"]:
            row[f"cer {context}"] = round(statistics.mean(m["per_context"][context]
                                                          for m in members), 2)
        rows.append(row)
    return rows


def write_outputs(rows: list[dict], probes: list[dict], ranks: dict, stem: Path) -> None:
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    contexts = [k for k in rows[0] if k.startswith("cer ")]
    lines = ["| labeled | init | seeds | test CER % (beam, mean [min-max]) | "
             + " | ".join(f"{c[4:]} greedy" for c in contexts) + " |",
             "|---|---|---|---|" + "---|" * len(contexts)]
    lines += [f"| {r['labeled_minutes']} min | {r['init']} | {r['seeds']} | "
              f"{r['test_cer_mean']:.1f} [{r['test_cer_min']:.1f}-{r['test_cer_max']:.1f}] | "
              + " | ".join(f"{r[c]:.1f}" for c in contexts) + " |" for r in rows]
    if probes:
        lines += ["", "| probe (frozen encoder, CTC head on layer k) | layer | test CER % |",
                  "|---|---|---|"]
        lines += [f"| {p['encoder']} | {p['layer']} | {p['test_cer']:.1f} |" for p in probes]
    layers = range(1, len(ranks["ssl"]) + 1)
    lines += ["", f"| effective rank of layer outputs (of {ranks['d_model']}), test split | "
              + " | ".join(f"layer {k}" for k in layers) + " |", "|---|" + "---|" * len(layers)]
    lines += [f"| {name} encoder | " + " | ".join(f"{v:.0f}" for v in ranks[name]) + " |"
              for name in ("ssl", "random")]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for init in ("ssl", "scratch"):
        mine = [r for r in rows if r["init"] == init]
        axis.errorbar([r["labeled_minutes"] for r in mine], [r["test_cer_mean"] for r in mine],
                      yerr=[[r["test_cer_mean"] - r["test_cer_min"] for r in mine],
                            [r["test_cer_max"] - r["test_cer_mean"] for r in mine]],
                      marker="o", capsize=4, label={"ssl": "from SSL", "scratch": "from scratch"}[init])
    axis.set_xlabel("labeled speech, minutes")
    axis.set_ylabel("test CER, % (beam search)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(stem.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unlabeled", type=Path, default=ROOT / "data" / "unlabeled_corpus")
    parser.add_argument("--encoder", choices=list(SSL_SIZES), default="conformer")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ssl_epochs", type=int, default=12)
    parser.add_argument("--ctc_steps", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--subset_minutes", type=float, default=3.0)
    parser.add_argument("--probe_layers", type=int, nargs="*", default=[3, 6])
    parser.add_argument("--output_folder", type=Path, default=ROOT / "results" / "ssl_gain")
    args = parser.parse_args()
    if not (args.unlabeled / "train.csv").is_file():
        raise SystemExit(f"{args.unlabeled}/train.csv not found: run `make corpus-unlabeled`")
    folder = args.output_folder
    ssl = run("train.py", f"hparams/SSL/{args.encoder}.yaml", "--data_folder", str(args.unlabeled),
              "--train_csv", str(args.unlabeled / "train.csv"),
              "--valid_csv", str(args.unlabeled / "valid.csv"),
              "--number_of_epochs", str(args.ssl_epochs), "--output_folder", str(folder / "ssl"))
    with open(Path(ssl["output_folder"]) / "hyperparams.yaml") as f:
        ssl_hparams = load_hyperpyyaml(f)
    sizes = [a for key in SSL_SIZES[args.encoder] for a in (f"--{key}", str(ssl_hparams[key]))]
    subset = labeled_subset(args.subset_minutes, folder / "subset_train.csv")
    labeled_sets = [(LABELED / "train.csv", minutes_of(LABELED / "train.csv")),
                    (subset, minutes_of(subset))]
    # The same peak LRs for both (only the initialization differs): on this data the yaml's
    # 5x lower encoder LR fine-tunes the SSL encoder worse (README, "Does SSL pay off?").
    # No head-only phase from scratch: a random encoder's output is nothing to fit a head to.
    inits = {"ssl": ["--pretrained_ssl", ssl["output_folder"], "--lr_encoder", "0.002"],
             "scratch": ["--lr_encoder", "0.002", "--head_only_fraction", "0.0"]}
    runs = []
    for train_csv, minutes in labeled_sets:
        for init, extra in inits.items():
            for seed in args.seeds:
                name = f"{args.encoder}_{init}_{minutes:.0f}min"
                result = fine_tune(args.encoder, name, train_csv, args.ctc_steps,
                                   args.batch_size, seed, sizes, folder, extra)
                runs.append({"labeled_minutes": minutes, "init": init, "seed": seed, **result})
                print(json.dumps(runs[-1]), flush=True)
    probes = []
    for init, extra in (("ssl", ["--pretrained_ssl", ssl["output_folder"]]), ("random", [])):
        for layer in args.probe_layers:
            result = fine_tune(args.encoder, f"{args.encoder}_probe_{init}_layer{layer}",
                               LABELED / "train.csv", args.ctc_steps, args.batch_size,
                               args.seeds[0], sizes, folder,
                               [*extra, "--freeze_encoder", "True", "--probe_layer", str(layer)])
            probes.append({"encoder": init, "layer": layer, "test_cer": result["test_cer"]})
            print(json.dumps(probes[-1]), flush=True)
    rows = summarize(runs)
    ranks = layer_ranks(Path(ssl["output_folder"]))
    write_outputs(rows, probes, ranks, folder / "ssl_gain")
    print(json.dumps({"ssl": ssl, "table": rows, "probes": probes, "layer_ranks": ranks,
                      "table_md": str(folder / "ssl_gain.md"), "plot": str(folder / "ssl_gain.png")}))


if __name__ == "__main__":
    main()
