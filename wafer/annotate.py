"""`wafer annotate`: draw tissue / background polygons on an overview in napari and
write the sparse label image the section detector is trained on.

    python main.py wafer annotate overview.png [--out overview.labels.png] [--polygons P.json]

Labels: wafer.detect_data.labels_from_polygons (1 tissue, 0 drawn background plus the
automatic dilated ring around tissue, 2 ignore).  ``<stem>.polygons.json`` beside it keeps
the polygons (pixels, x = column, y = row) to reopen with --polygons.  Nothing is ever
overwritten.  Everything but open_annotator is free of Qt and napari.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import typer

from common.atomic import atomic_write
from wafer.detect_data import BG_DILATION, labels_from_polygons
from wafer.overview_image import read_overview

LABEL_SUFFIXES = (".png", ".tif", ".tiff")
ELLIPSE_POINTS = 64


# ---------------------------------------------------------------- conversion (pure)
def polygons_from_shapes(data, shape_types) -> list[np.ndarray]:
    """napari shapes-layer data (one (N, D) array of (..., row, col) vertices per shape) and
    shape types -> list of (N, 2) float arrays of (x = col, y = row) pixels.  Polygons and
    rectangles keep their vertices; ellipses (napari keeps the 4 corners of their box, in
    cyclic order) become 64-gons; paths, lines and shapes of < 3 vertices are skipped."""
    data = list(data)
    shape_types = [shape_types] * len(data) if isinstance(shape_types, str) else list(shape_types)
    if len(shape_types) != len(data):
        raise ValueError(f"{len(data)} shapes but {len(shape_types)} shape types")
    out = []
    for verts, kind in zip(data, shape_types):
        rc = np.asarray(verts, float).reshape(len(verts), -1)[:, -2:]
        if kind == "ellipse":
            rc = _ellipse_polygon(rc)
        elif kind not in ("polygon", "rectangle"):
            continue
        if len(rc) >= 3:
            out.append(np.ascontiguousarray(rc[:, ::-1]))
    return out


def _ellipse_polygon(corners: np.ndarray) -> np.ndarray:
    """Outline of the ellipse inscribed in a (possibly rotated) 4-corner box."""
    c = corners.mean(0)
    u = (corners[0] + corners[1]) / 2 - c          # conjugate half-axes: edge midpoints
    v = (corners[1] + corners[2]) / 2 - c
    t = np.linspace(0, 2 * np.pi, ELLIPSE_POINTS, endpoint=False)[:, None]
    return c + np.cos(t) * u + np.sin(t) * v


def shapes_from_polygons(polys) -> list[np.ndarray]:
    """Inverse of polygons_from_shapes for polygons: (x, y) -> napari (row, col)."""
    return [np.asarray(p, float)[:, ::-1].copy() for p in polys]


def annotation_labels(image_shape, tissue, background=(), dilation: int = BG_DILATION) -> np.ndarray:
    """uint8 sparse label image (0 background, 1 tissue, 2 ignore) of an image's size."""
    return labels_from_polygons(tuple(image_shape)[:2], tissue, background, dilation)


# ---------------------------------------------------------------- files
def polygons_path(labels_path: Path) -> Path:
    """``overview.labels.png`` -> ``overview.labels.polygons.json``."""
    labels_path = Path(labels_path)
    return labels_path.with_name(labels_path.stem + ".polygons.json")


def next_free_path(labels_path: Path) -> Path:
    """``labels_path`` if it and its polygons JSON are both free, else the first free
    ``<stem>-2<suffix>``, ``<stem>-3<suffix>``, ... (an explicit new name)."""
    cand = labels_path = Path(labels_path)
    i = 1
    while cand.exists() or polygons_path(cand).exists():
        i += 1
        cand = labels_path.with_name(f"{labels_path.stem}-{i}{labels_path.suffix}")
    return cand


def save_labels(path: Path, labels: np.ndarray) -> Path:
    """Write a uint8 label image as PNG or TIFF, atomically; FileExistsError if it exists."""
    path, labels = Path(path), np.asarray(labels)
    if path.suffix.lower() not in LABEL_SUFFIXES:
        raise ValueError(f"{path}: label image must end in {', '.join(LABEL_SUFFIXES)}")
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"labels must be a 2-D uint8 image, got {labels.dtype} {labels.shape}")
    if path.suffix.lower() == ".png":
        data = cv2.imencode(".png", labels)[1].tobytes()
    else:
        import tifffile
        bio = io.BytesIO()
        tifffile.imwrite(bio, labels, compression="zlib")
        data = bio.getvalue()
    return atomic_write(path, data)


def save_polygons(path: Path, tissue, background, image_shape=None) -> Path:
    """Polygons as JSON {"tissue": [[[x, y], ...], ...], "background": [...]}; never overwrites."""
    doc = {key: [np.round(np.asarray(p, float), 3).tolist() for p in polys]
           for key, polys in (("tissue", tissue), ("background", background))}
    if image_shape is not None:
        doc["image_shape"] = [int(s) for s in tuple(image_shape)[:2]]
    return atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode())


