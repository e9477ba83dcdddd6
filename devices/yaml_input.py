"""Reading YAML input files (setups, plans, command tables) without surprises.

A file is refused, with its path and what is wrong, when it is missing, not
UTF-8 text, too large, not YAML, or uses duplicate keys or alias bombs; its
content is then validated into a pydantic model whose errors name the field,
the value and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, TypeVar

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration or plan file is invalid; the message names the field."""


M = TypeVar("M", bound=BaseModel)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here)"
        shown = e.get("input")
        value = "" if isinstance(shown, dict) else f" = {_short(shown)}"
        lines.append(f"  {loc}{value}: {msg}")
    return "\n".join(lines)


def _short(value, limit: int = 200) -> str:
    """repr of a refused value, cut short: a message must not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# ----------------------------------------- loading (also plans, command tables)
MAX_YAML_BYTES = 16 * 1024 * 1024   # setups, plans and command tables are kilobytes; more is the wrong file
MAX_YAML_DEPTH = 50                 # PyYAML composes recursively: deeper nesting would end in RecursionError
MAX_YAML_VALUES = 2_000_000         # values once aliases are expanded: far above any real plan, far below a bomb


class _Refused(yaml.YAMLError):
    """A YAML construct this program does not accept (message names the line)."""


class StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses what silently changes a file's meaning or costs
    unbounded memory: a duplicate key (PyYAML keeps the last one, so a second
    ``safety:`` block would replace the first), aliases that expand to more
    than MAX_YAML_VALUES values or MAX_YAML_DEPTH levels (a "billion laughs"
    alias bomb), and absurdly deep nesting.

    Aliases as such stay allowed: yaml.safe_dump writes them for any object
    used twice (&id001), and the shipped ion-gun table shares one error regex.
    The expanded size and depth of every node are counted while the file is
    composed (an alias reuses its anchor's counts), so a bomb is refused
    after reading its few lines, before anything is expanded."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._extent: dict[int, tuple[int, int]] = {}    # id(node) -> (expanded values, expanded depth)

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(f"line {line}: nested deeper than {MAX_YAML_DEPTH} levels")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(event, yaml.AliasEvent):
            return node                           # counted where its anchor was composed
        if isinstance(node, yaml.ScalarNode):
            children = []
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = [n for pair in node.value for n in pair]
        extents = [self._extent.get(id(c), (1, 1)) for c in children]
        values = 1 + sum(v for v, _ in extents)
        depth = 1 + max((d for _, d in extents), default=0)
        if values > MAX_YAML_VALUES:
            raise _Refused(f"line {line}: this entry expands to more than {MAX_YAML_VALUES} values "
                           "(aliases *name repeating &name blocks?): not allowed")
        if depth > MAX_YAML_DEPTH:
            raise _Refused(f"line {line}: aliases nest this entry deeper than {MAX_YAML_DEPTH} levels: not allowed")
        self._extent[id(node)] = (values, depth)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _Refused(f"line {line}: duplicate key {_short(key, 80)} (first at line "
                                       f"{seen[key]}): each key may appear only once")
                    seen[key] = line
                except TypeError:            # unhashable key: the base class reports it
                    continue
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, what: str = "configuration file"):
    """The parsed contents of a YAML file; ConfigError if it is missing, not
    text, not YAML, too large, or uses duplicate keys or anchors/aliases."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a {what}")
    if not path.is_file():
        raise ConfigError(f"{path}: {what} does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {what} is larger than {MAX_YAML_BYTES // 2 ** 20} MiB: not a YAML "
                          f"{what} (wrong file?)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text YAML file (byte {e.start} is not UTF-8 text; binary or "
                          f"wrong file?)") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a text YAML file (contains NUL bytes; binary or wrong file?)")
    try:
        return yaml.load(text, Loader=StrictSafeLoader)
    except _Refused as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except (ValueError, OverflowError, RecursionError) as e:   # e.g. an integer of more digits than Python takes
        raise ConfigError(f"{path}: not valid YAML: {type(e).__name__}: {str(e)[:200]}") from None


def validate_config(model_cls: type[M], data, source: str, *, context: Optional[dict] = None,
                    format_error: Callable[[ValidationError, str], str] = format_validation_error) -> M:
    """``model_cls`` validated from ``data``, which must be a mapping; ConfigError
    (text from ``format_error``) naming field, value and what is allowed."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data, context=context)
    except ValidationError as e:
        raise ConfigError(format_error(e, source)) from None


def load_yaml_model(path: str | Path, model_cls: type[M], *, what: str = "configuration file",
                    context: Optional[dict] = None,
                    format_error: Callable[[ValidationError, str], str] = format_validation_error) -> M:
    """read_yaml then validate_config, with the file's path as the source in messages."""
    path = Path(path)
    return validate_config(model_cls, read_yaml(path, what), str(path), context=context, format_error=format_error)
