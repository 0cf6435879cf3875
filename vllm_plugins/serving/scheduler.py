"""``--scheduler-cls vllm_plugins.serving.scheduler.PromptAwareScheduler``.

Two rules on top of vLLM's scheduler, both for requests that name a prompt-aware adapter:

* **No prefix-cache reads.** A request's state is computed from the hidden states of its
  whole prompt, so it must not skip prompt tokens found in the prefix cache. Its blocks
  are salted by adapter (``cache_salt``, set by the front end), so no other request reads
  them either.
* **At most ``max_active`` adapters running.** A waiting request whose adapter is not
  among the running requests' adapters is admitted only while fewer than ``max_active``
  distinct adapters run; otherwise it waits, as vLLM makes LoRA requests wait beyond
  ``--max-loras``. Workers hold ``max_active`` adapters' weights, so a running batch never
  reloads weights.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_plugins.serving.batch import requested_adapter
from vllm_plugins.serving.config import PromptAdapterSettings


class PromptAwareScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.max_active_adapters = PromptAdapterSettings.from_additional_config(vllm_config.additional_config).max_active

    def add_request(self, request) -> None:
        if requested_adapter(request.sampling_params) is not None:
            request.skip_reading_prefix_cache = True
        super().add_request(request)

    def running_adapters(self) -> set[str]:
        return {a for r in self.running if (a := requested_adapter(r.sampling_params)) is not None}

    def _handle_blocked_waiting_request(self, request) -> bool:
        if not super()._handle_blocked_waiting_request(request):
            return False
        adapter = requested_adapter(request.sampling_params)
        if adapter is None:
            return True
        running = self.running_adapters()
        return adapter in running or len(running) < self.max_active_adapters
