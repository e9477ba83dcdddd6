"""Where the writers put things, the small per-tile record they share, and the
base of the writers that write per section and cycle (PlaneWriter).

Every writer derives its paths from here so that the OME-TIFF, its MIPmaps,
the Render tile specs and the TrakEM2 lists always agree on a file's name.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from acq.documents import CatchUp, DocumentRouter, RunStart, RunStop, SectionDone, TileEvent

if TYPE_CHECKING:
    from acq.writers.manifest import WrittenFile

log = logging.getLogger(__name__)

OME_NS = "acq/tile-metadata/v1"          # MapAnnotation namespace holding the JSON header
META_KEY = "acq.tile"                     # its key

_TILE_NAME = re.compile(r"^(?P<tid>.+)_v(?P<ver>\d+)\.ome\.tif$")


def tile_relpath(section: int, cycle: int, tile_id: str, version: int) -> str:
    return f"tiles/{section:04d}/{cycle:04d}/{tile_id}_v{version}.ome.tif"


MIPMAP_EXT = "tif"


def mipmap_source_root(url_root: str | None = None) -> str:
    """The path part of ``url_root`` (where the Render server finds OUTDIR),
    without its leading '/': what a MIPmap's path mirrors of where its tile
    lives. '' without one: a local run's layout does not name the local
    folder, so OUTDIR can move and two runs lay their MIPmaps out alike."""
    from urllib.parse import unquote, urlparse
    if not url_root:
        return ""
    # a Windows drive ('C:') cannot be a folder name; Render servers never see such paths anyway
    return unquote(urlparse(url_root).path).replace(":", "").strip("/")


def mipmap_relpath(level: int, level0_rel: str, prefix: str = "mipmaps", source_root: str = "") -> str:
    """ASAP's create_mipmaps and Render's MipmapPathBuilder both derive level n
    of a tile as {mipmap root}/{n}/{level-0 path without its leading '/'}.{ext},
    the extension appended to the tile's own (x.ome.tif -> x.ome.tif.tif).
    With ``source_root`` = mipmap_source_root(image_url_root) and the mipmap
    root at {image_url_root}/{prefix}, that derivation finds these files."""
    src = f"{source_root}/{level0_rel}" if source_root else level0_rel
    return f"{prefix}/{level}/{src}.{MIPMAP_EXT}"


def render_tile_id(tile_id: str, version: int) -> str:
    return tile_id if version == 0 else f"{tile_id}_v{version}"


def to_jsonable(obj: Any) -> Any:
    """json.dumps default: numpy scalars/arrays, paths, tuples from dataclasses."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(obj: Any, **kw) -> str:
    return json.dumps(obj, default=to_jsonable, **kw)


def pixel_stage_m(centre_m, pixel_m: float, shape_hw, rotation_deg: float,
                  col: float = 0.0, row: float = 0.0) -> tuple[float, float]:
    """Stage position of the CENTRE of pixel (col, row) of a frame whose stage
    position ``centre_m`` is the frame's geometric centre (the simulator puts
    pixel centre ((w-1)/2, (h-1)/2) there): centre + R(rotation) @
    (col + 1/2 - w/2, row + 1/2 - h/2) * pixel, the convention of
    TileRecord.frame_topleft_px. Any unit, as long as centre and pixel agree."""
    h, w = shape_hw
    th = math.radians(rotation_deg)
    c, s = math.cos(th), math.sin(th)
    u, v = (col + 0.5 - w / 2.0) * pixel_m, (row + 0.5 - h / 2.0) * pixel_m
    return centre_m[0] + c * u - s * v, centre_m[1] + s * u + c * v


