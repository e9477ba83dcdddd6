"""Training samples for DeepFocus / DeepScore from the simulated SEM.

A sample is an aberrated state (Δwd, stig x, stig y) relative to the hidden
focus baseline at a random specimen location; the pair is rendered at
Δwd ± perturbation (same field of view, independent shot noise) and the target
is the correction −aberration (seed ch. 3, "Ground truth generation"). Only
the patch area is rendered (the renderer pads by the blur itself), so a
256² pair costs a few ms instead of a 2048×1536 frame.

Specimens: the procedural neuropil (several generator seeds, a few depths)
and real EM textures when paths are given, at a random texture scale.
Microscopes: a handful of hidden parameter sets around configs/sim.yaml's
microscope, so the model is not tied to one α/σ0/stig calibration;
SECOND_MICROSCOPE is a clearly different one, kept out of training for
recalibration tests.
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from autofocus.column_scale import TARGET_CLIP, model_pixel, scale_of
from autofocus.inference import resample
from autofocus.models import column_input
from devices.setup_config import MicroscopeParams, Simulation
from devices.sim import optics
from devices.sim.frames import specimen_world
from devices.sim.sem import render

BASE_MICROSCOPE = MicroscopeParams(alpha_mrad=3.0, sigma0_nm=1.5, stig_rotation_deg=15.0,
                                   stig_scale_x_um=3.0, stig_scale_y_um=3.0)
# Modest spread around the base (first entry drawn most often: it is what the engine runs).
TRAIN_MICROSCOPES: tuple[MicroscopeParams, ...] = (
    BASE_MICROSCOPE,
    BASE_MICROSCOPE.model_copy(update=dict(alpha_mrad=2.8, sigma0_nm=1.0, stig_rotation_deg=13.0)),
    BASE_MICROSCOPE.model_copy(update=dict(alpha_mrad=3.2, sigma0_nm=2.0, stig_rotation_deg=17.0)),
    BASE_MICROSCOPE.model_copy(update=dict(alpha_mrad=3.1, sigma0_nm=2.5, stig_scale_x_um=2.85,
                                           stig_scale_y_um=3.15)),
    BASE_MICROSCOPE.model_copy(update=dict(alpha_mrad=2.9, sigma0_nm=1.2, stig_scale_x_um=3.15,
                                           stig_scale_y_um=2.85, stig_rotation_deg=16.0)),
)
BASE_WEIGHT = 0.4
N_TRAINING_TEXTURES = 24        # of the 30 ISBI 2012 images; the last 6 are the unseen-texture benchmark's


def training_textures(shared: Path) -> list[Path]:
    """The EM textures DeepFocus trains (and fits its output gain) on: the first
    N_TRAINING_TEXTURES of shared/data/em/isbi2012, in name order."""
    folder = Path(shared) / "data/em/isbi2012"
    tex = sorted(folder.glob("*.png"))[:N_TRAINING_TEXTURES]
    if len(tex) < N_TRAINING_TEXTURES:
        raise SystemExit(f"expected {N_TRAINING_TEXTURES}+ ISBI 2012 textures under {folder}")
    return tex
# "Setup B" (devices/sim/column_presets.py): rotated scan, wider aperture, other stigmator axes and gains.
SECOND_MICROSCOPE = MicroscopeParams(preset="setup-b")


@dataclass
class DataConfig:
    patch: int = 256
    n_patches: int = 1                  # aligned patch pairs per sample (score models: N per aberration)
    single_image: bool = False          # DeepScore: one image at the aberration, target magnitudes
    perturbation_um: float = 5.0        # the pair is taken at wd ± this
    pixel_nm: float = 10.0
    # frames taken at this pixel size and resampled to pixel_nm, exactly as the
    # predictor does (area averaging: a 2x coarser model sees 4x the dose per
    # pixel); None = rendered at pixel_nm directly
    acquire_pixel_nm: Optional[float] = None
    current_a: float = 1.5e-9
    dwell_ns: tuple[float, float] = (50.0, 800.0)      # log-uniform
    # aberration mixture: (probability, wd half-range µm, stig half-range), uniform in each
    mixture: tuple[tuple[float, float, float], ...] = (
        (0.35, 20.0, 5.0),      # seed wide range
        (0.15, 20.0, 0.5),      # seed narrow-stig locations
        (0.35, 3.0, 0.75),      # near focus: the loop must be precise here
        (0.15, 32.0, 6.5),      # beyond the seed range: large first steps point the right way
    )
    textures: list[str] = field(default_factory=list)
    texture_pixel_nm: tuple[float, float] = (3.0, 10.0)
    procedural_seeds: tuple[int, ...] = (1, 2, 3)     # seed 0 (configs/sim.yaml) is held out
    procedural_slices: tuple[int, ...] = (0, 60)      # 3 µm apart: unrelated neuropil
    procedural_fraction: float = 0.5                  # when textures are given
    microscopes: str = "train"          # "train" (the set above), "base", "second", "broad" or "columns"
    stig_norm: str = "l2"               # DeepScore stig target: "l2" (rotation invariant) or "l1" (seed)
    augment: bool = True
    aug_p: float = 0.75
    aug_noise_sd: float = 0.2
    aug_gamma_sd: float = 0.25
    aug_contrast_sd: float = 0.25
    aug_brightness_sd: float = 0.25
    pair_jitter_nm: float = 1.0         # drift between the two scans
    # curriculum: the first easy_samples of a stream are drawn at wd ±easy_wd_um,
    # stig ±easy_stig, dwell in easy_dwell_ns and without augmentation, so a fresh
    # network finds the directional (stigmation) cue before the noisy, strongly
    # defocused cases (on such data stig starts to fit after ~100-200 steps of 16);
    # 0 = off.
    easy_samples: int = 0
    easy_tail: float = 0.0              # fraction of easy samples after the curriculum
    easy_wd_um: float = 5.0
    easy_stig: float = 3.0
    easy_dwell_ns: tuple[float, float] = (400.0, 800.0)
    # pair targets referenced to a column of this probe half-angle: −aberration × (α/α_ref)².
    # Why: a pair shows only Σ₊ − Σ₋ = α²·Δ·A (devices/sim/optics.py), so Δwd and α
    # cannot be told apart from one pair (Δz at α looks like 25 µm²/Δz at α·Δz/5 µm);
    # the referenced reading is what a pair does determine, and the column's α
    # (setup, recalibration or the loop's own moves) turns it into µm. None = plain targets.
    alpha_ref_mrad: Optional[float] = None
    target_clip: tuple[float, float] = TARGET_CLIP    # |referenced wd µm|, |stig|
    # fraction of pairs fed as DeepFocusMethod feeds a column whose setup states its α
    # (autofocus.column_scale.model_pixel): resampled to the pixel where the stated α looks
    # like alpha_ref (the statement off by up to column_feed_error either way, frames of a
    # short side in column_feed_frames), the target referenced at the α the model then sees
    column_feed: float = 0.0
    column_feed_error: float = 1.25
    # fraction of pairs whose column (the stated α, the same statement that picked the feed
    # pixel, as seen at the model pixel) is given to a ColumnDeepFocusNet; the rest read unknown
    column_known: float = 0.0
    column_feed_frames: tuple[int, ...] = (768, 1536)

    def card(self) -> dict:
        d = asdict(self)
        d["textures"] = [Path(t).name for t in self.textures]
        if self.microscopes == "columns":
            d["column_ranges"] = COLUMN_RANGES
        d["microscope_sets"] = [m.model_dump(include={"alpha_mrad", "sigma0_nm", "stig_rotation_deg",
                                                     "stig_scale_x_um", "stig_scale_y_um",
                                                     "scan_rotation_offset_deg"}) for m in _sets(self.microscopes)]
        return d


def _sets(kind: str) -> tuple[MicroscopeParams, ...]:
    return {"train": TRAIN_MICROSCOPES, "base": (BASE_MICROSCOPE,), "second": (SECOND_MICROSCOPE,),
            "broad": (BASE_MICROSCOPE,), "columns": (BASE_MICROSCOPE,)}[kind]


def broad_microscope(rng: np.random.Generator) -> MicroscopeParams:
    """Wide random microscope for DeepScore, which should not depend on the setup."""
    return BASE_MICROSCOPE.model_copy(update=dict(
        alpha_mrad=float(rng.uniform(2.4, 5.0)), sigma0_nm=float(rng.uniform(1.0, 3.0)),
        stig_rotation_deg=float(rng.uniform(-90, 90)), scan_rotation_offset_deg=float(rng.uniform(0, 180)),
        stig_scale_x_um=float(rng.uniform(2.3, 3.8)), stig_scale_y_um=float(rng.uniform(2.3, 3.8))))


# Domain-randomised columns (issue 15); ranges uniform unless "log" (log-uniform).
COLUMN_RANGES = {
    "alpha_mrad": {"real_columns": [5.0, 15.0], "p_real": 0.6, "wide": [2.0, 25.0], "log": True},
    "sigma0_nm": [0.5, 4.5], "stig_rotation_deg": [10.0, 20.0], "stig_scale_um": [2.6, 3.4],
    "detector_efficiency": {"range": [0.02, 0.12], "log": True}, "detector_offset": [5.0, 40.0],
    "read_noise": [0.5, 3.0], "line_jitter_px": [0.0, 0.6],
    "se_edge_gain": {"range": [0.0, 1.0], "p_on": 0.7}, "detector_gamma": {"range": [0.6, 1.5], "log": True},
    "frame_gain_sd": [0.0, 0.05], "frame_offset_sd": [0.0, 5.0], "charging_sd": [0.0, 0.08],
}


def column_microscope(rng: np.random.Generator) -> MicroscopeParams:
    """A domain-randomised column (issue 15): probe half-angle 2-25 mrad with
    real columns' 5-15 mrad drawn most, in-focus probe, detector response,
    SE contrast and scan noise all drawn wide (COLUMN_RANGES), so the pair's
    own blur ratio, not one column's blur scale, carries the defocus.
    Stigmator axes and gains stay near the base column's: their units are
    per microscope and go through recalibration."""
    r = COLUMN_RANGES

    def u(key):
        return float(rng.uniform(*r[key]))

    def logu(lo, hi):
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    a = r["alpha_mrad"]
    alpha = logu(*(a["real_columns"] if rng.random() < a["p_real"] else a["wide"]))
    return BASE_MICROSCOPE.model_copy(update=dict(
        alpha_mrad=alpha, sigma0_nm=u("sigma0_nm"), stig_rotation_deg=u("stig_rotation_deg"),
        stig_scale_x_um=u("stig_scale_um"), stig_scale_y_um=u("stig_scale_um"),
        detector_efficiency=logu(*r["detector_efficiency"]["range"]), detector_offset=u("detector_offset"),
        read_noise=u("read_noise"), line_jitter_px=u("line_jitter_px"),
        se_edge_gain=float(rng.uniform(*r["se_edge_gain"]["range"])) if rng.random() < r["se_edge_gain"]["p_on"]
        else 0.0,
        detector_gamma=logu(*r["detector_gamma"]["range"]), frame_gain_sd=u("frame_gain_sd"),
        frame_offset_sd=u("frame_offset_sd"), charging_sd=u("charging_sd")))


def to_unit(img: np.ndarray) -> np.ndarray:
    """8-bit grey (0..255) -> float32 in [-1, 1] (seed normalisation)."""
    return np.asarray(img, np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


class Augmenter:
    """Seed augmentations on [-1, 1] inputs, each with probability p. Gamma and
    brightness/contrast act on the whole sample (both images together: their
    relative contrast carries blur information); the noise map is i.i.d. per pixel."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.cfg
        if rng.random() < c.aug_p:
            g = float(np.clip(rng.normal(1.0, c.aug_gamma_sd), 0.4, 2.5))
            u = np.clip((x + 1) * 0.5, 0, 1)
            x = (u ** g) * 2 - 1
        if rng.random() < c.aug_p:
            m = float(x.mean())
            x = float(rng.normal(1.0, c.aug_contrast_sd)) * (x - m) + m + float(rng.normal(0.0, c.aug_brightness_sd))
        if rng.random() < c.aug_p:
            x = x + rng.normal(0.0, c.aug_noise_sd, size=x.shape).astype(np.float32)
        return x.astype(np.float32, copy=False)


