"""A generic batched, preconditioned L-BFGS: K independent smooth problems minimised at once.

It knows nothing about the functions it minimises beyond their values and gradients (and,
optionally, a lower bound); :mod:`pipeline.heads.multinomial` supplies the loss and the
preconditioner of the linear heads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

ARMIJO = 1e-4  # sufficient decrease: a step t is accepted when f(x + t d) <= f(x) + ARMIJO t g.d
CURVATURE_SKIP = 1e-10  # a pair (s, y) is kept only when s.y > CURVATURE_SKIP |s| |y|
BACKTRACK_MIN, BACKTRACK_MAX = 0.1, 0.5  # a retry's step lies in [0.1, 0.5] x the failed step
FTOL = 2.0**-23  # float32 resolution: a smaller relative loss decrease is rounding noise

CONVERGED, MAX_ITER, LINE_SEARCH = "converged", "max_iter", "line_search"
_REASONS = (None, CONVERGED, MAX_ITER, LINE_SEARCH)  # a model's code indexes this; 0: running


class LBFGSResult(NamedTuple):
    """What :func:`batched_lbfgs` returns, one entry per model."""

    params: torch.Tensor  # (K, ...) the last accepted parameters
    n_iter: list[int]  # accepted steps
    stop: list[str]  # why it stopped: CONVERGED, MAX_ITER or LINE_SEARCH


def _dot(a, b):
    """Per-model inner products (k,) float64 of two (k, ...) tensors."""
    return (a * b).flatten(1).sum(1, dtype=torch.float64)


def _scaled(factor, t):
    """Each model's slice of ``t`` (k, ...) times its ``factor`` (k,)."""
    return factor.view(-1, *[1] * (t.dim() - 1)).to(t.dtype) * t


