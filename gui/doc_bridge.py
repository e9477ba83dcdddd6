"""The engine's document stream and state changes as Qt signals.

The engine calls subscribers in its dispatcher thread and state callbacks in
its own thread; this QObject lives in the GUI thread, so emitting from those
threads queues the signal onto the GUI event loop (no shared state, no
polling, no string commands). Tile images are large: the bridge forwards
every tile document, and the live view repaints at most at its own rate."""
from __future__ import annotations

from PyQt5.QtCore import QObject, pyqtSignal

from acq.documents import CycleDone, DocumentRouter, Incident, RunStart, RunStop, SectionDone, TileEvent


class DocBridge(QObject, DocumentRouter):
    document = pyqtSignal(object)          # every document, in order
    run_started = pyqtSignal(object)       # RunStart
    tile = pyqtSignal(object)              # TileEvent
    incident = pyqtSignal(object)          # Incident
    section_done = pyqtSignal(object)      # SectionDone
    cycle_done = pyqtSignal(object)        # CycleDone
    run_stopped = pyqtSignal(object)       # RunStop
    state_changed = pyqtSignal(str, str)   # engine state, reason
    paused = pyqtSignal(object)            # acq.runner.Pause: why, structured (never parsed from text)
    step = pyqtSignal(str)                 # what the engine is doing now
    acquiring = pyqtSignal(int, int, int, int)   # section, grid, row, col of the tile being acquired

    def __call__(self, doc) -> None:
        """Engine subscriber (called in the dispatcher's thread)."""
        self.document.emit(doc)
        DocumentRouter.__call__(self, doc)

    def on_start(self, doc: RunStart) -> None:
        self.run_started.emit(doc)

    def on_tile(self, doc: TileEvent) -> None:
        self.tile.emit(doc)

    def on_incident(self, doc: Incident) -> None:
        self.incident.emit(doc)

    def on_section_done(self, doc: SectionDone) -> None:
        self.section_done.emit(doc)

    def on_cycle_done(self, doc: CycleDone) -> None:
        self.cycle_done.emit(doc)

    def on_stop(self, doc: RunStop) -> None:
        self.run_stopped.emit(doc)

    def on_state(self, state: str, reason: str) -> None:
        """Engine state callback (called in the engine's thread)."""
        self.state_changed.emit(str(state), reason or "")

    def on_pause(self, pause) -> None:
        """Engine pause callback (engine thread), just before the paused state."""
        self.paused.emit(pause)

    def on_step(self, text: str) -> None:
        self.step.emit(text)

    def attach(self, engine) -> None:
        engine.subscribe(self)
        engine.on_state_change(self.on_state)
        engine.on_pause(self.on_pause)
