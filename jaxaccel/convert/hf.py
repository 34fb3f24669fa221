"""Hugging Face <-> jaxaccel for LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM.

Import reads safetensors lazily, one tensor at a time (numpy framework, no torch): each
tensor is read, transposed into jaxaccel's layout as a numpy view, cast, and placed straight
into its target sharding with `jax.make_array_from_callback`, so host memory holds at most
one tensor. Export writes the same format back (config.json, generation_config.json,
safetensors shards with an index when there are several, the tokenizer).

Layout correspondence (HF Linear weights are [out, in]; ours are [in, ..., out]):
    model.embed_tokens.weight [V, d]                 embed/embedding [V, d]
    layers.i.self_attn.q_proj.weight [H*D, d]        layer_i/attn/q/kernel [d, H, D]
    layers.i.self_attn.{k,v}_proj.weight [K*D, d]    layer_i/attn/{k,v}/kernel [d, K, D]
    layers.i.self_attn.o_proj.weight [d, H*D]        layer_i/attn/o/kernel [H, D, d]
    layers.i.mlp.{gate,up}_proj.weight [F, d]        layer_i/mlp/{gate,up}/kernel [d, F]
    layers.i.mlp.down_proj.weight [d, F]             layer_i/mlp/down/kernel [F, d]
    layers.i.{input,post_attention}_layernorm        layer_i/{attn,mlp}_norm/scale
    model.norm.weight, lm_head.weight [V, d]         final_norm/scale, lm_head/kernel [d, V]
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from jaxaccel.config import ModelConfig, RopeScaling
from jaxaccel.tokenizer import SIDE_FILES
from jaxaccel.errors import (CheckpointError, ConfigError, InvalidArgumentError, JaxaccelError, ModelLoadError,
                             UnsupportedArchitectureError, first_line)

SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
EXPORT_NAMES = {v: k for k, v in SUPPORTED.items()}
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_HF_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                   "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


# Hugging Face folders are local: safetensors reads and writes local files.
REMOTE_HF = ("{path!r}: a Hugging Face folder is {what} a local folder only (safetensors works on local files); "
             "copy it between the bucket and a local folder (gcloud storage cp -r), or save a jaxaccel checkpoint, "
             "which gs:// takes")


def is_hf_folder(folder) -> bool:
    """A folder (pathlib, or epath for gs://: never made a local Path) holding config.json."""
    folder = folder if hasattr(folder, "is_dir") else Path(folder)
    return (folder / "config.json").is_file()


# ----------------------------------------------------------------------------- config


_HF_INT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# transformers' defaults where config.json leaves a field out (LlamaConfig, Qwen2Config, MistralConfig)
_HF_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "mistral": 4096 * 32}
_HF_MISTRAL_SLIDING_WINDOW = 4096


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """A Hugging Face config.json (as a dict) -> ModelConfig; anything missing, mistyped or
    unsupported is one ConfigError / UnsupportedArchitectureError naming `source`."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    try:
        return _config_from_hf(hf, source)
    except JaxaccelError:
        raise
    except KeyError as e:
        raise ConfigError(f"{source}: {e.args[0]!r} is missing") from None
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: 1e400 (inf) where an int goes
        raise ConfigError(f"{source}: a value has the wrong type or range ({first_line(e)})") from None


def _int_key(hf: dict, key: str, source: str, required: bool) -> int | None:
    """An integer field of config.json (an integral float such as 4096.0 is accepted); None
    when optional and absent or null; else a one-line ConfigError."""
    value = hf.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{source}: {key!r} is missing")
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    return value


def _config_from_hf(hf: dict, source: str) -> ModelConfig:
    archs = hf.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{source}: architectures must be a list of names, got {archs!r}")
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None and not archs and hf.get("model_type") in EXPORT_NAMES:  # transformers goes by model_type
        arch = EXPORT_NAMES[hf["model_type"]]
    if arch is None:
        named = ", ".join(archs) if archs else f"model_type {hf.get('model_type')!r}"
        raise UnsupportedArchitectureError(
            f"{source}: architecture {named} is not supported; supported: {', '.join(SUPPORTED)}")
    family = SUPPORTED[arch]
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("mlp_bias") or (family == "llama" and hf.get("attention_bias")):
        raise UnsupportedArchitectureError(f"{source}: attention_bias/mlp_bias on Llama is not supported")
    if hf.get("quantization_config") is not None:
        method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], dict) else None
        raise UnsupportedArchitectureError(
            f"{source}: quantized checkpoints (quantization_config{f', quant_method {method!r}' if method else ''}) "
            "are not supported; load the unquantized model")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise UnsupportedArchitectureError(f"{source}: Qwen2 with use_sliding_window=true is not supported")

    ints = {key: _int_key(hf, key, source, required=True) for key in _HF_INT_KEYS}
    ints.update({key: _int_key(hf, key, source, required=False)
                 for key in ("max_position_embeddings", "num_key_value_heads", "head_dim", "sliding_window")})

    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ConfigError(f"{source}: {key} must be an object such as {{\"rope_type\": \"linear\", "
                              f"\"factor\": 2.0}} or null, got {hf[key]!r:.60}")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    if rope and scaling:  # transformers lets rope_scaling replace rope_parameters; we refuse a disagreement
        kinds = [d.get("rope_type") or d.get("type") or "default" for d in (rope, scaling)]
        clash = [k for k in set(rope) & set(scaling) if k not in ("rope_type", "type") and rope[k] != scaling[k]]
        if kinds[0] != kinds[1] or clash:
            what = f"rope type {kinds[0]!r} vs {kinds[1]!r}" if kinds[0] != kinds[1] else f"{clash[0]}"
            raise ConfigError(f"{source}: rope_parameters and rope_scaling disagree ({what}); keep one of them")
    rope_type = rope.get("rope_type") or rope.get("type") or scaling.get("rope_type") or scaling.get("type") or "default"
    params = {**scaling, **rope}
    # a nested rope_theta (rope_parameters, or rope_scaling in older configs) is the one
    # transformers uses; the top-level key only without one
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope_type == "default":
        rope_scaling = None
    elif rope_type == "linear":
        rope_scaling = RopeScaling(kind="linear", factor=float(params["factor"]))
    elif rope_type == "llama3":
        rope_scaling = RopeScaling(kind="llama3", factor=float(params["factor"]),
                                   low_freq_factor=float(params["low_freq_factor"]),
                                   high_freq_factor=float(params["high_freq_factor"]),
                                   # absent: transformers takes max_position_embeddings
                                   original_max_position=int(params.get("original_max_position_embeddings")
                                                             or hf["max_position_embeddings"]))
    else:
        raise UnsupportedArchitectureError(
            f"{source}: rope type {rope_type!r} is not supported; supported: default, linear, llama3")

    # The stored weights' dtype; names transformers does not write ("auto", "float64") keep
    # the full-precision default, as load(dtype=...) may override it anyway.
    dtype = _HF_DTYPE_NAMES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32"), "float32")
    tie = hf.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):  # bool("false") is True: a silently different model
        raise ConfigError(f"{source}: tie_word_embeddings must be true or false, got {tie!r}")
    n_heads = ints["num_attention_heads"]
    max_positions = ints["max_position_embeddings"]
    if max_positions is None:
        max_positions = _HF_MAX_POSITIONS[family]
    elif max_positions < 1:
        raise ConfigError(f"{source}: max_position_embeddings must be >= 1, got {max_positions}")
    sliding_window = None
    if family == "mistral":  # absent: MistralConfig's default window; null: full attention
        sliding_window = ints["sliding_window"] if "sliding_window" in hf else _HF_MISTRAL_SLIDING_WINDOW
    layer_types = hf.get("layer_types")
    if layer_types is not None and family in ("mistral", "qwen2"):
        # Each layer's attention kind decides its window in transformers (a Mistral config with
        # layer_types is read as Ministral): one window for every layer, or none, is all we have.
        if not isinstance(layer_types, list) or not all(t in ("full_attention", "sliding_attention")
                                                        for t in layer_types):
            raise ConfigError(f"{source}: layer_types must be a list of \"full_attention\" / "
                              f"\"sliding_attention\", got {layer_types!r:.80}")
        kinds = {t == "sliding_attention" for t in layer_types}
        if kinds == {False}:
            sliding_window = None
        elif kinds != {True} or family != "mistral":
            raise UnsupportedArchitectureError(
                f"{source}: per-layer attention kinds (layer_types with sliding_attention layers, as Ministral's "
                f"alternating windows) are not supported")
    return ModelConfig(
        vocab_size=ints["vocab_size"], d_model=ints["hidden_size"], n_layers=ints["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=ints["num_key_value_heads"] or n_heads,
        head_dim=ints["head_dim"] or None, ffn_dim=ints["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), rope_scaling=rope_scaling,
        max_seq_len=max_positions,
        tie_embeddings=bool(tie), qkv_bias=family == "qwen2",
        sliding_window=sliding_window,
        param_dtype=dtype, dtype=dtype, architecture=family,
    )


EXPORT_MARK = "exported_by"  # the key of an export's config.json that says jaxaccel wrote it
# What an export wrote: config.json's sha256, every file's size and mtime. The mark alone is not proof:
# transformers keeps unknown config keys, so a model it re-saves (fine-tuned, say) carries it on.
EXPORT_MANIFEST = ".jaxaccel-export.json"


def config_to_hf(config: ModelConfig, eos_token_ids=(), bos_token_id=None) -> dict:
    rope: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling is not None:
        rs = config.rope_scaling
        rope = {"rope_theta": config.rope_theta, "rope_type": rs.kind, "factor": rs.factor}
        if rs.kind == "llama3":
            rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                        original_max_position_embeddings=rs.original_max_position)
    eos = list(eos_token_ids)
    hf = {
        "architectures": [EXPORT_NAMES[config.architecture]], "model_type": config.architecture,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.resolved_head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_parameters": rope,
        "rope_scaling": None if config.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "tie_word_embeddings": config.tie_embeddings, "dtype": config.param_dtype, "torch_dtype": config.param_dtype,
        "bos_token_id": bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "attention_dropout": 0.0, "initializer_range": config.init_std, "use_cache": True,
        EXPORT_MARK: "jaxaccel",  # a re-export may replace this folder (`is_own_export`); transformers ignores it
    }
    if config.architecture == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    if config.architecture == "mistral":
        hf["sliding_window"] = config.sliding_window
    if config.architecture == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    return hf


# ----------------------------------------------------------------------------- tensor mapping


_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"


def tensor_plan(config: ModelConfig) -> Iterator[tuple[tuple[str, ...], str, tuple[int, ...], Callable, Callable]]:
    """(jaxaccel path, HF name, HF shape, hf->ours, ours->hf) for every parameter (unrolled layout)."""
    d, hd, f, v = config.d_model, config.resolved_head_dim, config.ffn_dim, config.vocab_size
    h, k = config.n_heads, config.n_kv_heads
    same = (lambda x: x, lambda x: x)
    t = (lambda x: x.T, lambda x: x.T)
    yield ("embed", "embedding"), _EMBED, (v, d), *same
    for i in range(config.n_layers):
        p, hp = f"layer_{i}", f"model.layers.{i}"
        yield (p, "attn_norm", "scale"), f"{hp}.input_layernorm.weight", (d,), *same
        yield (p, "mlp_norm", "scale"), f"{hp}.post_attention_layernorm.weight", (d,), *same
        for name, heads in (("q", h), ("k", k), ("v", k)):
            yield ((p, "attn", name, "kernel"), f"{hp}.self_attn.{name}_proj.weight", (heads * hd, d),
                   lambda x, n=heads: x.T.reshape(d, n, hd), lambda x, n=heads: x.reshape(d, n * hd).T)
            if config.qkv_bias:
                yield ((p, "attn", name, "bias"), f"{hp}.self_attn.{name}_proj.bias", (heads * hd,),
                       lambda x, n=heads: x.reshape(n, hd), lambda x, n=heads: x.reshape(n * hd))
        yield ((p, "attn", "o", "kernel"), f"{hp}.self_attn.o_proj.weight", (d, h * hd),
               lambda x: x.T.reshape(h, hd, d), lambda x: x.reshape(h * hd, d).T)
        for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            yield (p, "mlp", name, "kernel"), f"{hp}.mlp.{name}_proj.weight", shape, *t
    yield ("final_norm", "scale"), "model.norm.weight", (d,), *same
    if not config.tie_embeddings:
        yield ("lm_head", "kernel"), _HEAD, (v, d), *t


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


class _SafetensorsIndex:
    """Name -> file over one or many safetensors files, opened lazily. A `model.safetensors` is
    the weights (as transformers reads them: an index or other .safetensors files beside it are
    not the model's); else the index's files; else every .safetensors file, and a tensor name
    found in two of them is refused rather than taken from whichever sorts last."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if (folder / "model.safetensors").is_file():  # transformers' order: it wins over an index beside it
            files, weight_map = ["model.safetensors"], None
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_bytes())["weight_map"]
            except (ValueError, KeyError, TypeError, OSError) as e:  # ValueError: bad JSON or not UTF-8
                raise CheckpointError(f"{index} is unreadable: {first_line(e)}") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to safetensors file names")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                extra = " (only PyTorch .bin weights: convert them to safetensors first)" if any(
                    folder.glob("*.bin")) else ""
                raise CheckpointError(f"{folder} has config.json but no .safetensors weights{extra}")
            weight_map = None
        self.handles = {}
        for name in files:
            if not (folder / name).is_file():
                where = "listed in the index is missing" if index.is_file() else "is not a file"
                raise CheckpointError(f"{folder}: safetensors file {name} {where}")
            try:
                self.handles[name] = safe_open(str(folder / name), framework="numpy")
            except Exception as e:
                raise CheckpointError(f"{folder / name} is not a readable safetensors file: {e}") from None
        held = {name: set(f.keys()) for name, f in self.handles.items()}  # as the files' headers list them
        located: dict[str, str] = {}
        for name, keys in held.items():
            for key in keys:
                if key in located and weight_map is None:
                    raise CheckpointError(
                        f"{folder}: tensor {key} is in both {located[key]} and {name} (and there is no "
                        f"model.safetensors.index.json saying which holds the model's)")
                located.setdefault(key, name)
        # An index's weight_map decides between two copies; a tensor it leaves out, or names the
        # wrong file for, is read from the listed file that holds it (as transformers does).
        for key, name in (weight_map or {}).items():
            if key in held[name]:
                located[key] = name
        self.weight_map = located

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape of a tensor, read from the file's header (no data); None: absent."""
        file = self.weight_map.get(name)
        return None if file is None else tuple(self.handles[file].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype of a present tensor as safetensors names it ("BF16", "F8_E4M3", "I8")."""
        return self.handles[self.weight_map[name]].get_slice(name).get_dtype()

    def get(self, name: str) -> np.ndarray | None:
        file = self.weight_map.get(name)
        return None if file is None else self.handles[file].get_tensor(name)


_STORED_FLOATS = ("F32", "BF16", "F16", "F64")  # safetensors' names of the dtypes weights may be stored in
_STORED_AS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}


def names_dtype(hf: dict) -> bool:
    """Whether an HF config names one of the dtypes weights load in (not "auto", not absent)."""
    return str(hf.get("dtype") or hf.get("torch_dtype")) in _HF_DTYPE_NAMES


def open_weights(folder: Path) -> "_SafetensorsIndex":
    """The safetensors files of an HF folder, opened once for `stored_dtype` and `load_hf_params`."""
    return _SafetensorsIndex(Path(folder))


def stored_dtype(index: "_SafetensorsIndex") -> str | None:
    """The dtype the weights are stored in (the token embedding's: "float32", "bfloat16",
    "float16"; F64 reads as float32), or None when it cannot be told (a missing tensor: the
    load then says what is wrong)."""
    try:
        return _STORED_AS.get(index.dtype(_EMBED)) if index.shape(_EMBED) is not None else None
    except Exception:  # noqa: BLE001 - an unreadable header: the load names it
        return None


def untied_if_head_stored(index: "_SafetensorsIndex", config: ModelConfig, folder: Path) -> ModelConfig:
    """`config`, untied when it ties the embeddings but the files also hold an `lm_head.weight`
    of other values (a checkpoint saved before tying, a merged fine-tune): that head is the
    model's, as transformers loads it (said in a warning)."""
    import dataclasses
    import warnings

    if (not config.tie_embeddings or index.shape(_HEAD) != index.shape(_EMBED)
            or np.array_equal(index.get(_HEAD), index.get(_EMBED))):
        return config
    warnings.warn(f"{folder}: config.json ties the output head to the embedding, but the weights hold an "
                  f"{_HEAD} of other values; loading that head (untied), as transformers does", stacklevel=3)
    return dataclasses.replace(config, tie_embeddings=False)


def unused_tensors(index: "_SafetensorsIndex", config: ModelConfig) -> list[str]:
    """The stored tensors that are not `config`'s model's (a config.json edited to fewer layers,
    weights of another model): nothing reads them. A tied model's stored copy of its head, and
    the rotary tables older checkpoints kept, are not counted."""
    used = {name for _, name, *_ in tensor_plan(config)} | {_HEAD}
    return sorted(n for n in index.weight_map if n not in used and not n.endswith(".rotary_emb.inv_freq"))


def load_hf_params(folder: Path, config: ModelConfig, shardings: Any | None = None,
                   index: "_SafetensorsIndex | None" = None) -> Any:
    """Read the weights of an HF folder into jaxaccel's unrolled layout, tensor by tensor.
    Each stored shape is compared with HF's own before any reshape: a transposed k/v weight
    has the right number of elements and would otherwise load as a different model."""
    index = _SafetensorsIndex(folder) if index is None else index
    np_dtype = _NP_DTYPES[config.param_dtype]
    params: dict = {}
    for path, name, hf_shape, to_ours, _ in tensor_plan(config):
        stored = index.shape(name)
        if stored is None:
            raise CheckpointError(f"{folder}: tensor {name} is missing from the safetensors files")
        if stored != hf_shape:
            raise CheckpointError(f"{folder}: tensor {name} has shape {list(stored)}, expected {list(hf_shape)} "
                                  f"for this config")
        if (kind := index.dtype(name)) not in _STORED_FLOATS:  # int8 would load as other numbers; FP8 not at all
            raise CheckpointError(f"{folder}: tensor {name} is stored as {kind}; only {', '.join(_STORED_FLOATS)} "
                                  "weights load (dequantize a quantized checkpoint first)")
        value = np.ascontiguousarray(to_ours(index.get(name)).astype(np_dtype, copy=False))
        if shardings is None:
            arr = jax.device_put(value)
        else:
            sharding = _get(shardings, path)
            arr = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
        _set(params, path, arr)
        del value
    return params


def read_hf_config(folder: Path) -> dict:
    try:
        hf = json.loads((Path(folder) / "config.json").read_bytes())
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise ModelLoadError(f"{folder}/config.json is unreadable: {first_line(e)}") from None
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{folder}/config.json must hold a JSON object, got {type(hf).__name__}")
    return hf


def _token_id(value: Any, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelLoadError(f"{where}: {key} must be a token id (an integer >= 0) or a list of them, got {value!r}")
    return value


def read_generation_config(folder: Path) -> dict:
    """generation_config.json as a dict; {} when absent or unreadable (it only holds defaults)."""
    path = Path(folder) / "generation_config.json"
    try:
        gen = json.loads(path.read_bytes()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return gen if isinstance(gen, dict) else {}


# What an HF folder holds that jaxaccel's model does not use, kept in the model's `info` through
# import and save so an export writes it back: generation_config.json's defaults (sampling,
# pad id; its bos/eos are the model's own ids) and config.json's pad_token_id. Any other `info`
# (a SkipDecode model's trained schedule, provenance) travels in config.json under INFO_KEY,
# which transformers keeps and ignores.
HF_GENERATION, HF_PAD = "hf_generation_config", "hf_pad_token_id"
INFO_KEY = "jaxaccel_info"


def hf_info(folder: Path, hf: dict) -> dict:
    """The `info` of a model read from an HF folder (see INFO_KEY)."""
    info = dict(hf[INFO_KEY]) if isinstance(hf.get(INFO_KEY), dict) else {}
    gen = {k: v for k, v in read_generation_config(folder).items() if k not in ("bos_token_id", "eos_token_id")}
    if gen:
        info[HF_GENERATION] = gen
    if isinstance(hf.get("pad_token_id"), int) and not isinstance(hf["pad_token_id"], bool):
        info[HF_PAD] = hf["pad_token_id"]
    return info


def hf_special_tokens(folder: Path, hf: dict) -> tuple[tuple[int, ...], int | None]:
    """EOS ids (generation_config.json wins over config.json) and the BOS id. An unreadable
    generation_config.json is ignored (it only holds defaults); a token id that is not one
    is a one-line ModelLoadError naming the file."""
    gen, where = read_generation_config(folder), f"{folder}/config.json"
    path = Path(folder) / "generation_config.json"
    eos_where = str(path) if "eos_token_id" in gen else where
    eos = gen.get("eos_token_id", hf.get("eos_token_id"))
    eos_ids = tuple(_token_id(e, eos_where, "eos_token_id")
                    for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
    bos_where = str(path) if "bos_token_id" in gen else where
    bos = gen.get("bos_token_id", hf.get("bos_token_id"))
    return eos_ids, (_token_id(bos, bos_where, "bos_token_id") if bos is not None else None)


# ----------------------------------------------------------------------------- export

# The tokenizer's files in an HF folder: the vocabulary (one of the first two), then the files
# transformers reads beside it, carried over unchanged from the folder the tokenizer came from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
TOKENIZER_EXTRAS = SIDE_FILES
# What an export writes besides the shards of its index: a re-export replaces exactly these
# (and the shards the earlier index names), never another file in the folder.
EXPORT_ENTRIES = ("config.json", EXPORT_MANIFEST, "generation_config.json", "model.safetensors.index.json",
                  "model.safetensors", *TOKENIZER_FILES, *TOKENIZER_EXTRAS)


def export_mismatch(config: ModelConfig) -> str | None:
    """Why `config` cannot be written as its HF family without changing the model (None: it
    can). Each family's attention is fixed: Llama has neither q/k/v biases nor a window (its
    attention_bias also adds an o_proj bias), Qwen2 always has the biases and (as jaxaccel
    reads it) no window, Mistral has a window and no biases."""
    family, name = config.architecture, EXPORT_NAMES[config.architecture]
    bias, window = config.qkv_bias, config.sliding_window is not None
    fits = ("qwen2" if bias and not window else "mistral" if window and not bias else
            None if bias and window else "llama")
    need = (f"set model.architecture to {fits}" if fits else
            "none of the three families has both q/k/v biases and a sliding window")
    if family == "llama" and bias:
        return f"model.qkv_bias=true cannot be written as {name}, which has no q/k/v biases: {need}"
    if family == "llama" and window:
        return (f"model.sliding_window={config.sliding_window} cannot be written as {name}, which always attends "
                f"to every earlier token: {need}")
    if family == "llama" and config.d_model % config.n_heads:
        return (f"d_model {config.d_model} is not a multiple of n_heads {config.n_heads}, which transformers' "
                f"LlamaConfig refuses to load: set model.architecture to mistral (with no sliding window, the "
                f"same model)")
    if family == "qwen2" and not bias:
        return (f"model.qkv_bias=false cannot be written as {name}, which always has q/k/v biases (and "
                f"transformers would not load it without them): {need}")
    if family == "qwen2" and window:
        return (f"model.sliding_window={config.sliding_window} cannot be written as {name} (transformers applies "
                f"Qwen2's window only to the layers from max_window_layers on, which jaxaccel does not read): {need}")
    if family == "mistral" and bias:
        return f"model.qkv_bias=true cannot be written as {name}, which has no q/k/v biases: {need}"
    return None


def check_exportable(config: ModelConfig) -> None:
    """A one-line error when `config` has no exact Hugging Face counterpart."""
    if config.moe.n_experts:
        raise UnsupportedArchitectureError("MoE models cannot be exported to Hugging Face format: none of "
                                           f"{', '.join(SUPPORTED)} has routed experts")
    if config.duo.enabled:
        raise UnsupportedArchitectureError("Duo-LLM models cannot be exported to Hugging Face format: none of "
                                           f"{', '.join(SUPPORTED)} has a per-token big/small/skip FFN")
    mismatch = export_mismatch(config)
    if mismatch is not None:
        raise ConfigError(f"cannot export to Hugging Face format: {mismatch}")


def hf_add_bos(folder) -> bool:
    """Whether the tokenizer of an HF folder prepends BOS: `add_bos_token` of its
    tokenizer_config.json (an export writes it for a SentencePiece tokenizer); False when the
    file or the key is absent or unreadable."""
    try:
        doc = json.loads((folder / "tokenizer_config.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("add_bos_token") is True


def tokenizer_extras(tokenizer) -> dict[str, bytes]:
    """The side files the tokenizer was read with (`tokenizer.SIDE_FILES`, unchanged), with
    `add_bos_token` in tokenizer_config.json set to the BOS behaviour of a SentencePiece
    tokenizer (whose vocabulary file does not say it; transformers reads it there). A
    tokenizer.json carries its BOS in its own post-processor. A SentencePiece tokenizer that
    came without a tokenizer_config.json (jaxaccel's own models) reads "</s>" or "<unk>" in a
    text as text, as SentencePiece does: `split_special_tokens` tells transformers so (it
    would read them as the special ids)."""
    extras: dict[str, bytes] = dict(getattr(tokenizer, "side_files", {}))
    add_bos = getattr(tokenizer, "add_bos", None)
    if isinstance(add_bos, bool):
        doc: Any = {}
        if "tokenizer_config.json" not in extras:
            doc["split_special_tokens"] = True
        else:
            try:
                doc = json.loads(extras["tokenizer_config.json"])
            except ValueError:
                doc = None
        if isinstance(doc, dict) and doc.get("add_bos_token") is not add_bos:
            doc["add_bos_token"] = add_bos
            extras["tokenizer_config.json"] = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()
    return extras


def export_hf(folder: str | Path, config: ModelConfig, params: Any, *, tokenizer=None, eos_token_ids=(),
              bos_token_id=None, max_shard_bytes: int = 2 * 1024**3, info: dict | None = None) -> Path:
    """Write an HF folder loadable by `transformers` and by `jaxaccel.load`.

    Tensors keep the parameters' dtype; shards of at most `max_shard_bytes` are written with a
    `model.safetensors.index.json` when more than one is needed. The export is written whole
    into a staging folder inside `folder` and moved in by renames, config.json last, only when
    complete (as `save_model` does): a failed or killed export leaves the earlier model (or no
    config.json, so nothing that loads) in `folder`; a re-export replaces the earlier export's
    files (EXPORT_ENTRIES and the shards its index names), tokenizer included, and no other.
    `info` (the model's): what an import kept of its HF folder goes back (INFO_KEY).
    """
    from jaxaccel.model.transformer import canonical_params

    if "://" in str(folder):  # Path("gs://b/x") is the local /gs/b/x: the export would land there
        raise InvalidArgumentError(REMOTE_HF.format(path=str(folder), what="written to"))
    check_exportable(config)
    from safetensors import SafetensorError

    from jaxaccel.model.checkpoint import STAGING, move_in, recover_move, write_error_reason

    folder = Path(folder)
    staging = folder / STAGING
    try:
        folder.mkdir(parents=True, exist_ok=True)
        recover_move(folder)  # an export (or save) killed while moving in: the earlier model back first
        _remove(staging)  # a killed export's
        staging.mkdir()
        try:
            names = _write_hf_files(staging, config, canonical_params(params, config), tokenizer, eos_token_ids,
                                    bos_token_id, max_shard_bytes, dict(info or {}))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except (OSError, SafetensorError) as e:  # a read-only folder, a full disk
        raise CheckpointError(f"cannot write the Hugging Face export to {folder} ({write_error_reason(e)}); any "
                              f"model already there is left as it was") from None
    move_in(staging, folder, _earlier_export(folder, names), names, "the export")
    return folder


def is_own_export(folder: Path) -> bool:
    """Whether `folder` holds a jaxaccel export as jaxaccel wrote it, which a new export may
    replace without being told to: its config.json carries the mark and is the one the export's
    manifest names (sha256), and every file the manifest lists is there at its size and
    modification time (weights rewritten in place, fine-tuned, keep their size). A model
    re-saved by transformers (which keeps the mark), or any other HF model folder, is someone
    else's."""
    folder = Path(folder)
    try:
        config = (folder / "config.json").read_bytes()
        if json.loads(config).get(EXPORT_MARK) != "jaxaccel":
            return False
        manifest = json.loads((folder / EXPORT_MANIFEST).read_bytes())
        files, times = manifest["files"], manifest.get("mtime_ns", {})  # (exports before times: sizes alone)
        if not (manifest["config_sha256"] == hashlib.sha256(config).hexdigest() and isinstance(files, dict)
                and isinstance(times, dict)):
            return False
        for name, size in files.items():
            if not (isinstance(name, str) and "/" not in name and (folder / name).is_file()):
                return False
            st = (folder / name).stat()
            if st.st_size != size or times.get(name, st.st_mtime_ns) != st.st_mtime_ns:
                return False
        return True
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _earlier_export(folder: Path, new: list[str]) -> list[str]:
    """The files of the model in `folder` that a new export (writing `new`) replaces, config.json
    first (from its move on, the folder is not a model): with an HF model there (a config.json),
    EXPORT_ENTRIES and the shards named by its index (plain .safetensors names in the folder;
    never a glob, which would take other files); without one (a jaxaccel checkpoint's folder,
    say), only what the export writes (with a tokenizer: every tokenizer file) — its
    tokenizer.model stays when the export has none."""
    from jaxaccel.model.checkpoint import replaced_names

    if not (folder / "config.json").exists():
        # a model.safetensors there would load instead of the new index's shards (it wins)
        shadowing = ["model.safetensors"] if "model.safetensors.index.json" in new else []
        return replaced_names(folder, [*new, *shadowing], None)
    names = list(EXPORT_ENTRIES)
    try:
        weight_map = json.loads((folder / "model.safetensors.index.json").read_bytes())["weight_map"]
        shards = weight_map.values() if isinstance(weight_map, dict) else ()
    except (OSError, ValueError, KeyError, TypeError):
        shards = ()
    names += sorted({s for s in shards if isinstance(s, str) and s.endswith(".safetensors") and "/" not in s
                     and "\\" not in s and not s.startswith(".")})
    return replaced_names(folder, new, names)


def _write_hf_files(folder: Path, config: ModelConfig, params: Any, tokenizer, eos_token_ids, bos_token_id,
                    max_shard_bytes: int, info: dict) -> list[str]:
    """Write the whole export into `folder` (empty); the names written, config.json last."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for path, name, _, _, to_hf in tensor_plan(config):
        value = np.ascontiguousarray(to_hf(np.asarray(jax.device_get(_get(params, path)))))
        if size and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            for key, value in shard.items():
                weight_map[key] = fname
                total += value.nbytes
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    eos = list(eos_token_ids)
    # One id as a number, several as a list, none as null: transformers' generate() fails on [].
    gen = info.pop(HF_GENERATION, None)
    gen = {**(gen if isinstance(gen, dict) else {}), "bos_token_id": bos_token_id,
           "eos_token_id": eos[0] if len(eos) == 1 else (eos or None)}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save(folder)
        for name, data in tokenizer_extras(tokenizer).items():
            (folder / name).write_bytes(data)
    hf = config_to_hf(config, eos_token_ids, bos_token_id)
    pad = info.pop(HF_PAD, None)
    if isinstance(pad, int) and not isinstance(pad, bool):
        hf["pad_token_id"] = pad
    if info:
        hf[INFO_KEY] = info
    config_bytes = json.dumps(hf, indent=2).encode()
    (folder / "config.json").write_bytes(config_bytes)
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    manifest = {"config_sha256": hashlib.sha256(config_bytes).hexdigest(),
                "files": {p.name: p.stat().st_size for p in files},
                "mtime_ns": {p.name: p.stat().st_mtime_ns for p in files}}  # (renames keep them)
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return sorted(p.name for p in folder.iterdir() if p.name != "config.json") + ["config.json"]
