"""Plan -> events. The events (acq/events.py) are frozen dataclasses with
a ``key`` that is stable across runs of the same plan, which is what the
journal records and what resume skips.

One cycle is: (irradiation, first cycle only) -> (overview) -> per section in
imaging order: [autofocus] -> tiles -> SectionEnd -> mill -> CycleEnd.
Imaging comes before the mill so the untouched surface is recorded and an
exhausted section is seen before more is milled. The generator is lazy: the
engine marks sections exhausted in ``ExpansionState`` while it runs and the
next cycle leaves them out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

from acq.documents import tile_id
from acq.events import AcquireTile, Autofocus, Configure, CycleEnd, Irradiate, Mill, MoveStage, PlanEvent, SectionEnd
from acq.plan import OVERVIEW_SECTION, Grid, Plan, Section
from acq.plan_checks import check_positions, tile_centres
from acq.section_focus import af_radius_um, choose_spots, forbidden_area_at, pinned_spots, spot_group
from devices.setup_config import ConfigError


# Consecutive cycles a section must look milled through before it is no longer imaged:
# one bad cycle (a defocused or blanked scan, a stage offset after a re-home) must not end
# a section the mill would go on cutting unseen. Counted in memory: a resume starts again
# (one more cycle imaged, never one less).
EXHAUSTED_CYCLES = 2


@dataclass
class ExpansionState:
    """Feedback from the engine to the (lazy) expansion."""
    exhausted: set[int] = field(default_factory=set)
    focus: dict[int, dict] = field(default_factory=dict)   # the journal's section_focus (af_next per section)
    flat_cycles: dict[int, list[int]] = field(default_factory=dict)   # section -> consecutive cycles seen flat

    def seen_flat(self, section: int, cycle: int, flat: bool) -> list[int]:
        """Record whether ``section`` looked milled through in ``cycle`` (a cycle counts
        once); the consecutive cycles it has looked so, up to this one."""
        seen = self.flat_cycles.setdefault(section, [])
        if not flat or (seen and seen[-1] not in (cycle - 1, cycle)):
            seen.clear()
        if flat and cycle not in seen:
            seen.append(cycle)
        return seen


# ---------------------------------------------------------------- sections
def resolve_sections(plan: Plan, setup) -> list[Section]:
    """The plan's sections, with ``sections_from: wafer_truth`` resolved from
    the simulated wafer: one grid per section, centred on it."""
    if plan.sections is not None:
        return list(plan.sections)
    if plan.sections_from is None:                  # an overview-only plan
        return []
    world = getattr(setup, "world", None)
    wafer = getattr(world, "wafer", None)
    if wafer is None:
        raise ConfigError("sections_from = 'wafer_truth': the setup has no simulated wafer")
    t = plan.grid_template
    out = []
    for i, sec in enumerate(wafer.sections):
        sid = int(getattr(sec, "id", i))
        angle = getattr(sec, "angle_deg", None)
        if angle is None:
            angle = math.degrees(getattr(sec, "angle_rad", getattr(sec, "rotation_rad", 0.0)))
        rot = ((float(angle) + 180.0) % 360.0) - 180.0 if t.rotation_deg == "section" else t.rotation_deg
        cx, cy = (float(v) * 1e6 for v in sec.center_m)
        g = Grid(id=0, center_um=(cx, cy), rows=t.rows, cols=t.cols, pixel_size_nm=t.pixel_size_nm,
                 frame_size=t.frame_size, dwell_ns=t.dwell_ns, overlap_px=t.overlap_px, rotation_deg=rot)
        out.append(Section(id=sid, grids=[g]))
    return out


def ordered_sections(plan: Plan, setup) -> list[Section]:
    sections = resolve_sections(plan, setup)
    if plan.order == "path":
        return sections
    by_id = {s.id: s for s in sections}
    missing = [i for i in plan.order if i not in by_id]
    if missing:
        raise ConfigError(f"order = {plan.order}: section ids {missing} do not exist (have {sorted(by_id)})")
    return [by_id[i] for i in plan.order]


def check_plan(plan: Plan, setup) -> list[Section]:
    """Checks that need the built setup (sections from the wafer); raises
    ConfigError before anything is written."""
    sections = ordered_sections(plan, setup)
    if not sections and plan.overview is None:
        raise ConfigError("sections: the plan has no sections to image")
    check_positions(setup.config, tile_centres(plan, [(s.id, g) for s in sections for g in s.grids]),
                    str(plan.source or "plan"))
    pinned = plan.autofocus.pinned
    unknown = sorted(set(pinned) - {s.id for s in sections})
    if unknown:
        raise ConfigError(f"autofocus.pinned: sections {unknown} are not in the plan (have "
                          f"{sorted(s.id for s in sections)})")
    check_positions(setup.config, [(f"autofocus.pinned.{sid}[{i}]", x, y) for sid, pts in pinned.items()
                                   for i, (x, y) in enumerate(pts)], str(plan.source or "plan"))
    return sections


# ---------------------------------------------------------------- expansion
def _tiles(cycle: int, section: int, g, rotation: float, overview: bool = False) -> list[AcquireTile]:
    out = []
    for r, c, dx, dy in g.tile_offsets_um(rotation):
        tid = tile_id(cycle, section, g.id if not overview else 0, r, c)
        out.append(AcquireTile(key=tid, tile_id=tid, cycle=cycle, section=section, grid=g.id if not overview else 0,
                               row=r, col=c, center_um=(g.center_um[0] + dx, g.center_um[1] + dy),
                               pixel_size_nm=g.pixel_size_nm, frame_size=tuple(g.frame_size), dwell_ns=g.dwell_ns,
                               rotation_deg=rotation, overview=overview))
    return out


def _overview_grid(ov) -> Grid:
    return Grid(id=0, center_um=ov.center_um, rows=ov.rows, cols=ov.cols, pixel_size_nm=ov.pixel_size_nm,
                frame_size=ov.frame_size, dwell_ns=ov.dwell_ns, overlap_px=ov.overlap_px)


def _move(cycle: int, ev) -> MoveStage:
    x, y = ev.center_um
    return MoveStage(key=f"move:{ev.key}", cycle=cycle, x_um=x, y_um=y, for_key=ev.key)


def _af_due(plan: Plan, cycle: int) -> bool:
    return plan.autofocus.method != "none" and cycle % plan.autofocus.every_n_cycles == 0


def autofocus_spots(step, cycle: int, section: int, grid: Optional[int], centre, served: list[AcquireTile],
                    memory: dict) -> list[tuple[float, float]]:
    """Where a section's (or grid's) autofocus runs this cycle: the pinned
    spots, the grid centre (``locations: centre``), the spots chosen when the
    section last ended (journaled ``af_next``), or, before any, tile centres
    nearest the centre and spread out (acq/section_focus.py)."""
    if section in step.pinned:
        return pinned_spots([tuple(p) for p in step.pinned[section]], step.points, cycle)
    cands = [tuple(t.center_um) for t in served]
    if step.locations == "centre" and step.points == 1 and forbidden_area_at(centre, step.forbidden) is None:
        return [tuple(centre)]
    nxt = memory.get("af_next", {}).get(spot_group(step, grid))
    if nxt and step.locations == "auto":
        return [tuple(p) for p in nxt]
    used = [tuple(p) for p in memory.get("af_used", {}).get(spot_group(step, grid), [])]
    return choose_spots(cands or [tuple(centre)], step.points, tuple(centre), af_radius_um(step),
                        previous=used if step.locations == "auto" else (), forbidden=step.forbidden)


def expand(plan: Plan, setup, start_cycle: int = 0, state: Optional[ExpansionState] = None) -> Iterator[PlanEvent]:
    """Events of the plan from ``start_cycle`` on (lazily: exhaustion feedback
    through ``state`` shortens later cycles)."""
    state = state if state is not None else ExpansionState()
    sections = ordered_sections(plan, setup)
    n_cycles = plan.n_cycles()
    exhaust_rule = not isinstance(plan.cycles, int) and plan.cycles.section_exhausted
    im = plan.imaging
    yield Configure(key="configure", eht_kv=im.eht_kv, probe_current_na=im.probe_current_na, wd_mm=im.wd_mm)
    for cycle in range(start_cycle, n_cycles):
        if cycle == 0 and plan.irradiation is not None:
            for s in sections:
                ev = Irradiate(key=f"irr:s{s.id:04d}", section=s.id, center_um=tuple(s.grids[0].center_um),
                               step=plan.irradiation)
                yield _move(cycle, ev)
                yield ev
        ov = plan.overview
        if ov is not None and (cycle == 0 or (ov.every_n_cycles and cycle % ov.every_n_cycles == 0)):
            tiles = _tiles(cycle, OVERVIEW_SECTION, _overview_grid(ov), 0.0, overview=True)
            for t in tiles:
                yield _move(cycle, t)
                yield t
            yield SectionEnd(key=f"sec:c{cycle:04d}_s{OVERVIEW_SECTION:04d}", cycle=cycle, section=OVERVIEW_SECTION,
                             tile_ids=tuple(t.tile_id for t in tiles))
        for s in sections:
            if s.id in state.exhausted:
                continue
            section_tiles: list[str] = []
            grid_tiles = [(g, _tiles(cycle, s.id, g, g.rotation_deg)) for g in s.grids]
            for gi, (g, tiles) in enumerate(grid_tiles):
                if _af_due(plan, cycle) and (plan.autofocus.where == "per_grid" or gi == 0):
                    served = tiles if plan.autofocus.where == "per_grid" else [t for _, ts in grid_tiles for t in ts]
                    grid = g.id if plan.autofocus.where == "per_grid" else None
                    key = f"af:c{cycle:04d}_s{s.id:04d}" + (f"_g{g.id:02d}" if grid is not None else "")
                    centre = tuple(g.center_um) if grid is not None else tuple(s.grids[0].center_um)
                    spots = autofocus_spots(plan.autofocus, cycle, s.id, grid, centre, served,
                                            state.focus.get(s.id, {}))
                    for k, spot in enumerate(spots):
                        af = Autofocus(key=key + (f"_p{k}" if k else ""), cycle=cycle, section=s.id, grid=grid,
                                       center_um=spot, step=plan.autofocus, tile_keys=tuple(t.key for t in served))
                        yield _move(cycle, af)
                        yield af
                for t in tiles:
                    yield _move(cycle, t)
                    yield t
                    section_tiles.append(t.tile_id)
            yield SectionEnd(key=f"sec:c{cycle:04d}_s{s.id:04d}", cycle=cycle, section=s.id,
                             tile_ids=tuple(section_tiles))
        if exhaust_rule and all(s.id in state.exhausted for s in sections):
            yield CycleEnd(key=f"cycle:c{cycle:04d}", cycle=cycle, last=True)
            return                  # nothing left to mill or image
        if plan.mill is not None:
            yield Mill(key=f"mill:c{cycle:04d}", cycle=cycle, step=plan.mill)
        yield CycleEnd(key=f"cycle:c{cycle:04d}", cycle=cycle, last=cycle == n_cycles - 1)


def count_tiles(plan: Plan, setup) -> int:
    """Planned tiles (an upper bound when sections may be exhausted early)."""
    return sum(isinstance(e, AcquireTile) for e in expand(plan, setup))


def expand_tiles(plan: Plan, setup, sections: Optional[list[Section]] = None) -> list[AcquireTile]:
    """The tiles of the first cycle (overview included): what a run images
    every cycle, for the resume fingerprint (acq/fingerprint.py)."""
    sections = ordered_sections(plan, setup) if sections is None else sections
    out: list[AcquireTile] = []
    if plan.overview is not None:
        out += _tiles(0, OVERVIEW_SECTION, _overview_grid(plan.overview), 0.0, overview=True)
    for s in sections:
        for g in s.grids:
            out += _tiles(0, s.id, g, g.rotation_deg)
    return out
