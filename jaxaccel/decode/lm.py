"""`jaxaccel.load(path)` -> `LanguageModel`, whose `generate` is the public decoding API.

    lm = jaxaccel.load("path/to/model")            # jaxaccel checkpoint or HF folder
    out = lm.generate(["def fib(n):"], max_new_tokens=64, temperature=0.0)
    out.tokens, out.texts, out.stats

Shapes are bucketed (batch and output length round up to powers of two, the KV cache to
128, 192, 256, 384, ...) and each bucket's compiled programs are kept — on the model and in
JAX's persistent compilation cache — so a second call with similar shapes does not recompile.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from jaxaccel import sharding as shd
from jaxaccel.config import ModelConfig
from jaxaccel.decode import acceptance, compile_cache, tuning
from jaxaccel.decode.engine import PREFILL_CHUNK, GenerateOutput, generate_loop, prefill_cache, python_value
from jaxaccel.decode.methods import get_method
from jaxaccel.decode.sampling import effective_filters, make_sampling
from jaxaccel.errors import (CheckpointError, ConfigError, InvalidArgumentError, InvalidPromptError, JaxaccelError,
                             ModelLoadError, first_line)
from jaxaccel.files import folder_fingerprint, unsupported_location
from jaxaccel.model.checkpoint import BUILTIN_MODELS
from jaxaccel.model.duo import parse_routes
from jaxaccel.model.options import ExecutionPlan
from jaxaccel.model.transformer import (LayerKV, ModelHandle, canonical_params, fuse_layers, init_cache, logical_axes,
                                        param_shapes, stack_layers, unstack_layers)
from jaxaccel.convert.hf import EXPORT_ENTRIES, EXPORT_MANIFEST, is_own_export
from jaxaccel.tokenizer import SIDE_FILES, continuation_text

MIN_BUCKET = 16


def _pow2_at_least(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def seed_key(seed: int) -> jax.Array:
    """A PRNG key for a 64-bit seed. jax.random.key keeps only the low 32 bits (without x64),
    so seeds 2**32 apart would sample the same tokens: the high half is folded in. A seed in
    [0, 2**32) gives jax.random.key(seed) itself; a negative seed is read modulo 2**64."""
    seed %= 2**64
    key = jax.random.key(seed & 0xFFFFFFFF)
    return key if seed < 2**32 else jax.random.fold_in(key, seed >> 32)


def request_lengths(longest: int, max_new_tokens: int, headroom: int = 0) -> tuple[int, int]:
    """(out_len, cache_len) of a `generate` call: the new-token bucket (a power of two >=
    MIN_BUCKET) and the KV cache slots for the longest prompt, those and a method's headroom."""
    out_len = _pow2_at_least(max_new_tokens, MIN_BUCKET)
    return out_len, cache_bucket(longest + out_len + headroom)


# From this many slots on, a cache bucket steps by an eighth of an octave, not a half.
FINE_BUCKETS_FROM = 8192


def cache_bucket(n: int) -> int:
    """KV cache slots for n tokens: the smallest of 128, 192, 256, 384, ..., 4096, 6144, 8192
    (two steps per octave, at most a third unused: few distinct programs per model, each
    compiled once and kept in the persistent cache), then 9216, 10240, ..., 16384, 18432, ...
    (eight steps per octave, at most an eighth unused). Dense attention reads every slot, so
    a long context pays for an unused one at every step and prefill chunk: 64K tokens took a
    96K-slot cache, 1.5x the reads, where one of 72K slots takes 1.125x."""
    size = 128
    while size < n:
        octave = 1 << (size.bit_length() - 1)
        size += octave // (8 if octave >= FINE_BUCKETS_FROM else 2)
    return size


def can_fuse(config: ModelConfig, mesh: Mesh | None) -> bool:
    """The fused q/k/v kernel is split over `tensor` by KV head: fuse only when that divides."""
    return mesh is None or config.n_kv_heads % mesh.shape["tensor"] == 0


def decode_params(params: Any, config: ModelConfig, mesh: Mesh | None, consume: bool = False) -> Any:
    """Parameters in the layout decoding wants: one subtree per layer, q/k/v and gate/up fused
    where the mesh allows, each array on its logical-axis sharding. consume=True releases the
    input layer by layer (for loaders that own `params`); otherwise the input is untouched."""
    params = unstack_layers(params, config)
    layout = "unrolled"
    if can_fuse(config, mesh):
        params = fuse_layers(params if consume else dict(params), config, consume=True)
        layout = "fused"
    if mesh is not None:
        shardings = shd.tree_shardings(logical_axes(config, layout), param_shapes(config, layout), mesh)
        params = jax.device_put(params, shardings)
    return params


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (prompt excluded; ends with EOS if one was produced)
    texts: list[str] | None  # the text `tokens` add after the prompt, when the model has a tokenizer
    stats: dict[str, Any]
    prompt_ids: list[list[int]]
    method_output: Any = None  # e.g. the recycling matrix, for a hot start


