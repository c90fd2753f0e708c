"""The downstream corpora's partitions (recipes/synthesize_downstream.py), without synthesis:
unknown words and intent templates disjoint between splits, one utterance per class and speaker
in dev and test, few labels per class in train."""
import random
from collections import Counter

import pytest

from synthesize_downstream import (INTENTS, KEYWORDS, SILENCE, TEMPLATE_SPLIT, UNKNOWN,
                                   UNKNOWN_WORDS, intent_items, kws_items)


def test_unknown_words_and_templates_are_disjoint_between_splits():
    splits = list(UNKNOWN_WORDS)
    for a in splits:
        for b in splits:
            if a < b:
                words_a = {w for p in UNKNOWN_WORDS[a] for w in p.split()}
                assert not words_a & {w for p in UNKNOWN_WORDS[b] for w in p.split()}
    assert not {w for p in sum(UNKNOWN_WORDS.values(), []) for w in p.split()} & set(KEYWORDS)
    for templates in INTENTS.values():
        parts = [set(templates[s]) for s in TEMPLATE_SPLIT.values()]
        assert sum(map(len, parts)) == len(templates) == len(set().union(*parts))


def test_items_per_class_and_speaker():
    speakers = [f"spk{i}" for i in range(5)]
    rng = random.Random(0)
    test = kws_items("test", speakers, None, rng)
    assert Counter((s, label) for s, label, _ in test) == {
        (s, label): 1 for s in speakers for label in KEYWORDS + [UNKNOWN, SILENCE]}
    assert all(text is None for _, label, text in test if label == SILENCE)
    assert {text for _, label, text in test if label == UNKNOWN} <= set(UNKNOWN_WORDS["test"])
    train = intent_items("train", speakers, 7, rng)
    assert Counter(label for _, label, _ in train) == {intent: 7 for intent in INTENTS}
    train_templates = {t for ts in INTENTS.values() for t in ts[TEMPLATE_SPLIT["train"]]}
    test_texts = {text for _, _, text in intent_items("test", speakers, None, rng)}
    slots = ("{room}", "{time}", "{city}", "{artist}", "{person}", "{item}")
    for template in train_templates:  # no test sentence comes from a training template
        prefix = template.split("{")[0]
        if any(s in template for s in slots) and prefix:
            continue
        assert template not in test_texts


def test_silence_clips_of_each_split_come_from_its_own_second_of_noise(tmp_path):
    import numpy as np
    import soundfile as sf

    from synthesize_downstream import SAMPLE_RATE, SILENCE_SECOND, silence

    assert sorted(SILENCE_SECOND.values()) == [0, 1, 2]  # one second each, none shared
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 3 * SAMPLE_RATE).astype("float32")
    sf.write(tmp_path / "noise.flac", noise, SAMPLE_RATE)
    noise = sf.read(tmp_path / "noise.flac", dtype="float32")[0]  # as 16-bit FLAC stores it
    for split, second in SILENCE_SECOND.items():
        path = tmp_path / f"{split}.flac"
        assert silence((str(tmp_path / "noise.flac"), second, 123, 0.5, str(path))) == 1.0
        clip = sf.read(path, dtype="float32")[0]
        own = np.roll(noise[second * SAMPLE_RATE:(second + 1) * SAMPLE_RATE], 123) * 0.5
        assert np.abs(clip - own).max() < 1e-4
    short = tmp_path / "short.flac"
    sf.write(short, noise[:SAMPLE_RATE], SAMPLE_RATE)
    with pytest.raises(ValueError, match="short.flac.*3 s"):
        silence((str(short), 2, 0, 0.5, str(tmp_path / "x.flac")))
