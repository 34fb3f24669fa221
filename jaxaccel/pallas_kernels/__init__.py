"""Pallas kernels (each with a pure-jnp reference of the same signature, used on CPU)."""
