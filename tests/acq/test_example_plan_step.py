"""Worked example (docs/architecture.md): adding a plan step.

A step is (1) an event class (acq/events.py: a frozen dataclass with a
stable ``key`` and a ``kind``), (2) its place in the expansion (acq/expand.py
yields it; here a wrapper around ``expand`` stands in for that edit), and
(3) a handler ``(StepContext, event)`` in the engine's table
(``Engine.add_step``; the built-in ones are in acq/engine.py). A step journals
``step_done`` with its key when it finished, so a resume skips it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from acq.events import Event, SectionEnd
from acq.expand import expand
from acq.journal import read_records
from acq.step_context import StepContext
from tests.support.engine_runs import make_engine


@dataclass(frozen=True)
class ReadProbeCurrent(Event):
    """Read the SEM's probe current after each section (a drift log)."""
    cycle: int
    section: int
    kind: ClassVar[str] = "read_probe_current"

    def describe(self) -> str:
        return f"reading the probe current after section {self.section}"


def with_probe_readings(plan, setup, start_cycle=0, state=None):
    for ev in expand(plan, setup, start_cycle, state):
        yield ev
        if isinstance(ev, SectionEnd):
            yield ReadProbeCurrent(key=f"probe:c{ev.cycle:04d}_s{ev.section:04d}", cycle=ev.cycle,
                                   section=ev.section)


def read_probe_current(ctx: StepContext, ev: ReadProbeCurrent) -> None:
    na = ctx.setup.sem.probe_current() * 1e9
    ctx.journal.append("step_done", key=ev.key, cycle=ev.cycle, probe_current_na=na)


def test_a_new_step_runs_in_order_is_journaled_and_described(tmp_path):
    steps = []
    engine, setup, _docs = make_engine(tmp_path, plan_over={"mill": None, "irradiation": None, "cycles": 2},
                                       expansion=with_probe_readings)
    engine.add_step(ReadProbeCurrent, read_probe_current)
    engine.on_step(lambda ev: isinstance(ev, ReadProbeCurrent) and steps.append(ev.describe()))
    try:
        assert engine.run().status == "success"
    finally:
        setup.close()
    readings = [r for r in read_records(engine.out_dir) if r["rec"] == "step_done"]
    assert len(readings) == 2 * 2                               # 2 sections x 2 cycles
    assert all(abs(r["probe_current_na"] - engine.plan.imaging.probe_current_na) < 0.2 for r in readings)
    assert steps[0].startswith("reading the probe current after section")


def test_a_step_without_a_handler_stops_the_run_with_its_name(tmp_path):
    engine, setup, docs = make_engine(tmp_path, plan_over={"mill": None, "irradiation": None, "cycles": 1},
                                      expansion=with_probe_readings, on_pause="stop")
    try:
        res = engine.run()
        blanked = setup.sem.blanked()
    finally:
        setup.close()
    assert res.status == "failed" and "ReadProbeCurrent" in res.reason and "add_step" in res.reason
    assert blanked                                               # the run ended safe
