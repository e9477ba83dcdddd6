"""One OME-TIFF per tile: tiles/{section:04d}/{cycle:04d}/{tile_id}_v{version}.ome.tif.

Written once, through atomic_write (temp name, fsync, link - never replacing
an existing file): tifffile writes straight into the temp file, and the
sha256 for the manifest is taken from the ~1 KB of header/trailer plus the
pixels still in memory, in a helper thread while the file is fsynced. A
re-acquired tile has a new version and so a new name. Uncompressed, one
strip: EM noise barely compresses and the writer has to keep up with the disk.

The OME-XML (2016-06 schema; built here because tifffile cannot write an
Instrument) carries:
  * Image AcquisitionDate (UTC, the frame's start) and Pixels PhysicalSizeX/Y (µm);
  * an Instrument: Microscope Manufacturer/Model/SerialNumber and one Detector
    (its Model = the detector's name), from the setup's ``devices.sem.options``
    (manufacturer, model, serial_number, detector), else DRIVER_INSTRUMENT; a
    ``detector`` in the frame's metadata (the one in use) wins;
  * one Channel named after that detector, its DetectorSettings pointing at it;
  * Plane PositionX/Y/Z (µm): the stage position of the CENTRE OF PIXEL (0, 0)
    (array row 0, column 0), not of the frame centre - the overview mosaic's
    convention too (common/geometry.py). OME leaves the point open, so every
    file says so: key ``stage_position_refers_to`` = ``centre of pixel (0, 0)``;
  * a MapAnnotation (namespace ``acq/acquisition/v1``) of plain key-value
    pairs, the unit in the key: eht_kv, probe_current_na, dwell_time_ns,
    working_distance_mm, stigmator_x/y, scan_rotation_deg, pixel_size_nm,
    frame_centre_stage_x/y/z_um, ... (tile_key_values);
  * and the whole TileEvent header as JSON in a MapAnnotation (namespace
    ``acq/tile-metadata/v1``, key ``acq.tile``), which layout.read_tile_header
    reads back without touching the pixels (its ``stage`` is the frame centre,
    as the stage reported it: TileRecord places tiles from it).

The PRIMARY writer (``primary = True``): its file is the frame itself. A tile
is safe once this writer returned; every other writer derives from these
files and can re-derive its output from them (catch_up / rebuild), so a
derived writer's failure never calls for imaging the tile again.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tifffile

from acq.documents import DocumentRouter, RunStart, TileEvent
from acq.writers.layout import META_KEY, OME_NS, dumps, pixel_stage_m, tile_relpath
from acq.writers.manifest import Manifest, WrittenFile

log = logging.getLogger(__name__)


OME_SCHEMA = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
CREATOR = "gcib-acq"            # fixed: the same document must give the same bytes (crash replays)
PARAMS_NS = "acq/acquisition/v1"                    # namespace of the plain key-value pairs
POSITION_KEY = "stage_position_refers_to"           # declares what Plane PositionX/Y denote ...
POSITION_CONVENTION = "centre of pixel (0, 0)"      # ... for tiles and overviews alike

# What a setup that names no manufacturer/model/detector gets, by SEM driver.
DRIVER_INSTRUMENT = {
    "sim": {"manufacturer": "simulated", "model": "devices/sim SEM", "detector": "SE"},
    "zeiss_smartsem": {"manufacturer": "Carl Zeiss Microscopy"},
}
INSTRUMENT_OPTIONS = ("manufacturer", "model", "serial_number", "detector")
UNKNOWN_DETECTOR = "SEM detector"      # Channel Name when neither setup nor frame names one


@dataclass(frozen=True)
class Instrument:
    """The microscope and the detector that made the (single) channel."""
    manufacturer: Optional[str] = None
    model: Optional[str] = None
    serial_number: Optional[str] = None
    detector: Optional[str] = None           # "SE2", "InLens", ...: the Detector's Model and the Channel's Name

    @classmethod
    def from_setup(cls, setup: Optional[dict], frame_metadata: Optional[dict] = None) -> "Instrument":
        """From the setup (as RunStart carries it): ``devices.sem.options``
        manufacturer / model / serial_number / detector, else the driver's
        defaults; the frame's ``detector`` metadata (the one in use) wins."""
        sem = ((setup or {}).get("devices") or {}).get("sem") or {}
        found = dict(DRIVER_INSTRUMENT.get(sem.get("driver"), {}))
        opts = sem.get("options") or {}
        for k in INSTRUMENT_OPTIONS:
            v = opts.get(k)
            if v is None or v == "":
                continue
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise ValueError(f"devices.sem.options.{k} = {v!r}: allowed a text (or a number)")
            found[k] = str(v)
        det = (frame_metadata or {}).get("detector")
        if isinstance(det, str) and det:
            found["detector"] = det
        return cls(**found)

    @classmethod
    def from_ome_xml(cls, xml: str) -> Optional["Instrument"]:
        """The first Instrument of an OME-XML document (None if it has none)."""
        ins = ET.fromstring(xml).find("{*}Instrument")
        if ins is None:
            return None
        mic, det = ins.find("{*}Microscope"), ins.find("{*}Detector")
        mic = {} if mic is None else mic.attrib
        return cls(mic.get("Manufacturer"), mic.get("Model"), mic.get("SerialNumber"),
                   None if det is None else det.get("Model"))


