"""GNU OpenMP's busy-wait, bounded in the processes that run the plugins' CPU engine.

torch's CPU build runs its parallel regions on GNU OpenMP (libgomp). After each region
libgomp's threads busy-wait for the next one, ``GOMP_SPINCOUNT`` spins (300,000 by
default, about 8 ms on the 2-core test machine) before they sleep. Inside vLLM's step
that keeps every core but the calling thread's busy while the eviction's compiled loops
run, and the threads that share those loops out
(:func:`vllm_plugins_kernels.eviction_cpu.run_in_parts`) wait behind them: SCA's
selection took as long on two threads as on one.

:data:`SPIN_COUNT` spins (about 0.8 ms there) outlast the host work between two decode
steps, so a decode step's parallel regions find the threads awake (10,000 spins made
the time per output token 2.5% longer, 30,000 left it as it was; the prefill without
eviction took the same time with either), and are short enough for the eviction's loops
to get the cores for most of their run (SCA's selection at keep 0.5: 2.7 ms, against
2.3 ms with 10,000 spins and 4.15 ms unbounded). 1,000 spins made the prefill a third
slower. docs/eviction.md gives the measurements. Intel's OpenMP runtime, when preloaded
in torch's place, ignores the variable (vLLM sets its ``KMP_BLOCKTIME`` to 5 ms).

libgomp reads the variable once, when torch loads it: it must be in the environment
the process starts with. ``vllm-plugins serve`` passes it to ``vllm serve``, and the
``vllm-plugins`` command sets it before it imports torch (the bench's engine runs in its
process); a value of the user's, or an ``OMP_WAIT_POLICY``, is kept. Nothing here
imports torch.
"""

from __future__ import annotations

import os

SPIN_ENV = "GOMP_SPINCOUNT"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SPIN_COUNT = 30_000


def spin_environment() -> dict[str, str]:
    """``{GOMP_SPINCOUNT: SPIN_COUNT}``, or nothing when this process's environment
    already says how OpenMP threads wait (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``)."""
    if SPIN_ENV in os.environ or WAIT_POLICY_ENV in os.environ:
        return {}
    return {SPIN_ENV: str(SPIN_COUNT)}


def bound_spin() -> None:
    """Set :func:`spin_environment` in this process's environment: effective for this
    process only if torch has not been imported yet, and for every process it starts."""
    os.environ.update(spin_environment())


def intel_openmp_loaded() -> bool:
    """Whether this process has Intel's OpenMP runtime (libiomp5, when preloaded), for
    which ``GOMP_SPINCOUNT`` means nothing (read from /proc: False where it is missing)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libiomp" in line for line in maps)
    except OSError:
        return False
