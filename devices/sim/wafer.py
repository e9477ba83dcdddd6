"""Virtual wafer: silicon disk carrying resin-embedded tissue sections. Ground truth for the
simulated SEM and stage: section layout, material at any point, what GCIB milling has left, surface
height (focus) and the SE yield. Metres and radians; stage (0, 0) = wafer centre."""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from devices.setup_config import WaferParams
from devices.sim.specimen import Specimen

VACUUM, SILICON, RESIN, TISSUE = 0, 1, 2, 3
SILICON_LEVEL, RESIN_LEVEL = 0.75, 0.2
TISSUE_RANGE = (0.1, 0.7)
THIN_FILM_M = 25e-9          # films thinner than this let the silicon yield show through
RASTER_M = 2e-6              # remaining-thickness raster pitch
COARSE_M = 1e-6              # overview tissue texture pitch
_SHIFT = 4                   # cv2 polygon sub-pixel bits


@dataclass
class SectionTruth:
    id: int
    center_m: tuple[float, float]
    size_m: tuple[float, float]          # nominal tissue (w, h) before the irregular outline
    angle_rad: float
    tissue_polygon_m: np.ndarray         # (N, 2) world coordinates
    resin_polygon_m: np.ndarray          # (M, 2)
    thickness_m: float


def _rot(a: float) -> np.ndarray:
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def _smooth_noise(rng, shape, grid: float, sigma: float = 1.0) -> np.ndarray:
    """Unit-s.d. smooth random field: normal knots every `grid` px, blurred, upsampled."""
    kh, kw = max(2, int(shape[0] / grid) + 2), max(2, int(shape[1] / grid) + 2)
    g = cv2.GaussianBlur(rng.standard_normal((kh, kw)).astype(np.float32), (0, 0), sigma)
    g = cv2.resize(g, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return (g - g.mean()) / max(float(g.std()), 1e-6)


def _inside_polygon(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule for scattered points. Points sorted by y: each edge only tests the
    points in its y-span, so the cost is ~N log N, not N x edges."""
    order = np.argsort(py, kind="stable")
    xs, ys, inside = px[order], py[order], np.zeros(px.shape, bool)
    for (xi, yi), (xj, yj) in zip(poly, np.roll(poly, 1, 0)):
        a, b = np.searchsorted(ys, (min(yi, yj), max(yi, yj)))       # yi <= y < yj (or reversed)
        if b > a:
            inside[a:b] ^= xs[a:b] < (xj - xi) * (ys[a:b] - yi) / (yj - yi) + xi
    inside[order] = inside.copy()
    return inside


def _covers(poly: np.ndarray, w: int, h: int) -> bool:
    """True if the polygon (pixel coords) contains the whole w x h frame."""
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    a, ab = poly, np.roll(poly, -1, 0) - poly
    u = np.clip(((c - a) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-12), 0, 1)
    gap = np.hypot(*(a + u[:, None] * ab - c).T).min()        # centre to nearest outline point
    return gap > math.hypot(w, h) / 2 + 1 and bool(_inside_polygon(c[:1], c[1:], poly)[0])


def _pixel_box(poly: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> tuple[int, int, int, int]:
    """Integer pixel bounding box of a polygon, clipped to [x0, x1) x [y0, y1)."""
    lo, hi = np.floor(poly.min(0)).astype(np.int64), np.ceil(poly.max(0)).astype(np.int64) + 1
    return max(x0, int(lo[0])), max(y0, int(lo[1])), min(x1, int(hi[0])), min(y1, int(hi[1]))


def _boxes_hit(bb: np.ndarray, lo, hi) -> np.ndarray:
    """Indices of boxes (xmin, ymin, xmax, ymax) overlapping the box lo..hi."""
    return np.flatnonzero((bb[:, 0] <= hi[0]) & (bb[:, 2] >= lo[0]) & (bb[:, 1] <= hi[1]) & (bb[:, 3] >= lo[1]))


class VirtualWafer:
    """25.4 mm (configurable) silicon wafer with `params.sections` sections."""

    serial_depth = True      # section k shows the block k section thicknesses deeper (serial sections)

    def __init__(self, params: WaferParams, specimen: Specimen | None = None, seed: int | None = None):
        self.params, self.seed = params, int(params.seed if seed is None else seed)
        self.specimen = specimen if specimen is not None else Specimen(seed=self.seed)
        self.radius_m = params.diameter_mm * 1e-3 / 2
        self.thickness_m = params.thickness_nm * 1e-9
        rng = np.random.default_rng([self.seed, 1])
        self.sections: list[SectionTruth] = self._layout(rng)
        self._milled = np.zeros(len(self.sections))     # cumulative nominal mill depth per section
        self._bbox = np.array([[*s.resin_polygon_m.min(0), *s.resin_polygon_m.max(0)] for s in self.sections]
                              ).reshape(-1, 4)         # xmin, ymin, xmax, ymax
        self._bow, self._saddle, ga = rng.uniform(-2e-6, 2e-6), rng.uniform(-0.5e-6, 0.5e-6), rng.uniform(0, 6.3)
        self._grad = np.array([math.cos(ga), math.sin(ga)]) * 0.03 / self.radius_m
        self._make_debris(rng)
        # caches (plain dicts: a racing thread only recomputes the same deterministic value)
        self._fields: dict[int, tuple] = {}
        self._coarse: dict[int, np.ndarray] = {}
        trng = np.random.default_rng([self.seed, 31])     # per-section look: small shift and gain
        self._tex_shift = trng.uniform(-20e-6, 20e-6, (len(self.sections), 2))
        self._tex_gain = 1 + 0.04 * trng.standard_normal(len(self.sections))

    # ------------------------------------------------------------ layout
    def _layout(self, rng) -> list[SectionTruth]:
        p, n = self.params, self.params.sections
        w0, h0 = p.section_size_um[0] * 1e-6, p.section_size_um[1] * 1e-6
        m, jit, sp = p.resin_margin_um * 1e-6, p.size_jitter, p.spacing_um * 1e-6
        rot, rj = math.radians(p.rotation_deg), math.radians(p.rotation_jitter_deg)
        W, H = w0 * (1 + jit) + 2 * m, h0 * (1 + jit) + 2 * m          # largest resin rectangle
        th = np.linspace(rot - rj, rot + rj, 721)
        hx = float(np.max(W * np.abs(np.cos(th)) + H * np.abs(np.sin(th)))) / 2
        hy = float(np.max(W * np.abs(np.sin(th)) + H * np.abs(np.cos(th)))) / 2
        pj = 0.25 * sp                                   # position jitter keeps >= spacing/2 gaps
        px, py = 2 * hx + sp, 2 * hy + sp
        ru = self.radius_m - min(1e-3, 0.05 * self.radius_m)    # keep clear of the wafer edge
        grids = []                                       # grid centred or half-pitch offset: keep the roomiest
        for ox, oy in ((0, 0), (0, 0.5), (0.5, 0), (0.5, 0.5)):
            gx, gy = np.meshgrid((np.arange(-int(ru / px) - 1, int(ru / px) + 2) + ox) * px,
                                 (np.arange(-int(ru / py) - 1, int(ru / py) + 2) + oy) * py)
            grids.append((np.hypot(np.abs(gx) + hx + pj, np.abs(gy) + hy + pj) <= ru, gx, gy))
        ok, gx, gy = max(grids, key=lambda g: int(g[0].sum()))
        if n > ok.sum():
            raise ValueError(f"{n} sections of {p.section_size_um[0]:g} x {p.section_size_um[1]:g} um "
                             f"(spacing {p.spacing_um:g} um, margin {p.resin_margin_um:g} um) do not fit on a "
                             f"{p.diameter_mm:g} mm wafer: at most {int(ok.sum())} fit")
        cx, cy = gx[ok], gy[ok]
        pick = np.lexsort((cx, cy, np.round(np.hypot(cx, cy) / min(px, py), 6)))[:n]
        pick = pick[np.lexsort((cx[pick], cy[pick]))]          # reading order: rows, then columns
        out = []
        for k, i in enumerate(pick):
            w, h = w0 * (1 + rng.uniform(-jit, jit)), h0 * (1 + rng.uniform(-jit, jit))
            ang, c = rot + rng.uniform(-rj, rj), np.array([cx[i], cy[i]]) + rng.uniform(-pj, pj, 2)
            (tissue, resin), R = self._outline(rng, w, h, m), _rot(ang)
            out.append(SectionTruth(k, (float(c[0]), float(c[1])), (w, h), ang,
                                    tissue @ R.T + c, resin @ R.T + c, self.thickness_m))
        return out

    @staticmethod
    def _outline(rng, w: float, h: float, m: float):
        """Tissue: rounded rectangle pushed inwards by a smooth random amount (never
        outside the nominal w x h). Resin: the trimmed block face, a trapezoid."""
        rc, t = 0.15 * min(w, h), np.linspace(0, 2 * math.pi, 65)[:-1]
        ux, uy = np.cos(t), np.sin(t)       # rounded rectangle: the direction's signs pick the corner arc ...
        pts = np.stack([np.sign(ux + 1e-12) * (w / 2 - rc) + rc * ux, np.sign(uy + 1e-12) * (h / 2 - rc) + rc * uy], 1)
        # ... densified along the straight edges so the wobble bends them too
        dense = []
        for a, b in zip(pts, np.roll(pts, -1, 0)):
            n = max(1, int(np.hypot(*(b - a)) / (2 * (w + h) / 160)))
            dense.extend(a + (b - a) * f for f in np.arange(n) / n)
        pts = np.array(dense)
        th = np.arctan2(pts[:, 1], pts[:, 0])
        wobble = sum(rng.normal(0, 1 / k) * np.cos(k * th + rng.uniform(0, 2 * math.pi)) for k in range(2, 9))
        wobble = (wobble - wobble.min()) / max(np.ptp(wobble), 1e-12)       # 0..1
        tissue = pts * (1 - 0.05 * min(w, h) * wobble / np.hypot(pts[:, 0], pts[:, 1]))[:, None]   # inwards only
        taper, hw, hh = rng.uniform(0, 0.5) * m * rng.choice([-1, 1]), w / 2 + m, h / 2 + m
        resin = np.array([[-hw - min(taper, 0), -hh], [hw + min(taper, 0), -hh],
                          [hw - max(taper, 0), hh], [-hw + max(taper, 0), hh]])
        return tissue, resin

    def _make_debris(self, rng):
        R = self.radius_m
        nd = int(80 * (R / 12.7e-3) ** 2)
        r, a = (R - 0.3e-3) * np.sqrt(rng.random(nd)), rng.uniform(0, 2 * math.pi, nd)
        pos = np.stack([r * np.cos(a), r * np.sin(a)], 1)
        far = np.ones(nd, bool)                 # keep sections clean: dust lands beside them
        for x0, y0, x1, y1 in self._bbox + (-50e-6, -50e-6, 50e-6, 50e-6):
            far &= ~((pos[:, 0] > x0) & (pos[:, 0] < x1) & (pos[:, 1] > y0) & (pos[:, 1] < y1))
        self._dust = []                         # irregular bright (charging) or dark specks
        for (x, y) in pos[far]:
            ang, rad = np.sort(rng.uniform(0, 2 * math.pi, 9)), rng.uniform(0.6, 1.2, 9)
            rad *= float(np.clip(rng.lognormal(math.log(4e-6), 0.7), 0.8e-6, 40e-6))
            poly = np.stack([x + rad * np.cos(ang), y + rad * np.sin(ang)], 1)
            self._dust.append((poly, 0.95 if rng.random() < 0.5 else 0.1))
        self._dust_bbox = np.array([[*d[0].min(0), *d[0].max(0)] for d in self._dust]).reshape(-1, 4)
        self._scratches = []
        for _ in range(int(rng.integers(2, 6))):
            p0, d = rng.uniform(-0.7, 0.7, 2) * R, rng.uniform(0, 2 * math.pi)
            p1 = p0 + rng.uniform(1e-3, 8e-3) * np.array([math.cos(d), math.sin(d)])
            self._scratches.append((p0, p1, rng.uniform(0.5e-6, 3e-6), 0.62 if rng.random() < 0.6 else 0.86))

    # ------------------------------------------------------------ focus
    def focus_offset_m(self, x, y):
        """Surface height (m) at stage (x, y): tilt plane plus a gentle bow and saddle."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        tx, ty = self.params.tilt_um_per_mm
        u, v = x / self.radius_m, y / self.radius_m
        z = tx * 1e-3 * x + ty * 1e-3 * y + self._bow * (u * u + v * v) + self._saddle * (u * u - v * v)
        return float(z) if z.ndim == 0 else z

    # ------------------------------------------------------------ milling
    def _field(self, k: int):
        """(inhomogeneity raster, resin mask raster, x0, y0, pitch), fixed per section."""
        if k in self._fields:
            return self._fields[k]
        x0, y0, x1, y1 = self._bbox[k]
        res = max(RASTER_M, max(x1 - x0, y1 - y0) / 1024)
        mask = np.zeros((int((y1 - y0) / res) + 3, int((x1 - x0) / res) + 3), np.uint8)
        poly = (self.sections[k].resin_polygon_m - (x0, y0)) / res
        cv2.fillPoly(mask, [np.round(poly * (1 << _SHIFT)).astype(np.int32)], 1, cv2.LINE_8, _SHIFT)
        rng = np.random.default_rng([self.seed, 23, k])
        z = _smooth_noise(rng, mask.shape, grid=60e-6 / res, sigma=0.7)
        if (sel := mask.astype(bool)).sum() > 1:        # exact mean 1 / s.d. over the section
            z = (z - z[sel].mean()) / max(float(z[sel].std()), 1e-9)
        field = np.maximum(1 + self.params.mill_inhomogeneity * z, 0).astype(np.float32)
        if sum(f[0].size for f in list(self._fields.values())) > 2 ** 25:    # bounded memory; cheap to redo
            self._fields.clear()
        self._fields[k] = out = (field, mask, x0, y0, res)
        return out

    def mill(self, depth_m, region=None) -> None:
        """Remove depth_m (scalar, or one value per section) of material, scaled by each
        section's fixed inhomogeneity field; region (xmin, xmax, ymin, ymax) limits the
        milled sections to those whose centre lies inside it."""
        n = len(self.sections)
        d = np.broadcast_to(np.asarray(depth_m, float), (n,)) if np.ndim(depth_m) == 0 else np.asarray(depth_m, float)
        if d.shape != (n,):
            raise ValueError(f"depth_m must be a scalar or have one value per section ({n}), got shape {d.shape}")
        if np.any(d < 0):
            raise ValueError("mill depth must be >= 0")
        c = np.array([s.center_m for s in self.sections]).reshape(n, 2)
        sel = True if region is None else (
            (c[:, 0] >= region[0]) & (c[:, 0] <= region[1]) & (c[:, 1] >= region[2]) & (c[:, 1] <= region[3]))
        self._milled += np.where(sel, d, 0.0)

    def remaining_map(self, section_id: int):
        """(remaining thickness raster float32, (x0, y0, pitch)); 0 outside the resin."""
        field, mask, x0, y0, res = self._field(section_id)
        rem = np.maximum(self.thickness_m - self._milled[section_id] * field, 0).astype(np.float32)
        return rem * mask, (x0, y0, res)

    def milled_depth_m(self, section_id: int) -> float:
        """Mean depth removed from the section (at most its thickness)."""
        if self._milled[section_id] == 0:
            return 0.0
        field, mask, *_ = self._field(section_id)
        return float(np.minimum(self._milled[section_id] * field[mask > 0], self.thickness_m).mean())

    def remaining_thickness_m(self, xs, ys) -> np.ndarray:
        return self.materials(xs, ys)[1]

    # ------------------------------------------------------------ frames
    @staticmethod
    def _affine(center_m, pixel_size_m: float, shape, rotation_rad: float) -> np.ndarray:
        """2x3 map from frame pixel (j, i, 1) to stage (x, y), the SEM's frame convention."""
        (h, w), c, s, p = shape, math.cos(rotation_rad), math.sin(rotation_rad), float(pixel_size_m)
        t = np.array([[c * p, -s * p, 0.0], [s * p, c * p, 0.0]])
        t[:, 2] = np.asarray(center_m, float) - t[:, :2] @ ((w - 1) / 2, (h - 1) / 2)
        return t

    @staticmethod
    def _grid_affine(xs: np.ndarray, ys: np.ndarray):
        """The affine pixel->stage map if (xs, ys) is a regular 2-D grid, else None (checked on a sparse
        subgrid; the tolerance admits float32 grids far from the wafer centre)."""
        if xs.ndim != 2 or min(xs.shape) < 2:
            return None
        (h, w), x0, y0 = xs.shape, xs[0, 0], ys[0, 0]      # steps from far corners: robust to float32 grids
        t = np.array([[(xs[0, -1] - x0) / (w - 1), (xs[-1, 0] - x0) / (h - 1), x0],
                      [(ys[0, -1] - y0) / (w - 1), (ys[-1, 0] - y0) / (h - 1), y0]])
        ii, jj = (np.append(g.ravel(), n - 1) for g, n in zip(np.mgrid[0:xs.shape[0]:97, 0:xs.shape[1]:97], xs.shape))
        err = np.abs(t @ np.array([jj, ii, np.ones_like(ii)]) - np.array([xs[ii, jj], ys[ii, jj]])).max()
        ok = np.linalg.det(t[:, :2]) != 0 and err <= 1e-3 * np.abs(t[:, :2]).max() + 1.2e-7 * np.abs(t[:, 2]).max()
        return t if ok else None

    def _frame(self, t: np.ndarray, shape, need_thick: bool = True):
        """Rasterise materials into a frame whose pixel (j, i) lies at t @ (j, i, 1).
        Returns material, thickness (or None), per-section hits, whole-frame-on-wafer flag."""
        h, w = int(shape[0]), int(shape[1])
        mat = np.empty((h, w), np.uint8)
        corners = t @ np.array([[0, w - 1, 0, w - 1], [0, 0, h - 1, h - 1], [1, 1, 1, 1]], float)
        full = bool(np.all(np.hypot(*corners) <= self.radius_m))
        mat.fill(SILICON if full else VACUUM)
        if not full:            # exact disk, row by row: |P_i + j d|^2 = R^2 gives the column span
            d, pi = t[:, 0], t[:, 2] + np.arange(h)[:, None] * t[:, 1]
            a, b, c = d @ d, 2 * pi @ d, np.einsum("ij,ij->i", pi, pi) - self.radius_m ** 2
            sq = np.sqrt(np.maximum(b * b - 4 * a * c, 0)) * np.where(b * b - 4 * a * c >= 0, 1, np.nan)
            j0, j1 = np.maximum(np.ceil((-b - sq) / (2 * a)), 0), np.minimum(np.floor((-b + sq) / (2 * a)), w - 1)
            for i in np.flatnonzero(j1 >= j0):           # NaN (row misses the disk) compares False
                mat[i, int(j0[i]):int(j1[i]) + 1] = SILICON
        thick = np.zeros((h, w), np.float32) if need_thick else None
        hits, inv = [], np.linalg.inv(np.vstack([t, [0, 0, 1]]))[:2]
        for k in _boxes_hit(self._bbox, corners.min(1), corners.max(1)):
            sec = self.sections[k]
            rp, tp = (poly @ inv[:, :2].T + inv[:, 2] for poly in (sec.resin_polygon_m, sec.tissue_polygon_m))
            x0, y0, x1, y1 = _pixel_box(rp, 0, 0, w, h)
            if x1 <= x0 or y1 <= y0:
                continue
            thk, low = None, self.thickness_m
            if self._milled[k] > 0:
                field, _, fx0, fy0, res = self._field(k)
                rem = np.maximum(self.thickness_m - self._milled[k] * field, 0).astype(np.float32)
                m = np.array([[t[0, 0], t[0, 1], t[0, 0] * x0 + t[0, 1] * y0 + t[0, 2] - fx0],
                              [t[1, 0], t[1, 1], t[1, 0] * x0 + t[1, 1] * y0 + t[1, 2] - fy0]]) / res
                rc = m @ np.array([[0, x1 - x0, 0, x1 - x0], [0, 0, y1 - y0, y1 - y0], [1, 1, 1, 1]])
                c0, r0 = np.clip(np.floor(rc.min(1)).astype(int) - 1, 0, np.array(rem.shape[::-1]) - 1)
                c1, r1 = np.clip(np.ceil(rc.max(1)).astype(int) + 2, 1, rem.shape[::-1])
                low = float(rem[r0:r1, c0:c1].min())          # thinnest film under this frame
                if need_thick or low < 6 * THIN_FILM_M:         # thicker films hide the silicon fully
                    thk = cv2.warpAffine(rem, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                         borderMode=cv2.BORDER_REPLICATE)
            if low > 0 and _covers(tp, w, h):      # high magnification: the frame is all tissue
                mat.fill(TISSUE)
                if need_thick:
                    thick[:] = self.thickness_m if thk is None else thk
                hits.append((int(k), (0, 0, w, h), None, thk, (0, 0, w, h)))
                continue
            local = np.zeros((y1 - y0, x1 - x0), np.uint8)
            for poly, code in ((rp, RESIN), (tp, TISSUE)):
                v = poly - poly.mean(0)              # cv2 fills both end pixels: pull edges in by 1/2 px
                poly = poly - 0.5 * v / np.maximum(np.hypot(v[:, :1], v[:, 1:]), 1.0)
                pts = np.clip(np.round((poly - (x0, y0)) * (1 << _SHIFT)), -2 ** 30, 2 ** 30)   # int32-safe
                cv2.fillPoly(local, [pts.astype(np.int32)], code, cv2.LINE_8, _SHIFT)
            sel = local > 0
            if not sel.any():
                continue
            if low <= 0:
                local[sel & (thk <= 0)] = SILICON         # milled through: the wafer shows
            mat[y0:y1, x0:x1][sel] = local[sel]
            if need_thick:
                thick[y0:y1, x0:x1][sel] = self.thickness_m if thk is None else thk[sel]
            hits.append((int(k), (x0, y0, x1, y1), local, thk, _pixel_box(tp, x0, y0, x1, y1)))
        return mat, thick, hits, full

    def materials(self, xs_m, ys_m):
        """(material uint8: 0 vacuum, 1 silicon, 2 resin, 3 tissue; remaining thickness m float32)."""
        xs, ys = np.broadcast_arrays(np.asarray(xs_m, float), np.asarray(ys_m, float))
        if (t := self._grid_affine(xs, ys)) is not None:       # a frame-like grid: rasterise
            return self._frame(t, xs.shape)[:2]
        x, y = xs.ravel(), ys.ravel()
        mat = (x * x + y * y <= self.radius_m ** 2).astype(np.uint8)
        thick = np.zeros(x.shape, np.float32)
        for k, (bx0, by0, bx1, by1) in enumerate(self._bbox):
            idx = np.flatnonzero((x >= bx0) & (x <= bx1) & (y >= by0) & (y <= by1))
            if idx.size == 0:
                continue
            (px, py), sec = (x[idx], y[idx]), self.sections[k]
            resin = _inside_polygon(px, py, sec.resin_polygon_m)
            code = np.where(_inside_polygon(px, py, sec.tissue_polygon_m), TISSUE, RESIN)
            rem = np.full(idx.size, self.thickness_m)
            if self._milled[k] > 0:
                field, _, fx0, fy0, res = self._field(k)
                f = ndimage.map_coordinates(field, [(py - fy0) / res, (px - fx0) / res], order=1, mode="nearest")
                rem = np.maximum(self.thickness_m - self._milled[k] * f, 0)
            code = np.where(rem > 0, code, SILICON)
            mat[idx[resin]], thick[idx[resin]] = code[resin], rem[resin]
        return mat.reshape(xs.shape), thick.reshape(xs.shape)

    def section_mask(self, center_m, pixel_size_m: float, shape, rotation_rad: float = 0.0) -> np.ndarray:
        """Label image: 0 = no section, k + 1 = tissue of section k (still present)."""
        t = self._affine(center_m, pixel_size_m, shape, rotation_rad)
        _, _, hits, _ = self._frame(t, shape, need_thick=False)
        out = np.zeros((int(shape[0]), int(shape[1])), np.int32)
        for k, (x0, y0, x1, y1), local, _, _ in hits:
            out[y0:y1, x0:x1][True if local is None else local == TISSUE] = k + 1
        return out

    # ------------------------------------------------------------ signal
    def signal(self, center_m, pixel_size_m: float, shape, rotation_rad: float = 0.0) -> np.ndarray:
        """SE yield (float32 in [0, 1]) seen by the SEM over the frame, before optics."""
        (h, w), p = (int(shape[0]), int(shape[1])), float(pixel_size_m)
        t = self._affine(center_m, p, (h, w), rotation_rad)
        mat, _, hits, full = self._frame(t, (h, w), need_thick=False)
        inv = np.linalg.inv(np.vstack([t, [0, 0, 1]]))[:2]
        cover = [hit for hit in hits if hit[2] is None]
        if cover:                                # all tissue: no background to draw
            k, _, _, thk, _ = cover[0]
            sig = self._tissue(k, t, (0, 0, w, h), p, rotation_rad)
            hits = [(k, (0, 0, w, h), None, thk, None)] if thk is not None else []
        else:                                    # silicon: flat, faint linear illumination gradient
            g, sig = self._grad, np.empty((h, w), np.float32)
            np.add((SILICON_LEVEL + g @ t[:, 2] + (g @ t[:, 1]) * np.arange(h, dtype=np.float32))[:, None],
                   ((g @ t[:, 0]) * np.arange(w, dtype=np.float32))[None, :], out=sig)
            self._draw_scratches(sig, inv, p)
            if not full:
                sig[mat == VACUUM] = 0
        for k, (x0, y0, x1, y1), local, thk, tb in hits:
            roi = sig[y0:y1, x0:x1]
            if tb is not None:
                roi[local == RESIN] = RESIN_LEVEL
                tx0, ty0, tx1, ty1 = tb
                sub = local[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0] == TISSUE
                if sub.size and sub.any():
                    tex = self._tissue(k, t, (tx0, ty0, tx1, ty1), p, rotation_rad)
                    roi[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0][sub] = tex[sub]
            if thk is not None:                  # thin remaining film: the silicon yield shows through
                f = cv2.exp(np.multiply(thk, -1.0 / THIN_FILM_M, dtype=np.float32))
                if local is not None:
                    f *= local >= RESIN
                roi += (SILICON_LEVEL - roi) * f
        self._draw_dust(sig, t, inv, p)
        return np.clip(sig, 0, 1, out=sig)

    def _tissue(self, k: int, t: np.ndarray, box, p: float, rotation_rad: float) -> np.ndarray:
        """Tissue yield over frame pixels box = (x0, y0, x1, y1): the EM specimen at fine
        pixels, a coarse procedural texture at overview pixels, blended in between."""
        x0, y0, x1, y1 = box
        sec = self.sections[k]
        lo, hi = TISSUE_RANGE
        alpha = float(np.clip(math.log(p / 40e-9) / math.log(12.5), 0, 1))
        rot, out = _rot(-sec.angle_rad), None
        if alpha < 1:                            # in place: fine frames can be 6144 x 4608
            lc = rot @ (t @ ((x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, 1) - sec.center_m)
            depth = (k * self.thickness_m if self.serial_depth else 0.0) + self.milled_depth_m(k)
            out = self.specimen.sample(tuple(lc), p, (y1 - y0, x1 - x0), rotation_rad - sec.angle_rad, depth)
            out *= (1 - alpha) * (hi - lo)
            out += (1 - alpha) * lo
        if alpha > 0:
            res = self._coarse_pitch()
            level = max(0, math.ceil(math.log2(p / res / 1.5))) if p / res > 1.5 else 0
            tex, base = self._coarse_tex(level), self._coarse_tex(0)
            sx, sy = res * base.shape[1] / tex.shape[1], res * base.shape[0] / tex.shape[0]
            # frame pixel -> stage -> section-local -> texture pixel (texture centred on the section)
            m = np.hstack([rot @ t[:, :2], (rot @ (t @ (x0, y0, 1) - sec.center_m))[:, None]]) / [[sx], [sy]]
            m[:, 2] += ((tex.shape[1] - 1) / 2, (tex.shape[0] - 1) / 2) + self._tex_shift[k] / (sx, sy)
            coarse = alpha * self._tex_gain[k] * cv2.warpAffine(tex, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                            borderMode=cv2.BORDER_REFLECT)
            out = coarse if out is None else np.add(out, coarse, out=out)
        return out

    def _coarse_pitch(self) -> float:
        return max(COARSE_M, max(self.params.section_size_um) * 1e-6 * (1 + self.params.size_jitter) / 1500)

    def _coarse_tex(self, level: int) -> np.ndarray:
        """Micrometre-scale tissue look (somata, nuclei, vessels, fibre streaks), shared by all
        sections (serial sections of one block); level l is area-downscaled by 2^l."""
        if (tex := self._coarse.get(level)) is not None:
            return tex
        if level > 0:
            b, f = self._coarse_tex(0), 2 ** level
            tex = cv2.resize(b, (max(2, b.shape[1] // f), max(2, b.shape[0] // f)), interpolation=cv2.INTER_AREA)
        else:
            (w0, h0), (lo, hi), res = self.params.section_size_um, TISSUE_RANGE, self._coarse_pitch()
            grow = 1e-6 * (1 + self.params.size_jitter)
            shape = (int((h0 * grow + 80e-6) / res), int((w0 * grow + 80e-6) / res))    # room for the shifts
            tex = lo + (hi - lo) * self.specimen.overview_texture(shape, res, RESIN_LEVEL)
        self._coarse[level] = tex
        return tex

    def _draw_scratches(self, sig: np.ndarray, inv: np.ndarray, p: float) -> None:
        h, w = sig.shape
        for p0, p1, width, value in self._scratches:
            wpx = width / p
            if wpx < 0.25:                      # narrower than a quarter pixel: invisible
                continue
            m = int(wpx) + 2
            a, b = (np.clip(inv[:, :2] @ q + inv[:, 2], -2 ** 30, 2 ** 30) for q in (p0, p1))
            ok, a, b = cv2.clipLine((-m, -m, w + 2 * m, h + 2 * m), (int(a[0]), int(a[1])), (int(b[0]), int(b[1])))
            if ok:
                cv2.line(sig, a, b, value, max(1, min(int(round(wpx)), 32000)), cv2.LINE_8)

    def _draw_dust(self, sig: np.ndarray, t: np.ndarray, inv: np.ndarray, p: float) -> None:
        h, w = sig.shape
        corners = t @ np.array([[0, w - 1, 0, w - 1], [0, 0, h - 1, h - 1], [1, 1, 1, 1]], float)
        for i in _boxes_hit(self._dust_bbox, corners.min(1), corners.max(1)):
            poly, value = self._dust[i]
            if (self._dust_bbox[i, 2] - self._dust_bbox[i, 0]) / p < 0.3:      # sub-pixel speck: invisible
                continue
            pts = np.round((poly @ inv[:, :2].T + inv[:, 2]) * (1 << _SHIFT))
            cv2.fillPoly(sig, [np.clip(pts, -2 ** 30, 2 ** 30).astype(np.int32)], value, cv2.LINE_8, _SHIFT)

