"""The demo plan (configs/plans/demo_wafer.yaml, made smaller) through the ZEISS
SmartSEM driver against its fake (devices/sim/smartsem_api.py), end to end:
overview, autofocus (MAPFoSt, DeepFocus, SmartSEM's own), tiles, irradiation,
mill cycles; then the output is verified and the fake is asked what the beam
did. The fake runs on the simulated clock (time_factor 0), so scan, stage and
run-up times are modelled without being waited for."""
from __future__ import annotations

from pathlib import Path

import pytest
import tifffile
import yaml

from tests.support import ROOT
from tests.support.engine_runs import write_setup

ZEISS_DEVICES = {"sem": {"driver": "zeiss_smartsem", "options": {"api": "sim"}},
                 "stage": {"driver": "zeiss_smartsem", "options": {"settle_s": 0.5}}}


def zeiss_setup_file(tmp: Path, sections: int = 2) -> Path:
    """The simulated setup with the SEM and the stage on the ZEISS driver over the fake."""
    path = write_setup(tmp, sections=sections, name="zeiss_setup.yaml")
    d = yaml.safe_load(path.read_text())
    d["devices"].update(ZEISS_DEVICES)
    path.write_text(yaml.safe_dump(d))
    return path


def demo_plan(tmp: Path, setup_file: Path, method: str, **over) -> Path:
    """configs/plans/demo_wafer.yaml with fewer tiles, a short mill and an overview."""
    d = yaml.safe_load((ROOT / "configs" / "plans" / "demo_wafer.yaml").read_text())
    d.update(setup=str(setup_file), order=[0, 1], cycles=2, retries={"backoff_s": 0.0})
    d["grid_template"].update(rows=1, cols=2)
    d["overview"] = {"center_um": [0, 0], "rows": 2, "cols": 2, "pixel_size_nm": 1000,
                     "frame_size": [1024, 768], "dwell_ns": 100, "overlap_px": 32}
    d["autofocus"] = {"method": method, "where": "per_section"}     # 512x512 frames: not a store size
    d["mill"]["duration_s"] = 60
    d.update(over)
    path = tmp / "plan.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


class BeamLog:
    """Follows the fake through the run: every frame the driver returned, and
    the seconds the beam scanned live during each event (engine callbacks, in
    the engine's thread, where the fake is used)."""

    def __init__(self, engine):
        self.sem = engine.setup.sem.inner
        self.api = self.sem.api._com                 # the fake CZ.EMApiCtrl.1
        self.frames: list[dict] = []
        self.spans: list[tuple[object, float, int]] = []     # (event, live_s at its start, frames so far)
        grab = self.sem.acquire_frame

        def recording():
            f = grab()
            self.frames.append({"shape": f.image.shape, **f.metadata})
            return f
        self.sem.acquire_frame = recording
        engine.on_step(lambda ev: self.spans.append((ev, self.api.live_s(), len(self.api.frames))))

    def live_outside_frames(self, kinds_allowed=("irradiate",)) -> dict[str, float]:
        """Per event (except those allowed to scan live): live seconds beyond the
        frames it grabbed. Each span runs to the next event's start, so the
        checkpoints between events are counted too."""
        ends = [(s[1], s[2]) for s in self.spans[1:]] + [(self.api.live_s(), len(self.api.frames))]
        extra = {}
        for (ev, live0, n0), (live1, n1) in zip(self.spans, ends):
            if ev.kind in kinds_allowed:
                continue
            scanned = sum(t1 - t0 for t0, t1 in self.api.frames[n0:n1])
            if abs((live1 - live0) - scanned) > 1e-6:
                extra[ev.key] = (live1 - live0) - scanned
        return extra


def run_demo(tmp: Path, method: str, **over):
    from acq.engine import Engine
    from acq.plan import load_plan, writer_options
    from acq.writers import make_writers
    from devices.factory import build_setup
    plan = load_plan(demo_plan(tmp, zeiss_setup_file(tmp), method, **over))
    setup = build_setup(plan.setup_config)
    docs: list = []
    out = tmp / "out"
    try:
        engine = Engine(setup, plan, out, subscribers=[docs.append], on_pause="stop")
        for w in make_writers(out, writer_options(plan)):
            engine.add_writer(w)
        log = BeamLog(engine)
        res = engine.run()
    finally:
        setup.close()
    return engine, log, docs, res, out


@pytest.mark.parametrize("method", ["mapfost", "deepfocus"])
def test_demo_plan_runs_through_the_zeiss_driver_on_the_fake(tmp_path, method):
    from acq.verify import verify_outdir
    from devices.zeiss_tables import MERLIN_STORES
    engine, log, docs, res, out = run_demo(tmp_path, method)
    assert res.status == "success", (res.reason, [i.message for i in engine.incidents])
    errors = [i for i in engine.incidents if i.severity == "error"]
    assert not errors, [i.message for i in errors]

    # everything planned was imaged once and is on disk, verified by the manifest
    tiles = [d for d in docs if d.kind == "tile"]
    overview = [t for t in tiles if t.overview]
    sections = [t for t in tiles if not t.overview]
    assert len(overview) == 4 and len(sections) == 2 * 2 * 2          # 2x2 overview; 2 cycles x 2 sections x 1x2
    assert res.tiles_done == len(tiles)
    rep = verify_outdir(out)
    assert rep.clean, rep.summary()
    ome = sorted((out / "tiles").rglob("*.ome.tif"))
    assert sorted(p.name for p in ome) == sorted(f"{t.tile_id}_v0.ome.tif" for t in tiles)
    with tifffile.TiffFile(ome[0]) as tf:                              # tifffile reads the OME header
        assert tf.is_ome and tf.pages[0].shape == (768, 1024)

    # the autofocus asked for 512x512 (no SmartSEM store): scanned as 1024x768 and cropped
    af = [f for f in log.frames if tuple(f["frame_size"]) == (512, 512)]
    assert af, "no autofocus frames"
    assert all(f["shape"] == (512, 512) and tuple(f["store_size"]) == (1024, 768) and f["cropped_from_store"]
               for f in af)
    # every frame came from a store the microscope has, scanned frozen-to-frozen
    assert {tuple(f["store_size"]) for f in log.frames} <= set(MERLIN_STORES)
    assert len(log.frames) == len(log.api.frames) - 2                 # + the last frame of each irradiation
    assert log.api.grabs_while_live == 0 and not log.api.frames_during_motion()

    # the beam scanned the sample only for frames (and the irradiation): no live scan between frames
    assert log.live_outside_frames() == {}
    irradiated = [(ev, s) for ev, s, _ in log.spans if ev.kind == "irradiate"]
    assert len(irradiated) == 2
    # the tiles' own metadata names their store (full 1024x768 frames: not cropped)
    assert all(tuple(t.metadata["store_size"]) == (1024, 768) and not t.metadata.get("cropped_from_store")
               for t in sections)


