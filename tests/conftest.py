import jax

# Tests compare float32 and float64 results; float64 arrays need x64 mode.
jax.config.update("jax_enable_x64", True)
