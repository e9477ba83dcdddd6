"""Data writers: OME-TIFF tiles, ASAP MIPmaps, Render tile specs, TrakEM2
import lists, per-section OME-Zarr, optional Render push, and the manifest.

Contract with the engine (acq/stream.py dispatches, one thread per writer,
documents in order): ``writer.handle(doc) -> list[WrittenFile]`` returns only
when what it wrote is durable (fsynced, renamed into place, listed in
OUTDIR/manifest.jsonl); documents a writer does not need give ``[]``.
``flush()`` and ``close()`` end a run. A WrittenFile is os.PathLike and
str() gives its path, so it can be journalled like a path.

Per TileEvent: OME-TIFF -> [tile], MIPmaps -> [3 levels], tile specs and
TrakEM2 -> [] (they write on SectionDone), OME-Zarr -> [] (it pastes into
memory and writes the plane on SectionDone; after a crash it re-pastes from
the OME-TIFFs, so a tile is safe once the OME-TIFF writer has returned).

Primary and derived: the OME-TIFF writer is the PRIMARY writer
(``primary = True``): its file is the frame, and a tile is safe once it has
returned. Every other writer (``primary = False``) derives from the OME-TIFFs
and can re-derive what it missed from them: ``catch_up(planes=None)`` (all
planes on disk, or [(section, cycle), ...]) and ``rebuild(tile)`` (a
TileEvent or a tile's path), or in its own thread through a ``CatchUp``
document (acq/documents.py). They also catch up by themselves: the plane at its
SectionDone (MIPmaps, OME-Zarr; tile specs and TrakEM2 retry planes that
failed), everything on a resumed RunStart and at RunStop. So a derived
writer's failure never calls for imaging a tile again.

Restart after a crash: make_writers runs ``Manifest.recover()`` (torn
manifest tail cut, leftover temporaries deleted, durable files whose line
was lost re-recorded) before the writers are built; each writer's
constructor repairs its own half-made state (OME-Zarr stores, TrakEM2
indexes); the resumed RunStart re-derives from the tiles on disk.

A re-acquired tile must carry a new ``version`` (next_version() tells which
on a resumed run): names derive from (section, cycle, tile_id, version) and an
existing file is never replaced. Replaying the very same document is harmless
(the same bytes are found and accepted); different bytes under an existing
name raise FileExists.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.crashpoints import point
from acq.writers.layout import next_version, read_tile_header, tile_on_disk, tile_relpath
from acq.writers.manifest import Manifest, WrittenFile, read_manifest, verify_manifest

__all__ = ["WrittenFile", "WriterOptions", "RenderPushOptions", "make_writers", "verify_manifest",
           "read_manifest", "next_version", "read_tile_header", "tile_relpath", "options_from_plan",
           "Manifest", "tile_on_disk"]


class RenderPushOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str
    port: int = Field(..., ge=1, le=65535)
    owner: str
    project: str
    stack: str = Field(..., description="base name; one stack per section: {stack}_s{section:04d}")
    client_scripts: Optional[str] = None
    retries: int = Field(4, ge=1, le=20)
    backoff_s: float = Field(0.5, ge=0)


class WriterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ome_tiff: bool = True
    mipmaps: bool = True
    mipmap_levels: int = Field(3, ge=1, le=10)
    render_tilespecs: bool = True
    trakem2: bool = True
    ome_zarr: bool = True
    zarr_levels: int = Field(3, ge=1, le=8)
    zarr_chunk: int = Field(512, ge=32, le=8192, description="inner chunk edge (px): what a viewer reads at once")
    zarr_shard: Optional[int] = Field(None, ge=64, le=16384, description=(
        "shard edge (px; default 8 chunks): one object on disk, a multiple of zarr_chunk and of 2**(zarr_levels-1)"))
    zarr_url: Optional[str] = Field(None, description=(
        "fsspec URL for the OME-Zarr volumes (e.g. s3://bucket/run); default OUTDIR/zarr"))
    zarr_slice_um: float = Field(0.05, gt=0, description="z scale of the OME-Zarr: material removed per cycle")
    zarr_cache_mb: int = Field(512, ge=0, description="chunks held in memory until their plane is done")
    image_url_root: Optional[str] = Field(
        None, description="URL prefix replacing OUTDIR in tile-spec imageUrls (Render server's mount)")
    scope_id: Optional[str] = Field(None, max_length=200, description=(
        "microscope name for the Render tile specs' layout.scopeId (ASAP), e.g. 'merlin-1'"))
    render_push: Optional[RenderPushOptions] = None

    @model_validator(mode="after")
    def _consistent(self):
        derived = [n for n in ("mipmaps", "render_tilespecs", "trakem2") if getattr(self, n)]
        if self.render_push is not None:
            derived.append("render_push")
        if derived and not self.ome_tiff:
            raise ValueError(f"{', '.join(derived)} point at the OME-TIFF tiles: ome_tiff must be on")
        shard = self.zarr_shard or 8 * self.zarr_chunk
        if shard % self.zarr_chunk or shard % (2 ** (self.zarr_levels - 1)):
            raise ValueError(f"zarr_shard ({shard}) must be a multiple of zarr_chunk ({self.zarr_chunk}) "
                             f"and of 2**(zarr_levels-1) ({2 ** (self.zarr_levels - 1)})")
        return self


_PLAN_NAMES = {"ome_tiff", "mipmaps", "render_tilespecs", "trakem2", "ome_zarr"}


def options_from_plan(writers: list[str], options: dict[str, dict] | None = None) -> WriterOptions:
    """Plan style (a list of writer names + per-writer option dicts) to
    WriterOptions, e.g. (["ome_tiff", "ome_zarr"], {"ome_zarr": {"zarr_levels": 4}})."""
    options = options or {}
    unknown = set(writers) - _PLAN_NAMES - {"render_push"}
    if unknown:
        raise ValueError(f"unknown writers {sorted(unknown)}; known: {sorted(_PLAN_NAMES | {'render_push'})}")
    kw: dict = {n: n in writers for n in _PLAN_NAMES}
    for name, opts in options.items():
        if name == "render_push":
            continue
        kw.update(opts)
    if "render_push" in writers:
        kw["render_push"] = options.get("render_push") or {}
    return WriterOptions(**kw)


def make_writers(out_dir: Path, options: WriterOptions | None = None, *, recover: bool = True) -> list:
    """The writers for ``options``, all sharing one manifest in ``out_dir``.
    Order matters only for readability: each runs in its own thread.
    ``recover``: first repair what a crash left (Manifest.recover; a no-op in
    a new folder). Call it only while no other process writes there (under
    the output folder's lock)."""
    from acq.writers.mipmaps import MipmapWriter
    from acq.writers.ome_tiff import OmeTiffWriter
    from acq.writers.ome_zarr import OmeZarrWriter
    from acq.writers.tilespecs import TileSpecWriter
    from acq.writers.trakem2 import TrakEM2Writer

    options = options or WriterOptions()
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        point("mkdir", out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out_dir)
    if recover:
        manifest.recover()
    writers: list = []
    if options.ome_tiff:
        writers.append(OmeTiffWriter(out_dir, manifest))
    if options.mipmaps:
        writers.append(MipmapWriter(out_dir, manifest, options.mipmap_levels, url_root=options.image_url_root))
    levels = options.mipmap_levels if options.mipmaps else 0
    if options.render_tilespecs:
        writers.append(TileSpecWriter(out_dir, manifest, levels, options.image_url_root, scope_id=options.scope_id))
    if options.trakem2:
        writers.append(TrakEM2Writer(out_dir, manifest, slice_um=options.zarr_slice_um))
    if options.ome_zarr:
        writers.append(OmeZarrWriter(out_dir, manifest, options.zarr_levels, options.zarr_chunk,
                                     options.zarr_slice_um, cache_mb=options.zarr_cache_mb,
                                     shard=options.zarr_shard, url=options.zarr_url))
    if options.render_push is not None:
        from acq.writers.render_push import RenderPushWriter
        rp = options.render_push
        writers.append(RenderPushWriter(
            out_dir, host=rp.host, port=rp.port, owner=rp.owner, project=rp.project, stack=rp.stack,
            client_scripts=rp.client_scripts, mipmap_levels=levels, url_root=options.image_url_root,
            slice_nm=options.zarr_slice_um * 1e3, retries=rp.retries, backoff_s=rp.backoff_s,
            scope_id=options.scope_id))
    return writers
