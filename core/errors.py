"""Error types: bad input is a :class:`HainaError`; anything else is a failure of the work.

The ``haina`` command exits with status 2 and one line for a :class:`HainaError` (and for argument
parsing), and with status 1 for any other exception. A ``ValueError`` raised deep inside torch or a
library is therefore a failure, not the user's fault, unless haina caught it and said what was wrong.
"""

from __future__ import annotations


class HainaError(Exception):
    """Bad user input (a config, a file, a command-line value); the message is one line for the user."""


class ConfigError(HainaError):
    """A config that cannot be used: unknown key, wrong type, inconsistent layout."""


class PluginError(HainaError):
    """A plugin lookup, registration or setting that cannot succeed."""


class InputFileError(HainaError):
    """A user file that is missing or malformed; the message names the file (and line)."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__
