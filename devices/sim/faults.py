"""Fault injection for the simulated setup (reliability tests).

Rules come from the setup file (``simulation.faults``): per device and
operation, a failure probability and/or scheduled 1-based call numbers.
"""
from __future__ import annotations

import random
import threading
from collections import Counter

from devices import errors
from devices.command_table import REQUIRED_OPERATIONS
from devices.interfaces import SEM, Stage

# The operations each simulated device counts and can fail, by role. Taken from
# the code that asks the injector (interface methods, the ion-gun command
# table, the VISA calls FaultyResource wraps), so a rule naming anything else
# can never fire: the setup file refuses it (setup_config.FaultRule) and
# ``draw`` refuses a call site that drifts from this table.
VISA_OPERATIONS = ("write", "query", "read")            # devices.sim.visa_link.FaultyResource
SEM_FRAME = SEM.acquire_frame.__name__                   # devices.sim.sem.SimSEM
STAGE_MOVE = Stage.move_to.__name__                      # devices.sim.stage.SimStage
FAULT_OPERATIONS: dict[str, tuple[str, ...]] = {
    "sem": (SEM_FRAME,),
    "stage": (STAGE_MOVE,),
    "ion_gun": tuple(REQUIRED_OPERATIONS),               # the emulator counts each command-table operation
    "waveform_generator": VISA_OPERATIONS,
    "multimeter": VISA_OPERATIONS,
    "current_preamp": (),                                # the SR570 emulator injects nothing
}

EXCEPTIONS = {
    "timeout": errors.DeviceTimeout,
    "grab_failure": errors.AcquisitionFailed,
    "move_failure": errors.MoveFailed,
    "disconnect": errors.CommunicationError,
    "visa_error": errors.CommunicationError,
    "communication": errors.CommunicationError,
}


class FaultInjector:
    def __init__(self, rules=(), seed: int = 0):
        self.rules = list(rules)
        self._rng = random.Random(seed)
        self._calls: Counter = Counter()
        self._lock = threading.Lock()
        self.injected: list[tuple[str, str, str, int]] = []   # (device, op, kind, call no.)

    def add(self, rule) -> None:
        self.rules.append(rule)

    def draw(self, device: str, operation: str) -> str | None:
        """Count this call; return the fault kind to inject, or None."""
        known = FAULT_OPERATIONS.get(device)
        if known is not None and operation not in known:
            raise ValueError(f"fault point {device}.{operation} is missing from FAULT_OPERATIONS[{device!r}]")
        with self._lock:
            self._calls[(device, operation)] += 1
            n = self._calls[(device, operation)]
            for r in self.rules:
                if r.device != device or r.operation not in (operation, "*"):
                    continue
                if n in r.at_calls or (r.probability and self._rng.random() < r.probability):
                    self.injected.append((device, operation, r.kind, n))
                    return r.kind
        return None

    def check(self, device: str, operation: str) -> str | None:
        """Raise the mapped device error if a fault is due; kinds that corrupt
        data instead of failing (incomplete_frame, frozen_frame) are returned."""
        kind = self.draw(device, operation)
        if kind in EXCEPTIONS:
            raise EXCEPTIONS[kind](f"injected fault ({kind})", device=device, operation=operation)
        return kind


NO_FAULTS = FaultInjector()
