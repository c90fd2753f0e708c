"""The LM recipe and decoding with it (issue 22): a tiny LM trains on an S2S run's tokenizer;
every decoding mode runs through evaluate.py with LM fusion; a two-pass stream's final result
is the offline rescoring and its partials the prefix beam's; mismatched tokenizers, leaked test
sentences and decodings a model cannot run are refused in one line."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from test_ctc import CTC_TINY, slice_csv
from test_readme import kenlm_built
from test_recipe import CORPUS

LM_TINY = ["--d_model", "32", "--nhead", "2", "--num_layers", "1", "--d_ffn", "64",
           "--vocab_size", "26", "--batch_size", "8"]


def train(*args, check=True):
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny S2S run (Transformer decoder) and an LM trained with its tokenizer."""
    tmp = tmp_path_factory.mktemp("lm")
    test_csv = slice_csv("test", 4, tmp / "test.csv")
    train(str(ROOT / "hparams" / "S2S" / "conformer_small.yaml"), "--data_folder", str(CORPUS),
          "--output_folder", str(tmp / "s2s"), "--train_csv", slice_csv("train", 8, tmp / "t.csv"),
          "--valid_csv", slice_csv("valid", 4, tmp / "valid.csv"), "--test_csv", test_csv,
          *CTC_TINY, "--number_of_epochs", "2", "--num_decoder_layers", "1",
          "--decoding", "attention")
    run = train(*lm_command(tmp, tmp / "lm"), "--number_of_epochs", "2")
    return tmp, json.loads(run.stdout.strip().splitlines()[-1])


def lm_command(tmp, output_folder) -> list[str]:
    return [str(ROOT / "hparams" / "LM" / "transformer.yaml"), "--asr_run", str(tmp / "s2s"),
            "--data_folder", str(CORPUS), "--output_folder", str(output_folder),
            "--valid_csv", str(tmp / "valid.csv"), "--test_csv", str(tmp / "test.csv"), *LM_TINY]


def test_lm_recipe_trains_on_the_asr_tokenizer(runs):
    tmp, summary = runs
    assert summary["epochs"] == 2 and 1.0 < summary["lm_test_perplexity"] < 40
    model = "save/tokenizer/26_char.model"
    assert (tmp / "lm" / model).read_bytes() == (tmp / "s2s" / model).read_bytes()
    assert list((tmp / "lm" / "save").glob("CKPT+*/lm.ckpt"))


def test_lm_text_holding_a_valid_sentence_is_refused(runs, tmp_path):
    tmp, _ = runs
    run = train(*lm_command(tmp, tmp_path / "lm"), "--more_text_csvs",
                f"[{CORPUS / 'valid.csv'}]", check=False)
    assert run.returncode != 0 and "of its sentences are in the LM's training text" in run.stderr
    assert "Traceback" not in run.stderr


def test_lm_needs_an_asr_run_with_the_same_tokenizer_kind(runs, tmp_path):
    tmp, _ = runs
    base = [str(ROOT / "hparams" / "LM" / "transformer.yaml"), "--data_folder", str(CORPUS),
            "--output_folder", str(tmp_path / "lm"), *LM_TINY]
    run = train(*base, check=False)
    assert run.returncode != 0 and "--asr_run: give the ASR run" in run.stderr
    run = train(*base, "--asr_run", str(tmp / "s2s"), "--vocab_size", "30", check=False)
    assert run.returncode != 0 and "pass --vocab_size 26 --token_type char" in run.stderr
    assert "Traceback" not in run.stderr


def evaluate(tmp, *args, check=True):
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "evaluate.py"), str(tmp / "s2s"),
                          "--test_csv", str(tmp / "test.csv"), "--output_folder",
                          str(tmp / "eval"), *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.strip().splitlines()[-1])
    return run


