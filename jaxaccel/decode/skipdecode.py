"""SkipDecode (arXiv 2307.02628): batched, KV-cached early-exit decoding.

Each decode step runs the whole batch through the same h(t) layers — the warm-up layers,
then the top h(t) - warm-up — with h non-increasing over the generation
(`jaxaccel.model.skip.SkipSchedule`). Skipped layers are not computed at all: the forward's
execution plan (`ExecutionPlan.layer_on`) wraps each layer in a `lax.cond`, so a step at h
layers costs h layers (docs/ARCHITECTURE.md: why `cond` per layer rather than a switch over
compiled depths). Because every later token runs a subset of the layers every earlier token
ran, every K/V a step attends to exists; the K/V slots of skipped layers are never written
and never read.

Step 0 runs the last prompt token, so it runs every layer (the prompt always does); step
t >= 1 runs the (t-1)-th generated token at h(t - 1).

    lm.generate(prompts, method="skipdecode", speedup=2, max_length=256)
    lm.generate(prompts, method="skipdecode", min_layers=4, max_layers=10, max_length=256)
    lm.generate(prompts, method="skipdecode")   # a schedule-fine-tuned model: its own schedule

Without schedule options, a model fine-tuned under a schedule (`info["skip_schedule"]`,
written by the trainer) decodes with that schedule; any other model runs every layer.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.config import ModelConfig
from jaxaccel.decode.autoregressive import next_token
from jaxaccel.decode.engine import DecodeMethod, DecodeState, StepContext, commit
from jaxaccel.errors import InvalidArgumentError
from jaxaccel.model.options import ExecutionPlan
from jaxaccel.model.skip import SkipSchedule, check_span


class SkipState(NamedTuple):
    span: jax.Array  # () int32: max_length - the batch's longest prompt
    layers_run: jax.Array  # () int32: layers computed, summed over steps (batch-uniform)
    steps: jax.Array  # () int32


class SkipDecode(DecodeMethod):
    name = "skipdecode"
    # dispatch: "cond" — one program, a lax.cond per layer on the step's flag; "switch" — a
    # lax.switch over one program per depth the schedule reaches (the skipped layers are not
    # even traced). `python -m jaxaccel.bench skipdecode` times both (docs/ARCHITECTURE.md).
    options: dict = {"warmup_layers": None, "min_layers": None, "max_layers": None, "max_length": None,
                     "speedup": None, "dispatch": "cond"}  # warmup_layers None: the model's, else 1 (0 for 1 layer)

    def __init__(self, **opts: Any):
        super().__init__(**opts)
        # Before use_model_info fills it from a trained schedule: the caller's own max_length
        # is checked against the prompt even for a constant depth (check_request).
        self._max_length_given = opts.get("max_length") is not None

    def schedule(self, config: ModelConfig) -> SkipSchedule:
        o = self.opts
        # The default warm-up is one layer, or none on a 1-layer model (which then just runs
        # its one layer); an explicit warmup_layers is checked as given.
        warmup = min(1, config.n_layers - 1) if o["warmup_layers"] is None else o["warmup_layers"]
        return SkipSchedule.build(config.n_layers, warmup_layers=warmup, min_layers=o["min_layers"],
                                  max_layers=o["max_layers"], max_length=o["max_length"], speedup=o["speedup"],
                                  default_max_length=config.max_seq_len)

    def use_model_info(self, info: dict[str, Any]) -> None:
        """Every schedule option the caller did not give comes from the schedule the model
        was fine-tuned with (the trainer records it as info["skip_schedule"]), so
        `--method skipdecode` alone decodes as trained, and `speedup=3` keeps the trained
        max_length and warm-up (min/max then come from the speedup)."""
        trained = info.get("skip_schedule") or {}
        trained = trained if isinstance(trained, dict) else {}  # (info read from a foreign file)
        keys = ("warmup_layers", "max_length") + (("min_layers", "max_layers") if self.opts["speedup"] is None else ())
        self._from_model = []
        for k in keys:
            if self.opts[k] is None and k in trained:
                self.opts[k] = trained[k]
                self._from_model.append(k)

    def check(self, config: ModelConfig) -> None:
        if self.opts["dispatch"] not in ("cond", "switch"):
            raise InvalidArgumentError(f"dispatch must be 'cond' or 'switch', got {self.opts['dispatch']!r}")
        try:
            self._schedule = self.schedule(config)
        except InvalidArgumentError as e:
            taken = getattr(self, "_from_model", [])
            if not taken:
                raise
            raise InvalidArgumentError(f"{e} ({', '.join(f'{k}={self.opts[k]}' for k in taken)} from the model's "
                                       f"trained schedule; give them too to override)") from None

    def check_request(self, prompt_lens: list[int], max_new_tokens: int) -> None:
        # A constant depth (min_layers == max_layers, e.g. every layer when neither options
        # nor a trained schedule are given) does not depend on the span: any prompt decodes,
        # unless the caller gave a max_length the prompt already reaches.
        if self._schedule.min_layers < self._schedule.max_layers or self._max_length_given:
            check_span(self._schedule, max(prompt_lens))

    def init_state(self, ctx: StepContext, batch: int, method_input: Any, prompt_tokens=None,
                   prompt_lens=None) -> SkipState:
        span = jnp.int32(self._require(ctx).max_length) - jnp.max(prompt_lens).astype(jnp.int32)
        return SkipState(span=span, layers_run=jnp.int32(0), steps=jnp.int32(0))

    def _require(self, ctx: StepContext) -> SkipSchedule:
        schedule = getattr(self, "_schedule", None)
        if schedule is None or schedule.n_layers != ctx.config.n_layers:
            self._schedule = schedule = self.schedule(ctx.config)
        return schedule

    def layers_at_step(self, step, span, schedule: SkipSchedule):
        """h for loop iteration `step` (step 0: the last prompt token, every layer)."""
        return jnp.where(step == 0, schedule.n_layers, schedule.layers(jnp.maximum(step - 1, 0), span))

    def step(self, state: DecodeState, ctx: StepContext) -> DecodeState:
        schedule = self._require(ctx)
        ms: SkipState = state.method_state
        h = self.layers_at_step(state.step, ms.span, schedule)
        # A constant depth takes the static programs whatever `dispatch` says: every layer is
        # then exactly autoregressive's forward (in bfloat16 a layer inside lax.cond rounds
        # differently, and the greedy tokens drifted from autoregressive's after ~20).
        if self.opts["dispatch"] == "cond" and schedule.min_layers < schedule.max_layers:
            state, _, token = next_token(state, ctx, ExecutionPlan(layer_on=schedule.active(h)))
        else:
            depths = sorted(set(range(schedule.min_layers, schedule.max_layers + 1)) | {schedule.n_layers})
            branches = [lambda st, d=d: next_token(st, ctx, ExecutionPlan(layer_on=schedule.static_active(d)))
                        for d in depths]
            index = jnp.searchsorted(jnp.asarray(depths, jnp.int32), h)
            state, _, token = jax.lax.switch(index, branches, state)
        state = state._replace(method_state=ms._replace(layers_run=ms.layers_run + h, steps=ms.steps + 1))
        return commit(state, token[:, None], jnp.ones_like(token), ctx)

    def final_state(self, method_state: SkipState) -> Any:
        return method_state.layers_run, method_state.steps

    def stats(self, method_output: Any, batch: int) -> dict[str, Any]:
        layers, steps = (int(np.asarray(x)) for x in method_output)
        return {"schedule": self._schedule.describe(), "n_layers": self._schedule.n_layers,
                "mean_layers_per_step": layers / max(steps, 1)}
