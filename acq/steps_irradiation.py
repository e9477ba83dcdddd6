"""Electron irradiation of a section before milling (conductivity).

Two sources (plan ``irradiation.source``): the SEM's own scan (``sem``), or
the setup's external electron source (``external``: a flood gun with a
shutter, as in the seed, ch. 2). Either way the dose is what the specimen
absorbed, not what the source says: the specimen current is read as the
SR570's output voltage on the 34465A in timed blocks, converted with
``preamp.voltage_to_current`` and integrated over the sample timestamps
(Simpson's rule, as the seed did; consecutive blocks share their boundary
sample so nothing is counted twice or lost).

The deposited energy density is seed eq. 2.1, ρ_E = U·q_tot / (A·d):
  U      beam acceleration voltage (V): each electron brings U eV
         (the seed: 3 kV for 200 nm, 5 kV for 500 nm sections);
  q_tot  the integrated specimen current (C);
  A      the irradiated area, d the section thickness.
In eV/cm³: ρ_E = U · (q_tot / e) / (A[cm²] · d[cm]), e = 1.602176634e-19 C
(CODATA 2018, common.constants). The seed's formula has no backscatter or
transmission factor: the measured specimen current already leaves out the
electrons that do not stay. Plans give ρ_E in 1e27 eV/cm³, the unit of the
seed's Table 2.1.

Progress is journaled after every block, so a crash resumes with the charge
already delivered (an overdose of at most one block, never a repeat of the
whole dose), and published as an info incident (cause irradiation_dose,
``context["progress"]`` true) whose context the GUI dose panel plots. The
beam (SEM blanked, or the source closed) is switched off in a ``finally``:
after the dose, a failure, a safety stop, or a signal.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np

from common.constants import E_CHARGE
from acq.device_ops import StepFailed, reconnect
from acq.events import Irradiate
from acq.runner import stop_point
from acq.steps_tile import apply_scan
from devices.errors import CommunicationError, DeviceError, DeviceTimeout, InterlockError, LimitViolation

log = logging.getLogger(__name__)

MAX_BLOCK = 64                     # samples per DMM block: bounds overshoot and journal latency
BLOCK_S = 10.0                     # seconds per block at most: a stop acts (beam off) within one block
IRR_FRAME = 1024
PREAMP_SETTLE_S = 0.05
UM2_TO_CM2 = 1e-8
NM_TO_CM = 1e-7
ENERGY_REL_TOL = 0.01              # an external source's reported energy must match the plan's U within 1 %


def dose_ev_cm3(charge_c: float, u_v: float, area_um2: float, thickness_nm: float) -> float:
    """Seed eq. 2.1: ρ_E = U·q/(A·d) in eV/cm³ (q/e electrons, U eV each)."""
    volume_cm3 = area_um2 * UM2_TO_CM2 * thickness_nm * NM_TO_CM
    return u_v * (charge_c / E_CHARGE) / volume_cm3


def dose_1e27(charge_c: float, eht_v: float, area_um2: float, thickness_nm: float) -> float:
    """ρ_E in 1e27 eV/cm³ for a charge through a section of area A and thickness d."""
    return dose_ev_cm3(charge_c, eht_v, area_um2, thickness_nm) / 1e27


def target_charge(step) -> float:
    """q_tot that gives the step's target dose: eq. 2.1 solved for q."""
    volume_cm3 = step.area_um2 * UM2_TO_CM2 * step.thickness_nm * NM_TO_CM
    return step.target_dose_1e27_ev_cm3 * 1e27 * volume_cm3 * E_CHARGE / (step.eht_kv * 1e3)


