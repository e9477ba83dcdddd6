"""Ion raster (waveform generator) and the dose chain (SR570 preamp + DMM):
configure the raster, switch its outputs, set the preamp gain, read the
specimen current and integrate it into an electron dose estimate; during a
run, plot the irradiation step's dose over time (its progress incidents)."""
from __future__ import annotations

import time

import pyqtgraph as pg
from PyQt5.QtCore import Qt
from PyQt5.QtWidgets import QCheckBox, QComboBox, QHBoxLayout

from acq.documents import IncidentCause
from devices.errors import LimitViolation
from devices.interfaces import RasterSettings
from gui.panel_base import DevicePanel
from gui.widgets import spin


class RasterPanel(DevicePanel):
    role = "waveform_generator"
    title = "Ion raster (waveform generator)"

    def __init__(self, session, parent=None):
        super().__init__(session, parent)
        self.x_vpp = spin(0, 100, 3, 2.0, "Vpp", 0.1)
        self.y_vpp = spin(0, 100, 3, 2.0, "Vpp", 0.1)
        self.x_hz = spin(0.001, 1e6, 3, 100.0, "Hz", 10)
        self.y_hz = spin(0.001, 1e6, 3, 1.0, "Hz", 0.1)
        self.rb_x = self.add_row("X amplitude", self.x_vpp, None)
        self.rb_y = self.add_row("Y amplitude", self.y_vpp, None)
        self.rb_xf = self.add_row("X frequency", self.x_hz, None)
        self.rb_yf = self.add_row("Y frequency", self.y_hz, None)
        self.rb_size = self.add_row("Raster size", None, None)
        self.rb_out = self.add_row("Outputs", None, None)
        row = QHBoxLayout()
        row.addWidget(self.button("Configure raster", self.configure))
        row.addWidget(self.button("Outputs on", lambda: self.outputs(True)))
        row.addWidget(self.button("Outputs off", lambda: self.outputs(False), setpoint=False))
        row.addStretch(1)
        self.body.addLayout(row)

    def raster(self) -> RasterSettings:
        return RasterSettings(self.x_vpp.value(), self.y_vpp.value(), self.x_hz.value(), self.y_hz.value())

    def _check(self, r: RasterSettings):
        cap = self.session.setup.config.safety.awg_max_vpp
        for axis, v in (("x", r.x_amplitude_vpp), ("y", r.y_amplitude_vpp)):
            if not 0 < v <= cap:
                raise LimitViolation(f"{axis} raster amplitude", v, f"(0, {cap:g}] Vpp (safety.awg_max_vpp)",
                                     device="safety")
        checker = getattr(self.dev, "check_limits", None)
        if checker is not None:                   # the instrument's own window (offset + amplitude)
            checker(r)

    def configure(self):
        r = self.raster()
        self.apply(f"raster {r.x_amplitude_vpp:g} × {r.y_amplitude_vpp:g} Vpp", self.dev.configure_raster, r,
                   precheck=lambda: self._check(r))

    def outputs(self, on: bool):
        self.apply(f"raster outputs {'on' if on else 'off'}", self.dev.set_outputs, on)

    def show_state(self, v: dict) -> None:
        r = v.get("raster")
        self.rb_out.setText("ON" if v.get("outputs_on") else "off")
        if r is None:
            for lab in (self.rb_x, self.rb_y, self.rb_xf, self.rb_yf, self.rb_size):
                lab.setText("not configured")
            return
        self.rb_x.setText(f"{r.x_amplitude_vpp:.3f} Vpp")
        self.rb_y.setText(f"{r.y_amplitude_vpp:.3f} Vpp")
        self.rb_xf.setText(f"{r.x_frequency_hz:g} Hz")
        self.rb_yf.setText(f"{r.y_frequency_hz:g} Hz")
        kx, ky = self.session.setup.config.calibration.ion_raster_mm_per_vpp
        self.rb_size.setText(f"{r.x_amplitude_vpp * kx:.2f} × {r.y_amplitude_vpp * ky:.2f} mm")


