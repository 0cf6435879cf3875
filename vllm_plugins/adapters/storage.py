"""Self-describing adapter directories: write, verify, load.

A directory holds ``adapter_manifest.json`` and safetensors weights::

    {
      "format": "vllm-plugins-adapter/1",
      "method": "para",                       # one of adapters.registry.METHODS
      "config": {...},                        # the method's hyper-parameters
      "lora": {...},                          # LoRA family only: the PEFT LoRA layout
      "base_model": {"architecture": "LlamaForCausalLM", "fingerprint": "sha256:...",
                     "path": "..."},
      "weights": {"file": "adapter.safetensors", "sha256": "..."},
      "task": "reverse", "metrics": {...}
    }

Prompt-aware methods store their generator weights in ``adapter.safetensors``; the LoRA
family (lora, fanlora, alora) stores PEFT's own ``adapter_config.json`` and
``adapter_model.safetensors``, so vLLM's stock LoRA loads them as they are.

Loading refuses, with an :class:`AdapterError` that says why: a directory without a
manifest, a missing weights file, weights whose checksum or format is wrong, an unknown
method, a base model other than the one the adapter was trained on, and tensors whose
names or shapes do not fit the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vllm_plugins.adapters.common.model_parts import Dims, dims
from vllm_plugins.adapters.common.prompt_aware import PromptAwareModel
from vllm_plugins.adapters.registry import METHODS, Method

FORMAT = "vllm-plugins-adapter/1"
MANIFEST = "adapter_manifest.json"
PROMPT_AWARE_WEIGHTS = "adapter.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
MAX_MANIFEST_BYTES = 1 << 20
SAFETENSORS_OVERHEAD = 1 << 20  # header and alignment allowed beside the tensors' bytes


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded; the message says why."""


def fingerprint_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


def base_fingerprint(model: nn.Module) -> str:
    """Fingerprint of a loaded transformers model's weights."""
    return fingerprint_tensors(model.state_dict())


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of a saved model's safetensors files: equal to :func:`base_fingerprint`
    of the model loaded from them, without loading it (what a server checks against)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise AdapterError(f"{model_dir} holds no safetensors weights to fingerprint")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return fingerprint_tensors(tensors)


def describe_base(model: nn.Module, path: str | Path) -> dict:
    """What a manifest records of the base model; call it before any adapter wraps it."""
    return {"architecture": type(model).__name__, "fingerprint": base_fingerprint(model), "path": str(path)}


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, hex, read in chunks."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_adapter(
    out: Path,
    method: str,
    config: Any,
    lm: nn.Module,
    base_model: dict,
    *,
    lora_settings: Any = None,
    task: str | None = None,
    metrics: dict | None = None,
) -> Path:
    """Write ``lm``'s adapter weights and manifest into ``out``; return ``out``.

    ``base_model`` is :func:`describe_base` of the base model, taken before adapting it.
    """
    spec = METHODS[method]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if spec.family == "prompt-aware":
        weights = out / PROMPT_AWARE_WEIGHTS
        save_file({k: v.contiguous() for k, v in lm.adapter_state_dict().items()}, str(weights))
    else:
        lm.model.save_pretrained(out)
        weights = out / PEFT_WEIGHTS
    manifest = {
        "format": FORMAT,
        "method": method,
        "config": dataclasses.asdict(config),
        "base_model": base_model,
        "weights": {"file": weights.name, "sha256": file_sha256(weights)},
        "task": task,
        "metrics": metrics or {},
    }
    if lora_settings is not None:
        manifest["lora"] = dataclasses.asdict(lora_settings)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def file_inside(adapter_dir: Path, name: str) -> Path:
    """``adapter_dir / name``, refused unless it resolves (symbolic links followed) to a
    path inside ``adapter_dir``; the error is the same whether that path exists or not."""
    root = adapter_dir.resolve()
    path = (root / name).resolve()
    if path == root or not path.is_relative_to(root):
        raise AdapterError(f"{adapter_dir}: {name!r} is not a file inside the adapter directory")
    return path


def read_manifest(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    path = file_inside(adapter_dir, MANIFEST)
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} is not an adapter directory: {MANIFEST} is missing")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise AdapterError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise AdapterError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AdapterError(f"{path}: unsupported format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r}")
    method = manifest.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise AdapterError(f"{path}: unknown method {method!r}; known methods: {', '.join(METHODS)}")
    return manifest


