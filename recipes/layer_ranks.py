"""Effective rank of an encoder's layer outputs: how many directions each layer's features
really span (a collapsed SSL encoder spans few; ``recipes/ssl_curve.py`` reports it on dev)."""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.data_utils import batch_pad_right

from dataio import load_audio


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalized singular values of centered (N, D) ``x``: how many
    directions its variance really spans (D at most)."""
    singular = torch.linalg.svdvals(x - x.mean(0))
    p = singular / singular.sum()
    return float(torch.exp(-(p * p.clamp(min=1e-12).log()).sum()))


def layer_ranks(ssl_folder: Path, manifest: Path, label: str, utterances: int = 200,
                context=(32, 3)) -> dict:
    """Effective rank of each layer's output over ``utterances`` of ``manifest`` spread evenly
    over it (a manifest in speaker order has them all): the SSL encoder (best checkpoint) and
    the same architecture at random initialization (torch seed 0: the same for every call)."""
    def load():
        with open(ssl_folder / "hyperparams.yaml") as f:
            return load_hyperpyyaml(f)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        random_init = load()
    trained = load()
    checkpoint = Checkpointer(ssl_folder / "save").find_checkpoint(min_key="loss")
    trained["encoder"].load_state_dict(torch.load(checkpoint.path / "encoder.ckpt"))
    trained["normalize"]._load(checkpoint.path / "normalize.ckpt")
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    count = min(utterances, len(rows))
    rows = [rows[i * len(rows) // count] for i in range(count)]
    audio = [load_audio(row["wav"].replace("$data_root", str(manifest.parent))) for row in rows]
    wavs, wav_lens = batch_pad_right(audio)
    ranks = {}
    with torch.no_grad():
        feats = trained["normalize"].eval()(trained["compute_features"](wavs))
        frames = torch.round(wav_lens * feats.shape[1] / trained["subsampling_factor"]).long()
        for name, encoder in ((label, trained["encoder"]), ("random init", random_init["encoder"])):
            encoder.eval()
            ranks[name] = []
            for layer in range(1, len(encoder.layers) + 1):
                out = encoder(feats, wav_lens, context, num_layers=layer)
                valid = torch.cat([out[b, :n] for b, n in enumerate(frames)])
                ranks[name].append(round(effective_rank(valid), 1))
    return ranks
