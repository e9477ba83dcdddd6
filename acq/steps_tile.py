"""Stage moves to imaging positions and tile acquisition.

A frame is checked before it is published: a frozen frame store (the same
image again) or a frame with copied/blank lines at the edges (an incomplete
scan) is a failed grab and is retried, never written.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from acq.device_ops import with_retries
from acq.documents import TileEvent
from acq.events import AcquireTile, MoveStage
from acq.qc import GLITCHES
from acq.section_focus import block_cv, texture_score
from devices.errors import AcquisitionFailed, InterlockError
from devices.interfaces import ScanParams, StagePosition

_EDGE_ROWS = 4          # incomplete scans repeat or blank the first/last lines


def check_frame(image: np.ndarray, previous_sample: Optional[np.ndarray]) -> tuple[Optional[str], np.ndarray]:
    """(problem or None, sample to compare the next frame with). With shot
    and read noise two real lines (or frames) are never bit-identical."""
    sample = np.ascontiguousarray(image[::7, ::7])
    if previous_sample is not None and previous_sample.shape == sample.shape \
            and np.array_equal(previous_sample, sample):
        return "frozen frame: identical to the previous frame", sample
    h = image.shape[0]
    if h >= 2 * _EDGE_ROWS and image.shape[1] >= 16:
        top, bottom = image[:_EDGE_ROWS], image[-_EDGE_ROWS:]
        if np.array_equal(top[0], top[1]) or np.array_equal(bottom[-1], bottom[-2]):
            return "incomplete frame: repeated lines at the frame edge", sample
        if np.ptp(top[0]) == 0 or np.ptp(bottom[-1]) == 0:
            return "incomplete frame: constant line at the frame edge", sample
    return None, sample


def flat_fraction(contrast: np.ndarray, cv_max: float) -> float:
    """Share of 64 px blocks without tissue contrast (bare wafer or resin):
    blocks whose contrast (section_focus.block_cv) is below ``cv_max``."""
    return float((contrast < cv_max).mean())


def move_stage(ctx, ev: MoveStage) -> StagePosition:
    """Move to an imaging position: tilt and rotation flat, z at the imaging
    height. Refused while the ion beam may be on (the guarded stage checks
    as well) and never into the mill exclusion zone."""
    setup = ctx.setup
    target = StagePosition(x=ev.x_um * 1e-6, y=ev.y_um * 1e-6, z=ctx.imaging_z, r=0.0, t=0.0)
    if setup.guard.near_mill_position(target):
        raise InterlockError(f"imaging position ({ev.x_um:.1f}, {ev.y_um:.1f}) µm is inside the mill exclusion zone",
                             device="stage", operation="move_to")
    ctx.ensure_ion_beam_safe()
    return with_retries(ctx, f"stage move to ({ev.x_um:.1f}, {ev.y_um:.1f}) µm", ctx.plan.retries.move,
                        lambda: setup.stage.move_to(target), role="stage")


def apply_scan(ctx, pixel_m: float, frame: tuple[int, int], dwell_s: float, rotation_rad: float) -> None:
    """Set the scan only where it differs from what was last set (each set is
    a round trip on a real microscope)."""
    want = ScanParams(pixel_m, tuple(frame), dwell_s, rotation_rad)
    if ctx.scan_cache == want:
        return
    ctx.scan_cache = None                    # a half-applied scan must not count as set
    ctx.setup.sem.set_scan(want)
    ctx.scan_cache = want


def acquire_tile(ctx, ev: AcquireTile, version: int) -> TileEvent:
    """Grab a checked frame (glitches retried), run QC and follow the plan's
    QC policy (retry, refocus and retry, or keep the last frame with an
    Incident). Only the accepted frame becomes the TileEvent."""
    setup = ctx.setup
    sem = setup.sem
    pos = setup.stage.position()
    if setup.guard.near_mill_position(pos):
        raise InterlockError("refusing to image: the stage is at the mill position", device="stage",
                             operation="acquire")
    ctx.ensure_ion_beam_safe()
    rot = math.radians(ev.rotation_deg + setup.config.calibration.stage_to_image_rotation_deg)
    inspector, policy = ctx.qc_inspector, ctx.plan.qc.policy
    qc: dict = {}
    scans = 0

    def grab():
        nonlocal qc, scans
        if scans:                               # tile_started counted the first; each retry is dose too
            ctx.exposures.extra(ev, why="retry")
        scans += 1
        apply_scan(ctx, ev.pixel_size_nm * 1e-9, ev.frame_size, ev.dwell_ns * 1e-9, rot)
        if sem.blanked():
            sem.set_blanked(False)
        t0 = ctx.clock.now()
        frame = sem.acquire_frame()
        problem, sample = check_frame(frame.image, ctx.last_frame_sample)
        ctx.last_frame_sample = sample
        if problem:
            raise AcquisitionFailed(problem, device="sem", operation="acquire_frame")
        if inspector is not None:
            res = inspector.inspect(frame.image)
            glitch = sorted(set(res.reasons) & GLITCHES)
            if glitch:
                raise AcquisitionFailed(f"QC: {', '.join(glitch)}", device="sem", operation="acquire_frame")
            qc = res
        return frame, t0, ctx.clock.now()

    attempt = 0
    while True:
        attempt += 1
        frame, t0, t1 = with_retries(ctx, f"acquire {ev.tile_id}", ctx.plan.retries.acquire, grab, role="sem",
                                     on_retry=ctx.invalidate_scan)
        if inspector is None:
            result = {}
            break
        decision = policy.decide(qc, attempt)
        result = qc.to_dict()
        if decision.action == "accept":
            break
        if decision.action == "give_up":
            ctx.incident("warning", "qc_failed", f"tile {ev.tile_id}: QC failed ({', '.join(decision.reasons)}) "
                         f"after {attempt} acquisitions; kept the last one", {"tile_id": ev.tile_id, **result})
            break
        if decision.action == "refocus_retry":
            ctx.refocus(ev)
    md = dict(frame.metadata)
    stage = md.get("stage") or setup.stage.position().as_dict()
    result = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool, list))}
    if ctx.flat_cv is not None or ctx.texture:
        contrast = block_cv(frame.image)       # one pass over the frame for both
        if ctx.flat_cv is not None:            # only a section_exhausted stop rule needs it
            result["flat_fraction"] = round(flat_fraction(contrast, ctx.flat_cv), 4)
        if ctx.texture:                        # where autofocus may go next cycle (acq/section_focus.py)
            result["texture"] = round(texture_score(contrast), 4)
    result["attempts"] = attempt
    result["exposures"] = ctx.exposures.count(ev)          # scans of this tile's area this cycle (dose)
    return TileEvent(
        run_uid=ctx.run_uid, tile_id=ev.tile_id, version=version, cycle=ev.cycle, section_id=ev.section,
        grid_id=ev.grid, row=ev.row, col=ev.col, image=frame.image, pixel_size_m=ev.pixel_size_nm * 1e-9,
        dwell_s=ev.dwell_ns * 1e-9, stage=stage, target_um=tuple(ev.center_um), rotation_deg=ev.rotation_deg,
        wd_m=float(md.get("wd_m", sem.working_distance())), stig=tuple(md.get("stig", sem.stig())),
        t_start=t0, t_end=t1, qc=result, metadata=md, overview=ev.overview)
