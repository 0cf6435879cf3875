"""``--scheduler-cls vllm_plugins.serving.scheduler.PromptAwareScheduler``.

A prompt-aware request's state is computed from the hidden states of its whole prompt, so
it must not skip prompt tokens found in the prefix cache: such requests never read the
prefix cache. Their blocks are salted by adapter (``cache_salt``, set by the front end),
so no other request reads them either.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_plugins.serving.batch import requested_adapter


class PromptAwareScheduler(Scheduler):
    def add_request(self, request) -> None:
        if requested_adapter(request.sampling_params) is not None:
            request.skip_reading_prefix_cache = True
        super().add_request(request)