class LanguageModel:
    """A loaded model: config, parameters (decode layout, possibly sharded), tokenizer."""

    def __init__(self, config: ModelConfig, params: Any, *, tokenizer=None, eos_token_ids: Sequence[int] = (),
                 bos_token_id: int | None = None, mesh: Mesh | None = None, source: str | None = None,
                 info: dict | None = None, files: str | None = None):
        self.config = config
        self.params = decode_params(params, config, mesh)
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(int(e) for e in eos_token_ids)
        self.bos_token_id = bos_token_id
        self.mesh = mesh
        self.source = source
        self.files = files  # `files.folder_fingerprint` of `source` when loaded: what was read (caches' keys)
        self.info = dict(info or {})  # provenance carried through save(): training steps, validation loss...
        self.prefill_chunk = PREFILL_CHUNK  # prompt tokens per prefill forward
        self._compiled: dict[tuple, Any] = {}
        self._loop_jits: dict[tuple, Any] = {}  # the jitted decode loop of each compiled one
        self._method_memory: dict[str, Any] = {}  # hot-start state of methods that carry one
        self._drafts: dict[str, LanguageModel] = {}  # draft models loaded by draft-model methods, by folder
        self._draft_folders: dict[str, str] = {}  # each draft path or name given -> its folder (`draft_folder`)
        compile_cache.enable()  # compiled programs persist across processes (DESIGN decision 14)

    @property
    def handle(self) -> ModelHandle:
        """The model as the decode engine sees it (params + config + forward + init_cache),
        with this backend's forward defaults (`jaxaccel.decode.tuning`) and the mesh."""
        defaults = tuning.forward_defaults()
        if self.mesh is not None:  # activations pinned to their logical layout, as in training
            defaults["mesh"] = self.mesh
        return ModelHandle(self.params, self.config, defaults)

    # ------------------------------------------------------------------ inputs

    def encode(self, prompt: str | Sequence[int], index: int = 0) -> list[int]:
        """A prompt (text or ids) -> checked token ids."""
        if isinstance(prompt, (bytes, bytearray)):
            raise InvalidPromptError(f"prompt {index} is bytes: pass text as str (decode it first) or token ids "
                                     f"as a list of integers")
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate (bytes that were not UTF-8 on the command line)
                raise InvalidPromptError(f"prompt {index} is not valid Unicode text (a lone surrogate at character "
                                         f"{e.start})") from None
            if self.tokenizer is None:
                raise InvalidPromptError(f"prompt {index} is text, but this model has no tokenizer: pass prompts as "
                                         f"lists of token ids (CLI: --prompt-ids)")
            ids = [_token_id(t, index) for t in self.tokenizer.encode(prompt)]  # (a tokenizer may give an array)
        else:
            if hasattr(prompt, "__array__") and not isinstance(prompt, Sequence):  # numpy, jax, torch arrays
                prompt = np.asarray(prompt).tolist()
            if not isinstance(prompt, Sequence) or isinstance(prompt, (str, bytes)):
                raise InvalidPromptError(f"prompt {index}: expected a string or a list of token ids, "
                                         f"got {type(prompt).__name__}")
            ids = [_token_id(t, index) for t in prompt]
        if not ids:
            raise InvalidPromptError(f"prompt {index} is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidPromptError(f"prompt {index}: token id {bad[0]} is outside the vocabulary "
                                     f"(0..{self.config.vocab_size - 1})")
        return ids

    def decode_text(self, ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 128,
                 method: str = "autoregressive", temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, *, progress: bool = False,
                 method_input: Any = None, routes: str | Sequence[int] | None = None,
                 **method_options: Any) -> GenerationResult:
        """Generate for a batch of prompts (strings or token-id lists) in one compiled call.
        `routes` (Duo-LLM models, `duo_routes`): the FFN every token takes in each layer — "big",
        "small", a pattern such as "BSSB..." (B big, S small, - skip; one letter per layer) or
        a list of ints; None: the model's own (its router's, else all big)."""
        prompts = _prompt_list(prompts)
        progress = python_value(progress)  # numpy / jax scalars
        if not isinstance(progress, bool):
            raise InvalidArgumentError(f"progress must be True or False, got {progress!r}")
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        seed = python_value(seed)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not -2**63 <= seed < 2**64:
            raise InvalidArgumentError(f"seed must be a 64-bit integer (signed or unsigned), got {seed!r}")
        seed = int(seed)
        if not isinstance(method, str):
            raise InvalidArgumentError(f"method must be a method name (a string), got {method!r}")
        # numpy / jax scalars of valid values (np.float32(0.7), np.int64(5)) read as Python numbers
        temperature, top_k, top_p = (python_value(x) for x in (temperature, top_k, top_p))
        mode, sampling = make_sampling(temperature, top_k, top_p)
        if mode.greedy:  # temperatures below sampling.GREEDY_BELOW are greedy for the methods too
            given = [name for name, v in (("top_k", top_k), ("top_p", top_p)) if v is not None]
            if given:  # transformers warns too: the filters shape a distribution greedy never samples
                warnings.warn(f"{' and '.join(given)} apply only when sampling (temperature > 0): with temperature "
                              f"{float(temperature):g} this call decodes greedily", stacklevel=2)
            temperature, top_k, top_p = 0.0, None, None  # nor do they key what greedy measures (draft acceptance)
        else:
            top_k, top_p = effective_filters(top_k, top_p, self.config.vocab_size)
            mode, sampling = make_sampling(temperature, top_k, top_p)
        route_plan = duo_routes(routes, self.config)
        decoder = get_method(method, **method_options)
        decoder.use_model_info(self.info)
        decoder.check(self.config)
        ids = [self.encode(p, i) for i, p in enumerate(prompts)]
        if method_input is not None:  # cheap checks before a draft is loaded and measured
            method_input = _method_input_array(method_input, decoder, self.config.vocab_size)
        decoder.check_request([len(p) for p in ids], max_new_tokens)
        # The compiled loop runs a power-of-two batch (padding rows decode too), split over the
        # mesh's data axes: what each device's forward costs, so what a method plans for.
        data_ways = shd.batch_ways(self.mesh)
        batch = len(ids)
        batch_bucket = _pow2_at_least(batch)
        batch_bucket = math.ceil(batch_bucket / data_ways) * data_ways
        draft_lm = None
        if getattr(decoder, "uses_draft", False):  # load + check the draft; methods may plan with both models
            draft_lm = self._draft_model(decoder)
            longest = max(len(p) for p in ids)
            if draft_lm.config.max_seq_len < longest + max_new_tokens:  # before any calibration the plan runs
                raise InvalidArgumentError(
                    f"the draft's maximum length ({draft_lm.config.max_seq_len}) is shorter than the "
                    f"{longest + max_new_tokens} positions this call needs (longest prompt + max_new_tokens)")
            with acceptance.announcing(progress):  # a first call on a new pair measures the draft first
                decoder.prepare(self, draft_lm, temperature, top_k, top_p, batch=batch_bucket // data_ways)
        longest = max(len(p) for p in ids)
        # The cache is sized from the request, so the model's trained maximum length is no
        # limit: past it, positions are ones the model never saw (the extrapolation TokenSelect
        # is for), said once per call.
        draft_handle = None
        positions = longest + max_new_tokens + decoder.position_headroom()  # a tree's nodes: root + depth
        if draft_lm is not None:
            if draft_lm.config.max_seq_len < positions:
                raise InvalidArgumentError(
                    f"the draft's maximum length ({draft_lm.config.max_seq_len}) is shorter than the {positions} "
                    f"positions this call needs (longest prompt + max_new_tokens + the tree's depth)")
            draft_handle = draft_lm.handle
        if method_input is None and decoder.carries_memory:
            method_input = self._method_memory.get(decoder.key())  # hot start from the previous call

        out_len, cache_len = request_lengths(longest, max_new_tokens, decoder.cache_headroom())
        chunk = min(cache_len, decoder.prefill_chunk() or self.prefill_chunk)
        self._check_cache_fits(batch_bucket, cache_len, draft=draft_lm,
                               prefill_chunk=chunk if decoder.prefill_reads_whole_cache else None)
        # A tree method's nodes sit at positions past the committed tokens (the tree's depth).
        seen = decoder.positions_seen(positions, self.config)
        if seen > self.config.max_seq_len:
            depth = decoder.position_headroom()
            tree = f" + the draft tree's depth {depth}" if depth else ""
            reach = f" (it re-positions keys, but may reach position {seen - 1})" if seen < positions else ""
            warnings.warn(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}){tree} runs past "
                          f"the model's maximum length {self.config.max_seq_len}: method {decoder.name!r} uses "
                          f"positions the model was not trained at{reach}", stacklevel=2)
        # Prompts are padded to the cache length: both programs are keyed by it alone, so
        # prompts of every length up to it share them (prefill runs only the chunks it needs).
        # A method's forward arguments for both programs (TokenSelect's attention policy: what
        # the cache holds), the prefill's narrowed to what it reads so they alone key it.
        # Backend choices a method leaves open (TokenSelect's kernels) are made for this cache.
        sharded = self.mesh is not None
        prefill_defaults = tuning.resolve_forward_defaults(decoder.prefill_defaults(), self.config, cache_len,
                                                           sharded=sharded)
        forward_defaults = tuning.resolve_forward_defaults(decoder.forward_defaults(), self.config, cache_len,
                                                           sharded=sharded)
        if route_plan is not None:  # Duo-LLM routes: every forward of both programs takes them
            prefill_defaults = {**prefill_defaults, "plan": route_plan}
        handle = self.handle.with_defaults(**forward_defaults, **({} if route_plan is None else
                                                                  {"plan": route_plan}))
        prefill_handle = self.handle.with_defaults(**prefill_defaults)

        tokens = np.zeros((batch_bucket, cache_len), np.int32)
        lens = np.ones((batch_bucket,), np.int32)
        for i, p in enumerate(ids):
            tokens[i, :len(p)] = p
            lens[i] = len(p)
        live = np.arange(batch_bucket) < batch
        base = seed_key(seed)
        rng = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch_bucket))
        prompt_args = (prefill_handle, jnp.asarray(tokens), jnp.asarray(lens))
        loop_args = (prompt_args[1], prompt_args[2], jnp.asarray(live), jnp.int32(max_new_tokens), sampling, rng,
                     method_input, draft_handle, decoder.method_params())

        show_progress = progress and max_new_tokens >= 64
        # one array (checked above, or the method's own memory from the previous call) or None
        input_sig = None if method_input is None else (np.shape(method_input), str(method_input.dtype))
        cache_sharding = self._cache_sharding(batch_bucket)
        compile_s = 0.0
        prefill_key = ("prefill", batch_bucket, cache_len, chunk) + tuple(sorted(prefill_defaults.items()))
        prefill_fn = self._compiled.get(prefill_key)
        prefill_jit = jax.jit(functools.partial(prefill_cache, cache_len=cache_len, chunk=chunk,
                                                cache_sharding=cache_sharding),
                              out_shardings=cache_sharding)  # the layout the loop was compiled for
        if prefill_fn is None:
            t0 = time.perf_counter()
            prefill_fn = prefill_jit.lower(*prompt_args).compile(compiler_options=tuning.compiler_options())
            self._compiled[prefill_key] = prefill_fn
            compile_s += time.perf_counter() - t0
        loop_key = (decoder.key(), mode, batch_bucket, out_len, cache_len, input_sig, route_plan,
                    tuple(self.eos_token_ids))  # a constant of the loop, and a public attribute
        loop_fn = self._compiled.get(loop_key)
        if loop_fn is None:
            t0 = time.perf_counter()
            cache_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cache_sharding),
                                      jax.eval_shape(lambda: self.handle.init_cache(batch_bucket, cache_len)))
            tree_attention = tuning.DENSE
            if decoder.tree_nodes():
                tree_attention = tuning.tree_attention_policy(self.config, decoder.tree_nodes(), cache_len,
                                                              sharded=sharded)
            static = dict(method=decoder, mode=mode, eos_ids=self.eos_token_ids, out_len=out_len,
                          cache_sharding=cache_sharding, tree_attention=tree_attention)
            # the cache and (going on in parts) the carry are donated: updated in place
            fn = jax.jit(functools.partial(generate_loop, **static), donate_argnums=(1, 11))
            loop_fn = fn.lower(handle, cache_spec, *loop_args, None, jnp.int32(0)).compile(
                compiler_options=tuning.compiler_options())
            self._compiled[loop_key] = loop_fn
            self._loop_jits[loop_key] = fn  # lowered again for a carry when a progress display needs it
            compile_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        cache = jax.block_until_ready(prefill_fn(*prompt_args))
        prefill_s = time.perf_counter() - t0
        if show_progress:  # the loop in parts, the display updated between them
            out, more_compile_s = self._decode_in_parts(loop_key, loop_fn, handle, cache, loop_args, batch,
                                                        max_new_tokens)
            compile_s += more_compile_s
        else:
            out, more_compile_s = loop_fn(handle, cache, *loop_args, None, jnp.int32(max_new_tokens)), 0.0
        out = jax.block_until_ready(out._replace(cache=None, carry=None))  # the final cache is not kept
        decode_s = time.perf_counter() - t0 - more_compile_s

        if decoder.carries_memory and out.method_output is not None:
            self._method_memory[decoder.key()] = out.method_output[0]  # row 0's state seeds the next call
        out_tokens = np.asarray(out.tokens)
        num_new = np.asarray(out.num_new)
        forwards = np.asarray(out.forwards)
        gen = [out_tokens[i, :num_new[i]].tolist() for i in range(batch)]
        new_tokens = int(num_new[:batch].sum())
        stats = {
            "method": decoder.name, "batch": batch, "prompt_tokens": [len(p) for p in ids],
            "new_tokens": new_tokens, "steps": int(out.steps), "target_forwards": int(out.steps),
            "row_forwards": int(forwards[:batch].sum()),  # target forwards summed over the rows while live
            "mean_accepted": new_tokens / max(1, int(forwards[:batch].sum())),
            "decode_s": decode_s, "tokens_per_s": new_tokens / decode_s if decode_s > 0 else float("inf"),
            "prefill_s": prefill_s,  # of decode_s; the rest is the decode loop
            "decode_phase_tokens_per_s": new_tokens / (decode_s - prefill_s) if decode_s > prefill_s else float("inf"),
            "compile_s": compile_s, **decoder.stats(out.method_output, batch),
        }
        texts = None if self.tokenizer is None else [continuation_text(self.tokenizer, prompt, new)
                                                     for prompt, new in zip(ids, gen)]
        return GenerationResult(tokens=gen, texts=texts, stats=stats, prompt_ids=ids, method_output=out.method_output)

    def _check_cache_fits(self, batch: int, cache_len: int,
                          what_to_do: str = "ask for fewer max_new_tokens or shorter prompts", *,
                          prefill_chunk: int | None = None, draft: "LanguageModel | None" = None) -> None:
        """Refuse a request whose KV cache cannot be allocated (max_new_tokens=10**9...) with
        one line, before allocating: the cache's bytes per device (and a draft model's cache)
        against what the device has left once what it already holds is counted: its allocator's
        limit less the bytes in use (accelerators), or the machine's RAM less the models'
        parameters (CPU). With `prefill_chunk`, also one prefill chunk's attention over the
        whole cache (float32 scores and probabilities of every head, [batch, heads, chunk,
        cache_len] each), which grows with the cache too."""
        cfg = self.config
        models = [self] + ([] if draft is None else [draft])
        limit, in_use = _device_memory()
        if limit is None:
            return
        # The whole cache, and one device's share of it by the layout it really takes
        # (`_cache_sharding`: split over the batch axes, over tensor only where that divides
        # the KV heads, else every device holds them all)
        kv = share = 0
        for m in models:
            shape = (batch, m.config.n_kv_heads, cache_len, m.config.resolved_head_dim)
            per_element = 2 * m.config.n_layers * jnp.dtype(m.config.dtype).itemsize  # K and V of every layer
            kv += per_element * math.prod(shape)
            share += per_element * _per_device(m._cache_sharding(batch), shape)
        scores = 0
        if prefill_chunk:
            shape = (batch, cfg.n_heads, prefill_chunk, cache_len)
            scores = 2 * 4 * math.prod(shape)
            share += 2 * 4 * _per_device(None if self.mesh is None else
                                         shd.named_sharding(("batch", "heads", None, None), shape, self.mesh), shape)
        if in_use is None:  # CPU: every device is the same RAM, which also holds the parameters (each copy)
            need, per, where = share * (1 if self.mesh is None else self.mesh.size), "", "this machine has"
            in_use = sum(_bytes_resident(m.params) for m in models)
        else:  # an accelerator: its share of the cache, against what its allocator has left
            need, per, where = share, " per device", "this device has"
        if need > limit - in_use:
            also = f" and its prefill's attention scores {scores / 1e9:.1f} GB" if scores else ""
            raise InvalidArgumentError(
                f"the KV cache for {cache_len} positions x batch {batch} ({kv / 1e9:.1f} GB{also}) needs "
                f"{need / 1e9:.1f} GB{per}, more than the {max(limit - in_use, 0) / 1e9:.1f} GB {where} left "
                f"({limit / 1e9:.1f} GB, {in_use / 1e9:.1f} GB of it already in use): {what_to_do}")

    def _draft_model(self, decoder) -> "LanguageModel":
        """The draft model a draft-model method names (`draft=`: a path, a builtin name or a
        loaded LanguageModel; default `builtin:draft` for `builtin:default`), loaded once and
        kept; checked against this model. The method's compile key gets the path, or for a
        model object the structure of its handle (config, shapes, dtypes, shardings): its
        params are arguments of the compiled loop, so another draft of the same shape (one
        loaded again, or fine-tuned) reuses the program — unless the method bakes what it
        measured of the draft into it (DySpec's greedy_temperature="auto", value table and
        budget="auto"; Sequoia's tree): a draft that measures differently compiles again."""
        spec = decoder.opts.get("draft")
        if spec is None:
            if self.source is None or Path(self.source) != Path(BUILTIN_MODELS["default"]):
                raise InvalidArgumentError(f"method {decoder.name!r} needs a draft model: pass draft=PATH (a model "
                                           f"with this model's vocabulary)")
            spec = "builtin:draft"
        if isinstance(spec, LanguageModel):
            draft = spec
        elif isinstance(spec, (str, Path)):
            named = str(spec)
            try:  # a spelling seen before needs no folder lookup (the folder may be gone since)
                spec = self._draft_folders.get(named) or draft_folder(spec)
                draft = self._drafts.get(spec) or load(spec, mesh=self.mesh)
            except ModelLoadError as e:
                raise InvalidArgumentError(f"draft model: {e}") from None
            self._drafts[spec], self._draft_folders[named] = draft, spec
        else:
            raise InvalidArgumentError(f"draft must be a model path or name, got {spec!r}")
        decoder.opts["draft"] = _handle_signature(draft.handle) if spec is draft else spec
        check_draft_model(self, draft, decoder)
        if draft.mesh is not self.mesh and not (draft.mesh is None and self.mesh is None):
            raise InvalidArgumentError("the draft model must be loaded on the target's mesh")
        return draft

    def _decode_in_parts(self, loop_key, loop_fn, handle, cache, loop_args, batch: int,
                         max_new_tokens: int) -> tuple[GenerateOutput, float]:
        """The decode loop run in parts of ~0.25 s (the first 8 steps), a progress bar on stderr
        updated between them: the same steps as one call. Not a callback inside the loop,
        which would keep the program out of the persistent compilation cache (a warm CLI at a
        terminal recompiled its loop every time). Returns the output and the seconds spent
        compiling the program that goes on (once per loop program)."""
        from tqdm import tqdm

        compile_s, stop = 0.0, 8
        with tqdm(total=batch * max_new_tokens, unit="tok", file=sys.stderr, leave=False) as bar:
            t0 = time.perf_counter()
            out = loop_fn(handle, cache, *loop_args, None, jnp.int32(stop))
            while True:
                steps, num_new = int(out.steps), np.asarray(out.num_new)[:batch]
                bar.update(int(num_new.sum()) - bar.n)
                if steps >= max_new_tokens or steps < stop:  # the end, or every row done
                    return out, compile_s
                go_on = self._compiled.get(loop_key + ("carry",))
                if go_on is None:
                    c0 = time.perf_counter()
                    go_on = self._loop_jits[loop_key].lower(
                        handle, out.cache, *loop_args, out.carry, jnp.int32(0)).compile(
                        compiler_options=tuning.compiler_options())
                    self._compiled[loop_key + ("carry",)] = go_on
                    compile_s += time.perf_counter() - c0
                per_step = max(time.perf_counter() - t0 - compile_s, 1e-6) / steps
                stop = steps + max(8, int(0.25 / per_step))
                out = go_on(handle, out.cache, *loop_args, out.carry, jnp.int32(stop))

    def _cache_sharding(self, batch: int) -> NamedSharding | None:
        if self.mesh is None:
            return None
        shape = (batch, self.config.n_kv_heads, 1, self.config.resolved_head_dim)
        return shd.named_sharding(("batch", "kv_heads", "cache_len", "head_dim"), shape, self.mesh)

    # ------------------------------------------------------------------ scoring

    def logits(self, tokens: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Full-sequence logits [batch, T, vocab] (float32) of equal-length token rows (lists of
        ids or a 2-D integer array), each id checked as `generate` checks prompt ids. An MoE
        model serves every routing assignment here, as it does when decoding (no capacity
        drops), so these are the logits `generate` computes for the same tokens. One program
        per batch size and cache bucket of T (`cache_bucket`), as `generate` compiles."""
        rows = _prompt_list(tokens)
        if any(isinstance(r, str) for r in rows):
            raise InvalidPromptError("logits takes token ids, not text: encode it first (lm.encode)")
        rows = [self.encode(r, i) for i, r in enumerate(rows)]
        if len({len(r) for r in rows}) > 1:
            raise InvalidPromptError(f"logits needs rows of equal length, got lengths "
                                     f"{sorted({len(r) for r in rows})}")
        tokens = np.asarray(rows, np.int32)
        if tokens.shape[1] > self.config.max_seq_len:  # as generate warns
            warnings.warn(f"rows of {tokens.shape[1]} tokens run past the model's maximum length "
                          f"{self.config.max_seq_len}: positions the model was not trained at", stacklevel=2)
        # Rows are padded to a cache bucket's length (causal: trailing tokens change nothing
        # before them), so scoring texts of many lengths compiles a few programs, not one each.
        length = tokens.shape[1]
        padded = np.zeros((tokens.shape[0], cache_bucket(length)), np.int32)
        padded[:, :length] = tokens
        fn = self._compiled.get(("logits",))
        if fn is None:
            fn = jax.jit(lambda model, t: model.forward(t, dropless=True)[0])
            self._compiled[("logits",)] = fn
        return np.asarray(fn(self.handle, jnp.asarray(padded))[:, :length])

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write a jaxaccel checkpoint. A folder holding anything but an earlier checkpoint is
        refused unless `overwrite` (its other files are then kept; `params/` is replaced)."""
        from jaxaccel.model.checkpoint import save_model

        folder = destination(folder, overwrite, "save")
        add_bos = bool(getattr(self.tokenizer, "add_bos", False))
        return save_model(folder, self.config, canonical_params(self.params, self.config), tokenizer=self.tokenizer,
                          eos_token_ids=self.eos_token_ids, bos_token_id=self.bos_token_id,
                          extra={"add_bos": add_bos, "info": self.info})

    def export_hf(self, folder: str | Path, *, overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3) -> Path:
        """Write a Hugging Face folder (safetensors shards of at most `max_shard_bytes`). A
        folder holding anything but an earlier export is refused unless `overwrite`."""
        from jaxaccel.convert.hf import export_hf

        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, (int, np.integer)) or max_shard_bytes < 1:
            raise InvalidArgumentError(f"max_shard_bytes must be an integer >= 1, got {max_shard_bytes!r}")
        folder = destination(folder, overwrite, "export")
        kwargs = {"max_shard_bytes": int(max_shard_bytes)}
        return export_hf(folder, self.config, canonical_params(self.params, self.config), tokenizer=self.tokenizer,
                         eos_token_ids=self.eos_token_ids, bos_token_id=self.bos_token_id, info=self.info, **kwargs)

    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))


