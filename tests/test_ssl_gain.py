"""Pieces of the SSL-gain experiment (recipes/ssl_gain.py) that decide what it reports."""
import csv

import torch

from conftest import ROOT
from ssl_gain import effective_rank, labeled_subset, minutes_of


def test_effective_rank_counts_the_directions_variance_spans():
    g = torch.Generator().manual_seed(0)
    assert abs(effective_rank(torch.randn(4000, 16, generator=g)) - 16) < 1
    collapsed = torch.randn(4000, 2, generator=g) @ torch.randn(2, 16, generator=g)
    assert effective_rank(collapsed) < 2.5


def test_labeled_subset_keeps_whole_speakers_within_the_minutes(tmp_path):
    subset = labeled_subset(3.0, tmp_path / "subset.csv")
    with open(subset) as f:
        rows = list(csv.DictReader(f))
    speakers = {row["spk_id"] for row in rows}
    assert 2 <= len(speakers) and 2.0 < minutes_of(subset) <= 3.0
    with open(ROOT / "data" / "espeak_corpus" / "train.csv") as f:
        everything = list(csv.DictReader(f))
    assert len(rows) == sum(row["spk_id"] in speakers for row in everything)  # whole speakers
