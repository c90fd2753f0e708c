"""CTC: decoders, the recipe's JSON contract, and fine-tuning from an SSL run (Pretrainer)."""
import json
import subprocess
import sys

import pytest
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.tokenizers.SentencePiece import SentencePiece

from conftest import ROOT
from modules.ctc import BeamTranscriber, greedy_transcripts
from test_recipe import CORPUS, TINY, slice_csv

# 8 training sentences hold 25 distinct characters (+ unk): a char vocabulary of 26.
CTC_TINY = TINY[:TINY.index("--num_classes")] + TINY[TINY.index("--batch_size"):][:2] + [
    "--device_preset", "cpu", "--vocab_size", "26"]


def spelled(sp, text: str) -> torch.Tensor:
    """(1, T, V + 1) log-probabilities that spell ``text``: each token twice, then a blank."""
    path = []
    for token in sp.encode_as_ids(text):
        path += [token + 1, token + 1, 0]
    scores = torch.full((1, len(path), sp.get_piece_size() + 1), -8.0)
    scores[0, torch.arange(len(path)), torch.tensor(path)] = 0.0
    return scores.log_softmax(-1)


def test_greedy_and_beam_decoding(tmp_path):
    sp = SentencePiece(str(tmp_path), 29, annotation_train=str(CORPUS / "train.csv"),
                       annotation_read="wrd", model_type="char").sp
    log_probs = spelled(sp, "HELLO WORLD IT'S ALL")
    assert greedy_transcripts(log_probs, torch.ones(1), sp) == ["HELLO WORLD IT'S ALL"]
    assert BeamTranscriber(sp, beam_size=4)(log_probs, torch.ones(1)) == ["HELLO WORLD IT'S ALL"]


def run_recipe(hparams, tmp_path, name, *extra):
    command = [sys.executable, str(ROOT / "recipes" / "train.py"), str(ROOT / "hparams" / hparams),
               "--data_folder", str(CORPUS), "--output_folder", str(tmp_path / name),
               "--train_csv", slice_csv("train", 8, tmp_path / "train.csv"),
               "--valid_csv", slice_csv("valid", 4, tmp_path / "valid.csv"), *extra]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    return run, json.loads(run.stdout.strip().splitlines()[-1])


def test_ctc_recipe_from_scratch_and_from_ssl(tmp_path):
    test_csv = slice_csv("test", 4, tmp_path / "test.csv")
    _, scratch = run_recipe("CTC/conformer_small.yaml", tmp_path, "scratch", *CTC_TINY,
                            "--test_csv", test_csv, "--number_of_epochs", "2",
                            "--checkpoints_to_keep", "2", "--average_checkpoints", "2")
    assert {"ctc_wer", "ctc_cer", "ctc_hparams", "ctc_output_folder"} <= set(scratch)
    assert 0 <= scratch["ctc_cer"] and scratch["epochs"] == 2
    assert (tmp_path / "scratch" / "save" / "tokenizer" / "26_char.model").is_file()
    assert (tmp_path / "scratch" / "test_wer.txt").is_file()

    run_recipe("SSL/conformer.yaml", tmp_path, "ssl", *TINY, "--number_of_epochs", "1")
    run, tuned = run_recipe("CTC/conformer_small.yaml", tmp_path, "tuned", *CTC_TINY,
                            "--test_csv", test_csv, "--number_of_epochs", "1",
                            "--pretrained_ssl", str(tmp_path / "ssl"), "--freeze_encoder", "True")
    assert "Encoder and feature statistics loaded" in run.stdout + run.stderr
    assert tuned["epochs"] == 1


def test_pretrained_ssl_loads_encoder_and_statistics(tmp_path):
    from train import load_pretrained_ssl

    run_recipe("SSL/conformer.yaml", tmp_path, "ssl", *TINY, "--number_of_epochs", "1")
    overrides = {"d_model": 32, "nhead": 2, "num_encoder_layers": 1, "d_ffn": 64,
                 "subsampling_conv_channels": 4, "output_folder": str(tmp_path / "ctc"),
                 "train_csv": str(tmp_path / "train.csv"), "data_folder": str(CORPUS)}
    with open(ROOT / "hparams" / "CTC" / "conformer_small.yaml") as f:
        hparams = load_hyperpyyaml(f, overrides)
    load_pretrained_ssl(hparams, str(tmp_path / "ssl"))
    saved = next((tmp_path / "ssl" / "save").glob("CKPT*"))
    expected = torch.load(saved / "encoder.ckpt")
    for name, value in hparams["encoder"].state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert hparams["normalize"].count > 0