# ----------------------------------------------------------------------------- loading

# `builtin:NAME` models: their folders (model/checkpoint.py names them)
DEFAULT_MODEL_DIR, DRAFT_MODEL_DIR, SKIPDECODE_MODEL_DIR, DUO_MODEL_DIR, LONGCTX_MODEL_DIR = (
    BUILTIN_MODELS[n] for n in ("default", "draft", "skipdecode", "duo", "longctx"))


def _param_shardings(mesh: Mesh | None):
    if mesh is None:
        return None

    def fn(config: ModelConfig, layout: str):
        return shd.tree_shardings(logical_axes(config, layout), param_shapes(config, layout), mesh)

    return fn


def resolve_mesh(mesh: Mesh | str | dict | None) -> Mesh | None:
    if mesh is None:
        return None
    if isinstance(mesh, Mesh):
        missing = [a for a in shd.MESH_AXES if a not in mesh.axis_names]
        if missing:
            raise InvalidArgumentError(f"the mesh must have the axes {', '.join(shd.MESH_AXES)} (size 1 for unused "
                                       f"ones; jaxaccel.sharding.make_mesh builds one), it lacks {', '.join(missing)}")
        if any(t != AxisType.Auto for t in getattr(mesh, "axis_types", ())):
            # jax.make_mesh's default (Explicit axes): the engine pins layouts by sharding
            # constraints, which only Auto axes take; the same devices and names, Auto
            mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        return mesh
    if not isinstance(mesh, (str, dict)):
        raise InvalidArgumentError(f"mesh must be a jax Mesh, a string like 'tensor=2,data=4' or a dict, got {mesh!r}")
    if isinstance(mesh, str) and not mesh.strip():  # as the CLI's --mesh: "" is no spelling of "one device"
        raise InvalidArgumentError("mesh must name axes, e.g. 'tensor=4,data=2' (None: one device); got an empty "
                                   "string")
    return shd.make_mesh(mesh)


