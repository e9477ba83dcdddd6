"""Reproduce the shipped models/deepfocus_128.pt: the stages it was trained in
on this project's 2-core CPU (no GPU was available), each starting from the
previous stage's export. Stage A from scratch over the seed's aberration
ranges, B continues it at a lower rate, C shifts the aberration mixture
(probability, wd half-range µm, stig half-range) towards focus, where the loop
spends its last iterations and where B's model still had a -1 µm wd bias. D, E and F
put 40 % of the samples beyond the seed's range (±32 µm, ±6.5): C's model
corrected only ~12 µm of a 30 µm defocus and needed 5 iterations from the
seed's large start (30 µm, -6, 6). A-F work at 10 nm pixels; G fine-tunes F
at 20 nm on 10 nm frames averaged 2x2 as the predictor does at inference
(four patches per 512² pair instead of sixteen). Textures: the first 24 ISBI
2012 images (the rest are held out for the unseen-texture benchmark).

    .venv/bin/python scripts/train_deepfocus_128.py --shared ../shared --out /tmp/df --em-textures T \
        [--stages A ... L O P T U V]

After the last stage the output gain is fitted (autofocus/gain.py: 800 fresh
pairs from the training distribution; the stigmation gains come out 1.1-1.3;
a referenced model's wd gain on the columns DeepFocusMethod feeds it as, ~1).
H-L, O, P, T, U and V are described beside their entries in STAGES.

Steps are the ones the shipped stages ran (their time limits cut A and B
short; G ran 3000 steps in 20 min); thread scheduling makes a rerun close
to, not bit-identical with, the shipped weights.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


from autofocus.data import training_textures
from autofocus.gain import fit_output_gain, write_gain
from autofocus.inference import load_card
from common.atomic import atomic_write
from autofocus.train import train

NEAR_FOCUS = ((0.2, 20.0, 5.0), (0.1, 20.0, 0.5), (0.45, 3.0, 0.75), (0.25, 1.5, 0.3))
WIDE = ((0.15, 20.0, 5.0), (0.05, 20.0, 0.5), (0.25, 3.0, 0.75), (0.15, 1.5, 0.3), (0.4, 32.0, 6.5))
AT_20NM = {"pixel_nm": 20.0, "acquire_pixel_nm": 10.0}
# O onwards: columns fed as DeepFocusMethod feeds them, targets referenced to 8 mrad (see O)
FED = {"easy_tail": 0.1, "mixture": WIDE, "microscopes": "columns", "alpha_ref_mrad": 8.0,
       "target_clip": (160.0, 40.0), "column_feed": 0.7, **AT_20NM}
STAGES = {
    "A": dict(steps=1206, seed=2, lr=1e-3, data={"easy_samples": 1600, "easy_tail": 0.2}, pool_refresh=3),
    "B": dict(steps=350, seed=5, lr=4e-4, data={"easy_tail": 0.1}, pool_refresh=4),
    "C": dict(steps=6000, seed=7, lr=2e-4, data={"easy_tail": 0.1, "mixture": NEAR_FOCUS}, pool_refresh=4),
    "D": dict(steps=2500, seed=13, lr=4e-4, data={"easy_tail": 0.1, "mixture": WIDE}, pool_refresh=4),
    "E": dict(steps=2500, seed=17, lr=2e-4, data={"easy_tail": 0.1, "mixture": WIDE}, pool_refresh=4),
    "F": dict(steps=2500, seed=19, lr=1e-4, data={"easy_tail": 0.1, "mixture": WIDE}, pool_refresh=4),
    # G: the same network at 20 nm pixels, fed 10 nm frames resampled as at inference
    "G": dict(steps=3000, seed=23, lr=4e-4, data={"easy_tail": 0.1, "mixture": WIDE, **AT_20NM}, pool_refresh=4),
    # H: domain-randomised columns (issue 15): probe half-angle 2-25 mrad, sigma0, detector response,
    # SE contrast, scan noise (autofocus.data.column_microscope)
    "H": dict(steps=800, seed=29, lr=3e-4, data={"easy_tail": 0.1, "mixture": WIDE, "microscopes": "columns",
                                                  **AT_20NM}, pool_refresh=6),
    # I: H continued with the real-EM textures of scripts/em_textures.py (--em-textures) besides ISBI
    "I": dict(steps=6000, seed=31, lr=3e-4, data={"easy_tail": 0.1, "mixture": WIDE, "microscopes": "columns",
                                                  **AT_20NM}, pool_refresh=4, em_textures=True),
    # J: I continued with the learning rate restarted (I's schedule had decayed it tenfold)
    "J": dict(steps=4500, seed=37, lr=2e-4, data={"easy_tail": 0.1, "mixture": WIDE, "microscopes": "columns",
                                                  **AT_20NM}, pool_refresh=4, em_textures=True),
    # K: J continued on targets referenced to an 8 mrad column, −aberration × (α/8 mrad)²
    # (autofocus.data.referenced_target): what one pair determines whatever the column. Stopped by
    # hand at 900 steps: its clip at 60 µm cut a 22 mrad column's reading off at 8 µm of defocus
    "K": dict(steps=900, seed=41, lr=3e-4, data={"easy_tail": 0.1, "mixture": WIDE, "microscopes": "columns",
                                                 "alpha_ref_mrad": 8.0, "target_clip": (60.0, 15.0), **AT_20NM},
              pool_refresh=4, em_textures=True),
    # L: K continued with the clip at 160 referenced µm (20 µm of defocus at 22 mrad)
    "L": dict(steps=6000, seed=43, lr=2.5e-4, data={"easy_tail": 0.1, "mixture": WIDE, "microscopes": "columns",
                                                    "alpha_ref_mrad": 8.0, "target_clip": (160.0, 40.0),
                                                    **AT_20NM}, pool_refresh=4, em_textures=True),
    # O: L continued with 70 % of the pairs fed as DeepFocusMethod feeds a column whose α the
    # setup states (autofocus.data.DataConfig.column_feed: resampled to where the column looks
    # like the 8 mrad reference, the statement up to 25 % off, 768- or 1536-px frames), so the
    # model learns the pixel sizes and apparent columns it is used at. (M, more pairs near focus,
    # and N, a box half as wide again, were tried from L and not kept: README)
    "O": dict(steps=8000, seed=53, lr=2e-4, data=FED, pool_refresh=4, em_textures=True),
    # P: O continued on the same data at a lower rate (its schedule had decayed the rate tenfold):
    # single-pair linearity 6/7/19/27 % at 3/8/15/22 mrad instead of 16/14/26/36 %
    "P": dict(steps=8000, seed=59, lr=1.5e-4, data=FED, pool_refresh=4, em_textures=True),
    # T: P as a column-conditioned network (autofocus.models.ColumnDeepFocusNet, its column maps
    # zero-initialised from P's weights), told the stated column (the statement that picked the
    # feed pixel, up to 25 % off) on 75 % of the pairs and nothing on the rest; P's convolutions
    # kept (every continuation of P at a restarted rate, R, S and the whole network here, read
    # 8 and 15 mrad lower than P), only the fully connected layers and the column maps learn.
    # Linearity 9/5/16/15 % at 3/8/15/22 mrad (P: 6/7/17/26), 12 of 12 benchmark cells (P: 11);
    # 9000 steps at lr 1e-4 read 7/4/16/18 % and met 11
    "T": dict(steps=12000, seed=61, lr=2e-4, variant="deepfocus-column-128", head_only=True,
              data={**FED, "column_known": 0.75}, pool_refresh=4, em_textures=True),
    # U: T continued with its last two convolution blocks (the 1x1 mixes of the two frames' features)
    # learning beside the head, batch-norm statistics kept, on T's data at a quarter of its rate
    "U": dict(steps=7000, seed=67, lr=5e-5, variant="deepfocus-column-128", head_only=True, conv_layers=2,
              data={**FED, "column_known": 0.75}, pool_refresh=4, em_textures=True),
    # V: U with a third column input, the feed pixel over the card's (autofocus.models.column_input; its
    # maps zero-initialised), trained as U at twice U's rate. (The loop now feeds no coarser than 1.5x
    # the card's pixel, autofocus.column_scale.MAX_FEED_COARSENING; V trained with that cap as well
    # read 15 and 22 mrad 19 and 18 % off, and is not the shipped V)
    "V": dict(steps=7000, seed=73, lr=1e-4, variant="deepfocus-column-128", head_only=True, conv_layers=2,
              data={**FED, "column_known": 0.75}, pool_refresh=4, em_textures=True),
}
GAIN_SAMPLES = 800          # the wd gain of a referenced model is fitted on about a third of them
EM_TEXTURE_COPIES = 4       # each package image listed 4x: ~40 % of texture draws against ISBI's 24 slices


def em_training_textures(folder: Path | None) -> list[Path]:
    """The package textures with role "training" in SOURCES.json (the held-out one never)."""
    if folder is None:
        raise SystemExit("stage I needs --em-textures (run scripts/em_textures.py first)")
    sources = json.loads((folder / "SOURCES.json").read_text())
    return [folder / s["file"] for s in sources if s["role"] == "training"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, required=True, help="folder holding data/em/isbi2012")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=None, help="time limit per stage")
    ap.add_argument("--device", default=None, help="default: CUDA when present, else the CPU")
    ap.add_argument("--em-textures", type=Path, default=None,
                    help="folder written by scripts/em_textures.py (stage I and later; its held-out file is not used)")
    args = ap.parse_args()
    tex = training_textures(args.shared)
    args.out.mkdir(parents=True, exist_ok=True)
    prev = None
    for name in args.stages:
        st = STAGES[name]
        out = args.out / f"deepfocus_128_stage{name}.pt"
        prev_stage = list(STAGES)[list(STAGES).index(name) - 1] if name != "A" else None
        init = prev or (args.out / f"deepfocus_128_stage{prev_stage}.pt" if prev_stage else None)
        stage_tex = tex + (em_training_textures(args.em_textures) * EM_TEXTURE_COPIES if st.get("em_textures") else [])
        train(st.get("variant", "deepfocus-128"), st["steps"], out, seed=st["seed"], textures=stage_tex, batch=16, log_every=100,
              lr=st["lr"], val_samples=64, dropout=0.0, threads=args.threads, init=init, data=st["data"],
              pool_size=1024, pool_refresh=st["pool_refresh"], max_minutes=args.max_minutes, device=args.device,
              freeze_all_but_fc=st.get("head_only", False), trainable_conv_layers=st.get("conv_layers", 0))
        prev = out
    final = args.out / "deepfocus_128.pt"
    shutil.copy(prev, final)
    shutil.copy(prev.with_suffix(".json"), final.with_suffix(".json"))
    write_gain(final, fit_output_gain(final, tex, samples=GAIN_SAMPLES))
    write_lineage(final, args.out, args.stages, args.em_textures)
    return 0


def write_lineage(final: Path, folder: Path, stages: list[str], em_folder: Path | None) -> None:
    """The card keeps every stage since A (carried over from the card the
    first stage run here started from) and the texture sources."""
    card = load_card(final)
    first = list(STAGES).index(stages[0])
    start = folder / f"deepfocus_128_stage{list(STAGES)[first - 1]}.json" if first else None
    lineage = json.loads(start.read_text()).get("lineage", []) if start and start.is_file() else []
    for name in stages:
        c = json.loads((folder / f"deepfocus_128_stage{name}.json").read_text())
        st, log = STAGES[name], c.get("log") or [{}]
        lineage.append({"stage": name, "init": f"stage {list(STAGES)[list(STAGES).index(name) - 1]}"
                        if name != "A" else None, "steps": log[-1].get("step"), "seed": st["seed"], "lr": st["lr"],
                        "microscopes": st["data"].get("microscopes", "train"),
                        "column_feed": st["data"].get("column_feed", 0.0),
                        "pixel_size_nm": st["data"].get("pixel_nm", 10.0),
                        "em_textures": bool(st.get("em_textures")), "train_s": round(log[-1].get("elapsed_s", 0)),
                        "validation_mae_wd_um": round(c["validation"]["mae_wd_um"], 3),
                        "validation_mae_stig": round(c["validation"]["mae_stig"], 3)}
                       | ({"variant": st["variant"], "head_only": st.get("head_only", False),
                           "conv_layers_trained": st.get("conv_layers", 0),
                           "column_known": st["data"].get("column_known", 0.0)} if "variant" in st else {}))
    card["lineage"] = lineage
    card["init"] = lineage[-1]["init"]          # the stage, not the folder it was trained in
    # the last stage's own card keeps the lineage too, for a later run that continues from it
    last = folder / f"deepfocus_128_stage{stages[-1]}.json"
    atomic_write(last, json.dumps(json.loads(last.read_text()) | {"lineage": lineage}, indent=1).encode(),
                 overwrite=True)
    if em_folder is not None:
        sources = json.loads((em_folder / "SOURCES.json").read_text())
        card["texture_sources"] = {
            "isbi2012": "ssTEM, Drosophila L1 ventral nerve cord (Cardona et al. 2010; ISBI 2012 challenge): "
                        "the first 24 slices; the last 6 are held out",
            "procedural": "devices/sim/specimen.py neuropil, seeds 1-3 (seed 0 held out)",
            "packages": [{k: v for k, v in src.items() if k != "file"} | {"file": Path(src["file"]).name}
                         for src in sources],
            "made_by": "scripts/em_textures.py (package wheels read once before training; role held_out never "
                       "trained on)"}
    card["recipe"] = ("python scripts/em_textures.py --out T; python scripts/train_deepfocus_128.py --shared "
                      "../shared --out DIR --em-textures T --stages " + " ".join(STAGES))
    atomic_write(final.with_suffix(".json"), json.dumps(card, indent=1).encode(), overwrite=True)


if __name__ == "__main__":
    sys.exit(main())
