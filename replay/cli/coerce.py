"""Plain CLI values coerced without pydantic, for a fast start-up.

Typer 0.29 coerces every CLI value through a pydantic TypeAdapter; importing pydantic and building
the adapters is about 0.1 s, a third of the 0.3 s budget of `replay sql`. Parameters annotated
str, int, float or bool, or a list of one of those, with no parser or bounds,
are coerced here with pydantic's rules and messages (`--limit x`: "Input should be a valid
integer, ..."); every other parameter is left to Typer. `install()` hooks Typer's
`build_runtime_param`; if a Typer release moves it, nothing is hooked and Typer does it all.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

PLAIN = (str, int, float, bool)
ERRORS = {int: "Input should be a valid integer, unable to parse string as an integer",
          float: "Input should be a valid number, unable to parse string as a number",
          bool: "Input should be a valid boolean, unable to interpret input"}
TRUE, FALSE = {"1", "on", "t", "true", "y", "yes"}, {"", "0", "off", "f", "false", "n", "no"}


def coerce(annotation: type, value):
    """`value` as `annotation` (str, int, float or bool), or ValueError with pydantic's message."""
    if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    if annotation is str:
        return value.decode() if isinstance(value, bytes) else str(value)
    text = str(value).strip()
    if annotation is bool and text.lower() in TRUE | FALSE:
        return text.lower() in TRUE
    if annotation in (int, float) and text.isascii():  # int() would take other scripts' digits
        try:
            if annotation is float:
                return float(text)
            whole, dot, fraction = text.partition(".")  # pydantic takes "3.0" as 3, not "3.5"
            if not dot or set(fraction) <= {"0"}:
                return int(whole)
        except ValueError:
            pass
    raise ValueError(ERRORS[annotation])


def plain_type(annotation) -> type | None:
    """The leaf type of a plain annotation (str, int, float, bool or list of one), else None."""
    if annotation in PLAIN:
        return annotation
    if typing.get_origin(annotation) is list and len(typing.get_args(annotation)) == 1:
        (item,) = typing.get_args(annotation)
        return item if item in PLAIN else None
    return None


def install() -> bool:
    """Route plain parameters past pydantic; False (and Typer unchanged) if its internals differ."""
    try:
        from typer import _coercion, core
        from typer._click.exceptions import BadParameter

        original, base = core.build_runtime_param, _coercion.RuntimeParam
    except (ImportError, AttributeError):
        return False
    if getattr(original, "replay_plain", False):
        return True

    @dataclass(frozen=True)
    class PlainRuntimeParam(base):
        def _coerce_value(self, value, param, ctx):
            leaf = plain_type(self.annotation)
            try:
                if leaf is self.annotation:
                    return coerce(leaf, value)
                return [coerce(leaf, item) for item in (value if isinstance(value, (list, tuple)) else [value])]
            except ValueError as exc:
                raise BadParameter(str(exc), ctx=ctx, param=param) from None

    def build_runtime_param(descriptor):
        info = descriptor.parameter_info
        if (plain_type(descriptor.annotation) and descriptor.file_annotation is None and info.parser is None
                and info.min is None and info.max is None and not getattr(info, "click_type", None)):
            return PlainRuntimeParam(parameter_info=info, annotation=descriptor.annotation)
        return original(descriptor)

    build_runtime_param.replay_plain = True
    core.build_runtime_param = build_runtime_param
    return True