@dataclass(frozen=True)
class TileRecord:
    """What tile specs and import lists need of a tile (no pixels)."""
    tile_id: str
    version: int
    cycle: int
    section_id: int
    grid_id: int
    row: int
    col: int
    width: int
    height: int
    pixel_size_m: float
    stage_x_m: float
    stage_y_m: float
    rotation_deg: float
    detector: Optional[str] = None      # what the SEM reported (frame metadata): Render's cameraId

    @property
    def rel_path(self) -> str:
        return tile_relpath(self.section_id, self.cycle, self.tile_id, self.version)

    @property
    def center_px(self) -> tuple[float, float]:
        """The stage position (= the frame centre) in stage pixels."""
        return self.stage_x_m / self.pixel_size_m, self.stage_y_m / self.pixel_size_m

    def pixel_stage_m(self, col: float = 0.0, row: float = 0.0) -> tuple[float, float]:
        """Stage position (m) of the centre of image pixel (col, row); pixel
        (0, 0) is what the OME-TIFF's Plane PositionX/Y gives (in µm)."""
        return pixel_stage_m((self.stage_x_m, self.stage_y_m), self.pixel_size_m, (self.height, self.width),
                             self.rotation_deg, col, row)

    def frame_topleft_px(self, rotation_deg: float | None = None) -> tuple[float, float]:
        """Top-left corner in the SECTION frame: stage pixels turned by
        -rotation_deg (the tile's own by default), where the grid's tiles are
        axis-aligned. Convention (as the simulator and the engine use it):
        image pixel (col j, row i) lies at centre + R(rotation) @ (j - w/2, i - h/2)
        in stage pixels, R = [[cos, -sin], [sin, cos]]; at 0 deg +x stage = +col."""
        th = math.radians(self.rotation_deg if rotation_deg is None else rotation_deg)
        c, s = math.cos(th), math.sin(th)
        x, y = self.center_px
        return c * x + s * y - self.width / 2.0, -s * x + c * y - self.height / 2.0

    @classmethod
    def from_header(cls, h: dict) -> "TileRecord":
        shape = h["shape"]
        return cls(tile_id=h["tile_id"], version=int(h["version"]), cycle=int(h["cycle"]),
                   section_id=int(h["section_id"]), grid_id=int(h["grid_id"]),
                   row=int(h["row"]), col=int(h["col"]), width=int(shape[1]), height=int(shape[0]),
                   pixel_size_m=float(h["pixel_size_m"]), stage_x_m=float(h["stage"]["x"]),
                   stage_y_m=float(h["stage"]["y"]), rotation_deg=float(h.get("rotation_deg") or 0.0),
                   detector=(h.get("metadata") or {}).get("detector"))

    @classmethod
    def from_doc(cls, doc) -> "TileRecord":
        return cls.from_header(doc.header())


def map_annotation_json(xml: str, key: str, source: Any = "") -> Any:
    """The JSON value stored under ``key`` in an OME-XML MapAnnotation
    (as our OME-TIFF writers store it); ValueError if absent."""
    m = re.search(r'<M K="%s">(.*?)</M>' % re.escape(key), xml or "", re.S)
    if not m:
        raise ValueError(f"{source}: no {key} annotation")
    from xml.sax.saxutils import unescape
    return json.loads(unescape(m.group(1), {"&quot;": '"', "&apos;": "'"}))


def read_tile_header(path: Path) -> dict:
    """The JSON header embedded in one of our OME-TIFFs (reads the XML only)."""
    import tifffile
    with tifffile.TiffFile(path) as tf:
        xml = tf.ome_metadata or ""
    return map_annotation_json(xml, META_KEY, path)


def latest_versions(out_dir: Path, section: int, cycle: int) -> dict[str, int]:
    """tile_id -> highest version on disk for one section and cycle."""
    folder = Path(out_dir) / f"tiles/{section:04d}/{cycle:04d}"
    best: dict[str, int] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _TILE_NAME.match(p.name)
            if m:
                v = int(m["ver"])
                if v > best.get(m["tid"], -1):
                    best[m["tid"]] = v
    return best


def tile_on_disk(out_dir: Path, section: int, cycle: int, tile_id: str, version: int) -> Path | None:
    """The OME-TIFF of this tile version when it is on disk and ours, else None.
    A file under its final name is whole (written under a temporary name and
    renamed), so a resumed engine can count a tile whose frame made it to disk
    before the crash as done instead of imaging it again."""
    p = Path(out_dir) / tile_relpath(section, cycle, tile_id, version)
    if not p.is_file():
        return None
    try:
        h = read_tile_header(p)
    except (OSError, ValueError) as e:
        log.error("%s is not a readable tile: %s", p, e)
        return None
    return p if (h.get("tile_id"), int(h.get("version", -1))) == (tile_id, int(version)) else None


def next_version(out_dir: Path, section: int, cycle: int, tile_id: str) -> int:
    """Version a re-acquisition of ``tile_id`` must carry (for the engine on resume)."""
    return latest_versions(out_dir, section, cycle).get(tile_id, -1) + 1


