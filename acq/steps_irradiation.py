"""Electron irradiation of a section before milling (conductivity).

The specimen current is read as the SR570's output voltage on the 34465A in
timed blocks, converted with ``preamp.voltage_to_current`` and integrated
over the sample timestamps (Simpson's rule; consecutive blocks share their
boundary sample so nothing is counted twice or lost). The deposited energy
density is ρ_E = U·q / (A·d) (seed eq. 2.1) with U the EHT, A the irradiated
area and d the section thickness. Progress is journaled after every block, so
a crash resumes with the charge already delivered (an overdose of at most one
block, never a repeat of the whole dose).
"""
from __future__ import annotations

import math
import time

import numpy as np

from common.constants import E_CHARGE
from acq.device_ops import StepFailed, reconnect
from acq.events import Irradiate
from acq.runner import stop_point
from acq.steps_tile import apply_scan
from devices.errors import CommunicationError, DeviceError, DeviceTimeout, LimitViolation

MAX_BLOCK = 64                     # samples per DMM block: bounds overshoot and journal latency
IRR_FRAME = 1024
PREAMP_SETTLE_S = 0.05


def dose_1e27(charge_c: float, eht_v: float, area_um2: float, thickness_nm: float) -> float:
    """ρ_E in 1e27 eV/cm³ for a charge through a section of area A and thickness d."""
    volume_cm3 = area_um2 * 1e-8 * thickness_nm * 1e-7
    return eht_v * charge_c / E_CHARGE / volume_cm3 / 1e27


def target_charge(step) -> float:
    volume_cm3 = step.area_um2 * 1e-8 * step.thickness_nm * 1e-7
    return step.target_dose_1e27_ev_cm3 * 1e27 * volume_cm3 * E_CHARGE / (step.eht_kv * 1e3)


def _prepare(setup, step) -> None:
    setup.current_preamp.set_sensitivity(step.preamp_sensitivity_a_per_v)
    # The SR570 is listen-only: nothing confirms the new gain. Give the line
    # and the gain relays real time (not simulated time: the instrument, or
    # its emulator thread, runs on the wall clock) before any reading counts.
    time.sleep(PREAMP_SETTLE_S)
    setup.multimeter.configure_dc_voltage(step.dmm_range_v, step.dmm_nplc)


def irradiate(ctx, ev: Irradiate) -> dict:
    from scipy.integrate import simpson      # imported here: a second of start-up only runs that irradiate pay
    setup, step = ctx.setup, ev.step
    sem, dmm, preamp, clock = setup.sem, setup.multimeter, setup.current_preamp, ctx.clock
    prog = ctx.journal.state.irradiation_progress.get(ev.key, {})
    charge, seconds = float(prog.get("charge_c", 0.0)), float(prog.get("seconds", 0.0))
    if charge:
        ctx.incident("info", "irradiation_resumed",
                     f"section {ev.section}: irradiation continues from {charge:.4g} C after {seconds:.0f} s "
                     "(journaled progress)", {"section": ev.section})
    goal = target_charge(step)
    u = step.eht_kv * 1e3
    interval = step.sample_interval_s
    tries = ctx.plan.retries.irradiation
    sem.set_eht(u)                                   # guarded: safety window
    sem.set_probe_current(step.probe_current_na * 1e-9)
    # the scanned field is the irradiated area A (square, 1024 lines)
    apply_scan(ctx, math.sqrt(step.area_um2) * 1e-6 / IRR_FRAME, (IRR_FRAME, IRR_FRAME), 100e-9, 0.0)
    _prepare(setup, step)
    last_t = last_i = None
    current_est = max(step.probe_current_na * 1e-9 * 0.5, 1e-15)
    failures = 0
    sem.set_blanked(False)
    try:
        while charge < goal and seconds < step.max_duration_s:
            left_s = step.max_duration_s - seconds
            need = (goal - charge) / current_est
            n = int(min(MAX_BLOCK, max(2, math.ceil(min(need, left_s) / interval) + 1)))
            t0 = clock.now()
            try:
                times, volts = dmm.read_block(n, interval)
            except LimitViolation:
                raise
            except DeviceError as e:            # a glitch: reconnect, set up again, keep the charge so far
                failures += 1
                if failures >= tries:
                    raise StepFailed(f"irradiation of section {ev.section}", e, tries) from e
                ctx.incident("warning", "retry", f"irradiation read failed ({e}); retrying",
                             {"section": ev.section})
                if isinstance(e, CommunicationError) and not isinstance(e, DeviceTimeout):
                    reconnect(setup, "multimeter")
                _prepare(setup, step)
                last_t = last_i = None          # the gap is not integrated: under-count, never over-count
                continue
            failures = 0
            span = float(times[-1]) + interval if len(times) else interval
            lag = span - (clock.now() - t0)
            if lag > 0:                          # simulated instruments answer at once: let the dose time pass
                clock.sleep(lag)
            t = t0 + np.asarray(times, float)
            amps = np.asarray(preamp.voltage_to_current(np.asarray(volts, float)), float)
            if last_t is not None:
                t, amps = np.concatenate(([last_t], t)), np.concatenate(([last_i], amps))
            if len(t) >= 2:
                charge += float(simpson(amps, x=t))
            seconds += span
            last_t, last_i = float(t[-1]), float(amps[-1])
            current_est = max(float(np.mean(amps)), 1e-15)
            ctx.journal.append("irr_progress", key=ev.key, charge_c=charge, seconds=seconds)
            stop_point(ctx)                     # a signal: blank now (finally); resume continues the dose
    finally:
        sem.set_blanked(True)
        sem.set_eht(ctx.plan.imaging.eht_kv * 1e3)
        sem.set_probe_current(ctx.plan.imaging.probe_current_na * 1e-9)
        ctx.invalidate_scan()
    dose = dose_1e27(charge, u, step.area_um2, step.thickness_nm)
    reached = charge >= goal
    result = {"section": ev.section, "dose_1e27_ev_cm3": dose, "charge_c": charge, "seconds": seconds,
              "eht_v": u, "area_um2": step.area_um2, "thickness_nm": step.thickness_nm, "reached": reached,
              "target_1e27_ev_cm3": step.target_dose_1e27_ev_cm3}
    if reached:
        ctx.incident("info", "irradiation_dose",
                     f"section {ev.section}: irradiated to {dose:.3f}e27 eV/cm³ ({charge:.4g} C at {u / 1e3:g} kV "
                     f"in {seconds:.0f} s)", result)
    else:
        ctx.incident("warning", "irradiation_short",
                     f"section {ev.section}: max_duration_s = {step.max_duration_s:g} reached at {dose:.3f}e27 "
                     f"eV/cm³ of {step.target_dose_1e27_ev_cm3:g}e27; mill rate will be higher than planned", result)
    ctx.journal.append("irr_done", key=ev.key, **result)
    return result
