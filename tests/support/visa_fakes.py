"""Fake VISA transport for the SCPI driver tests (33522A AWG, 34465A DMM);
the pyvisa-sim ``sim_lib`` fixture is in conftest.py."""
from __future__ import annotations

from tests.support import ROOT

SIM_YAML = ROOT / "configs" / "visa" / "sim_instruments.yaml"
NO_ERROR = '+0,"No error"'


class FakeScpi:
    """Echoes settings like an SCPI instrument: 'HDR value' makes 'HDR?' answer value.
    ``fixed`` overrides replies; ``errors`` feeds SYST:ERR?; ``fail`` raises on a command."""

    def __init__(self, idn: str):
        self.state = {"*IDN?": idn}
        self.fixed: dict[str, str] = {}
        self.errors: list[str] = []
        self.fail: dict[str, Exception] = {}
        self.log: list[str] = []
        self.timeout = 2000
        self.closed = False

    def _maybe_fail(self, cmd):
        if cmd in self.fail:
            raise self.fail[cmd]

    def _echo_key(self, head: str) -> str:
        """The query that answers what the command ``head`` set."""
        return head + "?"

    def _reply(self, cmd: str) -> str:
        if cmd == "SYST:ERR?":
            return self.errors.pop(0) if self.errors else NO_ERROR
        return self.fixed.get(cmd, self.state.get(cmd, ""))

    def write(self, cmd):
        self._maybe_fail(cmd)
        self.log.append(cmd)
        head, _, arg = cmd.partition(" ")
        self.state[self._echo_key(head)] = arg

    def query(self, cmd):
        self._maybe_fail(cmd)
        self.log.append(cmd)
        return self._reply(cmd)

    def close(self):
        self.closed = True


def install_fake(monkeypatch, res: FakeScpi) -> FakeScpi:
    """Make pyvisa's ResourceManager open ``res``; ``res.opened`` records the
    library, resource name and keyword arguments it was opened with."""
    from devices import awg_33522a
    opened = {}

    class FakeRM:
        def __init__(self, library):
            opened["library"] = library

        def open_resource(self, name, **kwargs):
            opened.update(name=name, **kwargs)
            return res

    # the DMM shares the VISA plumbing (and its pyvisa import) with the AWG module
    monkeypatch.setattr(awg_33522a.pyvisa, "ResourceManager", FakeRM)
    res.opened = opened
    return res


def connect_quietly(drv, fake: FakeScpi):
    """``drv`` connected through ``fake``, whose log then starts empty."""
    drv.connect()
    fake.log.clear()
    return drv
