"""Greedy answers of a causal LM under NVIDIA kvpress's presses, for a JSON job.

Standalone: it runs in kvpress's own virtual environment (kvpress pins an older
transformers than the ``vllm_plugins`` package), so it imports nothing from that package.
``vllm_plugins.bench.kvpress_reference`` writes the job and reads the result::

    python kvpress_presses.py JOB.json RESULT.json

Job (JSON)::

    {"model": "/path/to/transformers/model",       # a Llama-like causal LM
     "task": "retrieval",                           # what the prompts ask, for the record
     "kvpress_version": "0.5.5",                    # the version the caller installed
     "max_new_tokens": 4, "seed": 0, "torch_threads": 1,
     "presses": ["none", "SnapKVPress", ...],       # "none": the full cache
     "prompts": [[1, 57, ...], ...],                # token ids, <bos> included
     "budgets": [{"keep_ratio": 0.1,                # per press, one count per prompt
                  "kept_tokens": {"SnapKVPress": [107, ...], ...}}, ...]}

Result (JSON): the versions used, the seconds taken, and one run per press and budget
(one run for "none", with ``keep_ratio`` null)::

    {"runs": [{"press": "SnapKVPress", "keep_ratio": 0.1, "kept_tokens": [107, ...],
               "answers": ["k3.0:v1 ...", ...], "answer_tokens": [[...], ...]}, ...]}

Each prompt is prefilled whole (its question included) under the press, which compresses
every layer's cache at the end of that forward pass; the first answer token comes from
that pass's logits, which saw the whole prompt. Decoding is greedy for exactly
``max_new_tokens`` tokens (end-of-sequence does not stop it), positions continuing from
the prompt's length. A press takes a compression ratio, the share of tokens removed,
and keeps ``int(n * (1 - ratio))`` of ``n``: the ratio is chosen per prompt so that this
is the job's count, and the count each layer actually kept is checked (a RuntimeError
otherwise). ObservedAttentionPress reads attention weights, so it runs on a second copy
of the model loaded with eager attention; the others on SDPA. Torch runs on
``torch_threads`` threads: on the demo model one thread was 10 times faster than two on a
loaded 2-core machine (OpenMP's threads wait for each other on every small operation).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from importlib.metadata import version

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as transformers_logging

NO_PRESS = "none"
EAGER_PRESSES = {"ObservedAttentionPress"}  # scores from the attention weights


def compression_ratio(num_prompt: int, num_kept: int) -> float:
    """The ratio for which a press keeps exactly ``num_kept`` of ``num_prompt`` tokens
    (kvpress keeps ``int(num_prompt * (1 - ratio))``): half a token above the count, so
    that float rounding cannot truncate it to one fewer. ValueError outside 1..num_prompt."""
    if not 1 <= num_kept <= num_prompt:
        raise ValueError(f"cannot keep {num_kept} of {num_prompt} tokens")
    if num_kept == num_prompt:
        return 0.0
    ratio = 1 - (num_kept + 0.5) / num_prompt
    assert int(num_prompt * (1 - ratio)) == num_kept, (num_prompt, num_kept, ratio)
    return ratio


def make_press(name: str, num_prompt: int, num_kept: int, seed: int):
    """The press ``name`` (a class of kvpress) keeping ``num_kept`` tokens with its own
    defaults; None for ``"none"``. RandomPress is seeded."""
    if name == NO_PRESS:
        return None
    import kvpress  # here, so that the arithmetic above can be tested without kvpress

    press_cls = getattr(kvpress, name)
    extra = {"seed": seed} if name == "RandomPress" else {}
    return press_cls(compression_ratio=compression_ratio(num_prompt, num_kept), **extra)


@torch.inference_mode()
def greedy_answer(model, prompt: list[int], press, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(answer token ids, tokens kept per layer after prefill) of one prompt."""
    ids = torch.tensor([prompt])
    cache = DynamicCache()
    with press(model) if press is not None else nullcontext():
        logits = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits
    kept = [layer.keys.shape[2] for layer in cache.layers]
    tokens = [int(logits[0, -1].argmax())]
    for step in range(max_new_tokens - 1):
        position = torch.tensor([[len(prompt) + step]])
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, position_ids=position).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens, kept


def run_press(model, tokenizer, job: dict, press_name: str, keep_ratio: float | None, kept_tokens: list[int]) -> dict:
    """One run: every prompt of the job under one press and one budget."""
    answers, answer_tokens, kept_counts = [], [], []
    for prompt, num_kept in zip(job["prompts"], kept_tokens):
        press = make_press(press_name, len(prompt), num_kept, job["seed"])
        tokens, kept = greedy_answer(model, prompt, press, job["max_new_tokens"])
        if any(count != num_kept for count in kept):
            raise RuntimeError(f"{press_name} kept {kept} tokens per layer of a {len(prompt)}-token prompt, not {num_kept}")
        answer_tokens.append(tokens)
        answers.append(tokenizer.decode(tokens, skip_special_tokens=True))
        kept_counts.append(num_kept)
    return {"press": press_name, "keep_ratio": keep_ratio, "kept_tokens": kept_counts,
            "answers": answers, "answer_tokens": answer_tokens}


def run_job(job: dict) -> dict:
    """Every press of the job at every budget ("none" once, with the whole cache)."""
    installed = version("kvpress")
    if installed != job["kvpress_version"]:
        raise RuntimeError(f"kvpress {installed} is installed here, the job asks for {job['kvpress_version']}")
    torch.manual_seed(job["seed"])
    torch.set_num_threads(job["torch_threads"])
    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    models = {}

    def model_for(press_name: str):
        attention = "eager" if press_name in EAGER_PRESSES else "sdpa"
        if attention not in models:
            models[attention] = AutoModelForCausalLM.from_pretrained(
                job["model"], dtype=torch.float32, attn_implementation=attention).eval()
        return models[attention]

    start = time.perf_counter()
    runs = []
    for press_name in job["presses"]:
        model = model_for(press_name)
        if press_name == NO_PRESS:
            runs.append(run_press(model, tokenizer, job, press_name, None, [len(p) for p in job["prompts"]]))
        else:
            for budget in job["budgets"]:
                runs.append(run_press(model, tokenizer, job, press_name, budget["keep_ratio"], budget["kept_tokens"][press_name]))
        print(f"kvpress: {press_name} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return {"kvpress_version": installed, "transformers_version": version("transformers"),
            "torch_version": torch.__version__, "seconds": round(time.perf_counter() - start, 1), "runs": runs}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {sys.argv[0]} JOB.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    result = run_job(job)
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
