"""Chain drafters through the tree verifier: prompt-lookup decoding and a plain k-token chain.

* `pld` — prompt-lookup decoding (Saxena, 2023; transformers' `prompt_lookup_num_tokens`):
  match the last n tokens (n = max_ngram down to 1) of prompt + output against earlier text,
  take the first match and draft the `num_draft` tokens that followed it.
* `chain` — k tokens per step from a fixed source: `"random"` (uniform random tokens: the
  verifier's overhead with ~nothing accepted, and a losslessness check) or `"recycling"`
  (the top-1 successor chain of a Token Recycling matrix, i.e. a template of width 1).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxaccel.decode.engine import DecodeState, StepContext
from jaxaccel.decode.recycling import Recycling
from jaxaccel.decode.tree import (Tree, TreeMethod, TreeShape, chain_structure, chain_tree, check_k_fits_vocab,
                                  positive_int)
from jaxaccel.errors import InvalidArgumentError


class PromptLookup(TreeMethod):
    name = "pld"
    options = {"max_ngram": 3, "num_draft": 10}

    def __init__(self, **opts: Any):
        super().__init__(**opts)
        self.max_ngram = positive_int("max_ngram", self.opts["max_ngram"], 16)
        self.num_draft = positive_int("num_draft", self.opts["num_draft"], 256)

    def tree_shape(self) -> TreeShape:
        return TreeShape(nodes=self.num_draft + 1, max_depth=self.num_draft, max_children=1)

    def static_structure(self):
        return chain_structure(self.num_draft)

    def init_state(self, ctx: StepContext, batch: int, method_input: Any, prompt_tokens=None, prompt_lens=None):
        return (prompt_tokens.astype(jnp.int32), prompt_lens.astype(jnp.int32))

    def draft(self, state: DecodeState, ctx: StepContext) -> Tree:
        prompt, plen = state.method_state
        b, p = prompt.shape
        out = state.out_tokens
        hist_len = p + out.shape[1]
        j = jnp.arange(hist_len, dtype=jnp.int32)
        from_out = jnp.clip(j[None, :] - plen[:, None], 0, out.shape[1] - 1)
        hist = jnp.where(j[None, :] < plen[:, None], prompt[:, jnp.minimum(j, p - 1)],
                         jnp.take_along_axis(out, from_out, axis=1))
        length = plen + state.num_new  # hist[:, length - 1] == last_token
        # Windows are aligned on their last token e: eq[:, e, i] = hist[e - i] == hist[length - 1 - i];
        # an n-gram matches at e when eq[:, e, :n] all hold. One pass serves every n.
        tail = jnp.take_along_axis(hist, jnp.maximum(length[:, None] - 1 - jnp.arange(self.max_ngram), 0), axis=1)
        eq = jnp.stack([jnp.roll(hist, i, axis=1) == tail[:, i:i + 1] for i in range(self.max_ngram)], axis=-1)
        run = jnp.cumprod(eq, axis=-1).astype(bool)  # run[:, e, n - 1]: the n-gram ending at e matches
        start = jnp.zeros((b,), jnp.int32)
        found = jnp.zeros((b,), bool)
        for n in range(self.max_ngram, 0, -1):  # longest n-gram first, earliest match (as transformers)
            # the window starts at e - n + 1 >= 0 and continues at e + 1, an earlier token than the last
            ok = run[:, :, n - 1] & (j[None, :] >= n - 1) & (j[None, :] + 1 < length[:, None])
            has = ok.any(axis=1)
            e = jnp.argmax(ok, axis=1).astype(jnp.int32)
            start = jnp.where(has & ~found, e + 1, start)
            found = found | has
        idx = start[:, None] + jnp.arange(self.num_draft, dtype=jnp.int32)
        drafted = jnp.take_along_axis(hist, jnp.minimum(idx, hist_len - 1), axis=1)
        n_valid = jnp.where(found, jnp.clip(length - start, 0, self.num_draft), 0)
        return chain_tree(state.last_token, drafted, n_valid)


class Chain(TreeMethod):
    name = "chain"
    options = {"k": 4, "draft": "random"}

    def __init__(self, **opts: Any):
        super().__init__(**opts)
        self.k = positive_int("k", self.opts["k"], 256)
        if self.opts["draft"] not in ("random", "recycling"):
            raise InvalidArgumentError(f'draft must be "random" or "recycling", got {self.opts["draft"]!r}')
        # the chain reads only each token's top-1 recycled successor: a [vocab, 1] matrix
        self.recycling = Recycling(template=[1] * self.k, k=1) if self.opts["draft"] == "recycling" else None

    def check(self, config) -> None:
        check_k_fits_vocab(self.k, config)
        if self.recycling is not None:
            self.recycling.check(config)

    def tree_shape(self) -> TreeShape:
        return TreeShape(nodes=self.k + 1, max_depth=self.k, max_children=1)

    def static_structure(self):
        return chain_structure(self.k)

    @property
    def takes_input(self) -> bool:  # a recycling-drafted chain starts from recycling's matrix
        return self.recycling is not None

    def init_state(self, ctx: StepContext, batch: int, method_input: Any, prompt_tokens=None, prompt_lens=None):
        if self.recycling is not None:
            return self.recycling.init_state(ctx, batch, method_input)
        return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(12345), i))(jnp.arange(batch))

    def final_state(self, method_state: Any) -> Any:
        return method_state if self.recycling is not None else None

    def draft(self, state: DecodeState, ctx: StepContext) -> Tree:
        if self.recycling is not None:
            return self.recycling.draft(state, ctx)
        keys = jax.vmap(jax.random.fold_in)(state.method_state, state.step + jnp.zeros_like(state.cache_len))
        drafted = jax.vmap(lambda key: jax.random.randint(key, (self.k,), 0, ctx.config.vocab_size))(keys)
        return chain_tree(state.last_token, drafted, jnp.full(state.last_token.shape, self.k))

    def observe(self, method_state: Any, tree: Tree, logits: jax.Array, state: DecodeState) -> Any:
        if self.recycling is not None:
            return self.recycling.observe(method_state, tree, logits, state)
        return method_state