# What `save` / `export_hf` write (fnmatch patterns): a folder holding only these and an
# earlier save or export (`_DESTINATIONS`' predicates) is replaced without `overwrite`.
SAVE_FILES = ("jaxaccel.json", "jaxaccel.json.tmp", "params", "tokenizer.model", "tokenizer.json", *SIDE_FILES,
              ".jaxaccel-saving", ".jaxaccel-replaced")
EXPORT_FILES = (*EXPORT_ENTRIES, "model*.safetensors", ".jaxaccel-saving", ".jaxaccel-replaced")


_CHOOSE_ANOTHER = "choose an empty folder, or pass overwrite=True to write into it"


def check_save_destination(folder, what_to_do: str = _CHOOSE_ANOTHER) -> None:
    """Before a long job that ends in `LanguageModel.save(folder)`: the save would be refused.
    `what_to_do` ends the message (a CLI has no overwrite=True)."""
    destination(folder, False, "save", what_to_do)


def _holds_earlier_save(path: Path, what_to_do: str) -> bool:
    """Its marker (`checkpoint.holds_earlier_save`)."""
    from jaxaccel.model.checkpoint import holds_earlier_save

    return holds_earlier_save(path, "jaxaccel.json")


def _holds_earlier_export(path: Path, what_to_do: str) -> bool:
    """It holds a jaxaccel export as written (`is_own_export`); any other Hugging Face model
    there — one re-saved by transformers included — is someone else's (refused, whatever else
    the folder holds)."""
    if is_own_export(path):
        return True
    if (path / "config.json").exists():
        raise InvalidArgumentError(f"destination {str(path)!r} holds a Hugging Face model that jaxaccel did "
                                   f"not export, or changed since (its config.json or files differ from "
                                   f"{EXPORT_MANIFEST}); {what_to_do}")
    return False