def load_polygons(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(tissue, background) lists of (N, 2) (x, y) arrays; ValueError if malformed."""
    try:
        doc = json.loads(Path(path).read_text())
        out = []
        for key in ("tissue", "background"):
            polys = [np.asarray(p, float) for p in doc.get(key, [])]
            if any(p.ndim != 2 or p.shape[1] != 2 for p in polys):
                raise ValueError(f"'{key}' must be a list of [[x, y], ...] polygons")
            out.append(polys)
    except (OSError, json.JSONDecodeError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{path}: not a polygons JSON ({exc})") from None
    return out[0], out[1]


def save_annotation(labels_path: Path, image_shape, tissue, background) -> tuple[Path, Path]:
    """Label image and its polygons JSON; FileExistsError (nothing written) if either exists."""
    labels_path, poly_path = Path(labels_path), polygons_path(labels_path)
    for p in (labels_path, poly_path):
        if p.exists():
            raise FileExistsError(f"{p} exists; refusing to overwrite it")
    save_labels(labels_path, annotation_labels(image_shape, tissue, background))
    save_polygons(poly_path, tissue, background, image_shape)
    return labels_path, poly_path


# ---------------------------------------------------------------- napari
def open_annotator(overview_path: Path, out_path: Path, polygons_json: Optional[Path] = None, *,
                   image: Optional[np.ndarray] = None, run: bool = True, show: bool = True):
    """napari viewer: the overview plus "tissue" (green) and "background" (red) shapes
    layers.  Shift-S or the "Save labels" button writes the labels + polygons JSON (to
    out_path, or the next free name once that exists).  With run, blocks until the
    window closes, saves unsaved shapes then, and returns the paths written; without,
    returns the session (its .viewer, .save(), .finish())."""
    import napari
    from napari.utils.notifications import show_info
    from qtpy.QtWidgets import QLabel, QPushButton, QVBoxLayout, QWidget
    out_path = Path(out_path)
    img = read_overview(Path(overview_path)) if image is None else np.asarray(image)
    tissue, background = load_polygons(polygons_json) if polygons_json else ([], [])
    viewer = napari.Viewer(title=f"annotate {Path(overview_path).name}", show=show)
    viewer.add_image(img, name="overview", rgb=img.ndim == 3)
    def add(polys, name, edge, face):
        return viewer.add_shapes(shapes_from_polygons(polys), name=name, shape_type="polygon", ndim=2,
                                 edge_width=2, edge_color=edge, face_color=face)
    t_layer = add(tissue, "tissue", "lime", [0, 1, 0, 0.15])          # green edges
    b_layer = add(background, "background", "red", [1, 0, 0, 0.15])
    viewer.layers.selection.active = t_layer
    label = QLabel("not saved yet")

    class Session:
        def __init__(self):
            self.viewer, self.written, self.dirty = viewer, [], False

        def save(self) -> Optional[tuple[Path, Path]]:
            t = polygons_from_shapes(t_layer.data, t_layer.shape_type)
            b = polygons_from_shapes(b_layer.data, b_layer.shape_type)
            if not t and not b:
                self._say("nothing drawn: draw on the 'tissue' / 'background' layers first")
                return None
            paths = save_annotation(next_free_path(out_path), img.shape[:2], t, b)
            self.written += paths
            self.dirty = False
            self._say(f"saved labels {paths[0]} (polygons {paths[1].name})")
            return paths

        def finish(self) -> list[Path]:
            """Save unsaved shapes (window closed); all paths written this session."""
            if self.dirty:
                self.save()
            return list(self.written)

        def _say(self, msg: str) -> None:
            with contextlib.suppress(RuntimeError):     # panel gone: window already closed
                label.setText(msg)
            viewer.status = msg
            show_info(msg)

    session = Session()
    for layer in (t_layer, b_layer):
        layer.events.data.connect(lambda event: setattr(session, "dirty", True))
    viewer.bind_key("Shift-S", lambda v: session.save(), overwrite=True)
    session.panel, session.button = QWidget(), QPushButton("Save labels")
    session.button.clicked.connect(lambda *_: session.save())
    help_text = QLabel(f"tissue: green, background: red\nShift-S saves to {out_path.name}")
    lay = QVBoxLayout(session.panel)
    for w in (help_text, session.button, label):
        lay.addWidget(w)
    help_text.setWordWrap(True)
    label.setWordWrap(True)
    lay.addStretch(1)
    viewer.window.add_dock_widget(session.panel, area="right", name="Annotation")
    if not run:
        return session
    napari.run()
    return session.finish()


# ---------------------------------------------------------------- command
def annotate_cmd(
    overview: Path = typer.Argument(..., help="Overview mosaic (PNG or TIFF)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Label image to write, .png/.tif/.tiff (never "
                                       "overwritten; default: OVERVIEW_STEM.labels.png beside the overview)."),
    polygons: Optional[Path] = typer.Option(None, "--polygons", help="Polygons JSON of an earlier "
                                            "annotation to reopen and edit."),
) -> None:
    """Draw tissue / background polygons on an overview in napari; writes the sparse label image
    (0 background, 1 tissue, 2 ignore, with the automatic dilated background) and its polygons JSON."""
    def fail(msg: str):
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(2)

    if not overview.is_file():
        fail(f"cannot read overview {overview}: no such file")
    out = overview.with_name(overview.stem + ".labels.png") if out is None else out
    if out.suffix.lower() not in LABEL_SUFFIXES:
        fail(f"--out {out}: must end in {', '.join(LABEL_SUFFIXES)}")
    taken = [p for p in (out, polygons_path(out)) if p.exists()]
    if taken:
        fail(f"{taken[0]} exists; refusing to overwrite it (choose another --out, e.g. {next_free_path(out)})")
    try:
        img = read_overview(overview)
    except Exception as exc:                      # cv2/tifffile raise many kinds
        fail(f"cannot read overview {overview}: {exc}")
    try:
        load_polygons(polygons) if polygons is not None else None
    except ValueError as exc:
        fail(f"--polygons: {exc}")
    if importlib.util.find_spec("napari") is None:
        fail("napari is needed for annotation (pip install 'napari[pyqt5]')")
    written = open_annotator(overview, out, polygons, image=img)
    typer.echo("\n".join(f"written  {p}" for p in written) or "nothing written (no shapes drawn)")
