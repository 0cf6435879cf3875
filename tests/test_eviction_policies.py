"""The eviction policies, budgets and settings as plain functions (no engine)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from helpers import run_python
from vllm_plugins.eviction.budget import EvictionPlan, min_budget, plan_eviction
from vllm_plugins.eviction.farthest_points import farthest_points
from vllm_plugins.eviction.policies import POLICIES, CachedPrompt
from vllm_plugins.eviction.policies.base import keep_best, keep_best_torch, window_attention
from vllm_plugins.eviction.policies.nacl import NaclPolicy
from vllm_plugins.eviction.query_moments import QueryMoments
from vllm_plugins.eviction.settings import EvictionRule, EvictionSettings, EvictionSettingsError
from vllm_plugins.serving.config import eviction_settings


def cached_prompt(n: int = 120, rows: int = 2, group: int = 2, window: int = 8, seed: int = 0, keys=None, kv_heads: int = 1,
                  as_moments: bool = False) -> CachedPrompt:
    """Random keys and window queries; ``as_moments``: the queries as their moments (and
    random value norms), as expected attention reads them."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(rows, n, 16, generator=gen) if keys is None else keys
    queries = torch.randn(rows * group, window, 16, generator=gen)
    if not as_moments:
        return CachedPrompt(keys, queries, 0.25, torch.Generator().manual_seed(seed), kv_heads)
    moments = QueryMoments.empty(rows * group, 16)
    moments.add(queries)
    norms = torch.rand(rows, n, generator=gen) + 0.5
    return CachedPrompt(keys, queries[:, :0], 0.25, torch.Generator().manual_seed(seed), kv_heads, moments, norms)


def prompt_for(policy_name: str, n: int = 120, seed: int = 0, **kwargs) -> CachedPrompt:
    policy = POLICIES[policy_name]
    return cached_prompt(n, window=policy().query_window(n), seed=seed, as_moments=policy.queries_as_moments, **kwargs)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_keeps_the_same_number_of_distinct_tokens_per_head(name):
    kept = POLICIES[name]().select(prompt_for(name), 30)
    assert kept.shape == (2, 30)
    for row in kept:
        assert row.tolist() == sorted(set(row.tolist())) and 0 <= row.min() and row.max() < 120


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_is_reproducible_from_its_seed(name):
    policy = POLICIES[name]()
    assert torch.equal(policy.select(prompt_for(name, seed=3), 30), policy.select(prompt_for(name, seed=3), 30))


def test_random_choices_depend_on_the_seed():
    for name in ("random", "nacl"):
        a = POLICIES[name]().select(prompt_for(name, seed=1), 30)
        b = POLICIES[name]().select(prompt_for(name, seed=2), 30)
        assert not torch.equal(a, b), name


def test_keep_best_breaks_ties_towards_the_earlier_token():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert keep_best(scores, 2).tolist() == [[1, 2]]


def test_window_attention_sums_causal_softmax_over_the_group_and_window():
    prompt = cached_prompt(n=10, rows=1, group=2, window=3)
    expected = torch.zeros(10)
    for h in range(2):
        for p in range(3):
            seen = 10 - 3 + p + 1
            expected[:seen] += torch.softmax(prompt.keys[0, :seen] @ prompt.queries[h, p] * 0.25, dim=0)
    assert torch.allclose(window_attention(prompt)[0], expected, atol=1e-6)


def test_streaming_llm_keeps_the_sinks_and_the_most_recent_tokens():
    kept = POLICIES["streaming_llm"]().select(cached_prompt(n=50, window=0), 16)
    assert kept.tolist() == [[0, 1, 2, 3] + list(range(38, 50))] * 2


def test_snapkv_keeps_its_window_and_the_neighbours_of_what_the_window_attends_to():
    """Window 64, votes average-pooled over 5 tokens: the two neighbours on each side of
    the token the window attends to come with it."""
    n, window = 200, 64
    keys = torch.randn(1, n, 16) * 0.1
    prompt = cached_prompt(n=n, rows=1, group=1, window=window, keys=keys)
    keys[0, 60] = prompt.queries[0].mean(dim=0) * 40  # one token the whole window attends to
    policy = POLICIES["snapkv"]()
    assert policy.query_window(n) == window
    kept = policy.select(prompt, window + 5)[0].tolist()
    assert kept == list(range(58, 63)) + list(range(n - window, n))