# kind -> (the files it writes, whether a folder holds an earlier write of that kind)
_DESTINATIONS = {"save": (SAVE_FILES, _holds_earlier_save), "export": (EXPORT_FILES, _holds_earlier_export)}


def destination(folder, overwrite: bool, kind: str, what_to_do: str = _CHOOSE_ANOTHER):
    """Check where `save` (kind "save") / `export_hf` ("export") write: a path, not a file, and
    (unless `overwrite`) empty or holding only what they write themselves over an earlier
    write of theirs — without one, a `params/` or `tokenizer.model` there is someone else's.
    A gs:// save is checked the same way (it deletes the old model's files before writing)."""
    from jaxaccel.model.checkpoint import JOURNAL, SET_ASIDE, STAGING, as_path

    if not isinstance(folder, (str, os.PathLike)) or not str(folder):
        raise InvalidArgumentError(f"the destination must be a folder path, got {folder!r}")
    if "://" in str(folder):
        path = as_path(folder)  # (an unsupported scheme is refused here)
        if kind != "save":  # (export_hf refuses a remote folder itself)
            return path
    elif str(folder).startswith("builtin:"):  # load() reads that name as a shipped model, never this folder
        raise InvalidArgumentError(f"destination {str(folder)!r} names a built-in model; {what_to_do}")
    else:
        path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise InvalidArgumentError(f"destination {str(path)!r} is a file, not a folder")
    if path.is_dir() and not overwrite:
        own, holds_earlier = _DESTINATIONS[kind]
        # (a save or export killed while moving in: its journal; the next one puts the old model back)
        earlier = holds_earlier(path, what_to_do) or (path / SET_ASIDE / JOURNAL).is_file()
        ours = own if earlier else (STAGING, SET_ASIDE)
        other = sorted(p.name for p in path.iterdir() if not any(fnmatch.fnmatchcase(p.name, o) for o in ours))
        if other:
            raise InvalidArgumentError(f"destination {str(path)!r} holds other files ({', '.join(other[:3])}"
                                       f"{', ...' if len(other) > 3 else ''}); {what_to_do}")
    return path


