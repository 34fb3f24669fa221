"""Registry of decoding methods (`method=` in `lm.generate`, `--method` in the CLI)."""
from __future__ import annotations

from typing import Any

from jaxaccel.decode.autoregressive import Autoregressive
from jaxaccel.decode.chains import Chain, PromptLookup
from jaxaccel.decode.draft import Sequoia, SpecInfer, SpS
from jaxaccel.decode.dyspec import DySpec
from jaxaccel.decode.engine import DecodeMethod
from jaxaccel.decode.recycling import Recycling
from jaxaccel.decode.skipdecode import SkipDecode
from jaxaccel.decode.tokenselect import TokenSelect
from jaxaccel.errors import InvalidArgumentError

METHODS: dict[str, type[DecodeMethod]] = {
    Autoregressive.name: Autoregressive,
    Recycling.name: Recycling,
    PromptLookup.name: PromptLookup,
    Chain.name: Chain,
    SpS.name: SpS,
    SpecInfer.name: SpecInfer,
    Sequoia.name: Sequoia,
    DySpec.name: DySpec,
    SkipDecode.name: SkipDecode,
    TokenSelect.name: TokenSelect,
}


def get_method(name: str, **options: Any) -> DecodeMethod:
    if not isinstance(name, str) or name not in METHODS:
        raise InvalidArgumentError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](**options)
