"""Command-line plumbing of ``evaluate.py`` and ``transcribe.py``: one-line errors, mistyped
flags answered with a suggestion, and negative context pairs (``--context -1,-1``) as values."""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from typing import Callable

from dataio import AudioFileError

# "-1,-1" or "8,-1": argparse would take it for a flag (it only knows negative numbers).
NEGATIVE_PAIR = re.compile(r"^-\d+\s*,\s*-?\d+$")


class RecipeParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line, and which refuses unknown flags with the
    closest known one (``--contxt`` -> did you mean ``--context``?)."""

    def error(self, message: str):
        raise SystemExit(f"error: {message} (see {self.prog} --help)")

    def parse_strict(self, argv: list[str]) -> argparse.Namespace:
        """Parses ``argv`` (negative pairs kept as values); an unknown argument is an error."""
        args, unknown = self.parse_known_args(join_negative_pairs(argv))
        if unknown:
            self.error(self.unknown_message(unknown[0]))
        return args

    def unknown_message(self, token: str) -> str:
        if not token.startswith("-"):
            return f"unexpected argument {token!r}"
        name = token.split("=")[0]
        options = [o for action in self._actions for o in action.option_strings]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unrecognized argument {name}{hint}"


def join_negative_pairs(argv: list[str]) -> list[str]:
    """``["--context", "-1,-1"]`` -> ``["--context=-1,-1"]``: the pair stays the flag's value."""
    joined = []
    for token in argv:
        if NEGATIVE_PAIR.match(token) and joined and joined[-1].startswith("--") \
                and "=" not in joined[-1]:
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def run_cli(main: Callable[[list], dict]) -> None:
    """Runs ``main(sys.argv[1:])``: its result as JSON on the last stdout line, or a one-line
    error (several lines only to list several bad files)."""
    try:
        summary = main(sys.argv[1:])
    except (AudioFileError, FileNotFoundError, ImportError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(summary))


def warn(message: str) -> None:
    """One ``warning:`` line on stderr (stdout ends with the JSON result)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """One informative line on stderr."""
    print(message, file=sys.stderr, flush=True)
