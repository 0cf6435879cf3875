"""The front end's table of prompt-aware adapters: name -> validated snapshot.

An adapter is validated here before any request can name it: its name, then the
manifest, the weights (inside the directory, bounded by the tensors the manifest
describes), their shapes against the served model, the base-model fingerprint and the
server's limits (:func:`~vllm_plugins.adapters.storage.load_prompt_aware_layers`).

What is validated is what is served: the manifest and weights are copied into a snapshot
directory of the server's own, named by their SHA-256, and the engine reads the snapshot
only. Moving, editing or replacing the adapter's directory afterwards changes nothing a
running server reads; a new version is a new snapshot, loaded again under the same name,
and every cache keyed by the snapshot path (worker slots, scheduler, prefix-cache salt)
sees it as the new adapter it is.

Names: 1 to 128 characters among letters, digits and ``._:-``, never the served model's
name, a LoRA tenant's or another adapter's. At start every sub-directory of the adapter
directory is registered under its name; one that cannot be is left out, logged and kept
in :attr:`PromptAdapterRegistry.refused` (listed by ``/v1/models``), and the rest are
served. Run-time registration accepts directories inside the adapter directory only, and
at most ``max_adapters`` adapters.

Registration reads and hashes files: call it off the event loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from vllm_plugins.adapters.common.model_parts import dims
from vllm_plugins.adapters.registry import METHODS
from vllm_plugins.adapters.storage import (
    MANIFEST, AdapterError, checkpoint_fingerprint, file_inside, load_prompt_aware_layers, read_manifest,
)
from vllm_plugins.serving.config import PromptAdapterSettings
from vllm_plugins.serving.methods import check_limits

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger: the server log

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True)
class RegisteredAdapter:
    name: str
    path: str  # the snapshot the engine reads
    source: str  # the directory it was registered from
    method: str


class PromptAdapterRegistry:
    def __init__(self, model_dir: str, settings: PromptAdapterSettings, reserved_names: frozenset[str] = frozenset()):
        """``reserved_names``: the served model's names and the LoRA tenants'."""
        self.dims = dims(AutoConfig.from_pretrained(model_dir))
        self.settings = settings
        self.reserved_names = reserved_names
        self.fingerprint = checkpoint_fingerprint(model_dir)
        self.root = Path(settings.dir).resolve() if settings.dir else None
        self.adapters: dict[str, RegisteredAdapter] = {}
        self.refused: dict[str, str] = {}  # sub-directory name -> why, for adapters found at start
        self._lock = threading.Lock()
        self._snapshots = Path(tempfile.mkdtemp(prefix="vllm-plugins-adapters-"))
        atexit.register(shutil.rmtree, self._snapshots, ignore_errors=True)
        if self.root is not None:
            for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
                try:
                    if METHODS[read_manifest(sub)["method"]].family == "prompt-aware":
                        self.register(sub.name, str(sub))
                except (AdapterError, OSError) as err:
                    logger.warning("prompt adapter %r is not served: %s", sub.name, err)
                    self.refused[sub.name] = str(err)

    def register(self, name: str, path: str) -> RegisteredAdapter:
        """Validate the adapter in ``path`` and serve it as ``name``. Raises AdapterError,
        and only AdapterError: whatever the files hold, it is a reason to refuse them."""
        try:
            return self._register(name, path)
        except AdapterError:
            raise
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
            raise AdapterError(f"{path!r} cannot be read as an adapter ({type(err).__name__}: {err})") from None

    def _register(self, name: str, path: str) -> RegisteredAdapter:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise AdapterError("an adapter name is 1 to 128 letters, digits or '._:-', starting with a letter or digit")
        if name in self.reserved_names:
            raise AdapterError(f"{name!r} is the name of the served model or of a LoRA adapter")
        if not isinstance(path, str) or "\0" in path:
            raise AdapterError("an adapter path is a string without NUL characters")
        source = Path(path).resolve()
        if self.root is None or not source.is_relative_to(self.root) or source == self.root:
            raise AdapterError(f"{path} is not a directory inside the allowed adapter directory {self.root}")
        with self._lock:
            if name in self.adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded")
            if len(self.adapters) >= self.settings.max_adapters:
                raise AdapterError(f"the server holds at most {self.settings.max_adapters} prompt adapters")
        _, manifest = self._validate(source)  # bounds every read before the copy
        snapshot = self._snapshot(source, manifest)
        _, manifest = self._validate(snapshot)  # what is served is what was validated
        adapter = RegisteredAdapter(name=name, path=str(snapshot), source=str(source), method=manifest["method"])
        with self._lock:
            if name in self.adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded")
            self.adapters[name] = adapter
            self.refused.pop(name, None)
        return adapter

    def unregister(self, name: str) -> None:
        """Stop serving ``name``; its snapshot stays for the requests still running on it."""
        with self._lock:
            del self.adapters[name]

    def _validate(self, adapter_dir: Path):
        return load_prompt_aware_layers(
            adapter_dir, self.dims, self.fingerprint,
            check=lambda method, config: check_limits(method, config, self.dims, self.settings),
        )

    def _snapshot(self, source: Path, manifest: dict) -> Path:
        """Copy the manifest and the weights file of ``source`` into this server's
        snapshot directory, under the SHA-256 of their contents."""
        weights = manifest["weights"]["file"]
        staging = Path(tempfile.mkdtemp(dir=self._snapshots, prefix=".staging-"))
        try:
            digest = hashlib.sha256()
            for file in (MANIFEST, weights):
                target = staging / file
                if target.parent != staging:
                    raise AdapterError(f"{source}: weights file {file!r} must sit beside {MANIFEST}")
                shutil.copyfile(file_inside(source, file), target)
                with target.open("rb") as f:
                    digest.update(file.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
            snapshot = self._snapshots / digest.hexdigest()
            try:
                staging.rename(snapshot)
            except OSError:  # the same content is there already
                if not snapshot.is_dir():
                    raise
            return snapshot
        finally:
            shutil.rmtree(staging, ignore_errors=True)