def utc_iso(t: float) -> str:
    """Epoch seconds as an xsd:dateTime in UTC, to the millisecond."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _value(v: Any) -> Optional[str]:
    """A key-value pair's text: numbers readable by float()/int(), booleans true/false."""
    if v is None or isinstance(v, (dict, list, tuple)):
        return None
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return format(float(v), ".12g") if math.isfinite(v) else None
    return str(v) or None


def _attrs(**kw) -> dict[str, str]:
    return {k: v if isinstance(v, str) else repr(float(v)) if isinstance(v, float) else str(v)
            for k, v in kw.items() if v is not None}


def ome_xml(shape_hw, pixel_size_um: float, *, uuid_: str, name: str = "", description: str = "",
            acquired: Optional[float] = None, instrument: Optional[Instrument] = None,
            position_um: Optional[tuple] = None, key_values: Optional[dict] = None,
            annotation: Optional[dict] = None) -> str:
    """OME-XML of one single-channel uint8 plane, elements in schema order.
    ``key_values`` go to the PARAMS_NS MapAnnotation (None values left out),
    ``annotation`` to the OME_NS one (our JSON)."""
    h, w = (int(n) for n in shape_hw)
    root = ET.Element("OME", {"xmlns": OME_SCHEMA, "xmlns:xsi": "http://www.w3.org/2001/XMLSchema-instance",
                              "xsi:schemaLocation": f"{OME_SCHEMA} {OME_SCHEMA}/ome.xsd",
                              "UUID": f"urn:uuid:{uuid_}", "Creator": CREATOR})
    if instrument is not None:
        ins = ET.SubElement(root, "Instrument", ID="Instrument:0")
        ET.SubElement(ins, "Microscope", _attrs(Manufacturer=instrument.manufacturer, Model=instrument.model,
                                                SerialNumber=instrument.serial_number, Type="Other"))
        ET.SubElement(ins, "Detector", _attrs(Model=instrument.detector, ID="Detector:0", Type="Other"))
    img = ET.SubElement(root, "Image", ID="Image:0", Name=name)
    if acquired is not None:
        ET.SubElement(img, "AcquisitionDate").text = utc_iso(acquired)
    if description:
        ET.SubElement(img, "Description").text = description
    if instrument is not None:
        ET.SubElement(img, "InstrumentRef", ID="Instrument:0")
    px = ET.SubElement(img, "Pixels", _attrs(
        ID="Pixels:0", DimensionOrder="XYCZT", Type="uint8", SizeX=w, SizeY=h, SizeC=1, SizeZ=1, SizeT=1,
        PhysicalSizeX=float(pixel_size_um), PhysicalSizeXUnit="µm",
        PhysicalSizeY=float(pixel_size_um), PhysicalSizeYUnit="µm"))
    channel = (instrument.detector if instrument is not None else None) or UNKNOWN_DETECTOR
    ch = ET.SubElement(px, "Channel", ID="Channel:0:0", Name=channel, SamplesPerPixel="1")
    if instrument is not None:
        ET.SubElement(ch, "DetectorSettings", ID="Detector:0")
    ET.SubElement(px, "TiffData", IFD="0", PlaneCount="1")
    plane = {"TheC": "0", "TheZ": "0", "TheT": "0"}
    if position_um is not None:
        for axis, v in zip("XYZ", position_um):
            if v is not None and math.isfinite(v):
                plane.update({f"Position{axis}": repr(float(v)), f"Position{axis}Unit": "µm"})
    ET.SubElement(px, "Plane", plane)
    maps = []
    if key_values:
        pairs = {k: t for k, v in key_values.items() if (t := _value(v)) is not None}
        maps.append((PARAMS_NS, pairs))
    if annotation:
        maps.append((OME_NS, annotation))
    if maps:
        sa = ET.Element("StructuredAnnotations")
        for i, (ns, pairs) in enumerate(maps):
            ET.SubElement(img, "AnnotationRef", ID=f"Annotation:{i}")
            value = ET.SubElement(ET.SubElement(sa, "MapAnnotation", ID=f"Annotation:{i}", Namespace=ns), "Value")
            for k, v in pairs.items():
                ET.SubElement(value, "M", K=str(k)).text = str(v)
        root.append(sa)
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="unicode")


