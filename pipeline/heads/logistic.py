"""The multi-label heads' optimisation problem: many independent penalised binary logistic
regressions (one per class and L2 strength) solved at once, their loss and gradient, and the
preconditioner that makes them fast.

Model j fits column ``classes[j]`` of the multi-hot targets Y with weight w (D,), bias b and
strength ``lambda_j``::

    loss(w, b) = mean_i [softplus(z_i) - y_i z_i] + lambda_j / 2 * ||w||^2,   z_i = x_i.w + b

Every model is its own problem for :func:`pipeline.heads.lbfgs.batched_lbfgs` (own curvature
pairs, own stopping), and all running models share one (D, k) matrix product per evaluation.
"""

from __future__ import annotations

import torch

from pipeline.heads.features import row_chunks
from pipeline.heads.lbfgs import batched_lbfgs

# A class's starting bias is the log-odds of its frequency, kept this far from 0 and 1 so that a
# class with no positives (or no negatives) in the rows fitted starts from a finite value.
MIN_PRIOR = 1e-3


def logistic_loss_and_grad(X, Y, params, classes, strengths):
    """Loss (k,) float64 and gradient (k, D+1) of k binary models on all rows of ``X`` (N, D).

    Model j has weight ``params[j, :-1]`` and bias ``params[j, -1]`` and is scored against
    ``Y[:, classes[j]]`` (Y (N, C) float 0/1). Rows are read in chunks, so the (rows, k)
    intermediates stay bounded.
    """
    weight, bias = params[:, :-1], params[:, -1]
    loss = torch.zeros(len(params), dtype=torch.float64, device=X.device)
    grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
    for start, stop in row_chunks(X.shape[0]):
        x, y = X[start:stop], Y[start:stop][:, classes]
        z = torch.addmm(bias, x, weight.T)
        loss += (torch.nn.functional.softplus(z) - y * z).sum(0, dtype=torch.float64)
        residual = torch.sigmoid(z).sub_(y)  # d loss / d z
        grad_weight.addmm_(residual.T, x)
        grad_bias += residual.sum(0)
    n = X.shape[0]
    loss = loss / n + (strengths / 2 * weight.square().sum(1)).double()
    return loss, torch.cat([grad_weight / n + strengths[:, None] * weight, grad_bias[:, None] / n], dim=1)


class LogisticPreconditioner:
    """The inverse Hessian of each binary model's loss at its start (w = 0, b = the log-odds
    of its class's frequency p), applied to (k, D+1) tensors.

    There the Hessian is ``p (1 - p) S + lambda`` on the weights and ``p (1 - p)`` on the bias,
    S the (standardised, so nearly centred) features' second moment from a
    :class:`~pipeline.heads.multinomial.FeatureSpectrum`; the weight-bias coupling ``p (1-p)
    E[x]`` is left out, as E[x] is about 0. ``curvature`` (M,) holds each model's p (1 - p).
    """

    def __init__(self, spectrum, *, strengths, curvature):
        self.spectrum, self.strengths, self.curvature = spectrum, strengths, curvature

    def _parts(self, rows, g):
        weights = g[:, :-1]
        coef = weights @ self.spectrum.vectors
        curvature, lam = self.curvature[rows, None], self.strengths[rows, None]
        inverse = 1.0 / (curvature * self.spectrum.values + lam)
        inverse_rest = None if self.spectrum.rest is None else 1.0 / (curvature * self.spectrum.rest + lam)
        return weights, coef, inverse, inverse_rest, curvature

    def apply(self, rows, g):
        """``M^-1 g`` for the models ``rows``."""
        weights, coef, inverse, inverse_rest, curvature = self._parts(rows, g)
        if inverse_rest is None:
            out = (coef * inverse) @ self.spectrum.vectors.T
        else:  # the unknown eigenvectors span what the known ones leave of the gradient
            out = (coef * (inverse - inverse_rest)) @ self.spectrum.vectors.T + weights * inverse_rest
        return torch.cat([out, g[:, -1:] / curvature], dim=1)

    def inner(self, rows, g):
        """``g . M^-1 g`` (k,) float64 for the models ``rows``."""
        weights, coef, inverse, inverse_rest, curvature = self._parts(rows, g)
        total = (coef.square() * inverse).sum(1, dtype=torch.float64)
        if inverse_rest is not None:
            rest = (weights.square().sum(1) - coef.square().sum(1)).clamp_min(0)
            total += (rest * inverse_rest[:, 0]).double()
        return total + (g[:, -1].square() / curvature[:, 0]).double()


def start_params(Y, n_dims, n_strengths):
    """Zero weights and each class's prior log-odds as bias, for every (strength, class)
    model, strength-major: (K*C, D+1); and each model's p (1 - p) (K*C,)."""
    prior = Y.mean(0).clamp(MIN_PRIOR, 1 - MIN_PRIOR).repeat(n_strengths)
    params = torch.zeros(len(prior), n_dims + 1, device=Y.device)
    params[:, -1] = torch.log(prior / (1 - prior))
    return params, prior * (1 - prior)


def fit_logistic(X, Y, strengths, params, curvature, spectrum, *, max_iter, tol):
    """Fit one model per entry of ``strengths`` (M,): model j fits class ``j % C`` of ``Y``
    (N, C), from ``params`` (M, D+1), updated in place; ``curvature``
    and ``spectrum`` as :class:`LogisticPreconditioner` takes them. Returns the
    :class:`~pipeline.heads.lbfgs.LBFGSResult` of :func:`~pipeline.heads.lbfgs.batched_lbfgs`
    (line searches capped by the loss's lower bound 0)."""
    classes = torch.arange(len(strengths), device=X.device) % Y.shape[1]
    return batched_lbfgs(
        lambda P, rows: logistic_loss_and_grad(X, Y, P, classes[rows], strengths[rows]), params,
        max_iter=max_iter, tol=tol, lower_bound=0.0,
        preconditioner=LogisticPreconditioner(spectrum, strengths=strengths, curvature=curvature),
    )
