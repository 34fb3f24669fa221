"""How well a draft model predicts a target: the measurements tree builders are planned from.

* `positional_acceptance` — Sequoia's vector p: p_k = probability that the k-th child drafted
  under a node (drawn from the draft without replacement; greedy: the draft's k-th best
  token) is the first one the verifier accepts. Measured on calibration text the target
  itself generated (at the decoding temperature), teacher-forced through both models: at
  temperature 0 exactly (the rank of the target's argmax in the draft's ordering); when
  sampling by simulating the verifier (multi-candidate speculative sampling with residual
  updates, `tree.verify_sample`'s rule) `samples` times per position.
* `probability_vs_acceptance` — DySpec's Figure 2: for draft tokens x ~ q, the draft
  probability q(x) against the probability the target accepts it, min(1, p(x)/q(x)) (the
  correlation that justifies growing trees greedily by draft probability).

Results are cached on disk per (target, draft, sampling settings) when both models come from
files (`cached_acceptance`), next to the persistent compile cache.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxaccel.decode import compile_cache
from jaxaccel.decode.sampling import make_sampling, target_probs

CALIBRATION_PROMPTS = 16
CALIBRATION_PROMPT_TOKENS = 32
CALIBRATION_NEW_TOKENS = 48


def _remembered(measure):
    """Also keep a `cached_*` measurement on the target object for the process: models built
    in memory have no disk entry (they would be measured again on every `generate` call) and
    a loaded model's entry is then read once. Keyed by the draft object and the arguments; the
    draft is held weakly (a notebook trying one draft after another would keep every one alive
    for as long as the target), and its entries go with it."""
    import weakref

    @functools.wraps(measure)
    def wrapper(target, draft, **kwargs):
        memo = target.__dict__.setdefault("_measurements", {})
        key = (measure.__name__, id(draft), json.dumps(kwargs, sort_keys=True))
        hit = memo.get(key)
        if hit is not None and hit[0]() is draft:
            return hit[1]
        value = measure(target, draft, **kwargs)

        def forget(ref, memo=memo, key=key):  # (holds the memo, not the target)
            if memo.get(key, (None,))[0] is ref:
                del memo[key]

        memo[key] = (weakref.ref(draft, forget), value)
        return value

    return wrapper


def calibration_lengths(target, draft) -> tuple[int, int]:
    """The default calibration's (prompt tokens, new tokens): 32 + 48, or the same 2:3 split of
    the two models' shorter maximum length when 80 positions do not fit it (past it, the
    measurement would be of positions the models were never trained at)."""
    limit = min(target.config.max_seq_len, draft.config.max_seq_len)
    if limit >= CALIBRATION_PROMPT_TOKENS + CALIBRATION_NEW_TOKENS:
        return CALIBRATION_PROMPT_TOKENS, CALIBRATION_NEW_TOKENS
    prompt_tokens = max(1, limit * 2 // 5)
    return prompt_tokens, max(1, limit - prompt_tokens)


def calibration(target, draft) -> tuple[list[list[int]], int]:
    """The default calibration: its prompts and how many tokens the target adds to each."""
    prompt_tokens, new_tokens = calibration_lengths(target, draft)
    return calibration_prompts(target, prompt_tokens=prompt_tokens), new_tokens


def _calibration_settings(target, draft) -> dict[str, int]:
    """What identifies the default calibration in a cache entry's key."""
    prompt_tokens, new_tokens = calibration_lengths(target, draft)
    return {"prompts": CALIBRATION_PROMPTS, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}


def calibration_prompts(lm, n: int = CALIBRATION_PROMPTS, prompt_tokens: int = CALIBRATION_PROMPT_TOKENS,
                        seed: int = 0) -> list[list[int]]:
    """Prompts to measure on: the first `prompt_tokens` tokens of held-out (validation-split)
    documents of the default corpus when the model has a tokenizer, else random token ids."""
    if lm.tokenizer is not None:
        from jaxaccel.data.config import DataConfig
        from jaxaccel.data.corpus import open_corpus

        cfg = DataConfig()
        prompts = []
        try:
            for doc in open_corpus(cfg.corpus).documents("validation", cfg.validation_buckets):
                ids = lm.encode(doc.text[:4 * prompt_tokens * 8])
                if len(ids) >= prompt_tokens:
                    prompts.append(ids[:prompt_tokens])
                if len(prompts) == n:
                    return prompts
        except (OSError, ImportError, ValueError, RuntimeError):  # no corpus here: random ids
            pass
    rng = np.random.default_rng(seed)
    return [rng.integers(0, lm.config.vocab_size, prompt_tokens).tolist() for _ in range(n)]


