"""DeepFocus training pairs from a connected microscope, through the SEM
interface alone (seed ch. 3.2, "Ground truth generation"; issue 15).

At M locations on a grid around the stage position where the command starts,
a focus baseline is found (the operator's focus, MAPFoSt, or an image score
+ Nelder–Mead); around it K known aberrations are set and a ±Δz pair is taken
at each. The target of a pair is the correction back to the baseline:
−aberration (µm, stigmator units).

The dataset folder:
    manifest.json        settings, microscope identity, grid origin (written once)
    baselines.jsonl      one line per location, before any of its pairs
    pairs.jsonl          one line per finished pair
    pairs/LLL_KK_plus.tif, LLL_KK_minus.tif   8-bit frames, metadata in the description

Nothing is overwritten. A second run with the same settings resumes: the
journaled baselines are reused (no second focus search, no extra dose), the
journaled pairs are skipped, a pair whose two files landed but whose journal
line did not is adopted from the files' own metadata, and a lone half pair is
moved to orphans/ and taken again.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tifffile

from acq.writers.manifest import append_durably
from autofocus.loop import AutofocusLoop, Windows
from common.atomic import atomic_write, ensure_dir, fsync_dir, is_temporary, remove_temporaries
from devices.interfaces import ScanParams

FORMAT = "deepfocus-pairs"
VERSION = 1
BASELINES = ("operator", "mapfost", "sharpness-nm", "deepscore-nm")


class DatasetError(ValueError):
    """The dataset folder does not fit this collection (named option, allowed values)."""


def option(field: str) -> str:
    """The command-line option of a settings field."""
    return "--" + field.replace("_", "-")


@dataclass
class CollectSettings:
    locations: int = 9
    spacing_um: float = 60.0               # grid pitch around the start position
    aberrations: int = 10                  # known aberrations (pairs) per location
    baseline: str = "operator"
    dwell_ns: tuple[float, ...] = (100.0, 200.0)
    search_dwell_ns: float = 200.0         # the baseline search (seed: 200 ns)
    frame: tuple[int, int] = (1024, 768)
    pixel_nm: float = 10.0
    perturbation_um: float = 5.0
    wd_range_um: float = 20.0              # seed: U(±20 µm, ±5, ±5)
    stig_range: float = 5.0
    near_fraction: float = 0.5             # share drawn near focus, where the loop ends
    near_wd_um: float = 3.0
    near_stig: float = 0.75
    nm_iterations: int = 40
    seed: int = 0

    def check(self) -> None:
        if self.baseline not in BASELINES:
            raise DatasetError(f"--baseline: {self.baseline!r} is not one of {', '.join(BASELINES)}")
        if not self.dwell_ns or any(not 10 <= d <= 100_000 for d in self.dwell_ns):
            raise DatasetError("--dwell-ns: one or more values in 10..100000 ns")
        if not 0 < self.perturbation_um <= 50:
            raise DatasetError("--perturbation-um: in (0, 50] µm")
        if not all(16 <= v <= 8192 for v in self.frame):
            raise DatasetError("--frame: two values in 16..8192 px")


def read_journal(path: Path) -> list[dict]:
    """The records of a journal written by append_durably. A torn last line (a
    crash mid-append) is left out, as append_durably cuts it before the next
    line; a whole last record without its newline counts, as append_durably
    completes it. A bad line before the last is damage, not a crash: refused."""
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines(keepends=True)
    out = []
    for n, line in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a record")
            out.append(rec)
        except ValueError:
            if n < len(lines) - 1 or line.endswith(b"\n"):
                raise DatasetError(f"{path}: line {n + 1} is damaged (not a torn last append)") from None
    return out


def _append(path: Path, record: dict) -> None:
    append_durably(path, (json.dumps(record, default=float) + "\n").encode())


def set_focus(sem, state) -> None:
    """Working distance and both stigmators from one (wd m, stig x, stig y) state."""
    sem.set_working_distance(state[0])
    sem.set_stig(state[1], state[2])


def move_xy(stage, x_m: float, y_m: float) -> None:
    """The stage to (x, y), its other axes as they are."""
    stage.move_to(stage.position().with_(x=x_m, y=y_m))


def plan_aberrations(st: CollectSettings, location: int) -> list[tuple[float, float, float]]:
    """The K known aberrations of one location, reproducible from the seed (a
    resumed run sets exactly the ones the interrupted run would have)."""
    rng = np.random.default_rng([st.seed, 23, location])
    out = []
    for _ in range(st.aberrations):
        near = rng.random() < st.near_fraction
        wd, s = (st.near_wd_um, st.near_stig) if near else (st.wd_range_um, st.stig_range)
        out.append((float(rng.uniform(-wd, wd)), float(rng.uniform(-s, s)), float(rng.uniform(-s, s))))
    return out


def grid_offsets(n: int, spacing_m: float) -> list[tuple[float, float]]:
    """n points row by row on a grid centred on (0, 0)."""
    k = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / k)
    cx, cy = (min(n, k) - 1) / 2, (rows - 1) / 2
    return [((i % k - cx) * spacing_m, (i // k - cy) * spacing_m) for i in range(n)]


def _found(trace) -> tuple[tuple, dict]:
    """A focus search's result: its final state and what it cost."""
    return (trace.final_wd_m, *trace.final_stig), {"frames": trace.evaluations, "status": trace.status,
                                                   "dose_e_per_nm2": trace.dose_e_per_nm2}


