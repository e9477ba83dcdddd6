"""Ion gun: state, currents, interlocks; beam on/off, blank/unblank, energy,
cluster size, raster. Unblanking is refused here unless the stage is at the
mill position (the ion beam must never reach an imaging position)."""
from __future__ import annotations

from PyQt5.QtWidgets import QHBoxLayout, QLabel, QSpinBox

from devices.errors import InterlockError, LimitViolation
from gui.panel_base import DevicePanel
from gui.widgets import Led, spin


class IonGunPanel(DevicePanel):
    role = "ion_gun"
    title = "Ion gun (GCIB)"

    def __init__(self, session, parent=None):
        super().__init__(session, parent)
        self.rb_beam = self.add_row("Beam", None, None)
        self.rb_blank = self.add_row("Blanking", None, None)
        self.rb_emission = self.add_row("Emission current", None, None)
        self.rb_target = self.add_row("Target current", None, None)
        self.rb_raster = self.add_row("Gun raster", None, None)
        self.energy = spin(0, 100, 3, 2.5, "kV", 0.5)
        self.rb_energy = self.add_row("Energy", self.energy, self.set_energy)
        self.cluster = QSpinBox()
        self.cluster.setRange(0, 100000)
        self.cluster.setValue(1000)
        self.cluster.setKeyboardTracking(False)
        self.rb_cluster = self.add_row("Cluster size", self.cluster, self.set_cluster)
        self.rb_error = self.add_row("Last error", None, None)
        self.interlock_row = QHBoxLayout()
        self.interlock_row.addWidget(QLabel("Interlocks:"))
        self.interlock_leds: dict[str, tuple[Led, QLabel]] = {}
        self.interlock_row.addStretch(1)
        self.body.addLayout(self.interlock_row)
        row = QHBoxLayout()
        row.addWidget(self.button("Beam on", lambda: self.set_beam(True)))
        row.addWidget(self.button("Beam off", lambda: self.set_beam(False), setpoint=False))
        row.addWidget(self.button("Unblank", lambda: self.set_blank(False)))
        row.addWidget(self.button("Blank", lambda: self.set_blank(True), setpoint=False,
                                  tip="always available: blanking makes the setup safer"))
        self.body.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(self.button("Raster on", lambda: self.set_raster(True)))
        row.addWidget(self.button("Raster off", lambda: self.set_raster(False)))
        row.addStretch(1)
        self.body.addLayout(row)
        self._loaded = False

    # ------------------------------------------------------------ prechecks
    def _safety(self):
        return self.session.setup.config.safety

    def _check_energy(self, volts: float):
        lo, hi = self._safety().ion_energy_kv
        if not lo * 1e3 <= volts <= hi * 1e3:
            raise LimitViolation("ion energy", volts / 1e3, f"[{lo:g}, {hi:g}] kV (safety.ion_energy_kv)",
                                 device="safety")

    def _check_cluster(self, n: int):
        lo, hi = self._safety().ion_cluster_size
        if not lo <= n <= hi:
            raise LimitViolation("cluster size", n, f"[{lo:g}, {hi:g}] (safety.ion_cluster_size)",
                                 device="safety")

    def _check_at_mill_position(self):
        pos = self.session.last.get("stage", {}).get("position")
        if pos is None or not self.session.guard.near_mill_position(pos):
            mp = self._safety().mill_position
            raise InterlockError(f"unblank refused: the stage is not within {mp.imaging_exclusion_mm:g} mm of the "
                                 f"mill position ({mp.x_mm:g}, {mp.y_mm:g}) mm", device="ion_gun")

    # ------------------------------------------------------------ commands
    def set_energy(self):
        v = self.energy.value() * 1e3
        self.apply(f"ion energy {self.energy.value():g} kV", self.dev.set_energy, v,
                   precheck=lambda: self._check_energy(v))

    def set_cluster(self):
        n = self.cluster.value()
        self.apply(f"cluster size {n}", self.dev.set_cluster_size, n, precheck=lambda: self._check_cluster(n))

    def set_beam(self, on: bool):
        self.apply("ion beam on" if on else "ion beam off", self.dev.set_beam, on)

    def set_blank(self, blanked: bool):
        self.apply("blank ion beam" if blanked else "unblank ion beam", self.dev.set_blanked, blanked,
                   precheck=None if blanked else self._check_at_mill_position)

    def set_raster(self, on: bool):
        self.apply(f"gun raster {'on' if on else 'off'}", self.dev.set_raster, on)

    # ------------------------------------------------------------ read-back
    def show_state(self, v: dict) -> None:
        st = v["status"]
        self.rb_beam.setText("ON" if st.beam_on else "off")
        self.rb_beam.setStyleSheet("color: #b00020; font-weight: bold;" if st.beam_on else "")
        self.rb_blank.setText("blanked" if st.blanked else "UNBLANKED")
        self.rb_blank.setStyleSheet("" if st.blanked else "color: #b00020; font-weight: bold;")
        self.rb_emission.setText(f"{st.emission_current * 1e9:.3f} nA")
        self.rb_target.setText(f"{st.target_current * 1e9:.3f} nA")
        self.rb_raster.setText("on" if st.raster_on else "off")
        self.rb_energy.setText(f"{st.energy / 1e3:.3f} kV")
        self.rb_cluster.setText(str(st.cluster_size))
        self.rb_error.setText(st.error or "none")
        for name, ok in st.interlocks.items():
            if name not in self.interlock_leds:
                led, lab = Led(), QLabel(name)
                self.interlock_leds[name] = (led, lab)
                self.interlock_row.insertWidget(self.interlock_row.count() - 1, led)
                self.interlock_row.insertWidget(self.interlock_row.count() - 1, lab)
            self.interlock_leds[name][0].set_state(bool(ok))
        if not self._loaded:
            self._loaded = True
            self.energy.setValue(st.energy / 1e3)
            self.cluster.setValue(int(st.cluster_size))

    def _on_setup(self, setup) -> None:
        self._loaded = False
        super()._on_setup(setup)
