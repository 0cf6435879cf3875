import torch

from vllm_plugins.adapters.common.pooling import AttentionPooling


def _pool(seed: int = 0) -> AttentionPooling:
    pool = AttentionPooling(8, num_queries=2)
    with torch.no_grad():
        pool.query.copy_(torch.randn(8, 2, generator=torch.Generator().manual_seed(seed)))
    return pool


def test_pooling_ignores_padding_values():
    pool = _pool()
    hidden = torch.randn(1, 6, 8)
    mask = torch.tensor([[True, True, True, True, False, False]])
    noisy = hidden.clone()
    noisy[:, 4:] = 1e4 * torch.randn(1, 2, 8)
    assert torch.equal(pool(hidden, mask), pool(noisy, mask))


def test_pooling_is_invariant_to_batch_composition():
    pool = _pool(1)
    prompt = torch.randn(1, 5, 8)
    alone = pool(prompt, torch.ones(1, 5, dtype=torch.bool))
    # the same prompt right-padded, next to two other prompts of other lengths
    batch = torch.randn(3, 9, 8)
    batch[1, :5] = prompt[0]
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, :9], mask[1, :5], mask[2, :2] = True, True, True
    assert torch.allclose(pool(batch, mask)[1], alone[0], atol=1e-6)


def test_pooling_attends_to_the_prompt_not_an_average_of_everything():
    pool = _pool(2)
    hidden = torch.randn(1, 4, 8)
    full = pool(hidden, torch.ones(1, 4, dtype=torch.bool))
    part = pool(hidden, torch.tensor([[True, True, False, False]]))
    assert not torch.allclose(full, part)


def test_pooling_refuses_an_empty_prompt():
    pool = _pool()
    try:
        pool(torch.randn(1, 3, 8), torch.zeros(1, 3, dtype=torch.bool))
    except ValueError as err:
        assert "at least one prompt token" in str(err)
    else:
        raise AssertionError("empty prompt was pooled")


def test_chunked_pooling_equals_one_pass():
    pool = _pool(3)
    hidden = torch.randn(1, 11, 8)
    one_pass = pool(hidden, torch.ones(1, 11, dtype=torch.bool))[0]
    stats = pool.partial(hidden[0, :4]).merge(pool.partial(hidden[0, 4:5])).merge(pool.partial(hidden[0, 5:]))
    assert torch.allclose(stats.pooled(), one_pass, atol=1e-6)
