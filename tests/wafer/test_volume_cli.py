"""`python main.py volume millrate|flatten|order` on real simulated runs
(the engine through `acq.cli.run_plan`, as `python main.py run` does),
checked against the simulator's own truth.

Two runs, each made once per module:
* coarse: 2 sections at 2 µm pixels (2 tiles of 128 x 96 px each), mill
  inhomogeneity 0.3, 12.5 nm per mill of the 250 nm sections over 48 cycles:
  the breakthrough spreads over cycles ~12..47, and the per-pixel mill rate
  can be compared with the true one (nominal rate x the wafer's field).
* serial: 4 sections at 20 nm pixels on the procedural neuropil; the
  simulated wafer shows section k k x 250 nm deeper in the block
  (VirtualWafer.serial_depth), so the sections' true z-order is their id order.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from scipy import ndimage
from typer.testing import CliRunner

from tests.support.engine_runs import write_plan, write_setup

CURRENT_NA, MILL_S = 5.0, 10.0            # TINY's mill.current_na (the emulated gun's target current too)
RATE = 0.25                               # nm/s per nA: 12.5 nm per mill
ZARR = {"writers": ["ome_tiff", "ome_zarr"], "options": {"ome_zarr": {"zarr_chunk": 64, "zarr_shard": 128}}}
AREA_UM2 = (2.0 * 1.1e3) ** 2             # raster_vpp 2 x 2 Vpp at 1.1 mm/Vpp (configs/sim.yaml)


def make_run(folder, sections, cycles, rate, grid, wafer=None, specimen=None, stage=None, mill=True):
    from acq.cli import run_plan
    folder.mkdir()
    setup = write_setup(folder, sections=sections, mill_rate_nm_per_s_per_na=rate)
    d = yaml.safe_load(setup.read_text())
    d["simulation"]["wafer"].update(wafer or {})
    d["simulation"]["stage"].update(stage or {})
    if specimen is not None:
        d["simulation"]["specimen"] = specimen
    setup.write_text(yaml.safe_dump(d))
    mill_step = {"duration_s": MILL_S, "check_interval_s": MILL_S, "delay_s": 0} if mill else None
    plan = write_plan(folder, setup, irradiation=None, cycles=cycles, grid_template=grid, output=ZARR,
                      mill=mill_step)
    assert run_plan(plan, out=folder / "out") == 0
    return folder / "out", setup


@pytest.fixture(scope="module")
def coarse(tmp_path_factory):
    grid = {"rows": 1, "cols": 2, "pixel_size_nm": 2000, "frame_size": [128, 96], "dwell_ns": 100,
            "overlap_px": 8, "rotation_deg": 0}
    return make_run(tmp_path_factory.mktemp("vol") / "coarse", 2, 48, RATE, grid,
                    wafer={"mill_inhomogeneity": 0.3})


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    grid = {"rows": 1, "cols": 1, "pixel_size_nm": 20, "frame_size": [128, 128], "dwell_ns": 200,
            "overlap_px": 8, "rotation_deg": 0}
    # 50 nm per mill: through the 250 nm in ~5 of 8 cycles; a stage repeating to 0.1 µm (5 px) leaves most
    # of each frame imaged in every cycle
    return make_run(tmp_path_factory.mktemp("vol") / "serial", 4, 8, 1.0, grid,
                    wafer={"rotation_jitter_deg": 0.0},
                    specimen={"images": [], "slice_thickness_nm": 50.0, "seed": 0},
                    stage={"repeatability_um": 0.1})


def cli(*args):
    from main import app
    return CliRunner().invoke(app, ["volume", *map(str, args)])


def true_rate_nm_per_cycle(setup_path, section, shape, origin_um, pixel_um):
    """The simulator's mill rate at each map pixel: nominal depth per mill x
    the section's inhomogeneity field (devices/sim/wafer.py), sampled at the
    pixel centres' stage positions."""
    from devices.setup_config import load_setup
    from devices.sim.wafer import VirtualWafer
    field, _mask, fx0, fy0, res = VirtualWafer(load_setup(setup_path).simulation.wafer)._field(section)
    ii, jj = np.mgrid[0:shape[0], 0:shape[1]]
    x_m, y_m = (origin_um[0] + jj * pixel_um) * 1e-6, (origin_um[1] + ii * pixel_um) * 1e-6
    f = ndimage.map_coordinates(field, [(y_m - fy0) / res, (x_m - fx0) / res], order=1, mode="nearest")
    return RATE * CURRENT_NA * MILL_S * f


