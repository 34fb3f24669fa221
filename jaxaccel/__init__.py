"""jaxaccel: cheaper LLM training and faster decoding in JAX.

    import jaxaccel
    lm = jaxaccel.load("path/to/model")    # jaxaccel checkpoint or Hugging Face folder
    out = lm.generate(["def fib(n):"], max_new_tokens=64)
"""
from jaxaccel.config import ModelConfig
from jaxaccel.decode.lm import GenerationResult, LanguageModel, from_params, load
from jaxaccel.errors import (CheckpointError, ConfigError, InvalidArgumentError, InvalidPromptError, JaxaccelError,
                             ModelLoadError, UnsupportedArchitectureError)

__version__ = "0.1.0"
__all__ = ["ModelConfig", "GenerationResult", "LanguageModel", "from_params", "load", "CheckpointError",
           "ConfigError", "InvalidArgumentError", "InvalidPromptError", "JaxaccelError", "ModelLoadError",
           "UnsupportedArchitectureError"]
