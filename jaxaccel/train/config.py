"""Training run configuration: typed defaults here, YAML presets in configs/, `key=value`
overrides on the command line (`python -m jaxaccel.train CONFIG.yaml train.steps=100`)."""
from __future__ import annotations

import dataclasses
import math

from jaxaccel.config import ModelConfig, check_types
from jaxaccel.data.config import DataConfig
from jaxaccel.errors import ConfigError
from jaxaccel.files import unsupported_location


MAX_STEPS = 2**31  # optax's step counter is an int32


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay to `min_lr_ratio * lr`."""

    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 = off

    def __post_init__(self):
        # `not (x > 0)` and not `x <= 0`: a NaN fails every comparison.
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optim.lr must be a finite number > 0, got {self.lr}")
        for name in ("b1", "b2"):  # Adam's moment decays: 1 never forgets, and the bias correction divides by 0
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {value}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"optim.{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.eps) and self.eps > 0):  # Adam divides by sqrt(v) + eps: v is 0 for an unseen token
            raise ConfigError(f"optim.eps must be a finite number > 0, got {self.eps}")
        if self.warmup_steps >= MAX_STEPS:
            raise ConfigError(f"optim.warmup_steps must be < 2**31 (optax counts steps in int32), got "
                              f"{self.warmup_steps}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"optim.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.warmup_steps and optim.grad_clip must be >= 0, optim.min_lr_ratio in [0, 1]")


@dataclasses.dataclass(frozen=True)
class SkipScheduleConfig:
    """Fine-tune under SkipDecode's layer schedule (`jaxaccel.model.skip`): each training row
    gets a random prompt boundary in [prompt_min, prompt_max]; the tokens after it run only
    the layers the schedule gives their step (per-token layer masks in one forward). On when
    `max_layers`, `min_layers` or `speedup` is set."""

    max_layers: int | None = None
    min_layers: int | None = None  # default: max_layers
    speedup: float | None = None  # instead of min/max: a target mean layer count n_layers / speedup
    warmup_layers: int = 1
    max_length: int | None = None  # where the schedule reaches min_layers; default train.seq_len
    prompt_min: int = 16
    prompt_max: int | None = None  # default train.seq_len // 2
    loss: str = "generated"  # generated: loss on the tokens after the boundary only; all: every token

    @property
    def enabled(self) -> bool:
        return self.max_layers is not None or self.min_layers is not None or self.speedup is not None

    def __post_init__(self):
        if self.loss not in ("generated", "all"):
            raise ConfigError(f"train.skip_schedule.loss must be 'generated' or 'all', got {self.loss!r}")
        if self.prompt_min < 1 or (self.prompt_max is not None and self.prompt_max < self.prompt_min):
            raise ConfigError("train.skip_schedule.prompt_min must be >= 1 and <= prompt_max")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int | None = None  # None: the data budget's total steps (unique_tokens x epochs)
    batch_size: int = 32  # global, in sequences
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    seed: int = 0
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int | None = None  # cap on validation batches per evaluation
    log_every: int = 10
    dropout_start_step: int = 0  # dropout (rates in model.dropout) is on from this step
    # Training targets (1 - eps) one-hot + eps uniform over model.vocab_size; the logged train
    # loss and every evaluation stay the plain cross entropy, so runs remain comparable.
    label_smoothing: float = 0.0
    remat: bool = False  # recompute layers in the backward pass
    # "flash": blockwise attention with an online softmax (memory linear in seq_len; splash
    # kernel on TPU); "dense": the reference that materialises [batch, heads, T, T] scores.
    attention: str = "flash"
    peak_flops: float | None = None  # per-device FLOP/s for MFU; None: measure a matmul
    progress: bool = True
    # A model folder (jaxaccel checkpoint, a run's output folder, or builtin:NAME) whose parameters start
    # this run instead of a random init (ignored when resuming). A deeper source gives its
    # first model.n_layers layers (a shallower baseline: the top layers dropped).
    init_from: str | None = None
    skip_schedule: SkipScheduleConfig = SkipScheduleConfig()

    def __post_init__(self):
        if self.steps is not None and not 1 <= self.steps < MAX_STEPS:
            raise ConfigError(f"train.steps must be in [1, 2**31) or null, got {self.steps}")
        for name in ("batch_size", "seq_len", "grad_accum", "log_every"):
            if not 1 <= getattr(self, name) < 2**31:  # array dimensions
                raise ConfigError(f"train.{name} must be in [1, 2**31), got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:  # jax.random.key takes a signed 64-bit seed
            raise ConfigError(f"train.seed must be in [0, 2**63), got {self.seed}")
        if self.init_from is not None and not str(self.init_from).strip():
            raise ConfigError("train.init_from must be a model or run folder, or null; got an empty string")
        for name in ("eval_every", "dropout_start_step"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ConfigError(f"train.eval_batches must be >= 1 or null (every validation batch), got "
                              f"{self.eval_batches} (no validation at all: data.validation_fraction=0)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.attention not in ("flash", "dense"):
            raise ConfigError(f"train.attention must be 'flash' or 'dense', got {self.attention!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be a multiple of train.grad_accum "
                              f"({self.grad_accum})")
        if self.peak_flops is not None and not (math.isfinite(self.peak_flops) and self.peak_flops > 0):
            raise ConfigError(f"train.peak_flops must be a finite number > 0 or null (null: measure a matmul), "
                              f"got {self.peak_flops}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps < 1 or self.keep < 1:
            raise ConfigError("checkpoint.every_steps and checkpoint.keep must be >= 1")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; one axis may be -1: it takes whatever the others leave. A mesh
    smaller than the machine (dividing its device count) runs on the first devices (single
    process only)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def sizes(self, n_devices: int) -> dict[str, int]:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "expert": self.expert}
        free = [name for name, size in sizes.items() if size == -1]
        if len(free) > 1:
            raise ConfigError(f"only one mesh axis may be -1, got {', '.join('mesh.' + f for f in free)}")
        for name, size in sizes.items():
            if size < 1 and size != -1:
                raise ConfigError(f"mesh.{name} must be >= 1 or -1, got {size}")
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if free:
            if n_devices % fixed:
                raise ConfigError(f"mesh axes {', '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)} use "
                                  f"{fixed} devices, which does not divide the {n_devices} available")
            sizes[free[0]] = n_devices // fixed
        elif n_devices % fixed:
            raise ConfigError(f"mesh data={self.data} fsdp={self.fsdp} tensor={self.tensor} expert={self.expert} uses "
                              f"{fixed} devices, which does not divide the {n_devices} available")
        return sizes


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: LoopConfig = LoopConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    output_dir: str = "runs/default"
    tensorboard: bool = True

    def __post_init__(self):
        check_types(self)  # sections given as dicts (RunConfig(model={...})) are ConfigErrors, not AttributeErrors
        for key, path in (("output_dir", self.output_dir), ("train.init_from", self.train.init_from)):
            if path is not None and (problem := unsupported_location(path)):
                raise ConfigError(f"{key} {problem}")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len ({self.train.seq_len}) is longer than model.max_seq_len "
                              f"({self.model.max_seq_len}): raise model.max_seq_len to at least {self.train.seq_len} "
                              f"or lower train.seq_len")

    def skip_schedule(self):
        """The SkipDecode schedule this run fine-tunes under, or None (a ConfigError when the
        options do not fit the model or the sequence length)."""
        sk = self.train.skip_schedule
        if not sk.enabled:
            return None
        from jaxaccel.errors import InvalidArgumentError
        from jaxaccel.model.skip import SkipSchedule

        if self.data.objective != "causal":  # a prefix's bidirectional attention would read, from tokens
            # that run every layer, the K/V of later prefix tokens the schedule skips
            raise ConfigError(f"train.skip_schedule needs data.objective: causal (decoding is causal), got "
                              f"{self.data.objective!r}")
        if sk.speedup is not None and (sk.min_layers is not None or sk.max_layers is not None):
            raise ConfigError("train.skip_schedule: give either speedup or min_layers/max_layers, not both (over a "
                              "config that sets speedup, add train.skip_schedule.speedup=null)")
        prompt_max = self.train.seq_len // 2 if sk.prompt_max is None else sk.prompt_max
        if prompt_max >= self.train.seq_len or sk.prompt_min > prompt_max:
            raise ConfigError(f"train.skip_schedule prompt lengths [{sk.prompt_min}, {prompt_max}] must lie below "
                              f"train.seq_len ({self.train.seq_len})")
        try:
            schedule = SkipSchedule.build(self.model.n_layers, warmup_layers=sk.warmup_layers,
                                          min_layers=sk.min_layers, max_layers=sk.max_layers,
                                          max_length=sk.max_length, speedup=sk.speedup,
                                          default_max_length=self.train.seq_len)
        except InvalidArgumentError as e:
            raise ConfigError(f"train.skip_schedule: {e}") from None
        if schedule.max_length <= prompt_max:
            raise ConfigError(f"train.skip_schedule.max_length ({schedule.max_length}) must exceed prompt_max "
                              f"({prompt_max})")
        return schedule, sk.prompt_min, prompt_max, sk.loss == "generated"

    def check_mesh(self, sizes: dict[str, int]) -> None:
        """The mesh must divide what it splits: heads, KV heads, experts, the batch."""
        m = self.model
        if m.n_heads % sizes["tensor"]:
            raise ConfigError(f"mesh.tensor={sizes['tensor']} does not divide model.n_heads={m.n_heads}")
        if m.moe.n_experts and m.moe.n_experts % sizes["expert"]:
            raise ConfigError(f"mesh.expert={sizes['expert']} does not divide moe.n_experts={m.moe.n_experts}")
        if sizes["expert"] > 1 and not m.moe.n_experts:
            raise ConfigError(f"mesh.expert={sizes['expert']} needs an MoE model (moe.n_experts > 0)")
        micro = self.train.batch_size // self.train.grad_accum
        from jaxaccel import sharding as shd  # (jax: imported when a mesh is checked, not with the config)

        ways = shd.batch_ways(sizes)
        if micro % ways:
            raise ConfigError(f"the micro-batch ({micro} sequences) must be a multiple of mesh "
                              f"{shd.BATCH_AXES_NAME} ({ways})")
