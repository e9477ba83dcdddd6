"""Damage a finished run's output the way a disk or a person would."""
from __future__ import annotations

from pathlib import Path

from acq.writers import read_manifest


def damage(out: Path) -> tuple[str, str, str]:
    """Flip a byte of a tile (same size), grow a zarr chunk, delete a tile
    spec: (tile, chunk, spec) relative paths. Shared with test_writers.py."""
    entries = read_manifest(out)
    tile = next(e["path"] for e in entries if e["kind"] == "tile")
    chunk = next(e["path"] for e in entries if e["kind"] == "zarr")
    spec = next(e["path"] for e in entries if e["kind"] == "tilespec")
    with open(out / tile, "r+b") as f:
        f.seek(-100, 2)
        b = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    with open(out / chunk, "ab") as f:
        f.write(b"x")
    (out / spec).unlink()
    return tile, chunk, spec
