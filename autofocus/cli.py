"""`python main.py autofocus bench|collect|recalibrate` (mounted by main.py)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import typer

from common.paths import default_config
from common.paths import models_dir as shipped_models_dir
from devices.errors import DeviceError
from devices.setup_config import ConfigError, load_setup

app = typer.Typer(add_completion=False, help="Autofocus: convergence benchmark, training pairs from a microscope, "
                  "DeepFocus recalibration.")
DEFAULT_CONFIG = default_config()


def _config(path: Path, simulated: bool = True):
    try:
        cfg = load_setup(path)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    if simulated and cfg.devices.sem.driver != "sim":
        typer.echo("error: the benchmark scores against the simulator's hidden focus; use a sim setup", err=True)
        raise typer.Exit(2)
    return cfg


def _metres(at_mm: Optional[Tuple[float, float]]) -> Optional[tuple[float, float]]:
    return None if at_mm is None else (at_mm[0] * 1e-3, at_mm[1] * 1e-3)


def _specimens(specimen: Optional[List[Path]]) -> list[Path]:
    for p in specimen or []:
        if not p.is_file():
            typer.echo(f"error: --specimen {p}: file does not exist", err=True)
            raise typer.Exit(2)
    return list(specimen or [])


@app.command()
def bench(
    method: Optional[List[str]] = typer.Option(None, "--method", help="repeatable: mapfost, deepfocus, a "
                                               "DeepFocus variant, sharpness-nm, deepscore-nm, sem-builtin"),
    specimen: Optional[List[Path]] = typer.Option(None, "--specimen", help="grayscale image(s); default procedural"),
    locations: int = typer.Option(9, "--locations", min=1, max=100),
    iterations: int = typer.Option(5, "--iterations", min=1, max=50, help="pair-method iterations (seed: 10)"),
    nm_iterations: int = typer.Option(30, "--nm-iterations", min=1, max=500, help="Nelder–Mead iterations"),
    dwell_ns: float = typer.Option(50.0, "--dwell-ns", min=10, max=100000),
    frame: Tuple[int, int] = typer.Option((1024, 768), "--frame", help="W H (seed: 2048 1536)"),
    pixel_nm: float = typer.Option(10.0, "--pixel-nm", min=0.5, max=1000),
    initial: str = typer.Option("seed", "--initial", help="seed: wd ±U(8,12) µm, stig U(-4,-2), U(2,4); "
                                "large: (30 µm, -6, 6)"),
    seed: int = typer.Option(0, "--seed"),
    stop: bool = typer.Option(True, "--stop/--no-stop", help="stop at the threshold (0.2 µm, 0.05) or run "
                              "every iteration as in the seed's traces"),
    mapfost_calibration: str = typer.Option("induced", "--mapfost-calibration",
                                            help="induced (fit on known aberrations) or microscope"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of the convergence traces"),
    models_dir: Path = typer.Option(shipped_models_dir(), "--models-dir",
                                    help="where the DeepFocus/DeepScore models and cards are"),
    config: Path = typer.Option(DEFAULT_CONFIG, "--config"),
    at: Optional[Tuple[float, float]] = typer.Option(None, "--at", help="connected microscope: X Y stage mm "
                                                     "of the locations' centre (default: where the stage is)"),
) -> None:
    """Convergence of autofocus methods from identical starting states: on the
    simulator scored against its hidden focus; on a connected microscope
    (start it focused) by the convergence of the corrections, the final
    sharpness against your focus and the dose."""
    from autofocus.bench import BenchSettings, run_bench

    if initial not in ("seed", "large"):
        raise typer.BadParameter("seed or large", param_hint="--initial")
    if mapfost_calibration not in ("induced", "microscope"):
        raise typer.BadParameter("induced or microscope", param_hint="--mapfost-calibration")
    if not all(64 <= v <= 8192 for v in frame):
        raise typer.BadParameter("two values in 64..8192", param_hint="--frame")
    cfg = _config(config, simulated=False)
    st = BenchSettings(methods=tuple(method or ("mapfost", "deepfocus")), locations=locations,
                       iterations=iterations, nm_iterations=nm_iterations, dwell_s=dwell_ns * 1e-9,
                       frame=(frame[0], frame[1]), pixel_m=pixel_nm * 1e-9, initial=initial, seed=seed,
                       stop_at_threshold=stop, mapfost_calibration=mapfost_calibration,
                       specimen=tuple(_specimens(specimen)), models_dir=models_dir,
                       column_alpha_mrad=cfg.calibration.probe_half_angle_mrad)
    if cfg.devices.sem.driver != "sim":
        # a connected microscope: no hidden truth; convergence, sharpness against the operator's focus, dose
        if plot is not None or mapfost_calibration != "induced":
            typer.echo("error: --plot and --mapfost-calibration microscope need the simulator's hidden focus "
                       "and parameters; on a microscope leave them out", err=True)
            raise typer.Exit(2)
        from autofocus.bench_connected import run_connected_bench
        from autofocus.collect import move_xy
        from devices.factory import build_setup
        with build_setup(cfg) as setup:
            if at is not None:
                move_xy(setup.stage, at[0] * 1e-3, at[1] * 1e-3)
            out = run_connected_bench(setup, st, json_out=json_out, progress=typer.echo)
    else:
        out = run_bench(cfg, st, json_out=json_out, plot_out=plot, progress=typer.echo)
    if not out["methods"]:
        typer.echo("no method could run", err=True)
        raise typer.Exit(1)
    if json_out:
        typer.echo(f"wrote {json_out}")
    if plot:
        typer.echo(f"wrote {plot}")


@app.command()
def recalibrate(
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", help="a simulated setup: setup B's benchmark "
                                "(before/after against the hidden truth); a connected microscope: collect "
                                "pairs on it (--collect-dir) and fine-tune on them"),
    data: Optional[Path] = typer.Option(None, "--data", help="fine-tune on pairs already collected with "
                                        "`autofocus collect` (no microscope needed)"),
    collect_dir: Optional[Path] = typer.Option(None, "--collect-dir", help="where the collected pairs go "
                                               "(default: next to --out); an interrupted run resumes"),
    at: Optional[Tuple[float, float]] = typer.Option(None, "--at", help="connected microscope: X Y stage mm "
                                                     "to collect around (default: where the stage is)"),
    locations: int = typer.Option(10, "--locations", min=1, max=100, help="training locations"),
    aberrations: int = typer.Option(10, "--aberrations", min=1, max=100, help="known aberrations per location"),
    steps: int = typer.Option(2000, "--steps", min=1, help="fine-tuning steps (seed: 50 000)"),
    out: Path = typer.Option(Path("models/deepfocus_recal.pt"), "--out"),
    base_model: str = typer.Option("deepfocus", "--model", help="shipped DeepFocus variant to recalibrate"),
    test_locations: int = typer.Option(5, "--test-locations", min=1, max=100,
                                       help="simulated setups: locations of the before/after traces"),
    iterations: int = typer.Option(5, "--iterations", min=1, max=50, help="simulated setups: trace iterations"),
    dwell_ns: float = typer.Option(100.0, "--dwell-ns", min=10, max=100000,
                                   help="simulated setups: dwell of the traces (pairs: 100 and 200 ns)"),
    frame: Tuple[int, int] = typer.Option((1024, 768), "--frame"),
    seed: int = typer.Option(0, "--seed"),
    json_out: Optional[Path] = typer.Option(None, "--json"),
    models_dir: Path = typer.Option(shipped_models_dir(), "--models-dir"),
) -> None:
    """Recalibrate DeepFocus for a microscope: DeepScore (or sharpness) +
    Nelder–Mead finds the focus at each location, known aberrations around it
    are the training pairs (as `autofocus collect`). The shipped model keeps
    its network and learns this column's probe half-angle and stigmator axes
    (a column-specific model has its last three FC layers fine-tuned). On a
    simulated setup the column is setup B's and the convergence before and
    after is scored against the hidden focus."""
    from autofocus.collect import DatasetError
    from autofocus.recalibrate import RecalSettings, recalibrate_on_data, run_recalibration

    if out.exists():
        typer.echo(f"error: {out} exists; refusing to overwrite", err=True)
        raise typer.Exit(2)
    try:
        if data is not None:
            report = recalibrate_on_data(data, out, base_model=base_model, steps=steps, seed=seed,
                                         models_dir=models_dir, progress=typer.echo, json_out=json_out)
        else:
            st = RecalSettings(locations=locations, aberrations_per_location=aberrations, steps=steps, out=out,
                               data=collect_dir, base_model=base_model, test_locations=test_locations,
                               iterations=iterations, dwell_s=dwell_ns * 1e-9, frame=(frame[0], frame[1]),
                               seed=seed, models_dir=models_dir)
            report = run_recalibration(_config(config, simulated=False), st, progress=typer.echo,
                                       json_out=json_out, at_m=_metres(at))
    except (DatasetError, DeviceError, ValueError, FileNotFoundError, FileExistsError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(report["summary"])


@app.command()
def collect(
    out: Path = typer.Option(..., "--out", help="dataset folder: new, or one to resume with the same settings"),
    config: Path = typer.Option(DEFAULT_CONFIG, "--config"),
    locations: int = typer.Option(9, "--locations", min=1, max=400, help="M locations on a grid around "
                                  "the stage position"),
    spacing_um: float = typer.Option(60.0, "--spacing-um", min=1, max=10000, help="grid pitch"),
    aberrations: int = typer.Option(10, "--aberrations", min=1, max=200, help="K known aberrations per location"),
    baseline: str = typer.Option("operator", "--baseline", help="operator (the focus as you left it), mapfost "
                                 "(calibrated around your focus), sharpness-nm or deepscore-nm"),
    dwell_ns: Optional[List[float]] = typer.Option(None, "--dwell-ns", help="repeatable; default 100 and 200"),
    frame: Tuple[int, int] = typer.Option((1024, 768), "--frame", help="W H"),
    pixel_nm: float = typer.Option(10.0, "--pixel-nm", min=0.5, max=1000),
    wd_range_um: float = typer.Option(20.0, "--wd-range-um", min=0.5, max=100),
    stig_range: float = typer.Option(5.0, "--stig-range", min=0.05, max=50),
    seed: int = typer.Option(0, "--seed"),
    at: Optional[Tuple[float, float]] = typer.Option(None, "--at", help="X Y stage mm to collect around "
                                                     "(default: where the stage is)"),
    models_dir: Path = typer.Option(shipped_models_dir(), "--models-dir", help="where DeepScore is (deepscore-nm)"),
) -> None:
    """DeepFocus training pairs from the connected microscope (any SEM driver):
    a focus baseline at each location, then known aberrations around it and a
    ±5 µm pair at each, with target and metadata. Resumes an interrupted run."""
    from autofocus.collect import CollectSettings, Collector, DatasetError
    from devices.factory import build_setup

    cfg = _config(config, simulated=False)
    st = CollectSettings(locations=locations, spacing_um=spacing_um, aberrations=aberrations, baseline=baseline,
                         dwell_ns=tuple(dwell_ns or (100.0, 200.0)), frame=(frame[0], frame[1]), pixel_nm=pixel_nm,
                         wd_range_um=wd_range_um, stig_range=stig_range, seed=seed)
    try:
        st.check()
        with build_setup(cfg) as setup:
            Collector(setup.sem, setup.stage, setup.guard, out, st, progress=typer.echo, models_dir=models_dir,
                      at=_metres(at)).run()
    except (DatasetError, DeviceError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
