"""The GCIB mill step (seed ch. 2): stage to the mill position at the
glancing angle, sawtooth raster from the waveform generator (X 100 Hz, Y 1 Hz),
the duration split over azimuths 360°/n apart with a delay (beam blanked)
before each rotation.

Safety: the SEM beam is blanked first; the stage goes to the mill position
and back as verified single-axis moves in a safe order (acq/mill_approach.py:
z, x/y, rotation, tilt in; the mirror out), each azimuth change a verified
rotation-only move; the ion beam is unblanked only at the mill position and
every stage move happens blanked; and whatever fails, ``finally`` blanks the
ion beam, stops the raster, turns the beam off and, unless a stage step
failed, takes the stage back to imaging (flat, at the imaging height).

Journal: ``mill_beam_on`` before each unblank and ``mill_beam_off`` (with the
seconds milled so far) after each blank, so after a crash the time milled is
known unless the process died with the beam on.
"""
from __future__ import annotations

import math

import numpy as np

from acq.device_ops import with_retries
from acq.events import Mill
from acq.mill_approach import MillApproach, MillApproachFailed, azimuth_deg, check_at_imaging
from acq.runner import stop_point
from devices.errors import DeviceError, InterlockError
from devices.interfaces import RasterSettings, StagePosition

# Seed Table 2.1: mill rate per ion beam current (m³/C) vs electron dose (1e27 eV/cm³)
TABLE_DOSE = np.array([0.0, 0.25, 0.5, 1.0])
TABLE_RATE = np.array([5.453, 3.246, 1.948, 1.487]) * 1e-8
_EPS = 1e-6


class MillCurrentError(DeviceError):
    """The measured ion target current is outside the plan's tolerance."""


def raster_area_m2(plan) -> float:
    kx, ky = plan.setup_config.calibration.ion_raster_mm_per_vpp
    vx, vy = plan.mill.raster_vpp
    return vx * kx * 1e-3 * vy * ky * 1e-3


def estimated_depth_per_cycle_nm(plan) -> float:
    """Depth one mill removes, from Table 2.1 at the planned irradiation dose,
    the planned current and the calibrated raster area."""
    dose = plan.irradiation.target_dose_1e27_ev_cm3 if plan.irradiation else 0.0
    per_charge = float(np.interp(dose, TABLE_DOSE, TABLE_RATE))
    return per_charge * plan.mill.current_na * 1e-9 / raster_area_m2(plan) * plan.mill.duration_s * 1e9


def mill_position(setup, angle_deg: float, azimuth_rad: float) -> StagePosition:
    mp = setup.config.safety.mill_position
    return StagePosition(x=mp.x_mm * 1e-3, y=mp.y_mm * 1e-3, z=mp.z_mm * 1e-3, r=azimuth_rad,
                         t=math.radians(angle_deg))


def azimuth_rad(setup, index: int, count: int) -> float:
    """Stage rotation of azimuth ``index`` (360°/count apart), as an angle the
    rotation window allows; outside it the approach's window check refuses it."""
    deg = azimuth_deg(setup.config.safety.stage.r_deg, index, count)
    return math.radians(360.0 * index / count if deg is None else deg)


def _safe_off(ctx) -> list[str]:
    """Every safing action, each tried on its own; returns what failed."""
    setup, failed = ctx.setup, []
    gun, awg = setup.ion_gun, setup.waveform_generator
    for what, fn in (("blank ion beam", lambda: gun.set_blanked(True)),
                     ("raster off", lambda: gun.set_raster(False)),
                     ("waveform outputs off", lambda: awg.set_outputs(False)),
                     ("ion beam off", lambda: gun.set_beam(False))):
        for _ in range(3):
            try:
                fn()
                break
            except Exception as e:      # keep going: the next action may still make it safe
                err = f"{what}: {e}"
        else:
            failed.append(err)
    try:
        st = gun.gun_status()
        if st.blanked or not st.beam_on:
            ctx.ion_beam_safe = True
        else:
            failed.append("ion gun still reports an unblanked beam")
    except Exception as e:
        failed.append(f"ion gun status unknown: {e}")
    return failed


_STOP_POLL_S = 0.5


def _sleep_unless_stopped(ctx, seconds: float) -> None:
    """Sleep on the setup clock in short steps, so a signal ends a mill
    within a second; the time counts as milled either way (never mill twice)."""
    left = seconds
    while left > 0 and not getattr(ctx, "urgent_stop", None):
        dt = min(left, _STOP_POLL_S)
        ctx.clock.sleep(dt)
        left -= dt


