"""jaxaccel: cheaper LLM training and faster decoding in JAX.

    import jaxaccel
    lm = jaxaccel.load("path/to/model")    # jaxaccel checkpoint or Hugging Face folder
    out = lm.generate(["def fib(n):"], max_new_tokens=64)
"""
from jaxaccel import cli as _cli

if _cli.is_command_process():  # before jax is imported: Ctrl-C while a command starts is one line too
    _cli.install_ctrl_c_handler(unwind=False)

from jaxaccel.config import ModelConfig  # noqa: E402
from jaxaccel.decode.lm import GenerationResult, LanguageModel, from_params, load  # noqa: E402
from jaxaccel.errors import (CheckpointError, ConfigError, InvalidArgumentError, InvalidPromptError, JaxaccelError,
                             ModelLoadError, UnsupportedArchitectureError)

__version__ = "0.1.0"
__all__ = ["ModelConfig", "GenerationResult", "LanguageModel", "from_params", "load", "CheckpointError",
           "ConfigError", "InvalidArgumentError", "InvalidPromptError", "JaxaccelError", "ModelLoadError",
           "UnsupportedArchitectureError"]
