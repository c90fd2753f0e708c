"""An n-gram language model for shallow fusion (``task: ngram``): KenLM's ``lmplz`` (modified
Kneser-Ney) on the same text as the Transformer LM (``lm_brain.text_datasets``: no valid or test
sentence), then ``build_binary``. ``unit: token`` (``hparams/LM/ngram.yaml``): the text written
as the ASR run's token ids, perplexity per token (``</s>`` included) as ``lm_brain`` reports it;
``unit: word`` (``hparams/LM/word_ngram.yaml``): the text as words in the tokenizer's case
(``modules.word_ngram``: its 1-grams are the decoding lexicon, with the words of
``word_list`` if given, copied into the run as ``word_list.txt``), perplexity per word and the
share of valid and test words outside the lexicon (each one a word error).

No Brain: counting n-grams has no training loop. KenLM's programs are C++ (no maintained
Python package builds ARPA files); ``make kenlm`` builds them into ``tools/kenlm/bin``.
"""
from __future__ import annotations

import logging
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from inference import TextNormalizer
from modules.ngram import LN10, MODEL_FILE, NGramScorer, import_kenlm
from modules.word_ngram import WORD_LIST_FILE, WordNGramScorer, read_word_list, tokenizer_pieces

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
MAX_ORDER = 6  # KENLM_MAX_ORDER of KenLM's default build (make kenlm)


def kenlm_program(name: str, folder: str | None = None) -> Path:
    """``lmplz`` or ``build_binary``: from ``folder`` if given, else ``tools/kenlm/bin`` (what
    ``make kenlm`` builds), else the PATH; one line saying how to get it otherwise."""
    found = Path(folder or ROOT / "tools" / "kenlm" / "bin") / name
    if not found.is_file() and not folder and shutil.which(name):
        found = Path(shutil.which(name))
    if not found.is_file():
        where = f"--kenlm_bin {folder}" if folder else "tools/kenlm/bin or the PATH"
        raise SystemExit(f"error: KenLM's {name} is not in {where}: run `make kenlm` (builds "
                         "lmplz and build_binary into tools/kenlm/bin)")
    return found


def token_lines(dataset) -> list[str]:
    """Each sentence of a text dataset as its tokenizer ids, space-separated (the pipeline's
    ``tokens`` are CTC targets: id + 1)."""
    with dataset.output_keys_as(["tokens"]):
        return [" ".join(str(int(t) - 1) for t in item["tokens"]) for item in dataset]


def word_lines(dataset, sp) -> list[str]:
    """Each sentence of a text dataset as words, in the tokenizer's case and spacing."""
    normalize = TextNormalizer(sp)
    with dataset.output_keys_as(["wrd"]):
        return [normalize(item["wrd"]) for item in dataset]


def word_figures(scorer: WordNGramScorer, lines: list[str], name: str) -> dict:
    """Perplexity per word (``</s>`` included; KenLM's ``<unk>`` for unseen words) and the
    share of words outside the lexicon (each one an error of lexicon-constrained decoding)."""
    words = [word for line in lines for word in line.split()]
    total = sum(LN10 * scorer.model.score(line, bos=True, eos=True) for line in lines)
    outside = sum(not scorer.in_lexicon(word) for word in words)
    return {f"lm_{name}_perplexity": math.exp(-total / (len(words) + len(lines))),
            f"lm_{name}_oov_rate": outside / max(len(words), 1)}


def copy_word_list(source: str, sp, out: Path) -> tuple[list[str], dict]:
    """The words of ``source`` in the tokenizer's case, each once, written to ``out``; entries
    of more than one word are left out. Also the counts: entries, words kept."""
    normalize = TextNormalizer(sp)
    entries = read_word_list(source)
    words = list(dict.fromkeys(word for word in map(normalize, entries)
                               if len(word.split()) == 1))
    out.write_text("\n".join(words) + "\n")
    return words, {"word_list_entries": len(entries), "word_list_words": len(words)}


def run_program(command: list, log: Path) -> None:
    """Runs a KenLM program, its messages in ``log``; its last lines in one error if it fails."""
    with open(log, "a") as out:
        out.write("$ " + " ".join(map(str, command)) + "\n")
        out.flush()
        done = subprocess.run([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])
        raise SystemExit(f"error: {Path(command[0]).name} failed ({log}): {tail}")


def perplexity(scorer: NGramScorer, lines: list[str]) -> float:
    """exp of the mean negative log-probability per token, ``</s>`` included."""
    token_lists = [[int(t) for t in line.split()] for line in lines]
    total = sum(scorer.sentence_scores(token_lists))
    return math.exp(-total / sum(len(tokens) + 1 for tokens in token_lists))


