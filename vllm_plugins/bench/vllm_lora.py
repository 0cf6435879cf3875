"""vLLM's own LoRA Triton kernels (shrink and expand), runnable where vLLM is not installed.

The GPU benchmark times the stock-LoRA kernels of one Llama decoder layer's decode step
on a machine that has torch and Triton but no vLLM. Two parts:

* :func:`carry_vllm_lora_ops` copies the Triton sources of ``vllm/lora/ops/triton_ops``
  (shrink, expand, their shared kernel code, the kernel metadata and the config utils)
  out of the locally installed vLLM 0.32.0, without importing vLLM, into an ignored
  folder (default ``.vllm_lora_ops/``), and writes the few small ``vllm.*`` shim modules
  those files import. Put that folder on ``PYTHONPATH`` on the GPU machine. The copied
  files are used unchanged; the folder is for timing only and is never committed.
* :class:`VllmLoraLayer` holds one decoder layer's stock-LoRA weights for a bank of
  adapter slots, laid out exactly as vLLM's LoRA layers hold them, and launches for one
  decode step exactly the shrink and expand kernels that
  ``PunicaWrapperGPU.add_lora_linear`` launches for qkv_proj, o_proj, gate_up_proj and
  down_proj, with no allocation inside :meth:`VllmLoraLayer.run`, so that it can be
  captured in a CUDA graph. :meth:`VllmLoraLayer.reference` computes the same deltas in
  plain torch.

This module imports neither vLLM nor the carried copy at import time.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from vllm_plugins.vllm_version import SUPPORTED_VLLM, installed_vllm_version

DEFAULT_DEST = Path(".vllm_lora_ops")

# The files of vllm/lora/ops/triton_ops the non-MoE shrink/expand path needs. utils.py
# reads tuned kernel configs only from $VLLM_TUNED_CONFIG_FOLDER (a user folder, None by
# default), never from the package directory, so no data file comes along.
CARRIED_FILES = (
    "kernel_utils.py",
    "lora_shrink_op.py",
    "lora_expand_op.py",
    "lora_kernel_metadata.py",
    "utils.py",
)
_OPS_PKG = ("lora", "ops", "triton_ops")
_MARKER = "_CARRIED_FOR_TIMING"

# vLLM's own packages kept empty: vLLM's vllm/lora/ops/triton_ops/__init__.py imports the
# fused-MoE LoRA ops, which need much more of vLLM.
_EMPTY_PACKAGES = ("lora", "lora/ops", "lora/ops/triton_ops", "utils")

_SHIM_HEADER = '"""Shim for the carried vLLM LoRA Triton kernels (timing only; NOT vLLM)."""\n'

_SHIMS: dict[str, str] = {
    "__init__.py": _SHIM_HEADER + (
        "\n"
        "__version__ = {version!r}  # the vLLM release the carried sources come from\n"
        f"{_MARKER} = True\n"
    ),
    # The values stock vLLM runs with by default (not read from the environment, so a
    # stray variable on the timing machine cannot change which code path is timed):
    # no batch invariance, no dual stream (so no PDL either), no tuned configs.
    "envs.py": _SHIM_HEADER + (
        "\n"
        "VLLM_BATCH_INVARIANT = False\n"
        "VLLM_LORA_ENABLE_DUAL_STREAM = False\n"
        "VLLM_TUNED_CONFIG_FOLDER = None\n"
        "VLLM_LORA_DISABLE_PDL = True\n"
    ),
    "logger.py": _SHIM_HEADER + '''
import logging


def init_logger(name: str) -> logging.Logger:
    """A standard logger plus vLLM's ``info_once``/``warning_once``."""
    logger = logging.getLogger(name)
    seen: set = set()

    def _once(level):
        def log_once(msg, *args, **kwargs):
            key = (level, msg, args)
            if key not in seen:
                seen.add(key)
                logger.log(level, msg, *args)

        return log_once

    logger.info_once = _once(logging.INFO)
    logger.warning_once = _once(logging.WARNING)
    return logger
