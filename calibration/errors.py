"""The one exception type fair-edge raises for bad input.

Every layer raises `FairEdgeError` (or a subclass) with a one-line message that says what is
wrong and what to do; the CLI prints that line instead of a traceback.
"""


class FairEdgeError(Exception):
    """Bad input or an unmet precondition, explained in one line."""


class CalibrationError(FairEdgeError):
    """Calibration data that cannot be scored or sampled as asked."""
