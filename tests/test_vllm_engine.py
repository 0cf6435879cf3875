"""The demo model in a real vLLM 0.32.0 engine."""

import pytest

from vllm_plugins.adapters.common.lm import PlainLM
from vllm_plugins.tasks.ops import OPS
from vllm_plugins.tasks.suite import format_example
from vllm_plugins.training.evaluate import generate_answers
from vllm_plugins.training.recipes import load_base
from vllm_plugins.vllm_version import SUPPORTED_VLLM, UnsupportedVllmError, require_supported_vllm

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from vllm_plugins.serving.offline import running_engine

    with running_engine(tiny_llama, max_model_len=512) as llm:
        yield llm


def test_demo_model_generates_in_vllm_like_transformers(engine, tiny_llama):
    from vllm_plugins.serving.offline import greedy_texts

    prompts = [
        format_example(list(letters), op, instructed=True).prompt
        for letters, op in zip(["abc", "qwerty", "zz", "hello", "mno"], OPS.values())
    ] + ["a b c =", "x y ="]
    base, tokenizer = load_base(tiny_llama)
    expected = generate_answers(PlainLM(base), tokenizer, prompts)
    got = greedy_texts(engine, prompts)
    assert got == expected
    assert any(got)  # the engine produced tokens, not only empty strings


def test_installed_vllm_is_the_supported_version():
    assert require_supported_vllm().split("+")[0] == SUPPORTED_VLLM


def test_another_vllm_version_is_refused_loudly(monkeypatch):
    import vllm_plugins.vllm_version as version

    monkeypatch.setattr(version, "installed_vllm_version", lambda: "0.31.2")
    with pytest.raises(UnsupportedVllmError, match="supports vLLM 0.32.0 only"):
        version.require_supported_vllm()


def test_general_plugin_is_found_by_vllm():
    from vllm.plugins import load_plugins_by_group

    from vllm_plugins.serving.plugin import register

    assert load_plugins_by_group("vllm.general_plugins").get("vllm_plugins") is register