@pytest.mark.parametrize("decoding", ["ctc_prefix_beam", "attention_rescoring", "attention"])
def test_every_decoding_runs_with_lm_fusion_and_latencies(runs, decoding):
    tmp, _ = runs
    # an untrained model's attention search runs to its longest hypotheses: fewer utterances
    rows = (tmp / "test.csv").read_text().splitlines()
    test_csv = tmp / f"{decoding}.csv"
    test_csv.write_text("\n".join(rows[:2 if decoding == "attention" else 5]) + "\n")
    result = evaluate(tmp, "--test_csv", str(test_csv), "--decoding", decoding, "--lm",
                      str(tmp / "lm"), "--context", "low", "--context", "unlimited", "--streaming",
                      "--beam_size", "3" if decoding != "attention" else "2",
                      "--latency_utterances", "1")
    streamed, offline = result["results"]
    assert streamed["decoding"] == offline["decoding"] == decoding
    assert streamed["final_latency_ms"] > 0 and offline["first_partial_ms"] is None
    if decoding == "attention":  # offline decoding: no partial results
        assert streamed["first_partial_ms"] is None
    else:
        assert streamed["second_pass_ms"] is not None
    assert f"_{decoding}+lm.md" in result["table_md"]


def test_two_pass_stream_final_is_the_offline_rescoring(runs):
    """Chunk by chunk: the partials are the prefix beam's, the final result the offline
    two-pass decoding of the same utterance (with the LM, when trained)."""
    from dataio import load_audio
    from inference import Recognizer
    from modules.decoding import DecodingOptions

    tmp, _ = runs
    lm = tmp / "lm"
    rows = (tmp / "test.csv").read_text().splitlines()[1:3]
    for weight in [0.0, 0.5]:
        two_pass = Recognizer(tmp / "s2s", decoding=DecodingOptions(
            "attention_rescoring", 4, 0.4, weight), lm=lm if weight else None)
        beam = Recognizer(tmp / "s2s", decoding=DecodingOptions(
            "ctc_prefix_beam", 4, 0.4, weight), lm=lm if weight else None)
        for row in rows:
            samples = load_audio(row.split(",")[2].replace("$data_root", str(CORPUS)))
            context = two_pass.context("low")
            stream = two_pass.stream(context)
            for start in range(0, len(samples), 2000):
                partial = stream.push(samples[start:start + 2000])
            first_pass = beam.stream(context)
            first_pass.push(samples)
            assert partial == first_pass.text()
            assert stream.finish() == two_pass.transcribe(samples, context)
            assert stream.second_pass_seconds is not None and first_pass.finish() == \
                beam.transcribe(samples, context)


def test_prefix_beam_stream_final_adds_the_lm_end_score(runs):
    """With an LM, the prefix beam's final result ranks its n-best with the LM's end of
    sentence, streamed as offline: an LM that vetoes ending the best partial hypothesis makes
    both the stream's final result and the offline one another hypothesis."""
    from dataio import load_audio
    from inference import Recognizer
    from modules.decoding import DecodingOptions

    tmp, _ = runs
    beam = Recognizer(tmp / "s2s", decoding=DecodingOptions("ctc_prefix_beam", 4, 0.4, 1.0),
                      lm=tmp / "lm")

    class EndVeto:
        def __init__(self, lm):
            self.lm, self.eos, self.vetoed = lm, lm.eos, None

        def __call__(self, prefixes):
            rows = self.lm(prefixes)
            for row, prefix in enumerate(prefixes):
                if tuple(prefix) == self.vetoed:
                    rows[row, self.eos] = -1.0e4
            return rows

    beam.lm_scorer = veto = EndVeto(beam.lm_scorer)
    row = (tmp / "test.csv").read_text().splitlines()[1]
    samples = load_audio(row.split(",")[2].replace("$data_root", str(CORPUS)))
    context = beam.context("low")
    stream = beam.stream(context)
    partial = stream.push(samples)
    veto.vetoed = tuple(stream.decoder.search.partial())
    final = stream.finish()
    assert final != partial and final == beam.transcribe(samples, context)


