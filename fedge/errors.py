"""The one exception class for bad input from the user, as opposed to a bug in fedge.

A config value, a flag, a plug-in spec, a task option or a data folder that is wrong raises
`ConfigError`, whose message names what was wrong and what to do; the `fedge` command prints
it as one line and exits 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """Bad input from the user; the message names the field or input and what is allowed."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest of `choices` to a mistyped `word`, else ``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