def check_external(step, cfg, source: str) -> None:
    """Plan check of ``source: external`` against the setup (ConfigError naming the field)."""
    from devices.setup_config import ConfigError
    if cfg.devices.electron_source is None:
        raise ConfigError(f"{source}: irradiation.source = 'external': the setup {cfg.source} has no "
                          "devices.electron_source; add one, or use source: sem")
    win = cfg.safety.electron_source
    if step.max_duration_s > win.max_exposure_s:
        raise ConfigError(f"{source}: irradiation.max_duration_s = {step.max_duration_s:g}: longer than the "
                          f"setup's safety.electron_source.max_exposure_s; allowed at most {win.max_exposure_s:g} s")
    if step.emission_current_na is not None and step.emission_current_na > win.max_current_na:
        raise ConfigError(f"{source}: irradiation.emission_current_na = {step.emission_current_na:g}: above the "
                          f"setup's safety.electron_source.max_current_na; allowed at most {win.max_current_na:g} nA")


def _prepare(setup, step) -> None:
    setup.current_preamp.set_sensitivity(step.preamp_sensitivity_a_per_v)
    # The SR570 is listen-only: nothing confirms the new gain. Give the line
    # and the gain relays real time (not simulated time: the instrument, or
    # its emulator thread, runs on the wall clock) before any reading counts.
    time.sleep(PREAMP_SETTLE_S)
    setup.multimeter.configure_dc_voltage(step.dmm_range_v, step.dmm_nplc)


# ------------------------------------------------------------------ the two beams
class _SemBeam:
    """The SEM scans the irradiated area at the step's EHT and probe current."""
    expected_a_per_na = 0.5                          # first guess of the absorbed share (block length only)

    def __init__(self, ctx, step):
        self.ctx, self.step, self.sem = ctx, step, ctx.setup.sem

    def prepare(self) -> None:
        step = self.step
        self.sem.set_eht(step.eht_kv * 1e3)                 # guarded: safety window
        self.sem.set_probe_current(step.probe_current_na * 1e-9)
        # the scanned field is the irradiated area A (square, 1024 lines)
        apply_scan(self.ctx, math.sqrt(step.area_um2) * 1e-6 / IRR_FRAME, (IRR_FRAME, IRR_FRAME), 100e-9, 0.0)

    def first_current_a(self) -> float:
        return self.step.probe_current_na * 1e-9 * self.expected_a_per_na

    def on(self) -> None:
        self.sem.set_blanked(False)
        self.sem.unfreeze()         # a driver that freezes between frames (SmartSEM) scans only now

    def check(self, amps: np.ndarray, open_s: float) -> bool:
        return True

    def exposure_left_s(self, open_s: float) -> float:
        return math.inf

    def off(self) -> None:
        ctx = self.ctx
        try:
            self.sem.set_blanked(True)
        finally:
            self.sem.freeze()       # tried even when blanking failed: no live scan left behind
        self.sem.set_eht(ctx.plan.imaging.eht_kv * 1e3)
        self.sem.set_probe_current(ctx.plan.imaging.probe_current_na * 1e-9)
        ctx.invalidate_scan()