def _method_input_array(value: Any, decoder, vocab_size: int) -> Any:
    """`method_input` as the one numeric array a method takes (recycling's matrix of token
    ids, -1 for none), or a one-line error: for a method that takes none, for a dict or a
    ragged list, for entries that are not -1 or a token id of the vocabulary (an id past it
    used to poison the tree's logits with NaN: every token came out 0). Returned as a numpy
    int32 array."""
    if not decoder.takes_input:
        raise InvalidArgumentError(f"method {decoder.name!r} takes no method_input")
    if isinstance(value, jax.Array):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError):  # a ragged nested list
            arr = None
    if arr is None or not (jnp.issubdtype(arr.dtype, jnp.integer) or jnp.issubdtype(arr.dtype, jnp.floating)) \
            or jnp.issubdtype(arr.dtype, jnp.bool_):
        raise InvalidArgumentError(f"method_input for {decoder.name!r} must be a numeric array, got "
                                   f"{type(value).__name__}")
    values = np.asarray(arr)
    if values.size and (not np.all(np.isfinite(values)) or np.any(values != np.round(values))
                        or values.min() < -1 or values.max() >= vocab_size):
        raise InvalidArgumentError(f"method_input for {decoder.name!r} holds entries that are not token ids: each "
                                   f"must be -1 (none) or an integer in [0, {vocab_size})")
    # On the host: an array from another model's devices (another mesh) would meet a compiled
    # loop laid out for the first such input's devices, and JAX refuses it. As int32 (token
    # ids): a float or int64 matrix of the same ids compiled the loop again.
    return values.astype(np.int32)


def draft_folder(spec: str | Path) -> str:
    """The folder a draft named by path or builtin name is loaded from, absolute: what a target
    keys its loaded drafts by (one draft however it is spelled: "builtin:draft", its folder,
    relative or absolute, through a symlink)."""
    folder = locate(spec)[1]
    return str(folder.resolve() if isinstance(folder, Path) else folder)


def check_draft_model(target: LanguageModel, draft: LanguageModel, decoder) -> None:
    """What a draft-model method (`decoder`) needs of a loaded draft: its own config check (the
    vocabulary), then the target's tokenizer; InvalidArgumentError otherwise."""
    decoder.check_draft(draft.config, target.config)
    if (draft.tokenizer is None) != (target.tokenizer is None) or (
            draft.tokenizer is not None and not _same_tokenizer(draft.tokenizer, target.tokenizer)):
        raise InvalidArgumentError("the draft's tokenizer differs from the target's; a draft must share the "
                                   "target's tokenizer")


def _same_tokenizer(a, b) -> bool:
    """Two tokenizers agree: same vocabulary size and the same ids for a probe text."""
    probe = "def f(x):\n    return x ** 2  # héllo, 世界 \t 0.5e-3 {}[]"
    size = lambda t: getattr(t, "vocab_size", None)  # noqa: E731
    return size(a) == size(b) and list(a.encode(probe)) == list(b.encode(probe))


def duo_routes(routes, config) -> ExecutionPlan | None:
    """`generate`'s `routes` -> a static plan (one route per layer for every token,
    `duo.parse_routes`), or None for the model's own routes."""
    if routes is None:
        return None
    if not config.duo.enabled:
        raise InvalidArgumentError("routes= needs a Duo-LLM model (model.duo.enabled)")
    return ExecutionPlan(routes=parse_routes(routes, config.n_layers))


def locate(path: str | Path | None) -> tuple[str, Any]:
    """(kind, folder) of a model path, as `load` reads it: kind "model" (a jaxaccel model
    folder, a builtin name, a finished training run's model/), "run" (a training run still
    going or killed: its latest checkpoint) or "hf" (a Hugging Face folder). Reads no
    parameters; a path that is no model is a one-line ModelLoadError."""
    from jaxaccel.model import checkpoint as ckpt

    if path is None:
        path = "builtin:default"
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise ModelLoadError(f"a model path (str or pathlib.Path) or a builtin name is needed, got {path!r}")
    try:
        path = ckpt.builtin_folder(path) or path
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from None
    if problem := unsupported_location(path):
        raise ModelLoadError(f"model path {problem}")
    if not str(path).startswith("gs://"):
        path = Path(path).expanduser()
    folder = ckpt.as_path(path)
    try:
        return _classify(folder)
    except JaxaccelError:
        raise
    except Exception as e:  # an object store's client: no network, no credentials, no such bucket
        if not str(folder).startswith("gs://"):
            raise
        raise ModelLoadError(f"model path {str(folder)!r} cannot be read ({type(e).__name__}: {first_line(e)}); "
                             "check the bucket, the network and the credentials") from None