def recipe_brain(tmp_path, **overrides):
    """The CTC recipe's Brain (tiny), ready to step, and a batch of real speech."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from recipe_steps import corpus_batch
    from recipe_steps import recipe_brain as build

    sizes = {"d_model": 32, "nhead": 2, "num_encoder_layers": 2, "d_ffn": 64,
             "subsampling_conv_channels": 4, "train_csv": str(CORPUS / "train.csv"), **overrides}
    brain = build("hparams/CTC/conformer_small.yaml", sizes, "cpu", "fp32", str(tmp_path))
    return brain, corpus_batch(brain, 2, 3)


def test_frozen_probe_runs_the_encoder_in_eval_mode(tmp_path):
    """SpeechBrain calls modules.train() after on_stage_start: the probe must survive it."""
    for frozen in (True, False):
        brain, batch = recipe_brain(tmp_path / str(frozen), freeze_encoder=frozen)
        seen = []
        brain.hparams.encoder.layers[0].ffn_in.register_forward_hook(
            lambda module, args, out: seen.append(module.training))
        brain.on_stage_start(sb.Stage.TRAIN, 1)
        brain.modules.train()  # as Brain._fit_train does
        brain.fit_batch(batch)
        assert seen == [not frozen]


def test_probe_layer_feeds_the_head_from_a_middle_layer(tmp_path):
    brain, batch = recipe_brain(tmp_path, probe_layer=1, freeze_encoder=True)
    feats = torch.randn(1, 80, 80)
    encoder = brain.hparams.encoder.eval()
    first = encoder(feats, num_layers=1)
    with torch.no_grad():
        encoder.layers[1].ffn_out.net[1].weight.add_(1.0)  # the second layer does not matter
    assert torch.equal(encoder(feats, num_layers=1), first)
    assert not torch.equal(encoder(feats), encoder(feats, num_layers=1))
    brain.fit_batch(batch)
    for bad in (0, 3):
        with pytest.raises(ValueError, match="probe_layer"):
            encoder(feats, num_layers=bad)


def test_fine_tuning_schedule_has_its_phases(tmp_path):
    """8 steps: warmup 2 (linear up to the peak), then linear decay to 0; the head alone for the
    first 2 steps (the encoder does not move), then both; encoder peak 5x below the head's."""
    brain, batch = recipe_brain(tmp_path, number_of_epochs=1, warmup_fraction=0.25,
                                head_only_fraction=0.25, lr_encoder=0.0004, lr_head=0.002)
    brain.plan_schedule(8)
    brain.optimizer_step = 0
    encoder, head = brain.hparams.encoder, brain.hparams.ctc_head
    lrs, encoder_moved, head_moved = [], [], []
    for _ in range(8):
        before = [p.detach().clone() for p in (*encoder.parameters(), *head.parameters())]
        brain.fit_batch(batch)
        after = [*encoder.parameters(), *head.parameters()]
        changed = [not torch.equal(b, a) for b, a in zip(before, after)]
        count = len(list(encoder.parameters()))
        encoder_moved.append(any(changed[:count]))
        head_moved.append(all(changed[count:]))
        lrs.append({name: opt.param_groups[0]["lr"] for name, opt in brain.optimizers_dict.items()})
    assert encoder_moved == [False, False] + [True] * 6 and all(head_moved)
    head_lrs = [lr["head"] for lr in lrs]
    assert head_lrs[:3] == pytest.approx([0.001, 0.002, 0.002 * 5 / 6])  # up, peak, decay
    assert head_lrs[-1] == 0.0 and all(a > b for a, b in zip(head_lrs[1:], head_lrs[2:]))
    assert [lr["encoder"] * 5 for lr in lrs] == pytest.approx(head_lrs)