class _ExternalBeam:
    """The setup's electron source: opened for the dose, closed on every way out.
    The SEM stays blanked, so the measured current is the source's alone."""

    def __init__(self, ctx, step):
        self.ctx, self.step = ctx, step
        self.src = ctx.setup.electron_source
        if self.src is None:             # the plan check refuses this; a setup changed under a resume might not
            raise InterlockError("irradiation.source = 'external' but the setup has no electron_source",
                                 device="electron_source", operation="irradiate")
        self.win = ctx.setup.config.safety.electron_source

    def prepare(self) -> None:
        step, src = self.step, self.src
        self.ctx.setup.sem.set_blanked(True)
        src.beam_off()                   # a known state before anything else
        u = step.eht_kv * 1e3
        if src.energy_setpoint:
            src.set_energy(u)
        if step.emission_current_na is not None:
            if not src.emission_setpoint:
                raise LimitViolation("irradiation.emission_current_na", step.emission_current_na,
                                     "none: this electron source has no emission setpoint (set it on the "
                                     "source and leave the field out)", device="electron_source")
            src.set_emission_current(step.emission_current_na * 1e-9)
        st = src.source_status()
        # U enters the dose directly: a source running at another energy would give a wrong dose
        if st.energy is not None and not math.isclose(st.energy, u, rel_tol=ENERGY_REL_TOL):
            raise LimitViolation("electron source energy", st.energy,
                                 f"the plan's irradiation.eht_kv = {step.eht_kv:g} kV (±{ENERGY_REL_TOL:.0%})",
                                 device="electron_source")

    def first_current_a(self) -> float:
        na = self.step.emission_current_na
        return (na if na is not None else self.win.max_current_na) * 1e-9 * 0.5

    def on(self) -> None:
        self.src.set_beam(True)
        if not self.src.beam_on():
            raise InterlockError("the electron source did not open", device="electron_source", operation="open")

    def exposure_left_s(self, open_s: float) -> float:
        return max(0.0, self.win.max_exposure_s - open_s)

    def check(self, amps: np.ndarray, open_s: float) -> bool:
        """Safety windows after each block; False: stop now (exposure window used up)."""
        if not self.src.beam_on():       # tripped or closed by hand: the current read was not all the source's
            raise InterlockError("the electron source closed during the irradiation", device="electron_source",
                                 operation="irradiate")
        peak = float(np.max(np.abs(amps))) if len(amps) else 0.0
        if peak > self.win.max_current_na * 1e-9:
            raise LimitViolation("electron source specimen current", peak,
                                 f"at most {self.win.max_current_na:g} nA (safety.electron_source.max_current_na)",
                                 device="electron_source")
        return open_s < self.win.max_exposure_s

    def off(self) -> None:
        self.src.beam_off()
        if self.src.beam_on():
            raise InterlockError("the electron source does not close", device="electron_source", operation="close")


def irradiate(ctx, ev: Irradiate) -> dict:
    setup, step = ctx.setup, ev.step
    beam = _ExternalBeam(ctx, step) if step.source == "external" else _SemBeam(ctx, step)
    prog = ctx.journal.state.irradiation_progress.get(ev.key, {})
    charge, seconds = float(prog.get("charge_c", 0.0)), float(prog.get("seconds", 0.0))
    if charge:
        ctx.incident("info", "irradiation_resumed",
                     f"section {ev.section}: irradiation continues from {charge:.4g} C after {seconds:.0f} s "
                     "(journaled progress)", {"section": ev.section})
    u = step.eht_kv * 1e3
    try:
        beam.prepare()
        _prepare(setup, step)
        if charge < target_charge(step):        # (a resume may find the dose complete: never open for nothing)
            beam.on()
            charge, seconds = _integrate(ctx, ev, beam, charge, seconds)
    except BaseException as err:
        try:
            beam.off()
        except Exception as e:           # the original error is the one to report; this one must be seen too
            log.error("irradiation: beam off failed after %s: %s", err, e)
            ctx.incident("error", "safing_unconfirmed",
                         f"section {ev.section}: could not confirm the {step.source} beam is off: {e}",
                         {"section": ev.section, "source": step.source})
        raise
    beam.off()
    dose = dose_1e27(charge, u, step.area_um2, step.thickness_nm)
    reached = charge >= target_charge(step)
    result = {"section": ev.section, "dose_1e27_ev_cm3": dose, "charge_c": charge, "seconds": seconds,
              "eht_v": u, "area_um2": step.area_um2, "thickness_nm": step.thickness_nm, "reached": reached,
              "target_1e27_ev_cm3": step.target_dose_1e27_ev_cm3, "source": step.source}
    if reached:
        ctx.incident("info", "irradiation_dose",
                     f"section {ev.section}: irradiated to {dose:.3f}e27 eV/cm³ ({charge:.4g} C at {u / 1e3:g} kV "
                     f"in {seconds:.0f} s, {step.source} source)", result)
    else:
        ctx.incident("warning", "irradiation_short",
                     f"section {ev.section}: irradiation stopped (max_duration_s = {step.max_duration_s:g} or the "
                     f"source's exposure window) at {dose:.3f}e27 eV/cm³ of {step.target_dose_1e27_ev_cm3:g}e27; "
                     "mill rate will be higher than planned", result)
    ctx.journal.append("irr_done", key=ev.key, **result)
    return result