def _classify(folder) -> tuple[str, Any]:
    """`locate` for a folder that exists or not."""
    from jaxaccel.convert import hf as hf_io
    from jaxaccel.model import checkpoint as ckpt

    if not folder.exists():
        raise ModelLoadError(f"model path {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ModelLoadError(f"model path {str(folder)!r} is a file; expected a model folder")
    if ckpt.run_export(folder) is not None:
        return "model", folder / "model"  # a finished training run (not one resumed past its export)
    if ckpt.is_run_dir(folder):
        return "run", folder
    if ckpt.is_jaxaccel_checkpoint(folder):
        return "model", folder
    if hf_io.is_hf_folder(folder):
        if "://" in str(folder):
            raise ModelLoadError(hf_io.REMOTE_HF.format(path=str(folder), what="read from"))
        return "hf", folder
    if (folder / ckpt.SET_ASIDE / ckpt.JOURNAL).is_file():
        raise ModelLoadError(f"a save into {str(folder)!r} was killed while it moved the new model in; the earlier "
                             f"model is set aside in {ckpt.SET_ASIDE}/ there: save or export into the folder again "
                             f"(the earlier model is put back first), or move those files back")
    raise ModelLoadError(f"{str(folder)!r} is neither a jaxaccel checkpoint (no jaxaccel.json) nor a Hugging Face "
                         f"model folder (no config.json)")


def model_config(path: str | Path | None) -> ModelConfig:
    """The config of the model `path` names (`locate`), read without its parameters: for
    checks before any work (a benchmark's draft vocabulary, an export's HF family)."""
    from jaxaccel.config import from_dict, parse_yaml
    from jaxaccel.convert import hf as hf_io
    from jaxaccel.model import checkpoint as ckpt

    kind, folder = locate(path)
    if kind == "run":
        try:
            run = parse_yaml((folder / ckpt.RUN_CONFIG).read_bytes(), ckpt.RUN_CONFIG)
            return from_dict(ModelConfig, run.get("model") or {}, prefix="model")
        except (OSError, ConfigError, AttributeError) as e:
            raise CheckpointError(f"{folder}/{ckpt.RUN_CONFIG}: not a readable training config: "
                                  f"{first_line(e)}") from None
    if kind == "model":
        try:
            return from_dict(ModelConfig, ckpt.read_meta(folder)["model"])
        except (ConfigError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder}/{ckpt.MARKER}: bad model config: {first_line(e)}") from None
    return hf_io.config_from_hf(hf_io.read_hf_config(folder), source=str(folder / "config.json"))


def load(path: str | Path | None = None, *, dtype: str | None = None, mesh: Mesh | str | dict | None = None
         ) -> LanguageModel:
    """Load a jaxaccel checkpoint, a training output folder or a Hugging Face model folder.
    None (or "builtin:default") is the shipped default model, "builtin:draft" its draft model;
    "builtin:skipdecode", "builtin:duo" and "builtin:longctx" the methods' models (docs/MODELS.md).

    dtype: "float32" | "bfloat16" | "float16" sets parameter and compute dtype (default: the
    checkpoint's). mesh: a Mesh, or "tensor=4,data=2": parameters and the KV cache are then
    sharded over it by the logical-axis rules in `jaxaccel.sharding`.
    """
    from jaxaccel.config import DTYPES
    from jaxaccel.convert import hf as hf_io
    from jaxaccel.model import checkpoint as ckpt
    from jaxaccel.tokenizer import load_tokenizer

    compile_cache.enable()  # before the first jitted op of the load
    if dtype is not None and dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    kind, folder = locate(path)
    files = folder_fingerprint(folder)  # before reading: a folder rewritten meanwhile is not this model
    mesh = resolve_mesh(mesh)
    shardings_fn = _param_shardings(mesh)

    if kind == "run":  # a run still going (or killed): its latest checkpoint's parameters
        from jaxaccel.data.ids import BOS_ID, EOS_ID

        config, params, meta = ckpt.load_run_params(folder, dtype, shardings_fn)
        params = decode_params(params, config, mesh, consume=True)
        return LanguageModel(config, params, tokenizer=load_tokenizer(folder, add_bos=True), eos_token_ids=[EOS_ID],
                             bos_token_id=BOS_ID, mesh=mesh, source=str(folder), files=files,
                             info={**meta.get("info", {}), "trained_steps": meta["step"]})
    if kind == "model":
        config, params, meta = ckpt.load_model(folder, dtype=dtype, shardings_fn=shardings_fn)
        params = decode_params(params, config, mesh, consume=True)
        tokenizer = load_tokenizer(folder, add_bos=bool(meta.get("add_bos", False)))
        eos, bos = _special_ids(meta.get("eos_token_ids") or [], meta.get("bos_token_id"), CheckpointError,
                                f"{folder}/{ckpt.MARKER}: ", config.vocab_size)
        _check_tokenizer_fits(tokenizer, config, f"{folder}: ")
        return LanguageModel(config, params, tokenizer=tokenizer, eos_token_ids=eos,
                             bos_token_id=bos, mesh=mesh, source=str(folder), files=files,
                             info=meta.get("info"))
    hf = hf_io.read_hf_config(folder)
    config = hf_io.config_from_hf(hf, source=str(folder / "config.json"))
    weights = hf_io.open_weights(folder)
    config = hf_io.untied_if_head_stored(weights, config, folder)
    unused = hf_io.unused_tensors(weights, config)
    if unused:
        warnings.warn(f"{folder}: {len(unused)} stored tensors are not part of the model config.json describes "
                      f"(such as {unused[0]}); they are not loaded: does config.json belong to these weights?",
                      stacklevel=2)
    if dtype is None:  # the source's: the weights as stored, whatever config.json's dtype says
        stored = hf_io.stored_dtype(weights)
        if stored is not None and stored != config.param_dtype:
            if hf_io.names_dtype(hf):  # (a config without one says nothing to warn about)
                warnings.warn(f"{folder}: config.json says {config.param_dtype} but the weights are stored as "
                              f"{stored}; loading them as stored (pass dtype= to choose)", stacklevel=2)
            dtype = stored
    if dtype is not None:
        config = dataclasses.replace(config, param_dtype=dtype, dtype=dtype)
    shardings = shardings_fn(config, "unrolled") if shardings_fn else None
    params = decode_params(hf_io.load_hf_params(folder, config, shardings, weights), config, mesh, consume=True)
    eos, bos = hf_io.hf_special_tokens(folder, hf)
    outside = _outside_vocabulary(eos, bos, config.vocab_size)
    if outside:  # a config quirk, not a broken model: the ids are dropped, said once
        warnings.warn(f"{folder}: special token id {outside[0]} is outside the model's vocabulary of "
                      f"{config.vocab_size}; ignored", stacklevel=2)
        eos = tuple(t for t in eos if t < config.vocab_size)
        bos = bos if bos is None or bos < config.vocab_size else None
    # a SentencePiece vocabulary does not say whether BOS is prepended: tokenizer_config.json does
    tokenizer = load_tokenizer(folder, add_bos=hf_io.hf_add_bos(folder))
    _check_tokenizer_fits(tokenizer, config, f"{folder}: ")
    return LanguageModel(config, params, tokenizer=tokenizer, eos_token_ids=eos, bos_token_id=bos,
                         mesh=mesh, source=str(folder), files=files, info=hf_io.hf_info(folder, hf))


def _device_memory() -> tuple[int | None, int | None]:
    """(bytes a device can hold, bytes it holds now): its allocator's limit and bytes in use
    (accelerators, read afresh at every call), else (the machine's RAM, None) (CPU: jax
    reports no memory stats); a limit of None when neither is known."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # not every backend reports memory
        stats = {}
    if stats.get("bytes_limit") is not None:
        return int(stats["bytes_limit"]), int(stats.get("bytes_in_use") or 0)
    return _machine_memory(), None


@functools.cache
def _machine_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _bytes_resident(tree) -> int:
    """Bytes a pytree of arrays holds in this process, every device's copy or shard counted."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shards = getattr(leaf, "addressable_shards", None)
        total += sum(s.data.nbytes for s in shards) if shards else np.asarray(leaf).nbytes
    return int(total)


def _prompt_list(prompts) -> list:
    """`generate`'s prompts -> a list of prompts: a string or one id list (a list of ints, a
    1-D integer array) is one prompt; a list of those, or a 2-D integer array, a batch."""
    if hasattr(prompts, "__array__") and not isinstance(prompts, (Sequence, str, bytes)):  # numpy, jax, torch
        prompts = np.asarray(prompts)
    if isinstance(prompts, np.ndarray):
        if prompts.ndim not in (1, 2) or prompts.size == 0:
            raise InvalidPromptError(f"an array of prompts must be 1-D (one prompt) or 2-D (a batch) and non-empty, "
                                     f"got shape {list(prompts.shape)}")
        prompts = prompts.tolist()
        return [prompts] if isinstance(prompts[0], (int, float)) else prompts
    if isinstance(prompts, (bytes, bytearray)):
        raise InvalidPromptError("prompts are bytes: pass text as str (decode it first) or token ids as lists of "
                                 "integers")
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise InvalidPromptError(f"prompts must be a string, a list of token ids, or a list of those; got "
                                 f"{type(prompts).__name__}")
    if len(prompts) == 0:
        raise InvalidPromptError("no prompts given")
    first = python_value(prompts[0])
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        # one prompt of ids (ints, 0-d numpy / jax / torch integers; integral floats, as an
        # array of them is read: each id is checked by _token_id)
        return [prompts]
    return list(prompts)


def _handle_signature(handle) -> str:
    """What a compiled program needs to know of a model handle passed as its argument: the
    tree (config and forward defaults are its static part), each leaf's shape, dtype and
    sharding. Two handles with the same signature can share a compiled program."""
    import hashlib

    leaves, tree = jax.tree.flatten(handle)
    parts = [str(tree)] + [f"{np.shape(x)}|{getattr(x, 'dtype', None)}|{getattr(x, 'sharding', None)}" for x in leaves]
    return "model:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


MAX_NEW_TOKENS = 2**30  # positions are int32: a prompt plus this always fits


def check_max_new_tokens(value: Any) -> int:
    """max_new_tokens as an int in [1, MAX_NEW_TOKENS], else InvalidArgumentError (the API and,
    before the model load, the CLI)."""
    value = python_value(value)  # numpy / jax scalars
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_NEW_TOKENS:
        raise InvalidArgumentError(f"max_new_tokens must be an integer in [1, 2**30], got {value!r}")
    return int(value)


def _per_device(sharding: NamedSharding | None, shape: tuple) -> int:
    """Elements of an array of `shape` that one device holds under `sharding` (None: all)."""
    return math.prod(shape if sharding is None else sharding.shard_shape(shape))


def _token_id(t, index: int) -> int:
    """One token id: an int, a numpy / jax / torch integer scalar, or an integral float."""
    v = python_value(t)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    raise InvalidPromptError(f"prompt {index}: token ids must be integers, got {t!r}")


def _special_ids(eos: Any, bos: Any, error: type[Exception], where: str, vocab_size: int
                 ) -> tuple[tuple[int, ...], int | None]:
    """(eos_token_ids, bos_token_id) checked: a list of ids and an id or None, each inside the
    vocabulary (an EOS id past it would never fire), else `error`."""
    eos, bos = python_value(eos), python_value(bos)
    is_id = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0  # noqa: E731
    if not (isinstance(eos, (list, tuple)) and all(is_id(e) for e in eos)) or not (bos is None or is_id(bos)):
        raise error(f"{where}eos_token_ids must be a list of token ids and bos_token_id a token id or None, "
                    f"got {eos!r} and {bos!r}")
    outside = _outside_vocabulary(eos, bos, vocab_size)
    if outside:
        raise error(f"{where}special token id {outside[0]} is outside the model's vocabulary of {vocab_size}")
    return tuple(eos), bos


def _outside_vocabulary(eos, bos, vocab_size: int) -> list[int]:
    """The special token ids (EOS ids, then BOS) at or past `vocab_size`."""
    return [t for t in (*eos, *([] if bos is None else [bos])) if t >= vocab_size]


def _check_tokenizer_fits(tokenizer, config: ModelConfig, where: str) -> None:
    """A tokenizer with more pieces than the model has embeddings: a warning naming both sizes.
    Another model's tokenizer looks like this; so do Hugging Face models whose tokenizer adds a
    token or two their embeddings never got, which work for every other id (a prompt holding
    an id past the vocabulary is refused in one line), so it is not an error."""
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size > config.vocab_size:
        warnings.warn(f"{where}the tokenizer has {size} pieces but the model's vocabulary is {config.vocab_size} "
                      f"(another model's tokenizer?): prompts holding ids past {config.vocab_size - 1} are refused",
                      stacklevel=3)


@functools.lru_cache(maxsize=32)
def _layout_shapes(config: ModelConfig, layout: str) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(param_shapes(config, layout))}


