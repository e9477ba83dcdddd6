"""One exception hierarchy for every device.

Drivers translate transport errors (VISA, serial, COM) into these, so that the
engine and GUI can decide on retry / pause / abort without knowing the driver.
"""


class DeviceError(Exception):
    """Base class of all device errors."""

    def __init__(self, message: str, *, device: str = "", operation: str = ""):
        self.device = device
        self.operation = operation
        prefix = ":".join(p for p in (device, operation) if p)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class DeviceTimeout(DeviceError):
    """The device did not answer (or did not finish) in time."""


class CommunicationError(DeviceError):
    """Transport failure or an unparseable / error reply."""


class NotConnected(CommunicationError):
    """An operation was attempted on a closed connection."""


class LimitViolation(DeviceError):
    """A setpoint outside the device's or the setup's safety window.

    Raised *before* anything is sent, so the device state is unchanged.
    """

    def __init__(self, quantity: str, value, allowed: str, *, device: str = ""):
        self.quantity = quantity
        self.value = value
        self.allowed = allowed
        super().__init__(f"{quantity}={value!r} refused, allowed {allowed}", device=device,
                         operation="set")


class InterlockError(DeviceError):
    """A hardware or software interlock forbids the operation."""


class AcquisitionFailed(DeviceError):
    """A frame grab failed or returned an incomplete image."""


class MoveFailed(DeviceError):
    """The stage did not reach its target within tolerance."""