class DosePanel(DevicePanel):
    """Preamp gain and DMM reading; the dose integrates the polled current
    (a running estimate for the operator, the irradiation step integrates
    timed DMM blocks itself)."""
    role = "multimeter"
    title = "Specimen current and dose (SR570 + DMM)"

    def __init__(self, session, parent=None):
        super().__init__(session, parent)
        from devices.sr570 import SENSITIVITIES_A_PER_V
        self.sens = QComboBox()
        for s in SENSITIVITIES_A_PER_V:
            self.sens.addItem(f"{s:g} A/V", s)
        self.sens.setCurrentIndex(max(0, self.sens.findData(1e-8)))
        self.rb_sens = self.add_row("Preamp gain", self.sens, self.set_sensitivity)
        self.rb_volts = self.add_row("DMM voltage", None, None)
        self.rb_current = self.add_row("Specimen current", None, None)
        self.area = spin(0.001, 1e8, 1, 100.0, "µm²", 10)
        self.thick = spin(1, 1e5, 0, 250.0, "nm", 10)
        self.add_row("Dose area", self.area, None)
        self.add_row("Section thickness", self.thick, None)
        self.rb_charge = self.add_row("Charge", None, None)
        self.rb_dose = self.add_row("Dose", None, None)
        row = QHBoxLayout()
        self.integrate = QCheckBox("Integrate dose")
        self.integrate.toggled.connect(self._reset_dose)
        row.addWidget(self.integrate)
        row.addWidget(self.button("Reset", self._reset_dose, setpoint=False))
        row.addStretch(1)
        self.body.addLayout(row)
        self.charge_c = 0.0
        self._last_t = None
        self.current_a = None
        session.state.connect(self._preamp_state)
        self._build_plot()

    # ------------------------------------------------------------ dose over time (a run's irradiation)
    def _build_plot(self) -> None:
        self.plot = pg.PlotWidget()
        self.plot.setMinimumHeight(160)
        self.plot.setLabel("bottom", "irradiation time", units="s")
        self.plot.setLabel("left", "dose (10²⁷ eV/cm³)")
        self.plot.showGrid(x=True, y=True, alpha=0.3)
        self.plot.addLegend(offset=(5, 5))
        self.target_line = pg.InfiniteLine(angle=0, movable=False, pen=pg.mkPen("#c62828", style=Qt.DashLine))
        self.target_line.setVisible(False)
        self.plot.addItem(self.target_line)
        self.body.addWidget(self.plot)
        self.curves: dict[int, pg.PlotDataItem] = {}            # section -> its dose curve
        self.points: dict[int, tuple[list[float], list[float]]] = {}

    def follow(self, bridge) -> None:
        """Plot the irradiation progress of the runs this DocBridge carries."""
        bridge.run_started.connect(self.clear_plot)
        bridge.incident.connect(self.on_incident)

    def clear_plot(self, *_) -> None:
        for c in self.curves.values():
            self.plot.removeItem(c)
        self.curves.clear()
        self.points.clear()
        self.target_line.setVisible(False)

    def on_incident(self, doc) -> None:
        ctx = doc.context
        if doc.cause != IncidentCause.IRRADIATION_DOSE or not ctx.get("progress"):
            return
        sec = int(ctx["section"])
        t, d = self.points.setdefault(sec, ([], []))
        if t and ctx["seconds"] < t[-1]:            # the section irradiated again (next cycle): a new curve
            t.clear()
            d.clear()
        t.append(float(ctx["seconds"]))
        d.append(float(ctx["dose_1e27_ev_cm3"]))
        curve = self.curves.get(sec)
        if curve is None:
            color = pg.intColor(len(self.curves), hues=9)
            curve = self.curves[sec] = self.plot.plot([], [], pen=pg.mkPen(color, width=2), symbol="o",
                                                      symbolSize=4, name=f"section {sec} ({ctx['source']})")
        curve.setData(t, d)
        self.target_line.setValue(float(ctx["target_1e27_ev_cm3"]))
        self.target_line.setVisible(True)

    def set_sensitivity(self):
        preamp = self.session.device("current_preamp")
        if preamp is None:
            self.notice.show_notice("no current preamp in this setup", "warning")
            return
        s = self.sens.currentData()
        self.notice.clear_notice()
        self.session.apply("current_preamp", f"preamp gain {s:g} A/V", preamp.set_sensitivity, s)

    def _preamp_state(self, role: str, v: dict) -> None:
        if role == "current_preamp":
            s = v.get("sensitivity")
            self.rb_sens.setText(f"{s:g} A/V" if s else "not set (listen-only: set it)")

    def _on_refused(self, role: str, text: str) -> None:
        if role in (self.role, "current_preamp"):
            self.notice.show_notice(text, "warning")

    def _reset_dose(self, *_):
        self.charge_c, self._last_t = 0.0, None
        self.rb_charge.setText("0 C")
        self.rb_dose.setText("–")

    def show_state(self, v: dict) -> None:
        volts = v["volts"]
        self.rb_volts.setText(f"{volts:.6f} V")
        preamp = self.session.device("current_preamp")
        s = self.session.last.get("current_preamp", {}).get("sensitivity")
        if preamp is None or not s:
            self.current_a = None
            self.rb_current.setText("unknown: set the preamp gain")
            return
        self.current_a = float(preamp.sign * s * volts)
        self.rb_current.setText(f"{self.current_a * 1e9:.4f} nA")
        now = time.monotonic()
        if self.integrate.isChecked():
            if self._last_t is not None:
                self.charge_c += abs(self.current_a) * (now - self._last_t)
            self._last_t = now
            from acq.steps_irradiation import dose_1e27
            eht = self.session.last.get("sem", {}).get("eht_v", 0.0)
            dose = dose_1e27(self.charge_c, eht, self.area.value(), self.thick.value())
            self.rb_charge.setText(f"{self.charge_c:.4g} C")
            self.rb_dose.setText(f"{dose:.4g} ×10²⁷ eV/cm³ at {eht / 1e3:g} kV")