FROM_PARAMS_ARGUMENTS = ("tokenizer", "eos_token_ids", "bos_token_id", "mesh", "source", "info")


def from_params(config: ModelConfig, params: Any, **kwargs) -> LanguageModel:
    """Wrap in-memory parameters (any layout) as a LanguageModel, after checking them against
    `config` (every array's shape, in one of the layouts), so a mismatch is one line here and
    never a wrong model. kwargs: tokenizer, eos_token_ids, bos_token_id, mesh (a Mesh or a
    string like "tensor=2"), source, info."""
    from jaxaccel.model.transformer import LAYOUTS

    if not isinstance(config, ModelConfig):
        raise InvalidArgumentError(f"config must be a jaxaccel.config.ModelConfig, got {type(config).__name__}")
    unknown = sorted(set(kwargs) - set(FROM_PARAMS_ARGUMENTS))
    if unknown:
        raise InvalidArgumentError(f"unknown argument {unknown[0]!r}; valid ones: {', '.join(FROM_PARAMS_ARGUMENTS)}")
    if not isinstance(params, Mapping) or not params:
        raise InvalidArgumentError(f"params must be the model's parameter tree (a dict of arrays), got "
                                   f"{'an empty dict' if isinstance(params, dict) else type(params).__name__}")
    got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    likely = "scanned" if "layers" in params else "fused" if any("qkv" in k for k in got) else "unrolled"
    best = None
    for layout in (likely, *(x for x in LAYOUTS if x != likely)):
        want = _layout_shapes(config, layout)
        if want == got:
            break
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        score = len(missing) + len(extra) + len(wrong)
        if best is None or score < best[0]:
            first = (f"{missing[0]} is missing" if missing else f"{extra[0]} is not a parameter of this config"
                     if extra else f"{wrong[0]} has shape {list(got[wrong[0]])}, the config gives {list(want[wrong[0]])}")
            best = (score, layout, first)
    else:
        raise InvalidArgumentError(f"params do not match the config ({best[1]} layout: {best[2]})")
    tokenizer = kwargs.get("tokenizer")
    if tokenizer is not None and not (callable(getattr(tokenizer, "encode", None))
                                      and callable(getattr(tokenizer, "decode", None))):
        raise InvalidArgumentError(f"tokenizer must have encode and decode methods, got {type(tokenizer).__name__}")
    _check_tokenizer_fits(tokenizer, config, "")
    kwargs["eos_token_ids"], kwargs["bos_token_id"] = _special_ids(
        kwargs.get("eos_token_ids", ()), kwargs.get("bos_token_id"), InvalidArgumentError, "", config.vocab_size)
    not_float = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(params)
              if not jnp.issubdtype(np.result_type(getattr(v, "dtype", np.asarray(v).dtype)), jnp.floating)]
    if not_float:
        raise InvalidArgumentError(f"params must be floating-point arrays, {not_float[0]} is not")
    kwargs["mesh"] = resolve_mesh(kwargs.get("mesh"))
    if kwargs["mesh"] is None:  # host (numpy) arrays onto the device once, not at every call
        params = jax.tree.map(lambda v: v if isinstance(v, jax.Array) else jnp.asarray(v), params)
    return LanguageModel(config, params, **kwargs)


__all__ = ["GenerationResult", "LanguageModel", "load", "from_params", "LayerKV", "init_cache", "stack_layers"]
