"""Typed configuration: frozen dataclasses, YAML presets and dotted `key=value` overrides.

Defaults live in the dataclasses; a YAML file only overrides them. Every key is checked:
an unknown key is an error that lists the valid ones, and a value of the wrong type is an
error naming the key, so a typo never silently trains the wrong model.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import numpy as np
import yaml

from jaxaccel.errors import ConfigError, first_line

T = TypeVar("T")


# ----------------------------------------------------------------------------- type checks


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, strict: bool = False) -> Any:
    """Check (and minimally convert) `value` against the annotation `tp`: numpy scalars become
    Python ones, an int a float where the annotation is float, a list a tuple.

    `strict` is for values given to a dataclass constructor directly (`check_types`), not
    read from YAML: a nested section must already be an instance of its dataclass (checked
    in turn), and a string is never read as a number."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: null is not allowed (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, strict)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        plain = value.item() if isinstance(value, np.generic) else value
        for choice in choices:
            if type(choice) is type(plain) and choice == plain:
                return choice
        raise ConfigError(f"{key}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return _checked(value, key) if strict else value
        if strict:
            hint = (f" (pass {tp.__name__}(...), or build the whole config from a dict with "
                    f"jaxaccel.config.from_dict)" if isinstance(value, Mapping) else "")
            raise ConfigError(f"{key}: expected a {tp.__name__}, got {value!r}{hint}")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (tuple, list, Sequence, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = tuple(_coerce(v, item_tp, f"{key}[{i}]", strict) for i, v in enumerate(value))
        if isinstance(value, tuple) and all(a is b for a, b in zip(items, value)):
            return value  # unchanged: keep the object (check_types then stores nothing)
        return items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and not strict:  # YAML 1.1 reads "1e11" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if number is not None:
            try:
                return float(number)
            except OverflowError:  # an int beyond a float's range
                raise ConfigError(f"{key}: {value!r} is too large for a number") from None
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return str(value)  # numpy.str_ -> str
        if isinstance(value, os.PathLike):  # a pathlib.Path for a path field
            return os.fspath(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


@functools.cache
def _field_types(cls: type) -> tuple[tuple[str, Any], ...]:
    """(name, annotation) of each `__init__` field of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init)


def _normalised(obj: Any, prefix: str) -> dict[str, Any]:
    """The fields of dataclass instance `obj` whose checked value differs from the stored one."""
    changes = {}
    for name, tp in _field_types(type(obj)):
        value = getattr(obj, name)
        checked = _coerce(value, tp, f"{prefix}.{name}" if prefix else name, strict=True)
        if checked is not value:
            changes[name] = checked
    return changes


def _checked(obj: T, prefix: str) -> T:
    """`obj` with every field (nested sections included) checked against its annotation: `obj`
    itself when nothing needed converting, else a copy with the converted values."""
    changes = _normalised(obj, prefix)
    return dataclasses.replace(obj, **changes) if changes else obj


def check_types(obj: Any, prefix: str = "") -> None:
    """For a frozen config dataclass's `__post_init__`, before its range checks: every field
    must match its annotation the way `from_dict` checks YAML values (ints are int or numpy
    integers, never bool; floats any real number; a section an instance of its dataclass), else
    a ConfigError naming `prefix.field`. Numpy scalars (and an int in a float field) are
    replaced by the Python value in place."""
    for name, value in _normalised(obj, prefix).items():
        object.__setattr__(obj, name, value)


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind`: "linear" (position interpolation) or "llama3"; `kind` and
    `factor` are required (a mapping without them was Llama 3's x8 scaling, silently); the
    llama3 fields default to Llama 3.1's."""

    kind: str = ""
    factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        check_types(self, "rope_scaling")
        for name, what in (("kind", "'linear' or 'llama3'"), ("factor", "a finite number > 0, e.g. 8.0")):
            if getattr(self, name) in ("", None):
                raise ConfigError(f"rope_scaling.{name} is required: {what}")
        if self.kind not in ("linear", "llama3"):
            raise ConfigError(f"rope_scaling.kind must be 'linear' or 'llama3', got {self.kind!r}")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ConfigError(f"rope_scaling.factor must be a finite number > 0, got {self.factor}")
        if self.original_max_position < 1:
            raise ConfigError(f"rope_scaling.original_max_position must be >= 1, got {self.original_max_position}")
        if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor < math.inf:
            raise ConfigError(f"rope_scaling.low_freq_factor and high_freq_factor must satisfy 0 < low < high "
                              f"(finite), got {self.low_freq_factor} and {self.high_freq_factor}")


@dataclasses.dataclass(frozen=True)
class DropoutConfig:
    """Dropout rate per site; all are off at inference (`deterministic=True`)."""

    embed: float = 0.0  # after the token embedding
    attention: float = 0.0  # on the attention block's output, before the residual add
    mlp: float = 0.0  # on the MLP block's output, before the residual add
    path: float = 0.0  # DropPath (stochastic depth): a whole residual branch, per example

    def __post_init__(self):
        check_types(self, "dropout")
        for site in ("embed", "attention", "mlp", "path"):
            rate = getattr(self, site)
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"dropout.{site} must be in [0, 1), got {rate}")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Top-k routed experts in place of the SwiGLU MLP (n_experts = 0: dense model)."""

    n_experts: int = 0
    top_k: int = 2
    capacity_factor: float = 1.25  # training
    eval_capacity_factor: float | None = 2.0  # deterministic forwards; null = dropless
    every: int = 1  # layer i is sparse when (i + 1) % every == 0
    normalize_top_k: bool = True  # renormalise the top-k gates to sum to 1
    load_balance_weight: float = 0.01  # Switch Transformer auxiliary loss
    router_z_weight: float = 0.001  # ST-MoE router z-loss
    # Who gets an expert's slots when capacity binds: "token" — in token order, all k choices
    # of a token before the next token (causal: a token's routing never depends on later
    # tokens); "rank" — GShard's order, every token's first choice before any second choice
    # (a later token's first choice can take an earlier token's slot: not causal; the token
    # crisis MoE runs in docs/ used it, before 2026-12-03).
    priority: str = "token"

    def __post_init__(self):
        check_types(self, "moe")
        if self.priority not in ("token", "rank"):
            raise ConfigError(f"moe.priority must be 'token' or 'rank', got {self.priority!r}")
        if self.n_experts < 0:
            raise ConfigError(f"moe.n_experts must be >= 0, got {self.n_experts}")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(f"moe.top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if self.every < 1:
            raise ConfigError(f"moe.every must be >= 1, got {self.every}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)  # bounded: a capacity is an integer number of token slots
            if value is not None and not (math.isfinite(value) and 0 < value <= 1e6):
                raise ConfigError(f"moe.{name} must be a finite number in (0, 1e6] (eval: or null, dropless), "
                                  f"got {value}")
        for name in ("load_balance_weight", "router_z_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"moe.{name} must be a finite number >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class DuoConfig:
    """Duo-LLM (arXiv 2410.10846): every layer has a big SwiGLU FFN (ffn_dim) and a small one
    (ffn_dim / small_ratio); each token takes, per layer, the big one, the small one or neither
    (skip: the residual passes through). Routes come from the forward's execution plan
    (`ExecutionPlan.routes`; none given: all big). Training draws them at random per token and
    layer: big with p_big, skip with p_skip, small otherwise. `router` (stage 2): each layer
    also has a linear router on its FFN input that picks big or small per token whenever the
    plan forces no routes (`jaxaccel.model.duo`)."""

    enabled: bool = False
    small_ratio: int = 16
    p_big: float = 0.5
    p_skip: float = 0.0
    router: bool = False

    def __post_init__(self):
        check_types(self, "duo")
        if self.small_ratio < 1:
            raise ConfigError(f"duo.small_ratio must be >= 1, got {self.small_ratio}")
        for name in ("p_big", "p_skip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"duo.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.p_big + self.p_skip > 1.0 + 1e-9:
            raise ConfigError(f"duo.p_big + duo.p_skip must be <= 1, got {self.p_big} + {self.p_skip}")


ARCHITECTURES = ("llama", "qwen2", "mistral")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Field names follow the math, not any one checkpoint format."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int | None = None  # default d_model // n_heads
    ffn_dim: int = 704
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    sliding_window: int | None = None  # Mistral: a query sees keys with q_pos - k_pos < window
    dropout: DropoutConfig = DropoutConfig()
    moe: MoeConfig = MoeConfig()
    duo: DuoConfig = DuoConfig()
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; softmax and norms always accumulate in float32
    architecture: str = "llama"  # which HF family to export as
    init_std: float = 0.02

    def __post_init__(self):
        check_types(self, "model")  # wrong types first: the range checks below compare numbers
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is not None and self.head_dim < 1:
            raise ConfigError(f"model.head_dim must be >= 1 or null (d_model / n_heads), got {self.head_dim}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); set model.head_dim"
            )
        if self.resolved_head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"model.{name} must be a finite number > 0, got {value}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"model.sliding_window must be >= 1 or null, got {self.sliding_window}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"model.{name} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
        if self.moe.n_experts and self.n_layers % self.moe.every:
            raise ConfigError(f"model.n_layers ({self.n_layers}) must be a multiple of moe.every ({self.moe.every})")
        if self.duo.enabled and self.ffn_dim % self.duo.small_ratio:
            raise ConfigError(f"duo.small_ratio ({self.duo.small_ratio}) must divide model.ffn_dim ({self.ffn_dim})")
        if self.duo.enabled and self.moe.n_experts:
            raise ConfigError("model.duo and model.moe cannot both be on: a layer's FFN is either routed experts or "
                              "big/small/skip")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"model.architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}"
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def small_ffn_dim(self) -> int:
        """Duo-LLM's small FFN width (ffn_dim / duo.small_ratio)."""
        return self.ffn_dim // self.duo.small_ratio

    def is_moe_layer(self, i: int) -> bool:
        return self.moe.n_experts > 0 and (i + 1) % self.moe.every == 0

    @property
    def block_size(self) -> int:
        """Layers per scanned block: the scan body must be the same for every block."""
        return self.moe.every if self.moe.n_experts else 1

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, hd = self.d_model, self.resolved_head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        dense_mlp = 3 * d * self.ffn_dim
        moe_mlp = self.moe.n_experts * dense_mlp + d * self.moe.n_experts
        mlps = sum(moe_mlp if self.is_moe_layer(i) else dense_mlp for i in range(self.n_layers))
        if self.duo.enabled:  # each layer's small FFN beside the big one, and its router (d -> 2, bias)
            mlps += self.n_layers * (3 * d * self.small_ffn_dim + (2 * d + 2 if self.duo.router else 0))
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layers * (attn + 2 * d) + mlps + self.vocab_size * d + head + d

    def active_params(self) -> int:
        """Parameters a token uses (top-k of the experts; embedding counted once). A Duo-LLM
        model counts both FFNs: training computes both for every token (the masked path)."""
        if not self.moe.n_experts:
            return self.num_params()
        per_expert = 3 * self.d_model * self.ffn_dim
        unused = self.moe.n_experts - self.moe.top_k
        n_moe = sum(self.is_moe_layer(i) for i in range(self.n_layers))
        return self.num_params() - n_moe * unused * per_expert


# ----------------------------------------------------------------------------- generic machinery


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping of config keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if not isinstance(key, str):  # YAML `1:`, `null:`, `on:` (true) keys
            where = f" in {prefix}" if prefix else ""
            raise ConfigError(f"config key {key!r}{where} is not a string (a YAML number, null or true/false); "
                              f"valid keys: {', '.join(sorted(fields))}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(repr(prefix + '.' + k if prefix else k) for k in unknown)}"
            f"{where}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field with no default
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def convert(v):
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        return v

    return convert(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    if not isinstance(text, str):
        raise ConfigError(f"an override must be a 'key.sub=value' string, got {text!r}")
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_nested(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else child
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: {part!r} is not a section")
            node[part] = child
        node = child
    node[path[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise ConfigError(f"a config file path must be a str or pathlib.Path, got {path!r}")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    return parse_yaml(path.read_bytes(), str(path))


def parse_yaml(data: bytes, where: str) -> dict[str, Any]:
    """A config file's bytes -> its top-level mapping; ConfigError (naming `where`) when they
    are not UTF-8, not YAML, or not a mapping."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a UTF-8 text file") from None
    try:
        parsed = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({first_line(e)})") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys to values")
    return parsed


# Numbers as YAML 1.2 reads them (PyYAML implements YAML 1.1, where `1e-3` without a dot is a
# string, `010` is octal 8 and `1:30` is 90): decimal integers (leading zeros too; digit
# separators as in 1_000, which YAML 1.1 read and configs may use), 0x / 0o integers, and
# floats with or without a dot or an exponent, .inf and .nan.
_INT_12 = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$")  # (1_000: YAML 1.1's, kept)
_FLOAT_12 = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _yaml_12_numbers(cls, *, keep_11: bool):
    """Give loader or dumper class `cls` its own resolver table with the YAML 1.2 number rules
    (a dumper keeps YAML 1.1's too, so it quotes a string that either version reads as a number)."""
    table = {first: [(tag, rx) for tag, rx in rules if keep_11 or tag not in _NUMBER_TAGS]
             for first, rules in cls.yaml_implicit_resolvers.items()}
    cls.yaml_implicit_resolvers = table
    cls.add_implicit_resolver("tag:yaml.org,2002:int", _INT_12, list("-+0123456789"))
    cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))
    return cls


def _construct_int_12(loader, node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    return int(text, 0) if text[:2] in ("0x", "0o") else int(text, 10)  # "010" is ten


@functools.partial(_yaml_12_numbers, keep_11=False)
class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load with YAML 1.2's numbers, and a key given twice in one mapping is an error
    (PyYAML keeps the last value silently: a setting written twice, the first one edited, did
    nothing)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges are allowed
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice (line {key_node.start_mark.line + 1})",
                        key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int_12)


@functools.partial(_yaml_12_numbers, keep_11=True)
class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump that quotes every string a YAML 1.1 or 1.2 reader would take for a number."""


def dump_yaml(data: Any) -> str:
    """`data` as YAML that `parse_yaml` reads back to the same values."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def build(cls: type[T], yaml_path: str | Path | None = None, overrides: Sequence[str] | str = ()) -> T:
    """Dataclass defaults <- YAML preset <- `key=value` overrides, all checked. `overrides`:
    a sequence of `key.sub=value` strings, or one such string."""
    data: dict[str, Any] = load_yaml(yaml_path) if yaml_path is not None else {}
    return from_dict(cls, with_overrides(data, overrides))


def with_overrides(data: Mapping[str, Any], overrides: Sequence[str] | str = (),
                   settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A deep copy of the nested mapping `data` with `key.sub=value` texts, then `settings`
    ({"key.sub": value}, values already parsed), applied in that order. A value set on a
    section (a mapping) replaces the whole section."""
    if overrides is None:
        overrides = ()
    elif isinstance(overrides, str):  # one override, not a sequence of one-character ones
        overrides = (overrides,)
    elif not isinstance(overrides, typing.Iterable):
        raise ConfigError(f"overrides must be a list of 'key.sub=value' strings, got {overrides!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of config keys to values, got {data!r}")
    if settings is not None and not isinstance(settings, Mapping):
        raise ConfigError(f"settings must be a mapping of 'key.sub' to values, got {settings!r}")
    out = copy.deepcopy(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        _set_nested(out, path, value)
    for key, value in (settings or {}).items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"setting key {key!r} must look like 'key.sub'")
        _set_nested(out, key.split("."), copy.deepcopy(value))
    return out


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass an annotation names (also through `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def dotted_keys(cls: type) -> list[str]:
    """Every key a dotted override of `cls` may name: leaves and sections, e.g. "model",
    "model.dropout", "model.dropout.mlp"."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        keys.append(f.name)
        sub = _dataclass_of(hints[f.name])
        if sub is not None:
            keys.extend(f"{f.name}.{k}" for k in dotted_keys(sub))
    return keys


def check_dotted_key(cls: type, key: str, where: str = "") -> None:
    """ConfigError (one line, with the closest valid keys) unless `key` names a field of `cls`."""
    valid = dotted_keys(cls)
    if key in valid:
        return
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close:  # a typo in the section part: match the last component alone
        last = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] in difflib.get_close_matches(last, [
            v.rsplit(".", 1)[-1] for v in valid], n=3, cutoff=0.75)][:3]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}{f' {where}' if where else ''}{hint}")


def replace(cfg: T, **changes: Any) -> T:
    """`dataclasses.replace` that checks the new values like `from_dict` does."""
    data = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    data.update(changes)
    return from_dict(type(cfg), data)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping (a config as `to_dict` gives it) as {"dotted.key": value}."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def flatten_stored(stored: Mapping) -> dict[str, Any]:
    """A run's stored settings (its config.yaml, or a checkpoint's copy) flattened, with the
    value each setting added since had in the version that wrote them, where that is not
    today's default: an MoE run written before `moe.priority` existed was trained in GShard's
    rank order, so it reads as `priority: rank` (resuming it as today's token order would
    continue it as another run)."""
    flat = flatten(json.loads(json.dumps(dict(stored), default=str)))
    if "model.moe.priority" not in flat and (flat.get("model.moe.n_experts") or 0) > 0:
        flat["model.moe.priority"] = "rank"
    return flat