class PairSimulator:
    """Renders aligned image pairs (or single images) at known aberrations."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.worlds = []       # (world, kind, slice depths)
        sim = Simulation()
        for s in cfg.procedural_seeds:
            sp = sim.model_copy(deep=True)
            sp.specimen.seed = int(s)
            self.worlds.append((specimen_world(sp, [], None), "procedural"))
        self.texture_world = None
        if cfg.textures:
            self.texture_world = specimen_world(sim, [Path(t) for t in cfg.textures], None)
            self.n_tex = self.texture_world.specimen.n_slices

    # -------------------------------------------------------------- aberrations
    def draw_aberration(self, rng: np.random.Generator) -> tuple[float, float, float]:
        probs = np.array([m[0] for m in self.cfg.mixture], float)
        _, wd, st = self.cfg.mixture[int(rng.choice(len(probs), p=probs / probs.sum()))]
        return float(rng.uniform(-wd, wd)), float(rng.uniform(-st, st)), float(rng.uniform(-st, st))

    def draw_microscope(self, rng: np.random.Generator) -> MicroscopeParams:
        if self.cfg.microscopes == "broad":
            return broad_microscope(rng)
        if self.cfg.microscopes == "columns":
            return column_microscope(rng)
        sets = _sets(self.cfg.microscopes)
        if len(sets) == 1 or rng.random() < BASE_WEIGHT:
            return sets[0]
        return sets[int(rng.integers(1, len(sets)))]

    def draw_world(self, rng: np.random.Generator):
        """A world with its slice chosen and texture scale set for this sample."""
        c = self.cfg
        if self.texture_world is not None and (not self.worlds or rng.random() >= c.procedural_fraction):
            w = self.texture_world
            w.depth_m = int(rng.integers(self.n_tex)) * w.specimen.slice_thickness_m
            w.specimen.texture_pixel_size_m = float(rng.uniform(*c.texture_pixel_nm)) * 1e-9
            return w
        w, _ = self.worlds[int(rng.integers(len(self.worlds)))]
        w.depth_m = float(c.procedural_slices[int(rng.integers(len(c.procedural_slices)))]) \
            * w.specimen.slice_thickness_m
        return w

    # -------------------------------------------------------------- rendering
    def render(self, world, mp: MicroscopeParams, center, dz_um: float, stig, dwell_s: float,
               shape: tuple[int, int], rng: np.random.Generator, pixel_nm: Optional[float] = None) -> np.ndarray:
        """pixel_nm: the model pixel of this sample where it is not the config's (column_feed)."""
        saved = world.mp
        world.mp = mp          # render() reads the hidden optics from world.mp
        c = self.cfg
        px = pixel_nm or c.pixel_nm
        acq_nm = c.acquire_pixel_nm or px
        if acq_nm > px * 1.001:
            raise ValueError(f"model pixel {px:g} nm is finer than the {acq_nm:g} nm frames: training upsamples "
                             f"nothing (DeepFocusMethod never feeds a referenced model finer than the frame)")
        # the field of ``shape`` model pixels, a frame pixel larger where px/acq_nm is not whole
        scan = tuple(math.ceil(v * px / acq_nm - 1e-6) for v in shape)
        try:
            ab = optics.Aberration(dz_um * 1e-6, float(stig[0]), float(stig[1]))
            img = render(world, center, acq_nm * 1e-9, scan, 0.0, ab, c.current_a, dwell_s, rng)
        finally:
            world.mp = saved
        if acq_nm == px:
            return img
        out = np.rint(resample(img, acq_nm * 1e-9, px * 1e-9)).astype(np.uint8)
        return out[:shape[0], :shape[1]]

    def pair(self, world, mp, center, ab, dwell_s, shape, rng,
             pixel_nm: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
        """(img at wd + Δ, img at wd − Δ) around aberration ab = (Δwd µm, sx, sy)."""
        d = self.cfg.perturbation_um
        plus = self.render(world, mp, center, ab[0] + d, ab[1:], dwell_s, shape, rng, pixel_nm)
        j = rng.normal(0.0, self.cfg.pair_jitter_nm * 1e-9, 2)
        minus = self.render(world, mp, (center[0] + j[0], center[1] + j[1]), ab[0] - d, ab[1:], dwell_s,
                            shape, rng, pixel_nm)
        return plus, minus

    def stated_alpha(self, alpha_mrad: float, rng: np.random.Generator) -> float:
        """The α a setup states for a column of alpha_mrad: off by up to column_feed_error."""
        return alpha_mrad * math.exp(rng.uniform(-1.0, 1.0) * math.log(self.cfg.column_feed_error))

    def feed_pixel_nm(self, alpha_mrad: float, rng: np.random.Generator) -> tuple[Optional[float], Optional[float]]:
        """(model pixel, stated α) of a column_feed sample; (None, None): the config's pixel."""
        c = self.cfg
        if not (c.column_feed > 0 and c.alpha_ref_mrad and c.acquire_pixel_nm and rng.random() < c.column_feed):
            return None, None
        stated = self.stated_alpha(alpha_mrad, rng)
        short = int(rng.choice(c.column_feed_frames))
        # as coarse as the frame allows, beyond the loop's cap (column_scale.MAX_FEED_COARSENING): the
        # shipped stages were trained so (stage V trained with the cap read 15 mrad 19 % off, not 13 %)
        return model_pixel(stated, c.alpha_ref_mrad, c.pixel_nm * 1e-9, c.acquire_pixel_nm * 1e-9, short,
                           c.patch, max_coarsening=None) * 1e9, stated

    def sample(self, rng: np.random.Generator, ab=None, mp=None, dwell_ns=None,
               world=None) -> tuple[np.ndarray, np.ndarray, dict]:
        """One training sample: x (N, 2, P, P) uint8 pairs (or (N, 1, P, P)) and its target."""
        c = self.cfg
        ab = self.draw_aberration(rng) if ab is None else ab
        mp = self.draw_microscope(rng) if mp is None else mp
        dwell_ns = math.exp(rng.uniform(*np.log(c.dwell_ns))) if dwell_ns is None else dwell_ns
        world = self.draw_world(rng) if world is None else world
        center = tuple(rng.uniform(-20e-6, 20e-6, 2))
        P, N = c.patch, c.n_patches
        side = P if N == 1 else int(P * 1.75)      # room for N aligned random offsets
        px, column = None, column_input(None, None)
        if c.single_image:
            imgs = [self.render(world, mp, center, ab[0], ab[1:], dwell_ns * 1e-9, (side, side), rng)]
            s = np.hypot(ab[1], ab[2]) if c.stig_norm == "l2" else abs(ab[1]) + abs(ab[2])
            target = np.array([abs(ab[0]), s], np.float32)
        else:
            px, stated = self.feed_pixel_nm(mp.alpha_mrad, rng)
            imgs = list(self.pair(world, mp, center, ab, dwell_ns * 1e-9, (side, side), rng, px))
            # fed at px the column looks like α·pixel/px at the model's pixel
            looks = c.pixel_nm / px if px else 1.0
            target = referenced_target(ab, mp.alpha_mrad * looks, c.alpha_ref_mrad, c.target_clip)
            if c.column_known > 0 and rng.random() < c.column_known:
                stated = stated or self.stated_alpha(mp.alpha_mrad, rng)
                column = column_input(stated, c.alpha_ref_mrad, 1.0 / looks)
        stack = np.stack(imgs)
        offs = rng.integers(0, side - P + 1, size=(N, 2))
        x = np.stack([stack[:, r:r + P, q:q + P] for r, q in offs])
        return x, target, {"ab": ab, "dwell_ns": dwell_ns, "alpha_mrad": mp.alpha_mrad,
                           "model_pixel_nm": px or c.pixel_nm, "column": column}


def referenced_target(ab, alpha_mrad: float, alpha_ref_mrad: Optional[float],
                      clip: tuple[float, float]) -> np.ndarray:
    """The correction −ab (µm, stig units) as the reference column would read it."""
    t = -np.asarray(ab, np.float64)
    if alpha_ref_mrad:
        t = t * scale_of(alpha_mrad, alpha_ref_mrad)
        t = np.clip(t, [-clip[0], -clip[1], -clip[1]], [clip[0], clip[1], clip[1]])
    return t.astype(np.float32)


class SampleStream:
    """Reproducible batches: x float32 (B, C, P, P) for one patch per sample, or
    (B, N, C, P, P) for N > 1; y (B, 3) corrections or (B, 2) magnitudes."""

    def __init__(self, cfg: DataConfig, seed: int, augment: Optional[bool] = None,
                 sim: Optional[PairSimulator] = None):
        self.cfg = cfg
        self.sim = sim or PairSimulator(cfg)      # share one: procedural slices take seconds to build
        self.rng = np.random.default_rng([seed, 0xDF])
        self.augment = Augmenter(cfg) if (cfg.augment if augment is None else augment) else None
        self.count = 0

    def raw(self) -> tuple[np.ndarray, np.ndarray, bool, tuple[float, ...]]:
        """One unaugmented sample (uint8 x, target, drawn from the easy curriculum, column input)."""
        c = self.cfg
        easy = self.count < c.easy_samples or (c.easy_tail > 0 and self.rng.random() < c.easy_tail)
        self.count += 1
        if easy:
            ab = (float(self.rng.uniform(-c.easy_wd_um, c.easy_wd_um)),
                  *map(float, self.rng.uniform(-c.easy_stig, c.easy_stig, 2)))
            x, y, meta = self.sim.sample(self.rng, ab=ab, dwell_ns=float(self.rng.uniform(*c.easy_dwell_ns)))
        else:
            x, y, meta = self.sim.sample(self.rng)
        return x, y, easy, meta["column"]

    def _prepare(self, x: np.ndarray, easy: bool) -> np.ndarray:
        x = to_unit(x)
        if self.augment is not None and not easy:
            x = self.augment(x, self.rng)
        return x[0] if self.cfg.n_patches == 1 else x

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, column input (B, COLUMN_INPUTS))."""
        raws, xs = [], []
        for _ in range(b):          # each sample augmented as it is drawn (the stream's rng order)
            raws.append(self.raw())
            xs.append(self._prepare(raws[-1][0], raws[-1][2]))
        return self.collate(raws, xs)

    def collate(self, raws: Sequence, xs: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs = [self._prepare(x, easy) for x, _, easy, _ in raws] if xs is None else xs
        return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack([r[1] for r in raws])),
                torch.tensor([r[3] for r in raws], dtype=torch.float32))


class ReplayPool:
    """A pool of rendered samples that batches are drawn from (augmented afresh
    each time), with `refresh` pool entries replaced by new renders per batch.

    Why: rendering is amortised (a 256² pair with margin costs about as much as
    a training step on this CPU), and revisiting samples under fresh
    augmentation is what the seed did (320 pairs). The pool starts from the
    curriculum's easy samples and drifts to the full distribution as entries
    are replaced."""

    def __init__(self, stream: SampleStream, size: int, refresh: int):
        self.s, self.refresh = stream, refresh
        self.pool = [stream.raw() for _ in range(size)]

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = self.s.rng
        for i in rng.integers(0, len(self.pool), self.refresh):
            self.pool[int(i)] = self.s.raw()
        pick = rng.integers(0, len(self.pool), b)
        return self.s.collate([self.pool[int(i)] for i in pick])


class Prefetcher:
    """Renders the next batches in a background thread (numpy/FFT release the
    GIL, so rendering overlaps the training step). One producer, so the batch
    order, and with it the run, stays reproducible."""

    def __init__(self, stream: SampleStream, batch: int, depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.err: Optional[BaseException] = None

        def work():
            try:
                while not self._stop.is_set():
                    item = stream.batch(batch)
                    while not self._stop.is_set():
                        try:
                            self.q.put(item, timeout=0.2)
                            break
                        except queue.Full:
                            pass
            except BaseException as e:          # surfaced by next()
                self.err = e
        self.t = threading.Thread(target=work, daemon=True, name="deepfocus-data")
        self.t.start()

    def next(self):
        while True:
            if self.err is not None:
                raise self.err
            try:
                return self.q.get(timeout=0.5)
            except queue.Empty:
                continue

    def close(self):
        self._stop.set()
        self.t.join(timeout=5)


def samples_to_tensors(samples: Sequence, patch: int, n_patches: int, rng: np.random.Generator,
                       augment: Optional[Augmenter] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random aligned crops from caller-provided (img_plus, img_minus, target) triples
    (recalibration data): x (B, 2, P, P) or (B, N, 2, P, P), y (B, 3)."""
    xs, ys = [], []
    for plus, minus, target in samples:
        plus, minus = np.asarray(plus), np.asarray(minus)
        h, w = min(plus.shape[0], minus.shape[0]), min(plus.shape[1], minus.shape[1])
        if h < patch or w < patch:
            raise ValueError(f"sample of {h}x{w} px is smaller than the {patch}² patch")
        offs = np.stack([rng.integers(0, h - patch + 1, n_patches), rng.integers(0, w - patch + 1, n_patches)], 1)
        x = np.stack([np.stack([plus[r:r + patch, q:q + patch], minus[r:r + patch, q:q + patch]])
                      for r, q in offs])
        x = to_unit(x)
        if augment is not None:
            x = augment(x, rng)
        xs.append(x[0] if n_patches == 1 else x)
        ys.append(np.asarray(target, np.float32))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
