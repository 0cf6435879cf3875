"""The ``vllm-plugins`` command line, run as a user runs it: in a child process, or (for
refusals and short runs) through its ``main`` in this process."""

import json
import os
import subprocess
import sys

import pytest

from helpers import run_cli, run_python
from vllm_plugins.adapters.storage import MANIFEST


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_plugins.cli", *args],
        capture_output=True, text=True, env=os.environ.copy(), timeout=600,
    )


def test_train_writes_a_self_describing_adapter(tiny_llama, tmp_path):
    out = tmp_path / "acme"
    result = _cli("train", "--method", "para", "--task", "reverse", "--out", str(out),
                  "--steps", "3", "--preset", "tiny")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["method"] == "para" and manifest["task"] == "reverse"
    assert manifest["config"]["bottleneck"] > 0
    assert manifest["metrics"]["train_steps"] == 3
    assert (out / manifest["weights"]["file"]).is_file()


def test_train_reuses_an_adapter_only_if_it_is_the_one_asked_for(tiny_llama, tmp_path):
    out = tmp_path / "acme"

    def train(task: str, steps: int) -> tuple[int, str]:
        return run_cli("train", "--method", "para", "--task", task, "--out", str(out), "--steps", str(steps), "--preset", "tiny")

    assert train("reverse", 2)[0] == 0
    weights = (out / "adapter.safetensors").read_bytes()
    assert train("reverse", 2)[0] == 0 and (out / "adapter.safetensors").read_bytes() == weights
    for task, steps, differ in (("reverse", 3, "training steps 2"), ("upper", 2, "task 'reverse'")):
        status, stderr = train(task, steps)
        assert status == 2 and "holds another adapter" in stderr and differ in stderr, stderr
        assert (out / "adapter.safetensors").read_bytes() == weights


def test_train_never_writes_into_what_is_not_its_adapter(tiny_llama, tmp_path):
    """--out naming a file, a directory with other files, or an adapter whose manifest
    lacks fields: refused with exit 2, nothing written."""
    peft_dir, odd, file = tmp_path / "peft", tmp_path / "odd", tmp_path / "file"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text("{}")
    file.write_text("x")
    assert run_cli("train", "--method", "para", "--task", "reverse", "--out", str(odd), "--steps", "1", "--preset", "tiny")[0] == 0
    manifest = json.loads((odd / MANIFEST).read_text())
    (odd / MANIFEST).write_text(json.dumps({**manifest, "metrics": None, "base_model": "x"}))
    for out, message in ((file, "is not a directory"), (peft_dir, "holds no adapter manifest"), (odd, "holds another adapter")):
        before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
        status, stderr = run_cli("train", "--method", "para", "--task", "reverse", "--out", str(out), "--steps", "1", "--preset", "tiny")
        assert status == 2 and message in stderr, stderr
        assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before


def test_train_refuses_an_unknown_method(tmp_path):
    status, stderr = run_cli("train", "--method", "prefix-magic", "--task", "reverse", "--out", str(tmp_path))
    assert status == 2
    assert "invalid choice: 'prefix-magic'" in stderr


def test_bench_adapters_refuses_a_request_count_below_one(tmp_path):
    status, stderr = run_cli("bench", "adapters", "--json", str(tmp_path / "b.json"), "--requests", "0")
    assert status == 2
    assert "--requests: must be at least 1, got 0" in stderr


