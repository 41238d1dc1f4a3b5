"""Keeping freed host memory in the process (dibjax.host_memory): measured by the page faults of reused memory."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from dibjax import host_memory

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Allocates, fills and frees 64 MiB on a second thread (as XLA's executing threads do) five times, then prints
# whether the settings were applied and the page faults of the last four rounds.
PROBE = textwrap.dedent(
    """
    import ctypes, resource, sys, threading
    from dibjax import host_memory
    applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size, faults = 64 << 20, []
    def rounds():
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = libc.malloc(size)
            ctypes.memset(block, 1, size)
            libc.free(block)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    thread = threading.Thread(target=rounds)
    thread.start()
    thread.join()
    print(applied, sum(faults[1:]))
    """
)


def probe(mode: str, **env) -> tuple[str, int]:
    environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | env
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=environment
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_memory_is_reused_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    applied, faults_kept = probe("keep")
    _, faults_released = probe("release")
    assert applied == "True"
    assert faults_released > 2 * pages  # glibc returns the block to the kernel: each round faults it in again
    assert faults_kept < pages // 20  # kept: the last four rounds reuse the first round's pages


def test_a_users_glibc_tunables_win():
    applied, _ = probe("keep", GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert applied == "False"


def test_runs_on_cpu_follows_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.runs_on_cpu()
