"""recipes/export.py: a trained run -> a model folder that SpeechBrain's own ``EncoderASR`` and
``StreamingASR`` (and our ``SSLEncoder``) load in a fresh process, after the run is deleted,
with the transcripts of ``recipes/evaluate.py``; clear errors for a broken folder."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import soundfile as sf
import torch

import evaluate
import export
from conftest import ROOT
import transcribe
from test_inference import tiny_ctc_run
from test_recipe import CORPUS

CONTEXTS = {"16,1": (2, 8), "32,3": (4, 8)}  # ours -> DynChunkTrainConfig(chunk, left chunks)


def in_fresh_process(script: str, cwd, **values) -> dict:
    """Runs ``script`` (``values`` bound as JSON) in a new interpreter outside the repository,
    with the repository importable as an installed package would be; its last line is JSON."""
    prelude = "".join(f"{k} = json.loads({json.dumps(json.dumps(v))})\n" for k, v in values.items())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", "import json\n" + prelude + textwrap.dedent(script)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def hypotheses(path, streaming: bool) -> dict:
    """(context "L,R", streaming) -> {id: hyp} of an evaluate.py ``--utterances`` file."""
    found = {}
    for row in map(json.loads, open(path)):
        context = ",".join(map(str, row["context"]))
        found.setdefault((context, streaming), {})[row["id"]] = row["hyp"]
    return found


def evaluate_hypotheses(model, test_csv, folder, streaming: bool) -> dict:
    """evaluate.py on ``model`` (a run or an exported folder) at ``CONTEXTS``."""
    utterances = folder / f"hypotheses_{streaming}.jsonl"
    contexts = [a for context in CONTEXTS for a in ("--context", context)]
    evaluate.main([str(model), "--test_csv", test_csv, *contexts, "--utterances", str(utterances),
                   "--output_folder", str(folder), "--data_folder", str(CORPUS)]
                  + ["--streaming"] * streaming)
    return hypotheses(utterances, streaming)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A copy of the tiny CTC run (blank made less likely, so the 2-epoch model writes text),
    evaluate.py's hypotheses on it, its export; then the copy is deleted."""
    run, test_csv = tiny_ctc_run(tmp_path_factory)
    base = tmp_path_factory.mktemp("export")
    copy = base / "run"
    shutil.copytree(run, copy)
    for path in copy.glob("save/CKPT+*/ctc_head.ckpt"):
        state = torch.load(path)
        state["bias"][0] -= 4.0
        torch.save(state, path)
    reference = {**evaluate_hypotheses(copy, test_csv, base, False),
                 **evaluate_hypotheses(copy, test_csv, base, True)}
    result = export.main([str(copy), "--out", str(base / "model")])
    shutil.rmtree(copy)
    wavs = {row["id"]: row["wav"] for row in map(dict, evaluate.read_manifest(
        test_csv, CORPUS))}
    return base, base / "model", reference, wavs, result, test_csv


def test_export_writes_a_self_contained_folder(exported):
    base, model, _, _, result, _ = exported
    assert result["task"] == "ctc"
    assert {"hyperparams.yaml", "encoder_network.ckpt", "ctc_head.ckpt", "normalize.ckpt",
            "tokenizer.ckpt", "README.md", "training_record.json"} <= set(result["files"])
    hparams = (model / "hyperparams.yaml").read_text()
    assert "/" not in "".join(line.split("#")[0] for line in hparams.splitlines())  # no paths
    assert str(base) not in (model / "README.md").read_text()  # the run folder is not named
    assert "| medium | [32, 3] |" in (model / "README.md").read_text()


