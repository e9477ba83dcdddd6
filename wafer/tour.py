"""Order sections (or grids) to minimise stage travel.

An OPEN path: it starts at the current stage position and ends at the last
section, with no way back. Internally node 0 is the start and node i+1 is
``points[i]``; every returned ``order`` holds indices into ``points``.

Solvers
  fast      numpy local search: nearest neighbour, then 2-opt and Or-opt over
            neighbour lists with vectorised gains and a don't-look queue, then
            iterated local search (local double-bridge kicks) until the kick or
            time budget is spent.
  sa        the method of the reference work: python-tsp simulated annealing,
            alpha=0.9, 2-opt perturbations, distance back to start set to 0.
  nn        nearest neighbour only (reference / lower bar).
  fast_tsp  the optional C++ ``fast-tsp`` package, if importable.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

SOLVERS = ("fast", "sa", "nn", "fast_tsp")
_EPS = 1e-7  # µm; gains below this are float noise, not improvements
_EXACT_MAX_N = 6  # enumerate all orders up to this size (720 permutations)


@dataclass
class TourResult:
    order: list[int]
    length_um: float
    seconds: float
    solver: str


def _points(points_um) -> np.ndarray:
    P = np.asarray(points_um, dtype=float)
    if P.size == 0:
        return P.reshape(0, 2)
    if P.ndim != 2 or P.shape[1] != 2:
        raise ValueError(f"points_um: expected shape (n, 2), got {P.shape}")
    if not np.isfinite(P).all():
        raise ValueError("points_um: contains NaN or inf")
    return P


def _start(start_um) -> np.ndarray:
    s = np.asarray(start_um, dtype=float).reshape(-1)
    if s.shape != (2,) or not np.isfinite(s).all():
        raise ValueError(f"start_um: expected finite (x, y), got {start_um!r}")
    return s


def path_length(points_um, order: Sequence[int], start_um=(0.0, 0.0)) -> float:
    """Length of the open path start -> points[order[0]] -> ... (no return leg)."""
    P, s = _points(points_um), _start(start_um)
    if len(order) == 0:
        return 0.0
    seq = np.vstack([s, P[np.asarray(order, dtype=int)]])
    return float(np.hypot(*np.diff(seq, axis=0).T).sum())


def nearest_neighbour_order(P: np.ndarray, start: np.ndarray) -> list[int]:
    n = len(P)
    free = np.ones(n, dtype=bool)
    cur = start
    order: list[int] = []
    for _ in range(n):
        d = np.hypot(P[:, 0] - cur[0], P[:, 1] - cur[1])
        d[~free] = np.inf
        j = int(np.argmin(d))
        order.append(j)
        free[j] = False
        cur = P[j]
    return order


def _dist_matrix(X: np.ndarray) -> np.ndarray:
    return np.hypot(X[:, None, 0] - X[None, :, 0], X[:, None, 1] - X[None, :, 1])


def _exact_order(P: np.ndarray, start: np.ndarray) -> list[int]:
    perms = np.array(list(itertools.permutations(range(len(P)))), dtype=int)
    D = _dist_matrix(np.vstack([start, P]))
    full = np.hstack([np.zeros((len(perms), 1), dtype=int), perms + 1])
    lengths = D[full[:, :-1], full[:, 1:]].sum(axis=1)
    return [int(i) for i in perms[int(np.argmin(lengths))]]


def _neighbour_lists(X: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Indices of the k nearest other nodes of every node, by blocks of rows so
    memory stays O(chunk * n) (numpy only: importing scipy.spatial alone can cost
    more than a whole small solve)."""
    m = len(X)
    out = np.empty((m, k), dtype=int)
    for lo in range(0, m, chunk):
        hi = min(lo + chunk, m)
        d = np.hypot(X[lo:hi, None, 0] - X[None, :, 0], X[lo:hi, None, 1] - X[None, :, 1])
        d[np.arange(hi - lo), np.arange(lo, hi)] = np.inf
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        rows = np.take_along_axis(d, part, axis=1)
        out[lo:hi] = np.take_along_axis(part, np.argsort(rows, axis=1), axis=1)
    return out


