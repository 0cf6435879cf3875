"""The one reader of the configurations users and adapter files bring: ``--additional-config``
sections (:mod:`vllm_plugins.serving.config`), load-test TOML files
(:mod:`vllm_plugins.loadtest.spec`), Ray Serve application args
(:mod:`vllm_plugins.deploy.ray_serve`) and the ``config`` / ``lora`` of adapter manifests
(:mod:`vllm_plugins.adapters.registry`).

Each configuration is a pydantic model over :class:`ConfigModel`, or a frozen dataclass
made by :func:`config_dataclass` (the adapters' configurations stay dataclasses, which
training hashes and manifests record with :func:`dataclasses.asdict`). :func:`read_config`
validates strictly, as JSON: unknown keys, a value of another type (``true`` or ``"12"``
for a number, ``1`` for a flag), NaN and infinities, and values out of a field's range are
errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

T = TypeVar("T")
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")


class ConfigModel(BaseModel):
    model_config = ConfigDict(**STRICT, frozen=True)


def config_dataclass(cls: type[T]) -> type[T]:
    """``cls`` as a frozen dataclass whose constructor validates its fields (a pydantic
    dataclass that refuses unknown keys and non-finite numbers)."""
    return pydantic.dataclasses.dataclass(frozen=True, config=STRICT)(cls)


def read_config(cls: type[T], values: Mapping, source: str) -> T:
    """``cls`` (a :class:`ConfigModel` or a :func:`config_dataclass`) from ``values``, a
    mapping as parsed from JSON, TOML or YAML.

    Raises ValueError naming ``source`` and every bad key with what is wrong with it."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
    try:
        text = json.dumps(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: not a JSON-like value ({err})") from None
    try:
        return TypeAdapter(cls).validate_json(text, strict=True)
    except ValidationError as err:
        raise ValueError(f"{source}: {'; '.join(map(_problem, err.errors()))}") from None


def _problem(error: dict) -> str:
    where = ".".join(map(str, error["loc"]))
    if error["type"] in UNKNOWN_KEY:
        message = "unknown key"
    else:
        message = error["msg"].removeprefix("Value error, ")  # a model's own check says what is wrong itself
    return f"{where}: {message}" if where else message
