"""`wafer magc import|export`: MagC .magc files <-> the wafer workflow's files.

    python main.py wafer magc import wafer.magc --out magc_in --landmarks-stage stage_landmarks.csv
    python main.py wafer magc export magc_in --out edited.magc --dialect sbemimage

``import`` writes into ``--out`` (never overwriting):

* ``sections.json``: the sections in stage µm, the detection format (wafer/sections.py);
* ``grids.json``: ``{"sections": [{"id", "grids": [...]}], "order": [...]}``, the
  ``sections`` and ``order`` entries of an acquisition plan (acq/plan.py), checked
  by the plan's own schema: one grid per MagC ROI (or per section without ROI);
* ``magc_import.json``: the source, the file -> stage transform, the landmarks
  and, with ``--landmarks-stage``, the registration's residuals.

``export`` reads such a folder (or just a sections JSON file) and writes a .magc
file: sections, grid outlines as ROIs, the order as ``tsporder`` and, after an
import, the landmarks; coordinates go back to the file's frame through the
inverse of the import's transform (``--stage-um`` keeps stage µm).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import typer

magc_app = typer.Typer(help="MagC (.magc) files: import into sections and grids, export back.",
                       no_args_is_help=True)

SECTIONS, GRIDS, INFO = "sections.json", "grids.json", "magc_import.json"
DIALECTS = ("sbemimage", "magfinder")


def _fail(msg: str, code: int = 2):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _plan_sections(imp, dwell_ns: float, overlap_px: int) -> dict:
    """grids.json content, validated by acq.plan's models (the plan reader's)."""
    from pydantic import ValidationError

    from acq.plan import Section as PlanSection

    by_section: dict[int, list] = {}
    for g in imp.grids:
        by_section.setdefault(g.section_id, []).append({
            "id": g.id, "center_um": [g.origin_um[0], g.origin_um[1]],
            "rotation_deg": ((g.rotation_deg + 180.0) % 360.0) - 180.0, "rows": g.rows, "cols": g.cols,
            "pixel_size_nm": g.pixel_size_nm, "frame_size": list(g.frame_size_px), "dwell_ns": dwell_ns,
            "overlap_px": int(overlap_px)})
    sections = []
    for sid in imp.order:
        if sid not in by_section:
            continue
        entry = {"id": sid, "grids": by_section[sid]}
        try:
            PlanSection.model_validate(entry)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ValueError(f"section {sid}: {where}: {err['msg']} (the plan would refuse it)") from None
        sections.append(entry)
    return {"sections": sections, "order": [s["id"] for s in sections]}


@magc_app.callback()
def _main() -> None:
    """MagC import and export."""


@magc_app.command("import")
def import_cmd(
    magc_file: Path = typer.Argument(..., help="MagC file (.magc) from MagFinder or SBEMimage.", exists=True,
                                     dir_okay=False, readable=True),
    out: Path = typer.Option(..., "--out", help="Folder for sections.json, grids.json, magc_import.json "
                             "(existing files are never overwritten)."),
    landmarks_stage: Optional[Path] = typer.Option(
        None, "--landmarks-stage", help="Stage positions (µm) of the file's landmarks: CSV id,x_um,y_um or JSON. "
        "At least 3; fits an affine file -> stage and reports the residuals.", exists=True, dir_okay=False),
    pixel_size_um: Optional[float] = typer.Option(
        None, "--pixel-size-um", help="Without landmarks: µm per file unit (overview pixel size) (default: 1)."),
    origin_um: Optional[Tuple[float, float]] = typer.Option(
        None, "--origin-um", help="Without landmarks: stage X Y (µm) of file point (0, 0) (default: 0 0)."),
    tile_pixel_nm: float = typer.Option(10.0, "--tile-pixel-nm", help="Grid tile pixel size (nm)."),
    frame: Tuple[int, int] = typer.Option((1024, 768), "--frame", help="Grid tile frame W H (px)."),
    overlap_px: int = typer.Option(77, "--overlap-px", help="Overlap of neighbouring tiles (px)."),
    dwell_ns: float = typer.Option(200.0, "--dwell-ns", help="Dwell time written into the grids (ns)."),
    margin_um: float = typer.Option(0.0, "--margin-um", help="Margin around each ROI (µm)."),
) -> None:
    """Import a MagC file into stage-µm sections and grids (one grid per ROI)."""
    from common.atomic import ensure_dir
    from wafer.landmarks import LandmarkError, load_stage_landmarks
    from wafer.magc import MagcFormatError, import_magc
    from wafer.sections import atomic_write_text, save_sections

    targets = [out / n for n in (SECTIONS, GRIDS, INFO)]
    clash = [str(t) for t in targets if t.exists()]
    if clash:
        _fail(f"{', '.join(clash)} exist(s); refusing to overwrite (choose another --out)")
    if landmarks_stage is not None and (pixel_size_um is not None or origin_um is not None):
        _fail("give --landmarks-stage or --pixel-size-um/--origin-um, not both: the landmarks fix scale and origin")
    try:
        stage = load_stage_landmarks(landmarks_stage) if landmarks_stage is not None else None
        imp = import_magc(magc_file, stage_landmarks=stage,
                          um_per_unit=1.0 if pixel_size_um is None else pixel_size_um,
                          origin_um=(0.0, 0.0) if origin_um is None else origin_um,
                          frame_size_px=frame, pixel_size_nm=tile_pixel_nm, overlap_px=overlap_px,
                          margin_um=margin_um)
        grids = _plan_sections(imp, dwell_ns, overlap_px)
    except (MagcFormatError, LandmarkError, ValueError) as exc:
        _fail(str(exc))
    reg = imp.registration
    info = {"source": str(magc_file.resolve()),
            "transform": {"matrix": imp.transform.matrix.tolist(), "offset_um": list(imp.transform.offset),
                          "maps": "file -> stage µm"},
            "landmarks_file": {str(k): list(v) for k, v in imp.landmarks.items()},
            "landmarks_stage_um": {str(k): list(v) for k, v in (stage or {}).items()},
            "registration": reg.to_dict() if reg is not None else None}
    ensure_dir(out)
    save_sections([s for sid in imp.order for s in imp.sections if s.id == sid], targets[0])
    atomic_write_text(targets[1], json.dumps(grids, indent=1) + "\n")
    atomic_write_text(targets[2], json.dumps(info, indent=1) + "\n")
    n_grids = sum(len(s["grids"]) for s in grids["sections"])
    typer.echo(f"{len(imp.sections)} sections, {len(imp.rois)} ROIs, {n_grids} grids, "
               f"{len(imp.landmarks)} landmarks -> {out}")
    if reg is not None:
        typer.echo(reg.summary())
    elif imp.landmarks:
        typer.echo("no --landmarks-stage: file coordinates mapped by pixel size and origin only")


def _load_folder(source: Path):
    """(sections, [(sid, gid, TileGrid)], order, import info or None) from an import folder or a sections file."""
    from acq.plan import Section as PlanSection
    from wafer.sections import load_sections

    if source.is_file():
        sections = load_sections(source)
        return sections, [], [s.id for s in sections], None
    if not (source / SECTIONS).is_file():
        raise FileNotFoundError(f"{source}: no {SECTIONS} (expected a `wafer magc import` folder or a sections file)")
    sections = load_sections(source / SECTIONS)
    grids, order = [], [s.id for s in sections]
    if (source / GRIDS).is_file():
        data = json.loads((source / GRIDS).read_text(encoding="utf-8"))
        for n, entry in enumerate(data.get("sections", [])):
            try:
                ps = PlanSection.model_validate(entry)
            except Exception as exc:
                raise ValueError(f"{source / GRIDS}: sections[{n}]: {exc}") from None
            grids += [(ps.id, g.id, g.geometry) for g in ps.grids]
        known = {s.id for s in sections}
        order = [i for i in data.get("order", []) if i in known]
        order += [s.id for s in sections if s.id not in set(order)]
    info = json.loads((source / INFO).read_text(encoding="utf-8")) if (source / INFO).is_file() else None
    return sections, grids, order, info


@magc_app.command("export")
def export_cmd(
    source: Path = typer.Argument(..., help="A `wafer magc import` folder (sections.json [+ grids.json, "
                                  "magc_import.json]) or a sections JSON file.", exists=True),
    out: Path = typer.Option(..., "--out", help="MagC file to write (never overwritten)."),
    dialect: str = typer.Option("sbemimage", "--dialect", help=f"One of {', '.join(DIALECTS)}."),
    stage_um: bool = typer.Option(False, "--stage-um", help="Write stage µm even after an import with a transform."),
) -> None:
    """Export sections, grids (as ROIs), order and landmarks to a MagC file."""
    import numpy as np

    from common.atomic import FileExists
    from wafer.landmarks import Registration, map_roi, map_section
    from wafer.magc import MagcFormatError, rois_from_grids, write_magc
    from wafer.sections import SectionFormatError

    if dialect not in DIALECTS:
        raise typer.BadParameter(f"expected one of {', '.join(DIALECTS)}, got {dialect!r}", param_hint="--dialect")
    if out.exists():
        _fail(f"{out} exists; refusing to overwrite it")
    try:
        sections, grids, order, info = _load_folder(source)
        rois = rois_from_grids(grids)
        landmarks = {}
        if info is not None:
            t = info["transform"]
            fwd = Registration(np.asarray(t["matrix"], float), tuple(t["offset_um"]), (), ())
            landmarks = {int(k): tuple(v) for k, v in info.get("landmarks_file", {}).items()}
            if stage_um:
                landmarks = {k: tuple(fwd.apply([v])[0].tolist()) for k, v in landmarks.items()}
            else:
                back = fwd.inverse()
                sections = [map_section(back, s) for s in sections]
                rois = [map_roi(back, r) for r in rois]
        write_magc(out, sections, rois, order, landmarks, dialect=dialect)
    except FileExists:
        _fail(f"{out} appeared meanwhile; refusing to overwrite it")
    except KeyError as exc:
        _fail(f"{source / INFO}: missing {exc}")
    except (MagcFormatError, SectionFormatError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    frame = "stage µm" if info is None or stage_um else "the imported file's coordinates"
    typer.echo(f"{len(sections)} sections, {len(rois)} ROIs, {len(landmarks)} landmarks ({dialect}, {frame}) -> {out}")
