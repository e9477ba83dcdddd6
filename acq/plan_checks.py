"""A validated plan against the setup it runs on: safety windows, the
drivers' frame sizes, dwell times and raster rates, autofocus capabilities,
tile positions and counts, and every step of the mill approach. Called by
acq.plan.plan_from_data and by the expansion; errors name the plan field
and the setup field that allows it.
"""
from __future__ import annotations

import math
from typing import Optional

from acq.plan import OVERVIEW_SECTION, Grid, Plan
from devices.setup_config import ConfigError, SetupConfig

def _within(where: str, value: float, rng, allowed_from: str, unit: str, source: str) -> None:
    lo, hi = rng
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ConfigError(f"{source}: {where} = {value!r}: outside the setup's safety window, "
                          f"allowed [{lo:g}, {hi:g}] {unit} ({allowed_from})")


def tile_centres(plan: Plan, grids) -> list[tuple[str, float, float]]:
    """(label, x_um, y_um) of every tile of the given (section id, grid) pairs."""
    out = []
    for sid, g in grids:
        for r, c, dx, dy in g.tile_offsets_um(g.rotation_deg):
            out.append((f"sections[id={sid}].grids[id={g.id}] tile r{r} c{c}",
                        g.center_um[0] + dx, g.center_um[1] + dy))
    return out


def check_positions(cfg: SetupConfig, tiles, source: str) -> None:
    """Tile centres must lie inside the stage travel and away from the mill position."""
    s = cfg.safety
    mp = s.mill_position
    for label, x, y in tiles:
        _within(f"{label}: x_um", x, (s.stage.x_mm[0] * 1e3, s.stage.x_mm[1] * 1e3), "safety.stage.x_mm", "µm",
                source)
        _within(f"{label}: y_um", y, (s.stage.y_mm[0] * 1e3, s.stage.y_mm[1] * 1e3), "safety.stage.y_mm", "µm",
                source)
        if math.hypot(x - mp.x_mm * 1e3, y - mp.y_mm * 1e3) <= mp.imaging_exclusion_mm * 1e3:
            raise ConfigError(f"{source}: {label} at ({x:.1f}, {y:.1f}) µm is within "
                              f"safety.mill_position.imaging_exclusion_mm = {mp.imaging_exclusion_mm} mm of the mill "
                              "position, where the ion beam may be on: not allowed for imaging")


# Instrument limits by setup driver that the drivers enforce only when the step
# runs: checked here so a plan cannot fail halfway on a value wrong in the file.
AWG_RAMP_HZ = {"keysight_33522a": (1e-6, 200e3)}   # 33500-series data sheet: ramp/triangle 1 µHz..200 kHz


def tiles_per_cycle(plan: Plan, cfg: SetupConfig) -> tuple[int, str]:
    """(upper bound on the tiles one cycle images, how that adds up), by
    arithmetic: nothing is expanded, so a typo of 10^6 tiles costs nothing."""
    total, parts = 0, []
    if plan.sections is not None:
        n = sum(g.n_tiles for sec in plan.sections for g in sec.grids)
        total += n
        parts.append(f"{n} in {len(plan.sections)} sections")
    if plan.sections_from == "wafer_truth" and plan.grid_template is not None:
        t = plan.grid_template
        k = len(plan.order) if isinstance(plan.order, list) else \
            (cfg.simulation.wafer.sections if cfg.simulation is not None else 0)
        total += k * t.n_tiles
        parts.append(f"{k} wafer sections x {t.rows}x{t.cols}")
    if plan.overview is not None:
        total += plan.overview.n_tiles
        parts.append(f"overview {plan.overview.rows}x{plan.overview.cols}")
    return total, ", ".join(parts)


def check_tile_count(plan: Plan, cfg: SetupConfig, source: str) -> None:
    n, how = tiles_per_cycle(plan, cfg)
    limit = plan.limits.max_tiles_per_cycle
    if n > limit:
        raise ConfigError(f"{source}: the plan images {n} tiles per cycle ({how}), more than "
                          f"limits.max_tiles_per_cycle = {limit}: check rows/cols, or if this run is intended "
                          f"raise the limit in the plan (limits: {{max_tiles_per_cycle: {n}}})")


def _sem_frame_check(cfg: SetupConfig):
    """(is (w, h) a frame the setup's SEM driver accepts, what it allows)."""
    driver = cfg.devices.sem.driver
    if driver == "sim":
        from devices.sim.sem import MAX_FRAME
        return (lambda w, h: 16 <= w <= MAX_FRAME[0] and 16 <= h <= MAX_FRAME[1],
                f"16..{MAX_FRAME[0]} px per side")
    if driver == "zeiss_smartsem":
        # any frame inside a store: the driver scans the smallest store holding it and crops the centre
        from devices.zeiss_tables import snap_store, stores_from_options
        stores = stores_from_options(cfg.devices.sem.options or {})
        biggest = max(stores, key=lambda s: s[0] * s[1])

        def fits(w, h) -> bool:
            try:
                snap_store(w, h, stores)
                return True
            except ValueError:
                return False
        return fits, f"up to {biggest[0]}x{biggest[1]} px (a SmartSEM store; smaller frames are cropped from one)"
    return (lambda w, h: True), "any"


