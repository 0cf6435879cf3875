"""The ``vllm-plugins`` command."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from vllm_plugins.serving import openmp

openmp.bound_spin()  # before the imports below load torch (the bench runs its engine in this process)

from vllm_plugins import logs
from vllm_plugins.adapters.registry import METHODS
from vllm_plugins.bench.adapters import BENCH_METHODS
from vllm_plugins.tasks import task_names


def _base_path(args: argparse.Namespace) -> Path:
    if args.base:
        return Path(args.base)
    from vllm_plugins.demo_model import build_demo_model

    return build_demo_model(args.preset)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _wider_width(text: str) -> int:
    """A width ``bench eviction-prefill`` can build: a positive multiple of 128, at most 8,192."""
    value = int(text)
    if not 0 < value <= 8192 or value % 128:
        raise argparse.ArgumentTypeError(f"must be a multiple of 128 from 128 to 8192, got {value}")
    return value


def _timing_prompts(text: str) -> int:
    """How many of the bench's 100 retrieval prompts to time: 1 to 100."""
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be from 1 to 100 (the bench's prompts), got {value}")
    return value


def _add_base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base model directory (default: the demo model)")
    p.add_argument("--preset", default="demo", help="demo model preset when --base is not given")


def cmd_build_demo_model(args: argparse.Namespace) -> None:
    from vllm_plugins.demo_model import build_demo_model

    print(build_demo_model(args.preset, force=args.force))


def cmd_train(args: argparse.Namespace) -> None:
    from vllm_plugins.training.recipes import train_method

    trained = train_method(args.method, args.task, _base_path(args), out=args.out, steps=args.steps)
    print(trained.path)


def cmd_eval(args: argparse.Namespace) -> None:
    from vllm_plugins.bench import write_report
    from vllm_plugins.training.eval_table import format_table, run_eval

    report = run_eval(_base_path(args), methods=args.methods, tasks=args.tasks)
    write_report(report, args.json)
    print(format_table(report))
    print(f"written: {args.json}")


def cmd_demo(args: argparse.Namespace) -> None:
    from vllm_plugins.demo import run_demo

    run_demo(args.preset)


def cmd_bench_adapters(args: argparse.Namespace) -> None:
    from vllm_plugins.bench import write_report
    from vllm_plugins.bench.adapters import PRESETS, format_table, run_adapter_bench

    bench = dataclasses.replace(PRESETS[args.preset], enforce_eager=args.enforce_eager)
    if args.requests is not None:
        bench = dataclasses.replace(bench, requests=args.requests)
    report = run_adapter_bench(bench, tuple(args.methods))
    write_report(report, args.json)
    print(format_table(report))
    print(f"written: {args.json}")


def cmd_bench_kernels(args: argparse.Namespace) -> None:
    from vllm_plugins.bench import write_report
    from vllm_plugins.bench.kernels import format_report, run_kernel_bench

    report = run_kernel_bench(check=not args.no_check)
    write_report(report, args.json)
    print(format_report(report))
    print(f"written: {args.json}")
    if not all(check["ok"] for check in report.get("checks", [])):
        raise SystemExit("a kernel does not match its reference")


def cmd_bench_decode_step(args: argparse.Namespace) -> None:
    import torch

    from vllm_plugins.bench import write_report
    from vllm_plugins.bench.decode_step import format_report, run_decode_step_bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("8b" if device == "cuda" else "tiny")
    report = run_decode_step_bench(preset, device, compile_step=args.compile,
                                   on_progress=lambda partial: write_report(partial, args.json))
    write_report(report, args.json)
    print(format_report(report))
    print(f"written: {args.json}")
    if not all(row["replays_match"] for row in report["rows"]):
        raise SystemExit("a replayed step does not match the eager step")


def cmd_bench_ray_serve(args: argparse.Namespace, vllm_args: list[str]) -> None:
    from vllm_plugins.bench import write_report
    from vllm_plugins.bench.ray_serve import format_report, run_ray_serve_bench
    from vllm_plugins.loadtest.runner import DEMO_CONFIG

    args.out.mkdir(parents=True, exist_ok=True)
    report = run_ray_serve_bench(args.config or DEMO_CONFIG, _base_path(args), args.adapter_dir, vllm_args, args.out)
    write_report(report, args.out / "ray-serve-bench.json")
    print(format_report(report))
    print(f"written: {args.out / 'ray-serve-bench.json'}")


def cmd_bench_eviction_prefill(args: argparse.Namespace) -> None:
    from vllm_plugins.bench import write_report
    from vllm_plugins.bench.eviction_prefill import PrefillBench, format_prefill_report, run_prefill_bench

    report = run_prefill_bench(PrefillBench(hidden=args.hidden, prompts=args.prompts, enforce_eager=args.enforce_eager))
    write_report(report, args.json)
    print(format_prefill_report(report))
    print(f"written: {args.json}")


def cmd_bench_eviction(args: argparse.Namespace) -> None:
    from vllm_plugins.bench import write_report
    from vllm_plugins.bench.eviction import PRESETS, format_report, run_eviction_bench, with_task

    bench = with_task(dataclasses.replace(PRESETS[args.preset], enforce_eager=args.enforce_eager), args.task)
    reference = None
    if args.reference == "kvpress":  # first: a failed install stops the command before the engine's minutes
        from vllm_plugins.bench.kvpress_reference import run_kvpress_reference
        from vllm_plugins.demo_model import build_demo_model

        reference = run_kvpress_reference(bench, build_demo_model(bench.preset))
    report = run_eviction_bench(bench)
    if reference is not None:
        report["reference"] = reference
    write_report(report, args.json)
    print(format_report(report))
    if reference is not None:
        from vllm_plugins.bench.kvpress_reference import format_reference

        print()
        print(format_reference(report))
    print(f"written: {args.json}")


def cmd_bench_carry_vllm_lora_ops(args: argparse.Namespace) -> None:
    from vllm_plugins.bench.vllm_lora import carry_vllm_lora_ops

    print(carry_vllm_lora_ops(args.dest))


def cmd_loadtest(args: argparse.Namespace) -> None:
    from vllm_plugins.loadtest.runner import DEMO_CONFIG, run_loadtest

    print(f"report: {run_loadtest(args.config or DEMO_CONFIG, args.host, args.out)}")


def cmd_serve(args: argparse.Namespace, vllm_args: list[str]) -> None:
    import os

    from vllm_plugins.config_reader import read_config
    from vllm_plugins.eviction.settings import EvictionSettings
    from vllm_plugins.serving.config import PromptAdapterSettings
    from vllm_plugins.serving.launcher import serve_argv, serve_environment

    eviction = read_config(EvictionSettings, {"policy": args.kv_eviction, "keep_ratio": args.kv_keep_ratio,
                                              "budget": args.kv_budget, "min_prompt": args.kv_eviction_min_prompt},
                           "vllm-plugins serve --kv-eviction")
    adapters = read_config(PromptAdapterSettings, {
        "dir": args.adapter_dir, "max_active": args.max_active, "max_rank": args.max_rank,
        "max_soft_tokens": args.max_soft_tokens, "max_adapters": args.max_adapters,
        "runtime_loading": args.runtime_loading}, "vllm-plugins serve")
    argv = serve_argv(args.model, adapters, vllm_args, eviction)
    os.execve(argv[0], argv, serve_environment())


def build_parser() -> argparse.ArgumentParser:
    from vllm_plugins.bench.eviction import CROWDED_WORDS, TASKS
    from vllm_plugins.demo_model import PRESETS
    from vllm_plugins.eviction.policies import POLICIES
    from vllm_plugins.training.eval_table import DEFAULT_METHODS, DEFAULT_TASKS

    parser = argparse.ArgumentParser(prog="vllm-plugins", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-demo-model", help="build (or reuse) the embedded demo base model")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=cmd_build_demo_model)

    p = sub.add_parser("train", help="train one adapter and write its directory")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--task", required=True, choices=task_names())
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=_positive_int, help="training steps (default: the method's recipe)")
    _add_base_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="every method on several tasks, against the base model")
    p.add_argument("--json", required=True, type=Path, help="where to write the results")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS))
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=task_names())
    _add_base_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "serve",
        help="vllm serve with prompt-aware adapters; unknown arguments go to vllm serve",
        description="Runs `vllm serve MODEL` with the plugins' worker, scheduler and middleware.",
    )
    p.add_argument("model")
    p.add_argument("--adapter-dir", required=True, help="directory of adapter directories (one per tenant)")
    p.add_argument("--max-active", type=int, default=16, help="adapters a worker holds at once")
    p.add_argument("--max-rank", type=int, default=16, help="highest MiLoRA expert rank served (as --max-lora-rank)")
    p.add_argument("--max-soft-tokens", type=int, default=4, help="most IAPT soft tokens per layer served")
    p.add_argument("--max-adapters", type=int, default=1024, help="most prompt-aware adapters registered at once")
    p.add_argument("--runtime-loading", action="store_true", help="enable /v1/load_prompt_adapter")
    p.add_argument("--kv-eviction", choices=sorted(POLICIES), help="evict prompts' KV cache at the end of prefill (default: off)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--kv-keep-ratio", type=float, help="fraction of a prompt's tokens kept (default 0.2)")
    budget.add_argument("--kv-budget", type=int, help="prompt tokens kept, instead of a ratio")
    p.add_argument("--kv-eviction-min-prompt", type=int, default=0, help="evict only prompts of at least this many tokens")
    p.set_defaults(func=cmd_serve, passes_vllm_args=True)

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="benchmark", required=True)
    p = bench.add_parser("adapters", help="TTFT/TPOT of each adapter method against the base model")
    p.add_argument("--json", required=True, type=Path, help="where to write the results")
    p.add_argument("--preset", default="default", choices=["default", "tiny"], help="model and load size")
    p.add_argument("--methods", nargs="+", default=list(BENCH_METHODS), choices=BENCH_METHODS)
    p.add_argument("--requests", type=_positive_int, help="timed requests per method (default: the preset's, 64)")
    p.add_argument("--enforce-eager", action="store_true", help="run every engine eager (default: vLLM's default mode)")
    p.set_defaults(func=cmd_bench_adapters)
    p = bench.add_parser("kernels", help="the Triton kernels at serving shapes on a GPU, beside vLLM's LoRA kernels")
    p.add_argument("--json", required=True, type=Path, help="where to write the results")
    p.add_argument("--no-check", action="store_true", help="skip comparing each kernel with its torch reference")
    p.set_defaults(func=cmd_bench_kernels)
    p = bench.add_parser("decode-step", help="one decode step of each method captured, replayed for other requests, "
                                             "checked against eager and timed, without vLLM (docs/kernels.md)")
    p.add_argument("--json", required=True, type=Path, help="where to write the results")
    p.add_argument("--preset", choices=["tiny", "8b"], help="model and batch sizes (default: 8b on CUDA, else tiny)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if there is a GPU")
    p.add_argument("--compile", action="store_true", help="on the CPU, also time the step compiled by torch.compile")
    p.set_defaults(func=cmd_bench_decode_step)
    p = bench.add_parser("eviction", help="KV eviction policies and keep ratios on the long-context retrieval task")
    p.add_argument("--json", required=True, type=Path, help="where to write the results")
    p.add_argument("--preset", default="default", choices=["default", "tiny"], help="tiny: a quick run on the tiny model")
    p.add_argument("--enforce-eager", action="store_true", help="run the engine eager (default: vLLM's default mode)")
    p.add_argument("--task", default="retrieval", choices=sorted(TASKS),
                   help=f"crowded-retrieval: every key's 4 facts in contexts of at most {CROWDED_WORDS} words, more facts "
                        "than the default preset keeps at ratio 0.1")
    p.add_argument("--reference", choices=["kvpress"],
                   help="also run NVIDIA kvpress 0.5.5's presses on the same prompts, each keeping what its served policy "
                        "keeps, in its own "
                        "venv under $VLLM_PLUGINS_HOME/venvs (created on first use), and report them beside ours")
    p.set_defaults(func=cmd_bench_eviction)
    p = bench.add_parser("eviction-prefill",
                         help="prefill with and without KV eviction on a random Llama wider than the demo model")
    p.add_argument("--json", required=True, type=Path, help="where to write the results")
    p.add_argument("--hidden", type=_wider_width, default=512,
                   help="the model's width: hidden / 64 query heads of 64 dimensions, 4 layers (default 512)")
    p.add_argument("--prompts", type=_timing_prompts, default=8,
                   help="retrieval prompts timed under every configuration (default 8)")
    p.add_argument("--enforce-eager", action="store_true", help="run the engine eager (default: vLLM's default mode)")
    p.set_defaults(func=cmd_bench_eviction_prefill)
    p = bench.add_parser(
        "ray-serve",
        help="the same load test against a plain server and through Ray Serve (one replica); unknown arguments go to vllm serve",
    )
    p.add_argument("--config", type=Path, default=None,
                   help="load-test TOML (default: the demo's, vllm_plugins/loadtest/demo.toml, which documents every field)")
    p.add_argument("--adapter-dir", required=True, type=Path, help="directory of adapter directories")
    p.add_argument("--out", required=True, type=Path, help="folder for the runs and ray-serve-bench.json")
    _add_base_args(p)
    p.set_defaults(func=cmd_bench_ray_serve, passes_vllm_args=True)
    p = bench.add_parser(
        "carry-vllm-lora-ops",
        help="copy vLLM's LoRA Triton kernels (plus shims) to time them where vLLM is not installed",
    )
    p.add_argument("--dest", type=Path, default=Path(".vllm_lora_ops"), help="where to write (ignored by git)")
    p.set_defaults(func=cmd_bench_carry_vllm_lora_ops)

    p = sub.add_parser("loadtest", help="Locust, headless: every method's tenants against one server, with a report "
                                         "(a server's --api-key is sent from $OPENAI_API_KEY, as vllm bench serve does)")
    p.add_argument("--config", type=Path, default=None,
                   help="load-test TOML (default: the demo's, vllm_plugins/loadtest/demo.toml, which documents every field)")
    p.add_argument("--host", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--out", required=True, type=Path, help="folder for requests.csv, summary.json and report.html")
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser("demo", help="the main job: model, adapters, vLLM, report")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    passes_vllm_args = getattr(args, "passes_vllm_args", False)  # unknown arguments go to vllm serve
    if not passes_vllm_args and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        logs.configure()
        if passes_vllm_args:
            args.func(args, rest)
        else:
            args.func(args)
    except (KeyError, ValueError) as err:
        print(f"vllm-plugins: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
