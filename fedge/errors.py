"""The one exception class for bad input from the user, as opposed to a bug in fedge.

A config value, a flag, a plug-in spec, a task option or a data folder that is wrong raises
`ConfigError`, whose message names what was wrong and what to do; the `fedge` command prints
it as one line and exits 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad input from the user; the message names the field or input and what is allowed."""
