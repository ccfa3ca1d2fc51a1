"""The one exception users see: a one-line message and exit code 2, never a traceback."""

import click


class UserError(click.ClickException):
    """Bad input from the user (a missing folder, an unknown subset, a tampered cache).

    Subclassing ClickException lets typer print `Error: <message>` and exit with code 2
    wherever the error is raised, with no try/except in every command.
    """

    exit_code = 2