def run_mill(ctx, ev: Mill) -> float:
    """Mill for the remaining time of this cycle's mill; returns seconds milled."""
    setup, step, journal = ctx.setup, ev.step, ctx.journal
    gun, awg, stage, sem = setup.ion_gun, setup.waveform_generator, setup.stage, setup.sem
    status, done = journal.state.mill_status(ev.key)
    if status == "done":        # run again after a pause: milled already; only the stage must be back
        check_at_imaging(ctx, stage.position(), f"after the mill of cycle {ev.cycle}")
        return step.duration_s
    known = ctx.mill_known_s.get(ev.key)            # this process knows better when the journal refused a record
    if known is not None and (status == "unknown" or known > done):
        status, done = "known", known
    if status == "none":
        journal.append("mill_started", key=ev.key, cycle=ev.cycle, duration_s=step.duration_s)
    elif done > 0:
        ctx.incident("info", "mill_continued", f"mill of cycle {ev.cycle} continues after {done:.1f} s of "
                     f"{step.duration_s:g} s (time milled known from the journal)", {"cycle": ev.cycle})
    angle = step.glancing_angle_deg or setup.config.safety.mill_position.glancing_angle_deg
    per_az = step.duration_s / step.azimuths
    tries = ctx.plan.retries.mill
    beam_on = False
    ok = False
    way = None
    stranded = ""                 # the way back did not complete: the operator looks before anything moves
    sem.set_blanked(True)                        # SEM beam off the specimen while ions are on it
    ctx.ion_beam_safe = False
    try:
        with_retries(ctx, "ion gun setup", tries,
                     lambda: (gun.set_blanked(True), gun.set_energy(step.ion_energy_kv * 1e3),
                              gun.set_cluster_size(step.cluster_size)), role="ion_gun")
        raster = RasterSettings(step.raster_vpp[0], step.raster_vpp[1], step.raster_hz[0], step.raster_hz[1])
        with_retries(ctx, "raster setup", tries, lambda: awg.configure_raster(raster), role="waveform_generator")
        first_az = min(int((done + _EPS) // per_az), step.azimuths - 1)
        rotations = [azimuth_rad(setup, az, step.azimuths) for az in range(first_az, step.azimuths)]
        # every waypoint checked against the windows here, before anything moves
        way = MillApproach(ctx, mill_position(setup, angle, rotations[0]), rotations)
        way.approach()
        with_retries(ctx, "ion beam on", tries, lambda: gun.set_beam(True), role="ion_gun")
        with_retries(ctx, "raster on", tries, lambda: (awg.set_outputs(True), gun.set_raster(True)),
                     role="waveform_generator")
        for az in range(first_az, step.azimuths):
            seg_end = (az + 1) * per_az if az < step.azimuths - 1 else step.duration_s
            if done >= seg_end - _EPS:
                continue
            if az > first_az:                   # delay, then rotate, beam blanked throughout
                _sleep_unless_stopped(ctx, step.delay_s)
                stop_point(ctx)
                way.rotate(rotations[az - first_az], f"azimuth {az}")
            if not setup.guard.near_mill_position(stage.position()):
                raise InterlockError("ion beam refused: stage is not at the mill position", device="ion_gun",
                                     operation="unblank")
            if not sem.blanked():
                sem.set_blanked(True)
            stop_point(ctx)                     # a stop is pending: never unblank now
            journal.append("mill_beam_on", key=ev.key, done_s=done, azimuth=az)
            beam_on = True
            gun.set_blanked(False)
            amps = gun.target_current()
            lo, hi = step.current_na * (1 - step.current_tolerance), step.current_na * (1 + step.current_tolerance)
            if not lo <= amps * 1e9 <= hi:
                raise MillCurrentError(f"ion target current {amps * 1e9:.3g} nA outside [{lo:.3g}, {hi:.3g}] nA",
                                       device="ion_gun", operation="mill")
            while done < seg_end - _EPS:
                dt = min(step.check_interval_s, seg_end - done)
                _sleep_unless_stopped(ctx, dt)
                done += dt                      # counted even if the check below fails: never mill twice
                stop_point(ctx)                 # a signal: blank now (finally), resume mills the rest
                st = gun.gun_status()
                if not st.interlocks_ok or not st.beam_on or st.blanked:
                    raise InterlockError(f"ion beam dropped during the mill (beam_on={st.beam_on}, "
                                         f"blanked={st.blanked}, interlocks_ok={st.interlocks_ok})",
                                         device="ion_gun", operation="mill")
            gun.set_blanked(True)
            beam_on = False
            ctx.mill_known_s[ev.key] = done     # known here even if the journal refuses the record
            journal.append("mill_beam_off", key=ev.key, done_s=done)
        ok = True
    finally:
        failed = _safe_off(ctx)
        if beam_on:         # in this process the time milled is known, even if safing needs a look
            ctx.mill_known_s[ev.key] = done
            try:
                journal.append("mill_beam_off", key=ev.key, done_s=done, safe=ctx.ion_beam_safe)
            except OSError as e:                # kept in memory: a retry here continues from it
                failed.append(f"journal: {e}")
        # back to imaging in the mirror order; never after a failed stage step (the
        # operator looks first) nor with the beam unconfirmed (no move with ions on)
        if ctx.ion_beam_safe and way is not None and way.started and not way.failed:
            try:
                way.back_to_imaging()
            except Exception as e:
                failed.append(f"stage back to imaging: {e}")
                stranded = f"the return to imaging failed: {e}"
        elif way is not None and way.failed:
            failed.append("a stage step failed: the stage was left where it stopped")
            stranded = "a stage step failed: the stage was left where it stopped"
        elif way is not None and way.started:
            stranded = "the ion beam is not confirmed off: the stage was left at the mill position"
        if failed:
            ctx.incident("error", "mill_safing", "after the mill: " + "; ".join(failed) +
                         ". Check the ion gun and stage before resuming.", {"cycle": ev.cycle})
        if not ok:
            ctx.incident("error", "mill_interrupted",
                         f"mill of cycle {ev.cycle} interrupted after {done:.1f} s of {step.duration_s:g} s; "
                         "resume continues with the remaining time", {"cycle": ev.cycle, "done_s": done})
    journal.append("mill_done", key=ev.key, cycle=ev.cycle, seconds=done, interrupted=False, accepted=False)
    if stranded:                  # milled, but no tile may move the stage from where it is
        raise MillApproachFailed(f"after the mill of cycle {ev.cycle}: {stranded}", step="return", axes=("t",))
    return done
