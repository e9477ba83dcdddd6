"""Specimen signal for the simulated SEM: secondary-electron yield in [0, 1].

A specimen is a stack of z-slices (real EM images or a procedural neuropil).
Each slice tiles the infinite plane by mirroring, so any stage position and
any field of view shows seamless tissue. The optics (probe blur, noise) are
applied by the caller; this module only answers "how bright is the surface
at this point", sampled at frame pixels.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

_LEVEL_THRESHOLD = 1.5      # frame/texture pixel ratio above which we sample a pre-smoothed level
_BAND_ROWS = 1024           # rotated frames are warped in bands so the source region stays small


class _LRU:
    """Tiny thread-safe LRU cache (slices are large; keep only a few)."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make):
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = make()      # built outside the lock: generation can take a second
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)
        return value


def _fold_segments(start: int, stop: int, n: int):
    """Split the integer range [start, stop) of a mirror-tiled axis of length n
    (period 2n: 0..n-1, n-1..0) into runs that are plain slices of the texture.
    Yields (dst0, dst1, src0, src1, reversed)."""
    k = start
    while k < stop:
        m = k % (2 * n)
        if m < n:
            length = min(n - m, stop - k)
            yield k - start, k - start + length, m, m + length, False
        else:
            mm = m - n                       # index n-1-mm, counting down
            length = min(n - mm, stop - k)
            yield k - start, k - start + length, n - mm - length, n - mm, True
        k += length


