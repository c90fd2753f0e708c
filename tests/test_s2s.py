"""The joint CTC / attention recipe (issue 22, first part): a tiny run with each decoder trains,
validates and tests end to end with two-pass decoding, and decoder inputs and targets are built
from the CTC targets."""
import pytest
import torch

from s2s_brain import decoder_io
from test_ctc import CTC_TINY, run_recipe, slice_csv


def test_decoder_io_shifts_the_tokens_between_bos_and_eos():
    inputs, targets = decoder_io(torch.tensor([[3, 4, 5], [6, 0, 0]]),
                                 torch.tensor([1.0, 1 / 3]), bos=30, eos=31)
    assert inputs.tolist() == [[30, 2, 3, 4], [30, 5, 31, 31]]
    assert targets.tolist() == [[2, 3, 4, 31], [5, 31, -1, -1]]


@pytest.mark.parametrize("mixer,decoding", [("attention", "attention_rescoring"),
                                            ("mamba", "ctc_prefix_beam")])
def test_s2s_recipe_end_to_end(tmp_path, mixer, decoding):
    test_csv = slice_csv("test", 4, tmp_path / "test.csv")
    _, result = run_recipe("S2S/conformer_small.yaml", tmp_path, "s2s", *CTC_TINY,
                           "--test_csv", test_csv, "--number_of_epochs", "1",
                           "--num_decoder_layers", "1", "--decoder_mixer", mixer,
                           "--decoding", decoding, "--beam_size", "3")
    assert result["decoding"] == decoding and 0 <= result["s2s_cer"]
    assert (tmp_path / "s2s" / "test_wer.txt").is_file()
    saved = list((tmp_path / "s2s" / "save").glob("CKPT+*/decoder.ckpt"))
    assert saved, "the decoder is not checkpointed"


def test_unknown_decoding_is_refused(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    from test_recipe import CORPUS

    run = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "train.py"), str(ROOT / "hparams" / "S2S" /
         "conformer_small.yaml"), "--data_folder", str(CORPUS), "--output_folder",
         str(tmp_path / "bad"), "--train_csv", slice_csv("train", 8, tmp_path / "train.csv"),
         "--valid_csv", slice_csv("valid", 2, tmp_path / "valid.csv"), *CTC_TINY,
         "--decoding", "beam"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode != 0 and "--decoding beam: give one of" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "bad" / "save").exists()


S2S_YAMLS = sorted((__import__("conftest").ROOT / "hparams" / "S2S").glob("*.yaml"))


@pytest.mark.parametrize("path", S2S_YAMLS, ids=lambda p: p.name)
def test_every_s2s_yaml_builds_its_encoder_and_decoder(tmp_path, path):
    """Each S2S file (tiny sizes) builds; the decoder reads the encoder output, is trained and
    checkpointed, and its mixer is the file's (Mamba for conmamba_mamba_*)."""
    from hyperpyyaml import load_hyperpyyaml

    from test_recipe import CORPUS

    tiny = {"output_folder": str(tmp_path), "data_folder": str(CORPUS), "d_model": 32,
            "num_encoder_layers": 1, "d_ffn": 64, "subsampling_conv_channels": 4,
            "num_decoder_layers": 1, "vocab_size": 26}
    if "conmamba" not in path.name:
        tiny["nhead"] = 2
    with open(path) as f:
        hparams = load_hyperpyyaml(f, tiny)
    assert hparams["task"] == "s2s" and hparams["modules"]["decoder"] is hparams["decoder"]
    assert hparams["checkpointer"].recoverables["decoder"] is hparams["decoder"]
    mamba = hparams["decoder"].layers[0].mixer == "mamba"
    assert mamba == path.name.startswith("conmamba_mamba_")
    encoded = hparams["encoder"](torch.randn(1, 40, 80), None, (8, 3))
    logits = hparams["decoder"](torch.tensor([[26, 3, 4]]), encoded,
                                torch.tensor([encoded.shape[1]]))
    assert logits.shape == (1, 3, 28)
