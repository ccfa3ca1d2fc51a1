"""The one exception users see: a one-line message and exit code 2, never a traceback."""


class UserError(Exception):
    """Bad input from the user (a missing folder, an unknown subset, a tampered cache).

    Raised anywhere; `pipeline.cli.main` prints `Error: <message>` on stderr and exits with code 2.
    """

    exit_code = 2


def first_line(e: BaseException, lines: int = 1) -> str:
    """The first `lines` lines of an exception's message, joined (its type's name when it has none):
    what a one-line error quotes of a library's exception."""
    return " ".join(str(e).strip().splitlines()[:lines]).strip() or type(e).__name__
