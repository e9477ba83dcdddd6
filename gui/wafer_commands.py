"""Undoable edits of the wafer layout. One command type covers every edit:
it keeps the sections, grids and order before and after, so undo restores
exactly what was there (a deleted section comes back with its grids)."""
from __future__ import annotations

from typing import Iterable, Optional

from PyQt5.QtWidgets import QUndoCommand

from common.geometry import Section
from gui.wafer_model import GridKey, GridSpec, WaferLayout

_MISSING = object()


class ReplaceItems(QUndoCommand):
    def __init__(self, layout: WaferLayout, text: str, sections_after: dict, grids_after: dict,
                 order_after: Optional[list[int]] = None, sections_before: Optional[dict] = None,
                 grids_before: Optional[dict] = None):
        super().__init__(text)
        self.layout = layout
        self.s_after, self.g_after = dict(sections_after), dict(grids_after)
        self.s_before = {k: layout.sections.get(k) for k in self.s_after}
        self.g_before = {k: layout.grids.get(k) for k in self.g_after}
        if sections_before:
            self.s_before.update(sections_before)     # the state before a live drag preview
        if grids_before:
            self.g_before.update(grids_before)
        self.order_before = list(layout.order)
        self.order_after = order_after

    def _apply(self, sections: dict, grids: dict, order: Optional[list[int]]) -> None:
        lay = self.layout
        for k, v in sections.items():
            lay.put_section(k, v)
        for k, v in grids.items():
            lay.put_grid(k, v)
        if order is not None:
            lay.order[:] = [i for i in order if i in lay.sections]
        sel = lay.selection
        if sel and ((sel[0] == "section" and sel[1] not in lay.sections) or
                    (sel[0] == "grid" and sel[1] not in lay.grids)):
            lay.selection = None
        for what, touched in (("sections", sections), ("grids", grids), ("order", True)):
            if touched:
                lay.touch(what)
        lay.changed.emit("selection")

    def redo(self) -> None:
        self._apply(self.s_after, self.g_after, self.order_after)

    def undo(self) -> None:
        self._apply(self.s_before, self.g_before, self.order_before)


def push(layout: WaferLayout, text: str, sections: Optional[dict] = None, grids: Optional[dict] = None,
         order: Optional[list[int]] = None, sections_before: Optional[dict] = None,
         grids_before: Optional[dict] = None) -> bool:
    """Push one edit (applied at once). Refused while the layout is locked
    (a run is using it)."""
    if not layout.editable:
        return False
    layout.undo.push(ReplaceItems(layout, text, sections or {}, grids or {}, order, sections_before,
                                  grids_before))
    return True


# ------------------------------------------------------------ common edits
def set_sections(layout: WaferLayout, items: Iterable[Section], text: str = "set sections") -> bool:
    """Replace all sections (e.g. detection results); their grids go too."""
    items = list(items)
    new_ids = {s.id for s in items}
    sections = {k: None for k in layout.sections if k not in new_ids}
    sections.update({s.id: s for s in items})
    grids = {k: None for k in layout.grids}
    return push(layout, text, sections, grids, order=[s.id for s in items])


def set_layout(layout: WaferLayout, items: Iterable[Section], specs: Iterable[GridSpec], order: list[int],
               text: str) -> bool:
    """Replace all sections, grids and the order in one undo step (e.g. a MagC file)."""
    items = list(items)
    new_ids = {s.id for s in items}
    sections = {k: None for k in layout.sections if k not in new_ids}
    sections.update({s.id: s for s in items})
    grids = {k: None for k in layout.grids}
    grids.update({g.key: g for g in specs})
    return push(layout, text, sections, grids, order=list(order))


def delete_section(layout: WaferLayout, sid: int) -> bool:
    grids = {k: None for k in layout.grids if k[0] == sid}
    return push(layout, f"delete section {sid}", {sid: None}, grids)


def delete_grid(layout: WaferLayout, key: GridKey) -> bool:
    return push(layout, f"delete grid {key[1]} of section {key[0]}", grids={key: None})


def add_section(layout: WaferLayout, center_um, size_um=(500.0, 250.0), angle_deg: float = 0.0) -> int:
    sid = layout.next_section_id()
    push(layout, f"add section {sid}", {sid: Section(sid, tuple(center_um), tuple(size_um), angle_deg)})
    return sid


def add_grid(layout: WaferLayout, spec: GridSpec) -> GridKey:
    push(layout, f"add grid {spec.id} to section {spec.section_id}", grids={spec.key: spec})
    return spec.key


def set_grids(layout: WaferLayout, specs: Iterable[GridSpec], text: str = "create grids") -> bool:
    specs = list(specs)
    grids = {k: None for k in layout.grids}
    grids.update({g.key: g for g in specs})
    return push(layout, text, grids=grids)


def set_order(layout: WaferLayout, order: list[int], text: str = "optimise order") -> bool:
    return push(layout, text, order=order)