def _integrate(ctx, ev: Irradiate, beam, charge: float, seconds: float) -> tuple[float, float]:
    """Read DMM blocks and integrate until the target charge, max_duration_s,
    or the beam's safety window; journal and publish progress after each block."""
    from scipy.integrate import simpson      # imported here: a second of start-up only runs that irradiate pay
    setup, step = ctx.setup, ev.step
    dmm, preamp, clock = setup.multimeter, setup.current_preamp, ctx.clock
    goal, interval, tries = target_charge(step), step.sample_interval_s, ctx.plan.retries.irradiation
    u = step.eht_kv * 1e3
    last_t = last_i = None
    current_est = max(beam.first_current_a(), 1e-15)
    failures = 0
    open_s = 0.0                                   # since this opening: the exposure window
    while charge < goal and seconds < step.max_duration_s:
        left_s = step.max_duration_s - seconds
        need = (goal - charge) / current_est
        n = int(min(MAX_BLOCK, max(2, math.ceil(min(need, left_s) / interval) + 1)))
        # never past the duration or the source's exposure window, and short enough for a stop to act soon
        room_s = min(left_s, beam.exposure_left_s(open_s), BLOCK_S)
        n = max(1 if last_t is not None else 2, min(n, int(room_s // interval)))
        t0 = clock.now()
        try:
            times, volts = dmm.read_block(n, interval)
        except LimitViolation:
            raise
        except DeviceError as e:            # a glitch: reconnect, set up again, keep the charge so far
            failures += 1
            if failures >= tries:
                raise StepFailed(f"irradiation of section {ev.section}", e, tries) from e
            ctx.incident("warning", "retry", f"irradiation read failed ({e}); retrying with the beam off",
                         {"section": ev.section})
            beam.off()                      # no unmeasured dose while the meter is being set up again
            gap = clock.now() - t0          # the block's time with the beam on counts against the limits
            seconds += gap
            open_s += gap
            if isinstance(e, CommunicationError) and not isinstance(e, DeviceTimeout):
                reconnect(setup, "multimeter")
            _prepare(setup, step)
            last_t = last_i = None          # the block is not integrated: its charge is not counted
            beam.on()
            continue
        failures = 0
        span = float(times[-1]) + interval if len(times) else interval
        lag = span - (clock.now() - t0)
        if lag > 0:                          # simulated instruments answer at once: let the dose time pass
            clock.sleep(lag)
        t = t0 + np.asarray(times, float)
        amps = np.asarray(preamp.voltage_to_current(np.asarray(volts, float)), float)
        open_s += span
        if last_t is not None:
            t, amps = np.concatenate(([last_t], t)), np.concatenate(([last_i], amps))
        if len(t) >= 2:
            charge += float(simpson(amps, x=t))
        seconds += span
        last_t, last_i = float(t[-1]), float(amps[-1])
        current_est = max(float(np.mean(amps)), 1e-15)
        ctx.journal.append("irr_progress", key=ev.key, charge_c=charge, seconds=seconds)
        dose = dose_1e27(charge, u, step.area_um2, step.thickness_nm)
        ctx.incident("info", "irradiation_dose",
                     f"section {ev.section}: {dose:.3f}e27 of {step.target_dose_1e27_ev_cm3:g}e27 eV/cm³ "
                     f"after {seconds:.0f} s", progress_context(ev.section, dose, step, seconds, charge))
        # the safety windows only now: a block that breaks one is counted and journaled first
        keep_open = beam.check(amps, open_s)
        stop_point(ctx)                     # a signal: beam off now (caller); resume continues the dose
        if not keep_open:
            break
    return charge, seconds


def progress_context(section: int, dose: float, step, seconds: float, charge: float) -> dict:
    """What a progress incident carries (the GUI dose panel plots it)."""
    return {"progress": True, "section": section, "dose_1e27_ev_cm3": dose, "seconds": seconds, "charge_c": charge,
            "target_1e27_ev_cm3": step.target_dose_1e27_ev_cm3, "source": step.source}
