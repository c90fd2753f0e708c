"""Downstream classification (issue 19): the layer sum and the streaming classifier equal the
offline model, the recipe runs end to end for both tasks on an exported SSL encoder, a random
encoder and fbank (recipes/downstream.py reads its results back), and bad inputs get one line."""
import csv
import json

import pytest
import torch

import downstream
import export
import train
from dataio import ManifestError
from conftest import ROOT, tiny_encoder
from modules.downstream import PooledClassifier, StreamingClassifier, WeightedLayerSum
from test_ctc import run_recipe
from test_recipe import CORPUS, TINY

SIZES = ["d_model=32", "nhead=2", "num_encoder_layers=1", "d_ffn=64",
         "subsampling_conv_channels=4"]


def test_layer_sum_weights_are_learned_and_start_equal():
    layer_sum = WeightedLayerSum(2)
    layers = [torch.ones(1, 3, 4), torch.zeros(1, 3, 4)]
    assert torch.allclose(layer_sum(layers), torch.full((1, 3, 4), 0.5))
    layer_sum(layers).sum().backward()
    assert layer_sum.weights.grad[0] > 0 > layer_sum.weights.grad[1]
    with pytest.raises(ValueError, match="num_layers"):
        layer_sum(layers[:1])


@pytest.mark.parametrize("kind", ["conformer", "transformer"])
@pytest.mark.parametrize("context", [(8, 1), (4, 3), (16, 0)])
def test_streaming_classifier_equals_offline(kind, context):
    """Chunk by chunk (every layer from forward_streaming, running pooled sum) the decision
    equals the offline classifier on the offline layers, for a batch of two streams."""
    encoder = tiny_encoder(kind=kind, num_layers=3)
    layer_sum = WeightedLayerSum(3)
    with torch.no_grad():
        layer_sum.weights.copy_(torch.tensor([0.3, -1.0, 2.0]))
    classifier = PooledClassifier(32, 16, 5).eval()
    feats = torch.randn(2, 45, 80)
    offline = classifier(layer_sum(encoder(feats, None, context, all_layers=True)))
    stream = StreamingClassifier(encoder, layer_sum, classifier, context)
    for start in range(0, feats.shape[1], stream.chunk_frames):
        stream.push(feats[:, start:start + stream.chunk_frames])
    assert torch.allclose(stream.logits(), offline, atol=1e-5)
    with pytest.raises(ValueError, match="push a chunk"):
        StreamingClassifier(encoder, layer_sum, classifier, context).logits()


def classification_csv(split: str, rows: int, out) -> str:
    """``rows`` utterances of the shipped corpus's ``split`` (absolute audio paths), labeled
    long / short (above or below its median duration): every split has both classes."""
    with open(CORPUS / f"{split}.csv", newline="") as f:
        items = list(csv.DictReader(f))[:rows]
    median = sorted(float(item["duration"]) for item in items)[rows // 2]
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*items[0], "label"])
        writer.writeheader()
        for item in items:
            writer.writerow({**item, "wav": item["wav"].replace("$data_root", str(CORPUS)),
                             "label": "long" if float(item["duration"]) >= median else "short"})
    return str(out)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A one-epoch tiny SSL run exported, and both tasks' folders with long / short corpora."""
    base = tmp_path_factory.mktemp("downstream")
    run_recipe("SSL/conformer.yaml", base, "ssl", *TINY, "--number_of_epochs", "1")
    export.main([str(base / "ssl"), "--out", str(base / "ssl_model")])
    for task in downstream.TASKS:
        folder = base / "data" / task
        folder.mkdir(parents=True)
        for name, split, rows in (("train_few", "train", 8), ("dev", "valid", 4),
                                  ("test", "test", 4)):
            classification_csv(split, rows, folder / f"{name}.csv")
    return base


def driver_args(base, *extra):
    return ["--ssl_model", str(base / "ssl_model"), "--data_root", str(base / "data"),
            "--output_folder", str(base / "results"), "--seeds", "1", "--latency_utterances", "2",
            "--bootstrap_resamples", "200", "--overrides", *SIZES, "number_of_epochs=1",
            "num_classes=2", "hidden_size=16", *extra]


