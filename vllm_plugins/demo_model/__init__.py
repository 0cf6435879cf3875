"""The embedded demo base model: a small Llama trained here from a seeded corpus."""

from vllm_plugins.demo_model.build import PRESETS, DemoModelSpec, build_demo_model, demo_model_path, shipped_build

__all__ = ["PRESETS", "DemoModelSpec", "build_demo_model", "demo_model_path", "shipped_build"]
