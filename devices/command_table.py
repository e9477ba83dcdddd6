"""Command table of a line-based serial ion gun protocol, loaded from YAML.

The table is the only place that knows the gun's wire format: the driver
(devices/iongun_serial.py) formats ``command`` and parses ``reply`` with it,
and the emulator (devices/sim/iongun_emulator.py) speaks the same table, so a
vendor's real protocol needs a new YAML file, not new code.

Values in the table are in the gun's units (kV, nA, ...); ``scale`` turns
them into SI. A bad table fails at load with the key, the value and what is
allowed. The end of this module turns a table around (command parser, reply
synthesis) for the emulator.
"""
from __future__ import annotations

import codecs
import math
import re
import string
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from devices.setup_config import load_yaml_model, validate_config

# Operations the driver uses; every table must define all of them.
REQUIRED_OPERATIONS = (
    "identify", "status", "beam_on", "beam_off", "blank", "unblank", "set_energy", "get_energy",
    "set_cluster_size", "raster_on", "raster_off", "get_current", "last_error",
)
# Setpoint operations: the command takes the setpoint as the field {value}.
SETPOINT_OPERATIONS = ("set_energy", "set_cluster_size")
# Operations whose reply must carry the read value in a group named 'value'.
READ_OPERATIONS = ("get_energy", "get_current")
# Status groups. Energy uses get_energy's scale, both currents get_current's.
STATUS_GROUPS = ("beam", "blank", "interlocks_ok", "energy", "cluster_size", "emission", "target", "raster")
OPTIONAL_STATUS_GROUPS = ("interlocks",)   # per-interlock detail, "name:1,name:0"
# Only these operations carry a quantity, so only they may scale or limit it.
SCALED_OPERATIONS = ("set_energy", "get_energy", "set_cluster_size", "get_current")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def format_fields(fmt: str) -> list[tuple[str, str]]:
    """(field name, format spec) of each replacement field of a format string."""
    out = []
    for _literal, name, spec, _conv in string.Formatter().parse(fmt):
        if name is not None:
            out.append((name, spec or ""))
    return out


