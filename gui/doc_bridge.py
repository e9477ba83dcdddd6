"""The engine's document stream and state changes as Qt signals.

The engine calls subscribers in its dispatcher thread and state callbacks in
its own thread; this QObject lives in the GUI thread, so emitting from those
threads queues the signal onto the GUI event loop (no shared state, no
polling, no string commands). Tile images are large: the bridge forwards
every tile document, and the live view repaints at most at its own rate."""
from __future__ import annotations

from PyQt5.QtCore import QObject, pyqtSignal


class DocBridge(QObject):
    document = pyqtSignal(object)          # every document, in order
    run_started = pyqtSignal(object)       # RunStart
    tile = pyqtSignal(object)              # TileEvent
    incident = pyqtSignal(object)          # Incident
    section_done = pyqtSignal(object)      # SectionDone
    cycle_done = pyqtSignal(object)        # CycleDone
    run_stopped = pyqtSignal(object)       # RunStop
    state_changed = pyqtSignal(str, str)   # engine state, reason
    step = pyqtSignal(str)                 # what the engine is doing now
    acquiring = pyqtSignal(int, int, int, int)   # section, grid, row, col of the tile being acquired

    _BY_KIND = {"start": "run_started", "tile": "tile", "incident": "incident", "section_done": "section_done",
                "cycle_done": "cycle_done", "stop": "run_stopped"}

    def __call__(self, doc) -> None:
        """Engine subscriber (called in the dispatcher's thread)."""
        self.document.emit(doc)
        name = self._BY_KIND.get(getattr(doc, "kind", ""))
        if name:
            getattr(self, name).emit(doc)

    def on_state(self, state: str, reason: str) -> None:
        """Engine state callback (called in the engine's thread)."""
        self.state_changed.emit(state, reason or "")

    def on_step(self, text: str) -> None:
        self.step.emit(text)

    def attach(self, engine) -> None:
        engine.subscribe(self)
        engine.on_state_change(self.on_state)