class Collector:
    def __init__(self, sem, stage, guard, out: Path, st: CollectSettings, *,
                 baseline_finder: Optional[Callable] = None, progress: Callable = print,
                 models_dir: Optional[Path] = None, at: Optional[tuple[float, float]] = None):
        """``at``: stage (x, y) m to collect around, moved to when the folder is
        new (default: where the stage is); a resumed folder keeps its origin."""
        st.check()
        self.sem, self.stage, self.guard, self.out, self.st = sem, stage, guard, Path(out), st
        self.progress = progress
        self.models_dir = models_dir
        self.custom_finder = baseline_finder
        self.at = at
        self.windows = Windows(guard)
        self.scan = ScanParams(pixel_m=st.pixel_nm * 1e-9, frame=tuple(st.frame))

    # ---------------------------------------------------------- manifest
    def _open(self) -> dict:
        """The manifest: written first, so a crash at any later moment leaves a
        folder that resumes; compared on resume, field by field, with the SEM."""
        m_path = self.out / "manifest.json"
        settings = json.loads(json.dumps(dataclasses.asdict(self.st)))
        if self.out.exists() and not self.out.is_dir():
            raise DatasetError(f"--out {self.out}: is a file; give a folder")
        if m_path.is_file():
            m = json.loads(m_path.read_text())
            if m.get("format") != FORMAT:
                raise DatasetError(f"--out {self.out}: not a {FORMAT} folder (manifest format {m.get('format')!r})")
            diff = sorted(k for k in set(settings) | set(m["settings"]) if settings.get(k) != m["settings"].get(k))
            if diff:
                raise DatasetError(f"--out {self.out} holds a collection with other settings "
                                   f"({', '.join(option(k) for k in diff)}); resume with the same settings or "
                                   "choose a new folder")
            if m.get("sem") != self.sem.identity():
                raise DatasetError(f"--out {self.out} was collected on {m.get('sem')!r}, not on "
                                   f"{self.sem.identity()!r}; choose a new folder for this microscope")
            remove_temporaries(self.out)
            if self.at is not None:
                self.progress(f"note: --at ignored: {self.out} resumes around the position it started at")
            return m
        if self.out.exists() and any(not is_temporary(c.name) for c in self.out.iterdir()):
            raise DatasetError(f"--out {self.out}: exists and is not a {FORMAT} folder; choose a new folder")
        with self.sem.scanning(self.scan, unblank=False):   # the SEM accepts frame and pixel: checked before
            pass                                             # anything is written
        if self.at is not None:
            move_xy(self.stage, *self.at)
        p = self.stage.position()
        m = {"format": FORMAT, "version": VERSION, "settings": settings, "created": time.time(),
             "sem": self.sem.identity(), "origin_m": [p.x, p.y],
             "operator_focus": [self.sem.working_distance(), *self.sem.stig()],
             "target": "correction back to the baseline = -aberration: [d_wd_um, d_stig_x, d_stig_y]"}
        ensure_dir(self.out)
        remove_temporaries(self.out)                         # a manifest write cut by a crash
        atomic_write(m_path, json.dumps(m, indent=1).encode())
        return m

    def _check_grid(self, manifest: dict) -> list[tuple[float, float]]:
        """Every location inside the stage's travel and away from the mill
        position, before the first frame (no dose spent on a run that cannot finish)."""
        ox, oy = manifest["origin_m"]
        here = self.stage.position()
        out = []
        for i, (dx, dy) in enumerate(grid_offsets(self.st.locations, self.st.spacing_um * 1e-6)):
            p = here.with_(x=ox + dx, y=oy + dy)
            try:
                self.guard.check_stage(p)
            except Exception as e:
                raise DatasetError(f"--locations/--spacing-um: location {i + 1} at ({p.x * 1e3:.3f}, "
                                   f"{p.y * 1e3:.3f}) mm is outside the stage's safety window ({e})") from None
            if self.guard.near_mill_position(p):
                raise DatasetError(f"--locations/--spacing-um: location {i + 1} is within the imaging "
                                   "exclusion around the mill position")
            out.append((p.x, p.y))
        return out

    # ---------------------------------------------------------- baseline
    def _finder(self, manifest: dict):
        if self.custom_finder is not None:
            return self.custom_finder
        st = self.st
        scan = ScanParams(pixel_m=st.pixel_nm * 1e-9, frame=tuple(st.frame), dwell_s=st.search_dwell_ns * 1e-9)
        if st.baseline == "operator":
            return lambda manifest, i: (tuple(manifest["operator_focus"]), {"frames": 0})
        if st.baseline == "mapfost":
            method = self._mapfost(manifest, scan)

            return lambda manifest, i: _found(AutofocusLoop(
                self.sem, self.guard, method, perturbation_m=st.perturbation_um * 1e-6, max_iterations=5,
                dwell_s=scan.dwell_s, frame_size=scan.frame, pixel_size_m=scan.pixel_m).run())
        from autofocus.methods import deepscore_model
        from autofocus.nelder_mead import NelderMeadAutofocus, make_objective
        kw = {}
        if st.baseline == "deepscore-nm":
            path = deepscore_model(self.models_dir) if self.models_dir else deepscore_model()
            if path is None:
                raise DatasetError("--baseline deepscore-nm needs a shipped DeepScore model; use sharpness-nm")
            kw["model_path"] = path
        objective = make_objective(st.baseline, **kw)

        return lambda manifest, i: _found(NelderMeadAutofocus(
            self.sem, self.guard, objective, name=st.baseline, max_iterations=st.nm_iterations, seed=st.seed + i,
            dwell_s=scan.dwell_s, frame_size=scan.frame, pixel_size_m=scan.pixel_m).run())

    def _mapfost(self, manifest: dict, scan: ScanParams):
        """MAPFoSt calibrated where the operator focused (the grid's origin),
        once: the calibration is kept in the folder and reused on resume."""
        from autofocus.mapfost_method import MapfostCalibration
        from autofocus.methods import MapfostMethod, calibrate_mapfost_on_sem
        path = self.out / "mapfost_calibration.json"
        if path.is_file():
            d = json.loads(path.read_text())
            cal = MapfostCalibration(**{**d, "stig_scale": tuple(d["stig_scale"])})
        else:
            move_xy(self.stage, *manifest["origin_m"])
            set_focus(self.sem, manifest["operator_focus"])
            with self.sem.scanning(scan):
                cal = calibrate_mapfost_on_sem(self.sem, perturbation_m=self.st.perturbation_um * 1e-6,
                                               patch_size=min(512, *self.st.frame))
            atomic_write(path, json.dumps(dataclasses.asdict(cal), default=float).encode())
        return MapfostMethod(cal, patch_size=min(512, *self.st.frame))

    # ---------------------------------------------------------- pairs
    def _files(self, i: int, k: int) -> tuple[Path, Path]:
        stem = self.out / "pairs" / f"{i:03d}_{k:02d}"
        return stem.with_name(stem.name + "_plus.tif"), stem.with_name(stem.name + "_minus.tif")

    def _write(self, path: Path, image: np.ndarray, md: dict) -> None:
        desc = json.dumps(md, default=float)
        atomic_write(path, lambda tmp: tifffile.imwrite(tmp, image, description=desc, metadata=None))

    def _recover(self, i: int, k: int) -> Optional[dict]:
        """A pair whose files landed before the crash: adopt it if whole, else
        move the half to orphans/ (never deleted, never overwritten)."""
        files = [p for p in self._files(i, k) if p.exists()]
        if not files:
            return None
        if len(files) == 2:
            try:
                md = json.loads(tifffile.TiffFile(files[0]).pages[0].description)
                tifffile.imread(files[1])
                return md["pair"]
            except Exception:
                pass
        ensure_dir(self.out / "orphans")
        for p in files:
            dest = self.out / "orphans" / f"{p.stem}.{time.time_ns()}{p.suffix}"
            os.rename(p, dest)
        fsync_dir(self.out / "orphans")
        return None

    def _pair(self, i: int, k: int, base, ab, dwell_s: float) -> dict:
        st = self.st
        plus_path, minus_path = self._files(i, k)
        stig = (base[1] + ab[1], base[2] + ab[2])
        centre = base[0] + ab[0] * 1e-6
        p = self.stage.position()
        rec = {"id": f"{i:03d}_{k:02d}", "location": i, "k": k, "aberration": list(ab),
               "target": [-ab[0], -ab[1], -ab[2]], "baseline": list(base), "stig": list(stig),
               "plus": str(plus_path.relative_to(self.out)), "minus": str(minus_path.relative_to(self.out)),
               "pixel_m": st.pixel_nm * 1e-9, "perturbation_m": st.perturbation_um * 1e-6, "dwell_s": dwell_s,
               "stage_m": [p.x, p.y], "timestamp": time.time()}
        rec["wd_plus_m"], rec["wd_minus_m"] = (centre + st.perturbation_um * 1e-6, centre - st.perturbation_um * 1e-6)
        self.sem.set_stig(*stig)
        frames = []
        for wd in (rec["wd_plus_m"], rec["wd_minus_m"]):
            self.sem.set_working_distance(wd)
            frames.append(self.sem.acquire_frame())
        rec["frame_metadata"] = [{k2: v for k2, v in (f.metadata or {}).items() if isinstance(v, (int, float, str))}
                                 for f in frames]
        for path, f, side in ((plus_path, frames[0], "plus"), (minus_path, frames[1], "minus")):
            self._write(path, np.asarray(f.image), {"side": side, "pair": rec})
        return rec

    def _safe_aberration(self, base, ab) -> bool:
        d = self.st.perturbation_um * 1e-6
        return all(self.windows.inside(base[0] + ab[0] * 1e-6 + s * d, (base[1] + ab[1], base[2] + ab[2]))
                   for s in (-1, 1))

    # ---------------------------------------------------------- run
    def run(self) -> dict:
        st = self.st
        manifest = self._open()
        grid = self._check_grid(manifest)
        b_path, p_path = self.out / "baselines.jsonl", self.out / "pairs.jsonl"
        baselines = {b["location"]: b for b in read_journal(b_path)}
        done = {(r["location"], r["k"]) for r in read_journal(p_path)}
        resumed = bool(baselines or done)
        if resumed:
            self.progress(f"resuming {self.out}: {len(baselines)} baselines and {len(done)} pairs on record")
        rng = np.random.default_rng([st.seed, 29])
        dwell = [float(rng.choice(st.dwell_ns)) for _ in range(st.locations * st.aberrations)]
        plans = [plan_aberrations(st, i) for i in range(st.locations)]
        unsafe = {(i, k) for i in baselines for k, ab in enumerate(plans[i])
                  if not self._safe_aberration(baselines[i]["baseline"], ab)}
        taken = 0
        try:
            find_baseline = self._finder(manifest)
            for i, xy in enumerate(grid):
                if all((i, k) in done or (i, k) in unsafe for k in range(st.aberrations)):
                    continue
                # each search starts from the last baseline found (or the operator's focus), never
                # from the last pair's aberrated setting
                prev = [baselines[j]["baseline"] for j in sorted(baselines) if j < i]
                set_focus(self.sem, prev[-1] if prev else manifest["operator_focus"])
                move_xy(self.stage, *xy)
                if i not in baselines:
                    state, info = find_baseline(manifest, i)
                    baselines[i] = {"location": i, "stage_m": list(xy), "baseline": list(state),
                                    "method": st.baseline, **info}
                    _append(b_path, baselines[i])
                    unsafe |= {(i, k) for k, ab in enumerate(plans[i]) if not self._safe_aberration(state, ab)}
                    self.progress(f"location {i + 1}/{st.locations}: baseline ({st.baseline}) wd "
                                  f"{state[0] * 1e3:.4f} mm, stig ({state[1]:+.3f}, {state[2]:+.3f})")
                base = tuple(baselines[i]["baseline"])
                for k, ab in enumerate(plans[i]):
                    if (i, k) in done or (i, k) in unsafe:
                        continue
                    rec = self._recover(i, k)
                    if rec is None:
                        d = dwell[i * st.aberrations + k] * 1e-9
                        with self.sem.scanning(ScanParams(pixel_m=self.scan.pixel_m, frame=self.scan.frame,
                                                          dwell_s=d)):
                            rec = self._pair(i, k, base, ab, d)
                        taken += 1
                    _append(p_path, rec)
                    done.add((i, k))
                set_focus(self.sem, base)
        except BaseException:
            try:
                self.sem.set_blanked(True)      # no dose on the sample while nobody watches
                set_focus(self.sem, manifest["operator_focus"])
            except Exception:
                pass
            raise
        fsync_dir(self.out)
        set_focus(self.sem, manifest["operator_focus"])   # the microscope as the operator left it
        move_xy(self.stage, *manifest["origin_m"])
        summary = {"folder": str(self.out), "pairs": len(done), "taken_now": taken,
                   "skipped_outside_windows": len(unsafe), "locations": len(baselines), "resumed": resumed}
        self.progress(f"{len(done)} pairs in {self.out} ({taken} taken now"
                      + (f", {len(unsafe)} outside the safety windows skipped" if unsafe else "") + ")")
        return summary


