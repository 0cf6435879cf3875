"""``--scheduler-cls vllm_plugins.serving.scheduler.PromptAwareScheduler``.

Three rules on top of vLLM's scheduler, for requests that name a prompt-aware adapter:

* **No prefix-cache reads.** A request's state is computed from the hidden states of its
  whole prompt, so it must not skip prompt tokens found in the prefix cache. Its blocks
  are salted by adapter (``cache_salt``, set by the front end), so no other request reads
  them either.
* **At most ``max_active`` adapters running.** A waiting request whose adapter is not
  among the running requests' adapters is admitted only while fewer than ``max_active``
  distinct adapters run; otherwise it waits, as vLLM makes LoRA requests wait beyond
  ``--max-loras``. Workers hold ``max_active`` adapters' weights, so a running batch never
  reloads weights.
* **IAPT's soft tokens get KV slots** from the block pool when the request is first
  admitted (it waits while the pool is empty) and give them back when it finishes
  (:mod:`.soft_kv`).

Their per-request arguments (IAPT's KV slots, eviction plans) are set by this scheduler
only: the same ``extra_args`` keys arriving with a request are dropped when it is added.
The adapter a request names is kept only with the front end's ticket (:mod:`.tickets`);
without one the request is the base model's, as the ``model`` it named. Its blocks are
hashed under a salt that includes a secret of this scheduler's, so no client-chosen
``cache_salt`` can name them.

And one for every request: **KV eviction.** A request evicted by the server's default
or its own ``vllm_xargs`` gets an eviction plan on arrival, its prefill chunks never
cross its prompt's end, and its leading blocks go back to the block pool once its prompt
has run (:mod:`.block_release`).
"""

from __future__ import annotations

import logging
import secrets

from vllm_plugins.adapters.storage import read_manifest
from vllm_plugins.serving.batch import ADAPTER_PATH_ARG, requested_adapter
from vllm_plugins.serving.block_release import BlockRelease
from vllm_plugins.serving.config import PromptAdapterSettings, eviction_settings
from vllm_plugins.serving.kv_eviction import PLAN_ARG
from vllm_plugins.serving.soft_kv import SOFT_KV_SLOT_ARG, SoftTokenSlots
from vllm_plugins.serving.tickets import ADAPTER_KEYS, verified
from vllm_plugins.serving.vllm_internals import Scheduler, rehash_with_salt

logger = logging.getLogger(__name__)


SCHEDULER_ARGS = (PLAN_ARG, SOFT_KV_SLOT_ARG)
"""``extra_args`` keys only this scheduler sets."""


def _adapter_key(sampling_params) -> tuple[str, str] | None:
    name = requested_adapter(sampling_params)
    return None if name is None else (name, str(sampling_params.extra_args.get(ADAPTER_PATH_ARG)))


class PromptAwareScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.max_active_adapters = PromptAdapterSettings.from_additional_config(vllm_config.additional_config).max_active
        self.soft_kv = SoftTokenSlots(self.kv_cache_manager.block_pool, self.block_size)
        self._soft_tokens: dict[str, int] = {}  # adapter directory -> soft tokens per layer
        self._salt_secret = secrets.token_hex(16)
        eviction = eviction_settings(vllm_config.additional_config)
        self.block_release = BlockRelease(eviction, self.kv_cache_manager, self.block_size, self._salt_secret)
        # vLLM's one hook to clip a request's prefill chunk (named after Mamba, which uses
        # it): on, so that a recomputed evicting request's chunk ends at its prompt's end.
        self.need_mamba_block_aligned_split = True

    def _mamba_block_aligned_split(self, request, num_new_tokens: int, num_new_local_computed_tokens: int = 0,
                                   num_external_computed_tokens: int = 0) -> int:
        start = request.num_computed_tokens + num_new_local_computed_tokens + num_external_computed_tokens
        return self.block_release.clip_chunk(request.request_id, start, num_new_tokens)

    def add_request(self, request) -> None:
        params = request.sampling_params
        if params is not None and params.extra_args:
            # KV slots and eviction plans come from this scheduler only, never from a request.
            params.extra_args = {k: v for k, v in params.extra_args.items() if k not in SCHEDULER_ARGS}
            if any(k in params.extra_args for k in ADAPTER_KEYS) and not verified(params.extra_args):
                logger.warning("request %s names a prompt-aware adapter without a valid ticket: "
                               "served as the base model", request.request_id)
                params.extra_args = {k: v for k, v in params.extra_args.items() if k not in ADAPTER_KEYS}
        if (adapter := _adapter_key(params)) is not None:
            rehash_with_salt(request, f"prompt-adapter:{self._salt_secret}:{adapter[0]}@{adapter[1]}")
        self.block_release.plan(request)
        super().add_request(request)

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self.block_release.release(self.requests, scheduler_output.num_scheduled_tokens)
        return outputs

    def running_adapters(self) -> set[tuple[str, str]]:
        """The running requests' adapters, as the worker's slots know them: (name, directory)."""
        return {a for r in self.running if (a := _adapter_key(r.sampling_params)) is not None}

    def _handle_blocked_waiting_request(self, request) -> bool:
        if not super()._handle_blocked_waiting_request(request):
            return False
        adapter = _adapter_key(request.sampling_params)
        if adapter is None:
            return True
        running = self.running_adapters()
        if adapter not in running and len(running) >= self.max_active_adapters:
            return False
        return self._reserve_soft_tokens(request)

    def _soft_tokens_of(self, adapter_dir: str) -> int:
        if adapter_dir not in self._soft_tokens:
            manifest = read_manifest(adapter_dir)
            self._soft_tokens[adapter_dir] = manifest["config"]["num_soft_tokens"] if manifest["method"] == "iapt" else 0
        return self._soft_tokens[adapter_dir]

    def _reserve_soft_tokens(self, request) -> bool:
        extra = request.sampling_params.extra_args
        width = self._soft_tokens_of(extra[ADAPTER_PATH_ARG])
        if width == 0 or SOFT_KV_SLOT_ARG in extra:
            return True
        run = self.soft_kv.allocate(width)
        if run is None:
            return False  # the block pool is empty: wait, like any request short of blocks
        extra[SOFT_KV_SLOT_ARG] = run
        return True

    def _free_request(self, request, *args, **kwargs):
        extra = request.sampling_params.extra_args if request.sampling_params else None
        if extra and SOFT_KV_SLOT_ARG in extra:
            self.soft_kv.free(extra.pop(SOFT_KV_SLOT_ARG))
        self.block_release.forget(request.request_id)
        return super()._free_request(request, *args, **kwargs)
