"""Build, train and cache the demo base model.

The model is a Llama (or Qwen2) decoder with a word-level tokenizer, trained on the CPU
from the seeded corpus of :mod:`vllm_plugins.demo_model.corpus`, and saved in Hugging
Face format so that both transformers and vLLM load it. A build is cached under
``$VLLM_PLUGINS_HOME/models/<preset>-<spec hash>``; asking again for the same spec reuses it.

The demo preset's build ships with the package (``shipped/<preset>-<spec hash>``, 4 MB):
training it takes 30 minutes or more on a 2-core CPU, so a fresh machine installs the
shipped files instead, after checking them against the fingerprint (sha256 per file)
every build records. ``force=True`` (``vllm-plugins build-demo-model --force``) trains from
scratch; a changed spec has another hash, so it never picks up a stale shipped build.
The shipped build predates the shared training loop (:mod:`vllm_plugins.training.loop`),
whose transformers schedule starts its warm-up at 0: the shipped model had the same
schedule one step earlier during the first 30 of its 1,900 steps (learning rate
(step + 1) / 30 of the peak, not step / 30), and the same after.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from vllm_plugins import paths
from vllm_plugins.adapters.storage import file_sha256
from vllm_plugins.demo_model.corpus import CorpusSampler, corpus_vocabulary
from vllm_plugins.demo_model.tokenizer import SPECIAL_TOKENS, save_tokenizer, train_tokenizer
from vllm_plugins.training.loop import fit

logger = logging.getLogger(__name__)

BUILD_INFO = "demo_model_build.json"
FINGERPRINT = "fingerprint.json"
SHIPPED = Path(__file__).parent / "shipped"
WARMUP_STEPS = 30


@dataclass(frozen=True)
class RetrievalPhase:
    """``steps`` training steps whose retrieval batches have contexts of ``length`` words."""

    steps: int
    length: int
    batch: int


@dataclass(frozen=True)
class DemoModelSpec:
    name: str
    architecture: str = "llama"  # "llama" or "qwen2"
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 4096
    operation_batch: int = 128
    phases: tuple[RetrievalPhase, ...] = field(default_factory=tuple)
    learning_rate: float = 3e-3
    seed: int = 0
    corpus_version: int = 7  # bump when the corpus changes: the cache key must change too

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


PRESETS: dict[str, DemoModelSpec] = {
    # The demo's base model: operations and retrieval up to 1,024-word contexts.
    "demo": DemoModelSpec(
        name="demo",
        phases=(RetrievalPhase(1100, 64, 32), RetrievalPhase(500, 256, 16), RetrievalPhase(300, 1024, 4)),
    ),
    # A quick build for tests: same code path, short schedule.
    "tiny": DemoModelSpec(
        name="tiny",
        num_layers=2,
        operation_batch=64,
        phases=(RetrievalPhase(60, 64, 8),),
    ),
    "tiny-qwen2": DemoModelSpec(
        name="tiny-qwen2",
        architecture="qwen2",
        num_layers=2,
        operation_batch=64,
        phases=(RetrievalPhase(60, 64, 8),),
    ),
}


def demo_model_path(spec: DemoModelSpec) -> Path:
    return paths.models_dir() / f"{spec.name}-{spec.digest()}"


def _model_config(spec: DemoModelSpec, tokenizer) -> LlamaConfig | Qwen2Config:
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if spec.architecture == "llama":
        return LlamaConfig(**common)
    if spec.architecture == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown architecture {spec.architecture!r}: use 'llama' or 'qwen2'")


def _train(model, sampler: CorpusSampler, spec: DemoModelSpec) -> list[float]:
    """Next-token loss on one operation batch and one retrieval batch per step, the
    retrieval contexts growing phase by phase (:class:`RetrievalPhase`)."""
    lengths = [(phase.batch, phase.length) for phase in spec.phases for _ in range(phase.steps)]

    def step_loss(step: int) -> float:
        loss = 0.0
        for batch in (sampler.operation_batch(spec.operation_batch), sampler.retrieval_batch(*lengths[step])):
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
            out.loss.backward()
            loss += out.loss.item()
        return loss

    return fit(model, list(model.parameters()), step_loss, spec.total_steps, spec.learning_rate,
               warmup_steps=WARMUP_STEPS, min_lr_rate=0.1, weight_decay=0.01, desc="build-demo-model")


def build_demo_model(spec: DemoModelSpec | str = "demo", force: bool = False) -> Path:
    """Return the directory of the built model, building it first if it is not cached."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise KeyError(f"unknown demo model preset {spec!r}; presets: {', '.join(PRESETS)}")
        spec = PRESETS[spec]
    out = demo_model_path(spec)
    if not force and is_complete(out):
        logger.info(f"reusing {out}")
        return out
    if not force and (shipped := shipped_build(spec)) is not None:
        logger.info(f"installing the shipped build {shipped.name} into {out} (--force trains it instead)")
        install_shipped(shipped, out)
        return out
    logger.info(f"building {spec.name} ({spec.total_steps} steps) into {out}")
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    words = corpus_vocabulary()
    tokenizer = train_tokenizer([" ".join(words)])
    vocab = tokenizer.get_vocab()
    missing = [w for w in words + SPECIAL_TOKENS if w not in vocab]
    if missing:
        raise RuntimeError(f"tokenizer lacks corpus words: {missing[:5]}")
    config = _model_config(spec, tokenizer)
    model_cls = LlamaForCausalLM if spec.architecture == "llama" else Qwen2ForCausalLM
    model = model_cls(config)
    sampler = CorpusSampler(vocab, seed=spec.seed)
    started = time.monotonic()
    losses = _train(model, sampler, spec)
    seconds = time.monotonic() - started

    tmp = _staging(out)
    model.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(tokenizer, tmp)
    info = {
        "spec": dataclasses.asdict(spec),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "final_loss": losses[-1] if losses else None,
    }
    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2))
    (tmp / FINGERPRINT).write_text(json.dumps(fingerprint(tmp), indent=2))
    _publish(tmp, out, replace=True)
    logger.info(f"trained in {seconds:.0f}s: {out}")
    return out