# Whether a measurement says so on stderr before it starts (the decode CLI's first call on a
# new model pair is otherwise silent for ~10 s on a CPU): a list, so one message per call.
_ANNOUNCE: contextvars.ContextVar[list | None] = contextvars.ContextVar("jaxaccel_acceptance_announce", default=None)


@contextlib.contextmanager
def announcing(on: bool):
    """Within this block, the first measurement prints one line on stderr (when `on`)."""
    token = _ANNOUNCE.set([] if on else None)
    try:
        yield
    finally:
        _ANNOUNCE.reset(token)


def _announce(target, draft) -> None:
    said = _ANNOUNCE.get()
    if said is None or said:
        return
    said.append(True)
    path = cache_path(target, draft, {})
    kept = f"kept in {path.parent}" if path is not None else "kept for this process"
    print(f"measuring how the draft's tokens are accepted on {CALIBRATION_PROMPTS} calibration prompts "
          f"(once per model pair and sampling settings; {kept})", file=sys.stderr, flush=True)


def teacher_forced(target, draft, prompts: Sequence[Sequence[int]], temperature: float, top_k: int | None,
                   top_p: float | None, new_tokens: int, seed: int, draft_logits: bool = False):
    """The target continues each prompt (autoregressive, these sampling settings); both models
    then score prompt + continuation -> (p, q) [positions, vocab]: the target's sampling
    distribution and the draft's (`draft.draft_probs`' rule) at every generated position;
    with draft_logits=True also the draft's raw logits there."""
    _announce(target, draft)
    out = target.generate([list(p) for p in prompts], max_new_tokens=new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed)
    seqs = [list(p) + g for p, g in zip(prompts, out.tokens)]
    width = max(len(s) for s in seqs)
    rows = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        rows[i, :len(s)] = s  # right padding never reaches earlier positions (causal)
    mode, sp = make_sampling(temperature, top_k, top_p)
    greedy_draft = make_sampling(1.0, None, None)
    t_logits = target.logits(rows)
    d_logits = draft.logits(rows)
    ps, qs, ls = [], [], []
    for i, (prompt, s) in enumerate(zip(prompts, seqs)):
        pos = np.arange(len(prompt) - 1, len(s) - 1)
        if len(pos) == 0:
            continue
        ps.append(np.asarray(target_probs(jnp.asarray(t_logits[i, pos]), mode, sp)))
        qmode, qsp = greedy_draft if mode.greedy else (mode, sp)
        qs.append(np.asarray(target_probs(jnp.asarray(d_logits[i, pos]), qmode, qsp)))
        ls.append(np.asarray(d_logits[i, pos], np.float64))
    if draft_logits:
        return np.concatenate(ps), np.concatenate(qs), np.concatenate(ls)
    return np.concatenate(ps), np.concatenate(qs)


def _normalise_in_place(a: np.ndarray) -> np.ndarray:
    """Each row of `a` divided by its sum, in place (rows that sum to 0 stay 0)."""
    s = a.sum(-1, keepdims=True)
    np.divide(a, s, out=a, where=s > 0)
    return a


def _simulated_draws(p: np.ndarray, q: np.ndarray, max_rank: int, samples: int, seed: int):
    """Simulate the sampling verifier (`tree.verify_sample`'s rule) on one node per position,
    `samples` times: children drawn from q without replacement, each accepted with
    probability min(1, p(x)/q(x)), p <- norm(max(p - q, 0)) and q loses x after a rejection.
    Yields, for ranks k = 0..max_rank-1: (k, qx: the drawn token's probability under the
    residual q it was drawn from, live: the draw happened (nothing accepted before, q not
    exhausted), accept) — arrays over positions x samples.

    Only the rows rejected at a rank have their residuals updated (in place): most rows
    accept at the first ranks, so the work shrinks rank by rank instead of rewriting every
    row's [vocab] distributions max_rank times."""
    rng = np.random.default_rng(seed)
    p = np.repeat(p, samples, axis=0).astype(np.float64)
    q = np.repeat(q, samples, axis=0).astype(np.float64)
    rows = np.arange(len(p))
    with np.errstate(divide="ignore"):
        scores = np.log(q) + rng.gumbel(size=q.shape)
    ranks = min(max_rank, p.shape[1])  # a vocabulary smaller than max_rank: no more draws
    if 0 < ranks < p.shape[1]:  # q without replacement, in order: the top `ranks` Gumbel scores
        top = np.argpartition(-scores, ranks - 1, axis=1)[:, :ranks]
        drafted = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
    else:
        drafted = np.argsort(-scores, axis=1, kind="stable")[:, :ranks]
    del scores
    done = np.zeros(len(p), bool)
    for k in range(ranks):
        x = drafted[:, k]
        qx = q[rows, x]
        live = ~done & (qx > 0)
        accept = live & (rng.random(len(p)) * qx < p[rows, x])
        yield k, qx, live, accept
        done |= accept
        rejected = np.flatnonzero(live & ~accept)
        if len(rejected) and k + 1 < ranks:
            pr, qr = p[rejected], q[rejected]
            pr -= qr
            np.maximum(pr, 0.0, out=pr)
            qr[np.arange(len(rejected)), x[rejected]] = 0.0
            p[rejected] = _normalise_in_place(pr)
            q[rejected] = _normalise_in_place(qr)


