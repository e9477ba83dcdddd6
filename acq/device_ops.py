"""Per-operation retries and reconnection, shared by the steps.

A retried operation must be safe to repeat (a frame grab, a verified stage
move, a setpoint). Limit violations and interlocks are never retried: they
are decisions, not glitches.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, TypeVar

from common.roles import ROLES
from devices.errors import CommunicationError, DeviceError, DeviceTimeout, InterlockError, LimitViolation
from devices.interfaces import BeamOff

log = logging.getLogger(__name__)
T = TypeVar("T")


class StepFailed(DeviceError):
    """An operation failed on every try."""

    def __init__(self, what: str, cause: Exception, tries: int):
        self.cause = cause
        self.tries = tries
        super().__init__(f"{what} failed after {tries} tr{'y' if tries == 1 else 'ies'}: {cause}",
                         device=getattr(cause, "device", ""), operation=what)


RECONNECT_TRIES = 3
RECONNECT_BACKOFF_S = 1.0


def reconnect(setup, role: Optional[str], tries: int = RECONNECT_TRIES) -> bool:
    """Close and reopen the device playing ``role`` (a sticky disconnect only
    clears this way), up to ``tries`` times with a back-off on the setup clock
    (a reconnect can glitch as well). Returns whether it is connected again."""
    dev = getattr(setup, role, None) if role else None
    if dev is None:
        return False
    for attempt in range(1, tries + 1):
        try:
            dev.close()
        except Exception as e:              # the old session may be dead already
            log.info("closing %s before reconnect: %s", role, e)
        try:
            dev.connect()
            return True
        except DeviceError as e:
            log.warning("reconnecting %s failed (try %d/%d): %s", role, attempt, tries, e)
            if attempt < tries:
                setup.clock.sleep(RECONNECT_BACKOFF_S * attempt)
    return False


def role_of(err: Exception, default: Optional[str] = None) -> Optional[str]:
    dev = getattr(err, "device", "")
    return dev if dev in ROLES else default


def with_retries(ctx, what: str, tries: int, fn: Callable[[], T], *, role: Optional[str] = None,
                 reconnect_on_error: bool = True, on_retry: Optional[Callable[[], None]] = None) -> T:
    """Call ``fn`` up to ``tries`` times. Between tries: a warning Incident,
    a reconnect of the failing device after a communication error, and a
    back-off on the setup clock."""
    last: Optional[Exception] = None
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except (LimitViolation, InterlockError, BeamOff):      # no retry scans anything: pause at once
            raise
        except DeviceError as e:
            last = e
            if attempt == tries:
                break
            ctx.incident("warning", "retry", f"{what}: try {attempt}/{tries} failed ({e}); retrying",
                         {"operation": what, "error": type(e).__name__, "attempt": attempt})
            r = role_of(e, role)
            if reconnect_on_error and isinstance(e, CommunicationError) and not isinstance(e, DeviceTimeout):
                if reconnect(ctx.setup, r):
                    ctx.devices_reconnected(r)
            ctx.clock.sleep(ctx.plan.retries.backoff_s)
            if on_retry is not None:
                on_retry()
    raise StepFailed(what, last, tries)