def fingerprint(model_dir: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file of a built model but the fingerprint itself."""
    return {str(path.relative_to(model_dir)): file_sha256(path) for path in sorted(model_dir.rglob("*"))
            if path.is_file() and path != model_dir / FINGERPRINT}


def is_complete(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a whole build: exactly the files its fingerprint records."""
    try:
        return fingerprint(model_dir) == json.loads((model_dir / FINGERPRINT).read_text())
    except (OSError, ValueError):
        return False


def shipped_build(spec: DemoModelSpec) -> Path | None:
    """The build of ``spec`` that ships with the package, if there is one."""
    path = SHIPPED / demo_model_path(spec).name
    return path if (path / FINGERPRINT).is_file() else None


def install_shipped(source: Path, out: Path) -> None:
    """Copy a shipped build to ``out``. Raises RuntimeError, leaving ``out`` as it was, if
    the copy's files are not the ones its fingerprint records."""
    tmp = _staging(out)
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    if not is_complete(tmp):
        shutil.rmtree(tmp)
        raise RuntimeError(f"the shipped demo model {source} does not match its fingerprint; "
                           "train it with `vllm-plugins build-demo-model --force`")
    _publish(tmp, out)


def _staging(out: Path) -> Path:
    """A new directory beside ``out`` of this process's own, where a build is put together."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))


def _publish(tmp: Path, out: Path, replace: bool = False) -> None:
    """Move the finished build ``tmp`` to ``out``. What is at ``out`` goes first if
    ``replace`` or if it is not a whole build; a whole build that another process
    published meanwhile is kept, and ``tmp`` dropped."""
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif replace or (out.exists() and not is_complete(out)):
        shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(out):
            raise
