"""The data-constrained scaling law of Muennighoff et al. 2023 ("Scaling Data-Constrained
Language Models", arXiv 2305.16264), and a fit of its repetition constant R_D* to a sweep.

Repeated tokens are worth less than new ones. With U_D unique tokens seen D times in total
(R_D = D / U_D - 1 repetitions), the run is worth an effective

    D' = U_D + U_D * R_D* * (1 - exp(-R_D / R_D*))

unique tokens: the first repetitions are almost as good as new data, and D' saturates at
(1 + R_D*) U_D. Parameters beyond what U_D unique tokens can use are discounted the same way:
U_N = min(N, the compute-optimal parameter count for U_D tokens), R_N = N / U_N - 1,
N' = U_N + U_N * R_N* * (1 - exp(-R_N / R_N*)). The loss is Chinchilla's form in N' and D':

    L = E + A / N'^alpha + B / D'^beta

`PUBLISHED` holds the paper's fit (C4, GPT-2 tokenizer): the constants the authors publish
with their code (E, A, B as natural logarithms 0.6254804, 6.255414, 7.3049974; alpha = beta =
0.3526596; R_D* = 15.387756, R_N* = 5.309743 — quoted rounded as 15.39 and 5.31). They give
L(N=6.34e9, D=242e9, U=25e9) = 2.2256 (the paper's Figure 1 model).

Dtype policy: float64 numpy throughout (token counts reach 1e12).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class DataConstrainedLaw:
    """L(N, D, U) = E + A / N'^alpha + B / D'^beta with repetition-discounted N' and D'."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    rd_star: float  # R_D*: repetitions of the data after which its value has decayed by 1 - 1/e
    rn_star: float  # R_N*: the same for excess parameters

    def effective_data(self, unique_tokens, tokens):
        """D' for U_D = unique_tokens seen `tokens` times in total (arrays broadcast)."""
        return effective_data(unique_tokens, tokens, self.rd_star)

    def optimal_params(self, tokens):
        """The compute-optimal parameter count for `tokens` training tokens under the
        Chinchilla part of the law: N_opt = G (D G)^(beta / alpha), G = (alpha A / (beta B))^(1 / (alpha + beta))."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        return (np.asarray(tokens, np.float64) * g) ** (self.beta / self.alpha) * g

    def unique_params(self, params, unique_tokens):
        """U_N: the parameters U_D unique tokens can use, at most N."""
        return np.minimum(np.asarray(params, np.float64), self.optimal_params(unique_tokens))

    def effective_params(self, params, unique_tokens):
        """N': parameters beyond U_N count with the same exponential discount (constant R_N*)."""
        u_n = self.unique_params(params, unique_tokens)
        return _discounted(u_n, np.asarray(params, np.float64), self.rn_star)

    def loss(self, params, tokens, unique_tokens):
        """Predicted final loss of an N-parameter model trained on D tokens with U unique (a run
        that read fewer than U tokens saw only D of them: U_N comes from min(U, D))."""
        n_eff = self.effective_params(params, np.minimum(np.asarray(unique_tokens, np.float64), tokens))
        d_eff = self.effective_data(unique_tokens, tokens)
        out = self.E + self.A / n_eff ** self.alpha + self.B / d_eff ** self.beta
        return float(out) if np.ndim(out) == 0 else out


def _discounted(unique, total, star: float):
    """unique + unique * star * (1 - exp(-R / star)), R = total / unique - 1 clipped at 0."""
    repeats = np.maximum(total / unique - 1.0, 0.0)
    return unique + unique * star * (1.0 - np.exp(-repeats / star))


def effective_data(unique_tokens, tokens, rd_star: float):
    """D' = U + U R_D* (1 - exp(-R_D / R_D*)), R_D = D / U - 1 (D' = D when D <= U: U is then
    what was read, D)."""
    tokens = np.asarray(tokens, np.float64)
    unique = np.minimum(np.asarray(unique_tokens, np.float64), tokens)  # a run that read less saw only D
    out = _discounted(unique, tokens, rd_star)
    return float(out) if np.ndim(out) == 0 else out


PUBLISHED = DataConstrainedLaw(E=math.exp(0.6254804), A=math.exp(6.255414), B=math.exp(7.3049974), alpha=0.3526596,
                               beta=0.3526596, rd_star=15.387756, rn_star=5.309743)


# ----------------------------------------------------------------------------- fitting R_D*


