"""Optional: push each section's tile specs to a Render web service as it completes.

One Render stack per wafer section, ``{stack}_s{section:04d}``, z = cycle (see
tilespecs.py). On SectionDone the specs of that section and cycle are PUT as
resolved tiles (stack created / set LOADING first); tile ids pushed earlier
for the same z and now superseded (a re-acquired tile: ``_v1``) are deleted.
On RunStop every stack touched is set COMPLETE. render-ws takes tiles and
deletions only into a LOADING stack; POSTing the stack's metadata saves a
new version of an existing stack, which makes a COMPLETE one LOADING again
(StackMetaDataService.saveStackVersion), so a resumed run can add to stacks
an earlier run completed. Tested against tests/support/render_ws.py, a
stand-in that follows render-ws's published API (not a real render-ws).

A Render outage must not stop acquisition: a push is retried with
exponential backoff; if it still fails, the section stays pending and the
writer holds off (30 s doubling to 5 min: SectionDone then costs nothing, so
the dispatcher queue never backs up into the engine) before trying again at
a later SectionDone; RunStop makes one last attempt. What was pushed is
appended (fsynced) to OUTDIR/render/push_state.jsonl - {stack, section,
cycle, digest, tile_ids} or {stack, complete} - so a resumed run skips what
is done and, on RunStart, catches up from tile-spec files on disk (highest
revision) that differ from what was pushed. Not in the manifest: it is a log.

Derived (``primary = False``): ``catch_up()`` (or a ``catch_up`` document)
pushes whatever the tile-spec files on disk hold that was not pushed;
``rebuild(tile)`` recomputes the specs of the tile's plane from the OME-TIFF
headers on disk and pushes them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Callable, Optional

import renderapi

from acq.documents import CatchUp, DocumentRouter, RunStart, RunStop, SectionDone, TileEvent
from common.atomic import ensure_dir
from acq.writers.layout import SectionTiles, plane_of
from acq.writers.manifest import WrittenFile, append_durably
from acq.writers.tilespecs import encode_specs, section_stack, tilespec_dicts

log = logging.getLogger(__name__)
STATE = "render/push_state.jsonl"
_SPECS = re.compile(r"^render/(\d{4})/(\d{4})/tilespecs(?:\.(\d+))?\.json$")


def _connect(host, port, owner, project, client_scripts=None):
    """A renderapi connection that only needs the REST API. renderapi.connect
    insists on java client scripts (it joins a None path without them), so
    without client_scripts the web-only Render object is built directly."""
    if not host.startswith("http"):
        host = f"http://{host}"
    if client_scripts:
        return renderapi.connect(host=host, port=port, owner=owner, project=project,
                                 client_scripts=client_scripts, validate_client=False)
    return renderapi.render.Render(host=host, port=port, owner=owner, project=project)


class RenderPushWriter(DocumentRouter):
    file_kind = "render_push"           # the manifest kind of its files
    primary = False

    def __init__(self, out_dir: Path, *, host: str, port: int, owner: str, project: str, stack: str,
                 client_scripts: Optional[str] = None, mipmap_levels: int = 3,
                 url_root: Optional[str] = None, slice_nm: float = 50.0, retries: int = 4,
                 backoff_s: float = 0.5, connect: Optional[Callable] = None,
                 sleep: Callable[[float], None] = time.sleep, scope_id: Optional[str] = None):
        self.out_dir = Path(out_dir)
        self.stack = stack
        self.mipmap_levels, self.url_root, self.slice_nm = mipmap_levels, url_root, slice_nm
        self.scope_id = scope_id        # as the tile-spec files say: the pushed specs match them
        self.retries, self.backoff_s, self.sleep = retries, backoff_s, sleep
        self.render = (connect or _connect)(host=host, port=port, owner=owner, project=project,
                                            client_scripts=client_scripts)
        self.tiles = SectionTiles(out_dir)
        self.pushed: dict[tuple[int, int], dict] = {}     # (section, cycle) -> last state line
        self.completed: set[str] = set()
        self.pending: dict[tuple[int, int], list[dict]] = {}
        self._opened: set[str] = set()
        self._hold_until, self._holdoff = 0.0, 30.0
        self._load_state()

    # ------------------------------------------------------------ state
    def _load_state(self) -> None:
        p = self.out_dir / STATE
        if not p.exists():
            return
        for line in p.read_text().splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue                       # torn last line: that push is simply redone
            if d.get("complete"):
                self.completed.add(d["stack"])
            else:                              # pushed after a COMPLETE: LOADING again
                self.pushed[(d["section"], d["cycle"])] = d
                self.completed.discard(d["stack"])

    def _append_state(self, d: dict) -> None:
        p = self.out_dir / STATE
        ensure_dir(p.parent)
        append_durably(p, (json.dumps(d) + "\n").encode())

    # ------------------------------------------------------------ documents
    def on_tile(self, doc: TileEvent) -> list[WrittenFile]:
        self.tiles.add(doc)
        return []

    def on_start(self, doc: RunStart) -> list[WrittenFile]:
        self._catch_up_from_disk()
        return []

    def on_section_done(self, doc: SectionDone) -> list[WrittenFile]:
        recs = self.tiles.resolve(doc.section_id, doc.cycle, doc.tile_ids)
        if recs:
            self.pending[(doc.section_id, doc.cycle)] = tilespec_dicts(
                recs, self.out_dir, self.mipmap_levels, self.url_root, self.scope_id)
        self.tiles.forget(doc.section_id, doc.cycle)
        if time.monotonic() >= self._hold_until:
            self._flush()
        return []

    def on_catch_up(self, doc: CatchUp) -> list[WrittenFile]:
        return self.catch_up()

    def on_stop(self, doc: RunStop) -> list[WrittenFile]:
        self._flush()
        self._complete_all()
        return []

    def catch_up(self) -> list[WrittenFile]:
        """Push what the tile-spec files on disk hold and Render lacks (now, ignoring the hold-off)."""
        self._catch_up_from_disk()
        self._flush()
        return []

    def rebuild(self, tile) -> list[WrittenFile]:
        """Recompute the specs of the plane of ``tile`` (TileEvent or path) from disk and push them."""
        section, cycle = plane_of(tile)
        recs = self.tiles.resolve(section, cycle, [])
        self.tiles.forget(section, cycle)
        if recs:
            self.pending[(section, cycle)] = tilespec_dicts(recs, self.out_dir, self.mipmap_levels, self.url_root,
                                                            self.scope_id)
        self._flush()
        return []

    def flush(self) -> None:
        self._flush()

    def close(self) -> None:
        sess = getattr(self.render, "session", None)
        if sess is not None:
            sess.close()

    # ------------------------------------------------------------ pushing
    def _catch_up_from_disk(self) -> None:
        best: dict[tuple[int, int], tuple[int, Path]] = {}
        for p in (self.out_dir / "render").glob("*/*/tilespecs*.json"):
            m = _SPECS.match(p.relative_to(self.out_dir).as_posix())
            if m:
                key, rev = (int(m[1]), int(m[2])), int(m[3] or 0)
                if key not in best or rev > best[key][0]:
                    best[key] = (rev, p)
        for key, (_rev, p) in best.items():
            specs = json.loads(p.read_text())
            if key not in self.pending and self._digest(specs) != self.pushed.get(key, {}).get("digest"):
                self.pending[key] = specs

    @staticmethod
    def _digest(specs: list[dict]) -> str:
        return hashlib.sha256(encode_specs(specs)).hexdigest()

    def _retry(self, what: str, fn, *a, **kw):
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            try:
                return fn(*a, render=self.render, **kw)
            except Exception as e:                 # requests/RenderError/connection: all transient here
                if attempt == self.retries:
                    raise
                log.warning("render %s failed (%s); retry %d/%d in %.1f s", what, e, attempt,
                            self.retries - 1, delay)
                self.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _open_stack(self, stack: str, specs: list[dict]) -> None:
        if stack in self._opened:
            return
        px_nm = specs[0]["layout"]["pixelsize"]
        # POST stack (creates it, or updates its version on a resumed run) then LOADING
        self._retry("create_stack", renderapi.stack.create_stack, stack, stackResolutionX=px_nm,
                    stackResolutionY=px_nm, stackResolutionZ=self.slice_nm)
        self._retry("set LOADING", renderapi.stack.set_stack_state, stack, "LOADING")
        self._opened.add(stack)
        self.completed.discard(stack)

    def _flush(self) -> None:
        for key in sorted(self.pending):
            specs = self.pending[key]
            digest = self._digest(specs)
            done = self.pushed.get(key)
            if done and done["digest"] == digest:
                del self.pending[key]
                continue
            section, cycle = key
            stack = section_stack(self.stack, section)
            try:
                self._open_stack(stack, specs)
                tss = [renderapi.tilespec.TileSpec(json=d) for d in specs]
                self._retry("import", renderapi.resolvedtiles.put_tilespecs, stack, tilespecs=tss,
                            deriveData=True)
                ids = [d["tileId"] for d in specs]
                for old in sorted(set(done["tile_ids"]) - set(ids)) if done else []:
                    self._retry("delete_tile", renderapi.stack.delete_tile, stack, old)
            except Exception as e:
                log.error("render push of section %d cycle %d to %s failed: %s (kept pending, next try "
                          "in %.0f s)", section, cycle, stack, e, self._holdoff)
                self._opened.discard(stack)
                self._hold_until = time.monotonic() + self._holdoff
                self._holdoff = min(2 * self._holdoff, 300.0)
                return
            self._holdoff = 30.0
            state = {"stack": stack, "section": section, "cycle": cycle, "digest": digest,
                     "tile_ids": ids, "time": time.time()}
            self._append_state(state)
            self.pushed[key] = state
            del self.pending[key]

    def _complete_all(self) -> None:
        stacks = {d["stack"] for d in self.pushed.values()} - self.completed
        for stack in sorted(stacks):
            if any(section_stack(self.stack, s) == stack for s, _c in self.pending):
                continue                       # something still failed to go: leave it LOADING
            try:
                self._retry("set COMPLETE", renderapi.stack.set_stack_state, stack, "COMPLETE")
            except Exception as e:
                log.error("could not set %s COMPLETE: %s", stack, e)
                continue
            self._append_state({"stack": stack, "complete": True, "time": time.time()})
            self.completed.add(stack)
            self._opened.discard(stack)