''',
    "platforms/__init__.py": _SHIM_HEADER + '''
import torch


class _Platform:
    """The two questions the LoRA kernels ask of vLLM's current_platform."""

    def is_cuda(self) -> bool:
        return torch.version.cuda is not None and torch.cuda.is_available()

    def has_device_capability(self, capability, device_id: int = 0) -> bool:
        if not self.is_cuda():
            return False
        major, minor = torch.cuda.get_device_capability(device_id)
        if isinstance(capability, tuple):
            return (major, minor) >= tuple(capability)
        return major * 10 + minor >= capability


current_platform = _Platform()
''',
    "utils/math_utils.py": _SHIM_HEADER + '''

def next_power_of_2(n: int) -> int:
    """The next power of 2 (inclusive)."""
    return 1 if n < 1 else 1 << (n - 1).bit_length()


def round_up(x: int, y: int) -> int:
    return ((x + y - 1) // y) * y
''',
    "utils/torch_utils.py": _SHIM_HEADER + '''
import torch


def _pin() -> bool:
    return torch.cuda.is_available()


def async_tensor_h2d(data, device=None, dtype=None, out=None):
    """Copy a list/tensor from host to device without blocking (as vLLM does)."""
    if dtype is None and out is not None:
        dtype = out.dtype
    if isinstance(data, torch.Tensor):
        t = data
        if _pin() and not t.is_pinned():
            t = torch.empty(t.shape, dtype=dtype or t.dtype, device="cpu", pin_memory=True).copy_(t)
    else:
        t = torch.tensor(data, dtype=dtype, pin_memory=_pin(), device="cpu")
    if out is not None:
        return out.copy_(t, non_blocking=True)
    assert device is not None, "must provide destination tensor or device"
    return t.to(device=device, dtype=dtype, non_blocking=True)


def direct_register_custom_op(op_name, op_func, mutates_args=None, fake_impl=None,
                              target_lib=None, dispatch_key=None, tags=()):
    """Registers nothing: torch.ops.vllm.<op> then raises AttributeError and the carried
    files fall back to calling the plain python launcher (their own try/except)."""
    return None
''',
    "triton_utils/__init__.py": _SHIM_HEADER + '''
import triton
import triton.language as tl

HAS_TRITON = True

__all__ = ["HAS_TRITON", "triton", "tl"]
''',
}

_README = """\
This folder is copied from vLLM {version} ({source}) by
`vllm-plugins bench carry-vllm-lora-ops` (vllm_plugins/bench/vllm_lora.py).

vllm/lora/ops/triton_ops/{{{files}}}
are vLLM's files, unchanged (Apache-2.0, copyright contributors to the vLLM project).
Every other file under vllm/ is a small shim written for them: it is NOT vLLM.

It exists for timing only: it lets a GPU machine with torch and Triton but no vLLM run
vLLM's LoRA shrink/expand kernels (PYTHONPATH={dest}). Never commit it.
"""


def _installed_vllm_dir() -> Path:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("vLLM is not installed here; carry the LoRA kernels from a machine that has it")
    src = Path(list(spec.submodule_search_locations)[0])
    if (src / "__init__.py").is_file() and _MARKER in (src / "__init__.py").read_text():
        raise ValueError(
            f"the `vllm` found at {src} is a carried copy, not vLLM; remove it from PYTHONPATH"
        )
    return src


def carry_vllm_lora_ops(dest: Path = DEFAULT_DEST) -> Path:
    """Copy vLLM's LoRA shrink/expand Triton sources and write their shims under ``dest``.

    Returns ``dest`` (resolved); put it on ``PYTHONPATH`` so ``import vllm.lora.ops.
    triton_ops.lora_shrink_op`` (and ``lora_expand_op``, ``lora_kernel_metadata``) works
    with only torch and Triton installed. Raises ValueError if the installed vLLM is not
    the supported release, or if ``dest/vllm`` exists and is not a previous carry.
    """
    version = installed_vllm_version()
    if version is None or version.split("+")[0] != SUPPORTED_VLLM:
        raise ValueError(
            f"the LoRA kernels are carried from vLLM {SUPPORTED_VLLM} only; installed: {version or 'none'}"
        )
    src = _installed_vllm_dir()
    ops_src = src.joinpath(*_OPS_PKG)
    missing = [name for name in CARRIED_FILES if not (ops_src / name).is_file()]
    if missing:
        raise ValueError(f"{ops_src} lacks {', '.join(missing)}")

    dest = Path(dest).resolve()
    pkg = dest / "vllm"
    if pkg.exists():
        init = pkg / "__init__.py"
        if not (init.is_file() and _MARKER in init.read_text()):
            raise ValueError(f"{pkg} exists and is not a carried copy; refusing to overwrite it")
        shutil.rmtree(pkg)

    for sub in _EMPTY_PACKAGES:
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    for rel, text in _SHIMS.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.format(version=version) if rel == "__init__.py" else text)
    ops_dest = pkg.joinpath(*_OPS_PKG)
    for name in CARRIED_FILES:
        shutil.copyfile(ops_src / name, ops_dest / name)

    _check_carried_imports(pkg)
    (dest / "README.txt").write_text(
        _README.format(version=version, source=src, files=",".join(CARRIED_FILES), dest=dest)
    )
    return dest


def _module_file(pkg: Path, dotted: str) -> Path | None:
    """The file of module ``dotted`` (``vllm.x.y``) under ``pkg`` (the ``vllm`` folder)."""
    parts = dotted.split(".")[1:]
    base = pkg.joinpath(*parts) if parts else pkg
    for cand in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if cand is not None and cand.is_file():
            return cand
    return None


def _top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Try):
            for sub in node.body + [h for hd in node.handlers for h in hd.body]:
                if isinstance(sub, ast.Assign):
                    names.update(t.id for t in sub.targets if isinstance(t, ast.Name))
    return names


def _check_carried_imports(pkg: Path) -> None:
    """Every ``vllm.*`` name the carried files import, and every ``envs.X`` they read,
    must exist in the carried folder; raise ValueError naming what does not."""
    unmet: list[str] = []
    envs_names = _top_level_names(pkg / "envs.py")
    for name in CARRIED_FILES:
        path = pkg.joinpath(*_OPS_PKG, name)
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names if a.name.split(".")[0] == "vllm"]
                unmet += [f"{name}: import {m}" for m in mods if _module_file(pkg, m) is None]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
                mod_file = _module_file(pkg, node.module)
                if mod_file is None:
                    unmet.append(f"{name}: from {node.module}")
                    continue
                provided = _top_level_names(mod_file)
                for alias in node.names:
                    if alias.name not in provided and _module_file(pkg, f"{node.module}.{alias.name}") is None:
                        unmet.append(f"{name}: from {node.module} import {alias.name}")
        unmet += [f"{name}: envs.{v}" for v in sorted(set(re.findall(r"\benvs\.(\w+)", text))) if v not in envs_names]
    if unmet:
        raise ValueError("the carried vLLM LoRA kernels need names the shims lack: " + "; ".join(unmet))


def load_vllm_lora_ops() -> SimpleNamespace:
    """Import vLLM's LoRA shrink/expand launchers, kernel metadata and config utils.

    Works with the real vLLM 0.32 or with a carried copy on ``PYTHONPATH``. Returns a
    namespace with ``lora_shrink``, ``lora_expand``, ``LoRAKernelMeta``, ``utils`` (the
    ``triton_ops.utils`` module) and ``source`` (where ``vllm`` was imported from).
    """
    try:
        import vllm
        from vllm.lora.ops.triton_ops import lora_expand_op, lora_kernel_metadata, lora_shrink_op
        from vllm.lora.ops.triton_ops import utils as ops_utils
    except ImportError as err:
        raise ImportError(
            "vLLM's LoRA Triton kernels cannot be imported "
            f"({err}). On a machine without vLLM, run `vllm-plugins bench carry-vllm-lora-ops "
            "--dest DIR` where vLLM 0.32.0 is installed (carry_vllm_lora_ops), bring DIR along "
            "and put it on PYTHONPATH (PYTHONPATH=DIR)."
        ) from err
    return SimpleNamespace(
        lora_shrink=lora_shrink_op.lora_shrink,
        lora_expand=lora_expand_op.lora_expand,
        LoRAKernelMeta=lora_kernel_metadata.LoRAKernelMeta,
        utils=ops_utils,
        source=vllm.__file__,
        carried=bool(getattr(vllm, _MARKER, False)),
    )


def captured_lora_counts(max_loras: int, specialize: bool) -> list[int]:
    """vllm.lora.utils.get_captured_lora_counts (0.32), copied: it lives outside the carry."""
    if not specialize:
        return [max_loras + 1]
    return [n for n in range(1, max_loras + 2) if (n & (n - 1)) == 0 or n == max_loras + 1]


SITES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass
class _Site:
    in_features: int
    output_slices: tuple[int, ...]
    lora_a: tuple[torch.Tensor, ...]  # per slice (num_slots, 1, rank, in): vLLM's lora_a_stacked
    lora_b: tuple[torch.Tensor, ...]  # per slice (num_slots, 1, out, rank): vLLM's lora_b_stacked


def add_lora_linear(ops: SimpleNamespace, meta_args: tuple, y: torch.Tensor, x: torch.Tensor,
                    lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], buffer: torch.Tensor) -> None:
    """What ``PunicaWrapperGPU.add_lora_linear(y, x, lora_a, lora_b, 1.0, output_slices)``
    launches for one site: ``lora_shrink`` into the float32 ``buffer`` (slices, tokens,
    rank), then ``lora_expand`` adding into ``y`` (``offset_start=0``, ``add_inputs=True``).
    ``ops``: :func:`load_vllm_lora_ops`; ``meta_args``: ``LoRAKernelMeta.meta_args``."""
    ops.lora_shrink(x, lora_a, buffer, *meta_args, VllmLoraLayer.scale)
    ops.lora_expand(buffer, lora_b, y, *meta_args, offset_start=0, add_inputs=True)


def lora_delta_torch(x: torch.Tensor, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...],
                     token_slots: torch.Tensor) -> torch.Tensor:
    """Plain-torch delta that vLLM's shrink and expand add to one site's output: float32
    (tokens, sum(out)), zero for tokens with slot -1. ``x`` (tokens, in); ``lora_a`` and
    ``lora_b`` per slice (slots, 1, rank, in) and (slots, 1, out, rank). As vLLM computes
    it, the shrink result is kept in float32 and rounded to the weights' dtype before the
    expand."""
    slots = token_slots.to(device=x.device, dtype=torch.long)
    has = slots >= 0
    idx = slots.clamp(min=0)
    x = x.float()
    parts = []
    for a, b in zip(lora_a, lora_b):
        s = torch.einsum("ti,tri->tr", x, a[idx, 0].float()) * VllmLoraLayer.scale
        s = s.to(a.dtype).float()
        parts.append(torch.einsum("tr,tor->to", s, b[idx, 0].float()))
    delta = torch.cat(parts, dim=1)
    return torch.where(has[:, None], delta, torch.zeros_like(delta))


MODULE_SLICES = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2), "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0),
}
"""Each of a Llama layer's 7 linear modules: the vLLM site that holds its LoRA and its slice there."""


class VllmLoraLayer:
    """One Llama decoder layer's stock-LoRA weights at rank ``rank`` for ``num_slots``
    adapter slots, and vLLM's shrink/expand launches for one decode step.

    Sites and slices as vLLM's LoRA layers have them: qkv_proj (3 slices q/k/v, in hidden),
    o_proj (1 slice, in q_size, out hidden), gate_up_proj (2 slices of intermediate, in
    hidden), down_proj (1 slice, in intermediate, out hidden). Weights are
    ``lora_a_stacked``/``lora_b_stacked`` tuples exactly as vLLM allocates them:
    ``(num_slots, 1, rank, in)`` and ``(num_slots, 1, out, rank)`` per slice, contiguous.
    The scale passed to the kernels is 1.0, as vLLM's layers pass it (the adapter's scaling
    is folded into lora_b when loaded).
    """

    scale = 1.0

    def __init__(self, hidden: int, q_size: int, kv_size: int, intermediate: int, rank: int,
                 num_slots: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cuda", seed: int = 0) -> None:
        if min(hidden, q_size, kv_size, intermediate, rank, num_slots) < 1:
            raise ValueError("sizes, rank and num_slots must be positive")
        self.hidden, self.q_size, self.kv_size, self.intermediate = hidden, q_size, kv_size, intermediate
        self.rank, self.num_slots, self.dtype = rank, num_slots, dtype
        self.device = torch.device(device)
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def stacked(out: int, inp: int, fan_in: int) -> torch.Tensor:
            w = torch.randn(num_slots, 1, out, inp, generator=gen, device=self.device) / fan_in**0.5
            return w.to(dtype).contiguous()

        shapes = {
            "qkv_proj": (hidden, (q_size, kv_size, kv_size)),
            "o_proj": (q_size, (hidden,)),
            "gate_up_proj": (hidden, (intermediate, intermediate)),
            "down_proj": (intermediate, (hidden,)),
        }
        self.sites: dict[str, _Site] = {
            name: _Site(
                in_features=inp,
                output_slices=outs,
                lora_a=tuple(stacked(rank, inp, inp) for _ in outs),
                lora_b=tuple(stacked(out, rank, rank) for out in outs),
            )
            for name, (inp, outs) in shapes.items()
        }
        self.ops: SimpleNamespace | None = None
        self.meta = None
        self.token_slots: torch.Tensor | None = None
        self.num_tokens = 0
        self.specialize_active_lora = False
        self.x: dict[str, torch.Tensor] = {}
        self.y: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}

    def prepare(self, token_slots: torch.Tensor, *, specialize_active_lora: bool = False,
                max_num_tokens: int | None = None, seed: int = 1) -> None:
        """Build the kernel metadata for this step's token->slot mapping (``-1``: no LoRA)
        as ``PunicaWrapperGPU`` does (``LoRAKernelMeta.make`` then ``prepare_tensors``),
        and allocate each site's input ``x[site]`` (num_tokens, in) and base output
        ``y[site]`` (num_tokens, sum(out)), both random, and its float32 shrink buffer
        (n_slices, num_tokens, rank) that ``add_lora_linear`` would allocate per call.
        ``specialize_active_lora`` is vLLM's LoRAConfig option (default False: the kernel
        grid covers max_loras + 1 adapters whatever the batch holds)."""
        check_kernel_dtype(self.dtype)
        self.ops = ops = load_vllm_lora_ops()
        token_slots = torch.as_tensor(token_slots)
        if token_slots.ndim != 1:
            raise ValueError("token_slots must be a 1-D tensor of slot indices (-1: no LoRA)")
        if token_slots.numel() and (token_slots.min() < -1 or token_slots.max() >= self.num_slots):
            raise ValueError(f"token_slots must lie in [-1, {self.num_slots})")
        num_tokens = token_slots.numel()
        self.token_slots = token_slots.to(device=self.device, dtype=torch.int32)
        self.num_tokens = num_tokens
        self.specialize_active_lora = specialize_active_lora
        self.meta = ops.LoRAKernelMeta.make(
            self.num_slots,
            max(max_num_tokens or num_tokens, num_tokens),
            device=self.device,
            captured_lora_counts=captured_lora_counts(self.num_slots, specialize_active_lora),
        )
        self.meta.prepare_tensors(self.token_slots)

        gen = torch.Generator().manual_seed(seed)
        for name, site in self.sites.items():
            self.x[name] = torch.randn(num_tokens, site.in_features, generator=gen).to(self.device, self.dtype)
            self.y[name] = torch.randn(num_tokens, sum(site.output_slices), generator=gen).to(self.device, self.dtype)
            self.buffers[name] = torch.empty(
                (len(site.output_slices), num_tokens, self.rank), dtype=torch.float32, device=self.device
            )
            # vLLM fills its pointer/stride caches (keyed by the weights' data_ptr) on the
            # first call; fill them here so run() allocates nothing. Drop stale entries
            # first: another layer's freed weights may have lived at the same addresses.
            for cache, weights in ((ops.utils._LORA_A_PTR_DICT, site.lora_a), (ops.utils._LORA_B_PTR_DICT, site.lora_b)):
                cache.pop(tuple(w.data_ptr() for w in weights), None)
            ops.utils._get_lora_a_ptr(list(site.lora_a), self.device)
            ops.utils._get_lora_b_ptr(list(site.lora_b), 0, self.device)

    def write_slot(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put one adapter's LoRA into ``slot``: ``weights[module] = (A (rank, in), B (out,
        rank))`` for modules of :data:`MODULE_SLICES`, B already multiplied by the adapter's
        alpha / rank (vLLM folds the scaling into lora_b when it loads an adapter); a module
        left out gets none. ValueError for another rank or an unknown module."""
        for site in self.sites.values():
            for a, b in zip(site.lora_a, site.lora_b):
                a[slot].zero_()
                b[slot].zero_()
        for module, (a, b) in weights.items():
            if module not in MODULE_SLICES:
                raise ValueError(f"no LoRA site holds module {module!r}")
            if a.shape[0] != self.rank or b.shape[1] != self.rank:
                raise ValueError(f"{module}: rank {a.shape[0]}, the layer's slots hold rank {self.rank}")
            name, part = MODULE_SLICES[module]
            self.sites[name].lora_a[part][slot, 0] = a
            self.sites[name].lora_b[part][slot, 0] = b

    def run(self) -> None:
        """One decode step's LoRA kernels: for each site, in layer order,
        :func:`add_lora_linear` on the site's input ``x`` and base output ``y``. Nothing else
        runs and nothing is allocated (the buffers come from :meth:`prepare`)."""
        if self.meta is None or self.ops is None:
            raise RuntimeError("call prepare(token_slots) first")
        meta_args = self.meta.meta_args(self.num_tokens, self.specialize_active_lora)
        for name in SITES:
            site = self.sites[name]
            add_lora_linear(self.ops, meta_args, self.y[name], self.x[name], site.lora_a, site.lora_b, self.buffers[name])

    def reference(self, x_by_site: dict[str, torch.Tensor] | None = None,
                  token_slots: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Plain-torch deltas each site's kernels add to ``y`` (:func:`lora_delta_torch`)."""
        x_by_site = self.x if x_by_site is None else x_by_site
        slots = self.token_slots if token_slots is None else torch.as_tensor(token_slots)
        if slots is None:
            raise RuntimeError("pass token_slots or call prepare(token_slots) first")
        return {name: lora_delta_torch(x_by_site[name], site.lora_a, site.lora_b, slots) for name, site in self.sites.items()}


def check_kernel_dtype(dtype: torch.dtype) -> None:
    """ValueError unless vLLM's LoRA kernels take weights of ``dtype``."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"vLLM's LoRA kernels take bfloat16 or float16 weights, not {dtype}")
