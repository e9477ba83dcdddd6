"""Train models/deepscore_512.pt: DeepScore (seed layer table, one 512² image
-> |Δwd| µm and the stigmation magnitude) from scratch on the first 24 ISBI
2012 textures, each sample from a random "broad" microscope (aperture, probe
size, stigmator axes and gains, scan rotation) so the score does not belong
to one setup. None is shipped yet: on this project's 2-core CPU the wd error
was still 4.5 µm after 700 steps (20 min); the seed trained for 10^6 steps on
GPUs. Recalibration and `deepscore-nm` use any finished deepscore*.pt in
models/, so train elsewhere and copy it there only once it ranks sharpness
well (tests/test_deepfocus_models.py has the check, skipped until then).

    .venv/bin/python scripts/train_deepscore_512.py --shared ../shared --out /tmp/ds --device cuda --max-minutes 600

Rendering a 512² sample costs about a CPU training step, so batches come from
a replay pool (fresh augmentation on every draw, `refresh` new renders per
batch), as for DeepFocus.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from autofocus.data import training_textures
from autofocus.train import train

RECIPE = dict(steps=4000, seed=3, lr=1e-3, batch=8, dropout=0.0, pool_size=512, pool_refresh=2, val_samples=48)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, required=True, help="folder holding data/em/isbi2012")
    ap.add_argument("--out", type=Path, required=True, help="folder for deepscore_512.pt and its card")
    ap.add_argument("--max-minutes", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None, help="default: CUDA when present, else the CPU")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train("deepscore-512", out=args.out / "deepscore_512.pt", textures=training_textures(args.shared),
          log_every=100, threads=args.threads, max_minutes=args.max_minutes, device=args.device,
          **RECIPE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
