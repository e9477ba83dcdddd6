"""SEM: read and set EHT, probe current, working distance, stigmators, scan
(pixel size, dwell, frame size, rotation) and blanking; grab a frame."""
from __future__ import annotations

import math

from PyQt5.QtCore import pyqtSignal
from PyQt5.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QSpinBox, QWidget

from devices.interfaces import ScanParams
from gui.panel_base import DevicePanel
from gui.widgets import spin


class SemPanel(DevicePanel):
    role = "sem"
    title = "SEM"
    frame_ready = pyqtSignal(object, dict)         # image, metadata

    def __init__(self, session, parent=None):
        super().__init__(session, parent)
        self.eht = spin(0, 40, 3, 1.5, "kV")
        self.rb_eht = self.add_row("EHT", self.eht, self.set_eht)
        self.current = spin(0, 1000, 3, 1.8, "nA", 0.1)
        self.rb_current = self.add_row("Probe current", self.current, self.set_current)
        self.wd = spin(0, 60, 4, 5.0, "mm", 0.001)
        self.rb_wd = self.add_row("Working distance", self.wd, self.set_wd)
        self.stig_x = spin(-100, 100, 3, 0.0, "", 0.05)
        self.rb_stig_x = self.add_row("Stig x", self.stig_x, self.set_stig)
        self.stig_y = spin(-100, 100, 3, 0.0, "", 0.05)
        self.rb_stig_y = self.add_row("Stig y", self.stig_y, self.set_stig)
        self.pixel = spin(0.01, 200000, 2, 10.0, "nm", 1.0)
        self.rb_pixel = self.add_row("Pixel size", self.pixel, self.set_pixel)
        self.dwell = spin(1, 1000000, 0, 200, "ns", 50)
        self.rb_dwell = self.add_row("Dwell", self.dwell, self.set_dwell)
        fs = QWidget()
        lay = QHBoxLayout(fs)
        lay.setContentsMargins(0, 0, 0, 0)
        self.fw, self.fh = QSpinBox(), QSpinBox()
        for s, v in ((self.fw, 1024), (self.fh, 768)):
            s.setRange(1, 65536)
            s.setValue(v)
            s.setKeyboardTracking(False)
        lay.addWidget(self.fw)
        lay.addWidget(QLabel("×"))
        lay.addWidget(self.fh)
        self.rb_frame = self.add_row("Frame size", fs, self.set_frame)
        self.setpoint_widgets += [self.fw, self.fh]
        self.rotation = spin(-180, 180, 2, 0.0, "°", 1.0)
        self.rb_rotation = self.add_row("Scan rotation", self.rotation, self.set_rotation)
        self.rb_fov = self.add_row("Field of view", None, None)
        row = QHBoxLayout()
        self.blank = QCheckBox("Beam blanked")
        self.blank.clicked.connect(self.set_blank)
        self.setpoint_widgets.append(self.blank)
        row.addWidget(self.blank)
        row.addWidget(self.button("Grab frame", self.grab, tip="acquire one frame with the current scan"))
        row.addWidget(self.button("Read all", lambda: self.session.poll([self.role]), setpoint=False))
        row.addStretch(1)
        self.body.addLayout(row)
        self._loaded = False

    # ------------------------------------------------------------ setpoints
    def set_eht(self):
        v = self.eht.value() * 1e3
        self.apply(f"EHT {self.eht.value():g} kV", self.dev.set_eht, v,
                   precheck=lambda: self.session.guard.check_eht(v))

    def set_current(self):
        a = self.current.value() * 1e-9
        self.apply(f"probe current {self.current.value():g} nA", self.dev.set_probe_current, a,
                   precheck=lambda: self.session.guard.check_probe_current(a))

    def set_wd(self):
        m = self.wd.value() * 1e-3
        self.apply(f"working distance {self.wd.value():g} mm", self.dev.set_working_distance, m,
                   precheck=lambda: self.session.guard.check_wd(m))

    def set_stig(self):
        x, y = self.stig_x.value(), self.stig_y.value()
        self.apply(f"stigmators ({x:g}, {y:g})", self.dev.set_stig, x, y,
                   precheck=lambda: self.session.guard.check_stig(x, y))

    def set_pixel(self):
        self.apply(f"pixel size {self.pixel.value():g} nm", self.dev.set_scan,
                   ScanParams(pixel_m=self.pixel.value() * 1e-9))

    def set_dwell(self):
        self.apply(f"dwell {self.dwell.value():g} ns", self.dev.set_scan,
                   ScanParams(dwell_s=self.dwell.value() * 1e-9))

    def set_frame(self):
        self.apply(f"frame {self.fw.value()}×{self.fh.value()}", self.dev.set_scan,
                   ScanParams(frame=(self.fw.value(), self.fh.value())))

    def set_rotation(self):
        self.apply(f"scan rotation {self.rotation.value():g}°", self.dev.set_scan,
                   ScanParams(rotation_rad=math.radians(self.rotation.value())))

    def set_blank(self):
        on = self.blank.isChecked()
        self.apply("blank beam" if on else "unblank beam", self.dev.set_blanked, on)

    def grab(self):
        sem = self.dev

        def grab_frame():
            return sem.acquire_frame()
        self.apply("grab frame", grab_frame, on_done=lambda fr: self.frame_ready.emit(fr.image, fr.metadata))

    # ------------------------------------------------------------ read-back
    def show_state(self, v: dict) -> None:
        self.rb_eht.setText(f"{v['eht_v'] / 1e3:.3f} kV")
        self.rb_current.setText(f"{v['probe_current_a'] * 1e9:.3f} nA")
        self.rb_wd.setText(f"{v['wd_m'] * 1e3:.4f} mm")
        self.rb_stig_x.setText(f"{v['stig'][0]:.3f}")
        self.rb_stig_y.setText(f"{v['stig'][1]:.3f}")
        self.rb_pixel.setText(f"{v['pixel_size_m'] * 1e9:.2f} nm")
        self.rb_dwell.setText(f"{v['dwell_s'] * 1e9:.0f} ns")
        w, h = v["frame_size"]
        self.rb_frame.setText(f"{w} × {h}")
        self.rb_rotation.setText(f"{math.degrees(v['scan_rotation_rad']):.2f}°")
        p = v["pixel_size_m"] * 1e6
        self.rb_fov.setText(f"{w * p:.1f} × {h * p:.1f} µm")
        self.blank.setChecked(bool(v["blanked"]))
        if not self._loaded:                       # editors start at the microscope's values
            self._loaded = True
            self.eht.setValue(v["eht_v"] / 1e3)
            self.current.setValue(v["probe_current_a"] * 1e9)
            self.wd.setValue(v["wd_m"] * 1e3)
            self.stig_x.setValue(v["stig"][0])
            self.stig_y.setValue(v["stig"][1])
            self.pixel.setValue(v["pixel_size_m"] * 1e9)
            self.dwell.setValue(v["dwell_s"] * 1e9)
            self.fw.setValue(w)
            self.fh.setValue(h)
            self.rotation.setValue(math.degrees(v["scan_rotation_rad"]))

    def _on_setup(self, setup) -> None:
        self._loaded = False
        super()._on_setup(setup)