def test_speechbrain_classes_transcribe_like_evaluate(exported):
    """EncoderASR offline and StreamingASR at two contexts, in a fresh process after the run
    was deleted: the transcripts of evaluate.py (offline and --streaming) on the same model."""
    base, model, reference, wavs, _, _ = exported
    assert any(reference.values()) and any(h for r in reference.values() for h in r.values())
    found = in_fresh_process("""
        from speechbrain.inference.ASR import EncoderASR, StreamingASR
        from speechbrain.utils.dynamic_chunk_training import DynChunkTrainConfig
        out = {}
        for context, (chunk, left) in contexts.items():
            pair = [int(v) for v in context.split(",")]
            asr = EncoderASR.from_hparams(source=model, savedir=f"cache_{chunk}",
                                          overrides={"context": pair})
            out["offline " + context] = {i: asr.transcribe_file(w) for i, w in wavs.items()}
        streaming = StreamingASR.from_hparams(source=model, savedir="cache_streaming")
        for context, (chunk, left) in contexts.items():
            config = DynChunkTrainConfig(chunk, left)
            out["streaming " + context] = {
                i: "".join(streaming.transcribe_file_streaming(w, config,
                                                               use_torchaudio_streaming=False))
                for i, w in wavs.items()}
        print(json.dumps(out))
    """, base, model=str(model), contexts=CONTEXTS, wavs=wavs)
    for context in CONTEXTS:
        for streaming in (False, True):
            got = found[f"{'streaming' if streaming else 'offline'} {context}"]
            assert {i: " ".join(h.split()) for i, h in got.items()} == reference[context, streaming]


def test_evaluate_and_transcribe_read_the_exported_folder(exported, tmp_path):
    """Our own scripts take the exported folder where they take a run (one loading path for
    the weights: ``CheckedPretrainer``) and decode the same."""
    _, model, reference, wavs, _, test_csv = exported
    assert evaluate_hypotheses(model, test_csv, tmp_path, True) == {
        key: value for key, value in reference.items() if key[1]}
    utterance, wav = next(iter(wavs.items()))
    result = transcribe.main([str(model), "--audio", wav, "--quiet"])
    assert result["text"] == reference["32,3", True][utterance]  # the exported context


def test_a_broken_model_folder_names_its_file(exported, tmp_path):
    _, model, _, _, _, _ = exported
    missing, mismatched = tmp_path / "missing", tmp_path / "mismatched"
    shutil.copytree(model, missing)
    (missing / "encoder_network.ckpt").unlink()
    shutil.copytree(model, mismatched)
    head = torch.load(mismatched / "ctc_head.ckpt")
    torch.save({k: torch.cat([v, v[:1]]) for k, v in head.items()}, mismatched / "ctc_head.ckpt")
    errors = in_fresh_process("""
        from speechbrain.inference.ASR import EncoderASR
        out = {}
        for name in folders:
            try:
                EncoderASR.from_hparams(source=name, savedir=name + "_cache")
                out[name] = None
            except (FileNotFoundError, ValueError) as error:
                out[name] = str(error)
        print(json.dumps(out))
    """, tmp_path, folders=[str(missing), str(mismatched)])
    assert "encoder_network.ckpt: missing from the model folder" in errors[str(missing)]
    assert "ctc_head.ckpt of the model folder does not fit" in errors[str(mismatched)]


def test_export_refuses_a_non_empty_folder(exported, tmp_path):
    base, model, _, _, _, _ = exported
    with pytest.raises(ValueError, match="not empty"):
        export.main([str(base), "--out", str(model)])