def _sem_dwell_ns(cfg: SetupConfig) -> Optional[tuple[float, float]]:
    """Dwell times (ns) the setup's SEM accepts, where narrower than the schema."""
    if cfg.devices.sem.driver == "zeiss_smartsem":
        from devices.zeiss_smartsem import DEFAULT_DWELL_TABLE    # nearest scan rate within 2x
        return min(DEFAULT_DWELL_TABLE.values()) * 1e9 / 2, max(DEFAULT_DWELL_TABLE.values()) * 1e9 * 2
    return None


def _sem_capabilities(cfg: SetupConfig):
    """What the setup's SEM driver can do (its Capability flags), None when unknown.
    ZEISS: the features every SmartSEM has; those probed at connect (VP, FCC,
    high current) are not needed by a plan step."""
    driver = cfg.devices.sem.driver
    if driver == "sim":
        from devices.sim.sem import SimSEM
        return SimSEM.capabilities
    if driver == "zeiss_smartsem":
        from devices.zeiss_smartsem import ZeissSEM
        return ZeissSEM.BASE_CAPABILITIES
    return None


def check_autofocus_method(plan: Plan, cfg: SetupConfig, source: str) -> None:
    """A method that runs the microscope's own routine needs a SEM that has it."""
    from acq.autofocus_step import method_needs
    af = plan.autofocus
    try:
        need = method_needs(af.method, af.options)
    except ValueError as e:
        raise ConfigError(f"{source}: autofocus.{e} (method {af.method!r})") from None
    have = _sem_capabilities(cfg)
    if have is None or need in have:
        return
    lack = ", ".join(f"Capability.{f.name}" for f in type(need) if f and f in need and f not in have)
    raise ConfigError(f"{source}: autofocus.method = {af.method!r}: the setup's SEM ({cfg.devices.sem.driver}) "
                      f"lacks {lack}; allowed a method that works on images (e.g. sweep, mapfost, deepfocus)")


def sections_from_truth_ok(cfg: SetupConfig) -> bool:
    """``sections_from: wafer_truth`` needs the simulated wafer: the simulator,
    or the ZEISS driver on its fake SmartSEM (api: sim), which images that
    same wafer. A real microscope has no ground truth to place grids on."""
    sem = cfg.devices.sem
    on_fake = sem.driver == "zeiss_smartsem" and (sem.options or {}).get("api") == "sim"
    return cfg.simulation is not None and (sem.driver == "sim" or on_fake)


def check_sem_settings(plan: Plan, cfg: SetupConfig, source: str) -> None:
    """Every frame size and dwell time the plan asks of the SEM is one it takes."""
    ok, allowed = _sem_frame_check(cfg)
    dwell = _sem_dwell_ns(cfg)
    used = []
    if plan.sections is not None:
        used += [(f"sections[id={sec.id}].grids[id={g.id}]", g) for sec in plan.sections for g in sec.grids]
    if plan.grid_template is not None:
        used.append(("grid_template", plan.grid_template))
    if plan.overview is not None:
        used.append(("overview", plan.overview))
    if plan.autofocus.method != "none":
        used.append(("autofocus", plan.autofocus))
    for where, st in used:
        w, h = st.frame_size
        if not ok(w, h):
            raise ConfigError(f"{source}: {where}.frame_size = [{w}, {h}]: the setup's SEM "
                              f"({cfg.devices.sem.driver}) allows {allowed}")
        if dwell is not None and not dwell[0] <= st.dwell_ns <= dwell[1]:
            raise ConfigError(f"{source}: {where}.dwell_ns = {st.dwell_ns:g}: the setup's SEM "
                              f"({cfg.devices.sem.driver}) allows {dwell[0]:g}..{dwell[1]:g} ns")


def _one_of(where: str, value: float, allowed, what: str, unit: str, source: str) -> None:
    if not any(math.isclose(value, a, rel_tol=1e-6) for a in allowed):
        raise ConfigError(f"{source}: {where} = {value:g}: {what} allows one of "
                          f"{', '.join(f'{a:g}' for a in allowed)} {unit}".rstrip())