def test_serve_refuses_bad_kv_eviction_flags_before_starting_vllm(tmp_path):
    status, stderr = run_cli("serve", "some-model", "--adapter-dir", str(tmp_path), "--kv-eviction", "nacl", "--kv-keep-ratio", "2")
    assert status == 2
    assert "the KV keep ratio must be in (0, 1], got 2.0" in stderr
    status, stderr = run_cli("serve", "some-model", "--adapter-dir", str(tmp_path), "--kv-eviction", "h2o")
    assert status == 2 and "invalid choice: 'h2o'" in stderr
    status, stderr = run_cli("serve", "some-model", "--adapter-dir", str(tmp_path), "--kv-keep-ratio", "0.5", "--kv-budget", "9")
    assert status == 2 and "not allowed with argument" in stderr


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_serve_runs_the_worker_of_vllms_platform(tmp_path, monkeypatch, device):
    """CPU: the CPU worker, its KV cache sized. CUDA: the GPU worker on Model Runner V1
    (its environment), without async scheduling, the KV cache left to vLLM's memory share."""
    from vllm.platforms import current_platform

    from vllm_plugins.serving import launcher
    from vllm_plugins.serving.config import PromptAdapterSettings

    monkeypatch.setattr(type(current_platform), "device_type", device)
    argv = launcher.serve_argv("some-model", PromptAdapterSettings(dir=str(tmp_path)), ["--port", "9000"])
    environment = launcher.serve_environment()
    if device == "cpu":
        assert argv[argv.index("--worker-cls") + 1] == launcher.CPU_WORKER
        assert "--kv-cache-memory-bytes" in argv and "--no-async-scheduling" not in argv
        assert environment.get("VLLM_USE_V2_MODEL_RUNNER") == os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    else:
        assert argv[argv.index("--worker-cls") + 1] == launcher.GPU_WORKER
        assert "--no-async-scheduling" in argv and "--kv-cache-memory-bytes" not in argv
        assert environment["VLLM_USE_V2_MODEL_RUNNER"] == "0"
        for given in (["--async-scheduling"], ["--no-async-scheduling"]):
            argv = launcher.serve_argv("some-model", PromptAdapterSettings(dir=str(tmp_path)), given)
            assert argv.count(given[0]) == 1 and "--no-async-scheduling" not in argv[: -len(given)]
    assert argv[argv.index("--scheduler-cls") + 1] == launcher.SCHEDULER


