"""Build a connected setup from a validated configuration.

Roles map to drivers by the config's ``driver`` key; with the simulator,
"sim://" URLs start the matching emulator so the real driver runs over its
real transport. ``Setup`` owns everything it started and closes it in order
(ion beam blanked and off first).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from common.roles import ROLES
from devices.clock import Clock
from devices.safety import GuardedSEM, GuardedStage, SafetyGuard
from devices.setup_config import SetupConfig

log = logging.getLogger(__name__)


@dataclass
class Setup:
    config: SetupConfig
    sem: Any
    stage: Any
    clock: Clock
    guard: SafetyGuard
    ion_gun: Any = None
    waveform_generator: Any = None
    multimeter: Any = None
    current_preamp: Any = None
    electron_source: Any = None           # external flood gun (irradiation.source: external)
    world: Any = None                     # SimWorld when simulated
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def devices(self) -> dict[str, Any]:
        return {r: getattr(self, r) for r in ROLES if getattr(self, r) is not None}

    def close(self) -> None:
        # the ion beam and its raster first, the electron source next: off before anything else goes away
        first = ("ion_gun", "waveform_generator", "electron_source")
        for role in (*first, *(r for r in ROLES if r not in first)):
            dev = getattr(self, role)
            if dev is None:
                continue
            try:
                dev.close()
            except Exception as e:        # closing must go on for the other devices
                log.warning("closing %s failed: %s", role, e)
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception as e:
                log.warning("stopping emulator failed: %s", e)
        self._closers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_emulated(url: Optional[str]) -> bool:
    return bool(url) and url.startswith("sim://")


def build_setup(cfg: SetupConfig, *, connect: bool = True) -> Setup:
    """Create (and by default connect) every configured device."""
    guard = SafetyGuard(cfg.safety)
    world = None
    closers: list[Callable[[], None]] = []
    d = cfg.devices
    if d.sem.driver == "sim" or d.stage.driver == "sim":
        from devices.sim.world import SimWorld
        world = SimWorld(cfg.simulation, cfg.safety, cfg.calibration)
        clock = world.clock
    else:
        clock = Clock()

    sem = stage = None
    if d.sem.driver == "sim":
        from devices.sim.sem import SimSEM
        sem = SimSEM(world)
    if d.stage.driver == "sim":
        from devices.sim.stage import SimStage
        stage = SimStage(world)
    if "zeiss_smartsem" in (d.sem.driver, d.stage.driver):
        from devices.zeiss_setup import build_sem, build_stage, make_api
        zeiss_options = d.sem.options if d.sem.driver == "zeiss_smartsem" else d.stage.options
        if zeiss_options.get("api") == "sim" and world is None:
            # the fake SmartSEM renders and moves the simulated world
            from devices.sim.world import SimWorld
            world = SimWorld(cfg.simulation, cfg.safety, cfg.calibration)
            clock = world.clock
        api = make_api(zeiss_options, clock=clock, world=world)
        # timeout_s, when the setup names one, is only the margin on top of the
        # drivers' work-derived bounds (scan time, travel time), never the bound
        if d.sem.driver == "zeiss_smartsem":
            sem = build_sem(api, d.sem.options, clock=clock,
                            timeout_s=d.sem.timeout_s if "timeout_s" in d.sem.model_fields_set else None)
        if d.stage.driver == "zeiss_smartsem":
            stage = build_stage(api, d.stage.options, clock=clock,
                                timeout_s=d.stage.timeout_s if "timeout_s" in d.stage.model_fields_set else None)

    setup = Setup(cfg, sem=None, stage=None, clock=clock, guard=guard, world=world, _closers=closers)
    faults = world.faults if world is not None else None

    if d.ion_gun is not None:
        setup.ion_gun = _ion_gun(cfg, world, faults, closers)
    preamp_emulator = None
    if d.current_preamp is not None:
        url = d.current_preamp.url
        if _is_emulated(url):
            from devices.sim.sr570_emulator import SR570Emulator
            preamp_emulator = SR570Emulator()
            preamp_emulator.start()
            closers.append(preamp_emulator.stop)
            url = preamp_emulator.url
        from devices.sr570 import SR570
        setup.current_preamp = SR570(url, sign=d.current_preamp.sign if d.current_preamp.sign is not None else -1.0,
                                     timeout_s=d.current_preamp.timeout_s)
    if d.waveform_generator is not None:
        from devices.awg_33522a import Keysight33522A
        c = d.waveform_generator
        setup.waveform_generator = Keysight33522A(
            c.resource, visa_library=c.visa_library or "@py", timeout_s=c.timeout_s,
            max_vpp=cfg.safety.awg_max_vpp, resource_wrapper=_visa_faults(faults, "waveform_generator"))
    if d.multimeter is not None:
        from devices.dmm_34465a import Keysight34465A
        c = d.multimeter
        setup.multimeter = Keysight34465A(c.resource, visa_library=c.visa_library or "@py", timeout_s=c.timeout_s,
                                          resource_wrapper=_visa_faults(faults, "multimeter"))

    if d.electron_source is not None:
        setup.electron_source = _electron_source(d.electron_source, closers)

    ion_on = (lambda: world.ion_beam_hits_specimen()) if world is not None else _ion_beam_reported_on(setup)
    setup.sem = GuardedSEM(sem, guard)
    setup.stage = GuardedStage(stage, guard, ion_beam_on=ion_on)
    if connect:
        try:
            for dev in setup.devices().values():
                dev.connect()
            _link_simulation(setup, preamp_emulator)
        except BaseException:
            setup.close()
            raise
    return setup


def _ion_gun(cfg, world, faults, closers):
    from devices.iongun_serial import SerialIonGun
    c = cfg.devices.ion_gun
    url = c.url
    if _is_emulated(url):
        from devices.sim.iongun_emulator import IonGunEmulator
        emu = IonGunEmulator(c.command_table, faults=faults,
                             on_state_change=(lambda st: _ion_state_to_world(world, st)) if world else None)
        emu.start()
        closers.append(emu.stop)
        url = emu.url
    s = cfg.safety
    limits = {"energy_v": (s.ion_energy_kv[0] * 1e3, s.ion_energy_kv[1] * 1e3),
              "cluster_size": tuple(s.ion_cluster_size), "current_a_max": s.ion_current_na_max * 1e-9}
    return SerialIonGun(url, c.command_table, limits=limits, timeout_s=c.timeout_s)


def _electron_source(c, closers):
    if c.driver == "sim":
        from devices.sim.electron_source import SimElectronSource
        return SimElectronSource(c.options)
    from devices.electron_source_serial import SerialShutterSource
    url, emu = c.url, None
    if _is_emulated(url):
        from devices.sim.electron_source import ShutterEmulator
        emu = ShutterEmulator().start()
        closers.append(emu.stop)
        url = emu.url
    src = SerialShutterSource(url, c.options, timeout_s=c.timeout_s)
    src.emulator = emu                    # the simulated dose chain reads the current behind its shutter
    return src


def _ion_state_to_world(world, st) -> None:
    get = (lambda k, default=None: st.get(k, default)) if isinstance(st, dict) else \
          (lambda k, default=None: getattr(st, k, default))
    world.set_ion_state(beam_on=bool(get("beam_on", False)), blanked=bool(get("blanked", True)),
                        raster_on=bool(get("raster_on", get("raster", False))),
                        target_current_a=float(get("target_current_a", 0.0) or 0.0))


def _visa_faults(faults, device: str):
    if faults is None or not any(r.device == device for r in faults.rules):
        return None
    from devices.sim.visa_link import FaultyResource
    return lambda res: FaultyResource(res, faults, device)


def _ion_beam_reported_on(setup: Setup) -> Callable[[], bool]:
    def on() -> bool:
        if setup.ion_gun is None:
            return False
        st = setup.ion_gun.gun_status()
        return st.beam_on and not st.blanked
    return on


def _link_simulation(setup: Setup, preamp_emulator) -> None:
    """Close the simulated loops: ion raster from the AWG's real settings,
    DMM voltage from the specimen current through the preamp emulator."""
    world = setup.world
    if world is None:
        return
    awg = setup.waveform_generator
    if awg is not None:
        kx, ky = setup.config.calibration.ion_raster_mm_per_vpp

        def raster_size():
            last = getattr(awg, "last_raster", None)
            if last is None or not awg.outputs_on():
                return 1e-3, 1e-3          # unscanned spot: about a millimetre
            return last.x_amplitude_vpp * kx * 1e-3, last.y_amplitude_vpp * ky * 1e-3
        world.raster_size_m = raster_size
    if setup.multimeter is not None and preamp_emulator is not None:
        from devices.sim.visa_link import attach_voltage_source
        src = setup.electron_source        # a simulated flood gun adds its current to the SEM's
        extra = (getattr(src, "delivered_current_a", None)
                 or getattr(getattr(src, "emulator", None), "delivered_current_a", None) or (lambda: 0.0))
        attach_voltage_source(setup.multimeter,
                              lambda: preamp_emulator.output_voltage(world.specimen_current_a() + extra()))