class _OpenPathSearch:
    """2-opt + Or-opt on an open path with fixed start, using neighbour lists.

    Positions 0..n+1 hold nodes; position 0 is the start (node 0), position n+1
    is a virtual end node E at zero distance from everything. With E the open
    path becomes a closed tour whose moves never touch E or the start, so the
    usual symmetric move algebra applies unchanged. Edge k joins positions k and
    k+1 (k = 0..n); edge n (into E) has length 0.

    Candidate moves only create edges to one of the K nearest neighbours of a
    node involved (plus moves at the free end), so pricing the queued nodes
    costs a few vector operations on short arrays, not a scan of the path.
    """

    def __init__(self, X: np.ndarray, order: Sequence[int], k_neigh: int = 10):
        self.n = len(X) - 1
        self.E = self.n + 1
        # Nodes as complex numbers, E appended as NaN: |z_u - z_v| is NaN for E
        # and np.fmax(NaN, 0) = 0 zeroes every distance to E without branches.
        self.z = np.append(X[:, 0] + 1j * X[:, 1], complex(np.nan, np.nan))
        N = _neighbour_lists(X, min(k_neigh, self.n))
        self.N = np.vstack([N, np.zeros((1, N.shape[1]), dtype=int)])  # row for E
        # Segments (start offset, length) priced around each queued position i.
        self._seg_start = np.array([0, 0, -1, 0, -2])
        self._seg_len = np.array([1, 2, 2, 3, 3])
        self._seg_end = self._seg_start + self._seg_len - 1
        self.set_tour(np.concatenate([[0], np.asarray(order, dtype=int) + 1, [self.E]]))

    def set_tour(self, t: np.ndarray) -> None:
        self.t = t
        L = np.abs(np.diff(self.z[t]))
        L[-1] = 0.0  # edge into E
        self.L = L
        self.pos = np.empty(self.n + 2, dtype=int)
        self.pos[t] = np.arange(self.n + 2)
        self.length = float(L.sum())

    def order(self) -> list[int]:
        return [int(v) - 1 for v in self.t[1:-1]]

    def _dd(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Element-wise distances between nodes u and v; anything involving E is 0."""
        return np.fmax(np.abs(self.z[u] - self.z[v]), 0.0)

    # --- moves ------------------------------------------------------------------
    # All queued nodes are priced together in one vector batch per move type:
    # numpy call overhead, not arithmetic, is what costs at these sizes. Every
    # candidate carries the closed position interval [lo, hi] it rewrites; its
    # end positions keep their nodes, so moves with disjoint interiors commute.
    def _two_opt(self, I: np.ndarray):
        """2-opt removing edge k in {i-1, i} and edge j: new edges (t_k, t_j),
        (t_k+1, t_j+1), positions between reversed. j is chosen so that one new
        edge goes to a near neighbour; j = n (reverse the whole tail) always."""
        n, t, pos, N = self.n, self.t, self.pos, self.N
        K0, own0 = np.concatenate((I - 1, I)), np.concatenate((t[I], t[I]))
        keep = K0 >= 0
        K0, own0 = K0[keep], own0[keep]
        # N[E] points at the start, whose j = pos - 1 = -1 is filtered below.
        J = np.concatenate((pos[N[t[K0]]], pos[N[t[K0 + 1]]] - 1, np.full((len(K0), 1), n)), axis=1)
        cols = J.shape[1]
        K, own, J = K0.repeat(cols), own0.repeat(cols), J.ravel()
        ok = (J >= 0) & (np.abs(J - K) > 1)
        K, own, J = K[ok], own[ok], J[ok]
        m = len(K)
        d = self._dd(t[np.concatenate((K, K + 1))], t[np.concatenate((J, J + 1))])
        delta = d[:m] + d[m:] - self.L[K] - self.L[J]
        lo, hi = np.minimum(J, K) + 1, np.maximum(J, K)
        return delta, own, lo - 1, hi + 1, (lo, hi)

    def _or_opt(self, I: np.ndarray):
        """Move a segment of 1-3 nodes starting or ending at a queued node, maybe
        reversed, into an edge (c, d) next to a near neighbour of a segment end,
        right after the start, or to the free end."""
        n, t, pos, N = self.n, self.t, self.pos, self.N
        I = I[I >= 1]
        S0 = (I[:, None] + self._seg_start[None, :]).ravel()
        B0 = (I[:, None] + self._seg_end[None, :]).ravel()
        own0 = t[I].repeat(len(self._seg_len))
        v = (S0 >= 1) & (B0 <= n) & (B0 - S0 + 1 < n)
        S0, B0, own0 = S0[v], B0[v], own0[v]
        r = len(S0)
        near = np.concatenate((pos[N[t[S0]]], pos[N[t[B0]]]), axis=1)
        J = np.concatenate((near, near - 1, np.zeros((r, 1), dtype=int), np.full((r, 1), n)), axis=1)
        gain0 = self.L[S0 - 1] + self.L[B0] - self._dd(t[S0 - 1], t[B0 + 1])
        cols = J.shape[1]
        S, B, own, gain, J = S0.repeat(cols), B0.repeat(cols), own0.repeat(cols), gain0.repeat(cols), J.ravel()
        ok = (J >= 0) & ((J < S - 1) | (J > B))
        S, B, own, gain, J = S[ok], B[ok], own[ok], gain[ok], J[ok]
        m = len(S)
        sa, sb, c, d = t[S], t[B], t[J], t[J + 1]
        dd = self._dd(np.concatenate((c, sb, c, sa)), np.concatenate((sa, d, sb, d)))
        fwd = dd[:m] + dd[m:2 * m]  # ... c, a..b, d ...
        rev = dd[2 * m:3 * m] + dd[3 * m:]  # ... c, b..a, d ...
        delta = np.minimum(fwd, rev) - self.L[J] - gain
        after = J > B
        return delta, own, np.where(after, S - 1, J), np.where(after, J + 1, B + 1), (S, B, J, rev < fwd)

    def _round(self, nodes: np.ndarray) -> tuple[set, list[int]]:
        """Price all moves around ``nodes``; apply the best improving moves that
        do not overlap. Returns (nodes that still had an improving move, nodes
        whose edges changed)."""
        I = self.pos[nodes]
        d2, own2, lo2, hi2, (a2, b2) = self._two_opt(I)
        d3, own3, lo3, hi3, (s3, e3, j3, r3) = self._or_opt(I)
        delta = np.concatenate((d2, d3))
        idx = np.flatnonzero(delta < -_EPS)
        if idx.size == 0:
            return set(), []
        idx = idx[np.argsort(delta[idx], kind="stable")][:256]  # the rest: re-priced next round
        owners = set(np.concatenate((own2, own3))[idx].tolist())
        LO, HI = np.concatenate((lo2, lo3))[idx].tolist(), np.concatenate((hi2, hi3))[idx].tolist()
        chosen: list[tuple[int, int, int]] = []  # (lo, hi, candidate), kept disjoint
        for c, lo, hi in zip(idx.tolist(), LO, HI):
            if all(hi <= clo or chi <= lo for clo, chi, _ in chosen):
                chosen.append((lo, hi, c))
                if len(chosen) >= 64:  # enough for one round; the rest are re-priced next round
                    break
        t0, t = self.t, self.t.copy()
        touched: list[int] = []
        n2 = len(d2)
        for lo, hi, c in chosen:
            if c < n2:
                a, b = int(a2[c]), int(b2[c])
                t[a:b + 1] = t0[a:b + 1][::-1]
                touched += [t0[a - 1], t0[a], t0[b], t0[b + 1]]
            else:
                c -= n2
                s, e, j = int(s3[c]), int(e3[c]), int(j3[c])
                seg = t0[s:e + 1][::-1] if r3[c] else t0[s:e + 1]
                if j > e:
                    t[s:j + 1] = np.concatenate((t0[e + 1:j + 1], seg))
                else:
                    t[j + 1:e + 1] = np.concatenate((seg, t0[j + 1:s]))
                touched += [t0[s - 1], t0[s], t0[e], t0[e + 1], t0[j], t0[j + 1]]
        self.set_tour(t)
        return owners, [int(v) for v in touched if v != self.E]

    def local_search(self, nodes: Sequence[int], deadline: float) -> None:
        """Don't-look-bit style: a node leaves the queue once no improving move
        around it is found; nodes next to changed edges re-enter."""
        queue = set(int(v) for v in nodes)
        while queue and time.perf_counter() <= deadline:
            owners, touched = self._round(np.fromiter(queue, dtype=int, count=len(queue)))
            queue = owners | set(touched)

    def double_bridge(self, rng: random.Random) -> list[int]:
        """A B C D -> A C B D, cutting just before three nodes that are spatial
        neighbours: the new edges are then short-ish, so the kick perturbs one
        neighbourhood and the following local search has few dirty nodes."""
        n, t = self.n, self.t
        v = rng.randint(1, n)
        pool = np.concatenate([[v], self.N[v]])
        pool = pool[pool != 0]  # the start never moves
        if len(pool) < 3:
            return []
        p1, p2, p3 = sorted(int(self.pos[x]) for x in rng.sample(pool.tolist(), 3))
        touched = [t[p1 - 1], t[p1], t[p2 - 1], t[p2], t[p3 - 1], t[p3]]
        b, c = t[p1:p2], t[p2:p3]
        flip = rng.random()  # now and then reversing B or C widens what kicks can reach
        if flip < 0.1:
            b = b[::-1]
        elif flip < 0.2:
            c = c[::-1]
        self.set_tour(np.concatenate([t[:p1], c, b, t[p3:]]))
        return [int(x) for x in touched if x != self.E]


def default_fast_budget_s(n: int) -> float:
    """Time cap of the "fast" solver: 1.8 s at 500 sections (the 2 s target with
    margin for I/O), growing linearly to 6 s at 1900+. The kick count (max(200, 4 n))
    ends the search first only when the process has a core to itself (500
    sections: about 1.9 s of CPU time measured on a busy 2-core machine)."""
    return min(6.0, 0.3 + 0.003 * n)


def _solve_fast(P: np.ndarray, start: np.ndarray, seed: int, time_limit_s: float | None,
                max_kicks: int | None = None, max_stall: int | None = None) -> list[int]:
    n = len(P)
    if n <= _EXACT_MAX_N:
        return _exact_order(P, start)
    t0 = time.perf_counter()
    # Budget: enough kicks to settle on random wafers (see benchmarks/tour.py), capped in time.
    budget = time_limit_s if time_limit_s is not None else default_fast_budget_s(n)
    deadline = t0 + budget
    kicks = max_kicks if max_kicks is not None else max(200, 4 * n)
    X = np.vstack([start, P])
    ls = _OpenPathSearch(X, nearest_neighbour_order(P, start))
    ls.local_search(range(n + 1), deadline)
    rng = random.Random(seed)  # scalar draws: far cheaper than numpy's per call
    best_t, best_len = ls.t.copy(), ls.length
    stall, max_stall = 0, max_stall or max(100, n)  # easy layouts end early
    for _ in range(kicks):
        if time.perf_counter() > deadline or stall > max_stall:
            break
        dirty = ls.double_bridge(rng)
        ls.local_search(dirty, deadline)
        stall = 0 if ls.length < best_len - _EPS else stall + 1
        if ls.length <= best_len + 1e-9:
            best_t, best_len = ls.t.copy(), ls.length
        else:
            ls.set_tour(best_t.copy())
    ls.set_tour(best_t)
    return ls.order()


class _BestTracker(np.ndarray):
    """Distance matrix that remembers the shortest full permutation evaluated.

    python-tsp's annealer returns its final state, not the best one it saw; it
    evaluates every candidate as ``D[perm, perm_shifted].sum()``, so recording the
    best indexing call recovers the best visited state without patching it."""

    def __new__(cls, D: np.ndarray):
        obj = np.asarray(D).view(cls)
        obj.best_value = math.inf
        obj.best_perm = None
        return obj

    def __array_finalize__(self, obj):
        self.best_value = getattr(obj, "best_value", math.inf)
        self.best_perm = getattr(obj, "best_perm", None)

    def __getitem__(self, key):
        base = self.view(np.ndarray)
        out = base[key]
        if (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], list)
                and len(key[0]) == base.shape[0]):
            val = float(np.asarray(out).sum())
            if val < self.best_value:
                self.best_value, self.best_perm = val, list(key[0])
        return out


def _perm_to_order(perm: Sequence[int]) -> list[int]:
    """Closed tour over nodes 0..n (0 = start) -> open order of point indices."""
    perm = [int(v) for v in perm]
    k = perm.index(0)
    return [v - 1 for v in perm[k + 1:] + perm[:k]]


def _solve_sa(P: np.ndarray, start: np.ndarray, seed: int, time_limit_s: float | None) -> list[int]:
    from python_tsp.heuristics import solve_tsp_simulated_annealing

    D = _dist_matrix(np.vstack([start, P]))
    D[:, 0] = 0.0  # as in the reference: the return leg to the start is free
    nn = nearest_neighbour_order(P, start)
    x0 = [0] + [i + 1 for i in nn]  # python-tsp keeps x0[0] in place: it must be the start
    tracker = _BestTracker(D)
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)  # python-tsp draws from both global generators
    np.random.seed(seed % 2**32)
    try:
        perm, _ = solve_tsp_simulated_annealing(
            tracker, x0=x0, perturbation_scheme="two_opt", alpha=0.9,
            max_processing_time=time_limit_s)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    candidates = [nn, _perm_to_order(perm)]
    if tracker.best_perm is not None:
        candidates.append(_perm_to_order(tracker.best_perm))
    return min(candidates, key=lambda o: path_length(P, o, start))


def _solve_fast_tsp(P: np.ndarray, start: np.ndarray, time_limit_s: float | None) -> list[int]:
    import fast_tsp  # optional dependency

    n = len(P)
    D = _dist_matrix(np.vstack([start, P]))
    # fast-tsp solves closed, symmetric tours with integer distances <= 65535. A
    # dummy node at distance 0 from the start and M from every point turns
    # "closed tour through the dummy" into "open path from the start + M". M above
    # the largest pairwise distance suffices: a tour putting the dummy between two
    # points pays 2M and can gain at most one diameter by rearranging.
    M = float(D.max()) + 1.0
    scale = 65000.0 / M          # about 0.5 µm resolution on a 25 mm wafer
    Dx = np.zeros((n + 2, n + 2))
    Dx[:n + 1, :n + 1] = D
    Dx[n + 1, 1:n + 1] = Dx[1:n + 1, n + 1] = M
    Di = np.rint(Dx * scale).astype(np.int64)
    budget = time_limit_s if time_limit_s is not None else min(1.5, 0.3 + 0.001 * n)
    tour = [int(v) for v in fast_tsp.find_tour(Di.tolist(), float(budget), stop_when_converged=True)]
    k = tour.index(0)
    body = [v for v in tour[k + 1:] + tour[:k] if v != n + 1]
    orders = [[v - 1 for v in body], [v - 1 for v in reversed(body)]]
    return min(orders, key=lambda o: path_length(P, o, start))


def fast_tsp_available() -> bool:
    try:
        import fast_tsp  # noqa: F401
    except ImportError:
        return False
    return True


def default_solver() -> str:
    """fast-tsp (C++ local search) when installed — it reaches the best known
    length in well under a second at 500 sections — else the numpy solver."""
    return "fast_tsp" if fast_tsp_available() else "fast"


def order_sections(points_um, start_um=(0.0, 0.0), solver: str | None = None, seed: int = 0,
                   time_limit_s: float | None = None) -> TourResult:
    """Order points as an open path from ``start_um``; see the module docstring.

    ``time_limit_s`` caps the search ("fast": default ``default_fast_budget_s(n)``;
    "sa": no cap unless given; "fast_tsp": min(1.5, 0.3 + n/1000) s, stopping
    earlier once converged). Results are reproducible for a fixed ``seed`` unless
    the time cap is what stopped the search."""
    solver = solver or default_solver()
    P, s = _points(points_um), _start(start_um)
    if solver not in SOLVERS:
        raise ValueError(f"solver: unknown {solver!r}, choose from {', '.join(SOLVERS)}")
    if time_limit_s is not None and not time_limit_s > 0:
        raise ValueError(f"time_limit_s: must be > 0, got {time_limit_s!r}")
    t0 = time.perf_counter()
    n = len(P)
    if n <= 1:
        order = list(range(n))
    elif solver == "nn":
        order = nearest_neighbour_order(P, s)
    elif solver == "fast":
        order = _solve_fast(P, s, seed, time_limit_s)
    elif solver == "sa":
        order = _solve_sa(P, s, seed, time_limit_s)
    else:
        if not fast_tsp_available():
            raise RuntimeError("solver 'fast_tsp' needs the optional package fast-tsp (pip install fast-tsp)")
        order = _solve_fast_tsp(P, s, time_limit_s)
    seconds = time.perf_counter() - t0
    if sorted(order) != list(range(n)):  # cheap guard: every point exactly once
        raise RuntimeError(f"solver {solver!r} returned an invalid order")
    return TourResult(order=order, length_um=path_length(P, order, s), seconds=seconds, solver=solver)


def serpentine_order(rows: int, cols: int, *, by_rows: bool = True) -> list[int]:
    """Boustrophedon order of a rows x cols tile grid as row-major tile indices
    (r * cols + c): row 0 left to right, row 1 right to left, ... (or the same
    column-wise with ``by_rows=False``). Neighbouring tiles stay adjacent, so
    the stage never jumps back across the grid."""
    if rows < 0 or cols < 0:
        raise ValueError(f"rows/cols: must be >= 0, got {rows}x{cols}")
    lanes = np.arange(rows * cols).reshape(rows, cols)
    lanes = (lanes if by_rows else lanes.T).copy()
    lanes[1::2] = lanes[1::2, ::-1].copy()
    return [int(v) for v in lanes.ravel()]