class SectionTiles:
    """Latest TileRecord per tile, per (section, cycle); refills from disk after a restart."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self._by_key: dict[tuple[int, int], dict[str, TileRecord]] = {}

    def add(self, doc) -> TileRecord:
        rec = TileRecord.from_doc(doc)
        tiles = self._by_key.setdefault((rec.section_id, rec.cycle), {})
        old = tiles.get(rec.tile_id)
        if old is None or rec.version >= old.version:       # a re-acquisition supersedes
            tiles[rec.tile_id] = rec
        return rec

    def resolve(self, section: int, cycle: int, tile_ids) -> list[TileRecord]:
        """The latest version of every tile of this section and cycle: those in
        memory, those named in ``tile_ids`` and those on disk (the OME-TIFF
        writer's folder is the truth after a restart or a late re-acquisition).
        Tiles not in memory, or newer on disk, are read back from their
        OME-TIFF header, which only touches the file's XML."""
        tiles = self._by_key.setdefault((section, cycle), {})
        on_disk = latest_versions(self.out_dir, section, cycle)
        for tid in sorted(set(tile_ids) - set(tiles) - set(on_disk)):
            log.warning("section %d cycle %d: tile %s has no file; left out", section, cycle, tid)
        for tid, ver in on_disk.items():
            if tid not in tiles or tiles[tid].version < ver:
                p = self.out_dir / tile_relpath(section, cycle, tid, ver)
                try:
                    tiles[tid] = TileRecord.from_header(read_tile_header(p))
                except (OSError, ValueError) as e:      # not one of ours, or unreadable: say so
                    log.error("cannot read %s: %s", p, e)
        return [tiles[t] for t in sorted(tiles)]

    def forget(self, section: int, cycle: int) -> None:
        self._by_key.pop((section, cycle), None)

    def pending(self) -> list[tuple[int, int]]:
        """(section, cycle) with tiles seen since their last SectionDone."""
        return sorted(k for k, v in self._by_key.items() if v)


def planes_on_disk(out_dir: Path) -> list[tuple[int, int]]:
    """(section, cycle) of every tiles/{section}/{cycle} folder of OUTDIR."""
    root = Path(out_dir) / "tiles"
    out = []
    if root.is_dir():
        for sec_dir in root.iterdir():
            if sec_dir.is_dir() and sec_dir.name.isdigit():
                for cyc_dir in sec_dir.iterdir():
                    if cyc_dir.is_dir() and cyc_dir.name.isdigit():
                        out.append((int(sec_dir.name), int(cyc_dir.name)))
    return sorted(out)


def tile_files(out_dir: Path, section: int, cycle: int) -> list[Path]:
    """Every tile OME-TIFF (all versions) of one section and cycle."""
    folder = Path(out_dir) / f"tiles/{section:04d}/{cycle:04d}"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _TILE_NAME.match(p.name))


_TILE_PATH = re.compile(r"(?:^|/)tiles/(\d+)/(\d+)/[^/]+_v\d+\.ome\.tif$")


def plane_of(tile) -> tuple[int, int]:
    """(section, cycle) of a TileEvent (or its header dict) or of a tile's path."""
    if isinstance(tile, dict):
        return int(tile["section_id"]), int(tile["cycle"])
    if hasattr(tile, "section_id") and hasattr(tile, "cycle"):
        return int(tile.section_id), int(tile.cycle)
    m = _TILE_PATH.search(Path(tile).as_posix())
    if m:
        return int(m[1]), int(m[2])
    h = read_tile_header(Path(tile))
    return int(h["section_id"]), int(h["cycle"])


def newest_mtime(paths) -> float:
    best = -1.0
    for p in paths:
        try:
            best = max(best, p.stat().st_mtime)
        except OSError:
            pass
    return best