class TiffEncoder:
    """Single-plane uint8 OME-TIFFs, uncompressed, one strip (EM noise barely
    compresses, and the writer must keep up with the disk).

    ``write(path, image)`` lets tifffile write straight to the (temporary)
    file - numpy hands the pixel buffer to the kernel, no copy in Python - and
    hashes the result as header + the image IN MEMORY + trailer: only the
    ~1 KB around the pixels is read back. ``encode`` gives the same bytes in a
    reused in-memory buffer (for replays and small files).
    """

    def __init__(self):
        self._buf = io.BytesIO()
        self._view: memoryview | None = None

    @staticmethod
    def _metadata(image: np.ndarray, pixel_size_um: float, name: str = "", file_key: str = "", **kw) -> bytes:
        """The OME-XML (UTF-8: TIFF's ASCII type takes the µm as bytes); keywords
        as ome_xml. ``file_key`` seeds the OME UUID (uuid5), so the same
        document always gives the same bytes and a replay after a crash is
        recognised as such."""
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, "acq:" + (file_key or name)))
        return ome_xml(image.shape, pixel_size_um, uuid_=uid, name=name, **kw).encode("utf-8")

    @staticmethod
    def _imwrite(target, image: np.ndarray, pixel_size_um: float, md: bytes) -> None:
        # resolution in pixels per cm too, so that ImageJ/TrakEM2 see the calibration
        px_per_cm = 1e4 / pixel_size_um
        tifffile.imwrite(target, image, ome=False, metadata=None, description=md, photometric="minisblack",
                         rowsperstrip=image.shape[0], resolution=(px_per_cm, px_per_cm),
                         resolutionunit="CENTIMETER")

    def encode(self, image: np.ndarray, pixel_size_um: float, **kw) -> memoryview:
        """The file's bytes; the view is valid until the next call."""
        md = self._metadata(image, pixel_size_um, **kw)
        if self._view is not None:
            self._view.release()            # the buffer cannot be resized while exported
        self._buf.seek(0)
        self._buf.truncate()
        self._imwrite(self._buf, image, pixel_size_um, md)
        self._view = self._buf.getbuffer()
        return self._view

    def write(self, path: Path, image: np.ndarray, pixel_size_um: float, **kw) -> tuple[Future, int]:
        """Write the file at ``path``; return (future sha256 hex, size). The
        hash runs in a helper thread (hashlib releases the GIL) while the
        caller fsyncs and links the file: SHA-256 is as slow as the disk."""
        md = self._metadata(image, pixel_size_um, **kw)
        image = np.ascontiguousarray(image)
        self._imwrite(path, image, pixel_size_um, md)
        with open(path, "rb") as f:
            with tifffile.TiffFile(f) as tf:
                page = tf.pages.first
                offsets, counts = page.dataoffsets, page.databytecounts
            if len(offsets) != 1 or counts[0] != image.nbytes:
                raise RuntimeError(f"{path}: unexpected TIFF layout {offsets} {counts}")
            off = offsets[0]
            flat = image.reshape(-1)
            f.seek(off)
            if f.read(64) != flat[:64].tobytes():          # the pixels are where tifffile said
                raise RuntimeError(f"{path}: pixel data not at offset {off}")
            f.seek(0)
            head = f.read(off)
            f.seek(off + image.nbytes)
            tail = f.read()
        return _HASHER.submit(_sha256_parts, head, flat, tail), len(head) + image.nbytes + len(tail)