def batched_lbfgs(objective, params, *, max_iter, tol, preconditioner, lower_bound=None,
                  history=10, max_backtracks=20, ftol=FTOL):
    """Minimise K independent smooth functions at once with preconditioned L-BFGS.

    ``objective(P, rows)`` returns the losses (k,) and gradients (k, ...) of the models
    ``rows`` (an index tensor) at parameters ``P`` (k, ...); ``params`` (K, ...) is the
    start and is updated in place. ``preconditioner`` is each model's initial inverse
    Hessian M^-1, symmetric positive definite: ``apply(rows, g)`` returns M^-1 g and
    ``inner(rows, g)`` g.M^-1 g (k,) float64; L-BFGS scales it by s.y / y.M^-1 y of the
    latest pair. Every model keeps its own curvature pairs (the last ``history``) and step
    length, and leaves the batch when it stops, so later evaluations only pay for the
    models still running. Each model stops for one reason:

    - ``"converged"``: its largest gradient entry is at most ``tol`` (scipy's and
      scikit-learn's rule), or an accepted step lowered its loss by at most ``ftol`` times
      max(|loss|, 1) (a decrease float32 cannot resolve; scipy also calls this convergence);
    - ``"max_iter"``: ``max_iter`` steps taken without either;
    - ``"line_search"``: no step along its direction passed the test below (the loss
      rose or became NaN at every trial), or its direction was not a descent direction.

    What the line search guarantees: every accepted step ``t`` along the direction ``d``
    satisfies Armijo's sufficient decrease, ``f(x + t d) <= f(x) + ARMIJO t g.d`` with
    ``g.d < 0``, so no model's loss ever rises and a NaN loss is never accepted. There is
    no curvature (Wolfe) condition; instead a pair whose s.y is not positive (relative to
    ``CURVATURE_SKIP``) is skipped, which keeps the inverse Hessian positive definite and
    the next direction a descent one. A failed trial is retried at most ``max_backtracks``
    times, each at the minimiser of the parabola through f(x), the slope and the failed
    trial, clamped to [``BACKTRACK_MIN``, ``BACKTRACK_MAX``] times the failed step. A model
    whose line search fails stops with ``"line_search"``, is not counted as converged and
    keeps its last accepted parameters. A model that had to backtrack tries at most twice
    its accepted step next time (and never more than 1).

    With ``lower_bound`` (every loss is at least that value; 0 for a cross-entropy plus a
    penalty) a line search first tries at most ``2 (loss - lower_bound) / |slope|``: the
    step to the minimum of the parabola through the loss and slope whose lowest value is
    the bound. A step predicted to lower the loss below its bound is one the local model
    cannot be trusted for; far from the solution on nearly separable classes, the first
    (Newton) step is such a step, and trying it as is overshoots to a loss several times
    higher.
    """
    n_models, device = params.shape[0], params.device
    every = torch.arange(n_models, device=device)
    loss, grad = objective(params, every)
    pairs = []  # (s, y, 1 / s.y) per iteration; rho = 0 marks a skipped pair
    scale = torch.ones(n_models, dtype=torch.float64, device=device)  # s.y / y.M^-1.y of the latest pair
    first_step = torch.ones(n_models, dtype=torch.float64, device=device)  # where each line search starts
    n_iter = torch.zeros(n_models, dtype=torch.int64, device=device)
    reason = torch.zeros(n_models, dtype=torch.int8, device=device)  # index into _REASONS

    def mark_small_gradients():
        reason[(reason == 0) & (grad.flatten(1).abs().amax(1) <= tol)] = _REASONS.index(CONVERGED)

    for _ in range(max_iter):
        mark_small_gradients()
        rows = every[reason == 0]
        if len(rows) == 0:
            break
        g = grad[rows]
        q, alphas = g.clone(), []
        for s, y, rho in reversed(pairs):
            alpha = rho[rows] * _dot(s[rows], q)
            q -= _scaled(alpha, y[rows])
            alphas.append(alpha)
        q = _scaled(scale[rows], preconditioner.apply(rows, q))
        for (s, y, rho), alpha in zip(pairs, reversed(alphas)):
            beta = rho[rows] * _dot(y[rows], q)
            q += _scaled(alpha - beta, s[rows])
        direction = -q
        slope = _dot(g, direction)
        descent = slope < 0  # False for NaN: round-off can cost a direction its descent
        if not descent.all():
            reason[rows[~descent]] = _REASONS.index(LINE_SEARCH)
            rows, direction, slope = rows[descent], direction[descent], slope[descent]
            if len(rows) == 0:
                continue
        step = first_step[rows]
        if lower_bound is not None:  # see the docstring
            step = torch.minimum(step, 2 * (loss[rows] - lower_bound) / -slope)
        new_loss, new_grad = objective(params[rows] + _scaled(step, direction), rows)
        pending = torch.ones(len(rows), dtype=torch.bool, device=device)
        for _ in range(max_backtracks):
            pending = ~(new_loss <= loss[rows] + ARMIJO * step * slope)  # NaN counts as failure
            if not pending.any():
                break
            # minimiser of the quadratic through loss, slope and the failed trial
            curvature = 2 * (new_loss - loss[rows] - step * slope) / step.square()
            guess = torch.where(curvature > 0, -slope / curvature, 0.5 * step)
            step = torch.where(pending, torch.clamp(guess, BACKTRACK_MIN * step, BACKTRACK_MAX * step), step)
            retry = pending.nonzero().squeeze(1)
            trial = params[rows[retry]] + _scaled(step[retry], direction[retry])
            new_loss[retry], new_grad[retry] = objective(trial, rows[retry])
        reason[rows[pending]] = _REASONS.index(LINE_SEARCH)  # keeps its last accepted parameters
        accepted = ~pending
        ok = rows[accepted]
        decrease = loss[ok] - new_loss[accepted]
        resolved = decrease <= ftol * torch.maximum(loss[ok].abs(), new_loss[accepted].abs()).clamp_min(1.0)
        reason[ok[resolved]] = _REASONS.index(CONVERGED)
        s = torch.zeros_like(params)
        y = torch.zeros_like(params)
        s[ok] = _scaled(step[accepted], direction[accepted])
        y[ok] = new_grad[accepted] - grad[ok]
        params[ok] += s[ok]
        loss[ok], grad[ok] = new_loss[accepted], new_grad[accepted]
        n_iter[ok] += 1
        first_step[ok] = (2 * step[accepted]).clamp(max=1.0)
        sy = _dot(s, y)
        curved = sy > CURVATURE_SKIP * _dot(y, y).sqrt() * _dot(s, s).sqrt()
        pairs = (pairs + [(s, y, torch.where(curved, 1.0 / sy, 0.0))])[-history:]
        fresh = ok[curved[ok]]
        scale[fresh] = sy[fresh] / preconditioner.inner(fresh, y[fresh]).clamp_min(1e-30)
    mark_small_gradients()  # the last step may have reached tol
    reason[reason == 0] = _REASONS.index(MAX_ITER)
    return LBFGSResult(params, n_iter.tolist(), [_REASONS[code] for code in reason.tolist()])