@dataclasses.dataclass(frozen=True)
class RepetitionFit:
    """R_D* fitted to a sweep: loss_i = E_{N_i} + B / D'_i(R_D*)^beta, one offset E per model size
    (it absorbs the E + A / N'^alpha part, which repetition of data does not change)."""

    rd_star: float
    beta: float
    B: float
    offsets: dict[float, float]  # model size -> E_N
    rmse: float
    points: int
    repeated_points: int
    rd_star_at_bound: bool  # the best R_D* is an end of the search range: only a bound is known
    beta_at_bound: bool = False  # likewise for beta

    def predict(self, params: float, tokens: float, unique_tokens: float) -> float:
        d_eff = effective_data(unique_tokens, tokens, self.rd_star)
        return self.offsets[float(params)] + self.B / d_eff ** self.beta


RD_STAR_RANGE = (0.05, 1000.0)
BETA_RANGE = (0.02, 2.0)


def fit_rd_star(params: Sequence[float], tokens: Sequence[float], unique_tokens: Sequence[float],
                losses: Sequence[float]) -> RepetitionFit:
    """Fit R_D* (and beta, B, and one E per model size) to final losses by least squares.

    Given beta and R_D*, the loss is linear in the offsets and B, which are solved exactly;
    beta and log R_D* are found by a coarse grid, then refined on finer grids around the best
    point (no scipy). R_D* is identifiable only when the runs span different amounts of
    repetition of a model size (single-epoch runs of several sizes of data, plus repeated
    ones); B is kept >= 0 (more effective data never hurts)."""
    n = np.asarray(params, np.float64)
    d = np.asarray(tokens, np.float64)
    u = np.asarray(unique_tokens, np.float64)
    y = np.asarray(losses, np.float64)
    if not (len(n) == len(d) == len(u) == len(y)):
        raise ValueError("params, tokens, unique_tokens and losses must have the same length")
    ok = np.isfinite(y)
    n, d, u, y = n[ok], d[ok], u[ok], y[ok]
    sizes = sorted(set(n.tolist()))
    distinct = len(set(zip(n.tolist(), d.tolist(), u.tolist())))  # runs repeating a setting (seeds) add no point
    if distinct < len(sizes) + 4:  # one more than the unknowns (an offset per size, B, beta, R_D*): not exact
        raise ValueError(f"fitting R_D* needs at least {len(sizes) + 4} distinct (params, tokens, unique tokens) "
                         f"settings ({len(sizes)} model size(s)), got {distinct} (in {len(y)} finished runs)")
    if not np.any(d > u * (1 + 1e-9)):
        raise ValueError("fitting R_D* needs runs that repeat data (tokens > unique_tokens)")
    design_offsets = np.stack([n == s for s in sizes], axis=1).astype(np.float64)

    def solve(beta: float, log_rd: float) -> tuple[float, np.ndarray]:
        d_eff = effective_data(u, d, math.exp(log_rd))
        x = np.concatenate([design_offsets, (d_eff ** -beta)[:, None]], axis=1)
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        if coef[-1] < 0:  # clamp B at 0: the offsets alone
            coef = np.concatenate([np.linalg.lstsq(design_offsets, y, rcond=None)[0], [0.0]])
        resid = x @ coef - y
        return float(resid @ resid), coef

    lo_b, hi_b = BETA_RANGE
    lo_r, hi_r = (math.log(v) for v in RD_STAR_RANGE)
    betas = np.linspace(lo_b, hi_b, 40)
    log_rds = np.linspace(lo_r, hi_r, 60)
    best = min((solve(b, r)[0], b, r) for b in betas for r in log_rds)
    step_b, step_r = betas[1] - betas[0], log_rds[1] - log_rds[0]
    for _ in range(8):  # zoom in: each pass a 17 x 17 grid over +-2 previous steps (beta and B trade off
        _, b0, r0 = best  # along a shallow valley, so the window is kept wide)
        grid_b = np.clip(np.linspace(b0 - 2 * step_b, b0 + 2 * step_b, 17), lo_b, hi_b)
        grid_r = np.clip(np.linspace(r0 - 2 * step_r, r0 + 2 * step_r, 17), lo_r, hi_r)
        best = min([best] + [(solve(b, r)[0], b, r) for b in grid_b for r in grid_r])
        step_b, step_r = step_b / 4, step_r / 4
    sse, beta, log_rd = best
    _, coef = solve(beta, log_rd)
    at_bound = min(abs(log_rd - lo_r), abs(log_rd - hi_r)) < 1e-6
    beta_at_bound = min(abs(beta - lo_b), abs(beta - hi_b)) < 1e-6
    return RepetitionFit(rd_star=math.exp(log_rd), beta=float(beta), B=float(coef[-1]),
                         offsets={s: float(c) for s, c in zip(sizes, coef[:-1])}, rmse=math.sqrt(sse / len(y)),
                         points=int(len(y)), repeated_points=int(np.sum(d > u * (1 + 1e-9))),
                         rd_star_at_bound=bool(at_bound), beta_at_bound=bool(beta_at_bound))
