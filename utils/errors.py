"""User-facing errors: one line, exit status 2, no traceback."""
import functools
import sys


class UserError(Exception):
    """Bad input that the user can fix; the message names the problem and the fix."""


def exit_on_user_error(main):
    """Decorator for command-line entry points: a UserError becomes one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
