"""Silences third-party log lines that tell a user nothing they can act on.

Imported by the entry points *before* SpeechBrain: SpeechBrain logs ``torchvision is not
available - cannot save figures`` while importing ``speechbrain.utils.train_logger`` (the recipes
save no figures), and SentencePiece's trainer writes ~50 INFO lines to stderr when the CTC
tokenizer is trained (its warnings and errors still show). SpeechBrain's ``TransformerLM``
passes a float attention mask with a bool padding mask, which PyTorch warns about at every call.
"""
from __future__ import annotations

import logging
import warnings

QUIET = {"speechbrain.utils.train_logger": "torchvision is not available"}


class DropMessage(logging.Filter):
    """Drops the records whose message contains ``text``; passes every other one."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence() -> None:
    """Installs the filters (on the named loggers, which SpeechBrain later reuses) and raises
    SentencePiece's C++ log level to warnings; idempotent."""
    for name, text in QUIET.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(DropMessage(text))
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
    try:
        import sentencepiece
        sentencepiece.set_min_log_level(1)  # 0 INFO, 1 WARNING
    except (ImportError, AttributeError):  # older SentencePiece: its INFO lines stay
        pass


silence()