def test_ssl_export_gives_every_layer_of_the_encoder(tmp_path):
    """An SSL run exported: ``SSLEncoder`` (fresh process) returns each block's output, equal to
    the run's own encoder under the same context, at two contexts."""
    from test_ctc import run_recipe
    from test_recipe import TINY

    run_recipe("SSL/conformer.yaml", tmp_path, "ssl", *TINY, "--number_of_epochs", "1")
    result = export.main([str(tmp_path / "ssl"), "--out", str(tmp_path / "model")])
    assert result["task"] == "ssl" and "tokenizer.ckpt" not in result["files"]
    wav = str(ROOT / "data" / "espeak_corpus" / "audio" / "test" / "spk22" / "spk22-000.flac")
    found = in_fresh_process("""
        import torch
        from modules.interfaces import SSLEncoder
        ssl = SSLEncoder.from_hparams(source=model, savedir="cache")
        out = {}
        for context in ([16, 1], "high"):
            layers = ssl.encode_file(wav, context=context)
            torch.save(layers, f"layers_{context}.pt")
            out[str(context)] = list(layers.shape)
        print(json.dumps(out))
    """, tmp_path, model=str(tmp_path / "model"), wav=wav)
    from dataio import load_audio
    from provenance import best_ssl_checkpoint
    from run_folder import load_run_hparams

    hparams = load_run_hparams(tmp_path / "ssl")
    checkpoint = best_ssl_checkpoint(tmp_path / "ssl")
    hparams["encoder"].load_state_dict(torch.load(checkpoint / "encoder.ckpt"))
    hparams["normalize"]._load(checkpoint / "normalize.ckpt")
    encoder, normalize = hparams["encoder"].eval(), hparams["normalize"].eval()
    samples = load_audio(wav, hparams["sample_rate"])[None]
    feats = normalize(hparams["compute_features"](samples), torch.ones(1))
    for context, pair in (([16, 1], (16, 1)), ("high", (64, 7))):
        with torch.no_grad():
            expected = torch.stack(encoder(feats, None, pair, all_layers=True))
        assert found[str(context)] == list(expected.shape)
        layers = torch.load(tmp_path / f"layers_{context}.pt")
        torch.testing.assert_close(layers, expected, rtol=1e-4, atol=1e-4)


def test_offline_ctc_decodes_a_padded_batch_like_each_utterance():
    """EncoderASR decodes a padded batch over its full length: OfflineCTC makes the padding a
    certain blank, so each row gives the tokens of the utterance alone (random tiny model)."""
    from conftest import tiny_encoder
    from modules.features import StreamingFbank
    from modules.interfaces import OfflineCTC, greedy_ctc_tokens

    torch.manual_seed(0)
    encoder = tiny_encoder()
    class Unnormalized(torch.nn.Module):  # the statistics play no part here
        def forward(self, feats, lengths=None):
            return feats / 10

    head = torch.nn.Linear(encoder.d_model, 12)
    torch.nn.init.normal_(head.weight, std=5.0)  # outputs that change from frame to frame
    model = OfflineCTC(StreamingFbank(), Unnormalized(), encoder, head, [8, 1]).eval()
    audio = sorted((CORPUS / "audio" / "test" / "spk22").glob("*.flac"))[:3]
    wavs = [torch.from_numpy(sf.read(path, dtype="float32")[0]) for path in audio]
    batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
    lengths = torch.tensor([len(w) / batch.shape[1] for w in wavs])
    with torch.no_grad():
        together = greedy_ctc_tokens(model(batch, lengths), lengths)
        alone = [greedy_ctc_tokens(model(w[None]), torch.ones(1))[0] for w in wavs]
    assert together == alone and sum(map(len, alone)) > 20


def test_greedy_ctc_context_carries_across_chunks():
    """StreamingASR's per-chunk decoding: the tokens of all chunks are the one-pass tokens (a
    token repeated across a chunk boundary collapses), for every way of cutting."""
    from modules.interfaces import GreedyCTCContext, greedy_ctc_tokens

    torch.manual_seed(1)
    log_probs = torch.randn(2, 40, 5).log_softmax(-1)
    log_probs[:, 10:12] = torch.tensor([-9.0, 0.0, -9.0, -9.0, -9.0])  # token 0 across a cut at 11
    offline = greedy_ctc_tokens(log_probs, torch.ones(2))
    for cut in (1, 3, 11):
        context, streamed = GreedyCTCContext(), [[], []]
        for start in range(0, 40, cut):
            for row, tokens in enumerate(greedy_ctc_tokens(log_probs[:, start:start + cut], context)):
                streamed[row] += tokens
        assert streamed == offline
