"""Errors a user can fix. Entry points print them as one line on stderr (cli.run_main), never a traceback.

Each message says what is wrong, which file, and what to do about it.
"""


class UserError(Exception):
    """A problem with the user's input, options or files (not a bug)."""


class DataError(UserError, ValueError):
    """Bad input data: the message names the file or folder and the problem."""


class OptionError(UserError, ValueError):
    """Options no run can use together: the message names them and what to give instead."""


class CheckpointError(UserError, ValueError):
    """A weights file that is missing, unreadable, truncated or of another network; names the file."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which epoch is saved and the command that continues."""