@pytest.mark.parametrize("given", [{}, {"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": "active"}])
def test_serve_bounds_gnu_openmp_busy_wait_unless_the_user_set_how_threads_wait(monkeypatch, given):
    """vllm serve starts with GOMP_SPINCOUNT at the plugins' bound (torch's OpenMP threads
    would otherwise spin for milliseconds beside the eviction's loops); a user's
    GOMP_SPINCOUNT or OMP_WAIT_POLICY is passed on as it is."""
    from vllm_plugins.serving import launcher, openmp

    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    environment = launcher.serve_environment()
    if given:
        assert all(environment.get(k) == given.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"))
    else:
        assert environment["GOMP_SPINCOUNT"] == str(openmp.SPIN_COUNT)


def test_the_vllm_plugins_command_bounds_the_busy_wait_before_torch_loads():
    """The bench's engine runs in the command's own process: the variable must be in the
    environment when torch (and with it libgomp, which reads it once) is imported."""
    script = ("import os, sys\n"
              "seen = []\n"
              "def hook(event, args):\n"
              "    if event == 'import' and args[0] == 'torch' and not seen:\n"
              "        seen.append(os.environ.get('GOMP_SPINCOUNT'))\n"
              "sys.addaudithook(hook)\n"
              "import vllm_plugins.cli\n"
              "print(seen)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    from vllm_plugins.serving.openmp import SPIN_COUNT

    assert run_python(script, env).split("\n")[-2] == f"['{SPIN_COUNT}']"


@pytest.mark.parametrize("device", ["xpu", "tpu", "rocm"])
def test_serve_refuses_a_platform_it_has_no_worker_for(tmp_path, monkeypatch, device):
    """Anything but CPU and CUDA stops with a clear error before vLLM starts, instead of
    running a worker built for another platform there."""
    from vllm.platforms import current_platform

    from vllm_plugins.serving.config import PromptAdapterSettings
    from vllm_plugins.serving.launcher import serve_argv, serve_environment

    monkeypatch.setattr(type(current_platform), "device_type", device)
    with pytest.raises(ValueError, match=f"platform here is '{device}'"):
        serve_argv("some-model", PromptAdapterSettings(dir=str(tmp_path)), [])
    with pytest.raises(ValueError, match="CPU and CUDA"):
        serve_environment()


def test_serve_listens_on_loopback_unless_told_otherwise(tmp_path):
    from vllm_plugins.serving.config import PromptAdapterSettings
    from vllm_plugins.serving.launcher import serve_argv

    argv = serve_argv("some-model", PromptAdapterSettings(dir=str(tmp_path)), ["--port", "9000"])
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    for given in (["--host", "0.0.0.0"], ["--host=0.0.0.0"]):
        argv = serve_argv("some-model", PromptAdapterSettings(dir=str(tmp_path)), given)
        assert "127.0.0.1" not in argv and argv[-len(given):] == given


def test_serve_sizes_the_cpu_kv_cache_unless_told_otherwise(tmp_path):
    """vLLM's CPU worker refuses to start when other work holds 8% of memory, unless the
    KV cache has a size: serve gives it 4 GiB, and leaves a size the user chose alone."""
    from vllm_plugins.serving.config import PromptAdapterSettings
    from vllm_plugins.serving.launcher import CPU_KV_CACHE_BYTES, serve_argv

    argv = serve_argv("some-model", PromptAdapterSettings(dir=str(tmp_path)), [])
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(CPU_KV_CACHE_BYTES) == str(4 * 2**30)
    config = tmp_path / "vllm.yaml"
    config.write_text("gpu_memory_utilization: 0.5\nhost: 0.0.0.0\n")
    spellings = (["--kv-cache-memory-bytes", "1073741824"], ["--gpu-memory-utilization=0.5"], ["--kv_cache_memory_bytes=1G"],
                 ["--kv-cache-mem", "1G"], ["--device-memory-utilization", "0.5"], ["--gpu-mem", "0.5"], ["--config", str(config)])
    for given in spellings:
        argv = serve_argv("some-model", PromptAdapterSettings(dir=str(tmp_path)), given)
        assert str(CPU_KV_CACHE_BYTES) not in argv and argv[-len(given):] == given, given
    assert "127.0.0.1" not in serve_argv("some-model", PromptAdapterSettings(dir=str(tmp_path)), ["--config", str(config)])


@pytest.mark.engine
def test_bench_adapters_writes_figures_and_ratios(plugins_home, tmp_path):
    """The benchmark's machinery on a tiny random model: base, first and last, and one
    prompt-aware method, each run through an engine of its own (figures are not judged
    here; every method's engine comes from the same code). Eager, to start the three
    engines in a third of the time: the compiled engines are the serving tests' own."""
    out = tmp_path / "bench.json"
    result = _cli("bench", "adapters", "--preset", "tiny", "--methods", "iapt", "--enforce-eager", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["methods"]) == ["base", "iapt"]
    assert report["settings"]["enforce_eager"] is True
    for figures in report["methods"].values():
        assert figures["requests"] == 8
        assert figures["compilation_mode"] == "NONE"
        assert 0 < figures["ttft_p50_ms"] <= figures["ttft_p99_ms"]
        assert 0 < figures["tpot_p50_ms"] <= figures["tpot_p99_ms"]
        assert figures["output_tokens_per_s"] > 0
    base = report["methods"]["base"]
    assert len(base["runs"]) == 2  # measured first and last
    assert base["ratio_to_base"]["tpot_p50_ms"] == 1.0
    assert "TPOT p50/base" in result.stdout


def test_serve_leaves_out_a_lora_adapter_vllm_cannot_serve(tiny_llama, tmp_path):
    from serving_fixtures import save_random_adapter
    from vllm_plugins.adapters.storage import MANIFEST
    from vllm_plugins.serving.config import PromptAdapterSettings
    from vllm_plugins.serving.launcher import serve_argv

    for name, rank in (("good", 8), ("huge", 1024), ("text", "8")):
        save_random_adapter("lora", tiny_llama, tmp_path / name, seed=1)
        manifest = json.loads((tmp_path / name / MANIFEST).read_text())
        manifest["lora"]["rank"] = rank
        (tmp_path / name / MANIFEST).write_text(json.dumps(manifest))
    argv = serve_argv(str(tiny_llama), PromptAdapterSettings(dir=str(tmp_path)), [])
    modules = argv[argv.index("--lora-modules") + 1:]
    assert [m.split("=")[0] for m in modules if "=" in m] == ["good"]
