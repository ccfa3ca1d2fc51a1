"""The one exception users see: a one-line message and exit code 2, never a traceback."""


class UserError(Exception):
    """Bad input from the user (a missing folder, an unknown subset, a tampered cache).

    Raised anywhere; `pipeline.cli.main` prints `Error: <message>` on stderr and exits with code 2.
    """

    exit_code = 2