def train_ngram(hparams: dict, datasets: dict) -> dict:
    """Writes ``text.txt``, ``lm.arpa`` and ``lm.bin`` into the output folder; returns the
    summary (perplexities, n-gram counts, seconds)."""
    start = time.time()
    try:  # before counting: the model is read back with it
        import_kenlm()
    except ImportError as error:
        raise SystemExit(f"error: {error}") from None
    unit = hparams.get("unit", "token")
    if unit not in ("token", "word"):
        raise SystemExit(f"error: --unit {unit}: give token or word")
    if hparams.get("oov_penalty") is not None and not hparams["oov_penalty"] < 0:
        raise SystemExit(f"error: --oov_penalty {hparams['oov_penalty']}: give a negative "
                         "log-score per character, or null (lexicon words only)")
    penalty = hparams.get("word_list_penalty", 0.0)
    if not isinstance(penalty, (int, float)) or not penalty <= 0:
        raise SystemExit(f"error: --word_list_penalty {penalty}: give a log-score of zero or "
                         "less (added to <unk>'s for each listed word)")
    if hparams.get("word_list") and unit != "word":
        raise SystemExit("error: --word_list is for a word n-gram (unit: word, "
                         "hparams/LM/word_ngram.yaml)")
    if hparams.get("word_list") and not Path(hparams["word_list"]).is_file():
        raise SystemExit(f"error: --word_list {hparams['word_list']} not found: give a file of "
                         "words, one per line (e.g. /usr/share/dict/american-english: "
                         "apt-get install wamerican)")
    if not 2 <= hparams["order"] <= MAX_ORDER:
        raise SystemExit(f"error: --order {hparams['order']}: give 2 to {MAX_ORDER} (KenLM as "
                         f"`make kenlm` builds it reads n-grams up to order {MAX_ORDER})")
    folder = Path(hparams["output_folder"])
    lmplz = kenlm_program("lmplz", hparams.get("kenlm_bin"))
    build_binary = kenlm_program("build_binary", hparams.get("kenlm_bin"))
    text = folder / "text.txt"
    sp = hparams["tokenizer"].sp
    lines = token_lines(datasets["train"]) if unit == "token" else word_lines(datasets["train"], sp)
    text.write_text("\n".join(lines) + "\n")
    arpa, log = folder / "lm.arpa", folder / "kenlm_log.txt"
    log.write_text("")
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        command = [lmplz, "--order", hparams["order"], "--text", text, "--arpa", arpa,
                   "--memory", hparams["lmplz_memory"], "--temp_prefix", f"{scratch}/"]
        if hparams["prune"]:
            command += ["--prune", *hparams["prune"]]
        if hparams["discount_fallback"]:  # small texts lack the counts Kneser-Ney estimates from
            command.append("--discount_fallback")
        run_program(command, log)
    run_program([build_binary, arpa, folder / MODEL_FILE], log)
    if unit == "token":
        scorer = NGramScorer(folder / MODEL_FILE, hparams["vocab_size"])
        figures = {f"lm_{name}_perplexity": perplexity(scorer, token_lines(datasets[name]))
                   for name in ("valid", "test")}
    else:
        word_list, figures = None, {}
        if hparams.get("word_list"):
            word_list, figures = copy_word_list(hparams["word_list"], sp, folder / WORD_LIST_FILE)
        scorer = WordNGramScorer(folder / MODEL_FILE, arpa, tokenizer_pieces(sp),
                                 word_list=word_list, word_list_penalty=penalty)
        figures.update({"lexicon_words": scorer.lexicon_words,
                        "lexicon_words_listed": scorer.listed_words,
                        "lexicon_words_unspellable": scorer.dropped_words})
        for name in ("valid", "test"):
            figures.update(word_figures(scorer, word_lines(datasets[name], sp), name))
    counts = {}
    for line in arpa.open():
        if line.startswith("ngram "):
            order, count = line[6:].split("=")
            counts[int(order)] = int(count)
        elif line.startswith("\\1-grams"):
            break
    summary = {
        **figures, "unit": unit,
        "order": hparams["order"], "ngrams": counts, "train_sentences": len(lines),
        "train_seconds": round(time.time() - start, 1),
        "lm_hparams": str((folder / "hyperparams.yaml").resolve()),
        "lm_output_folder": str(folder.resolve()),
    }
    logger.info("n-gram LM: %s", summary)
    return summary
