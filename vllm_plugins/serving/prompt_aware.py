"""Prompt-aware adapters in a vLLM worker: request -> state row -> tables -> per-token ops.

Data flow of one step:

    runner, before the forward pass (:meth:`PromptAwareRuntime.begin_step`):
        each request naming an adapter gets a state row (kept until it finishes or is
        preempted; a restart from position 0 resets it), its adapter a slot
        (:mod:`.adapter_slots`); the step's token -> row map goes into
        :class:`~.metadata.PromptAwareMetadata`
    forward pass, per decoder layer (:mod:`.layers` wrap the modules, :mod:`.ops` are
    the custom ops they call):
        qkv_proj input (normalised H_l) -> :meth:`prefill`: the prompt tokens scheduled now
            are pooled into each row's running softmax sums (``pool_*`` tables); a row
            whose prompt completes gets its state from the adapter's own generator
            (:meth:`~.methods.base.ServedMethod.finalize`)
        each site's output -> :meth:`apply`: each method acts on its adapted tokens,
            reading its per-row tables and per-slot weights
    runner, after the forward pass: :meth:`end_step` clears the step's map.

Every table is preallocated at load on the model's device and written in place. Pooling is an online softmax
(running max, sum and weighted sum), so a prompt that arrives in several chunks pools to
the same vector as one pass over it (docs/serving.md).
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_plugins.adapters.common.pooling import PoolStats
from vllm_plugins.serving.adapter_slots import AdapterSlots, LoadedAdapter, ReadAdapter
from vllm_plugins.serving.batch import ADAPTER_ARG, ADAPTER_PATH_ARG, StepBatch
from vllm_plugins.serving.config import PromptAdapterSettings
from vllm_plugins.serving.metadata import PromptAwareMetadata
from vllm_plugins.serving.methods import METHODS, LayerModules, ServedMethod, check_limits


class PromptAwareRuntime:
    def __init__(self, layers: list[LayerModules], settings: PromptAdapterSettings, model_dir: str,
                 max_tokens: int, max_rows: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, read_adapter: ReadAdapter | None = None):
        """``max_tokens``, ``max_rows``: vLLM's max_num_batched_tokens and max_num_seqs;
        ``device``, ``dtype``: the model's; ``read_adapter``: how an adapter's path becomes
        its layers (default: the checked snapshot reader, :class:`~.adapter_slots.AdapterSlots`)."""
        d = layers[0].dims
        self.layers = layers
        self.settings = settings
        self.metadata = PromptAwareMetadata(max_tokens, max_rows, len(METHODS), device)
        self.methods: list[ServedMethod] = [cls(layers, max_rows, settings, device, dtype) for cls in METHODS]
        self.by_name = {m.name: m for m in self.methods}
        self.slots = AdapterSlots(model_dir, d, settings.max_active, self._load, self._check, device, read_adapter)
        shape = (len(layers), max_rows, settings.max_soft_tokens)
        self.pool_peak = torch.full(shape, -torch.inf, device=device)
        self.pool_total = torch.zeros(shape, device=device)
        self.pool_weighted = torch.zeros(*shape, d.hidden, device=device)
        self.rows: dict[str, int] = {}  # request id -> state row
        self._free_rows = list(reversed(range(max_rows)))
        self.compute_state_calls = 0  # (request, layer) states finalised so far
        self.most_adapters_in_a_step = 0

    # -- runner side, outside the forward pass ------------------------------------------
    def begin_step(self, batch: StepBatch, request_args: dict[str, dict]) -> None:
        """``request_args``: the ``extra_args`` of the step's requests that name an adapter."""
        named = [i for i, req_id in enumerate(batch.req_ids) if req_id in request_args]
        if not named:
            self.metadata.clear()
            return
        keys = [(str(request_args[batch.req_ids[i]][ADAPTER_ARG]), request_args[batch.req_ids[i]][ADAPTER_PATH_ARG])
                for i in named]
        resident = self.slots.activate(keys)
        self.most_adapters_in_a_step = max(self.most_adapters_in_a_step, len(set(keys)))
        state_row = np.full(len(batch.req_ids), -1, dtype=np.int64)
        restarts, completes = batch.restarts, batch.completes_prompt
        for i, key in zip(named, keys):
            req_id = batch.req_ids[i]
            adapter = resident[key]
            if req_id not in self.rows or restarts[i]:
                self._start(req_id, self.by_name[adapter.method], request_args[req_id])
            row = state_row[i] = self.rows[req_id]
            self.metadata.row_slot[row] = adapter.slot
        completing = [int(state_row[i]) for i in named if completes[i]]
        token_rows = state_row[batch.token_row]
        self.metadata.update(token_rows, batch.is_prompt, batch.is_adapted, completing)

    def end_step(self) -> None:
        self.metadata.clear()

    def release(self, req_ids) -> None:
        """Free the state rows of finished or preempted requests."""
        for req_id in req_ids:
            row = self.rows.pop(req_id, None)
            if row is not None:
                self.metadata.row_method[row] = -1
                self._free_rows.append(row)

    def _start(self, req_id: str, method: ServedMethod, request_args: dict) -> None:
        if req_id not in self.rows:
            if not self._free_rows:
                raise RuntimeError(f"more than {len(self.rows)} prompt-aware requests hold state")
            self.rows[req_id] = self._free_rows.pop()
        row = self.rows[req_id]
        self.pool_peak[:, row] = -torch.inf
        self.pool_total[:, row] = 0
        self.pool_weighted[:, row] = 0
        self.metadata.row_method[row] = method.code
        method.start(row, request_args)

    def _load(self, slot: int, method: str, layers) -> None:
        self.by_name[method].load(slot, layers)

    def _check(self, method: str, config) -> None:
        check_limits(method, config, self.layers[0].dims, self.settings)

    # -- op side, inside the forward pass -----------------------------------------------
    def prefill(self, layer: int, hidden: torch.Tensor) -> None:
        """Pool the step's prompt tokens of layer ``layer`` (``hidden``: (tokens, d), the
        normalised hidden states) and finalise the rows whose prompt completes."""
        if not self.metadata.pooling:  # a decode step (a captured decode graph holds no pooling)
            return
        n = hidden.shape[0]
        pooled_tokens = self.metadata.token_pooled[:n].nonzero().squeeze(1)
        rows_of_tokens = self.metadata.token_rows[pooled_tokens]
        for row in rows_of_tokens.unique().tolist():
            adapter = self._adapter(row).layers[layer]
            tokens = pooled_tokens[rows_of_tokens == row]
            self._pool(layer, row, adapter.pool.partial(adapter.pool_features(hidden[tokens].float())))
        for row in self.metadata.row_completes.nonzero().squeeze(1).tolist():
            adapter = self._adapter(row).layers[layer]
            dim, queries = adapter.pool.query.shape
            pooled = self.pool_weighted[layer, row, :queries, :dim] / self.pool_total[layer, row, :queries, None]
            self.methods[int(self.metadata.row_method[row])].finalize(layer, row, adapter, pooled[None])
            self.compute_state_calls += 1

    def _adapter(self, row: int) -> LoadedAdapter:
        """The adapter of state row ``row`` this step (its slot's)."""
        return self.slots.in_slot(int(self.metadata.row_slot[row]))

    def _pool(self, layer: int, row: int, part: PoolStats) -> None:
        queries, dim = part.weighted.shape
        peak = self.pool_peak[layer, row, :queries]
        if bool(torch.isinf(peak).all()):  # the row's first pooled chunk
            merged = part
        else:
            merged = PoolStats(peak.clone(), self.pool_total[layer, row, :queries].clone(),
                               self.pool_weighted[layer, row, :queries, :dim].clone()).merge(part)
        self.pool_peak[layer, row, :queries] = merged.peak
        self.pool_total[layer, row, :queries] = merged.total
        self.pool_weighted[layer, row, :queries, :dim] = merged.weighted

    def apply(self, site: str, layer: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """Each method with work at ``site`` acts on its adapted tokens of ``out``.

        Every token of the step goes to a method's kernels, those it does not act on marked
        -1 (``method_rows``): fixed shapes and no host reads, so a CUDA graph captured
        around this call serves any batch of as many tokens. A method that acts on no token
        of the step is skipped (``acting``, a host flag): a captured graph holds the methods
        acting in the batch it was captured for, and serves batches with the same ones.
        """
        n = out.shape[0]
        meta = self.metadata
        for method in self.methods:
            if site in method.sites and meta.acting[method.code]:
                method.apply(site, layer, x, out, meta.all_tokens[:n], meta.method_rows[method.code, :n], meta.token_slots[:n])