def _fold_index(start: int, stop: int, n: int) -> np.ndarray:
    m = np.arange(start, stop) % (2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def _mirrored_region(tex: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Rows [r0, r1) x cols [c0, c1) of the mirror-tiled plane, built from block copies
    (much faster than a per-pixel gather)."""
    rows = list(_fold_segments(r0, r1, tex.shape[0]))
    cols = list(_fold_segments(c0, c1, tex.shape[1]))
    if len(rows) * len(cols) > 64:        # tiny (coarse-level) texture: index gather is cheaper
        return tex.take(_fold_index(r0, r1, tex.shape[0]), 0).take(_fold_index(c0, c1, tex.shape[1]), 1)
    out = np.empty((r1 - r0, c1 - c0), np.float32)
    for d0, d1, s0, s1, rrev in rows:
        band = tex[s0:s1]
        if rrev:
            band = band[::-1]
        for e0, e1, t0, t1, crev in cols:
            block = band[:, t0:t1]
            out[d0:d1, e0:e1] = block[:, ::-1] if crev else block
    return out


def _load_image(path: Path) -> list[np.ndarray]:
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile
        a = np.asarray(tifffile.imread(str(path)))
        if a.ndim == 3 and a.shape[-1] in (3, 4):          # colour image: average the channels
            a = a[..., :3].mean(axis=-1)
        return [np.asarray(s, np.float32) for s in (a if a.ndim == 3 else [a])]
    a = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if a is None:
        raise ValueError(f"specimen image {str(path)!r} could not be read")
    return [a.astype(np.float32)]


# ------------------------------------------------------------------ procedural
class _Neuropil:
    """Procedural neuropil: neurites are 3-D line objects (birth/death depth,
    lateral drift with z), so consecutive slices share most cells and slices a
    few micrometres apart share none. Each slice is an additively weighted
    Voronoi tessellation of the neurite cross-sections (seeds drawn as ellipses),
    computed at full resolution by one labelled distance transform."""

    BLOCK_UM = 1.0                 # neurites are spawned per 1 µm block of depth
    LIFE_UM = (1.5, 4.5)           # neurite length along z
    CELL_AREA_UM2 = 0.07           # mean cross-section area (sets the density)

    def __init__(self, seed: int, size: int, pixel_size_m: float, slice_thickness_m: float):
        self.seed, self.size = seed, size
        self.nm = pixel_size_m * 1e9                         # nm per pixel
        self.th_um = slice_thickness_m * 1e6
        self.pad = int(math.ceil(600 / self.nm))             # seeds live on a padded canvas
        self.canvas = size + 2 * self.pad
        area_um2 = (self.canvas * self.nm * 1e-3) ** 2
        self.rate = area_um2 / self.CELL_AREA_UM2 / np.mean(self.LIFE_UM)   # spawns per µm of z
        self._blocks = _LRU(16)

    def _px(self, nm):
        return nm / self.nm

    def _block(self, b: int) -> dict:
        def make():
            rng = np.random.default_rng([self.seed, 101, b + (1 << 20)])
            n = rng.poisson(self.rate * self.BLOCK_UM)
            C = self.canvas
            tilt = np.abs(rng.normal(0, 0.45, n))            # neurite inclination to the z axis (rad)
            drift = np.tan(np.minimum(tilt, 1.2)) * 1000 / self.nm     # px per µm of depth
            ang = rng.uniform(0, 2 * np.pi, n)
            r = np.clip(rng.lognormal(np.log(self._px(75)), 0.55, n), self._px(25), self._px(650))
            big = r > self._px(200)
            myelin = big & (rng.random(n) < 0.3)
            za = (b + rng.random(n)) * self.BLOCK_UM
            life = rng.uniform(*self.LIFE_UM, n)
            mito_len = rng.uniform(0.4, 1.6, n)
            mza = za + rng.random(n) * np.maximum(life - mito_len, 0)
            return dict(
                x0=rng.uniform(0, C, n), y0=rng.uniform(0, C, n), za=za, zb=za + life,
                vx=drift * np.cos(ang), vy=drift * np.sin(ang), ang=ang,
                elong=1 / np.cos(np.minimum(tilt, 1.0)), r=r,
                bright=np.clip(rng.normal(0.74, 0.05, n) - 0.12 * (rng.random(n) < 0.15), 0.45, 0.9),
                myelin=myelin, myelin_t=self._px(rng.uniform(35, 110, n)) * (0.6 + r / self._px(650)),
                mito=(r > self._px(110)) & ~myelin & (rng.random(n) < 0.55),
                mza=mza, mzb=mza + mito_len, mb=self._px(rng.uniform(45, 110, n)),
                mratio=rng.uniform(1.2, 3.5, n), moff=rng.uniform(0, 0.35, n), moffa=rng.uniform(0, 6.3, n),
                mper=self._px(rng.uniform(22, 38, n)), mphase=rng.random(n),
                ves=(r > self._px(100)) & (r < self._px(400)) & ~myelin & (rng.random(n) < 0.22),
                uid=np.arange(n) + (b + (1 << 20)) * 100000)
        return self._blocks.get(b, make)

    def _alive(self, z: float) -> dict:
        b = int(math.floor(z / self.BLOCK_UM))
        back = int(math.ceil(self.LIFE_UM[1] / self.BLOCK_UM))
        parts = [self._block(i) for i in range(b - back, b + 1)]
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        keep = (cat["za"] <= z) & (z < cat["zb"])
        return {k: v[keep] for k, v in cat.items()}

    def _smooth_noise(self, rng, shape, grid: int, sigma: float = 1.0) -> np.ndarray:
        g = rng.standard_normal((max(2, shape[0] // grid), max(2, shape[1] // grid)), dtype=np.float32)
        g = cv2.GaussianBlur(g, (0, 0), sigma)
        g /= max(float(g.std()), 1e-6)
        return cv2.resize(g, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)

    def _warp_field(self, z: float, C: int) -> tuple[np.ndarray, np.ndarray]:
        """Smooth in-plane displacement (wiggly membranes), continuous in z."""
        step = 0.4
        k = math.floor(z / step)
        f = z / step - k
        fields = []
        for kk in (k, k + 1):
            rng = np.random.default_rng([self.seed, 202, kk + (1 << 20)])
            g = rng.standard_normal((2, max(2, C // 28), max(2, C // 28)), dtype=np.float32)
            fields.append(g)
        g = (1 - f) * fields[0] + f * fields[1]
        amp = self._px(36)
        out = []
        for c in g:
            c = cv2.GaussianBlur(c, (0, 0), 1.2)
            c *= amp / max(float(c.std()), 1e-6)
            out.append(cv2.resize(c, (C, C), interpolation=cv2.INTER_LINEAR))
        return out[0], out[1]

    def render(self, k: int) -> np.ndarray:
        z = (k + 0.5) * self.th_um
        L = self._alive(z)
        C, n = self.canvas, len(L["r"])
        rng = np.random.default_rng([self.seed, 303, k])
        dz = z - L["za"]
        x = np.mod(L["x0"] + L["vx"] * dz, C)
        y = np.mod(L["y0"] + L["vy"] * dz, C)
        taper = np.sqrt(np.clip(np.minimum(dz, L["zb"] - z) / 0.25, 0, 1))   # cells shrink before ending
        r = L["r"] * taper
        # Seeds as ellipses (oblique neurites cut obliquely) -> additively weighted Voronoi.
        ids = np.zeros((C, C), np.int32)
        hidden = np.zeros(n, bool)               # seeds swallowed by a myelinated axon
        for i in np.flatnonzero(L["myelin"] & (taper > 0.3)):
            ca, sa = math.cos(L["ang"][i]), math.sin(L["ang"][i])
            u, v = (x - x[i]) * ca + (y - y[i]) * sa, -(x - x[i]) * sa + (y - y[i]) * ca
            inside = (u / (r[i] * L["elong"][i])) ** 2 + (v / r[i]) ** 2 < 1.2
            inside[i] = False
            hidden |= inside
        for i in np.argsort(-r):
            if hidden[i]:
                continue
            w = max(1.0, (1.0 if L["myelin"][i] else 0.8) * r[i])
            cv2.ellipse(ids, (int(x[i]), int(y[i])), (int(w * L["elong"][i]), int(w)),
                        math.degrees(L["ang"][i]), 0, 360, int(i + 1), -1)
        zero = ids > 0
        _, labels = cv2.distanceTransformWithLabels((~zero).view(np.uint8), cv2.DIST_L2, 5,
                                                    labelType=cv2.DIST_LABEL_PIXEL)
        lut = np.concatenate([[0], ids[zero]]).astype(np.int32)     # DT labels zero pixels in raster order
        cell = lut[labels]
        # Membranes: the blurred cell-boundary band. Where walls meet, the band
        # saturates over a wider area, which rounds cell corners like real neuropil.
        band = np.zeros((C, C), np.float32)
        dh = cell[:, 1:] != cell[:, :-1]
        dv = cell[1:] != cell[:-1]
        band[:, 1:] += dh
        band[:, :-1] += dh
        band[1:] += dv
        band[:-1] += dv
        sb = self._px(9.0)
        mem = cv2.GaussianBlur(band, (0, 0), sb)
        mem *= 1.0 / math.erf(1 / (sb * math.sqrt(2)))       # a straight wall peaks at 1
        np.minimum(mem, 1, out=mem)
        bright = np.concatenate([[0.7], L["bright"]]).astype(np.float32)
        img = bright[cell]
        img += 0.04 * self._smooth_noise(rng, (C, C), 16, 1.5) + 0.03 * self._smooth_noise(rng, (C, C), 4, 0.7)
        amp = 0.78 + 0.08 * self._smooth_noise(rng, (C, C), 64)
        img *= 1 - amp * mem
        self._myelin(img, cell, L, x, y, r, taper)
        self._mitochondria(img, cell, mem, L, x, y, z, taper)
        self._vesicles(img, cell, mem, L, x, y, r, k)
        dots = np.zeros((C, C), np.float32)
        m = rng.integers(0, C * C, int(C * C * 0.002))
        dots.ravel()[m] = 1.0
        img *= 1 - 0.25 * np.minimum(cv2.GaussianBlur(dots, (0, 0), self._px(5)) * 12, 1)
        dx, dy = self._warp_field(z, C)
        grid = np.arange(C, dtype=np.float32)
        img = cv2.remap(img, dx + grid[None, :], dy + grid[:, None], cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REFLECT)
        p, S = self.pad, self.size
        out = img[p:p + S, p:p + S]
        grain = rng.standard_normal((S, S), dtype=np.float32)
        out += 0.06 * cv2.GaussianBlur(grain, (0, 0), 0.7)
        return np.clip(out, 0, 1)

    def _myelin(self, img, cell, L, x, y, r, taper):
        """Dark lamellar elliptical annulus inside a myelinated axon (its Voronoi seed
        is the full ellipse, so the ring always lies inside its own cell)."""
        C = img.shape[0]
        for i in np.flatnonzero(L["myelin"] & (taper > 0.3)):
            b = 0.97 * r[i]
            a = b * L["elong"][i]
            e = int(a) + 3
            x0, x1, y0, y1 = int(x[i]) - e, int(x[i]) + e + 1, int(y[i]) - e, int(y[i]) + e + 1
            if x0 < 0 or y0 < 0 or x1 > C or y1 > C:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            ca, sa = math.cos(L["ang"][i]), math.sin(L["ang"][i])
            u = (xx - x[i]) * ca + (yy - y[i]) * sa
            v = -(xx - x[i]) * sa + (yy - y[i]) * ca
            edge = (1 - np.sqrt((u / a) ** 2 + (v / b) ** 2)) * b       # px inside the outer outline
            t = min(L["myelin_t"][i], 0.45 * b)
            alpha = np.clip(edge + 0.5, 0, 1) * np.clip(t - edge + 0.5, 0, 1)
            val = 0.2 + 0.05 * np.cos(2 * np.pi * edge / self._px(12))
            patch = img[y0:y1, x0:x1]
            patch += alpha * (val - patch)

    def _mitochondria(self, img, cell, mem, L, x, y, z, taper):
        C = img.shape[0]
        for i in np.flatnonzero(L["mito"] & (L["mza"] <= z) & (z < L["mzb"])):
            half = (L["mzb"][i] - L["mza"][i]) / 2
            cap = np.sqrt(max(0.0, 1 - (max(0.0, abs(z - L["mza"][i] - half) - half + 0.12) / 0.12) ** 2))
            b = L["mb"][i] * cap * taper[i]
            a = b * L["mratio"][i]
            if b < 2:
                continue
            a = min(a, 0.8 * L["r"][i] * L["elong"][i])
            cx = x[i] + L["moff"][i] * L["r"][i] * math.cos(L["moffa"][i])
            cy = y[i] + L["moff"][i] * L["r"][i] * math.sin(L["moffa"][i])
            e = int(a) + 3
            x0, x1, y0, y1 = int(cx) - e, int(cx) + e + 1, int(cy) - e, int(cy) + e + 1
            if x0 < 0 or y0 < 0 or x1 > C or y1 > C:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            ca, sa = math.cos(L["ang"][i]), math.sin(L["ang"][i])
            u = (xx - cx) * ca + (yy - cy) * sa
            v = -(xx - cx) * sa + (yy - cy) * ca
            edge = (1 - np.sqrt((u / a) ** 2 + (v / b) ** 2)) * b          # ~px inside the outline
            alpha = np.clip(edge + 0.5, 0, 1) * (cell[y0:y1, x0:x1] == i + 1) * np.clip(1 - 2 * mem[y0:y1, x0:x1], 0, 1)
            phase = u / L["mper"][i] + L["mphase"][i] + 0.25 * np.sin(v / self._px(25))
            cristae = np.exp(-((phase - np.round(phase)) * L["mper"][i] / self._px(4.5)) ** 2) * (edge > 3)
            val = 0.46 - 0.2 * cristae - 0.22 * np.exp(-(edge / self._px(5)) ** 2)
            patch = img[y0:y1, x0:x1]
            patch += alpha * (val - patch)

    def _vesicles(self, img, cell, mem, L, x, y, r, k):
        """Synaptic vesicles: dark rings in large boutons. All vesicles of a bouton are
        drawn with a handful of array operations; a per-vesicle Python loop of small
        numpy calls starves other threads of the GIL (the GUI froze for 200 ms)."""
        C = img.shape[0]
        for i in np.flatnonzero(L["ves"] & (r > self._px(60))):
            rng = np.random.default_rng([self.seed, 404, k, int(L["uid"][i])])
            rc = 0.8 * r[i]
            rv = self._px(rng.uniform(16, 21))
            n = min(150, int(0.7 * rc ** 2 / rv ** 2))
            rad = rc * np.sqrt(rng.random(n))
            th = rng.uniform(0, 2 * np.pi, n)
            ox, oy = 0.3 * r[i] * math.cos(L["moffa"][i]), 0.3 * r[i] * math.sin(L["moffa"][i])
            e = int(rv) + 4
            vx = x[i] + ox + rad * np.cos(th)
            vy = y[i] + oy + rad * np.sin(th)
            x0, y0 = vx.astype(int) - e, vy.astype(int) - e
            keep = (x0 >= 0) & (y0 >= 0) & (x0 + 2 * e + 1 <= C) & (y0 + 2 * e + 1 <= C)
            if not keep.any():
                continue
            vx, vy, x0, y0 = vx[keep], vy[keep], x0[keep], y0[keep]
            off = np.arange(2 * e + 1)
            yy = y0[:, None, None] + off[None, :, None]             # (n, w, 1) rows
            xx = x0[:, None, None] + off[None, None, :]             # (n, 1, w) columns
            d = np.hypot(xx - vx[:, None, None], yy - vy[:, None, None])
            own = (cell[yy, xx] == i + 1) & (mem[yy, xx] < 0.3)     # stay inside the bouton
            ring = 0.55 * np.exp(-((d - rv) / self._px(5)) ** 2) * own
            factor = (1 - ring + 0.05 * (d < rv - 1) * own).astype(np.float32)
            bx, by = int(x0.min()), int(y0.min())                   # the bouton's bounding box
            h, w = int(y0.max()) - by + 2 * e + 1, int(x0.max()) - bx + 2 * e + 1
            flat = np.broadcast_to((yy - by) * w + (xx - bx), factor.shape).ravel()
            gain = np.ones(h * w, np.float32)                       # overlapping vesicles multiply
            np.multiply.at(gain, flat, factor.ravel())
            img[by:by + h, bx:bx + w] *= gain.reshape(h, w)


class Specimen:
    """SE yield of the specimen surface as a function of position and milled depth."""

    def __init__(self, images: list[Path] | None = None, texture_pixel_size_m: float | None = None,
                 slice_thickness_m: float = 50e-9, seed: int = 0, procedural_size: int = 2048,
                 procedural_pixel_size_m: float = 4e-9):
        if slice_thickness_m <= 0:
            raise ValueError(f"slice_thickness_m must be > 0, got {slice_thickness_m}")
        self.slice_thickness_m = float(slice_thickness_m)
        self.seed = int(seed)
        self._levels = _LRU(8)
        self._mean: float | None = None
        if images:
            slices: list[np.ndarray] = []
            for p in images:
                slices.extend(_load_image(p))
            # One stack-wide percentile mapping: keeps slice-to-slice contrast and
            # puts textures from different sources on a comparable scale.
            sub = np.concatenate([s[::4, ::4].ravel() for s in slices])
            lo, hi = np.percentile(sub, [1.0, 99.0])
            scale = 0.9 / max(hi - lo, 1e-6)
            self._slices = [np.clip((s - lo) * scale + 0.05, 0, 1).astype(np.float32) for s in slices]
            self.texture_pixel_size_m = None if texture_pixel_size_m is None else float(texture_pixel_size_m)
            self._procedural = None
        else:
            self._slices = None
            self._procedural = _Neuropil(seed=self.seed, size=int(procedural_size),
                                        pixel_size_m=float(procedural_pixel_size_m),
                                        slice_thickness_m=self.slice_thickness_m)
            self._proc_cache = _LRU(4)
            self.texture_pixel_size_m = float(procedural_pixel_size_m)

    # ------------------------------------------------------------ slices
    @property
    def n_slices(self) -> int | None:
        """Number of distinct slices (None: procedural, unbounded)."""
        return None if self._slices is None else len(self._slices)

    def slice_index(self, depth_m: float) -> int:
        """Slice shown after milling depth_m into the section; image stacks are
        traversed back and forth (mirrored) so any depth has a slice."""
        k = int(math.floor(abs(float(depth_m)) / self.slice_thickness_m + 1e-6))
        n = self.n_slices
        if n is None:
            return k
        m = k % (2 * n)
        return m if m < n else 2 * n - 1 - m

    def slice_image(self, index: int) -> np.ndarray:
        """Full-resolution texture of one slice (float32 in [0, 1]); do not modify."""
        if self._slices is not None:
            return self._slices[index]
        return self._proc_cache.get(index, lambda: self._procedural.render(index))

    def mean_level(self) -> float:
        """Mean yield of the texture (used by the wafer to match overview brightness)."""
        if self._mean is None:      # procedural: measured once (0.58-0.62 over seeds), no slice render
            self._mean = 0.6 if self._slices is None else float(np.mean([s[::4, ::4].mean() for s in self._slices]))
        return self._mean

    def overview_texture(self, shape: tuple[int, int], pixel_size_m: float, lumen: float = 0.2) -> np.ndarray:
        """Tissue as seen at micrometre pixels (the EM texture has averaged out): density
        variation, fibre streaks, somata with nuclei, capillaries whose lumen shows
        `lumen`. Mean matches mean_level(); deterministic for the seed."""
        h, w = int(shape[0]), int(shape[1])
        um = 1e-6 / pixel_size_m
        rng = np.random.default_rng([self.seed, 29, h, w])
        tex = np.full((h, w), self.mean_level(), np.float32)
        for grid, amp in ((25 * um, 0.06), (5 * um, 0.035)):
            g = rng.standard_normal((max(2, int(h / grid) + 2), max(2, int(w / grid) + 2))).astype(np.float32)
            g = cv2.resize(cv2.GaussianBlur(g, (0, 0), 1.0), (w, h), interpolation=cv2.INTER_CUBIC)
            tex += amp * (g - g.mean()) / max(float(g.std()), 1e-6)
        streak = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 10 * um, sigmaY=1.5 * um)
        tex += 0.05 * streak / max(float(streak.std()), 1e-6)
        area = h * w / um ** 2
        for _ in range(int(area / 900)):                # somata with nucleus and nucleolus
            c = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
            r = rng.uniform(5, 9) * um
            base = float(tex[c[1], c[0]])
            cv2.circle(tex, c, int(r), base + 0.1, -1)
            cv2.circle(tex, c, int(0.55 * r), base + 0.15, -1)
            cv2.circle(tex, c, max(1, int(0.12 * r)), base - 0.1, -1)
        for _ in range(max(1, int(area / 15000))):       # capillaries: resin-filled lumen, bright wall
            c = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
            r = rng.uniform(3, 10) * um
            cv2.circle(tex, c, int(r + 1.5 * um), 0.95, -1)
            cv2.circle(tex, c, int(r), lumen, -1)
        tex += 0.03 * rng.standard_normal((h, w)).astype(np.float32)
        return np.clip(cv2.GaussianBlur(tex, (0, 0), max(0.6, 0.5 * um)), 0, 1)

    def _level(self, index: int, factor: float) -> np.ndarray:
        if factor <= 1.0:
            return self.slice_image(index)

        def make():
            tex = self.slice_image(index)
            w = max(2, int(round(tex.shape[1] / factor)))
            h = max(2, int(round(tex.shape[0] / factor)))
            return cv2.resize(tex, (w, h), interpolation=cv2.INTER_AREA)
        return self._levels.get((index, round(factor, 6)), make)

    # ------------------------------------------------------------ sampling
    def sample(self, center_m: tuple[float, float], pixel_size_m: float, shape: tuple[int, int],
               rotation_rad: float = 0.0, depth_m: float = 0.0) -> np.ndarray:
        """Yield map (h, w) float32 in [0, 1]. Pixel (i, j) sits at
        center + R(rotation) @ ((j - (w-1)/2) p, (i - (h-1)/2) p)."""
        h, w = int(shape[0]), int(shape[1])
        p = float(pixel_size_m)
        if h <= 0 or w <= 0:
            return np.zeros((max(h, 0), max(w, 0)), np.float32)
        if not p > 0:
            raise ValueError(f"pixel_size_m must be > 0, got {pixel_size_m}")
        index = self.slice_index(depth_m)
        t = self.texture_pixel_size_m or p
        ratio = p / t
        # Pre-smoothed level at 2^(k/2) steps at or above the ratio: sampling then
        # never skips texture pixels (no aliasing) and few levels get cached.
        factor = 1.0 if ratio <= _LEVEL_THRESHOLD else 2.0 ** (math.ceil(2 * math.log2(ratio) - 1e-9) / 2)
        tex = self._level(index, factor)
        base = self.slice_image(index)
        tx = t * base.shape[1] / tex.shape[1]       # exact level pixel size (rounded level shape)
        ty = t * base.shape[0] / tex.shape[0]
        c, s = math.cos(rotation_rad), math.sin(rotation_rad)
        # Texture coords u = X / tx + N / 2 - 0.5: the tile is centred on the origin, so a
        # section centre (local origin) shows clean tissue rather than a mirror corner.
        a11, a12 = c * p / tx, -s * p / tx
        a21, a22 = s * p / ty, c * p / ty
        jc, ic = (w - 1) / 2.0, (h - 1) / 2.0
        u00 = center_m[0] / tx + (tex.shape[1] - 1) / 2 - a11 * jc - a12 * ic
        v00 = center_m[1] / ty + (tex.shape[0] - 1) / 2 - a21 * jc - a22 * ic
        out = np.empty((h, w), np.float32)
        band = h if (s == 0.0 and c > 0) else _BAND_ROWS
        for i0 in range(0, h, band):
            i1 = min(h, i0 + band)
            self._warp_band(tex, out, i0, i1, w, a11, a12, a21, a22, u00, v00)
        return out

    @staticmethod
    def _warp_band(tex, out, i0, i1, w, a11, a12, a21, a22, u00, v00):
        # Affine from band pixel (j, i - i0) to unbounded texture coords.
        ub = u00 + a12 * i0
        vb = v00 + a22 * i0
        corners_j = np.array([0, w - 1, 0, w - 1], np.float64)
        corners_i = np.array([0, 0, i1 - i0 - 1, i1 - i0 - 1], np.float64)
        us = ub + a11 * corners_j + a12 * corners_i
        vs = vb + a21 * corners_j + a22 * corners_i
        c0, c1 = math.floor(us.min()) - 1, math.floor(us.max()) + 3
        r0, r1 = math.floor(vs.min()) - 1, math.floor(vs.max()) + 3
        # Integer-aligned 1:1 unrotated sampling is a plain copy of the mirrored tile.
        if a12 == 0 and a21 == 0 and abs(a11 - 1) < 1e-9 and abs(a22 - 1) < 1e-9:
            iu, iv = round(ub), round(vb)
            if abs(ub - iu) < 1e-4 and abs(vb - iv) < 1e-4:
                out[i0:i1] = _mirrored_region(tex, iv, iv + i1 - i0, iu, iu + w)
                return
        region = _mirrored_region(tex, r0, r1, c0, c1)
        m = np.array([[a11, a12, ub - c0], [a21, a22, vb - r0]], np.float64)
        cv2.warpAffine(region, m, (w, i1 - i0), dst=out[i0:i1],
                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT)
