"""Shared fixtures: tiny demo models built once per session in a temporary home."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

# The Triton kernels are checked on the CPU in Triton's interpreter, which must be chosen
# before a kernel is defined. (On a GPU, `vllm-plugins bench kernels` checks them at
# serving shapes.) The plugins themselves run the torch references on the CPU.
os.environ["TRITON_INTERPRET"] = "1"

# Ray reads its authentication mode once per process, when it is first loaded, and vLLM
# engines may load it in this process before the Ray tests run. The test cluster's token
# authentication (tests/test_ray_serve.py) is therefore set for the whole session, with a
# token of the session's own, so that a token a local ray.init() left in ~/.ray does not
# get in the way.
RAY_TOKEN = Path(tempfile.mkdtemp(prefix="vllm-plugins-ray-")) / "auth_token"
RAY_TOKEN.write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(RAY_TOKEN)


# The modules that use the session's shared server (:func:`server_process`): under
# pytest-xdist one worker runs them all, so that the server starts once.
SHARED_SERVER_MODULES = ("tests/test_ray_serve.py", "tests/test_serving_http.py", "tests/test_loadtest.py",
                         "tests/test_serving_parity.py")


def _scope(nodeid: str) -> str:
    """The unit one pytest-xdist worker runs whole: the test's module, or the shared server's modules."""
    module = nodeid.split("::", 1)[0]
    return "shared-server" if module in SHARED_SERVER_MODULES else module


def pytest_xdist_make_scheduler(config, log):
    """``make test`` runs two pytest-xdist workers; each takes whole modules, and the
    modules of :data:`SHARED_SERVER_MODULES` as one."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    """Every module that uses the shared server is listed in :data:`SHARED_SERVER_MODULES`
    (or it would start a server of its own under xdist). Under pytest-xdist, the slowest
    modules go first (a Ray cluster's, then those of vLLM engines), so that the workers
    finish together rather than one of them starting the Ray tests when the other has
    nothing left; a run without workers keeps the order it was given."""
    unlisted = {item.nodeid.split("::", 1)[0] for item in items if "server_process" in item.fixturenames} - set(SHARED_SERVER_MODULES)
    if unlisted:
        raise pytest.UsageError(f"add {sorted(unlisted)} to SHARED_SERVER_MODULES in tests/conftest.py")
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def rank(item) -> int:
        return 0 if item.get_closest_marker("ray") else 1 if item.get_closest_marker("engine") else 2

    scope_rank: dict[str, int] = {}
    for item in items:
        scope_rank[_scope(item.nodeid)] = min(scope_rank.get(_scope(item.nodeid), 2), rank(item))
    items.sort(key=lambda item: scope_rank[_scope(item.nodeid)])  # stable: a module's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def plugins_home(tmp_path_factory) -> Path:
    """Keep everything the tests build out of the user's cache. pytest-xdist's workers
    each have a home of their own, whose ``models/`` (the tiny demo models) they share."""
    home = Path(os.environ.get("VLLM_PLUGINS_TEST_HOME") or tmp_path_factory.mktemp("vllm-plugins-home"))
    os.environ["VLLM_PLUGINS_HOME"] = str(home)
    if os.environ.get("PYTEST_XDIST_WORKER") and not (home / "models").exists():
        shared = tmp_path_factory.getbasetemp().parent / "models"  # the run's directory, above the workers'
        shared.mkdir(exist_ok=True)
        (home / "models").symlink_to(shared, target_is_directory=True)
    return home


def _demo_model(home: Path, preset: str) -> Path:
    """The preset's build, built by the first worker that asks while the others wait."""
    from filelock import FileLock

    from vllm_plugins.demo_model import build_demo_model

    (home / "models").mkdir(exist_ok=True)
    with FileLock(home / "models" / f"{preset}.lock"):
        return build_demo_model(preset)


@pytest.fixture(scope="session")
def tiny_llama(plugins_home) -> Path:
    return _demo_model(plugins_home, "tiny")


@pytest.fixture(scope="session")
def tiny_qwen2(plugins_home) -> Path:
    return _demo_model(plugins_home, "tiny-qwen2")


@pytest.fixture(params=["tiny_llama", "tiny_qwen2"])
def tiny_model(request) -> Path:
    """Each tiny model in turn: every adapter must work on Llama and on Qwen2."""
    return request.getfixturevalue(request.param)


SERVED_ADAPTERS = {  # name -> (method, seed): 8 prompt-aware adapters of all kinds, 4 of the LoRA family
    "iapt-1": ("iapt", 1), "iapt-2": ("iapt", 2), "iapt-3": ("iapt", 3),
    "para-1": ("para", 4), "para-2": ("para", 5), "para-3": ("para", 6),
    "milora-1": ("milora", 7), "milora-2": ("milora", 8),
    "lora-1": ("lora", 9), "lora-2": ("lora", 10), "fanlora-1": ("fanlora", 11), "alora-1": ("alora", 12),
}
LORA_FAMILY = ("lora", "fanlora", "alora")  # served by vLLM's stock LoRA


@pytest.fixture(scope="session")
def served_adapter_dir(tiny_llama, tmp_path_factory) -> Path:
    from serving_fixtures import save_random_adapter

    root = tmp_path_factory.mktemp("served-adapters")
    for name, (method, seed) in SERVED_ADAPTERS.items():
        save_random_adapter(method, tiny_llama, root / name, seed)
    return root


SERVER_ARGS = (  # 1 GiB of KV cache (serve's CPU default is 4): the tiny models need far less, and up to 8 servers run at once
    "--runtime-loading", "--served-model-name", "demo", "--max-model-len", "512",
    "--dtype", "float32", "--max-num-batched-tokens", "64", "--kv-cache-memory-bytes", str(2**30),
)


@pytest.fixture(scope="session")
def prompt_aware_adapter_dir(served_adapter_dir, tmp_path_factory) -> Path:
    """The 8 prompt-aware adapters of ``served_adapter_dir`` without the stock LoRA ones:
    a server without LoRA runs compiled on the CPU (vLLM turns compilation off with LoRA)."""
    root = tmp_path_factory.mktemp("prompt-aware-adapters")
    for name, (method, _) in SERVED_ADAPTERS.items():
        if method not in LORA_FAMILY:
            shutil.copytree(served_adapter_dir / name, root / name)  # a symlink out of the root is refused
    return root


@pytest.fixture(scope="session")
def server_process(tiny_llama, served_adapter_dir, tmp_path_factory):
    """One real server for the HTTP tests, as vLLM runs by default (prefix caching on;
    with stock LoRA tenants, uncompiled on the CPU) except for a 64-token scheduler chunk,
    shorter than the long test prompts."""
    from vllm_plugins.serving.process import ServerProcess

    server = ServerProcess.start(tiny_llama, served_adapter_dir, tmp_path_factory.mktemp("server") / "server.log",
                                 *SERVER_ARGS)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(server_process) -> str:
    """The base URL of :func:`server_process`."""
    return server_process.url


@pytest.fixture
def start_engine():
    """``start_engine(model, **engine_args)``: an offline engine (serving/offline.py) whose
    engine core is shut down when the test ends.

    Offline engines in the tests run in the test's process (``in_process=True``): no
    process to spawn and import vLLM into, about 20 s less per engine; the servers' tests
    run vLLM's multi-process engines. vLLM's distributed state is one per process, and any
    engine's shutdown tears it down: an engine must not serve after another one shut down
    in the same process (the module's shared engines serve their tests before a test
    starts and stops one of its own)."""
    import contextlib

    from vllm_plugins.serving.offline import running_engine

    with contextlib.ExitStack() as stack:
        yield lambda model, **engine_args: stack.enter_context(running_engine(model, in_process=True, **engine_args))