def acceptance_from_probs(p: np.ndarray, q: np.ndarray, greedy: bool, max_rank: int, samples: int = 4,
                          seed: int = 0) -> np.ndarray:
    """p, q [positions, vocab] -> the positional acceptance vector [max_rank]."""
    positions, vocab = p.shape
    if greedy:
        order = np.argsort(-q, axis=1, kind="stable")
        target = p.argmax(axis=1)
        rank = np.argmax(order == target[:, None], axis=1)
        return np.bincount(rank[rank < max_rank], minlength=max_rank)[:max_rank] / positions
    counts = np.zeros(max_rank)
    for k, _, _, accept in _simulated_draws(p, q, max_rank, samples, seed):
        counts[k] = accept.sum()
    return counts / (positions * samples)


# Bin edges over the drawn token's residual draft probability for `conditional_acceptance`.
VALUE_BINS = (0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def conditional_acceptance(p: np.ndarray, q: np.ndarray, max_rank: int, samples: int = 4, seed: int = 0,
                           edges: Sequence[float] = VALUE_BINS, prior: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """When sampling: the probability that the k-th child drawn under a node is accepted,
    given that it is drawn (every earlier sibling rejected) and given the probability q'(x)
    the residual draft distribution gave it, from teacher-forced (p, q) [positions, vocab]
    by simulating the verifier. -> (table [max_rank, len(edges) - 1]: row k, column
    the bin of q'(x); rank_mean [max_rank]: the same over all q'(x)). DySpec values a child by
    q'(x) itself; this is what q'(x) turns out to be worth with this target. Cells with few
    draws shrink towards their rank's mean (`prior` draws' weight); ranks never drawn take
    the last drawn rank's."""
    nb = len(edges) - 1
    hits, draws = np.zeros((max_rank, nb)), np.zeros((max_rank, nb))
    for k, qx, live, accept in _simulated_draws(p, q, max_rank, samples, seed):
        b = np.clip(np.digitize(qx[live], edges) - 1, 0, nb - 1)
        np.add.at(draws[k], b, 1.0)
        np.add.at(hits[k], b, accept[live].astype(np.float64))
    table, rank_mean = np.zeros((max_rank, nb)), np.ones(max_rank)
    for k in range(max_rank):
        n = draws[k].sum()
        if n == 0:  # never drawn: the rank before's (nothing measured at all: q'(x) itself)
            table[k] = table[k - 1] if k else np.asarray(edges[1:])
            rank_mean[k] = rank_mean[k - 1] if k else 1.0
            continue
        rank_mean[k] = hits[k].sum() / n
        table[k] = (hits[k] + prior * rank_mean[k]) / (draws[k] + prior)
    return table, rank_mean


def _as_decoded(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int):
    """(temperature, top_k, top_p) as `generate` decodes with them: a temperature below
    `sampling.GREEDY_BELOW` is greedy (0.0, no filters), so it is measured, and cached, as 0;
    filters that keep every token are None (`sampling.effective_filters`)."""
    from jaxaccel.decode.sampling import GREEDY_BELOW, effective_filters

    return (0.0, None, None) if temperature < GREEDY_BELOW else (temperature,
                                                                  *effective_filters(top_k, top_p, vocab_size))


@_remembered
def cached_conditional_acceptance(target, draft, *, temperature: float, top_k: int | None, top_p: float | None,
                                  max_rank: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """`conditional_acceptance` on the default calibration (temperature > 0), measured once
    per (target, draft, settings) and kept on disk like `cached_acceptance`."""
    temperature, top_k, top_p = _as_decoded(temperature, top_k, top_p, target.config.vocab_size)
    settings = {"kind": "conditional_acceptance", "temperature": float(temperature), "top_k": top_k,
                "top_p": top_p, "max_rank": max_rank, "bins": list(VALUE_BINS), **_calibration_settings(target, draft)}
    shape = (max_rank, len(VALUE_BINS) - 1)

    def measure():
        prompts, new_tokens = calibration(target, draft)
        p, q = teacher_forced(target, draft, prompts, temperature, top_k, top_p, new_tokens, 0)
        return conditional_acceptance(p, q, max_rank)

    return _kept(target, draft, settings, measure,
                 parse=lambda d: (_probabilities(d["table"], shape), _probabilities(d["rank_mean"], (max_rank,))),
                 entry=lambda v: {"table": v[0].tolist(), "rank_mean": v[1].tolist()})


def positional_acceptance(target, draft, *, temperature: float = 0.0, top_k: int | None = None,
                          top_p: float | None = None, prompts: Sequence[Sequence[int]] | None = None,
                          max_rank: int = 16, new_tokens: int | None = None, samples: int = 4,
                          seed: int = 0) -> np.ndarray:
    """Sequoia's acceptance vector for `draft` drafting for `target` (see the module docstring);
    prompts and new_tokens default to the calibration's (`calibration`)."""
    temperature, top_k, top_p = _as_decoded(temperature, top_k, top_p, target.config.vocab_size)
    if prompts is None:
        prompts, default_new = calibration(target, draft)
    else:
        default_new = calibration_lengths(target, draft)[1]
    new_tokens = default_new if new_tokens is None else new_tokens
    p, q = teacher_forced(target, draft, prompts, temperature, top_k, top_p, new_tokens, seed)
    return acceptance_from_probs(p, q, temperature == 0, max_rank, samples, seed)


def probability_vs_acceptance(p: np.ndarray, q: np.ndarray, samples: int = 8, bins: int = 10,
                              seed: int = 0) -> dict[str, Any]:
    """DySpec's Figure 2 from teacher-forced (p, q): draft tokens x ~ q, their q(x) against
    min(1, p(x)/q(x)); -> the correlation coefficient and the binned curve."""
    rng = np.random.default_rng(seed)
    g = np.log(np.maximum(q, 1e-30))[:, None, :] + rng.gumbel(size=(len(q), samples, q.shape[1]))
    x = g.argmax(-1)  # [positions, samples]: x ~ q
    rows = np.arange(len(q))[:, None]
    qx = q[rows, x].ravel()
    px = p[rows, x].ravel()
    acc = np.minimum(1.0, px / np.maximum(qx, 1e-30))
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(qx, edges) - 1, 0, bins - 1)
    curve = [{"q_lo": float(edges[b]), "q_hi": float(edges[b + 1]), "n": int(np.sum(which == b)),
              "acceptance": float(acc[which == b].mean()) if np.any(which == b) else None} for b in range(bins)]
    corr = float(np.corrcoef(qx, acc)[0, 1]) if qx.std() > 0 and acc.std() > 0 else float("nan")
    return {"correlation": corr, "curve": curve, "points": len(qx), "q": qx, "acceptance": acc}


def greedy_temperature_from(logits: np.ndarray, argmax: np.ndarray) -> float:
    """The softmax temperature under which the draft's logits [positions, vocab] best predict
    the target's greedy tokens [positions] (maximum likelihood over a log-spaced grid)."""
    best, best_nll = 1.0, np.inf
    for tau in np.exp(np.linspace(np.log(0.05), np.log(2.0), 60)):
        z = logits / tau
        z = z - z.max(axis=1, keepdims=True)
        nll = -np.mean(z[np.arange(len(z)), argmax] - np.log(np.exp(z).sum(axis=1)))
        if nll < best_nll:
            best, best_nll = float(tau), nll
    return round(best, 4)


# Bumped when what the measurements compute changes, so no older cached figure is read
# (3: top-k keeps the tokens tied with the k-th logit before top-p measures mass, db46d3e).
CACHE_VERSION = 3


CACHE_ENV = "JAXACCEL_ACCEPTANCE_CACHE"


def cache_path(target, draft, settings: dict[str, Any]) -> Path | None:
    """Where the acceptance vector of this (target, draft, settings) is cached: under
    `$JAXACCEL_ACCEPTANCE_CACHE` if set (`off` disables the cache), else
    `$XDG_CACHE_HOME/jaxaccel/acceptance`. None when disabled, and for models built in memory
    (nothing identifies them across processes). The key holds both folders' paths, the
    fingerprints of their files when each model was loaded (`LanguageModel.files`: a folder
    rewritten since holds another model than the one measured) and the dtypes they were
    loaded in, so a model rewritten in place, or loaded in another dtype, is measured again."""
    folder = compile_cache.user_cache_folder(CACHE_ENV, "acceptance")
    files = getattr(target, "files", None), getattr(draft, "files", None)
    if target.source is None or draft.source is None or None in files or folder is None:
        return None
    key = json.dumps({"target": str(target.source), "draft": str(draft.source), "version": CACHE_VERSION,
                      "target_files": files[0], "draft_files": files[1],
                      # the dtypes each was loaded in: a bfloat16 target accepts other tokens
                      "dtypes": [target.config.dtype, target.config.param_dtype, draft.config.dtype,
                                 draft.config.param_dtype],
                      **settings}, sort_keys=True)
    return folder / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")


@_remembered
def cached_acceptance(target, draft, *, temperature: float, top_k: int | None, top_p: float | None,
                      max_rank: int = 16) -> np.ndarray:
    """`positional_acceptance` with its default calibration, measured once per (target, draft,
    settings) and kept on disk (`cache_path`); written atomically."""
    temperature, top_k, top_p = _as_decoded(temperature, top_k, top_p, target.config.vocab_size)
    settings = {"temperature": float(temperature), "top_k": top_k, "top_p": top_p, "max_rank": max_rank,
                **_calibration_settings(target, draft)}

    def acceptance_vector(d):
        vec = _probabilities(d["acceptance"], (max_rank,))
        if vec.sum() > 1 + 1e-6:  # p_k: the k-th child is the first accepted (disjoint events)
            raise ValueError("sums past 1")
        return vec

    return _kept(target, draft, settings,
                 lambda: positional_acceptance(target, draft, temperature=temperature, top_k=top_k, top_p=top_p,
                                               max_rank=max_rank),
                 parse=acceptance_vector, entry=lambda vec: {"acceptance": vec.tolist()})


@_remembered
def cached_greedy_temperature(target, draft) -> float:
    """`greedy_temperature_from` on the default calibration (greedy continuations), measured
    once per (target, draft) and kept on disk like `cached_acceptance`."""
    settings = {"kind": "greedy_temperature", **_calibration_settings(target, draft)}

    def temperature(d):
        tau = d["greedy_temperature"]
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
            raise ValueError("not a temperature")
        return float(tau)

    def measure():
        prompts, new_tokens = calibration(target, draft)
        p, _, logits = teacher_forced(target, draft, prompts, 0.0, None, None, new_tokens, 0, draft_logits=True)
        return greedy_temperature_from(logits, p.argmax(axis=1))

    return _kept(target, draft, settings, measure, parse=temperature, entry=lambda tau: {"greedy_temperature": tau})


def _kept(target, draft, settings: dict[str, Any], measure: Callable[[], Any], *, parse: Callable[[dict], Any],
          entry: Callable[[Any], dict]) -> Any:
    """The measurement of (target, draft, settings): read from its cache entry (`parse` of the
    entry's JSON object) when one holds a value `parse` accepts, else `measure()`d and written
    there (`entry` of the value, with the settings and both models' folders)."""
    path = cache_path(target, draft, settings)
    hit = _read(path, parse)
    if hit is not None:
        return hit
    value = measure()
    _write(path, {**entry(value), **settings, "target": str(target.source), "draft": str(draft.source)})
    return value


def _write(path: Path | None, data: dict[str, Any]) -> None:
    """Atomically write a cache entry; a read-only cache is measured again next time."""
    if path is None:
        return
    from jaxaccel.files import write_atomically

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(data))  # (removes its temporary file when it fails)
    except OSError:
        pass


def _read(path: Path | None, parse: Callable[[dict], Any]) -> Any:
    """A cache entry's value (`parse` of its JSON object), or None when there is none or it is
    not one `parse` accepts: damaged, of another shape, or holding values no measurement gives
    (a NaN acceptance would fail every run; a negative one shrink every tree). None: measure
    again, and the entry is rewritten."""
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
        return parse(data) if isinstance(data, dict) else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _probabilities(values: Any, shape: tuple[int, ...]) -> np.ndarray:
    """`values` as a float64 array of `shape` holding probabilities, or a ValueError."""
    arr = np.asarray(values, np.float64)
    if arr.shape != shape or not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError("not probabilities of the expected shape")
    return arr
