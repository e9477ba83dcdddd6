"""One interface for every focus/stigmation correction method.

A *pair* method (MAPFoSt, DeepFocus) turns two frames taken at wd ± Δ into
a correction to ADD to the current wd/stig. A method without a pair (the
microscope's own routine) runs on the SEM and reports what it changed; the
loop (autofocus.loop) then undoes that and applies the change itself, so
the step clamp and the safety windows hold for every method alike.

Names: "mapfost" (calibrated on the microscope at start-up), "deepfocus"
(the shipped default model), every shipped DeepFocus variant by its own
name, "sem-builtin"; the Nelder–Mead searches live in autofocus.nelder_mead.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence, runtime_checkable

import cv2
import numpy as np

from autofocus import stig_map
from autofocus.column_scale import ALPHA_SPREAD, NEAR_UM, TARGET_CLIP, ColumnScale, model_pixel, scale_of
from autofocus.move_slope import stig_gains
from autofocus.mapfost_method import (MapfostCalibration, calibrate_mapfost, calibration_from_microscope,
                                      estimate_aberration)
from common.paths import models_dir
from devices.interfaces import Capability

MODELS_DIR = models_dir()
# known aberrations (Δwd µm, stig x, stig y) induced around the focused state to
# calibrate MAPFoSt: non-zero defocus for the aperture, independent stig pairs
DEEPFOCUS_KINDS = ("scalar", "patchscore", "pixelscore")       # card "kind" of a DeepFocus model
CALIBRATION_ABERRATIONS = ((5.0, 0.8, 0.0), (-4.0, 0.0, 0.8), (3.0, -0.6, 0.6), (-6.0, 0.5, -0.5))


@dataclass
class Estimate:
    d_wd_m: float                                  # correction to ADD to the working distance
    d_stig: tuple[float, float]                    # correction to ADD to stig x, y
    sd: Optional[tuple[float, float, float]] = None    # spread over patches (wd m, stig x, stig y)
    seconds: float = 0.0                           # processing time (images in, correction out)
    patches: int = 1


@runtime_checkable
class CorrectionMethod(Protocol):
    name: str
    needs_pair: bool

    def estimate(self, img_plus: np.ndarray, img_minus: np.ndarray, pixel_size_m: float,
                 perturbation_m: float) -> Estimate: ...


# ----------------------------------------------------------- image metrics
def tenengrad(image: np.ndarray, sigma_px: float = 1.0) -> float:
    """Tenengrad (mean squared Sobel gradient) of the image smoothed by a
    Gaussian of ``sigma_px``, over its squared mean (higher = sharper).

    The Gaussian takes out most of the shot noise, which would otherwise add a
    focus-independent floor that flattens the curve at low dose; dividing by
    the mean makes it brightness-independent."""
    f = np.asarray(image, dtype=np.float32)
    if sigma_px > 0:
        f = cv2.GaussianBlur(f, (0, 0), sigma_px)
    gx = cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3)
    m = float(f.mean()) or 1.0
    return float(np.mean(gx * gx + gy * gy) / (m * m))


def patch_origins(shape: tuple[int, int], patch: int, n: int) -> list[tuple[int, int]]:
    """n square patches on an even grid (as square as the frame allows)."""
    h, w = shape
    if h < patch or w < patch:
        raise ValueError(f"frame {w}x{h} is smaller than a {patch}² patch")
    rows = max(1, int(round(math.sqrt(n * h / w))))
    cols = max(1, math.ceil(n / rows))
    ys = np.linspace(0, h - patch, rows).round().astype(int) if rows > 1 else [(h - patch) // 2]
    xs = np.linspace(0, w - patch, cols).round().astype(int) if cols > 1 else [(w - patch) // 2]
    # a frame that fits fewer patches than asked gives each distinct patch once
    return list(dict.fromkeys((int(y), int(x)) for y in ys for x in xs))[:n]


# ------------------------------------------------------------------ MAPFoSt
class MapfostMethod:
    """MAPFoSt (mapfost 4.3.1) on n square patches; median over patches.

    Each patch is estimated separately so that the spread is known; the crop
    around a patch is a little larger than the patch so that a few pixels of
    drift between the two frames still leave a full aligned patch."""

    needs_pair = True
    MARGIN = 16

    def __init__(self, calibration: MapfostCalibration, *, patch_size: int = 512, n_patches: int = 4,
                 name: str = "mapfost"):
        self.calibration = calibration
        self.patch_size = patch_size
        self.n_patches = n_patches
        self.name = name

    def estimate(self, img_plus, img_minus, pixel_size_m, perturbation_m) -> Estimate:
        t0 = time.perf_counter()
        ps, m = self.patch_size, self.MARGIN
        h, w = img_plus.shape
        crop = min(ps + 2 * m, h, w)
        ests, why = [], ""
        for y, x in patch_origins((h, w), crop, self.n_patches):
            a, b = img_plus[y:y + crop, x:x + crop], img_minus[y:y + crop, x:x + crop]
            try:
                ests.append(estimate_aberration(a, b, perturbation_m * 1e6, pixel_size_m * 1e9, self.calibration,
                                                patch_size=min(ps, crop - m), patches_per_side=1))
            except (ValueError, RuntimeError) as e:     # featureless patch: the alignment runs away
                why = str(e)
        if not ests:
            raise RuntimeError(f"MAPFoSt: no usable patch ({why})")
        ests = np.asarray(ests)
        dz, sx, sy = np.median(ests, axis=0)
        sd = ests.std(axis=0) if len(ests) > 1 else None
        return Estimate(-dz * 1e-6, (-sx, -sy),
                        None if sd is None else (sd[0] * 1e-6, sd[1], sd[2]),
                        time.perf_counter() - t0, len(ests))


def calibrate_mapfost_on_sem(sem, *, perturbation_m: float = 5e-6,
                             known: Sequence[tuple[float, float, float]] = CALIBRATION_ABERRATIONS,
                             patch_size: int = 512, patches_per_side: int = 1,
                             initial: Optional[MapfostCalibration] = None) -> MapfostCalibration:
    """Calibrate MAPFoSt the way an installation does: the SEM is focused now
    (by the operator), known aberrations are induced around that state and the
    aperture, stig scales and stig rotation are fitted to them.

    Every setting goes through ``sem`` (a GuardedSEM refuses values outside
    the windows); the focused state is restored whatever happens."""
    wd0, stig0 = sem.working_distance(), tuple(sem.stig())

    def acquire_pair(ab):
        dz, sx, sy = ab
        sem.set_stig(stig0[0] + sx, stig0[1] + sy)
        frames = []
        for sign in (+1, -1):
            sem.set_working_distance(wd0 + dz * 1e-6 + sign * perturbation_m)
            frames.append(sem.acquire_frame().image)
        return frames[0], frames[1]

    try:
        return calibrate_mapfost(acquire_pair, known, perturbation_um=perturbation_m * 1e6,
                                 pixel_size_nm=sem.pixel_size() * 1e9, initial=initial,
                                 patch_size=min(patch_size, *sem.frame_size()),
                                 patches_per_side=patches_per_side)
    finally:
        sem.set_working_distance(wd0)
        sem.set_stig(*stig0)


# ---------------------------------------------------------------- DeepFocus
def _card(model: Path) -> dict:
    try:
        return json.loads(model.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}


def _card_kind(model: Path) -> Optional[str]:
    return _card(model).get("kind")


def _validation_cost(card: dict) -> float:
    """Validation error in units of the focus margins (1 µm, 0.25 stig)."""
    v = card.get("validation") or {}
    try:
        return float(v["mae_wd_um"]) / 1.0 + float(v["mae_stig"]) / 0.25
    except (KeyError, TypeError, ValueError):
        return math.inf


def deepfocus_variants(models_dir: Path = MODELS_DIR) -> dict[str, Path]:
    """Shipped DeepFocus models by name (file stem; DeepScore and other
    projects' models excluded by their card's "kind").

    "deepfocus" is the shipped default: models/deepfocus.pt, else the model
    whose card says "default": true, else the finished model (card without
    "partial": true; not a recalibration for another microscope) with the
    lowest validation error in margin units."""
    cards = {p.stem: (p, _card(p)) for p in sorted(Path(models_dir).glob("*.pt"))}
    found = {name: p for name, (p, c) in cards.items() if c.get("kind") in DEEPFOCUS_KINDS}
    if "deepfocus" not in found and found:
        flagged = [found[n] for n in found if cards[n][1].get("default")]
        # a recalibrated model belongs to another microscope: never the default here
        own = [n for n in found if not ({"recalibration", "recalibration_samples"} & set(cards[n][1]))] or list(found)
        finished = [n for n in own if not cards[n][1].get("partial")] or own
        best = min(finished, key=lambda n: (_validation_cost(cards[n][1]), n))
        found["deepfocus"] = flagged[0] if flagged else found[best]
    return found


def deepscore_model(models_dir: Path = MODELS_DIR) -> Optional[Path]:
    """The shipped DeepScore: a finished one (a checkpoint of a training that is
    still running scores nonsense and would stop Nelder–Mead at once)."""
    cands = [p for p in sorted(Path(models_dir).glob("*.pt"))
             if _card_kind(p) == "deepscore" and not _card(p).get("partial")]
    return cands[0] if cands else None


class DeepFocusMethod:
    """A DeepFocus model: the same N patch offsets at every call (fixed seed
    sequence, as in the seed's traces), mean (or score-weighted mean).
    n_patches None: as many as cover the seed's frame area
    (DeepFocusPredictor.patches_for)."""

    needs_pair = True

    def __init__(self, model_path: Path, *, n_patches: Optional[int] = None, seed: int = 0,
                 name: Optional[str] = None, column_alpha_mrad: Optional[float] = None):
        from autofocus.inference import DeepFocusPredictor
        self.model_path = Path(model_path)
        self.predictor = DeepFocusPredictor(self.model_path)
        self.n_patches = n_patches
        self.seed = seed
        self.name = name or self.model_path.stem
        trained = getattr(self.predictor, "perturbation_m", None)
        self.trained_perturbation_m = float(trained) if trained else None
        # a model read against a reference column needs this column's scale (autofocus/column_scale.py)
        # and learns it from its moves; a column-specific model (recalibrated) only refines its own gain
        ref = self.alpha_ref_mrad = getattr(self.predictor, "alpha_ref_mrad", None)
        clip = (self.predictor.card.get("training_data") or {}).get("target_clip") or TARGET_CLIP
        # recalibrated on a column (autofocus/stig_map.py): its stigmator axes, and the α measured
        # there, which beats a nominal one from an aperture table
        self.stig_map = stig_map.from_card(self.predictor.card)
        self.alpha_source = "stated"
        if ref and self.stig_map is not None:
            column_alpha_mrad = self.predictor.card["recalibration"]["column_alpha_mrad"]
            self.alpha_source = "recalibrated"
        self.stated_alpha_mrad = column_alpha_mrad
        known = column_alpha_mrad is not None or not ref
        # readings near the trained clip mean "far, this way" and carry no slope
        self.column = ColumnScale(scale_of(column_alpha_mrad, ref), saturation_um=0.75 * float(clip[0]),
                                  alpha_spread=ALPHA_SPREAD if known else None)
        # how strongly this specimen shows each stigmator axis, from the moves (autofocus/move_slope.py)
        self.stig_gains = stig_gains()

    def begin_location(self) -> None:
        """The loop starts at a new place: its readings get their own focus."""
        for learner in (self.column, *self.stig_gains):
            learner.begin_location()

    def _check_perturbation(self, perturbation_m: float) -> None:
        if self.trained_perturbation_m and abs(perturbation_m - self.trained_perturbation_m) > 1e-9:
            raise ValueError(f"{self.name} was trained on ±{self.trained_perturbation_m * 1e6:g} µm pairs, "
                             f"not ±{perturbation_m * 1e6:g} µm")

    def check_frame(self, frame_size: tuple[int, int], pixel_size_m: float, perturbation_m: float) -> None:
        """ValueError when pairs of this frame (w, h) and ±perturbation cannot
        be used: the loop asks before it acquires anything."""
        self._check_perturbation(perturbation_m)
        self.predictor.check_image((frame_size[1], frame_size[0]), pixel_size_m)

    def estimate(self, img_plus, img_minus, pixel_size_m, perturbation_m,
                 center_wd_m: Optional[float] = None, center_stig: Optional[Sequence[float]] = None) -> Estimate:
        """center_wd_m: the wd the pair was taken around; with it the readings
        of one location teach the column scale. center_stig: the stigmator it
        was taken at; with it the readings within NEAR_UM of focus teach each
        axis's gain (the loop passes both)."""
        self._check_perturbation(perturbation_m)        # predict checks the image size itself
        t0 = time.perf_counter()
        px = self.model_pixel_m(np.shape(img_plus), pixel_size_m)
        p = self.predictor.predict(img_plus, img_minus, pixel_size_m, n_patches=self.n_patches,
                                   seed_sequence=self.seed, model_pixel_m=px,
                                   column_alpha_mrad=self.column_alpha_mrad())
        g = (px / self.predictor.pixel_size_m) ** 2          # back to readings at the card's pixel
        if center_wd_m is not None:
            self.column.observe(center_wd_m * 1e6, float(p.d_wd_m) * 1e6 * g, g)
        f = g / self.column.value
        sd = getattr(p, "sd", None)
        if sd is not None:
            sd = tuple(float(v) * f for v in np.ravel(sd)[:3])
        d_wd, d_stig = float(p.d_wd_m) * f, (float(p.d_stig[0]) * f, float(p.d_stig[1]) * f)
        if self.stig_map is not None:
            d_stig = stig_map.apply(self.stig_map, d_wd * 1e6, d_stig)
            if sd is not None:      # the spread of the mapped stig, from the read stig's (wd row left out)
                sd = (sd[0], *np.sqrt(np.square(self.stig_map[:2]).T @ np.square(sd[1:])).tolist())
        if center_stig is not None and abs(d_wd) * 1e6 <= NEAR_UM:
            for learner, c, r in zip(self.stig_gains, center_stig, d_stig):
                learner.observe(float(c), r)
        kx, ky = (learner.value for learner in self.stig_gains)
        d_stig = (d_stig[0] / kx, d_stig[1] / ky)
        if sd is not None:
            sd = (sd[0], sd[1] / kx, sd[2] / ky)
        return Estimate(d_wd, d_stig, sd, time.perf_counter() - t0, len(p.per_patch))

    def column_report(self, progress=None, name: str = "") -> dict:
        """The column as this method knows it now: the α it started from (setup, or
        measured by recalibration), the one its moves taught, and a line saying so
        (passed to ``progress`` too, as the benches print it)."""
        ref = self.alpha_ref_mrad
        learned = self.column.alpha_mrad(ref) if ref else None
        gains = [round(learner.value, 3) for learner in self.stig_gains]
        rep = {"stated_alpha_mrad": self.stated_alpha_mrad, "alpha_ref_mrad": ref, "scale": self.column.value,
               "learned_alpha_mrad": learned, "stig_gain": gains}
        if learned:
            stated = f"{self.stated_alpha_mrad:.1f} mrad" if self.stated_alpha_mrad else "none"
            rep["line"] = (f"column probe half-angle {learned:.1f} mrad learned from its moves ({self.alpha_source}: "
                           f"{stated}; calibration.probe_half_angle_mrad in the setup); stigmator read at "
                           f"{gains[0]:.2f}/{gains[1]:.2f} of its moves (x/y)")
            if progress is not None:
                progress(f"  {name}: {rep['line']}")
        return rep

    def model_pixel_m(self, shape: tuple[int, ...], pixel_size_m: float) -> float:
        """Where this column's pair is fed to the model (autofocus.column_scale.model_pixel).
        From the α the setup states: one pixel for the session, so the readings the column
        scale fits keep one gain (fed where the learned α put it, the default column's MAE
        after iteration 2 rose from 0.16 to 0.25 µm). With none stated, from the α learned
        from the moves; before any, the card's pixel: there the first step on a 15 mrad column
        overshoots twofold and the next pair still reads its slope (fed at the assumed
        column's 26.5 nm it overshot 2.5x and oscillated)."""
        card_px = self.predictor.pixel_size_m
        ref = self.alpha_ref_mrad
        if not ref:
            return card_px
        return model_pixel(self.column_alpha_mrad() or ref, ref, card_px, pixel_size_m, min(shape[:2]),
                           self.predictor.patch)

    def column_alpha_mrad(self) -> Optional[float]:
        """The column's α as this method uses it (the feed pixel, and the column a
        column-conditioned model is told): stated or recalibrated, else learned
        from the moves once they have taught a slope, else None (unknown)."""
        if self.stated_alpha_mrad is not None:
            return self.stated_alpha_mrad
        ref = self.alpha_ref_mrad
        return self.column.alpha_mrad(ref) if ref and self.column.has_slope else None


# ------------------------------------------------------ SEM's own routine
class SemBuiltinMethod:
    """The microscope's own autofocus (Capability.AUTOFOCUS). It changes
    wd/stig itself; ``run_on`` reports that change and puts the SEM back, so
    the loop applies it through the same clamp and windows as any method."""

    name = "sem-builtin"
    needs_pair = False

    def estimate(self, img_plus, img_minus, pixel_size_m, perturbation_m) -> Estimate:
        raise TypeError("sem-builtin works on the microscope, not on an image pair: use run_on(sem)")

    def run_on(self, sem) -> Estimate:
        if not Capability.AUTOFOCUS & getattr(sem, "capabilities", Capability.NONE):
            raise RuntimeError("this SEM has no built-in autofocus (Capability.AUTOFOCUS)")
        wd0, stig0 = sem.working_distance(), tuple(sem.stig())
        t0 = time.perf_counter()
        try:
            sem.run_autofocus()
            wd1, stig1 = sem.working_distance(), tuple(sem.stig())
        finally:
            sem.set_working_distance(wd0)
            sem.set_stig(*stig0)
        return Estimate(wd1 - wd0, (stig1[0] - stig0[0], stig1[1] - stig0[1]), None, time.perf_counter() - t0, 0)


def sem_has_builtin(sem) -> bool:
    return bool(Capability.AUTOFOCUS & getattr(sem, "capabilities", Capability.NONE))


# ------------------------------------------------------------------ factory
PAIR_METHODS = ("mapfost", "deepfocus")
SEARCH_METHODS = ("sharpness-nm", "deepscore-nm")


def available_methods(models_dir: Path = MODELS_DIR) -> list[str]:
    names = ["mapfost", *sorted(deepfocus_variants(models_dir)), "sharpness-nm"]
    if deepscore_model(models_dir) is not None:
        names.append("deepscore-nm")
    return names + ["sem-builtin"]


def make_pair_method(name: str, *, sem=None, mapfost_calibration: str | MapfostCalibration = "induced",
                     microscope=None, scan_rotation_rad: float = 0.0, perturbation_m: float = 5e-6,
                     n_patches: Optional[int] = None, patch_size: int = 512, seed: int = 0,
                     models_dir: Path = MODELS_DIR, column_alpha_mrad: Optional[float] = None):
    """Build a correction method by name.

    mapfost_calibration: "induced" calibrates on ``sem`` now (it must be in
    focus), "microscope" maps the simulator's hidden parameters (``microscope``
    = MicroscopeParams; tests only), or a ready MapfostCalibration.
    column_alpha_mrad: the column's nominal probe half-angle (setup
    calibration), the prior of a referenced DeepFocus model's column scale."""
    if name == "mapfost":
        if isinstance(mapfost_calibration, MapfostCalibration):
            cal = mapfost_calibration
        elif mapfost_calibration == "microscope":
            if microscope is None:
                raise ValueError("mapfost_calibration='microscope' needs the MicroscopeParams")
            cal = calibration_from_microscope(microscope, scan_rotation_rad)
        elif mapfost_calibration == "induced":
            if sem is None:
                raise ValueError("calibrating MAPFoSt needs the (focused) SEM")
            cal = calibrate_mapfost_on_sem(sem, perturbation_m=perturbation_m, patch_size=patch_size)
        else:
            raise ValueError(f"mapfost_calibration: 'induced', 'microscope' or a MapfostCalibration, "
                             f"not {mapfost_calibration!r}")
        return MapfostMethod(cal, patch_size=patch_size, n_patches=n_patches or 4)
    if name == "sem-builtin":
        return SemBuiltinMethod()
    variants = deepfocus_variants(models_dir)
    if name in variants:
        return DeepFocusMethod(variants[name], n_patches=n_patches, seed=seed, name=name,
                               column_alpha_mrad=column_alpha_mrad)
    if name.startswith("deepfocus"):
        raise ValueError(f"no shipped DeepFocus model {name!r} in {models_dir} (have {sorted(variants) or 'none'})")
    raise ValueError(f"unknown correction method {name!r}; available: {available_methods(models_dir)}")

