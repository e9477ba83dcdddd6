"""A local stand-in for a Render web service (render-ws), on a real socket.

It answers the JAX-RS paths of render-ws's published API
(github.com/saalfeldlab/render, render-ws StackMetaDataService,
RenderDataService, TileDataService) under
/render-ws/v1/owner/{owner}/project/{project}/stack/{stack}, for every call
the Render push makes and the reads render-python offers to check a stack,
and refuses what render-ws refuses, with its status codes:

* POST stack (StackVersion): creates the stack LOADING (version 0), or saves
  the next version of an existing one, which makes it LOADING again (stats
  dropped); a READ_ONLY stack: 500 (render-ws raises IllegalStateException,
  which its service layer maps to 500, not to the 400 its docs announce).
* PUT .../state/{state}: LOADING -> COMPLETE, COMPLETE -> anything,
  READ_ONLY -> COMPLETE|OFFLINE, OFFLINE -> COMPLETE; any other change 400;
  an unknown state name 404 (JAX-RS cannot build the enum); COMPLETE derives
  the stack's stats.
* PUT .../resolvedTiles and .../z/{z}/resolvedTiles (?deriveData=true: the
  bounding boxes are derived here from the affine transforms): the stack
  must be LOADING (else 500, IllegalStateException again); no tiles, a tile
  without a bounding box (deriveData false), a tile without tileId / z /
  level-0 imageUrl, or a z other than the path's: 400. Tiles are saved by id
  (a tile id already there is replaced).
* DELETE stack (a missing one is fine; READ_ONLY: 500), DELETE .../z/{z},
  .../section/{sectionId}, .../tile/{tileId}: those three only while LOADING
  (else 400).
* GET stack metadata, .../stacks of a project, zValues, sectionData,
  tileIds, .../tile/{tileId}, .../z/{z}/tile-specs, .../z/{z}/resolvedTiles,
  .../section/{sectionId}/z.

Anything else: 404 (unknown path or stack), 405 (known path, other method),
400 for a body that is not JSON. Errors are text/plain, as render-ws sends
them. A real render-ws (Java + MongoDB) cannot run in the tests; this
follows its code, not a recording of it.

For fault injection: ``fail_next`` answers that many requests with 503,
``down`` answers every request so. ``calls`` lists (method, path).
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

STATES = ("LOADING", "COMPLETE", "READ_ONLY", "OFFLINE")
_BASE = re.compile(r"^/render-ws/v1/owner/(?P<owner>[^/]+)/project/(?P<project>[^/]+)/"
                   r"(?P<tail>stacks|stack/(?P<stack>[^/]+)(?P<rest>(?:/[^/]+)*))/?$")


class RenderError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _allowed(current: str, new: str) -> bool:
    # StackMetaData.validateStateChange
    if current == new or current == "COMPLETE":
        return True
    if current in ("LOADING", "OFFLINE"):
        return new == "COMPLETE"
    return new in ("COMPLETE", "OFFLINE")          # READ_ONLY


def _bbox(spec: dict):
    """(minX, minY, maxX, maxY) of the tile's corners through its transforms
    (mpicbg AffineModel2D / TranslationModel2D, dataString order m00 m10 m01
    m11 m02 m12); None when another transform is in the list."""
    w, h = float(spec["width"]), float(spec["height"])
    pts = [(0.0, 0.0), (w, 0.0), (0.0, h), (w, h)]
    for t in (spec.get("transforms") or {}).get("specList", []):
        cls = t.get("className", "")
        v = [float(x) for x in str(t.get("dataString", "")).split()]
        if cls.endswith("AffineModel2D") and len(v) == 6:
            m00, m10, m01, m11, b0, b1 = v
            pts = [(m00 * x + m01 * y + b0, m10 * x + m11 * y + b1) for x, y in pts]
        elif cls.endswith("TranslationModel2D") and len(v) == 2:
            pts = [(x + v[0], y + v[1]) for x, y in pts]
        else:
            return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


class _Stack:
    def __init__(self, owner, project, name, version):
        self.owner, self.project, self.name = owner, project, name
        self.state, self.version_number, self.version = "LOADING", 0, version
        self.tiles: dict[str, dict] = {}
        self.stats = None
        self.modified = time.time()

    def metadata(self) -> dict:
        d = {"stackId": {"owner": self.owner, "project": self.project, "stack": self.name},
             "state": self.state, "lastModifiedTimestamp": int(self.modified * 1000),
             "currentVersionNumber": self.version_number, "currentVersion": self.version}
        if self.stats is not None:
            d["stats"] = self.stats
        return d

    def set_state(self, new: str) -> None:
        if not _allowed(self.state, new):
            raise RenderError(400, f"The {self.name} stack's state is currently {self.state} and must first be "
                                   f"transitioned to COMPLETE before transitioning it to {new}.")
        if new == "COMPLETE" and self.state != "READ_ONLY":
            self.stats = self._derive_stats()
        elif new == "LOADING" and self.state != "LOADING":
            self.stats = None
            self.version_number += 1
        elif new == "OFFLINE":
            self.tiles.clear()
        self.state = new
        self.modified = time.time()

    def _derive_stats(self) -> dict:
        boxes = [(t["minX"], t["minY"], t["maxX"], t["maxY"]) for t in self.tiles.values()]
        bounds = None
        if boxes:
            zs = [t["z"] for t in self.tiles.values()]
            bounds = {"minX": min(b[0] for b in boxes), "minY": min(b[1] for b in boxes),
                      "maxX": max(b[2] for b in boxes), "maxY": max(b[3] for b in boxes),
                      "minZ": min(zs), "maxZ": max(zs)}
        return {"stackBounds": bounds, "sectionCount": len({t["z"] for t in self.tiles.values()}),
                "nonIntegralSectionCount": 0, "tileCount": len(self.tiles), "transformCount": 0,
                "minTileWidth": min((t["width"] for t in self.tiles.values()), default=None),
                "maxTileWidth": max((t["width"] for t in self.tiles.values()), default=None),
                "minTileHeight": min((t["height"] for t in self.tiles.values()), default=None),
                "maxTileHeight": max((t["height"] for t in self.tiles.values()), default=None)}

    def require_loading(self, what: str) -> None:
        if self.state != "LOADING":
            raise RenderError(400, f"stack state is {self.state} but must be LOADING to {what}")

    def at_z(self, z: float) -> list[dict]:
        return [t for _i, t in sorted(self.tiles.items()) if t["z"] == z]


class RenderWS:
    """The server: ``port``, ``stacks`` ((owner, project, stack) -> state),
    ``stack(name)`` for a test's assertions, ``close()``."""

    def __init__(self):
        self.stacks: dict[tuple[str, str, str], _Stack] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_next = 0
        self.down = False
        self._lock = threading.Lock()
        ws = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"            # keep-alive, as requests' session uses it

            def log_message(self, *a):
                pass

            def _send(self, code: int, body, content_type="application/json"):
                data = body if isinstance(body, bytes) else (
                    body.encode() if isinstance(body, str) else json.dumps(body).encode())
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                url = urlsplit(self.path)
                ws.calls.append((self.command, url.path))
                if ws.down or ws.fail_next > 0:
                    ws.fail_next = max(0, ws.fail_next - 1)
                    return self._send(503, "Service Unavailable", "text/plain")
                try:
                    with ws._lock:
                        code, body = ws._route(self.command, url.path, parse_qs(url.query), raw)
                except RenderError as e:
                    return self._send(e.status, str(e), "text/plain")
                self._send(code, body if body is not None else b"")

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "RenderWS":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ for tests
    def stack(self, name: str, owner: str | None = None, project: str | None = None) -> _Stack:
        found = [s for (o, p, n), s in self.stacks.items()
                 if n == name and owner in (None, o) and project in (None, p)]
        if len(found) != 1:
            raise KeyError(f"{len(found)} stacks named {name}")
        return found[0]

    def stack_names(self) -> set[str]:
        return {n for _o, _p, n in self.stacks}

    # ------------------------------------------------------------ the API
    def _route(self, method: str, path: str, query: dict, raw: bytes):
        m = _BASE.match(path)
        if not m:
            raise RenderError(404, f"no resource at {path}")
        owner, project = unquote(m["owner"]), unquote(m["project"])
        if m["tail"] == "stacks":
            self._only(method, "GET")
            return 200, [s.metadata() for (o, p, _n), s in sorted(self.stacks.items()) if (o, p) == (owner, project)]
        if m["stack"] is None:
            raise RenderError(404, f"no resource at {path}")
        name = unquote(m["stack"])
        rest = [unquote(x) for x in (m["rest"] or "").split("/")[1:]]
        key = (owner, project, name)
        st = self.stacks.get(key)

        def need():
            if st is None:
                raise RenderError(404, f"stack with owner '{owner}', project '{project}', and name '{name}' "
                                       "does not exist")
            return st

        if not rest:
            if method == "GET":
                return 200, need().metadata()
            if method == "POST":
                version = self._json(raw)
                if not isinstance(version, dict):
                    raise RenderError(400, "no stack version provided")
                if st is None:
                    self.stacks[key] = _Stack(owner, project, name, version)
                else:
                    if st.state == "READ_ONLY":
                        raise RenderError(500, f"Data for stack {name} cannot be modified because it is READ_ONLY.")
                    st.version, st.state, st.stats = version, "LOADING", None
                    st.version_number += 1
                    st.modified = time.time()
                return 201, None
            if method == "DELETE":
                if st is not None:
                    if st.state == "READ_ONLY":
                        raise RenderError(500, f"Data for stack {name} cannot be modified because it is READ_ONLY.")
                    del self.stacks[key]
                return 200, None
            raise RenderError(405, f"{method} not allowed")
        head = rest[0]
        if head == "state" and len(rest) == 2:
            self._only(method, "PUT")
            if rest[1] not in STATES:
                raise RenderError(404, f"no state {rest[1]}")
            need().set_state(rest[1])
            return 201, None
        if head == "resolvedTiles" and len(rest) == 1:
            self._only(method, "PUT")
            return self._save_tiles(need(), None, query, raw)
        if head == "zValues" and len(rest) == 1:
            self._only(method, "GET")
            return 200, sorted({t["z"] for t in need().tiles.values()})
        if head == "tileIds" and len(rest) == 1:
            self._only(method, "GET")
            return 200, sorted(need().tiles)
        if head == "sectionData" and len(rest) == 1:
            self._only(method, "GET")
            return 200, self._section_data(need())
        if head == "tile" and len(rest) == 2:
            s = need()
            if method == "DELETE":
                s.require_loading("delete data")
                s.tiles.pop(rest[1], None)
                return 200, None
            self._only(method, "GET")
            if rest[1] not in s.tiles:
                raise RenderError(404, f"tile spec with id '{rest[1]}' does not exist")
            return 200, s.tiles[rest[1]]
        if head == "section" and len(rest) in (2, 3):
            s = need()
            if len(rest) == 2:
                self._only(method, "DELETE")
                s.require_loading("delete data")
                s.tiles = {i: t for i, t in s.tiles.items() if t.get("layout", {}).get("sectionId") != rest[1]}
                return 200, None
            if rest[2] != "z":
                raise RenderError(404, f"no resource at {path}")
            self._only(method, "GET")
            zs = {t["z"] for t in s.tiles.values() if t.get("layout", {}).get("sectionId") == rest[1]}
            if not zs:
                raise RenderError(404, f"sectionId '{rest[1]}' does not exist in the {name} stack")
            return 200, min(zs)
        if head == "z" and len(rest) in (2, 3):
            z = self._z(rest[1])
            s = need()
            if len(rest) == 2:
                self._only(method, "DELETE")
                s.require_loading("delete data")
                s.tiles = {i: t for i, t in s.tiles.items() if t["z"] != z}
                return 200, None
            if rest[2] == "resolvedTiles" and method == "PUT":
                return self._save_tiles(s, z, query, raw)
            if rest[2] in ("resolvedTiles", "tile-specs"):
                self._only(method, "GET")
                tiles = s.at_z(z)
                if not tiles:
                    raise RenderError(404, f"no tile specifications found in {name} for z={z}")
                if rest[2] == "tile-specs":
                    return 200, tiles
                return 200, {"transformIdToSpecMap": {}, "tileIdToSpecMap": {t["tileId"]: t for t in tiles}}
        raise RenderError(404, f"no resource at {path}")

    @staticmethod
    def _only(method: str, allowed: str) -> int:
        if method != allowed:
            raise RenderError(405, f"{method} not allowed")
        return 200

    @staticmethod
    def _json(raw: bytes):
        if not raw:
            return None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RenderError(400, f"Unable to process JSON: {e}") from None

    @staticmethod
    def _z(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise RenderError(404, f"z {text!r} is not a number") from None

    def _save_tiles(self, st: _Stack, z, query: dict, raw: bytes):
        body = self._json(raw)
        if not isinstance(body, dict) or not isinstance(body.get("tileIdToSpecMap"), dict):
            raise RenderError(400, "no resolved tiles provided")
        if st.state != "LOADING":
            raise RenderError(500, "Resolved tiles can only be saved to stacks in the LOADING state, "
                                   f"but this stack's state is {st.state}.")
        tiles = body["tileIdToSpecMap"]
        if not tiles:
            raise RenderError(400, "collection does not have any tiles")
        derive = query.get("deriveData", ["false"])[-1].lower() == "true"
        checked = {}
        for tid, spec in tiles.items():
            if not isinstance(spec, dict) or spec.get("tileId") != tid:
                raise RenderError(400, f"tile spec under {tid!r} does not carry that tileId")
            if not isinstance(spec.get("z"), (int, float)):
                raise RenderError(400, f"tile {tid} has no z")
            if z is not None and float(spec["z"]) != z:
                raise RenderError(400, f"tile {tid} has z {spec['z']} instead of {z}")
            if not (spec.get("mipmapLevels") or {}).get("0", {}).get("imageUrl"):
                raise RenderError(400, f"tile {tid} has no level 0 imageUrl")
            spec = dict(spec, z=float(spec["z"]))
            if derive:
                box = _bbox(spec)
                if box is not None:
                    spec.update(zip(("minX", "minY", "maxX", "maxY"), box))
            if any(k not in spec for k in ("minX", "minY", "maxX", "maxY")):
                raise RenderError(400, f"tile with id '{tid}' is missing bounding box attributes "
                                       "(minX, minY, maxX, and/or maxY)")
            checked[tid] = spec
        st.tiles.update(checked)
        st.modified = time.time()
        return 201, None

    @staticmethod
    def _section_data(st: _Stack) -> list[dict]:
        out: dict[tuple, dict] = {}
        for t in st.tiles.values():
            k = (t.get("layout", {}).get("sectionId"), t["z"])
            d = out.setdefault(k, {"sectionId": k[0], "z": k[1], "tileCount": 0, "minX": t["minX"],
                                   "maxX": t["maxX"], "minY": t["minY"], "maxY": t["maxY"]})
            d["tileCount"] += 1
            d["minX"], d["minY"] = min(d["minX"], t["minX"]), min(d["minY"], t["minY"])
            d["maxX"], d["maxY"] = max(d["maxX"], t["maxX"]), max(d["maxY"], t["maxY"])
        return [out[k] for k in sorted(out, key=lambda k: (k[1], str(k[0])))]

