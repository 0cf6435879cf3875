"""The one reader of the configurations users and adapter files bring: ``--additional-config``
sections (:mod:`vllm_plugins.serving.config`), load-test TOML files
(:mod:`vllm_plugins.loadtest.spec`), Ray Serve application args
(:mod:`vllm_plugins.deploy.ray_serve`) and the ``config`` / ``lora`` of adapter manifests
(:mod:`vllm_plugins.adapters.registry`).

Each configuration is a pydantic model over :class:`ConfigModel`, or a frozen dataclass
made by :func:`config_dataclass` (the adapters' configurations stay dataclasses, which
training hashes and manifests record with :func:`dataclasses.asdict`). Either way unknown
keys, wrong types and values out of range are errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

T = TypeVar("T")
FORBID_EXTRA = ConfigDict(extra="forbid")


class ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def config_dataclass(cls: type[T]) -> type[T]:
    """``cls`` as a frozen dataclass whose constructor validates its fields' types and
    refuses unknown keys (a pydantic dataclass)."""
    return pydantic.dataclasses.dataclass(frozen=True, config=FORBID_EXTRA)(cls)


def read_config(cls: type[T], values: Mapping, source: str) -> T:
    """``cls`` (a :class:`ConfigModel` or a :func:`config_dataclass`) from ``values`` (a
    mapping as parsed from JSON, TOML or YAML).

    Raises ValueError naming ``source`` and every bad key with what is wrong with it."""
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as err:
        raise ValueError(f"{source}: {'; '.join(map(_problem, err.errors()))}") from None


def _problem(error: dict) -> str:
    where = ".".join(map(str, error["loc"]))
    message = error["msg"].removeprefix("Value error, ")  # a model's own check says what is wrong itself
    return f"{where}: {message}" if where else message
