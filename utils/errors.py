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
            print(f"error: {one_line(err)}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def one_line(err):
    """The message of a UserError; one raised in a DataLoader worker comes back with the
    worker's traceback folded into the message, whose last line is the original one."""
    lines = str(err).strip().splitlines()
    if len(lines) > 1 and "UserError: " in lines[-1]:
        return lines[-1].split("UserError: ", 1)[1]
    return " ".join(lines)
