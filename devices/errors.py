"""Errors raised by the devices layer: one line that says what is wrong and what to do."""

from calibration.errors import FairEdgeError


class DeviceError(FairEdgeError):
    """A profile, runner, board connection or report that cannot do what was asked."""


class ProfileError(DeviceError):
    """A device profile file with a missing, unknown or ill-typed field."""