def check_against_setup(plan: Plan, cfg: SetupConfig, source: str) -> None:
    check_tile_count(plan, cfg, source)          # first: the checks below enumerate every tile
    check_sem_settings(plan, cfg, source)
    check_autofocus_method(plan, cfg, source)
    s = cfg.safety
    want = plan.retries.max_exposures_per_tile
    if want is not None and want > s.max_exposures_per_tile:
        raise ConfigError(f"{source}: retries.max_exposures_per_tile = {want}: above the setup's "
                          f"safety.max_exposures_per_tile = {s.max_exposures_per_tile}; allowed "
                          f"1..{s.max_exposures_per_tile}")
    im = plan.imaging
    _within("imaging.eht_kv", im.eht_kv, s.eht_kv, "safety.eht_kv", "kV", source)
    _within("imaging.probe_current_na", im.probe_current_na, s.probe_current_na, "safety.probe_current_na", "nA",
            source)
    if im.wd_mm is not None:
        _within("imaging.wd_mm", im.wd_mm, s.wd_mm, "safety.wd_mm", "mm", source)
    if plan.autofocus.method == "sweep":
        # the sweep visits wd ± sweep_range_um: wider than the whole window, it can only fail
        width_um = (s.wd_mm[1] - s.wd_mm[0]) * 1e3
        if 2 * plan.autofocus.sweep_range_um > width_um:
            raise ConfigError(f"{source}: autofocus.sweep_range_um = {plan.autofocus.sweep_range_um:g}: the sweep "
                              f"spans ±{plan.autofocus.sweep_range_um:g} µm, wider than safety.wd_mm "
                              f"({width_um:g} µm); allowed at most {width_um / 2:g} µm")
    if plan.sections is not None:
        check_positions(cfg, tile_centres(plan, [(sec.id, g) for sec in plan.sections for g in sec.grids]), source)
    if plan.overview is not None:
        ov = plan.overview
        g = Grid(id=0, center_um=ov.center_um, rows=ov.rows, cols=ov.cols, pixel_size_nm=ov.pixel_size_nm,
                 frame_size=ov.frame_size, dwell_ns=ov.dwell_ns, overlap_px=ov.overlap_px)
        check_positions(cfg, [(f"overview {lbl.split(' ', 1)[1]}", x, y)
                              for lbl, x, y in tile_centres(plan, [(OVERVIEW_SECTION, g)])], source)
    if plan.sections_from == "wafer_truth" and not sections_from_truth_ok(cfg):
        raise ConfigError(f"{source}: sections_from = 'wafer_truth': needs a simulated setup "
                          f"(devices.sem.driver: sim, or zeiss_smartsem with options.api: sim), {cfg.source} has "
                          f"{cfg.devices.sem.driver!r}")
    if plan.irradiation is not None:
        ir = plan.irradiation
        for role in ("multimeter", "current_preamp"):
            if getattr(cfg.devices, role) is None:
                raise ConfigError(f"{source}: irradiation: needs devices.{role} in the setup {cfg.source}")
        if ir.source == "external":
            from acq.steps_irradiation import check_external
            check_external(ir, cfg, source)
        else:                                    # the SEM's own beam: its windows
            _within("irradiation.eht_kv", ir.eht_kv, s.eht_kv, "safety.eht_kv", "kV", source)
            _within("irradiation.probe_current_na", ir.probe_current_na, s.probe_current_na,
                    "safety.probe_current_na", "nA", source)
        if cfg.devices.multimeter.driver == "keysight_34465a":
            from devices.dmm_34465a import VALID_NPLC, VALID_RANGES_V
            _one_of("irradiation.dmm_range_v", ir.dmm_range_v, VALID_RANGES_V, "the setup's multimeter "
                    "(keysight_34465a)", "V", source)
            _one_of("irradiation.dmm_nplc", ir.dmm_nplc, VALID_NPLC, "the setup's multimeter (keysight_34465a)",
                    "", source)
        if cfg.devices.current_preamp.driver == "sr570":
            from devices.sr570 import SENSITIVITIES_A_PER_V
            _one_of("irradiation.preamp_sensitivity_a_per_v", ir.preamp_sensitivity_a_per_v, SENSITIVITIES_A_PER_V,
                    "the setup's current preamp (sr570)", "A/V", source)
    if plan.mill is not None:
        m = plan.mill
        for role in ("ion_gun", "waveform_generator"):
            if getattr(cfg.devices, role) is None:
                raise ConfigError(f"{source}: mill: needs devices.{role} in the setup {cfg.source}")
        for i, v in enumerate(m.raster_vpp):
            _within(f"mill.raster_vpp.{i}", v, (0.0, s.awg_max_vpp), "safety.awg_max_vpp", "Vpp", source)
        awg = cfg.devices.waveform_generator.driver
        if awg in AWG_RAMP_HZ:
            for i, v in enumerate(m.raster_hz):
                _within(f"mill.raster_hz.{i}", v, AWG_RAMP_HZ[awg], f"the setup's waveform generator ({awg}) "
                        "sawtooth range", "Hz", source)
        _within("mill.ion_energy_kv", m.ion_energy_kv, s.ion_energy_kv, "safety.ion_energy_kv", "kV", source)
        _within("mill.cluster_size", m.cluster_size, s.ion_cluster_size, "safety.ion_cluster_size", "", source)
        _within("mill.current_na", m.current_na, (0.0, s.ion_current_na_max), "safety.ion_current_na_max", "nA",
                source)
        angle = m.glancing_angle_deg if m.glancing_angle_deg is not None else s.mill_position.glancing_angle_deg
        tilt_hi = min(s.mill_position.max_tilt_deg, s.stage.t_deg[1])
        _within("mill.glancing_angle_deg", angle, (max(0.0, s.stage.t_deg[0]), tilt_hi),
                "safety.mill_position.max_tilt_deg and safety.stage.t_deg", "deg", source)
        from acq.mill_approach import check_plan_windows     # every step of the approach inside the windows
        check_plan_windows(s, m.azimuths, source)
