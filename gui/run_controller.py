"""Owns the acquisition engine for the GUI: builds it for a plan (new run or
resume from a folder's journal), connects its documents through the
DocBridge, drives start/pause/resume/stop through the engine's API only, and
mirrors progress into the wafer layout's tile states."""
from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Optional

from PyQt5.QtCore import QObject, pyqtSignal

from acq.documents import IncidentCause
from acq.events import AcquireTile
from acq.runner import Pause, RunState
from gui.doc_bridge import DocBridge
from gui.run_progress import RunProgress
from gui.wafer_model import ACQUIRED, ACQUIRING, FAILED, PLANNED, REACQUIRED, GridSpec

log = logging.getLogger(__name__)


class RunController(QObject):
    state_changed = pyqtSignal(str, str)       # engine state, reason
    step_changed = pyqtSignal(str)
    progress_changed = pyqtSignal()
    plan_changed = pyqtSignal(object)
    error = pyqtSignal(str)

    def __init__(self, session, layout, parent=None):
        super().__init__(parent)
        self.session, self.layout = session, layout
        self.bridge = DocBridge(self)
        self.plan = None
        self.plan_data: Optional[dict] = None
        self.engine = None
        self.progress: Optional[RunProgress] = None
        self.out_dir: Optional[Path] = None
        self.state, self.reason, self.step = RunState.IDLE, "", ""
        self.pause_info: Optional[Pause] = None     # why the run is paused, structured
        self._grid_cols: dict = {}
        self.bridge.paused.connect(self._on_pause)
        self.bridge.state_changed.connect(self._on_state)
        self.bridge.tile.connect(self._on_tile)
        self.bridge.incident.connect(self._on_incident)
        self.bridge.step.connect(self._set_step)
        self.bridge.run_stopped.connect(self._on_stop)
        self.bridge.acquiring.connect(self.mark_acquiring)

    # ------------------------------------------------------------ plan
    def set_plan(self, plan, data: Optional[dict] = None) -> None:
        self.plan, self.plan_data = plan, data
        self.plan_changed.emit(plan)

    def load_plan(self, path) -> bool:
        from gui.plan_builder import load_plan_file
        try:
            plan = load_plan_file(path, self.session.config_path)
        except Exception as e:
            self.error.emit(str(e))
            return False
        self.set_plan(plan, None)
        return True

    @property
    def running(self) -> bool:
        return self.engine is not None and self.state in (RunState.RUNNING, RunState.PAUSED, RunState.STOPPING)

    # ------------------------------------------------------------ control
    def start(self, out_dir, resume: bool = False, writers: bool = True, accept_change=(),
              max_exposures: int | None = None) -> bool:
        """New run into ``out_dir`` (or continue the run there, allowing the parts named
        in ``accept_change`` to differ, with ``max_exposures`` per tile and cycle). False,
        with the reason on ``error``, when the engine refuses the plan or folder."""
        setup = self.session.setup
        if setup is None or self.plan is None or self.running:
            self.error.emit("open a setup and choose a plan first" if not self.running else "a run is active")
            return False
        out_dir = Path(out_dir)
        try:
            from acq.engine import Engine
            from acq.notify import make_notifier
            notifier = make_notifier(setup.config)      # before the engine takes the folder: may refuse
            engine = Engine(setup, self.plan, out_dir, resume=resume, accept_change=accept_change,
                            max_exposures=max_exposures)
            if writers:
                from acq.plan import writer_options
                from acq.writers import make_writers
                for w in make_writers(out_dir, writer_options(self.plan)):
                    engine.add_writer(w)
        except Exception as e:
            self.error.emit(f"cannot start: {e}")
            return False
        self.bridge.attach(engine)
        if notifier is not None:
            notifier.attach(engine)                 # its thread ends after the run's last message
        engine.on_step(lambda ev: self.bridge.step.emit(ev.describe()) or self._acquiring(ev))
        done_before = engine.journal.read().tiles_done_total if resume else 0
        self.progress = RunProgress.for_plan(self.plan, engine.sections, done_before)
        self._show_plan_on_map(engine.sections, reset=not resume)
        self._save_plan(out_dir)
        self.engine, self.out_dir = engine, out_dir
        self.session.set_run_active(True)
        # A full collection over the heap at start-up (Qt, torch, scipy: ~10⁶
        # objects) holds the GIL for 0.1–0.3 s whichever thread triggers it and
        # freezes the GUI mid-run. Collect once now, then move what exists to
        # the permanent generation so the run's collections only scan new objects.
        gc.collect()
        gc.freeze()
        engine.start()
        return True

    def pause(self) -> None:
        if self.engine is not None:
            self.engine.pause()
            self._set_step("pausing at the next safe point …")

    def resume(self) -> None:
        if self.engine is not None:
            self.engine.resume()

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.abort()
            self._set_step("stopping at the next safe point …")

    def stop_now(self, why: str = "quit") -> None:
        """Stop as a signal does: a mill or irradiation under way blanks its
        beam within a second and the run ends resumable."""
        if self.engine is not None:
            self.engine.stop_now(why)
            self._set_step("stopping now, beams blanked …")

    # ------------------------------------------------------------ documents
    def _acquiring(self, ev) -> None:
        if isinstance(ev, AcquireTile) and not ev.overview:
            self.bridge.acquiring.emit(ev.section, ev.grid, ev.row, ev.col)

    def _on_pause(self, pause: Pause) -> None:
        self.pause_info = pause

    def _on_state(self, state: str, reason: str) -> None:
        self.state, self.reason = RunState(state), reason
        if self.state is not RunState.PAUSED:
            self.pause_info = None
        if self.state in (RunState.RUNNING, RunState.STOPPING):
            self.session.set_run_active(True)
        elif self.state is RunState.PAUSED:
            self.session.set_run_active(False)     # the operator may fix settings while paused
        self.state_changed.emit(state, reason)

    def _set_step(self, text: str) -> None:
        self.step = text
        self.step_changed.emit(text)

    def _index(self, section: int, grid: int, row: int, col: int):
        spec = self.layout.grids.get((section, grid))
        if spec is None:
            return None
        return row * spec.cols + col

    def mark_acquiring(self, section, grid, row, col) -> None:
        lay = self.layout
        if lay.current_tile is not None:
            key, i = lay.current_tile
            arr = lay.tile_state.get(key)
            if arr is not None and i < len(arr) and arr[i] == ACQUIRING:
                lay.set_tile_state(key, i, PLANNED)
        i = self._index(section, grid, row, col)
        if i is not None and lay.set_tile_state((section, grid), i, ACQUIRING):
            lay.current_tile = ((section, grid), i)
            lay.changed.emit("tiles")

    def _on_tile(self, doc) -> None:
        if self.progress is not None:
            first_of_cycle = doc.cycle != self.progress.cycle and not doc.overview
            if first_of_cycle:
                for key, arr in self.layout.tile_state.items():       # a new cycle: the surface is new
                    arr[:] = PLANNED
                    self.layout.tile_rev[key] = self.layout.tile_rev.get(key, 0) + 1
            self.progress.on_tile(doc)
        i = self._index(doc.section_id, doc.grid_id, doc.row, doc.col)
        if i is not None:
            ok = bool(doc.qc.get("ok", True)) if isinstance(doc.qc, dict) else True
            state = FAILED if not ok else REACQUIRED if doc.version > 0 else ACQUIRED
            self.layout.set_tile_state((doc.section_id, doc.grid_id), i, state)
            self.layout.current_tile = None
            self.layout.changed.emit("tiles")
        self.progress_changed.emit()

    def _on_incident(self, inc) -> None:
        tid = (inc.context or {}).get("tile_id")
        if inc.cause is not IncidentCause.QC_FAILED or not tid:
            return
        try:
            sec, grid, row, col = tile_index_from_id(tid)
        except (ValueError, IndexError):
            return
        i = self._index(sec, grid, row, col)
        if i is not None:
            self.layout.set_tile_state((sec, grid), i, FAILED)
            self.layout.changed.emit("tiles")

    def _on_stop(self, doc) -> None:
        self.session.set_run_active(False)
        self._set_step(f"run ended: {doc.exit_status}" + (f" – {doc.reason}" if doc.reason else ""))

    def finished(self) -> bool:
        return self.engine is not None and self.engine.result is not None

    # ------------------------------------------------------------ map
    def _show_plan_on_map(self, sections, reset: bool) -> None:
        """The plan's grids on the map (a loaded plan may not come from this
        layout); sections the layout lacks are drawn as the grids' outline."""
        lay = self.layout
        lay.editable = True
        for sec in sections:
            for g in sec.grids:
                spec = GridSpec.from_plan(sec.id, g)
                old = lay.grids.get(spec.key)
                if old != spec:
                    lay.put_grid(spec.key, spec)
            if sec.id not in lay.sections:
                lay.put_section(sec.id, sec.geometry)
        lay.order[:] = [s.id for s in sections] + [i for i in lay.order if i not in {s.id for s in sections}]
        if reset:
            lay.reset_tile_states()
        for what in ("sections", "grids", "order", "tiles"):
            lay.touch(what)

    def _save_plan(self, out_dir: Path) -> None:
        try:
            import yaml

            from acq.plan import dump_plan
            out_dir.mkdir(parents=True, exist_ok=True)
            target = out_dir / "gui_plan.yaml"
            if not target.exists():
                target.write_text(yaml.safe_dump(dump_plan(self.plan), sort_keys=False))
        except Exception as e:                     # the run does not depend on this copy
            log.warning("could not save the plan next to the data: %s", e)


def tile_index_from_id(tile_id: str) -> tuple[int, int, int, int]:
    """(section, grid, row, col) from a tile id c0000_s0001_g00_r000_c001."""
    p = tile_id.split("_")
    return int(p[1][1:]), int(p[2][1:]), int(p[3][1:]), int(p[4][1:])

