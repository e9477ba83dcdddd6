"""The operator's session: which setup file, the connected Setup, device
read-backs and setpoints (through the safety guard), messages for the status
bar. Panels talk to devices only through here, so every setpoint is checked
the same way and every refusal is shown the same way."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from PyQt5.QtCore import QObject, QTimer, pyqtSignal

from devices.errors import DeviceError, InterlockError, LimitViolation
from gui.workers import TaskRunner

log = logging.getLogger(__name__)
ROLE_LABELS = {"sem": "SEM", "stage": "Stage", "ion_gun": "Ion gun", "waveform_generator": "Raster (AWG)",
               "multimeter": "DMM", "current_preamp": "Current preamp", "electron_source": "Electron source"}


def describe_error(e: BaseException) -> str:
    if isinstance(e, LimitViolation):
        return f"refused: {e.quantity} = {e.value!r} is outside the safety window {e.allowed}"
    if isinstance(e, InterlockError):
        return f"refused by interlock: {e}"
    return f"{type(e).__name__}: {e}"


def _read_sem(sem) -> dict:
    w, h = sem.frame_size()
    return {"eht_v": sem.eht(), "probe_current_a": sem.probe_current(), "wd_m": sem.working_distance(),
            "stig": tuple(sem.stig()), "pixel_size_m": sem.pixel_size(), "dwell_s": sem.dwell_time(),
            "frame_size": (w, h), "blanked": sem.blanked(), "scan_rotation_rad": sem.scan_rotation()}


def _read_stage(stage) -> dict:
    return {"position": stage.position()}


def _read_ion_gun(gun) -> dict:
    return {"status": gun.gun_status()}


def _read_awg(awg) -> dict:
    # the raster last configured (read back and verified then); a full read-back
    # is a dozen queries and fails on an unconfigured instrument
    return {"raster": getattr(awg, "last_raster", None), "outputs_on": awg.outputs_on()}


def _read_dmm(dmm) -> dict:
    return {"volts": dmm.read_voltage()}


def _read_preamp(preamp) -> dict:
    st = preamp.status()
    try:
        sens = preamp.sensitivity()
    except DeviceError:
        sens = None
    return {"sensitivity": sens, "detail": st.detail}


def _read_electron_source(src) -> dict:
    st = src.source_status()
    return {"beam_on": st.beam_on, "emission_a": st.emission_current, "energy_v": st.energy}


READERS: dict[str, Callable[[Any], dict]] = {
    "sem": _read_sem, "stage": _read_stage, "ion_gun": _read_ion_gun, "waveform_generator": _read_awg,
    "multimeter": _read_dmm, "current_preamp": _read_preamp, "electron_source": _read_electron_source}


class Session(QObject):
    setup_changed = pyqtSignal(object)          # Setup or None
    state = pyqtSignal(str, dict)               # role, read-back
    device_status = pyqtSignal(str, bool, str)  # role, healthy, detail
    refused = pyqtSignal(str, str)              # role, why (a setpoint that was not sent)
    message = pyqtSignal(str, str)              # text, level: info | warning | error
    run_active_changed = pyqtSignal(bool)

    POLL_MS = 1000
    RUN_POLL_MS = 2000
    RUN_ROLES = ("sem", "stage", "ion_gun")

    def __init__(self, config_path: str | Path, parent: Optional[QObject] = None):
        super().__init__(parent)
        self.config_path = Path(config_path)
        self.cfg = None
        self.setup = None
        self.runner = TaskRunner(self)
        self.runner.failed.connect(self._task_failed)
        self.run_active = False
        self.disconnected_roles: set[str] = set()
        self.last: dict[str, dict] = {}            # latest read-back per role
        self._poll = QTimer(self)
        self._poll.setInterval(self.POLL_MS)
        self._poll.timeout.connect(self.poll)

    def _task_failed(self, name: str, e: Exception) -> None:
        self.message.emit(f"{name}: {describe_error(e)}", "error")

    # ------------------------------------------------------------ life cycle
    def load_config(self):
        from devices.setup_config import load_setup
        self.cfg = load_setup(self.config_path)
        return self.cfg

    def open_setup(self, on_done: Optional[Callable[[bool], None]] = None) -> None:
        """Load the setup file and connect every device (in a worker: seconds)."""
        from devices.factory import build_setup

        if self.setup is not None:
            self.close_setup()
        try:
            cfg = self.load_config()
        except Exception as e:
            self.message.emit(str(e), "error")
            if on_done:
                on_done(False)
            return
        self.message.emit(f"connecting {cfg.name} ...", "info")

        def ok(setup):
            self.setup = setup
            self.disconnected_roles.clear()
            self.setup_changed.emit(setup)
            self.message.emit(f"connected: {cfg.name} ({', '.join(setup.devices())})", "info")
            self._poll.start()
            self.poll()
            if on_done:
                on_done(True)

        def bad(e):
            self.message.emit(f"could not connect {self.config_path}: {describe_error(e)}", "error")
            if on_done:
                on_done(False)

        self.runner.submit("connect setup", build_setup, cfg, on_result=ok, on_error=bad)

    def close_setup(self) -> None:
        """Disconnect everything (ion beam blanked first: Setup.close)."""
        setup, self.setup = self.setup, None
        self._poll.stop()
        if setup is None:
            return
        self.setup_changed.emit(None)
        self.runner.wait_for_lanes(3000)         # let queued device calls finish before closing
        setup.close()
        self.message.emit("setup disconnected", "info")

    def set_run_active(self, active: bool) -> None:
        """While a run owns the microscope, read back less (every RUN_POLL_MS, the
        devices an operator watches): every read is Python work competing with
        the engine's threads for the interpreter."""
        self.run_active = active
        if self._poll.isActive():
            self._poll.setInterval(self.RUN_POLL_MS if active else self.POLL_MS)
        self.run_active_changed.emit(active)

    @property
    def guard(self):
        return self.setup.guard if self.setup is not None else None

    def device(self, role: str):
        return None if self.setup is None else getattr(self.setup, role, None)

    # ------------------------------------------------------------ per device
    def connect_device(self, role: str, connect: bool) -> None:
        dev = self.device(role)
        if dev is None:
            return

        def act():
            dev.connect() if connect else dev.close()
            return dev.status()

        def done(st):
            (self.disconnected_roles.discard if connect else self.disconnected_roles.add)(role)
            self.device_status.emit(role, bool(st.healthy) and connect, st.detail if connect else "disconnected")
            self.message.emit(f"{ROLE_LABELS.get(role, role)} {'connected' if connect else 'disconnected'}", "info")

        self.runner.submit(f"{'connect' if connect else 'disconnect'} {role}", act, lane=role, on_result=done)

    def poll(self, roles=None) -> None:
        """Read back the state of each connected device (skipped while a read
        of that device is still under way, so a slow device never piles up)."""
        if self.setup is None:
            return
        if roles is None and self.run_active:
            roles = self.RUN_ROLES
        for role, dev in self.setup.devices().items():
            if roles is not None and role not in roles:
                continue
            if role in self.disconnected_roles or self.runner.pending(f"read {role}"):
                continue
            reader = READERS.get(role)
            if reader is None:
                continue

            def read(dev=dev, reader=reader):
                st = dev.status()
                return reader(dev), st

            def got(res, role=role):
                values, st = res
                self.last[role] = values
                self.state.emit(role, values)
                self.device_status.emit(role, bool(st.healthy), st.detail)

            def failed(e, role=role):
                self.device_status.emit(role, False, describe_error(e))

            self.runner.submit(f"read {role}", read, lane=role, on_result=got, on_error=failed)

    def apply(self, role: str, label: str, fn: Callable, *args, precheck: Optional[Callable[[], None]] = None,
              on_done: Optional[Callable[[Any], None]] = None) -> bool:
        """Send one setpoint or command. ``precheck`` runs the safety-window
        check here, at once, so a refused value is reported before anything is
        queued (the guarded proxy checks again in the worker). Returns False
        when refused before sending."""
        if self.setup is None:
            self.refused.emit(role, f"{label}: no setup connected")
            return False
        if precheck is not None:
            try:
                precheck()
            except (LimitViolation, InterlockError, ValueError) as e:
                self._refuse(role, label, e)
                return False

        def done(res):
            self.message.emit(f"{label}: done", "info")
            if on_done:
                on_done(res)
            self.poll([role])

        def failed(e):
            if isinstance(e, (LimitViolation, InterlockError)):
                self._refuse(role, label, e)
            else:
                self.message.emit(f"{label}: {describe_error(e)}", "error")
                self.refused.emit(role, f"{label} failed: {describe_error(e)}")
            self.poll([role])

        self.runner.submit(label, fn, *args, lane=role, on_result=done, on_error=failed)
        return True

    def _refuse(self, role: str, label: str, e: BaseException) -> None:
        text = f"{label}: {describe_error(e) if isinstance(e, DeviceError) else e}"
        self.refused.emit(role, text)
        self.message.emit(text, "warning")