# ------------------------------------------------------------ millrate
def test_millrate_matches_the_simulated_truth(coarse):
    import tifffile

    from acq.verify import verify_outdir
    out, setup = coarse
    res = cli("millrate", out)
    assert res.exit_code == 0, res.output
    print(res.output)
    summary = json.loads((out / "volume/millrate.json").read_text())
    assert summary["thickness_nm"] == 250 and summary["current_na"] == CURRENT_NA
    assert summary["raster_area_um2"] == pytest.approx(AREA_UM2)
    assert set(summary["mill_s_per_cycle"].values()) == {MILL_S}
    assert (out / "volume/millrate.csv").read_text().startswith("section,")
    errors = []
    for row in summary["sections"]:
        assert f"section {row['section']:04d}: " in res.output and " nm/cycle, " in res.output
        with tifffile.TiffFile(out / "volume" / row["map"]) as tf:
            maps, xml = tf.asarray(), tf.ome_metadata
        assert maps.dtype == np.float32 and maps.shape[0] == 4
        assert f'PhysicalSizeX="{row["pixel_um"]}"' in xml and f'PositionX="{row["origin_um"][0]}"' in xml
        per_cycle, per_s, per_na = maps[0], maps[1], maps[2]
        ok = np.isfinite(per_cycle)
        assert ok.sum() >= 0.8 * row["pixels"]              # most pixels broke through within 48 cycles
        np.testing.assert_allclose(per_s[ok], per_cycle[ok] / MILL_S, rtol=1e-5)
        np.testing.assert_allclose(per_na[ok], per_s[ok] * 1e-3 * AREA_UM2 / CURRENT_NA, rtol=1e-5)
        truth = true_rate_nm_per_cycle(setup, row["section"], per_cycle.shape, row["origin_um"], row["pixel_um"])
        rel = (per_cycle[ok] - truth[ok]) / truth[ok]
        errors.append((np.abs(rel).mean(), per_cycle[ok].mean() / truth[ok].mean() - 1))
        assert np.corrcoef(per_cycle[ok], truth[ok])[0, 1] > 0.9      # the map follows the inhomogeneity
        assert row["nm_per_cycle"][0] == pytest.approx(float(per_cycle[ok].mean()), rel=1e-4)
    print("mean |error| per pixel, error of the mean:", [(round(float(a), 3), round(float(b), 3)) for a, b in errors])
    assert all(a <= 0.10 and abs(b) <= 0.10 for a, b in errors), errors
    assert verify_outdir(out).ok                 # derived outputs do not count as unlisted data


def test_outputs_are_never_overwritten(coarse):
    out, _ = coarse
    res = cli("millrate", out, "--section", 0)
    assert res.exit_code == 0, res.output
    assert "millrate_1.json" in res.output and (out / "volume/millrate_1_s0000.ome.tif").is_file()
    before = (out / "volume/millrate.json").read_bytes()
    res = cli("millrate", out, "--section", 0, "--out", out / "volume/millrate.json")
    assert res.exit_code == 2 and "exists; refusing to overwrite" in res.output
    assert (out / "volume/millrate.json").read_bytes() == before


# ------------------------------------------------------------ flatten
def test_flatten_makes_the_breakthrough_flat(coarse):
    import zarr

    from tests.support.zarr_checks import ngff_levels
    from wafer import postprocess as pp
    from wafer import substack as sst
    from wafer import volume as vol
    out, _ = coarse
    res = cli("flatten", out, "--section", 1)
    assert res.exit_code == 0, res.output
    root = out / "volume/flattened/0001.ome.zarr"
    (scale, shift), *_ = ngff_levels(root)                    # NGFF 0.5, validated by ome-zarr-models
    sub = sst.register(sst.load_substack(sst.read_run(out), 1))
    z = len(sub.cycles)
    assert scale == pytest.approx([0.25 / z, sub.pixel_um, sub.pixel_um])
    assert shift == pytest.approx([0.0, sub.origin_um[1], sub.origin_um[0]])
    flat = zarr.open_group(root, mode="r")["0"][:].astype(np.float32)
    assert flat.shape == sub.stack.shape
    # the last tissue slice, segmented as the command does, before and after flattening, where it broke through
    b = vol.breakthrough(sub)
    flat[:, ~sub.valid] = np.nan
    before = pp.raw_last_tissue_index(pp.wafer_mask(b.denoised, **b.segment))[b.real]
    after = pp.raw_last_tissue_index(pp.wafer_mask(sst.denoise(flat, 1.5), **b.segment))[b.real]
    b5, b95 = np.percentile(before, [5, 95])
    a5, a95 = np.percentile(after, [5, 95])
    near_end = (after >= z - 2).mean()            # the rounded, smoothed index may keep one wafer slice
    print(f"last tissue slice, 5-95 %: {b5:g}..{b95:g} before, {a5:g}..{a95:g} after flattening; "
          f"{near_end:.1%} in the last two slices after ({(before >= z - 2).mean():.1%} before)")
    assert b95 - b5 > 10                          # a slanted breakthrough over many cycles ...
    assert a95 - a5 <= 1 and near_end > 0.95      # ... stretched over every slice: flat
    np.testing.assert_allclose(flat[0][sub.valid], sub.stack[0][sub.valid], atol=0.5)     # the surface stays