def test_smartsem_autofocus_and_autostig_reach_the_best_focus(tmp_path):
    """sem-builtin with stig: CMD_AUTO_FOCUS_FINE, CMD_AUTO_STIG, focus again,
    from a defocused and astigmatic start: the fake world's best focus."""
    from acq.autofocus_step import AutofocusRequest, AUTOFOCUS_METHODS
    from acq.plan import load_plan
    from devices.factory import build_setup
    plan = load_plan(demo_plan(tmp_path, zeiss_setup_file(tmp_path), "sem-builtin"))
    setup = build_setup(plan.setup_config)
    try:
        w = setup.world
        wd0, sx0, sy0 = w.focus_baseline(w.stage_actual.x, w.stage_actual.y)
        setup.sem.set_working_distance(wd0 + 20e-6)
        setup.sem.set_stig(sx0 + 2.0, sy0 - 1.5)
        req = AutofocusRequest(center_um=(0.0, 0.0), pixel_size_m=10e-9, frame_size=(512, 512), dwell_s=100e-9,
                               options={"stig": True})
        t0 = setup.clock.now()
        res = AUTOFOCUS_METHODS["sem-builtin"](setup, req)
        assert res.ok, res.message
        assert abs(res.wd_m - wd0) < 2e-6
        assert abs(res.stig[0] - sx0) < 0.05 and abs(res.stig[1] - sy0) < 0.05
        assert setup.clock.now() - t0 >= 3 * setup.sem.inner.api._com.autofocus_s   # three routines ran
        assert setup.sem.inner.api._com.frozen()                                # frozen again afterwards
    finally:
        setup.close()


def test_demo_plan_with_smartsem_autofocus_and_autostig(tmp_path):
    """The plan's autofocus as SmartSEM's own routines through the engine: they
    scan live only while they run, and leave the focus at the world's best."""
    engine, log, docs, res, out = run_demo(tmp_path, "sem-builtin", cycles=1,
                                           autofocus={"method": "sem-builtin", "options": {"stig": True}})
    assert res.status == "success", (res.reason, [i.message for i in engine.incidents])
    assert not [i for i in engine.incidents if i.severity != "info"], [i.message for i in engine.incidents]
    assert log.live_outside_frames(kinds_allowed=("irradiate", "autofocus")) == {}
    from acq.journal import read_records
    af = [r for r in read_records(out) if r["rec"] == "autofocus_done"]
    assert len(af) == 2 and all(r["ok"] and r["method"] == "sem-builtin" for r in af)
    w = engine.setup.world
    for t in [d for d in docs if d.kind == "tile" and not d.overview]:
        wd0, sx0, sy0 = w.focus_baseline(t.stage["x"], t.stage["y"])
        assert abs(t.wd_m - wd0) < 3e-6 and abs(t.stig[0] - sx0) < 0.05 and abs(t.stig[1] - sy0) < 0.05


def test_a_plan_naming_a_routine_the_sem_lacks_is_refused(tmp_path):
    """The simulator SEM has no built-in autofocus: refused when the plan is
    loaded, naming the field and the missing capability."""
    from acq.plan import load_plan
    from devices.setup_config import ConfigError
    setup_file = write_setup(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_plan(demo_plan(tmp_path, setup_file, "sem-builtin"))
    msg = str(e.value)
    assert "autofocus.method = 'sem-builtin'" in msg and "Capability.AUTOFOCUS" in msg
    path = demo_plan(tmp_path, zeiss_setup_file(tmp_path), "sem-builtin")
    d = yaml.safe_load(path.read_text())
    d["autofocus"]["options"] = {"stig": "yes"}
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"autofocus\.options\.stig = 'yes': allowed true or false"):
        load_plan(path)


def test_sections_from_wafer_truth_only_on_a_simulated_sem(tmp_path):
    """The fake SmartSEM images the simulated wafer, so its truth may place the
    grids; the driver on a real microscope (api: com) has none."""
    from acq.plan import load_plan
    from devices.setup_config import ConfigError
    setup_file = zeiss_setup_file(tmp_path)
    load_plan(demo_plan(tmp_path, setup_file, "mapfost"))
    d = yaml.safe_load(setup_file.read_text())
    d["devices"]["sem"]["options"]["api"] = "com"
    setup_file.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="sections_from = 'wafer_truth': needs a simulated setup"):
        load_plan(demo_plan(tmp_path, setup_file, "mapfost"))
