"""The one exception type for bad user input.

Every check of user input (configs, shapes, files, server answers) raises `InputError` with a
one-line message that names the problem and the fix. The CLI prints it without a traceback;
anything else that escapes is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input from the user: a one-line message naming the problem and the fix."""
