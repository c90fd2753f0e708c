"""CTC: decoders, the recipe's JSON contract, and fine-tuning from an SSL run (Pretrainer)."""
import hashlib
import json
import subprocess
import sys

import pytest
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.tokenizers.SentencePiece import SentencePiece
from speechbrain.utils.checkpoints import Checkpointer

from conftest import ROOT
from modules.ctc import BeamTranscriber, greedy_transcripts
from test_recipe import CORPUS, TINY, slice_csv

# 8 training sentences hold 25 distinct characters (+ unk): a char vocabulary of 26.
CTC_TINY = TINY[:TINY.index("--num_classes")] + TINY[TINY.index("--batch_size"):][:2] + [
    "--device_preset", "cpu", "--vocab_size", "26"]
SIZES = ("--d_model", "--nhead", "--num_encoder_layers", "--d_ffn", "--subsampling_conv_channels")
# Fine-tuning takes the encoder's sizes from the SSL run: CTC_TINY without them.
CTC_TINY_NO_SIZES = [a for i, a in enumerate(CTC_TINY)
                     if a not in SIZES and (i == 0 or CTC_TINY[i - 1] not in SIZES)]


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
    run, scratch = run_recipe("CTC/conformer_small.yaml", tmp_path, "scratch", *CTC_TINY,
                              "--test_csv", test_csv, "--number_of_epochs", "2",
                              "--checkpoints_to_keep", "2", "--average_checkpoints", "2")
    assert {"ctc_wer", "ctc_cer", "ctc_hparams", "ctc_output_folder"} <= set(scratch)
    assert 0 <= scratch["ctc_cer"] and scratch["epochs"] == 2
    noise = ("torchvision", "trainer_interface.cc")  # SpeechBrain's import, SentencePiece's trainer
    assert not any(word in run.stdout + run.stderr for word in noise), run.stderr[-3000:]
    assert (tmp_path / "scratch" / "save" / "tokenizer" / "26_char.model").is_file()
    assert (tmp_path / "scratch" / "test_wer.txt").is_file()
    # checkpoints kept (and averaged) by valid CER; the WER stays in their meta
    checkpoints = Checkpointer(tmp_path / "scratch" / "save").list_checkpoints()
    assert len(checkpoints) == 2 and all({"CER", "WER"} <= set(c.meta) for c in checkpoints)
    assert 0 <= scratch["ctc_valid_cer_last"] and scratch["record"]["ssl_checkpoint"] is None

    run_recipe("SSL/conformer.yaml", tmp_path, "ssl", *TINY, "--number_of_epochs", "1")
    run, tuned = run_recipe("CTC/conformer_small.yaml", tmp_path, "tuned", *CTC_TINY_NO_SIZES,
                            "--test_csv", test_csv, "--number_of_epochs", "1",
                            "--pretrained_ssl", str(tmp_path / "ssl"), "--freeze_encoder", "True")
    assert "Encoder and feature statistics loaded" in run.stdout + run.stderr
    output = run.stdout + run.stderr
    assert "Encoder sizes of the SSL run" in output and "d_model=32" in output  # not repeated
    assert tuned["epochs"] == 1
    # the record names the SSL checkpoint the run started from
    ssl_checkpoint = next((tmp_path / "ssl" / "save").glob("CKPT+*"))
    assert tuned["record"]["ssl_checkpoint"] == str(ssl_checkpoint.resolve())
    assert tuned["record"]["ssl_checkpoint_sha256"] == hashlib.sha256(
        (ssl_checkpoint / "encoder.ckpt").read_bytes()).hexdigest()
    assert json.loads((tmp_path / "tuned" / "run_record.json").read_text()) == tuned["record"]