def _sha256_parts(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


_HASHER = ThreadPoolExecutor(4, thread_name_prefix="sha256")


def encode_ome_tiff(image: np.ndarray, pixel_size_um: float, **kw) -> bytes:
    """One-off variant returning bytes."""
    return bytes(TiffEncoder().encode(image, pixel_size_um, **kw))


def write_tiff_once(manifest: Manifest, encoder: TiffEncoder, rel: str, image: np.ndarray,
                    pixel_size_um: float, kind: str, tile_id, version, batch: list, **kw) -> WrittenFile:
    """Create ``rel`` atomically (never replacing a file) and queue its manifest line."""
    return manifest.create(
        rel, lambda tmp: encoder.write(tmp, image, pixel_size_um, **kw), kind, tile_id, version, batch,
        expected_sha=lambda: hashlib.sha256(encoder.encode(image, pixel_size_um, **kw)).hexdigest())


def tile_annotation(doc: TileEvent) -> dict:
    return {META_KEY: dumps(doc.header(), separators=(",", ":"))}


# (key, frame-metadata names the drivers use, factor from SI): EHT and probe current
# are only known to the SEM driver (sim: eht_v / probe_current_a, SmartSEM: eht / probe_current)
_SEM_KEYS = (("eht_kv", ("eht_v", "eht"), 1e-3), ("probe_current_na", ("probe_current_a", "probe_current"), 1e9),
             ("magnification", ("magnification",), 1.0), ("electron_dose_per_nm2", ("electron_dose_per_nm2",), 1.0))


def tile_key_values(doc: TileEvent, setup: Optional[dict] = None) -> dict:
    """The acquisition parameters of a tile as flat key-value pairs, the unit
    in the key (the OME MapAnnotation's values are text)."""
    st, md = doc.stage or {}, doc.metadata or {}
    h, w = doc.image.shape
    kv: dict[str, Any] = {
        POSITION_KEY: POSITION_CONVENTION,
        "tile_id": doc.tile_id, "version": doc.version, "run_uid": doc.run_uid,
        "section_id": doc.section_id, "cycle": doc.cycle, "grid_id": doc.grid_id, "row": doc.row, "col": doc.col,
        "overview": doc.overview,
        "acquisition_start_utc": utc_iso(doc.t_start), "acquisition_end_utc": utc_iso(doc.t_end),
        "frame_time_s": doc.t_end - doc.t_start,
        "pixel_size_nm": doc.pixel_size_m * 1e9, "frame_width_px": w, "frame_height_px": h,
        "dwell_time_ns": doc.dwell_s * 1e9,
        "working_distance_mm": doc.wd_m * 1e3,
        "stigmator_x": doc.stig[0], "stigmator_y": doc.stig[1],
        "scan_rotation_deg": doc.rotation_deg,
    }
    for key, names, factor in _SEM_KEYS:
        v = next((md[n] for n in names if isinstance(md.get(n), (int, float)) and not isinstance(md[n], bool)), None)
        kv[key] = None if v is None else float(v) * factor
    for axis in "xyz":
        kv[f"frame_centre_stage_{axis}_um"] = st[axis] * 1e6 if axis in st else None
    kv["stage_rotation_deg"] = math.degrees(st["r"]) if "r" in st else None
    kv["stage_tilt_deg"] = math.degrees(st["t"]) if "t" in st else None
    kv["target_x_um"], kv["target_y_um"] = doc.target_um if doc.target_um is not None else (None, None)
    for k, v in sorted((doc.qc or {}).items()):
        kv[f"qc.{k}"] = v
    if setup:
        kv["setup_name"] = setup.get("name")
        kv["sem_driver"] = ((setup.get("devices") or {}).get("sem") or {}).get("driver")
    return kv


def tile_position_um(doc: TileEvent) -> tuple[float, float, float]:
    """Plane PositionX/Y/Z: the stage position of the centre of pixel (0, 0)
    (POSITION_CONVENTION), from the stage position of the frame centre."""
    st = doc.stage
    x, y = pixel_stage_m((st.get("x", 0.0), st.get("y", 0.0)), doc.pixel_size_m, doc.image.shape,
                         doc.rotation_deg)
    return x * 1e6, y * 1e6, st.get("z", 0.0) * 1e6


class OmeTiffWriter(DocumentRouter):
    file_kind = "tile"           # the manifest kind of its files
    primary = True          # the source of truth: the engine journals a tile once this writer has it

    def __init__(self, out_dir: Path, manifest: Manifest):
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.encoder = TiffEncoder()        # handle() runs in one thread: one buffer is enough
        self.setup: Optional[dict] = None   # from RunStart: the instrument's description

    def on_start(self, doc: RunStart) -> list[WrittenFile]:
        Instrument.from_setup(doc.setup)     # a bad instrument option fails here, before any tile
        self.setup = doc.setup
        return []

    def on_tile(self, doc: TileEvent) -> list[WrittenFile]:
        rel = tile_relpath(doc.section_id, doc.cycle, doc.tile_id, doc.version)
        batch: list[dict] = []
        wf = write_tiff_once(
            self.manifest, self.encoder, rel, doc.image, doc.pixel_size_m * 1e6, self.file_kind, doc.tile_id,
            doc.version, batch, name=f"{doc.tile_id}_v{doc.version}", annotation=tile_annotation(doc),
            file_key=f"{doc.run_uid}/{rel}", position_um=tile_position_um(doc), acquired=doc.t_start,
            instrument=Instrument.from_setup(self.setup, doc.metadata),
            key_values=tile_key_values(doc, self.setup))
        self.manifest.append(batch)
        return [wf]

    def close(self) -> None:
        pass

    def flush(self) -> None:
        pass
