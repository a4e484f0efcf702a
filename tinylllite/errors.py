"""How every command reports a user's mistake: one line that names the file, flag or key and says what to do.

diffusers' philosophy: "raising concise error messages is preferred to silently correct erroneous
input". Library functions raise `InputError` (or the built-in errors below) with a full sentence; a
command's `main` is run through `run_command`, which prints that sentence after the command's name and
exits with status 1, so no refused input ends in a traceback or in exit 0.
"""
import sys


class InputError(ValueError):
    """A file, folder, flag or value given by the user cannot be used; the message says which and what to do."""


# what a command turns into one line: refused input and files that are missing, present or unreadable
USER_ERRORS = (InputError, ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def run_command(prog: str, main, argv=None) -> int:
    """Run `main(argv)`; a user error becomes `prog: message` on stderr and exit status 1."""
    try:
        result = main(argv)
    except USER_ERRORS as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0