def test_downstream_recipe_end_to_end(tiny_setup, monkeypatch):
    """kws with the three upstreams, intent with the SSL one: every run trains and tests, the
    streamed decisions equal the offline ones, and a second call reads the results back."""
    base = tiny_setup
    summary = downstream.main(driver_args(base, "--tasks", "kws", "--grid", "lr=0.01"))
    intent = downstream.main(driver_args(base, "--tasks", "intent", "--upstreams", "ssl",
                                         "--grid", "lr=0.002,0.01"))
    tuning = intent["tasks"]["intent"]["ssl"]["tuning"]
    assert set(tuning["dev_accuracy"]) == {"lr=0.002", "lr=0.01"} and not tuning["grid_edge"]
    grid_run = json.loads((base / "results" / "intent" / "ssl" / "grid" / "lr0.01"
                           / "result.json").read_text())
    command = grid_run["record"]["command"]  # tuning never scores the test set
    assert command[command.index("--test_csv") + 1].endswith("dev.csv")
    assert tuning["setting"] in (["lr=0.002"], ["lr=0.01"])
    rows = summary["tasks"]["kws"]
    assert set(rows) == {"ssl", "random", "fbank"} and set(intent["tasks"]) == {"intent"}
    for upstream, row in rows.items():
        assert 0 <= row["test_accuracy"]["mean"] <= 100
        assert row["latency"]["streamed_equals_offline"] == "2/2"
        assert (row["vs_ssl"] is None) == (upstream == "ssl")
        if row["vs_ssl"]:
            assert row["vs_ssl"]["p_exact"] and 0 < row["vs_ssl"]["p_value"] <= 1
        result = base / "results" / "kws" / upstream / "seed1" / "result.json"
        run = json.loads(result.read_text())
        assert run["upstream"] == upstream and run["record"]["command"][0] == "recipes/train.py"
        assert (run["record"]["ssl_checkpoint_sha256"] is None) == (upstream != "ssl")
    assert rows["fbank"]["latency"]["chunk_ms"] == 10.0
    assert rows["ssl"]["latency"]["chunk_ms"] == 160.0  # medium: 4 frames of 40 ms
    assert "| kws | fbank |" in (base / "results" / "kws" / "summary.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a stored result was trained again")

    monkeypatch.setattr(downstream, "run", no_training)
    again = downstream.main(driver_args(base, "--tasks", "kws", "--grid", "lr=0.01"))
    assert again["tasks"]["kws"]["ssl"]["test_accuracy"] == rows["ssl"]["test_accuracy"]
    test_csv = base / "data" / "kws" / "test.csv"  # a regenerated corpus: refused, not reused
    original = test_csv.read_text()
    test_csv.write_text(original + original.splitlines()[-1] + "\n")
    try:
        with pytest.raises(SystemExit, match="manifests_sha256"):
            downstream.main(driver_args(base, "--tasks", "kws", "--grid", "lr=0.01"))
    finally:
        test_csv.write_text(original)