def test_decodings_a_model_or_lm_cannot_run_are_refused(runs, tmp_path):
    from modules.lm import check_same_tokenizer

    tmp, _ = runs
    run = evaluate(tmp, "--lm_weight", "0.5", check=False)
    assert run.returncode != 0 and "--lm_weight needs --lm" in run.stderr
    run = evaluate(tmp, "--lm", str(tmp / "s2s"), check=False)
    assert run.returncode != 0 and "is a s2s run: give an LM run" in run.stderr
    run = evaluate(tmp, "--lm", str(tmp / "lm"), "--decoding", "ctc_greedy", check=False)
    assert run.returncode != 0 and "greedy CTC decoding uses no language model" in run.stderr
    assert "Traceback" not in run.stderr
    from speechbrain.tokenizers.SentencePiece import SentencePiece

    SentencePiece(str(tmp_path), 20, annotation_train=str(CORPUS / "valid.csv"),
                  annotation_read="wrd", model_type="char")
    other = next(tmp_path.glob("*.model"))
    with pytest.raises(ValueError, match="trained with another tokenizer"):
        check_same_tokenizer(other, tmp / "s2s" / "save" / "tokenizer" / "26_char.model",
                             "lm", "asr")


def test_a_ctc_model_cannot_rescore(tmp_path):
    from inference import Recognizer
    from modules.decoding import DecodingOptions

    from test_ctc import run_recipe

    run_recipe("CTC/conformer_small.yaml", tmp_path, "ctc", *CTC_TINY, "--number_of_epochs",
               "1", "--test_csv", slice_csv("test", 2, tmp_path / "test.csv"))
    with pytest.raises(ValueError, match="needs an attention decoder"):
        Recognizer(tmp_path / "ctc", decoding=DecodingOptions("attention_rescoring"))
    beam = Recognizer(tmp_path / "ctc", decoding=DecodingOptions("ctc_prefix_beam", 3))
    assert isinstance(beam.transcribe(torch.randn(16000) * 0.1, beam.context("low")), str)


