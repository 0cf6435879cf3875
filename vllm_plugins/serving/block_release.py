"""KV eviction in vLLM's scheduler: the plan of each request, and the blocks it frees.

When a request arrives, its eviction rule (server default or ``vllm_xargs``,
:mod:`vllm_plugins.eviction.settings`) becomes a plan: the policy, how many prompt tokens
stay (:mod:`vllm_plugins.eviction.budget`) and the seed of its random choices. The plan
rides to the worker in ``extra_args`` (:data:`~.kv_eviction.PLAN_ARG`).

After the step that completes the prompt has run, the request's leading blocks go back
to vLLM's block pool and become ``null_block`` in its block list (the mechanism vLLM uses
for sliding windows), so that every later allocation counts from the kept length. The
worker has not read them yet: it compacts the kept tokens into the prompt's trailing
blocks at the head of the next step, before anything in that step can write a block
(:meth:`~.kv_eviction.KvEviction.finish_last_step`). Positions stay logical, so vLLM's
own accounting of the request (computed tokens, block indices of new tokens, freeing at
the end) is unchanged.

A preempted request is recomputed from scratch, its prompt and the tokens it had
generated together. Its prefill chunk is clipped at the prompt's end
(:meth:`BlockRelease.clip_chunk`), so the prompt is evicted again before the generated
tokens are recomputed, and they see the same kept cache they saw when first decoded: the
request resumes exactly where it was.

An evicting request never shares blocks through the prefix cache: it does not read
cached blocks, and its blocks are hashed under a salt of its own (with a secret no
client knows), so that nobody reads the blocks it rewrites.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from vllm_plugins.eviction.budget import EvictionPlan, plan_eviction
from vllm_plugins.eviction.settings import EvictionSettings, EvictionSettingsError
from vllm_plugins.serving import vllm_internals as vi
from vllm_plugins.serving.kv_eviction import PLAN_ARG

logger = logging.getLogger(__name__)


class BlockRelease:
    def __init__(self, settings: EvictionSettings, kv_cache_manager, block_size: int, salt_secret: str):
        """``salt_secret``: a secret of the scheduler's in every salt, so that no client's
        ``cache_salt`` equals one."""
        self.blocks = vi.full_attention_manager(kv_cache_manager)
        if self.blocks is None:
            raise RuntimeError("KV eviction needs a model whose layers all use full attention (one KV cache group)")
        self.settings = settings
        self.block_size = block_size
        self.salt_secret = salt_secret
        self.evicting: dict[str, EvictionPlan] = {}

    def plan(self, request) -> None:
        """Attach the request's plan, if it is evicted; called before it is scheduled.

        The front end answers bad settings with a 400 before vLLM sees them. One that
        comes this far anyway (the offline ``LLM`` API, a prompt ``/tokenize`` could not
        count) leaves the request's cache whole, with a warning: an error here would stop
        the engine and every other request with it."""
        params = request.sampling_params
        if params is None:
            return
        try:
            rule = self.settings.rule_for(params.extra_args, request.num_prompt_tokens)
        except EvictionSettingsError as err:
            logger.warning("request %s keeps its whole KV cache: %s", request.request_id, err)
            return
        if rule is None:
            return
        plan = plan_eviction(rule.policy, request.num_prompt_tokens, rule.tokens_to_keep(request.num_prompt_tokens),
                             self.block_size, params.seed or 0)
        if plan is None:
            return
        params.extra_args = {**(params.extra_args or {}), PLAN_ARG: plan.as_args()}
        vi.rehash_with_salt(request, f"kv-eviction:{self.salt_secret}:{request.request_id}")
        self.evicting[request.request_id] = plan

    def clip_chunk(self, request_id: str, start: int, num_new_tokens: int) -> int:
        """The tokens to schedule from position ``start``: never across the prompt's end."""
        plan = self.evicting.get(request_id)
        if plan is None or start >= plan.num_prompt:
            return num_new_tokens
        return min(num_new_tokens, plan.num_prompt - start)

    def release(self, requests: dict, scheduled: Iterable[str]) -> None:
        """Free the leading blocks of the evicting requests among ``scheduled`` (this
        step's) whose prompt has run (``requests``: the scheduler's requests by id).
        Idempotent: vLLM stops at a block that is already null, so a request recomputed
        after preemption has its new blocks freed again."""
        for req_id in scheduled:
            plan = self.evicting.get(req_id)
            if plan is not None and requests[req_id].num_computed_tokens >= plan.num_prompt:
                vi.free_leading_blocks(self.blocks, req_id, plan.evicted_blocks(self.block_size))

    def forget(self, request_id: str) -> None:
        self.evicting.pop(request_id, None)

    def blocks_held(self, request_id: str) -> int:
        """KV blocks the request holds in vLLM's block pool now (null blocks excluded)."""
        return vi.blocks_held(self.blocks, request_id)
