"""The errors a user can act on; each message names the key, file or value and what was expected."""

# what PIL raises on a file that is no readable image (empty, truncated, another format)
UNREADABLE = (OSError, ValueError, SyntaxError)


class ConfigError(ValueError):
    """A config key, value or combination that cannot work (the message names the key)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model (the message says which and why)."""


class NonFiniteLossError(RuntimeError):
    """A loss was NaN or infinite: the run stops, its last checkpoint holds the last good weights."""


class DataError(RuntimeError):
    """Images that cannot be used (all unreadable, too many in a row): the message names the files and counts."""


class OutputDirInUseError(RuntimeError):
    """Another live run holds the output directory (the message names its host, pid and command)."""


def summarize_names(names: list[str], limit: int = 5) -> str:
    """The first few names and how many there are, for a message: ``a, b, c ... (12 in all)``."""
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "") + f" ({len(names)} in all)"
