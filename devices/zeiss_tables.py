"""SmartSEM facts as data: store resolutions, scan rates, return codes, and the
arithmetic that turns work into timeouts (scan time, stage travel time).

Sources: SBEMimage ``src/default_cfg/device_presets.cfg`` (ZEISS Merlin and
GeminiSEM presets: ``sem_store_res``, ``sem_dwell_time``, ``sem_cycle_time``,
``stage_sem_motor_speed``) and the ZeissErrorCode enumeration declared by
several independent wrappers of the EM API. Kept apart from the driver so the
fake (devices/sim/smartsem_api.py) and the driver share one table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

# ZeissErrorCode: 0 = success, these otherwise.
API_ERRORS = dict(enumerate((
    "GET_TRANSLATE_FAIL GET_AP_FAIL GET_DP_FAIL GET_BAD_PARAMETER SET_TRANSLATE_FAIL "
    "SET_STATE_FAIL SET_FLOAT_FAIL SET_FLOAT_LIMIT_LOW SET_FLOAT_LIMIT_HIGH SET_BAD_VALUE "
    "SET_BAD_PARAMETER EXEC_TRANSLATE_FAIL EXEC_CMD_FAIL EXEC_MCF_FAIL EXEC_MCL_FAIL "
    "EXEC_BAD_COMMAND GRAB_FAIL").split(), start=1000)) | {1019: "NOT_INITIALISED",
                                                           1022: "GET_LIMITS_FAIL"}
CODE = {name: code for code, name in API_ERRORS.items()}

# Scan rate n -> pixel dwell (s): 0.05 µs × 2**n, n = 0..8 (Merlin, GeminiSEM, Ultra, Sigma).
DEFAULT_DWELL_TABLE = {n: 50e-9 * 2 ** n for n in range(9)}

# Store resolution (w, h) -> DP_IMAGE_STORE index, in SmartSEM's own order: the
# Merlin / GeminiSEM list (a Sigma stops at index 3, an Ultra Plus at 7).
MERLIN_STORES = ((1024, 768), (512, 384), (2048, 1536), (3072, 2304), (4096, 3072),
                 (5120, 3840), (6144, 4608), (8192, 6144), (12288, 9216), (16384, 12288),
                 (24576, 18432), (32768, 24576))
DEFAULT_STORE_TABLE = {wh: i for i, wh in enumerate(MERLIN_STORES)}

# Line flyback: the Merlin cycle times above exceed w*h*dwell by about 0.05 to
# 0.1 ms per line (e.g. 1024x768 at 0.8 µs: 0.71 s measured, 0.63 s of dwell).
DEFAULT_LINE_FLYBACK_S = 1e-4

# Stage speeds for travel-time bounds (SI: m/s, rad/s). SBEMimage's Merlin
# preset gives 100 µm/s for x and y; z, tilt and rotation are slower guesses
# kept on the safe (long) side. A setup sets its own in options.stage_speed.
DEFAULT_STAGE_SPEED = {"x": 100e-6, "y": 100e-6, "z": 50e-6,
                       "r": math.radians(5.0), "t": math.radians(2.0)}

# DP_RUNUPSTATE labels SBEMimage relies on; anything else is on its way.
RUNUP_ON, RUNUP_OFF = "Beam On", "EHT Off"


def parse_store_table(table) -> dict[tuple[int, int], int]:
    """A store table from options: a list of [w, h] in SmartSEM's index order,
    or a mapping "WxH" -> index. ValueError naming the entry otherwise."""
    if isinstance(table, Mapping):
        out = {}
        for key, idx in table.items():
            try:
                w, h = (int(v) for v in str(key).lower().split("x"))
            except ValueError:
                raise ValueError(f"store_table key {key!r}: allowed 'WIDTHxHEIGHT'") from None
            out[(w, h)] = int(idx)
    else:
        try:
            out = {(int(w), int(h)): i for i, (w, h) in enumerate(table)}
        except (TypeError, ValueError):
            raise ValueError(f"store_table {table!r}: allowed a list of [width, height]") from None
    for (w, h), i in out.items():
        if w <= 0 or h <= 0 or i < 0:
            raise ValueError(f"store_table entry {w}x{h} -> {i}: sizes and index must be positive")
    if not out:
        raise ValueError("store_table is empty")
    return out


def parse_dwell_table(table) -> dict[int, float]:
    """A dwell table from options: a list of dwell times in seconds, scan rate 0
    first, or a mapping rate -> seconds."""
    items = table.items() if isinstance(table, Mapping) else enumerate(table)
    try:
        out = {int(k): float(v) for k, v in items}
    except (TypeError, ValueError):
        raise ValueError(f"dwell_table {table!r}: allowed a list of seconds per scan rate") from None
    if not out or any(not (math.isfinite(v) and v > 0) for v in out.values()):
        raise ValueError(f"dwell_table {table!r}: every dwell must be > 0 s")
    return out


def snap_store(width: int, height: int, stores) -> tuple[int, int]:
    """The smallest store (by pixel count) that contains width x height."""
    fits = [s for s in stores if s[0] >= width and s[1] >= height]
    if not fits:
        raise ValueError(f"{width}x{height} is larger than every store "
                         f"({', '.join(f'{w}x{h}' for w, h in stores)})")
    return min(fits, key=lambda s: (s[0] * s[1], s))


def centre_crop(store: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """(x0, y0) of a size-sized window centred in a store-sized frame."""
    return (store[0] - size[0]) // 2, (store[1] - size[1]) // 2


def scan_time_s(width: int, height: int, dwell_s: float,
                line_flyback_s: float = DEFAULT_LINE_FLYBACK_S) -> float:
    """One frame: every pixel's dwell plus a flyback per line."""
    return width * height * dwell_s + height * line_flyback_s


@dataclass(frozen=True)
class TimeoutPolicy:
    """Bounds derived from the work: work × factor + margin. ``margin_s`` covers
    COM round trips and SmartSEM's own latency (the setup's timeout_s)."""
    factor: float = 1.5
    margin_s: float = 5.0
    line_flyback_s: float = DEFAULT_LINE_FLYBACK_S
    autofocus_s: float = 120.0      # SmartSEM's autofocus/autostig: its own bound
    eht_runup_s: float = 180.0

    def grab(self, width: int, height: int, dwell_s: float) -> float:
        # the frame being scanned may have to finish before ours starts: two frames
        return 2.0 * scan_time_s(width, height, dwell_s, self.line_flyback_s) * self.factor \
            + self.margin_s

    def move(self, start: Mapping[str, float], target: Mapping[str, float],
             speed: Mapping[str, float], settle_s: float) -> float:
        """Axes move together; the slowest one bounds the move."""
        travel = 0.0
        for axis, v in target.items():
            d = abs(v - start.get(axis, v))
            if axis == "r":          # the stage may not take the short way round: up to a turn
                d = min(d, 2 * math.pi)
            travel = max(travel, d / speed[axis])
        return travel * self.factor + settle_s + self.margin_s


def stores_from_options(options: Mapping) -> dict[tuple[int, int], int]:
    """The store table a setup's ``devices.sem.options`` gives the driver (for
    plan checks: a frame fits when ``snap_store`` finds a store for it)."""
    table = options.get("store_table")
    return DEFAULT_STORE_TABLE if table is None else parse_store_table(table)
