"""Round settings from a TOML file whose tables mirror the stage flags, plus `--set` overrides.

    [generate]            [score]          [learn]              [round]
    dataset = "arith"     workers = 2      objective = "lens"   report_to = "tensorboard"
    num_prompts = 64      timeout = 10     epochs = 1
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path

from schemas import STAGES

from ..errors import ReplayError

SECTIONS = (*STAGES, "round")


def _stage_configs() -> dict[str, type]:
    from stages.generate import GenerateConfig
    from replay.learn.config import LearnConfig
    from stages.round import RoundSettings
    from stages.score import ScoreConfig

    return {"generate": GenerateConfig, "score": ScoreConfig, "learn": LearnConfig, "round": RoundSettings}


def _coerce(where: str, hint, value):
    """TOML values and `--set` strings to the field's type hint; a clear error otherwise."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if optional:
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
    target = typing.get_origin(hint) or hint
    try:
        if target is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if target is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            inner = (typing.get_args(hint) or (str,))[0]
            return tuple(inner(x) for x in items)
        if target in (int, float, str, bool):
            if target is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if target is float and target(value) != target(value):  # TOML's nan: no setting takes it
                raise ValueError(value)
            return target(value)
    except (TypeError, ValueError):
        raise ReplayError(f"{where}: {value!r} is not a valid {getattr(target, '__name__', target)}") from None
    return value


def load_settings(path: str | None, overrides: list[str] = ()) -> dict[str, dict]:
    """{section: {field: value}} from the file then the overrides, validated against the stage configs."""
    configs = _stage_configs()
    fields = {}  # section -> {setting: type hint}
    for section, cls in configs.items():
        hints = typing.get_type_hints(cls)
        fields[section] = {f.name: hints[f.name] for f in dataclasses.fields(cls)
                           if f.name not in ("round", "stage")}
    raw: dict[str, dict] = {s: {} for s in SECTIONS}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ReplayError(f"{path}: no such config file") from None
        except IsADirectoryError:
            raise ReplayError(f"{path}: is a directory; --config takes a TOML file") from None
        except UnicodeDecodeError as exc:
            raise ReplayError(f"{path}: not valid TOML: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise ReplayError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ReplayError(f"{path}: not valid TOML: {exc}") from None
        for section, table in data.items():
            if section not in SECTIONS or not isinstance(table, dict):
                raise ReplayError(f"{path}: unknown table [{section}]; use {', '.join(f'[{s}]' for s in SECTIONS)}")
            raw[section].update({k: (f"{path} [{section}] {k}", v) for k, v in table.items()})
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in SECTIONS:
            raise ReplayError(f"--set {item!r}: use section.key=value with section in {', '.join(SECTIONS)}")
        raw[section][name] = (f"--set {key}", value)
    settings: dict[str, dict] = {s: {} for s in SECTIONS}
    for section, items in raw.items():
        for name, (where, value) in items.items():
            if name not in fields[section]:
                valid = ", ".join(sorted(fields[section]))
                raise ReplayError(f"{where}: unknown setting {name!r} for [{section}]; valid: {valid}")
            settings[section][name] = _coerce(where, fields[section][name], value)
    return settings