def test_transcribe_streams_two_pass_and_says_attention_is_offline(runs):
    tmp, _ = runs
    audio = (tmp / "test.csv").read_text().splitlines()[1].split(",")[2].replace(
        "$data_root", str(CORPUS))
    for decoding, streamed in [("attention_rescoring", True), ("attention", False),
                               ("ctc_prefix_beam", True)]:
        run = subprocess.run([sys.executable, str(ROOT / "recipes" / "transcribe.py"),
                              str(tmp / "s2s"), "--audio", audio, "--context", "low",
                              "--decoding", decoding, "--lm", str(tmp / "lm"), "--quiet"],
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result["equal_to_offline"] and result["streamed"] == streamed
        if decoding == "attention_rescoring":
            assert result["decoding"] == decoding and result["second_pass_ms"] > 0
        if not streamed:
            assert "offline beam search: transcribed offline" in run.stderr


needs_kenlm = pytest.mark.skipif(not kenlm_built(), reason="KenLM is not built: run `make kenlm`")


def ngram_command(tmp, output_folder) -> list[str]:
    return [str(ROOT / "hparams" / "LM" / "ngram.yaml"), "--asr_run", str(tmp / "s2s"),
            "--data_folder", str(CORPUS), "--output_folder", str(output_folder),
            "--valid_csv", str(tmp / "valid.csv"), "--test_csv", str(tmp / "test.csv"),
            "--vocab_size", "26", "--order", "4"]


@needs_kenlm
def test_ngram_lm_recipe_and_every_decoding_with_it(runs, tmp_path):
    """The n-gram recipe counts the ASR run's tokens (same tokenizer copy); every decoding
    mode fuses it through evaluate.py; its text is refused when it holds a valid sentence."""
    tmp, _ = runs
    summary = json.loads(train(*ngram_command(tmp, tmp_path / "ngram")).stdout.strip()
                         .splitlines()[-1])
    assert 1.0 < summary["lm_test_perplexity"] < 26 and summary["order"] == 4
    assert summary["ngrams"]["1"] > 20 and summary["record"]["command"]
    model = "save/tokenizer/26_char.model"
    assert (tmp_path / "ngram" / model).read_bytes() == (tmp / "s2s" / model).read_bytes()
    assert (tmp_path / "ngram" / "lm.bin").is_file()
    rows = (tmp / "test.csv").read_text().splitlines()
    (tmp_path / "two.csv").write_text("\n".join(rows[:3]) + "\n")
    for decoding in ["ctc_prefix_beam", "attention_rescoring", "attention"]:
        result = evaluate(tmp, "--test_csv", str(tmp_path / "two.csv"), "--decoding", decoding,
                          "--lm", str(tmp_path / "ngram"), "--lm_weight", "0.5",
                          "--beam_size", "2", "--context", "low", "--streaming")
        assert result["decoding"] == decoding and f"{decoding}+lm" in result["table_md"]
        assert result["decoding_options"]["lm"] == str((tmp_path / "ngram").resolve())
        assert result["decoding_options"]["lm_weight"] == 0.5
    run = train(*ngram_command(tmp, tmp_path / "order"), "--order", "9", check=False)
    assert run.returncode != 0 and "--order 9: give 2 to 6" in run.stderr
    (tmp_path / "ngram" / "lm.bin").rename(tmp_path / "lm.bin")  # an unfinished run
    run = evaluate(tmp, "--lm", str(tmp_path / "ngram"), "--lm_weight", "0.5", check=False)
    assert run.returncode != 0 and "this n-gram run did not finish" in run.stderr
    (tmp_path / "ngram" / "lm.bin").write_bytes((tmp_path / "lm.bin").read_bytes()[:1000])
    run = evaluate(tmp, "--lm", str(tmp_path / "ngram"), "--lm_weight", "0.5", check=False)
    assert run.returncode != 0 and "KenLM cannot read it" in run.stderr
    assert "Traceback" not in run.stderr
    run = train(*ngram_command(tmp, tmp_path / "leak"), "--more_text_csvs",
                f"[{CORPUS / 'valid.csv'}]", check=False)
    assert run.returncode != 0 and "of its sentences are in the LM's training text" in run.stderr
    assert "Traceback" not in run.stderr


def test_without_kenlm_the_ngram_lm_says_how_to_get_it(monkeypatch):
    from modules.ngram import NGramScorer

    monkeypatch.setitem(sys.modules, "kenlm", None)  # `import kenlm` fails as when absent
    with pytest.raises(ImportError, match="make kenlm"):
        NGramScorer(ROOT / "lm.bin", 5)


def test_a_tokenizer_retrained_on_the_same_text_is_the_same(runs, tmp_path):
    """Two runs training the same char tokenizer write different files (the trainer's input
    paths) with the same piece table: an LM of one decodes with the other."""
    from speechbrain.tokenizers.SentencePiece import SentencePiece

    from modules.lm import check_same_tokenizer, file_digest

    tmp, _ = runs
    ours = tmp / "s2s" / "save" / "tokenizer" / "26_char.model"
    csv_copy = tmp_path / "train_copy.csv"
    csv_copy.write_text((tmp / "t.csv").read_text())
    SentencePiece(str(tmp_path), 26, annotation_train=str(csv_copy), annotation_read="wrd",
                  model_type="char")
    again = tmp_path / "26_char.model"
    assert file_digest(again) != file_digest(ours)
    check_same_tokenizer(again, ours, "lm", "asr")


@needs_kenlm
def test_word_ngram_recipe_constrains_every_decoding_to_its_lexicon(runs, tmp_path):
    """The word n-gram recipe writes the training text as words in the tokenizer's case and
    reports its lexicon's OOV rates; every decoding mode fused with it through evaluate.py
    outputs lexicon words only (a heavy LM weight: the constraint, not the weight, decides)."""
    tmp, _ = runs
    command = ngram_command(tmp, tmp_path / "words")
    command[0] = str(ROOT / "hparams" / "LM" / "word_ngram.yaml")
    summary = json.loads(train(*command[:-2], "--order", "3").stdout.strip().splitlines()[-1])
    assert summary["unit"] == "word" and summary["lexicon_words"] > 20
    assert summary["lexicon_words_listed"] == 0
    assert 0.0 <= summary["lm_test_oov_rate"] < 1.0 and summary["lm_test_perplexity"] > 1.0
    lexicon = set((tmp_path / "words" / "text.txt").read_text().split())
    assert all(word.isupper() for word in lexicon)
    rows = (tmp / "test.csv").read_text().splitlines()
    (tmp_path / "two.csv").write_text("\n".join(rows[:3]) + "\n")
    for decoding in ["ctc_prefix_beam", "attention_rescoring", "attention"]:
        result = evaluate(tmp, "--test_csv", str(tmp_path / "two.csv"), "--decoding", decoding,
                          "--lm", str(tmp_path / "words"), "--lm_weight", "0.5",
                          "--beam_size", "2", "--context", "low", "--streaming",
                          "--output_folder", str(tmp_path / decoding))
        hypotheses = [json.loads(line)["hyp"] for line in
                      Path(result["hypotheses"]).read_text().splitlines()]
        assert len(hypotheses) == 2
        assert all(word in lexicon for hyp in hypotheses for word in hyp.split()), hypotheses
    train(*command[:-2], "--oov_penalty", "-3.0", "--output_folder", str(tmp_path / "open"))
    from inference import load_language_model
    scorer = load_language_model(tmp_path / "open", tmp / "s2s" / "save" / "tokenizer" /
                                 "26_char.model", "asr", 26, torch.device("cpu"))
    assert scorer.oov_penalty == -3.0 and scorer.sentence_scores([[1, 2, 3]])[0] > -1.0e4
    run = train(*command[:-2], "--oov_penalty", "1.0", "--output_folder",
                str(tmp_path / "bad"), check=False)
    assert run.returncode != 0 and "--oov_penalty 1.0: give a negative" in run.stderr
    # a word list widens the lexicon; the LM run keeps its copy, and decoding reads it back
    tokenizer = tmp / "s2s" / "save" / "tokenizer" / "26_char.model"
    strict = load_language_model(tmp_path / "words", tokenizer, "asr", 26, torch.device("cpu"))
    spellable = {word for word in lexicon if strict.in_lexicon(word)}
    fresh = sorted({"".join(sorted(word)) for word in spellable} - lexicon)[:2]
    (tmp_path / "words.txt").write_text("\n".join([*map(str.lower, fresh), "new york",
                                                   *lexicon]) + "\n")
    listed = json.loads(train(*command[:-2], "--word_list", str(tmp_path / "words.txt"),
                              "--word_list_penalty", "-2.0", "--output_folder",
                              str(tmp_path / "listed")).stdout.strip().splitlines()[-1])
    assert listed["lexicon_words_listed"] == 2 and listed["word_list_words"] == len(lexicon) + 2
    assert listed["word_list_entries"] == len(lexicon) + 3  # "new york" is two words
    assert listed["lexicon_words"] == summary["lexicon_words"] + 2
    scorer = load_language_model(tmp_path / "listed", tokenizer, "asr", 26, torch.device("cpu"))
    assert scorer.in_lexicon(fresh[0]) and scorer.listed_words == 2
    (tmp_path / "listed" / "word_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="word list .* not found"):
        load_language_model(tmp_path / "listed", tokenizer, "asr", 26, torch.device("cpu"))
    for flags, message in [(["--word_list", str(tmp_path / "none.txt")],
                            "--word_list .* not found"),
                           (["--word_list_penalty", "1.0"], "--word_list_penalty 1.0: give"),
                           (["--word_list", str(tmp_path / "words.txt"), "--unit", "token"],
                            "--word_list is for a word n-gram")]:
        run = train(*command[:-2], *flags, "--output_folder", str(tmp_path / "bad"), check=False)
        assert run.returncode != 0 and re.search(message, run.stderr), run.stderr[-500:]


def test_decoding_modes_tunes_on_dev_decodes_test_once_and_resumes(runs, tmp_path):
    """recipes/decoding_modes.py (the results tables of docs/decoding.md): each LM system's
    weight and every beam system's length bonus chosen on dev, every system decoded on test,
    the declared comparisons paired; two processes share the systems and a rerun decodes
    nothing (each decoding is read back)."""
    tmp, _ = runs
    command = [sys.executable, str(ROOT / "recipes" / "decoding_modes.py"), "--asr_run",
               str(tmp / "s2s"), "--lm", str(tmp / "lm"), "--dev_csv", str(tmp / "valid.csv"),
               "--test_csv", str(tmp / "test.csv"), "--output_folder", str(tmp_path / "modes"),
               "--contexts", "low,unlimited", "--attention_contexts", "low", "--tune_context",
               "low", "--lm_weights", "0.5", "--length_bonuses", "0,1", "--beam_size", "2",
               "--latency_utterances", "1"]

    def run(*extra):
        done = subprocess.run([*command, *extra], capture_output=True, text=True, cwd=ROOT,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert run("--systems", "ctc_greedy,attention,attention+lm") == {
        "decoded": ["ctc_greedy", "attention", "attention+lm"]}
    summary = run()
    result = json.loads(Path(summary["json"]).read_text())
    assert set(result["chosen_on_dev"]) == {"ctc_prefix_beam", "attention_rescoring",
                                            "ctc_prefix_beam+lm", "attention_rescoring+lm",
                                            "attention+lm"}
    assert result["chosen_on_dev"]["ctc_prefix_beam+lm"]["lm_weight"] == 0.5
    for system, rows in result["dev_tuning"].items():  # a choice on an edge was tried past it
        tried = sorted({row["length_bonus"] for row in rows})
        bonus = result["chosen_on_dev"][system]["length_bonus"]
        if system != "attention+lm":  # 0, 1 given, then up to two steps past an edge
            assert tried[0] < bonus < tried[-1] or len(tried) == 4, (system, tried, bonus)
    assert not result["missing"] and len(result["test"]) == 7
    for path in (tmp_path / "modes" / "test").glob("*.json"):
        assert "--beam_size" in json.loads(path.read_text())["record"]["argv"]
    pairs = {(c["a"], c["b"]) for c in result["comparisons"]}
    assert {("attention_rescoring+lm", "ctc_greedy"), ("attention+lm", "ctc_greedy")} <= pairs
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "modes").rglob("*.json")
            if p.name != "decoding_modes.json"}
    run()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


def test_a_dev_choice_on_the_grids_edge_extends_it_one_step():
    """decoding_modes.py: a weight or bonus chosen on the edge of what was tried is tried one
    grid step past it (the other coordinate kept); LM weights stay above 0."""
    from decoding_modes import past_edge, past_edges
    assert past_edge([0.6, 1.0, 1.5, 2.0], 2.0) == 2.5
    assert past_edge([0.6, 1.0, 1.5, 2.0], 0.6) == 0.2
    assert past_edge([0.6, 1.0, 1.5, 2.0], 1.0) is None and past_edge([0.5], 0.5) is None
    grid = [(w, b) for w in (0.6, 1.0) for b in (0.0, 1.0)]
    assert past_edges(grid, (1.0, 0.0), with_lm=True, bonused=True) == [(1.4, 0.0), (1.0, -1.0)]
    assert past_edges(grid, (0.6, 0.0), with_lm=True, bonused=False) == [(0.2, 0.0)]
    assert past_edges([(0.2, 0.0), (0.6, 0.0)], (0.2, 0.0), with_lm=True, bonused=False) == []
    assert past_edges([(0.0, 0.0), (0.0, 1.0)], (0.0, 1.0), with_lm=False, bonused=True) == [
        (0.0, 2.0)]