class Operation(_Strict):
    command: str = Field(min_length=1, description="Python format string, named fields")
    reply: str = Field(description="regex the whole reply line must match; named groups are parsed")
    error_reply: Optional[str] = Field(None, description="regex of the gun's error answer")
    timeout_s: Optional[float] = Field(None, gt=0, le=600)
    retries: Optional[int] = Field(None, ge=0, le=10)
    limits: Optional[tuple[float, float]] = None     # table units
    scale: float = Field(1.0, gt=0, description="table unit * scale = SI")
    terminator: Optional[str] = Field(None, min_length=1)

    _reply_re: re.Pattern = PrivateAttr()
    _error_re: Optional[re.Pattern] = PrivateAttr(None)

    @field_validator("command")
    @classmethod
    def _format_ok(cls, v: str) -> str:
        try:
            fields = format_fields(v)
        except ValueError as e:
            raise ValueError(f"not a valid Python format string ({e})") from None
        for name, _spec in fields:
            if not name.isidentifier():
                raise ValueError(f"field {{{name}}} must be named (e.g. {{value:.3f}}), "
                                 "positional or indexed fields are not allowed")
        return v

    @field_validator("reply", "error_reply")
    @classmethod
    def _regex_ok(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression ({e})") from None
        return v

    @field_validator("limits")
    @classmethod
    def _limits_ok(cls, v):
        if v is not None:
            if not all(math.isfinite(x) for x in v):
                raise ValueError("limits must be finite numbers")
            if v[0] > v[1]:
                raise ValueError(f"lower bound {v[0]} is above upper bound {v[1]}")
        return v

    def model_post_init(self, _ctx) -> None:
        self._reply_re = re.compile(self.reply)
        self._error_re = re.compile(self.error_reply) if self.error_reply else None

    @property
    def reply_re(self) -> re.Pattern:
        return self._reply_re

    @property
    def error_re(self) -> Optional[re.Pattern]:
        return self._error_re

    def fields(self) -> list[str]:
        return [n for n, _ in format_fields(self.command)]


class CommandTable(_Strict):
    name: str = Field(min_length=1)
    terminator: str = Field("\r\n", min_length=1)
    encoding: str = "ascii"
    timeout_s: float = Field(1.0, gt=0, le=600)
    retries: int = Field(1, ge=0, le=10)
    operations: dict[str, Operation]
    source: Optional[Path] = Field(None, exclude=True)

    @field_validator("encoding")
    @classmethod
    def _encoding_ok(cls, v: str) -> str:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown text encoding {v!r} (e.g. 'ascii', 'latin-1', 'utf-8')") from None
        return v

    @field_validator("operations")
    @classmethod
    def _known_operations(cls, ops: dict) -> dict:
        # an unknown name is almost always a typo of a required one
        unknown = sorted(set(ops) - set(REQUIRED_OPERATIONS))
        if unknown:
            raise ValueError(f"unknown operation(s) {unknown}; allowed {list(REQUIRED_OPERATIONS)}")
        missing = [op for op in REQUIRED_OPERATIONS if op not in ops]
        if missing:
            raise ValueError(f"missing required operation(s) {missing}")
        return ops

    @model_validator(mode="after")
    def _semantics(self):
        problems = []
        for name, op in self.operations.items():
            key = f"operations.{name}"
            fields = op.fields()
            allowed = ["value"] if name in SETPOINT_OPERATIONS else []
            if sorted(set(fields)) != allowed:
                problems.append(f"{key}.command = {op.command!r}: uses field(s) {sorted(set(fields))}, "
                                f"required exactly {allowed}")
            else:
                sample = 1 if name == "set_cluster_size" else 1.0   # cluster sizes are sent as int
                try:
                    op.command.format(value=sample)
                except (ValueError, TypeError) as e:
                    problems.append(f"{key}.command = {op.command!r}: cannot format {sample!r} ({e})")
            groups = set(op.reply_re.groupindex)
            need = {"status": STATUS_GROUPS}.get(name, ("value",) if name in READ_OPERATIONS else ())
            lacking = [g for g in need if g not in groups]
            if lacking:
                problems.append(f"{key}.reply = {op.reply!r}: lacks named group(s) {lacking} "
                                f"(write e.g. (?P<{lacking[0]}>...))")
            if name not in SCALED_OPERATIONS and op.scale != 1.0:
                problems.append(f"{key}.scale = {op.scale!r}: not used by this operation; "
                                f"allowed only on {list(SCALED_OPERATIONS)}")
            if name not in SETPOINT_OPERATIONS and op.limits is not None:
                problems.append(f"{key}.limits = {list(op.limits)!r}: not used by this operation; "
                                f"allowed only on {list(SETPOINT_OPERATIONS)}")
            for k, text in (("command", op.command), ("terminator", op.terminator)):
                try:
                    (text or "").encode(self.encoding)
                except UnicodeEncodeError:
                    problems.append(f"{key}.{k} = {text!r}: not encodable as {self.encoding}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ---- resolved per-operation settings (operation value, else table default)
    def op(self, name: str) -> Operation:
        return self.operations[name]

    def timeout_for(self, name: str) -> float:
        t = self.operations[name].timeout_s
        return self.timeout_s if t is None else t

    def retries_for(self, name: str) -> int:
        r = self.operations[name].retries
        return self.retries if r is None else r

    def terminator_for(self, name: str) -> str:
        return self.operations[name].terminator or self.terminator

    def terminators(self) -> list[str]:
        """Every terminator in use, longest first (so '\\r\\n' wins over '\\n')."""
        ts = {self.terminator} | {op.terminator for op in self.operations.values() if op.terminator}
        return sorted(ts, key=len, reverse=True)


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid command table"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        where = ".".join(loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            model = Operation if len(loc) == 3 and loc[0] == "operations" else CommandTable
            allowed = [f for f in model.model_fields if f != "source"]
            msg = f"unknown key; allowed {allowed}"
        shown = e.get("input")
        value = "" if isinstance(shown, dict) or e["type"] == "missing" else f" = {shown!r}"
        lines.append(f"  {where}{value}: {msg}")
    return "\n".join(lines)


def parse_command_table(data, source: str = "<command table>") -> CommandTable:
    return validate_config(CommandTable, data, source, format_error=_format_error)


def load_command_table(path: str | Path) -> CommandTable:
    path = Path(path)
    table = load_yaml_model(path, CommandTable, what="command table", format_error=_format_error)
    table.source = path
    return table


# ------------------------------------------------- the other direction (emulator)
# The emulator must speak any table, so it builds lines from the table too:
# commands are parsed with a regex made from the format string, and replies
# are produced by inverting the reply regex into a template whose named
# groups are filled with a text form of the value that the group accepts.
_BOOL_PAIRS = (("1", "0"), ("ON", "OFF"), ("TRUE", "FALSE"), ("YES", "NO"), ("on", "off"), ("true", "false"),
               ("Y", "N"), ("OK", "OPEN"))
_ESCAPES = {"s": " ", "t": "\t", "r": "\r", "n": "\n"}


def command_parser(fmt: str) -> tuple[re.Pattern, dict[str, type]]:
    """Regex recognising lines made by ``fmt``, and each field's type."""
    parts, kinds = [], {}
    for literal, name, spec, _conv in string.Formatter().parse(fmt):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(f"(?P<{name}>.+?)")
            kinds[name] = int if spec and spec[-1] in "dn" else float
    return re.compile("".join(parts)), kinds


def _group_end(p: str, i: int) -> int:
    """Index just past the ')' matching the '(' at ``i``."""
    depth, j, in_class = 0, i, False
    while j < len(p):
        c = p[j]
        if c == "\\":
            j += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise ValueError("unbalanced parentheses")


def reply_template(pattern: str) -> tuple[str, dict[str, str]]:
    """Invert a reply regex into a str.format template and {group: sub-pattern}.

    Supported outside named groups: anchors, literal characters, escaped
    punctuation, \\s, \\t and a quantifier after a literal (one copy is emitted).
    """
    p = pattern
    p = p[1:] if p.startswith("^") else p[2:] if p.startswith("\\A") else p
    if p.endswith("$") and not p.endswith("\\$"):
        p = p[:-1]
    elif p.endswith("\\Z") or p.endswith("\\z"):
        p = p[:-2]
    out, groups, i = [], {}, 0
    while i < len(p):
        if p.startswith("(?P<", i):
            close = p.index(">", i)
            end = _group_end(p, i)
            name = p[i + 4:close]
            groups[name] = p[close + 1:end - 1]
            out.append("{" + name + "}")
            i = end
            if i < len(p) and p[i] in "*+?{":
                raise ValueError(f"quantifier after group {name!r}")
            continue
        c = p[i]
        if c == "\\":
            nxt = p[i + 1:i + 2]
            if nxt in _ESCAPES:
                lit = _ESCAPES[nxt]
            elif not nxt or nxt.isalnum():
                raise ValueError(f"escape \\{nxt} outside a named group")
            else:
                lit = nxt
            i += 2
        elif c in ".^$*+?{}[]()|":
            raise ValueError(f"regex syntax {c!r} at {i} outside a named group")
        else:
            lit, i = c, i + 1
        if i < len(p) and p[i] in "*+?":
            i += 2 if p[i + 1:i + 2] == "?" else 1
        out.append(lit.replace("{", "{{").replace("}", "}}"))
    return "".join(out), groups


def _candidates(value) -> list[str]:
    if isinstance(value, bool):
        return [t if value else f for t, f in _BOOL_PAIRS]
    if isinstance(value, dict):   # interlock detail, e.g. "vacuum:1,gas:0"
        return [sep.join(f"{k}{kv}{int(ok)}" for k, ok in value.items()) for sep in (",", ";", " ")
                for kv in (":", "=")]
    if isinstance(value, int):
        return [str(value), f"{value:.1f}", f"{value:e}"]
    if isinstance(value, float):
        return [f"{value:.6g}", *(f"{value:.{n}f}" for n in (3, 2, 1, 4, 5, 6, 0)), f"{value:.6e}", f"{value:.3e}"]
    return [str(value)]


def render(name: str, value, sub_pattern: str) -> str:
    """The first textual form of ``value`` that the group's pattern accepts."""
    rx = re.compile(sub_pattern)
    for c in _candidates(value):
        if rx.fullmatch(c):
            return c
    raise ValueError(f"cannot render {name}={value!r} to match ({sub_pattern})")
