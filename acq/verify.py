"""Check an output folder against its manifest: ``python main.py verify OUTDIR``.

Every file under OUTDIR is compared with the LAST manifest line of its path
(acq/writers/manifest.py: append-only, the last line of a path is current):

  missing    in the manifest, not on disk
  changed    on disk with another size or sha256 than its line says
  extra      a data file on disk without a manifest line (every data file when
             manifest.jsonl is gone). Not data: the journal and its snapshot,
             the manifest, plan.json, fingerprint files, lock and other hidden
             files, the writers' own logs (zarr/NNNN.tiles.jsonl,
             render/push_state.jsonl)
  rewritten  a write-once file recorded with two different hashes
  unreadable manifest lines (a torn last line included)

Leftover temporary files (``.*.part``, ``*.partial``: a crash mid-write,
deleted by the next start) are listed but do not fail the verification:
the data they would have become is either under its real name or not
recorded anywhere.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from acq.writers.manifest import MANIFEST, MUTABLE_KINDS, read_lines, sha256_file, walk_outdir


@dataclass
class VerifyReport:
    out_dir: Path
    manifest_exists: bool = True
    manifest_lines: int = 0
    checked: int = 0                                            # data files compared with their line
    ok_files: int = 0                                           # ... and found as their line says
    missing: list[str] = field(default_factory=list)
    changed: list[tuple[str, str]] = field(default_factory=list)    # (path, what differs)
    extra: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    unreadable_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, excerpt)
    leftover_temporaries: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The same as ``clean``."""
        return self.clean

    @property
    def clean(self) -> bool:
        """Every data file verified, nothing missing, the manifest whole."""
        return not (self.missing or self.changed or self.extra or self.rewritten or self.unreadable_lines)

    def problems(self) -> list[str]:
        """One line per problem (what acq.writers.verify_manifest returns)."""
        out = []
        if not self.manifest_exists and self.extra:
            out.append(f"{MANIFEST} is missing: {len(self.extra)} data files are not listed anywhere")
        out += [f"unreadable manifest line {n}: {text!r}" for n, text in self.unreadable_lines]
        out += [f"{rel}: recorded twice with different content (overwritten?)" for rel in self.rewritten]
        out += [f"{rel}: missing" for rel in self.missing]
        out += [f"{rel}: {why}" for rel, why in self.changed]
        out += [f"{rel}: not in the manifest (extra)" for rel in self.extra]
        return out

    def summary(self) -> str:
        if self.clean:
            return f"verified: {self.ok_files} files OK"
        parts = []
        if not self.manifest_exists:
            parts.append(f"{MANIFEST} missing")
        for n, what in ((len(self.missing), "missing"), (len(self.changed), "changed"),
                        (len(self.extra), "extra"), (len(self.rewritten), "rewritten"),
                        (len(self.unreadable_lines), "unreadable manifest lines")):
            if n:
                parts.append(f"{n} {what}")
        return f"NOT verified: {', '.join(parts)} ({self.ok_files} of {self.checked} files OK)"


def verify_outdir(out_dir: str | Path, *, check_hash: bool = True) -> VerifyReport:
    out_dir = Path(out_dir)
    rep = VerifyReport(out_dir)
    rep.manifest_exists = (out_dir / MANIFEST).is_file()
    ml = read_lines(out_dir)
    rep.manifest_lines = ml.lines
    rep.unreadable_lines = list(ml.corrupt)
    if ml.torn_tail and ml.corrupt and ml.corrupt[-1][0] == ml.last_line:
        n, text = rep.unreadable_lines[-1]
        rep.unreadable_lines[-1] = (n, text + "  [torn last line: cut by the next start]")
    latest: dict[str, dict] = {}
    for e in ml.entries:
        rel = e["path"]
        prev = latest.get(rel)
        if (prev is not None and not prev.get("deleted") and not e.get("deleted")
                and e.get("kind") not in MUTABLE_KINDS and prev.get("sha256") != e.get("sha256")
                and rel not in rep.rewritten):
            rep.rewritten.append(rel)
        latest[rel] = e
    seen: set[str] = set()
    if out_dir.is_dir():
        for rel, what in walk_outdir(out_dir):
            if what == "temporary":
                rep.leftover_temporaries.append(rel)
                continue
            if what != "data":
                continue
            seen.add(rel)
            e = latest.get(rel)
            if e is None or e.get("deleted"):
                rep.extra.append(rel)
                continue
            rep.checked += 1
            p = out_dir / rel
            try:
                size = p.stat().st_size
                if size != e.get("bytes"):
                    rep.changed.append((rel, f"{size} bytes, manifest says {e.get('bytes')}"))
                    continue
                if check_hash and sha256_file(p)[0] != e.get("sha256"):
                    rep.changed.append((rel, "sha256 mismatch"))
                    continue
            except OSError as err:
                rep.changed.append((rel, f"unreadable: {err}"))
                continue
            rep.ok_files += 1
    rep.missing = sorted(rel for rel, e in latest.items() if not e.get("deleted") and rel not in seen)
    return rep


def verify_main(out_dir: str | Path, stream: Optional[TextIO] = None, *, examples: int = 5,
                check_hash: bool = True) -> int:
    """Print a concise report of verify_outdir; 0 only when everything verifies."""
    out = stream or sys.stdout
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        out.write(f"NOT verified: {out_dir} is not a folder\n")
        return 1
    rep = verify_outdir(out_dir, check_hash=check_hash)
    how = "size and sha256" if check_hash else "size only"
    out.write(f"{out_dir}: {rep.checked} data files checked against {MANIFEST} "
              f"({rep.manifest_lines} lines; {how})\n")
    if not rep.manifest_exists:
        out.write(f"  {MANIFEST} is missing: nothing on disk can be verified\n")

    def section(title: str, items: list[str]) -> None:
        if not items:
            return
        out.write(f"  {title}: {len(items)}\n")
        for s in items[:examples]:
            out.write(f"    {s}\n")
        if len(items) > examples:
            out.write(f"    ... and {len(items) - examples} more\n")

    section("missing (in the manifest, not on disk)", rep.missing)
    section("changed (size or sha256 differs from the manifest)", [f"{r}: {why}" for r, why in rep.changed])
    section("extra (data files not in the manifest)", rep.extra)
    section("rewritten (write-once files recorded with two hashes)", rep.rewritten)
    section("unreadable manifest lines", [f"line {n}: {t}" for n, t in rep.unreadable_lines])
    section("leftover temporary files (a crash mid-write; removed by the next start)",
            rep.leftover_temporaries)
    out.write(rep.summary() + "\n")
    out.flush()
    return 0 if rep.clean else 1
