"""Keep the host memory that XLA:CPU frees after each step inside the process (glibc's malloc on Linux).

XLA:CPU allocates the temporary buffers of a compiled step when the step starts and frees them when it ends. glibc's
malloc returns large blocks to the kernel as soon as they are freed: blocks above its mmap threshold (which never
exceeds 32 MiB), and the top of the heaps of the per-thread arenas the executing threads allocate from. The next
step then page-faults its whole working set in again, each page zero-filled by the kernel, and on a CPU that is a
large share of a training step (``python -m benchmarks.throughput``). Three ``mallopt`` settings keep freed memory
in the process for the next step: one arena (``M_ARENA_MAX = 1``), no blocks of their own mapping
(``M_MMAP_MAX = 0``) and no trimming of the heap (``M_TRIM_THRESHOLD`` at its maximum). The price: the process keeps
the largest heap it has needed until it exits, and its threads share one arena.

The same settings, for any program and before it starts::

    GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import sys

# mallopt's parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_LARGEST_INT = 2**31 - 1

# Distributions that give JAX an accelerator; with one installed and JAX_PLATFORMS not 'cpu', the host allocator
# matters little and its threads (input pipelines) are better off with glibc's own arenas.
_ACCELERATOR_PREFIXES = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def runs_on_cpu() -> bool:
    """Whether JAX will compute on the CPU, judged without starting a backend (``JAX_PLATFORMS``, installed plugins)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    names = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
    return not any(name.lower().startswith(_ACCELERATOR_PREFIXES) for name in names)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process; returns whether the settings were applied.

    Call it before JAX starts its backend (before the first computation): an arena a thread already uses stays in
    use. Nothing is changed, and ``False`` returned, where the C library is not glibc or where ``GLIBC_TUNABLES``
    already sets malloc's parameters (the user's choice wins).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _LARGEST_INT))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
