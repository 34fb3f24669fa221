"""The trainer: sharded train step, loop, Orbax checkpoints, `python -m jaxaccel.train`."""
