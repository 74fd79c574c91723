"""The one exception type that reaches the user as a clean, one-line error."""


class PipeError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``error: <message>`` on stderr and exits with status 2, without a
    traceback. The message names the file or option at fault and says what to do.
    """


class PipeValueError(PipeError, ValueError):
    """A bad value passed to the library (features, labels, a parameter): one clean line on the
    command line like any :class:`PipeError`, and a ``ValueError`` for Python callers, as
    scikit-learn's estimator contract requires."""
