"""Glue between the real VISA drivers and pyvisa-sim (simulation and tests only).

* ``attach_voltage_source`` makes the simulated 34465A answer READ? with live
  values from a Python callable, so the dose chain can be exercised end to end
  through the unchanged driver and the real pyvisa message path.
* ``FaultyResource`` wraps an opened pyvisa resource and raises the genuine
  pyvisa exceptions when a ``FaultInjector`` says so, so the drivers' error
  translation is what gets tested. Pass ``fault_wrapper(...)`` as a driver's
  ``resource_wrapper``.
"""
from __future__ import annotations

from typing import Any, Callable

from pyvisa import constants
from pyvisa.errors import VisaIOError
from pyvisa_sim.component import Property

from devices.sim.faults import FaultInjector

READING_PROPERTY = "reading"     # names in configs/visa/sim_instruments.yaml
OVERRANGE = 1.2                  # the 34465A reads up to 120 % of range, then overloads
OVERLOAD_TEXT = "+9.90000000E+37"


def unwrap(resource: Any) -> Any:
    """The pyvisa resource under any number of wrappers (``.wrapped`` chain)."""
    while "wrapped" in getattr(resource, "__dict__", {}):
        resource = resource.wrapped
    return resource


def sim_device(resource: Any):
    """The pyvisa-sim ``Device`` behind an open resource (TypeError if not simulated)."""
    raw = unwrap(resource)
    sessions = getattr(getattr(raw, "visalib", None), "sessions", None)
    if not isinstance(sessions, dict) or raw.session not in sessions:
        raise TypeError(f"{raw!r} is not an open pyvisa-sim resource")
    return sessions[raw.session].device


class _LiveReading(Property):
    """READ? answer computed at query time: one source() value per sample, as
    many as the simulated meter is set up to take, with its over-range."""

    def __init__(self, device, source: Callable[[], float]):
        super().__init__(READING_PROPERTY, "", {})
        self._device = device
        self._source = source

    def _setting(self, name: str, default: float) -> float:
        prop = self._device._properties.get(name)
        return float(prop.get_value()) if prop is not None else default

    def get_value(self) -> str:
        count = int(self._setting("sample_count", 1) * self._setting("trigger_count", 1))
        limit = OVERRANGE * self._setting("range", float("inf"))
        values = []
        for _ in range(count):
            v = float(self._source())
            values.append(f"{v:+.8E}" if abs(v) <= limit else
                          ("-" if v < 0 else "+") + OVERLOAD_TEXT[1:])
        return ",".join(values)


def attach_voltage_source(dmm_or_resource: Any, source: Callable[[], float]) -> Callable[[], None]:
    """Make READ? on a simulated 34465A return ``source()`` at each reading.

    Takes a connected ``Keysight34465A`` (or its resource). The simulated
    device's READ? property object is swapped, so the driver, pyvisa and any
    ``FaultyResource`` in between all run as usual. Returns a function that
    restores the static reading (pyvisa-sim keeps one device per YAML file for
    the whole process, so a patch would otherwise outlive its test).
    """
    resource = getattr(dmm_or_resource, "resource", dmm_or_resource)
    if resource is None:
        raise TypeError("connect the multimeter before attaching a voltage source")
    device = sim_device(resource)
    if READING_PROPERTY not in device._properties:
        raise TypeError(f"simulated device {device.name!r} has no {READING_PROPERTY!r} property")
    original = device._properties[READING_PROPERTY]
    device._properties[READING_PROPERTY] = _LiveReading(device, source)

    def detach() -> None:
        device._properties[READING_PROPERTY] = original
    return detach


# --------------------------------------------------------------- faults
_STATUS = {
    "timeout": constants.StatusCode.error_timeout,
    "disconnect": constants.StatusCode.error_connection_lost,
    "visa_error": constants.StatusCode.error_io,
    "communication": constants.StatusCode.error_io,
}


class FaultyResource:
    """Proxy of a pyvisa message-based resource with injected VISA failures.

    Operations "write", "query" and "read" are counted per ``device`` by the
    injector. A fault is raised *before* the call reaches the instrument, so a
    retried command finds the instrument in a clean state. "disconnect" is
    sticky: every later call fails too, until the driver reconnects (which
    opens, and wraps, a fresh resource).
    """

    _own = frozenset({"wrapped", "injector", "device", "lost"})

    def __init__(self, resource: Any, injector: FaultInjector, device: str):
        object.__setattr__(self, "wrapped", resource)
        object.__setattr__(self, "injector", injector)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "lost", False)

    def _fault(self, operation: str) -> None:
        if self.lost:
            raise VisaIOError(constants.StatusCode.error_connection_lost)
        kind = self.injector.draw(self.device, operation)
        if kind is None:
            return
        if kind == "disconnect":
            object.__setattr__(self, "lost", True)
        raise VisaIOError(_STATUS.get(kind, constants.StatusCode.error_io))

    def write(self, message: str, *args, **kwargs):
        self._fault("write")
        return self.wrapped.write(message, *args, **kwargs)

    def query(self, message: str, *args, **kwargs) -> str:
        self._fault("query")
        return self.wrapped.query(message, *args, **kwargs)

    def read(self, *args, **kwargs) -> str:
        self._fault("read")
        return self.wrapped.read(*args, **kwargs)

    def close(self) -> None:
        self.wrapped.close()       # never faulted: closing must always be possible

    # everything else (timeout, session, visalib, ...) is the real resource's
    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.wrapped, name, value)


def fault_wrapper(injector: FaultInjector, device: str) -> Callable[[Any], FaultyResource]:
    """A driver ``resource_wrapper`` that routes the resource through ``injector``."""
    return lambda resource: FaultyResource(resource, injector, device)
