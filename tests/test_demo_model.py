"""The demo base model that ships with the package: the files its fingerprint records,
the demo preset's spec, a model that still answers, installed instead of trained."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_plugins.demo_model import PRESETS, build_demo_model, demo_model_path, shipped_build
from vllm_plugins.demo_model import build as build_module
from vllm_plugins.demo_model.build import BUILD_INFO, FINGERPRINT, fingerprint, install_shipped
from vllm_plugins.tasks.retrieval import make_retrieval_example


@pytest.fixture(scope="module")
def shipped():
    path = shipped_build(PRESETS["demo"])
    assert path is not None, "the demo preset's build is not shipped (or its spec changed without a rebuild)"
    return path


def test_shipped_files_match_their_fingerprint_and_the_demo_preset(shipped):
    assert fingerprint(shipped) == json.loads((shipped / FINGERPRINT).read_text())
    assert set(fingerprint(shipped)) >= {"model.safetensors", "config.json", "tokenizer.json", BUILD_INFO}
    spec = json.loads((shipped / BUILD_INFO).read_text())["spec"]
    assert spec == json.loads(json.dumps(dataclasses.asdict(PRESETS["demo"])))


def test_shipped_model_answers_retrieval_questions(shipped):
    """Loaded with transformers, greedy answers copy the facts the question asks for."""
    tokenizer = AutoTokenizer.from_pretrained(shipped)
    model = AutoModelForCausalLM.from_pretrained(shipped).eval()
    rng = random.Random(1)
    right = 0
    for _ in range(4):
        example = make_retrieval_example(rng, 200)
        ids = tokenizer(example.prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=len(example.questions[0].facts), do_sample=False)
        right += tokenizer.decode(out[0, ids.shape[1]:]).split() == example.questions[0].facts
    assert right >= 3


def test_build_installs_the_shipped_build_without_training(tmp_path, monkeypatch, shipped):
    monkeypatch.setenv("VLLM_PLUGINS_HOME", str(tmp_path))
    monkeypatch.setattr(build_module, "_train", lambda *a: pytest.fail("trained instead of installing"))
    out = build_demo_model("demo")
    assert out == demo_model_path(PRESETS["demo"]) and out.parent.parent == tmp_path
    assert fingerprint(out) == fingerprint(shipped)
    assert build_demo_model("demo") == out  # then reused


def test_a_shipped_build_that_does_not_match_its_fingerprint_is_refused(tmp_path, shipped):
    tampered = tmp_path / "tampered"
    shutil.copytree(shipped, tampered)
    (tampered / "config.json").write_text((tampered / "config.json").read_text().replace("128", "256", 1))
    out = tmp_path / "models" / shipped.name
    with pytest.raises(RuntimeError, match="does not match its fingerprint"):
        install_shipped(tampered, out)
    assert list(out.parent.iterdir()) == []  # neither the model nor a half-built copy
    shutil.rmtree(tampered)
    shutil.copytree(shipped, tampered)
    (tampered / "extra").mkdir()
    (tampered / "extra" / "weights.bin").write_bytes(b"not recorded")
    with pytest.raises(RuntimeError, match="does not match its fingerprint"):
        install_shipped(tampered, out)


def test_a_broken_model_directory_is_replaced_not_reused(tmp_path, monkeypatch, shipped):
    """A directory left by an interrupted or concurrent build (here: build info, no
    weights) is not a build: it is replaced by the shipped one."""
    monkeypatch.setenv("VLLM_PLUGINS_HOME", str(tmp_path))
    out = demo_model_path(PRESETS["demo"])
    out.mkdir(parents=True)
    (out / BUILD_INFO).write_text("{}")
    assert build_demo_model("demo") == out and fingerprint(out) == fingerprint(shipped)


def test_a_whole_build_published_first_by_another_process_is_kept(tmp_path, shipped):
    out = tmp_path / "models" / shipped.name
    install_shipped(shipped, out)
    first = out.stat().st_ino
    install_shipped(shipped, out)  # a second, concurrent install finishing later
    assert out.stat().st_ino == first and sorted(p.name for p in out.parent.iterdir()) == [shipped.name]