def test_checkpoints_of_older_runs_are_selected_by_wer(tmp_path, caplog):
    """Runs older than CER selection have only "WER" in their meta: still loadable, by WER,
    with a one-line warning; as soon as checkpoints have a CER, it ranks them."""
    from inference import load_averaged_best, selection_key

    model = torch.nn.Linear(2, 2)
    checkpointer = Checkpointer(tmp_path / "save", {"ctc_head": model})
    for wer in (90.0, 80.0):
        torch.nn.init.constant_(model.weight, wer)
        checkpointer.save_checkpoint(meta={"WER": wer})
    with caplog.at_level("WARNING"):
        assert selection_key(checkpointer) == "WER"
    assert "selected by valid WER" in caplog.text
    load_averaged_best(checkpointer, {"ctc_head": model}, 1)
    assert torch.all(model.weight == 80.0)  # the lowest WER
    checkpointer.save_checkpoint(meta={"CER": 40.0, "WER": 99.0})
    assert selection_key(checkpointer) == "CER"


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


def record_step_lrs(brain) -> dict:
    """``{optimizer name: [the LR of each of its steps]}``, read when each step runs."""
    used = {name: [] for name in brain.optimizers_dict}
    for name, optimizer in brain.optimizers_dict.items():
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, name=name: used[name].append(opt.param_groups[0]["lr"]))
    return used


def test_fine_tuning_schedule_has_its_phases(tmp_path):
    """8 steps: the head alone for the first 2 (the encoder does not move, its optimizer and
    schedule do not step), then both. Head: warmup 2 of 8 steps; encoder: its schedule starts
    with its training, warmup 2 of its 6 steps; both decay to 0 at the end of the run. Rates are
    those of the step that uses them: no optimizer starts at its peak or takes a step at 0."""
    brain, batch = recipe_brain(tmp_path, number_of_epochs=1, warmup_fraction=0.25,
                                head_only_fraction=0.25, lr_encoder=0.0004, lr_head=0.002)
    brain.plan_schedule(8)
    brain.optimizer_step = 0
    used = record_step_lrs(brain)
    encoder, head = brain.hparams.encoder, brain.hparams.ctc_head
    encoder_moved, head_moved = [], []
    for _ in range(8):
        before = [p.detach().clone() for p in (*encoder.parameters(), *head.parameters())]
        brain.fit_batch(batch)
        after = [*encoder.parameters(), *head.parameters()]
        changed = [not torch.equal(b, a) for b, a in zip(before, after)]
        count = len(list(encoder.parameters()))
        encoder_moved.append(any(changed[:count]))
        head_moved.append(all(changed[count:]))
    assert encoder_moved == [False, False] + [True] * 6 and all(head_moved)
    # head, step k of 8 (warmup 2): 0.002 * min((k + 1) / 3, (8 - k) / 6)
    assert used["head"] == pytest.approx([0.002 * v for v in (1 / 3, 2 / 3, 1, 5 / 6, 4 / 6,
                                                              3 / 6, 2 / 6, 1 / 6)])
    # encoder, its step j of 6 (warmup round(0.25 * 6) = 2): 0.0004 * min((j + 1) / 3, (6 - j) / 4)
    assert used["encoder"] == pytest.approx([0.0004 * v for v in (1 / 3, 2 / 3, 1, 3 / 4, 2 / 4,
                                                                  1 / 4)])
    first, second = used["encoder"][:2]
    assert 0 < first < 0.0004 and second > first  # its first update: warming up, not at peak
    assert 0 < used["head"][0] < 0.002
    assert brain.hparams.lr_annealing["head"].current_step == 8
    assert brain.hparams.lr_annealing["encoder"].current_step == 6
    assert brain.hparams.lr_annealing["encoder"].calculate_lr(6) == 0.0  # 0 at the end


def test_head_only_phase_equal_to_warmup_leaves_the_encoder_its_own_warmup(tmp_path):
    """The default protocol (head_only_fraction == warmup_fraction): the encoder's first update,
    right after the head-only phase, is below its peak and the next ones rise."""
    brain, batch = recipe_brain(tmp_path, number_of_epochs=1, warmup_fraction=0.1,
                                head_only_fraction=0.1, lr_encoder=0.0004)
    brain.plan_schedule(20)  # head alone for 2 steps; encoder: 18 steps, warmup 2
    brain.optimizer_step = 0
    used = record_step_lrs(brain)
    for _ in range(5):
        brain.fit_batch(batch)
    assert len(used["head"]) == 5 and len(used["encoder"]) == 3
    assert 0 < used["encoder"][0] < used["encoder"][1] < used["encoder"][2] == pytest.approx(0.0004)
