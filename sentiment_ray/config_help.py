"""Every config field of a job, for its `--help`: name, type, default and doc, by section.

Generated from the schema in `config.py` (each field's docstring is its description), so
the help a user reads is the code's own documentation and cannot fall behind it:

    print(config_help(JOB_SECTIONS["train"]))

Pure module: pydantic through `config` only.
"""

from __future__ import annotations

import json
import textwrap
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sentiment_ray.config import ExperimentConfig

WIDTH = 100
# Lines break at spaces only: a path, URI or `label-token` stays whole (and searchable).
_WRAP = {"break_on_hyphens": False, "break_long_words": False}
ALL_SECTIONS = tuple(ExperimentConfig.model_fields)
# The sections each job reads; its --help lists exactly these.
JOB_SECTIONS = {
    "train": ("model", "lora", "prompt", "data", "train", "run", "tracking"),
    "label": ("model", "prompt", "data", "label", "run"),
    "tune": ("model", "lora", "prompt", "data", "train", "run", "tracking", "tune"),
    "export": ("model", "prompt"),
}

_HEADER = (
    "config fields (set any as section.field=value after the options; the values below are the "
    "defaults, which a preset may change):"
)
# Field(gt=0) and the like, as pydantic keeps them (annotated_types.Gt(gt=0), ...).
_BOUNDS = {"Gt": ("gt", ">"), "Ge": ("ge", ">="), "Lt": ("lt", "<"), "Le": ("le", "<=")}


def config_help(sections: Sequence[str] = ALL_SECTIONS, width: int = WIDTH) -> str:
    """The fields of `sections` (names of ExperimentConfig's sections), one block each:

    lora.r: int (> 0) = 16
        Rank of the LoRA update matrices: ...
    """
    unknown = [s for s in sections if s not in ExperimentConfig.model_fields]
    if unknown:
        raise ValueError(f"not config sections: {', '.join(unknown)}")
    lines = textwrap.wrap(_HEADER, width, **_WRAP)
    for section in sections:
        info = ExperimentConfig.model_fields[section]
        lines += ["", *textwrap.wrap(f"{section}: {info.description or ''}", width, **_WRAP)]
        lines += _fields(info.annotation, section, width, seen={})
    return "\n".join(lines)


def _fields(model: type[BaseModel], prefix: str, width: int, seen: dict[type, str]) -> list[str]:
    lines: list[str] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}"
        lines += textwrap.wrap(
            f"{path}: {type_text(info)} = {default_text(info)}", width, initial_indent="  ", subsequent_indent="      ", **_WRAP
        )
        lines += textwrap.wrap(
            " ".join((info.description or "").split()), width, initial_indent="      ", subsequent_indent="      ", **_WRAP
        )
        sub = _sub_model(info.annotation)
        if sub is not None:
            if sub in seen:
                lines.append(f"      (its fields as {seen[sub]}.*)")
            else:
                seen[sub] = path
                lines += _fields(sub, path, width, seen)
    return lines


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def type_text(info: FieldInfo) -> str:
    """`int (> 0)`, `{auto,hf}` (the choices), `int (> 0) | {auto} | None`, `list[str]`."""
    return _type_text(info.annotation, info.metadata)


def _type_text(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(annotation)) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a, metadata) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        flat = [m for e in extra for m in (getattr(e, "metadata", None) or [e])]
        return _type_text(base, flat)
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    text = annotation.__name__ if isinstance(annotation, type) and origin is None else str(annotation)
    text = text.replace("typing.", "")
    bounds = [f"{op} {getattr(m, attr)}" for m in metadata for attr, op in [_BOUNDS.get(type(m).__name__, (None, None))] if attr]
    return f"{text} ({', '.join(bounds)})" if bounds else text


def default_text(info: FieldInfo) -> str:
    """The default as it is written in YAML or an override (`null`, `true`, `sdpa`, `""`)."""
    if info.is_required():
        return "(required)"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(see its fields)"
    if isinstance(value, str) and value and value == value.strip() and value.isprintable() and " " not in value:
        return value
    return json.dumps(value, ensure_ascii=False)