def test_expected_attention_is_the_gaussian_expectation_of_the_attention_each_key_receives_times_its_value_norm():
    """Per query head, future queries drawn from the Gaussian with the moments' mean and
    covariance: the Monte Carlo mean of exp(q . k * scale), normalised over the keys,
    averaged over a KV head's query heads and times the value's norm, is exp(score)."""
    n, rows, group = 120, 2, 2
    prompt = prompt_for("expected_attention", n=n)
    assert prompt.query_moments.count.tolist() == [n - 4] * rows * group and prompt.queries.numel() == 0
    got = POLICIES["expected_attention"]().scores(prompt).exp()
    gen = torch.Generator().manual_seed(1)
    expected = torch.zeros(rows, n, dtype=torch.float64)
    moments = prompt.query_moments
    for head, (mean, covariance) in enumerate(zip(moments.mean.double(), moments.covariance.double())):
        draws = mean + torch.randn(400_000, 16, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(covariance).T
        attention = (draws @ prompt.keys[head // group].double().T * prompt.scale).exp().mean(dim=0)
        expected[head // group] += attention / attention.sum() / group
    assert torch.allclose(got.double(), expected * prompt.value_norms.double(), rtol=0.02, atol=0)
    assert torch.allclose((got / prompt.value_norms).sum(dim=-1), torch.ones(rows))


def test_expected_attention_keeps_the_keys_the_future_queries_point_to_and_protects_only_the_sinks():
    """A key along the queries' mean direction is kept; of the prompt's last tokens, only
    those the future queries are expected to attend to."""
    n = 200
    keys = torch.randn(1, n, 16) * 0.1
    prompt = prompt_for("expected_attention", n=n, rows=1, group=1, keys=keys)
    keys[0, 60] = prompt.query_moments.mean[0] * 40
    prompt.value_norms.fill_(1.0)
    policy = POLICIES["expected_attention"]()
    assert policy.select(prompt, 5)[0].tolist() == [0, 1, 2, 3, 60]
    prompt.value_norms[0, 60] = 1e-30  # a value that adds nothing to the output is not kept
    assert 60 not in policy.select(prompt, 5)[0].tolist()


def test_nacl_keeps_sinks_recent_tokens_the_top_third_and_samples_the_rest():
    n, num_kept = 400, 80
    policy = NaclPolicy()
    prompt = prompt_for("nacl", n=n)
    scores = window_attention(prompt)
    kept = policy.select(prompt, num_kept)
    protected = set(range(4)) | set(range(n - 8, n))  # the last max(8, 1% of 400)
    unprotected = num_kept - len(protected)
    top = round(unprotected / 3)
    for head in range(2):
        chosen = set(kept[head].tolist())
        assert protected <= chosen
        ranked = [j for j in scores[head].argsort(descending=True).tolist() if j not in protected]
        assert set(ranked[:top]) <= chosen
        assert chosen - protected - set(ranked[:top])  # the sampled part


def test_nacl_reads_at_least_20_proxy_queries_and_protects_the_last_1_percent():
    """The proxy queries: the last 1%, never fewer than 20 (the authors' code evicts no
    prompt under 2,048 tokens); protected: the last 1%, at least 8, sized apart from them."""
    policy = NaclPolicy()
    assert [(policy.query_window(n), policy.recent_window(n)) for n in (15, 400, 1003, 5000)] == [
        (15, 8), (20, 8), (20, 11), (50, 50)]
    n = 400
    prompt = prompt_for("nacl", n=n)
    assert prompt.queries.shape[1] == 20
    keys = prompt.keys.clone()
    keys[:, n - 25] = prompt.queries[::2, 0] * 40  # what each row's oldest proxy query (n - 20) attends to
    kept = policy.select(CachedPrompt(keys, prompt.queries, prompt.scale, prompt.generator, prompt.kv_heads), 4 + 8 + 3)
    for row in kept.tolist():  # the best-scored third of 3 unprotected tokens, then 2 sampled
        assert {0, 1, 2, 3, n - 25} | set(range(n - 8, n)) <= set(row)


def test_nacl_samples_in_proportion_to_the_scores():
    """A token holding most of the attention mass is sampled far more often than one
    holding little, over many seeds."""
    n = 300
    counts = torch.zeros(n)
    for seed in range(60):
        prompt = prompt_for("nacl", n=n, seed=0)
        prompt = CachedPrompt(prompt.keys, prompt.queries, prompt.scale, torch.Generator().manual_seed(seed), prompt.kv_heads)
        for j in NaclPolicy().select(prompt, 40)[0].tolist():
            counts[j] += 1
    scores = window_attention(prompt_for("nacl", n=n))[0]
    middle = torch.arange(4, n - 8)
    by_score = middle[scores[middle].argsort(descending=True)]
    assert counts[by_score[20:60]].mean() > 2 * counts[by_score[-40:]].mean()  # uniform sampling: about equal


def test_sca_keeps_one_of_each_group_of_near_duplicate_keys():
    """Keys that are copies of 6 prototypes: after the sinks and recent tokens, SCA adds
    one token of every prototype not yet kept before any duplicate."""
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=-1)
    which = torch.randint(0, 6, (100,), generator=gen)
    keys = (prototypes[which] + 1e-3 * torch.randn(100, 16, generator=gen))[None]
    kept = POLICIES["sca"]().select(cached_prompt(n=100, rows=1, window=0, keys=keys), 12 + 6)[0]
    assert set(which[kept].tolist()) == set(range(6))


def test_sca_adds_the_token_farthest_from_everything_kept_at_each_step():
    """The greedy rule written out one token at a time, per layer of two KV heads: the
    seeds (sinks and recent tokens), then the token whose distance to its nearest kept
    token is largest, a distance being the mean of the heads' cosine distances. Both
    heads of a layer keep the layer's tokens."""
    prompt = cached_prompt(n=40, rows=6, window=0, kv_heads=2)
    policy = POLICIES["sca"]()
    keys = torch.nn.functional.normalize(prompt.keys, dim=-1)
    got = policy.select(prompt, 20)
    for layer in range(3):
        heads = keys[2 * layer : 2 * layer + 2]
        kept = list(range(policy.sinks)) + list(range(40 - policy.recent, 40))
        while len(kept) < 20:
            distance = {j: min(1 - float((heads[:, j] * heads[:, k]).sum(-1).mean()) for k in kept) for j in range(40) if j not in kept}
            kept.append(max(distance, key=distance.get))
        assert got[2 * layer].tolist() == got[2 * layer + 1].tolist() == sorted(kept)


@pytest.mark.parametrize("num_pieces,dim", [(2, 16), (1, 24), (4, 12)])
def test_the_lazy_farthest_point_loop_chooses_as_the_eager_loop(num_pieces: int, dim: int):
    """The eager loop in torch (every candidate's similarity to its nearest chosen token
    updated at every step, the lowest chosen next; a similarity being the mean of the
    pieces' cosines) against the lazy heap, on enough tokens that stale bounds reach the
    top of the heap and are brought up to date there. The loop is compiled per width
    (pieces x dim): three widths in one process each get their own."""
    gen = torch.Generator().manual_seed(0)
    shape = (3, num_pieces, 300)
    pieces = torch.randn(*shape, dim, generator=gen) * torch.rand(*shape, 1, generator=gen)  # norms vary
    seeds = [0, 1, 298, 299]
    for row, got in zip(pieces, farthest_points(pieces.numpy(), seeds, 150)):
        unit = torch.nn.functional.normalize(row, dim=-1)
        similarity = torch.einsum("pid,pjd->ij", unit, unit) / num_pieces
        chosen = list(seeds)
        nearest = similarity[:, chosen].amax(dim=1)
        while len(chosen) < 150:
            nearest[chosen] = float("inf")
            chosen.append(int(nearest.argmin()))
            nearest = torch.maximum(nearest, similarity[:, chosen[-1]])
        assert got.tolist() == sorted(chosen)


ISSUE_PROMPT = 1035  # the retrieval prompt of the report: kv_budget 1 kept 0-3 and 1024-1030, not its question's end


def layered_prompt(name: str, n: int, seed: int = 0) -> CachedPrompt:
    """Two layers of two KV heads each (SCA chooses per layer), with the policy's query window."""
    return prompt_for(name, n, seed=seed, rows=4, kv_heads=2)


def test_every_policy_protects_the_prompts_last_tokens_then_its_sinks():
    n = ISSUE_PROMPT
    expected = {  # (last tokens, sinks): the end of the question first
        "nacl": (11, 4),  # max(8, 1% of 1,035); its 20 proxy queries are read, not all protected
        "snapkv": (64, 0),  # the observation window
        "sca": (8, 4), "streaming_llm": (8, 4), "random": (8, 0),
        "expected_attention": (0, 4),  # as in the paper: the sinks only
    }
    assert set(expected) == set(POLICIES)
    for name, (recent, sinks) in expected.items():
        protected = POLICIES[name]().protected_tokens(n)
        assert protected == list(range(n - 1, n - 1 - recent, -1)) + list(range(sinks)), name
        assert min_budget(name, n) == recent + sinks
    assert POLICIES["sca"]().protected_tokens(10) == list(range(9, 1, -1)) + [0, 1]  # no token twice
    assert min_budget("snapkv", 20) == 20  # a prompt shorter than the window: all of it


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_keeps_what_it_protects_at_the_smallest_accepted_budget(name):
    """The report's case for every policy: at the smallest budget ``rule_for`` accepts, the
    plan's kept tokens, in every layer and KV head, hold the prompt's last tokens (its
    question; at least the last 8 for every policy but expected attention, which protects
    the sinks only, as its paper does), and the selection at exactly that budget keeps
    every protected token."""
    n = ISSUE_PROMPT
    smallest = min_budget(name, n)
    rule = EvictionSettings().rule_for({"kv_eviction": name, "kv_budget": smallest}, n)
    plan = plan_eviction(rule.policy, n, rule.tokens_to_keep(n), 32, 0)
    policy = POLICIES[name]()
    last = set(range(n - policy.recent_window(n), n))
    assert last >= set(range(n - (0 if name == "expected_attention" else policy.recent), n))
    for num_kept in (plan.num_kept, smallest):
        kept = policy.select(layered_prompt(name, n), num_kept)
        assert kept.shape == (4, num_kept)
        for row in kept.tolist():
            assert set(policy.protected_tokens(n)) <= set(row) and last <= set(row), (name, num_kept)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_below_its_protected_tokens_a_policy_keeps_the_most_recent_first(name):
    """Defence in depth: asked for fewer tokens than it protects (no plan does that), a
    policy keeps the end of the prompt it protects before its sinks."""
    n = 300
    policy = POLICIES[name]()
    window = policy.recent_window(n)
    for num_kept in (1, 4, window, min_budget(name, n) - 1):
        for row in policy.select(layered_prompt(name, n), num_kept).tolist():
            assert row[num_kept - min(num_kept, window):] == list(range(n - min(num_kept, window), n)), (name, num_kept)
            assert len(row) == num_kept


def test_keep_best_keeps_the_protected_tokens_whatever_the_scores():
    scores = torch.tensor([[float("inf"), 5.0, float("inf"), 1.0, 7.0, 0.0]])
    assert keep_best(scores, 3, protected=[5, 3]).tolist() == [[0, 3, 5]]
    assert keep_best(scores, 1, protected=[5, 3]).tolist() == [[5]]  # the first protected win


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_request_budget_below_the_protected_tokens_is_refused_with_the_smallest_budget(name):
    n = ISSUE_PROMPT
    smallest = min_budget(name, n)
    for server in (EvictionSettings(), EvictionSettings(policy=name, keep_ratio=0.5)):
        xargs = {"kv_budget": smallest - 1} if server.policy else {"kv_eviction": name, "kv_budget": smallest - 1}
        message = f"too small for {name} on a {n}-token prompt: the smallest budget is {smallest} "
        with pytest.raises(EvictionSettingsError, match=message):
            server.rule_for(xargs, num_prompt=n)
        assert server.rule_for({**xargs, "kv_budget": smallest}, num_prompt=n) == EvictionRule(name, budget=smallest)
    with pytest.raises(EvictionSettingsError, match=r"the smallest budget is 15 \(nacl always keeps the prompt's last 11 tokens"):
        EvictionSettings().rule_for({"kv_eviction": "nacl", "kv_budget": 1}, num_prompt=n)  # the report's request
    with pytest.raises(EvictionSettingsError, match=r"budget is 4 \(expected_attention always keeps the prompt's first 4 tokens, the attention sinks\)"):
        EvictionSettings().rule_for({"kv_eviction": "expected_attention", "kv_budget": 3}, num_prompt=n)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_the_server_default_and_keep_ratios_never_plan_fewer_than_the_protected_tokens(name):
    """The server's own budget or ratio, and a request's ratio, are no error below the
    minimum: the plan keeps the protected tokens, and so the question (the last 8 at
    least, expected attention apart: test_every_policy_protects_the_prompts_last_tokens...)."""
    n = ISSUE_PROMPT
    smallest = min_budget(name, n)
    for server, xargs in [
        (EvictionSettings(policy=name, budget=1), None),
        (EvictionSettings(policy=name, keep_ratio=0.001), None),
        (EvictionSettings(), {"kv_eviction": name, "kv_keep_ratio": 0.001}),
    ]:
        rule = server.rule_for(xargs, num_prompt=n)
        assert rule.tokens_to_keep(n) < smallest
        plan = plan_eviction(rule.policy, n, rule.tokens_to_keep(n), 32, 0)
        assert plan.num_kept >= smallest and plan.num_evicted % 32 == 0
        assert plan == plan_eviction(name, n, smallest, 32, 0)  # the floor, rounded to whole blocks
        policy = POLICIES[name]()
        for row in policy.select(layered_prompt(name, n), plan.num_kept).tolist():
            assert set(policy.protected_tokens(n)) <= set(row)
    assert plan_eviction("snapkv", 40, 1, 32, 0) is None  # the floor leaves no whole block to free


def test_plans_free_whole_blocks_and_keep_at_most_a_block_more_than_the_budget():
    plan = plan_eviction("nacl", 1000, 200, 32, 0)
    assert plan.num_evicted % 32 == 0 and 200 <= plan.num_kept < 200 + 32
    assert plan.evicted_blocks(32) == 25 and plan.num_kept == 200
    assert plan_eviction("nacl", 1000, 990, 32, 0) is None  # no whole block to free
    assert EvictionPlan.from_args(plan.as_args()) == plan


def test_rules_keep_a_ratio_or_a_budget():
    assert EvictionRule("nacl", keep_ratio=0.2).tokens_to_keep(1001) == math.ceil(0.2 * 1001)
    assert EvictionRule("nacl", budget=64).tokens_to_keep(1001) == 64
    assert EvictionRule("nacl").tokens_to_keep(100) == 20  # the default ratio


@pytest.mark.parametrize("xargs,message", [
    ({"kv_eviction": "h2o"}, "unknown KV eviction policy"),
    ({"kv_eviction": "nacl", "kv_keep_ratio": 0}, "must be in (0, 1]"),
    ({"kv_eviction": "nacl", "kv_keep_ratio": 1.5}, "must be in (0, 1]"),
    ({"kv_eviction": "nacl", "kv_keep_ratio": "half"}, "must be in (0, 1]"),
    ({"kv_eviction": "nacl", "kv_budget": 0}, "positive number of tokens"),
    ({"kv_eviction": "nacl", "kv_budget": 64, "kv_keep_ratio": 0.5}, "not both"),
    ({"kv_keep_ratio": 0.5}, "need a policy"),
    ({"kv_eviction": "nacl", "kv_budget": 500}, "larger than the prompt"),
    ({"kv_eviction": "none", "kv_keep_ratio": 5}, "must be in (0, 1]"),  # off, but no junk beside it
    ({"kv_eviction": "none", "kv_budget": -1}, "positive number of tokens"),
    ({"kv_eviction": "nacl", "kv_budget": None}, "kv_budget cannot be null"),
])
def test_bad_request_settings_are_errors(xargs, message):
    with pytest.raises(EvictionSettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EvictionSettings().rule_for(xargs, num_prompt=400)


def test_a_refusal_never_echoes_a_whole_value():
    with pytest.raises(EvictionSettingsError) as refused:
        EvictionSettings().rule_for({"kv_eviction": "s" * 300_000})
    assert len(str(refused.value)) < 200 and "..." in str(refused.value)
    assert EvictionSettings().rule_for({"kv_eviction": "none", "kv_keep_ratio": 0.5}, num_prompt=400) is None


def test_server_default_applies_from_min_prompt_and_requests_override_it():
    server = EvictionSettings(policy="snapkv", keep_ratio=0.5, min_prompt=100)
    assert server.rule_for(None, num_prompt=99) is None
    assert server.rule_for(None, num_prompt=100) == EvictionRule("snapkv", keep_ratio=0.5)
    assert server.rule_for({"kv_eviction": "none"}, num_prompt=500) is None
    assert server.rule_for({"kv_budget": 64}, num_prompt=500) == EvictionRule("snapkv", budget=64)
    assert server.rule_for({"kv_eviction": "nacl"}, num_prompt=50) == EvictionRule("nacl")
    assert EvictionSettings().rule_for(None, num_prompt=5000) is None  # off by default


def test_a_server_budget_above_a_short_prompt_keeps_it_whole_where_a_request_budget_is_an_error():
    server = EvictionSettings(policy="nacl", budget=256)
    rule = server.rule_for(None, num_prompt=100)
    assert rule == EvictionRule("nacl", budget=256)
    assert plan_eviction(rule.policy, 100, rule.tokens_to_keep(100), 32, 0) is None  # nothing evicted
    with pytest.raises(EvictionSettingsError, match="larger than the prompt"):
        server.rule_for({"kv_budget": 256}, num_prompt=100)


def test_server_settings_are_checked_at_start_up():
    with pytest.raises(ValueError, match=r"kv_eviction: the KV keep ratio must be in \(0, 1\], got 2"):
        eviction_settings({"kv_eviction": {"policy": "nacl", "keep_ratio": 2}})
    with pytest.raises(ValueError, match="polcy: unknown key"):
        eviction_settings({"kv_eviction": {"polcy": "nacl"}})
    refused = {  # what the reader refuses rather than converts or drops
        '{"kv_eviction": {"policy": "nacl", "keep_ratio": true}}': "keep_ratio: Input should be a valid number",
        '{"kv_eviction": {"policy": "nacl", "budget": "12"}}': "budget: Input should be a valid integer",
        '{"kv_eviction": {"keep_ratio": 5}}': "a keep ratio or budget needs a policy",
        '{"kv_eviction": 0}': "expected a mapping of settings, got int",
        '[1]': "--additional-config must be a JSON object",
        '{bad': "--additional-config is not JSON",
    }
    for config, message in refused.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            eviction_settings(config)
    with pytest.raises(ValueError, match="min_prompt: Input should be greater than or equal to 0"):
        eviction_settings({"kv_eviction": {"policy": "nacl", "min_prompt": -1}})
    assert eviction_settings('{"kv_eviction": {"policy": "sca"}}').policy == "sca"
    assert eviction_settings(None) == EvictionSettings()


def _keep_best_by_sorting(scores: torch.Tensor, num_kept: int, protected: list[int]) -> list[list[int]]:
    """keep_best's rule spelled out: protected first (in their order), then by score
    descending (NaN lowest above -inf), then the earlier token."""
    kept = []
    for row in scores.tolist():
        def rank(j):
            score = row[j]
            score = -3.4e38 if math.isnan(score) else score
            return (protected.index(j) if j in protected else len(protected), -score, j)
        kept.append(sorted(sorted(range(len(row)), key=rank)[:num_kept]))
    return kept


@pytest.mark.parametrize("seed", range(6))
def test_keep_best_on_cpu_and_with_topk_follow_the_rule(seed):
    """The CPU worker's compiled selection and the torch one (other devices) keep the
    tokens the rule names: ties, infinities, NaN, zeros of both signs and protected
    tokens included."""
    g = torch.Generator().manual_seed(seed)
    n = 120
    scores = torch.rand(6, n, generator=g)
    scores[1] = (scores[1] * 4).round()  # many ties
    scores[2] = scores[2].log() - 0.5  # negative
    scores[3, ::7], scores[3, 1::7] = float("-inf"), float("inf")
    scores[4, ::5], scores[4, 1::5] = 0.0, -0.0
    scores[5, ::9] = float("nan")
    protected = [n - 1 - i for i in range(10)] + [0, 1, 2]
    for num_kept in (0, 1, 5, 13, 40, 100, n):
        for first in ([], protected[:num_kept]):
            expected = _keep_best_by_sorting(scores, num_kept, first)
            assert keep_best(scores, num_kept, first).tolist() == expected, (num_kept, first)
            clean = torch.nan_to_num(scores, nan=torch.finfo(torch.float32).min, posinf=math.inf, neginf=-math.inf)
            assert keep_best_torch(clean, num_kept, first).tolist() == expected, (num_kept, first)


@pytest.mark.parametrize("name", sorted(n for n, cls in POLICIES.items() if not cls.reads_keys))
def test_a_policy_that_reads_no_keys_chooses_the_same_without_them(name):
    """The worker gathers no keys for a policy with reads_keys False: given (rows, n, 0)
    it must choose exactly what it chooses from the keys."""
    prompt = cached_prompt(kv_heads=2, rows=4)
    chosen = [POLICIES[name]().select(CachedPrompt(keys, prompt.queries, prompt.scale, torch.Generator().manual_seed(0),
                                                   prompt.kv_heads), 30)
              for keys in (prompt.keys, prompt.keys[..., :0])]
    assert torch.equal(*chosen)


def test_only_recency_and_random_choose_without_the_keys():
    assert sorted(n for n, cls in POLICIES.items() if not cls.reads_keys) == ["random", "streaming_llm"]


def test_keep_best_refuses_more_tokens_than_the_row_has():
    with pytest.raises(ValueError, match="cannot keep 5 of 3"):
        keep_best(torch.rand(1, 3), 5)


def test_sca_and_the_compaction_start_no_numba_threading_layer_and_no_second_openmp_runtime():
    """SCA's loop and the compaction run on Python threads (run_in_parts), not on a numba
    threading layer: its OpenMP layer loads the system's libgomp beside torch's, which
    made torch's CPU attention start a thread team per matrix product in a process that
    also ran a vLLM engine."""
    script = ("import json, numba, numpy as np, torch\n"
              "torch.set_num_threads(2)\n"
              "from vllm_plugins.eviction.farthest_points import farthest_points\n"
              "from vllm_plugins_kernels import compact_kept_layers_\n"
              "farthest_points(np.random.rand(2, 2, 64, 8).astype(np.float32), [0, 63], 16)\n"
              "caches = [(torch.zeros(4, 1, 4, 8), torch.zeros(4, 1, 4, 8)) for _ in range(2)]\n"
              "compact_kept_layers_(caches, torch.tensor([[0, 1, 2, 3]]), torch.tensor([[[[1, 5]]]] * 2), torch.tensor([8]))\n"
              "try:\n    print(numba.threading_layer())\nexcept ValueError:\n    print('none')\n"
              "print(json.dumps(sorted({line.split()[-1] for line in open('/proc/self/maps') if 'gomp' in line})))\n")
    layer, runtimes = run_python(script).splitlines()[-2:]
    assert layer == "none"
    runtimes = json.loads(runtimes)
    assert len(runtimes) == 1 and "/torch/lib/" in runtimes[0], runtimes
