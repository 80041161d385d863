"""The one exception type that carries a user-facing, one-line message.

The CLI turns it into `Error: <message>` on stderr and exit code 2, with no traceback.
"""


class TfcapError(Exception):
    """A problem with the user's input or command (bad path, bad layout, refused overwrite)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a one-line message saying what was kept and how to continue (`--resume`).

    The CLI prints the message and exits with 130, the shell's code for an end by SIGINT.
    """