def test_cached_layers_pool_the_frames_of_the_first_epoch():
    """Epoch 1 runs the frozen encoder on the padded batch and pools each utterance's own
    encoder frames; later epochs read the cache: the same logits."""
    from types import SimpleNamespace

    from classify_brain import ClassifyBrain

    encoder = tiny_encoder(num_layers=2).eval()
    layer_sum, classifier = WeightedLayerSum(2), PooledClassifier(32, 16, 3).eval()
    feats, frame_lengths = torch.randn(3, 37, 80), torch.tensor([37, 30, 5])
    with torch.no_grad():
        layers = encoder(feats, frame_lengths / 37, (8, 3), all_layers=True)
    frames = -(-frame_lengths // 4)  # as ClassifyBrain.compute_forward
    first = classifier(layer_sum(layers), frames / layers[0].shape[1])
    brain = SimpleNamespace(frozen_layers={})
    ClassifyBrain.cache_layers(brain, ["a", "b", "c"], layers, frames)
    assert [brain.frozen_layers[u].shape[1] for u in "abc"] == [10, 8, 2]
    cached, lengths = ClassifyBrain.cached_layers(brain, ["a", "b", "c"])
    assert torch.allclose(classifier(layer_sum(cached), lengths), first, atol=1e-6)


def test_latency_sample_takes_every_class_in_turn():
    rows = [{"ID": str(i), "label": label} for i, label in enumerate("aaaabbbc")]
    assert [r["ID"] for r in downstream.stratified(rows, 5)] == ["0", "4", "7", "1", "5"]


def test_sign_flip_test_keeps_its_level_with_few_voices():
    """Under a true null with voice-level variation (9 voices of unequal size), the exact
    sign-flip test rejects at 5 % no more often than 5 % (up to simulation noise)."""
    from stats import paired_sign_flip

    rng = __import__("numpy").random.default_rng(0)
    sizes = [48, 48, 36, 36, 24, 24, 24, 24, 24]
    rejections = 0
    for trial in range(300):
        a, b, cluster = {}, {}, {}
        for voice, size in enumerate(sizes):
            shift = rng.normal(0, 0.15)  # this voice favours A or B; zero on average
            for u in range(size):
                uid = f"v{voice}-{u}"
                p_a, p_b = (min(max(0.4 + s, 0), 1) for s in (shift, -shift))
                a[uid], b[uid] = (float(rng.random() < p_a), 1), (float(rng.random() < p_b), 1)
                cluster[uid] = f"v{voice}"
        rejections += paired_sign_flip(a, b, cluster)["p_value"] < 0.05
    assert rejections / 300 <= 0.08


def test_relative_difference_is_undefined_when_the_reference_makes_no_error():
    from stats import paired_cluster_bootstrap

    a = {f"v{v}-{u}": (float(u == 0), 1) for v in range(4) for u in range(3)}
    result = paired_cluster_bootstrap(a, {k: (0.0, 1) for k in a},
                                      {k: k.split("-")[0] for k in a}, resamples=100)
    assert result["relative"] is None and result["difference"] == pytest.approx(100 / 3)


def test_grid_settings_are_every_combination():
    assert downstream.grid_settings([]) == [[]]
    assert downstream.grid_settings(["lr=1,2", "hidden_size=8"]) == [
        ["lr=1", "hidden_size=8"], ["lr=2", "hidden_size=8"]]


def test_bad_downstream_inputs_get_one_line(tiny_setup, tmp_path):
    base = tiny_setup
    with pytest.raises(ValueError, match="--ssl_model"):
        downstream.main(["--tasks", "kws"])
    # A test label never seen in training.
    folder = tmp_path / "kws"
    folder.mkdir()
    for name in ("train_few", "dev"):
        (folder / f"{name}.csv").write_text((base / "data" / "kws" / f"{name}.csv").read_text())
    text = (base / "data" / "kws" / "test.csv").read_text().replace(",short\n", ",medium\n", 1)
    (folder / "test.csv").write_text(text)
    common = [str(ROOT / "hparams" / "downstream" / "kws.yaml"), "--upstream", "fbank",
              "--train_csv", str(folder / "train_few.csv"), "--valid_csv", str(folder / "dev.csv"),
              "--test_csv", str(folder / "test.csv"), "--num_classes", "2", "--device", "cpu"]
    # Both stop before training: run in this process.
    with pytest.raises(ManifestError, match=r"\['medium'\] never occur in --train_csv"):
        train.main([*common, "--output_folder", str(tmp_path / "unknown_label")])
    # SSL weights of other sizes than the recipe's: the file is named.
    with pytest.raises(SystemExit, match="encoder_network.ckpt of the model folder does not fit"):
        train.main([*common, "--upstream", "ssl", "--ssl_model", str(base / "ssl_model"),
                    "--test_csv", str(base / "data" / "kws" / "test.csv"),
                    "--output_folder", str(tmp_path / "sizes")])
