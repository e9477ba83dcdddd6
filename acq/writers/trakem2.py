"""TrakEM2 'Import from text file' lists.

Two files, both tab-separated ``path<TAB>x<TAB>y<TAB>z`` (absolute path, x, y
and z all in pixels):

* trakem2/{section:04d}/{cycle:04d}_import.txt - one per section and cycle,
  written once on SectionDone (write-once, like every data file);
* trakem2/{section:04d}_import.txt - the whole section so far, the per-cycle
  files concatenated; it is a derived index, so it is rebuilt (new temp file,
  fsync, rename over the old one) after every cycle (manifest kind
  ``trakem2_index``, the only file this package replaces).

x/y are pixels in the section frame (stage pixels turned by -rotation_deg,
where the grid is axis-aligned as TrakEM2 places tiles unrotated) minus a
per-section origin (the floor of the smallest top-left corner of the
section's first listed cycle), kept in trakem2/{section:04d}_origin.json so
that later cycles and resumed runs share the frame; later tiles may get small
negative x/y, which TrakEM2 accepts.

z: TrakEM2's Loader.importImages reads column 4 as the layer's z in PIXELS
and scales x, y and z by the one "Calibration (data to pixels)" factor, so
z = cycle * slice thickness / pixel size (50 nm milled per cycle at 10 nm
pixels: z = 0, 5, 10 ...). The step (z_px_per_cycle) is fixed in the origin
file with the section's first list, so every cycle of a section, resumed
runs included, uses the same one; an origin file from before this rule has
none and keeps z = cycle. In the import dialog enter "Layer thickness" =
the slice thickness in the project's calibrated unit (50 with pixel width 10
nm; it is divided by the pixel width) and calibration 1.

Derived from the OME-TIFFs (``primary = False``): a plane whose list failed
is written later (PlaneWriter: next SectionDone or RunStop, also for what a
resumed RunStart finds missing; ``catch_up()`` at once). On construction
every section index is checked against its per-cycle files and its manifest
line, and rebuilt / re-recorded where a crash came between the two.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path

from common.atomic import atomic_write
from acq.writers.layout import PlaneWriter, SectionTiles, TileRecord
from acq.writers.manifest import Manifest, WrittenFile, sha256_file

log = logging.getLogger(__name__)
_CYCLE_FILE = re.compile(r"^(\d+)_import(?:\.(\d+))?\.txt$")


class TrakEM2Writer(PlaneWriter):
    file_kind = "trakem2"           # the manifest kind of its files

    def __init__(self, out_dir: Path, manifest: Manifest, slice_um: float = 0.05):
        if not (isinstance(slice_um, (int, float)) and math.isfinite(slice_um) and slice_um > 0):
            raise ValueError(f"slice_um (material removed per cycle, um) must be a number > 0, not {slice_um!r}")
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.slice_m = slice_um * 1e-6
        self.tiles = SectionTiles(out_dir)
        self._origins: dict[int, tuple[int, int, float]] = {}     # x_px, y_px, z_px_per_cycle
        self._check_indexes()

    def _outputs(self, section: int, cycle: int) -> list[Path]:
        folder = self.out_dir / f"trakem2/{section:04d}"
        return sorted(folder.glob(f"{cycle:04d}_import*.txt")) if folder.is_dir() else []

    def _check_indexes(self) -> list[WrittenFile]:
        """After a crash: each section index equals its per-cycle files and its
        latest manifest line; rebuilt or re-recorded where not."""
        root = self.out_dir / "trakem2"
        if not root.is_dir():
            return []
        latest = self.manifest.latest("trakem2/")
        out, batch = [], []
        for folder in sorted(root.iterdir()):
            if not (folder.is_dir() and folder.name.isdigit()):
                continue
            sec = int(folder.name)
            rel = f"trakem2/{sec:04d}_import.txt"
            p = self.out_dir / rel
            data = self._index_data(sec)
            sha = hashlib.sha256(data).hexdigest()
            if not p.is_file() or sha256_file(p)[0] != sha:
                log.warning("TrakEM2 index %s out of date with its per-cycle files: rebuilt", rel)
                out.append(self._rebuild_index(sec, batch))
            elif latest.get(rel, {}).get("sha256") != sha:
                batch.append(self.manifest.entry(rel, sha, len(data), "trakem2_index"))
        self.manifest.append(batch)
        return out

    def _origin(self, section: int, records) -> tuple[tuple[int, int, float], list]:
        if section in self._origins:
            return self._origins[section], []
        rel = f"trakem2/{section:04d}_origin.json"
        p = self.out_dir / rel
        batch: list[dict] = []
        if p.exists():
            d = json.loads(p.read_text())
        else:
            d = {"x_px": math.floor(min(r.frame_topleft_px()[0] for r in records)),
                 "y_px": math.floor(min(r.frame_topleft_px()[1] for r in records)),
                 "pixel_size_m": records[0].pixel_size_m, "rotation_deg": records[0].rotation_deg,
                 "slice_m": self.slice_m, "z_px_per_cycle": self.slice_m / records[0].pixel_size_m}
            self.manifest.write_once(rel, json.dumps(d).encode(), self.file_kind, batch=batch)
        if "z_px_per_cycle" not in d:
            log.warning("%s predates z in pixels: this section keeps z = cycle", rel)
        self._origins[section] = (int(d["x_px"]), int(d["y_px"]), float(d.get("z_px_per_cycle", 1.0)))
        return self._origins[section], batch

    def _write_plane(self, sec: int, cyc: int, records: list[TileRecord]) -> list[WrittenFile]:
        (ox, oy, z_step), batch = self._origin(sec, records)
        lines = []
        for r in records:
            x, y = r.frame_topleft_px()
            path = (self.out_dir / r.rel_path).resolve()
            # TrakEM2 puts a tile in the layer whose z matches within 1e-7 px: one rounding for all files
            lines.append(f"{path}\t{x - ox:.3f}\t{y - oy:.3f}\t{r.cycle * z_step:.6f}\n")
        out = [self._write_cycle(sec, cyc, "".join(lines).encode(), batch)]
        out.append(self._rebuild_index(sec, batch))
        self.manifest.append(batch)
        return out

    def _write_cycle(self, sec: int, cyc: int, data: bytes, batch: list) -> WrittenFile:
        # a later SectionDone with other content (late re-acquisition) gets a revision
        sha = hashlib.sha256(data).hexdigest()
        rev = 0
        while True:
            name = f"{cyc:04d}_import.txt" if rev == 0 else f"{cyc:04d}_import.{rev}.txt"
            rel = f"trakem2/{sec:04d}/{name}"
            p = self.out_dir / rel
            if not p.exists() or hashlib.sha256(p.read_bytes()).hexdigest() == sha:
                return self.manifest.write_once(rel, data, self.file_kind, batch=batch)
            rev += 1

    def _index_data(self, sec: int) -> bytes:
        folder = self.out_dir / f"trakem2/{sec:04d}"
        latest: dict[int, tuple[int, Path]] = {}      # cycle -> (revision, file)
        for p in folder.iterdir():
            m = _CYCLE_FILE.match(p.name)
            if not m:
                continue
            cyc, rev = int(m[1]), int(m[2] or 0)
            if cyc not in latest or rev > latest[cyc][0]:
                latest[cyc] = (rev, p)
        return b"".join(latest[c][1].read_bytes() for c in sorted(latest))

    def _rebuild_index(self, sec: int, batch: list) -> WrittenFile:
        data = self._index_data(sec)
        rel = f"trakem2/{sec:04d}_import.txt"
        p = self.out_dir / rel
        if not (p.is_file() and p.read_bytes() == data):
            atomic_write(p, data, overwrite=True)
        batch.append(self.manifest.entry(rel, hashlib.sha256(data).hexdigest(), len(data), "trakem2_index"))
        return WrittenFile(self.out_dir / rel, "trakem2_index", None)
