import atexit
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

from dibjax import host_memory

# As `python -m dibjax.main` does on CPU: steps reuse the host memory the previous step freed.
host_memory.keep_freed_memory()

# One persistent compilation cache for the session and the processes it starts (they inherit the environment):
# the tests build the same tiny models and steps many times, and XLA:CPU's compilations dominate their time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="dibjax-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def x64():
    """Float64 arrays for the test that asks for it; the rest of the suite runs JAX's default float32 path."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A learnable 10-class npz data set of 16×16 images: the class sets the image's brightness."""
    folder = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("test", 40)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 16, 16, 3)) + 20 * labels[:, None, None, None]
        np.savez(folder / f"{split}.npz", image=images.astype(np.uint8), label=labels)
    return folder