def test_zarr_volume_and_tiles_give_the_same_substack(coarse):
    from wafer import substack as sst
    out, _ = coarse
    run = sst.read_run(out)
    a, b = sst.load_substack(run, 0, source="zarr"), sst.load_substack(run, 0, source="tiles")
    assert a.cycles == b.cycles == list(range(48)) and a.pixel_um == pytest.approx(b.pixel_um)
    dx, dy = (round((q - p) / a.pixel_um) for p, q in zip(a.origin_um, b.origin_um))
    h, w = b.stack.shape[1:]
    a_part = a.stack[:, dy:dy + h, dx:dx + w]
    both = np.isfinite(a_part) & np.isfinite(b.stack)
    assert both.sum() > 0.9 * np.isfinite(b.stack).sum()
    np.testing.assert_array_equal(a_part[both], b.stack[both])


# ------------------------------------------------------------ order
def test_order_recovers_the_serial_sections(serial):
    from wafer import substack as sst
    from wafer import volume as vol
    out, _ = serial
    res = cli("order", out, "--section", 2, "--section", 0, "--section", 3, "--section", 1)
    assert res.exit_code == 0, res.output
    print(res.output)
    assert "order (top first): 0 1 2 3" in res.output
    doc = json.loads((out / "volume/order.json").read_text())
    assert doc["order"] == [0, 1, 2, 3] and doc["sections"] == [2, 0, 3, 1]
    # the library call on the sub-stacks in a shuffled order gives back that permutation
    run = sst.read_run(out)
    flats = [sst.denoise(vol.flattened(sst.register(sst.load_substack(run, s)), k=0.0), 1.5) for s in range(4)]
    perm = [3, 1, 0, 2]
    res = vol.order([flats[i][0] for i in perm], [flats[i][-1] for i in perm])
    assert [perm[i] for i in res.order] == [0, 1, 2, 3]
    assert min(res.link_scores) > 0.5


# ------------------------------------------------------------ bad input
def test_bad_input_is_refused_naming_it(tmp_path, coarse):
    out, _ = coarse
    for args, expect in (
            (("millrate", tmp_path / "nowhere"), "not a folder"),
            (("millrate", tmp_path), "no journal.jsonl"),
            (("millrate", out, "--section", 7), "--section 7: not in this run; allowed: 0, 1"),
            (("flatten", out, "--source", "png"), "--source 'png': allowed auto, zarr, tiles"),
            (("millrate", out, "--wafer", "grey"), "--wafer 'grey': allowed auto, bright, dark"),
            (("flatten", out, "--level", 5), "--level 5: "),
            (("order", out, "--section", 0), "ordering needs at least 2")):
        res = cli(*args)
        assert res.exit_code == 2 and expect in res.output, (args, res.output)
    grid = {"rows": 1, "cols": 1, "pixel_size_nm": 2000, "frame_size": [64, 48], "dwell_ns": 100,
            "overlap_px": 0, "rotation_deg": 0}
    no_mill, _ = make_run(tmp_path / "no_mill", 1, 1, RATE, grid, mill=False)
    shallow, _ = make_run(tmp_path / "shallow", 1, 3, 0.01, grid)      # 0.5 nm per mill: no breakthrough
    for args, expect in ((("millrate", no_mill), "no mill_done record"),
                         (("flatten", no_mill), "no mill_done record"),
                         (("millrate", shallow), "section 0: no pixel breaks through to the wafer in cycles 0..2"),
                         (("flatten", shallow, "--section", 0), "no pixel breaks through")):
        res = cli(*args)
        assert res.exit_code == 2 and expect in res.output, (args, res.output)
    assert not (no_mill / "volume").exists() and not (shallow / "volume").exists()