def load_pairs(folder: Path) -> tuple[list[tuple[np.ndarray, np.ndarray, tuple]], dict, list[dict]]:
    """(img_plus, img_minus, target) triples of a collected dataset, its
    manifest and the pairs' journal records (same order as the triples)."""
    folder = Path(folder)
    m_path = folder / "manifest.json"
    if not m_path.is_file():
        raise DatasetError(f"--data {folder}: no manifest.json (collect it with `autofocus collect`)")
    manifest = json.loads(m_path.read_text())
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"--data {folder}: manifest format {manifest.get('format')!r}, expected {FORMAT!r}")
    triples = []
    records = read_journal(folder / "pairs.jsonl")
    for r in records:
        triples.append((tifffile.imread(folder / r["plus"]), tifffile.imread(folder / r["minus"]),
                        tuple(r["target"])))
    if len(triples) < 2:
        raise DatasetError(f"--data {folder}: {len(triples)} pairs; need at least 2")
    return triples, manifest, records


def pairs_at_pixel(triples, pixel_m: float, model_pixel_m: float) -> list[tuple]:
    """The pairs resampled to the model's pixel size (as the predictor does at inference)."""
    from autofocus.inference import resample
    if abs(pixel_m - model_pixel_m) < 1e-15:
        return list(triples)
    return [(resample(a, pixel_m, model_pixel_m), resample(b, pixel_m, model_pixel_m), t) for a, b, t in triples]