def _read_weights(adapter_dir: Path, manifest: dict, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The manifest's weights file, checked before it is read: inside ``adapter_dir``, at
    most ``max_bytes`` long, with the manifest's SHA-256."""
    info = manifest.get("weights")
    if not isinstance(info, dict) or not isinstance(info.get("file"), str) or not info["file"]:
        raise AdapterError(f"{adapter_dir}: the manifest names no weights file")
    path = file_inside(adapter_dir, info["file"])
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: weights file {info['file']!r} is missing")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise AdapterError(f"{path}: {path.stat().st_size} bytes, more than the {max_bytes} this adapter's tensors take")
    if file_sha256(path) != info.get("sha256"):
        raise AdapterError(f"{path}: corrupt weights (checksum does not match the manifest)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{path}: corrupt weights ({err})") from None


def _check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"{where}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in expected.items():
        if tuple(found[name].shape) != tuple(tensor.shape):
            raise AdapterError(
                f"{where}: tensor {name} has shape {tuple(found[name].shape)}, the model expects {tuple(tensor.shape)}"
            )
        if found[name].is_floating_point() and not torch.isfinite(found[name]).all():
            raise AdapterError(f"{where}: tensor {name} holds NaN or infinite values")


def check_base(manifest: dict, actual: str, where: Path) -> None:
    """Refuse an adapter trained on a base model other than the one fingerprinted ``actual``."""
    base = manifest.get("base_model")
    trained_on = base.get("fingerprint") if isinstance(base, dict) else None
    if trained_on != actual:
        raise AdapterError(
            f"{where}: adapter was trained on another base model "
            f"(fingerprint {trained_on}, this base model has {actual})"
        )


def load_prompt_aware_layers(
    adapter_dir: str | Path, d: Dims, fingerprint: str, check: Callable[[str, Any], None] | None = None,
) -> tuple[nn.ModuleList, dict]:
    """The per-layer adapter modules of a prompt-aware adapter, checked and loaded.

    Needs no base model object: a server passes its model's dimensions and
    :func:`checkpoint_fingerprint`. ``check(method, config)`` (a server's limits, raising
    AdapterError) sees the manifest's configuration before any module is built; the
    weights file may then be no larger than the modules' tensors in float32. Raises
    :class:`AdapterError`.
    """
    adapter_dir = Path(adapter_dir)
    manifest = read_manifest(adapter_dir)
    spec: Method = METHODS[manifest["method"]]
    if spec.family != "prompt-aware":
        raise AdapterError(f"{adapter_dir}: {spec.name} is a LoRA adapter, not a prompt-aware one")
    check_base(manifest, fingerprint, adapter_dir)
    try:
        config = spec.config_from_dict(manifest["config"])
        if check is not None:
            check(spec.name, config)
        layers = nn.ModuleList(spec.layers(d, config))
    except AdapterError:
        raise  # the server's limits, already said
    except (TypeError, KeyError, ValueError, AttributeError, RuntimeError, ArithmeticError) as err:
        raise AdapterError(f"{adapter_dir}: invalid adapter config ({err})") from None
    tensor_bytes = sum(4 * t.numel() for t in layers.state_dict().values())
    weights = _read_weights(adapter_dir, manifest, tensor_bytes + SAFETENSORS_OVERHEAD)
    prefix = "adapter_layers."
    if not all(k.startswith(prefix) for k in weights):
        raise AdapterError(f"{adapter_dir}: weights do not fit the model (names outside {prefix!r})")
    weights = {k.removeprefix(prefix): v for k, v in weights.items()}
    _check_state(layers.state_dict(), weights, adapter_dir)
    layers.load_state_dict(weights)
    return layers.eval(), manifest


def load_adapter(adapter_dir: str | Path, base: nn.Module) -> tuple[nn.Module, dict]:
    """Build the adapted model over ``base`` from ``adapter_dir``; returns (lm, manifest)."""
    adapter_dir = Path(adapter_dir)
    manifest = read_manifest(adapter_dir)
    spec: Method = METHODS[manifest["method"]]
    fingerprint = base_fingerprint(base)
    if spec.family == "prompt-aware":
        layers, manifest = load_prompt_aware_layers(adapter_dir, dims(base.config), fingerprint)
        return PromptAwareModel(base, list(layers)).eval(), manifest
    check_base(manifest, fingerprint, adapter_dir)
    weights = _read_weights(adapter_dir, manifest)
    try:
        lm = spec.build(base, spec.lora_settings_from_dict(manifest.get("lora") or {}))
    except (TypeError, KeyError, ValueError) as err:
        raise AdapterError(f"{adapter_dir}: invalid adapter config ({err})") from None
    _check_state(get_peft_model_state_dict(lm.model), weights, adapter_dir)
    set_peft_model_state_dict(lm.model, weights)
    return lm.eval(), manifest