class PlaneWriter(DocumentRouter):
    """Base of the writers that write a plane's files on its SectionDone, from the
    latest version of each tile (Render tile specs, TrakEM2 lists). Subclasses set
    ``self.tiles = SectionTiles(out_dir)`` and implement ``_write_plane`` and
    ``_outputs``.

    Derived from the OME-TIFFs (``primary = False``), so nothing is lost for
    good: a plane whose files failed is retried at the next SectionDone, at
    flush/RunStop, and by ``catch_up()`` (now). A resumed RunStart marks the
    planes whose files are missing or older than their newest tile the same
    way: written from the tiles on disk at the next SectionDone or RunStop."""
    tiles: SectionTiles
    primary = False

    @property
    def _stale(self) -> set:
        """Planes whose files must be (re)written: a failure, or found so on disk."""
        return self.__dict__.setdefault("_stale_planes", set())

    def on_tile(self, doc: TileEvent) -> list[WrittenFile]:
        self.tiles.add(doc)
        return []

    def on_section_done(self, doc: SectionDone) -> list[WrittenFile]:
        out, err = [], None
        if self._stale:                 # earlier planes first (TrakEM2 takes its origin from the first)
            try:
                out += self._retry_stale()
            except Exception as e:
                err = e
        out += self._write(doc.section_id, doc.cycle, doc.tile_ids)
        if err is not None:
            raise err
        return out

    def on_start(self, doc: RunStart) -> list[WrittenFile]:
        if doc.resumed:
            # written at the next SectionDone (the plane cut by the crash is usually next: whole
            # by then) or at RunStop, rather than now from a plane that may be half acquired
            self._stale.update(p for p in planes_on_disk(self.tiles.out_dir) if self.needs_output(*p))
        return []

    def on_catch_up(self, doc: CatchUp) -> list[WrittenFile]:
        return self.catch_up(planes_for(self.tiles.out_dir, doc), full=doc.full)

    def on_stop(self, doc: RunStop) -> list[WrittenFile]:
        return self._write_pending()

    def _write_plane(self, section: int, cycle: int, records: list[TileRecord]) -> list[WrittenFile]:
        """Write one plane's files (``records`` is never empty); the WrittenFiles."""
        raise NotImplementedError

    def _outputs(self, section: int, cycle: int) -> list[Path]:
        """The plane's files on disk (all revisions)."""
        raise NotImplementedError

    def _write(self, section: int, cycle: int, tile_ids) -> list[WrittenFile]:
        records = self.tiles.resolve(section, cycle, tile_ids)
        self.tiles.forget(section, cycle)
        if not records:
            self._stale.discard((section, cycle))
            return []
        try:
            out = self._write_plane(section, cycle, records)
        except BaseException:
            self._stale.add((section, cycle))       # retried later, from the OME-TIFFs on disk
            raise
        self._stale.discard((section, cycle))
        return out

    def _retry_stale(self) -> list[WrittenFile]:
        return self._write_planes(sorted(self._stale))

    def _write_planes(self, planes) -> list[WrittenFile]:
        out, errors = [], []
        for sec, cyc in planes:
            try:
                out += self._write(sec, cyc, [])
            except Exception as e:
                log.error("%s: section %d cycle %d not written: %s", type(self).__name__, sec, cyc, e)
                errors.append(f"s{sec} c{cyc}: {type(e).__name__}: {e}")
        if errors:
            raise RuntimeError(f"{len(errors)} planes not written (retried later): {'; '.join(errors[:3])}")
        return out

    def _write_pending(self) -> list[WrittenFile]:
        """Tiles after the last SectionDone of their plane (an aborted section,
        a late re-acquisition), and planes that failed, still get their files
        when the run stops."""
        return self._write_planes(sorted(set(self.tiles.pending()) | self._stale))

    def needs_output(self, section: int, cycle: int) -> bool:
        """No file for the plane yet, or a tile newer than its newest file."""
        outs = self._outputs(section, cycle)
        if not outs:
            return bool(tile_files(self.tiles.out_dir, section, cycle))
        return newest_mtime(tile_files(self.tiles.out_dir, section, cycle)) > newest_mtime(outs)

    def catch_up(self, planes=None, *, full: bool = False) -> list[WrittenFile]:
        """Write, from the OME-TIFFs on disk, the files of ``planes`` (default:
        every plane on disk) that are missing or older than their tiles (all
        of them with ``full``); a plane whose content is unchanged gets no new
        file. Run it in the writer's thread (a ``catch_up`` document) or while
        no document is being handled."""
        planes = planes_on_disk(self.tiles.out_dir) if planes is None else planes
        todo = [p for p in planes if full or self.needs_output(*p)]
        if todo:
            log.warning("%s: catching up %d planes from the tiles on disk", type(self).__name__, len(todo))
        return self._write_planes(todo)

    def rebuild(self, tile) -> list[WrittenFile]:
        """(Re)write the files of the plane of ``tile`` (a TileEvent or a tile's path)."""
        return self._write(*plane_of(tile), [])

    def flush(self) -> None:
        self._write_pending()

    def close(self) -> None:
        pass


def planes_for(out_dir: Path, doc) -> list[tuple[int, int]]:
    """The planes on disk that a ``catch_up`` document names by its optional
    ``section_id`` and ``cycle`` (None or absent: all)."""
    sec, cyc = getattr(doc, "section_id", None), getattr(doc, "cycle", None)
    return [(s, c) for s, c in planes_on_disk(out_dir) if sec in (None, s) and cyc in (None, c)]
