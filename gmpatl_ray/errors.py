"""The one base class for bad user input (a config, a corpus file, a model path).

The CLI prints these as they are and exits with status 2, so each subclass's message must already name
the file or field and say what is wrong; anything else escaping is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input from the user; the message names where and what."""
