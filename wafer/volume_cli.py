"""`python main.py volume ...`: GCIB post-processing of a run folder (seed ch. 2.3.1-2.3.2).

    python main.py volume millrate OUTDIR [--section ID ...] [--out FILE.json]
    python main.py volume flatten OUTDIR [--section ID ...] [--out DIR]
    python main.py volume order OUTDIR [--section ID ...] [--out FILE.json]

Outputs go to OUTDIR/volume/ unless --out says otherwise; nothing is ever
overwritten (a default name that is taken gets the next free number, a given
one that is taken is refused), and nothing is written when an input is bad.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import typer

from wafer import substack as sst
from wafer import volume as vol

volume_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="GCIB volume post-processing of a run: mill rate, flattening, sub-stack order.")

_OUTDIR = typer.Argument(..., help="Output folder of `python main.py run` (finished or running).")
_SECTION = typer.Option(None, "--section", help="Section id (repeat for several) (default: all).")
_LEVEL = typer.Option(0, "--level", min=0, help="Resolution level of the OME-Zarr volume (tiles: binned 2^level).")
_SOURCE = typer.Option("auto", "--source", help="auto (the OME-Zarr volume if the run has one), zarr or tiles.")
_WAFER = typer.Option("auto", "--wafer", help="Wafer signal: bright, dark or auto (brighter or darker at the end).")
_SIGMA = typer.Option(1.0, "--sigma", min=0, help="Smoothing of the breakthrough map (px, seed: 1).")
_DENOISE = typer.Option(1.5, "--denoise", min=0, help="Smoothing of each slice before thresholding (px).")
_K = typer.Option(4.0, "--threshold-sd", min=0, help="Wafer threshold: this many noise s.d. from the wafer's "
                  "level (0: Otsu, the seed's).")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _free(default: Path, explicit: Optional[Path], targets: Callable[[Path], list[Path]]) -> Path:
    """``explicit`` if none of its targets exists (else refused); otherwise
    ``default`` or the first numbered variant whose targets are all free."""
    if explicit is not None:
        taken = [p for p in targets(explicit) if p.exists()]
        if taken:
            _fail(f"--out {explicit}: {taken[0]} exists; refusing to overwrite it (give another --out)")
        return explicit
    for n in range(1000):
        cand = default if n == 0 else default.with_name(f"{default.stem}_{n}{default.suffix}")
        if not any(p.exists() for p in targets(cand)):
            return cand
    _fail(f"{default.parent}: no free name for {default.name}; give --out")


def _write(path: Path, data: bytes) -> None:
    from common.atomic import FileExists, atomic_write
    try:
        atomic_write(path, data)
    except FileExists:
        _fail(f"{path} appeared meanwhile; refusing to overwrite it")


def _substacks(run: sst.RunInfo, section, level: int, source: str, wafer: str) -> list[sst.SubStack]:
    return [sst.register(sst.load_substack(run, s, level, source), wafer)
            for s in sst.pick_sections(run.out_dir, section)]


def _stats(m: np.ndarray) -> tuple[float, float]:
    v = m[np.isfinite(m)]
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


def _map_tiff(sub: sst.SubStack, maps: dict, keys: list[str], info: dict) -> bytes:
    """Float32 OME-TIFF (C, Y, X): one channel per map, pixel size and Plane
    PositionX/Y = stage µm of the centre of pixel (0, 0), as the tiles say."""
    import tifffile
    from acq.writers.ome_tiff import POSITION_CONVENTION, POSITION_KEY
    data = np.stack([maps[k] for k in keys]).astype(np.float32)
    n = len(keys)
    md = {"axes": "CYX", "Name": f"mill rate section {sub.section_id:04d}",
          "PhysicalSizeX": sub.pixel_um, "PhysicalSizeXUnit": "µm",
          "PhysicalSizeY": sub.pixel_um, "PhysicalSizeYUnit": "µm", "Channel": {"Name": keys},
          "Plane": {"PositionX": [sub.origin_um[0]] * n, "PositionXUnit": ["µm"] * n,
                    "PositionY": [sub.origin_um[1]] * n, "PositionYUnit": ["µm"] * n},
          "Description": json.dumps({POSITION_KEY: POSITION_CONVENTION, **info})}
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, ome=True, photometric="minisblack", metadata=md)
    return buf.getvalue()


MAPS = ["nm_per_cycle", "nm_per_s", "um3_per_s_per_na", "cycles"]


@volume_app.command("millrate")
def millrate_cmd(outdir: Path = _OUTDIR, section: Optional[list[int]] = _SECTION,
                 out: Optional[Path] = typer.Option(None, "--out", help="Summary JSON (default: "
                                                    "OUTDIR/volume/millrate.json); beside it <stem>.csv and the "
                                                    "maps <stem>_sSSSS.ome.tif."),
                 thickness_nm: Optional[float] = typer.Option(None, "--thickness-nm", help="Section thickness "
                                                              "(default: the plan's, else the simulated wafer's)."),
                 current_na: Optional[float] = typer.Option(None, "--current-na", help="Ion target current "
                                                            "(default: the plan's mill.current_na)."),
                 raster_area_um2: Optional[float] = typer.Option(None, "--raster-area-um2", help="Milled area "
                                                                 "(default: raster_vpp x the setup's calibration)."),
                 level: int = _LEVEL, source: str = _SOURCE, wafer: str = _WAFER, sigma: float = _SIGMA,
                 denoise: float = _DENOISE, threshold_sd: float = _K) -> None:
    """Mill-rate maps from the per-pixel breakthrough to the wafer (nm/cycle, nm/s, µm³/s per nA).

    Per section: registered sub-stack, last tissue slice per pixel, the mills
    until it was gone; a float32 OME-TIFF of the maps, mean ± s.d. printed."""
    try:
        run = sst.read_run(outdir)
        mp = vol.mill_params(run, thickness_nm, current_na, raster_area_um2)
        subs = _substacks(run, section, level, source, wafer)
        results, skipped = [], []
        for sub in subs:
            try:
                results.append((sub, vol.millrate_maps(sub, run, mp, wafer, sigma, denoise, threshold_sd)))
            except sst.VolumeError as e:
                if section:                      # a section asked for by name must have a result
                    raise
                skipped.append(str(e))
        if not results:
            raise sst.VolumeError("; ".join(skipped))
    except sst.VolumeError as e:
        _fail(str(e))
    base = outdir / "volume" / "millrate.json"
    ids = [sub.section_id for sub, _ in results]

    def targets(p: Path) -> list[Path]:
        return [p, p.with_suffix(".csv")] + [p.with_name(f"{p.stem}_s{i:04d}.ome.tif") for i in ids]
    dest = _free(base, out, targets)
    rows = []
    for sub, m in results:
        c_mean, c_sd = _stats(m["cycles"])
        row = {"section": sub.section_id, "map": targets(dest)[2 + ids.index(sub.section_id)].name,
               "source": sub.source, "cycles": [sub.cycles[0], sub.cycles[-1]], "slices": len(sub.cycles),
               "pixel_um": sub.pixel_um, "origin_um": list(sub.origin_um),
               "pixels": int(sub.valid.sum()), "breakthrough_pixels": int(np.isfinite(m["cycles"]).sum()),
               "max_registration_shift_px": float(np.abs(sub.shifts_px).max(initial=0)),
               "cycles_to_breakthrough": [c_mean, c_sd],
               "pixel_mean_nm_per_cycle": mp.thickness_nm / c_mean}       # the seed's pixel-mean rate
        for k in MAPS[:3]:
            row[k] = list(_stats(m[k]))
        rows.append(row)
    summary = {"outdir": str(outdir), "thickness_nm": mp.thickness_nm, "current_na": mp.current_na,
               "raster_area_um2": mp.area_um2, "from": mp.sources,
               "mill_s_per_cycle": {str(c): s for c, s in sorted(run.mill_s.items())},
               "maps": {"channels": MAPS, "nan": "no breakthrough, or not imaged in every cycle"},
               "skipped": skipped, "sections": rows}
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["section", "pixels", "breakthrough_pixels", "nm_per_cycle", "nm_per_cycle_sd", "nm_per_s",
                "nm_per_s_sd", "um3_per_s_per_na", "um3_per_s_per_na_sd", "map"])
    for r in rows:
        w.writerow([r["section"], r["pixels"], r["breakthrough_pixels"], *r["nm_per_cycle"], *r["nm_per_s"],
                    *r["um3_per_s_per_na"], r["map"]])
    for (sub, m), path in zip(results, targets(dest)[2:]):
        _write(path, _map_tiff(sub, m, MAPS, {"section_id": sub.section_id, "thickness_nm": mp.thickness_nm,
                                               "current_na": mp.current_na, "raster_area_um2": mp.area_um2,
                                               "cycles": sub.cycles}))
    _write(dest.with_suffix(".csv"), table.getvalue().encode())
    _write(dest, (json.dumps(summary, indent=1) + "\n").encode())
    typer.echo(f"thickness {mp.thickness_nm:g} nm ({mp.sources['thickness']}), current {mp.current_na:g} nA, "
               f"milled area {mp.area_um2:.4g} µm²")
    for r in rows:
        (a, b), (c, d), (e, f) = r["nm_per_cycle"], r["nm_per_s"], r["um3_per_s_per_na"]
        typer.echo(f"section {r['section']:04d}: {a:.3g} ± {b:.2g} nm/cycle, {c:.3g} ± {d:.2g} nm/s, "
                   f"{e:.3g} ± {f:.2g} µm³/s/nA  ({r['breakthrough_pixels']}/{r['pixels']} px broke through, "
                   f"cycles {r['cycles'][0]}..{r['cycles'][1]}) -> {r['map']}")
    for s in skipped:
        typer.echo(f"skipped: {s}")
    typer.echo(f"written: {dest}, {dest.with_suffix('.csv').name}")


def _write_zarr(dest: Path, sub: sst.SubStack, flat: np.ndarray, slice_um: float, levels: int = 3) -> Path:
    """One OME-Zarr (zarr v3, NGFF 0.5) per section, built under a temporary
    name and renamed into place (zarr_store.Volumes); levels are 2x2 means."""
    import cv2
    import zarr
    from zarr.codecs import ZstdCodec
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    from acq.writers.stage_frame import AXES, ngff_datasets
    from acq.writers.zarr_store import Volumes
    z, h, w = flat.shape
    u8 = sub.dtype == "uint8"                     # keep the run's 8 bits (0 = not imaged, as in its volumes)
    data = np.clip(np.rint(np.nan_to_num(flat, nan=0.0)), 0, 255).astype(np.uint8) if u8 else flat.astype(np.float32)
    levels = max(1, min(levels, int(np.log2(max(1, min(h, w) // 16))) + 1))
    pyramid = [data]
    for _ in range(1, levels):
        prev = pyramid[-1]
        hh, ww = prev.shape[1] // 2, prev.shape[2] // 2
        pyramid.append(np.stack([cv2.resize(p, (ww, hh), interpolation=cv2.INTER_AREA) for p in prev]))
    origin = (sub.origin_um[0] / sub.pixel_um, sub.origin_um[1] / sub.pixel_um)

    def make(store) -> None:
        g = zarr.open_group(store=store, mode="w-", zarr_format=3)
        for l, a in enumerate(pyramid):
            arr = g.create_array(str(l), shape=a.shape, chunks=(1, min(512, a.shape[1]), min(512, a.shape[2])),
                                 dtype=a.dtype, fill_value=0 if u8 else float("nan"), dimension_names=("z", "y", "x"),
                                 compressors=ZstdCodec(level=1))
            arr[...] = a
        write_multiscales_metadata(g, ngff_datasets(levels, slice_um, origin, sub.pixel_um * 1e-6),
                                   fmt=FormatV05(), axes=AXES, name=f"section {sub.section_id:04d} flattened")
        g.attrs["gcib_flatten"] = {"section_id": sub.section_id, "source": sub.source, "cycles": sub.cycles,
                                   "z": "depth fraction of the section (slice k = k / z of its thickness)",
                                   "registration_shift_px": sub.shifts_px.tolist()}
    v = Volumes(dest)
    v.base = dest                                 # the stores go straight into DIR, not DIR/zarr
    v.build(sub.section_id, make)
    return v.path(sub.section_id)


@volume_app.command("flatten")
def flatten_cmd(outdir: Path = _OUTDIR, section: Optional[list[int]] = _SECTION,
                out: Optional[Path] = typer.Option(None, "--out", help="Folder for the SSSS.ome.zarr stores "
                                                   "(default: OUTDIR/volume/flattened)."),
                thickness_nm: Optional[float] = typer.Option(None, "--thickness-nm", help="Section thickness: sets "
                                                             "the z scale (default: the plan's / simulated wafer's)."),
                level: int = _LEVEL, source: str = _SOURCE, wafer: str = _WAFER, sigma: float = _SIGMA,
                denoise: float = _DENOISE, threshold_sd: float = _K) -> None:
    """Flattened sub-stacks (seed Fig. 2.7), one OME-Zarr per section.

    Each pixel column's tissue slices stretched over the full z extent
    (interp1d), so every slice shows one depth fraction of the section."""
    try:
        run = sst.read_run(outdir)
        vol.require_mills(run)
        thickness_nm, _ = vol.section_thickness(run, thickness_nm)
        subs = _substacks(run, section, level, source, wafer)
        flats = [vol.flattened(s, wafer, sigma, denoise, threshold_sd) for s in subs]
    except sst.VolumeError as e:
        _fail(str(e))
    dest = _free(outdir / "volume" / "flattened", out,
                 lambda d: [d / f"{s.section_id:04d}.ome.zarr" for s in subs])
    for sub, flat in zip(subs, flats):
        path = _write_zarr(dest, sub, flat, thickness_nm * 1e-3 / flat.shape[0])
        typer.echo(f"section {sub.section_id:04d}: {flat.shape[0]} slices of {flat.shape[2]} x {flat.shape[1]} px "
                   f"({sub.pixel_um:g} µm, z {thickness_nm / flat.shape[0]:.3g} nm) -> {path}")


@volume_app.command("order")
def order_cmd(outdir: Path = _OUTDIR, section: Optional[list[int]] = _SECTION,
              out: Optional[Path] = typer.Option(None, "--out", help="Order JSON (default: OUTDIR/volume/order.json)."),
              level: int = _LEVEL, source: str = _SOURCE, wafer: str = _WAFER, sigma: float = _SIGMA,
              denoise: float = _DENOISE,
              threshold_sd: float = typer.Option(0.0, "--threshold-sd", min=0, help="Wafer threshold as for "
                                                 "millrate; 0 (Otsu): the last slice kept still shows the tissue "
                                                 "clearly, not a thin film over the wafer.")) -> None:
    """Z-order of the sections' sub-stacks by cross-correlation.

    Each flattened sub-stack's last slice against every other's first,
    registered by a template search (NCC); the best chain is printed."""
    try:
        subs = _substacks(sst.read_run(outdir), section, level, source, wafer)
        if len(subs) < 2:
            raise sst.VolumeError(f"--section: {len(subs)} section; ordering needs at least 2")
        flats = [sst.denoise(vol.flattened(s, wafer, sigma, denoise, threshold_sd), denoise) for s in subs]
        res = vol.order([f[0] for f in flats], [f[-1] for f in flats])
    except sst.VolumeError as e:
        _fail(str(e))
    ids = [s.section_id for s in subs]
    dest = _free(outdir / "volume" / "order.json", out, lambda p: [p])
    doc = {"outdir": str(outdir), "order": [ids[i] for i in res.order], "link_ncc": res.link_scores,
           "sections": ids, "score_matrix": [[None if not np.isfinite(v) else float(v) for v in r]
                                             for r in res.score_matrix],
           "score": "S[a][b] = NCC(last flattened slice of a, first slice of b, registered)"}
    _write(dest, (json.dumps(doc, indent=1) + "\n").encode())
    typer.echo("order (top first): " + " ".join(str(i) for i in doc["order"]))
    typer.echo("link NCC:          " + " ".join(f"{v:.2f}" for v in res.link_scores))
    typer.echo(f"written: {dest}")
