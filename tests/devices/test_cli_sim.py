"""`python main.py sim frame` from the outside, as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_sim_frame_writes_tiff_with_parameters_and_same_seed_same_place(tmp_path, isbi_images):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    common = ["sim", "frame", "--specimen", str(isbi_images[0]), "--stig", "0.5", "-0.5", "--dwell-ns", "400",
              "--pixel-nm", "4", "--size", "256", "192", "--seed", "7"]
    r = _run(*common, "--defocus-um", "0", "--out", str(a))
    assert r.returncode == 0, r.stderr
    r = _run(*common, "--defocus-um", "8", "--out", str(b))
    assert r.returncode == 0, r.stderr
    with tifffile.TiffFile(a) as t:
        img_a = t.asarray()
        md = json.loads(t.pages[0].description)
        xres = t.pages[0].tags["XResolution"].value
    assert img_a.shape == (192, 256) and img_a.dtype == np.uint8
    assert md["defocus_um"] == 0 and md["stig"] == [0.5, -0.5] and md["dwell_ns"] == 400
    assert abs(xres[0] / xres[1] - 1e-2 / 4e-9) / (1e-2 / 4e-9) < 1e-3      # pixels per cm
    img_b = tifffile.imread(b)
    # same place, blurrier
    assert np.corrcoef(img_a.ravel(), img_b.ravel())[0, 1] > 0.5
    assert np.var(np.diff(img_b.astype(float), axis=1)) < np.var(np.diff(img_a.astype(float), axis=1))


def test_sim_frame_refuses_to_overwrite_and_bad_values(tmp_path):
    out = tmp_path / "x.tif"
    out.write_bytes(b"keep")
    r = _run("sim", "frame", "--out", str(out), "--size", "64", "64")
    assert r.returncode != 0 and "refusing to overwrite" in r.stderr
    assert out.read_bytes() == b"keep"
    r = _run("sim", "frame", "--out", str(tmp_path / "y.tif"), "--dwell-ns", "1")
    assert r.returncode != 0 and "--dwell-ns" in r.stderr
    assert not (tmp_path / "y.tif").exists()
