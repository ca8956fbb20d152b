"""The one exception type for user mistakes (conventions: one-line message, CLI exit 2)."""


class MaskrtError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported option.

    The message is one line that names the problem and, where it helps, the fix.
    The CLI prints it on stderr as ``maskrt: error: <message>`` and exits with status 2.
    """
