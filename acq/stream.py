"""Delivery of the document stream to subscribers and writers.

Each subscriber gets its own thread and a bounded queue: a slow GUI or
writer cannot stall the engine for longer than it takes to fill its queue
(``publish`` then blocks: back-pressure, memory stays bounded), and every
subscriber still sees the documents in order.

Writers acknowledge tiles: ``Writer.handle(doc)`` returns only when the
document is durably on disk and may return the paths it wrote. When every
writer has returned for a TileEvent, the publisher's ``ack`` callback runs
(in the last writer's thread) with a TileAck; the engine journals the tile
as done there and only there.

Primary and derived writers: a writer with ``primary = True`` (the OME-TIFF)
holds the frame itself; the others derive from it. A derived writer handles
a tile only after every primary writer has it safely on disk (it waits in
its own thread, so document order is kept), and skips it when a primary
failed. So a crash never leaves a derived output without its tile, and a
derived writer's failure is only reported: the tile is on disk, it is never
imaged again for it. Without any primary writer every writer counts as one.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol, runtime_checkable

from acq.documents import TileEvent

log = logging.getLogger(__name__)

_STOP = object()


@runtime_checkable
class Writer(Protocol):
    """What acq/writers/* implement (through acq.documents.DocumentRouter)."""

    def handle(self, doc: Any) -> Optional[Iterable[str | Path]]:
        """Write ``doc``; return when it is durably written (fsync'd), with the
        paths written for it (or None)."""

    def flush(self) -> None:
        """Finish anything buffered (end of section / run)."""


@dataclass
class TileAck:
    """What the writers did with one tile."""
    doc: TileEvent
    files: dict[str, list[str]] = field(default_factory=dict)      # per writer that succeeded
    errors: dict[str, str] = field(default_factory=dict)           # per writer that failed
    primary_error: Optional[BaseException] = None                  # the first primary writer's failure

    @property
    def written(self) -> bool:
        """The frame is safely on disk (every primary writer has it)."""
        return self.primary_error is None


AckCallback = Callable[[TileAck], None]


class _Ack:
    """Collects one tile's acknowledgements; releases the derived writers
    once the primary ones are done."""

    def __init__(self, doc: TileEvent, n_primary: int, n_derived: int, callback: Optional[AckCallback]):
        self._left_primary, self._left = n_primary, n_primary + n_derived
        self._cb = callback
        self._lock = threading.Lock()
        self.result = TileAck(doc)
        self.primary_done = threading.Event()
        if n_primary == 0:
            self.primary_done.set()

    def done(self, name: str, files, error: Optional[BaseException], primary: bool) -> None:
        with self._lock:
            if error is not None:
                self.result.errors[name] = f"{type(error).__name__}: {error}"
                if primary and self.result.primary_error is None:
                    self.result.primary_error = error
            else:
                self.result.files[name] = [str(p) for p in (files or [])]
            if primary:
                self._left_primary -= 1
                if self._left_primary == 0:
                    self.primary_done.set()
            self._left -= 1
            last = self._left == 0
        if last and self._cb is not None:
            try:
                self._cb(self.result)
            except Exception:
                log.exception("tile acknowledgement callback failed")


class _Sink:
    def __init__(self, target, name: str, writer: bool, maxsize: int):
        self.target = target
        self.name = name
        self.writer = writer
        self.primary = bool(getattr(target, "primary", False)) if writer else False
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._loop, name=f"sink-{name}", daemon=True)

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is _STOP:
                    return
                doc, ack, primary = item
                files, err = None, None
                derived = ack is not None and not primary
                if derived:
                    ack.primary_done.wait()         # derive only from a frame that is on disk
                if derived and not ack.result.written:
                    err = RuntimeError("skipped: the tile's primary writer failed")
                else:
                    try:
                        files = self.target.handle(doc) if self.writer else self.target(doc)
                    except Exception as e:         # one bad document must not end the delivery
                        log.exception("%s failed on a %s document", self.name, getattr(doc, "kind", "?"))
                        err = e
                        self.errors.append(f"{type(e).__name__}: {e}")
                if ack is not None:
                    ack.done(self.name, files, err, primary)
            finally:
                self.queue.task_done()


class Dispatcher:
    def __init__(self, maxsize: int = 8):
        self.maxsize = maxsize
        self._sinks: list[_Sink] = []
        self._started = False
        self._closed = False

    def add_subscriber(self, fn: Callable[[Any], None], name: Optional[str] = None) -> None:
        self._add(fn, name or getattr(fn, "__qualname__", "subscriber"), False)

    def add_writer(self, writer: Writer, name: Optional[str] = None) -> None:
        if not isinstance(writer, Writer):
            raise TypeError(f"{writer!r} is not a Writer (needs handle(doc) and flush())")
        self._add(writer, name or type(writer).__name__, True)

    def _add(self, target, name: str, writer: bool) -> None:
        names = {s.name for s in self._sinks}
        base, n = name, 1
        while name in names:
            n += 1
            name = f"{base}#{n}"
        sink = _Sink(target, name, writer, self.maxsize)
        self._sinks.append(sink)
        if self._started:
            sink.thread.start()

    @property
    def writers(self) -> list[str]:
        return [s.name for s in self._sinks if s.writer]

    def start(self) -> None:
        if not self._started:
            self._started = True
            for s in self._sinks:
                s.thread.start()

    def publish(self, doc: Any, ack: Optional[AckCallback] = None, writers_only: bool = False) -> None:
        """Queue ``doc`` for every sink (blocks while a queue is full). With
        ``ack``, a TileEvent is acknowledged once all writers handled it
        (immediately when there are no writers). ``writers_only``: a tile
        written again, which the subscribers have seen already."""
        if self._closed:
            raise RuntimeError("dispatcher is closed")
        self.start()
        writers = [s for s in self._sinks if s.writer]
        primary = {s.name for s in writers if s.primary} or {s.name for s in writers}
        tracker = None
        if isinstance(doc, TileEvent) and writers:
            tracker = _Ack(doc, len(primary), len(writers) - len(primary), ack)
        elif ack is not None and isinstance(doc, TileEvent):
            ack(TileAck(doc))
        for s in self._sinks:
            if s.writer or not writers_only:
                s.queue.put((doc, tracker if s.writer else None, s.name in primary))

    def wait_idle(self, writers_only: bool = False) -> None:
        """Block until every queued document has been handled."""
        for s in self._sinks:
            if s.writer or not writers_only:
                s.queue.join()

    def errors(self) -> dict[str, list[str]]:
        return {s.name: list(s.errors) for s in self._sinks if s.errors}

    def close(self) -> None:
        """Deliver what is queued, flush and close the writers, stop the threads."""
        if self._closed:
            return
        self._closed = True
        for s in self._sinks:
            if s.thread.is_alive():
                s.queue.put(_STOP)
        for s in self._sinks:
            if s.thread.is_alive():
                s.thread.join()
            if s.writer:
                for meth in ("flush", "close"):
                    fn = getattr(s.target, meth, None)
                    if fn is None:
                        continue
                    try:
                        fn()
                    except Exception as e:
                        log.exception("%s.%s failed", s.name, meth)
                        s.errors.append(f"{meth}: {type(e).__name__}: {e}")
