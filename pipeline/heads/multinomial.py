"""The linear heads' optimisation problem: penalised multinomial logistic regression for K
L2 strengths at once, its loss and gradient, and the preconditioner that makes it fast.

For a model with weight W (D, C), bias b (C,) and strength ``lambda``::

    loss(W, b) = sum_i sw_i CE_i + lambda / 2 * ||W||^2        (bias unpenalised, sum sw = 1)

:class:`FeatureSpectrum` measures the features' second moment, :class:`Preconditioner`
turns it into the exact inverse Hessian at W = 0, and :func:`fit_multinomial` hands loss
and preconditioner to the generic solver in :mod:`pipeline.heads.lbfgs`.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from pipeline.rows import CHUNK_ROWS, read_rows, row_chunks
from pipeline.heads.lbfgs import batched_lbfgs

SPECTRUM_ROWS = 4096
SPECTRUM_RANK = 128
# Below this many feature values (rows x dims) a fit runs on one CPU thread. Every solver step is
# a few dozen small tensor operations; split across threads, each waits for the slowest thread,
# and when another process holds a core that wait is a scheduler time slice. Measured on the
# 2-core reference machine under load (efficientnet_lite0 features, 1,280 dims): 20 rows took
# 0.6 s on one thread and 71-78 s on two; 200 rows 2.3-2.9 s and 2.1-70 s; 3,000 rows (above
# the limit) 1.8 s and 1.1 s.
SINGLE_THREAD_VALUES = 2**20


@contextmanager
def one_thread():
    """Run the enclosed torch work on one CPU thread; the thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _small_cpu_fit(n_values, device) -> bool:
    """Whether a fit of ``n_values`` feature values on ``device`` runs on one CPU thread."""
    return device.type == "cpu" and n_values < SINGLE_THREAD_VALUES


def parallel_fits(n_values, device, n_fits) -> int:
    """How many fits of ``n_values`` feature values each to run at once, each on one CPU
    thread: as many as torch has threads (at most ``n_fits``) when such a fit runs on one thread
    anyway (``SINGLE_THREAD_VALUES``), else 1. Fits at once never wait on each other, as the
    threads of one fit do. Measured on the 2-core reference machine (efficientnet_lite0
    features of 850 photos, 5 folds of 680 x 1,280, 16 strengths each): the cross-validation
    took 3.5-3.7 s one fold after the other and 2.3-2.4 s two at a time, with the same models."""
    return max(1, min(n_fits, torch.get_num_threads())) if _small_cpu_fit(n_values, device) else 1


@contextmanager
def threads_for(n_values, device):
    """Run the enclosed fit on one thread when it is small and on the CPU (see
    ``SINGLE_THREAD_VALUES``)."""
    if not _small_cpu_fit(n_values, device) or torch.get_num_threads() == 1:
        yield
        return
    with one_thread():
        yield


class ChunkedRows:
    """Feature rows as the solvers read them: ``CHUNK_ROWS`` at a time, as float32 on ``device``.

    ``matrices`` are read one after the other as one (N, D) matrix, ``chunk_rows`` rows at a
    time (a chunk never straddles two matrices). A tensor or ndarray stays
    at its own precision (float16 features take half the memory of float32) and is made a
    tensor on ``device`` once: a view of the ndarray on the CPU, one copy in a GPU's memory.
    Anything else (a :class:`~pipeline.heads.features.RowSubset` of an HDF5 file) is read
    chunk by chunk on every pass, so only a chunk of it is ever in memory. Each chunk is
    converted to ``dtype`` (float32) as it is used.

    ``mean`` and ``std`` (D,), when given, are the standardisation the models are expressed in:
    :func:`multinomial_loss_and_grad` folds them into the weights rather than standardising
    a copy of the rows, and indexing (``rows[index]``, sorted indices) returns standardised rows.
    """

    def __init__(self, matrices, device, mean=None, std=None, chunk_rows=CHUNK_ROWS, dtype=torch.float32):
        self.device, self.chunk_rows, self.dtype = torch.device(device), chunk_rows, dtype
        self.sources = [torch.from_numpy(np.ascontiguousarray(m)).to(self.device) if isinstance(m, np.ndarray)
                        else m.to(self.device) if isinstance(m, torch.Tensor) else m for m in matrices]
        self.offsets = np.cumsum([0] + [m.shape[0] for m in self.sources])
        self.shape = (int(self.offsets[-1]), self.sources[0].shape[1])
        self.mean, self.std = (None, None) if mean is None else (
            torch.as_tensor(mean, dtype=torch.float32, device=self.device),
            torch.as_tensor(std, dtype=torch.float32, device=self.device))

    @classmethod
    def of(cls, X):
        """``X`` as chunked rows: itself when it already is, else one tensor's rows as they are."""
        return X if isinstance(X, ChunkedRows) else cls([X], X.device, dtype=X.dtype)

    def _float(self, rows):
        """Rows read from a source, as ``dtype`` (float32) on the device."""
        if not isinstance(rows, torch.Tensor):
            rows = torch.from_numpy(np.asarray(rows))
        return rows.to(self.device, self.dtype)

    def chunks(self):
        """``(start, stop, x)`` over every row: ``x`` the rows start..stop as float32, not
        standardised. Chunks never straddle two matrices."""
        for offset, source in zip(self.offsets, self.sources):
            for start, stop in row_chunks(source.shape[0], self.chunk_rows):
                yield offset + start, offset + stop, self._float(source[start:stop])

    def __getitem__(self, index):
        """Standardised float32 rows at ``index`` (sorted row numbers, a tensor or array)."""
        index = np.asarray(torch.as_tensor(index).cpu(), dtype=np.int64)
        parts = []
        for offset, source in zip(self.offsets, self.sources):
            inside = index[(index >= offset) & (index < offset + source.shape[0])] - offset
            if len(inside):
                parts.append(self._float(source[torch.from_numpy(inside).to(self.device)] if isinstance(
                    source, torch.Tensor) else read_rows(source, inside)))
        x = torch.cat(parts)
        return x if self.mean is None else (x - self.mean) / self.std


def multinomial_loss_and_grad(X, y, sample_weight, params, strengths):
    """Loss (k,) float64 and gradient (k, D+1, C) of k models on all rows of ``X`` (N, D): a
    tensor, or :class:`ChunkedRows`.

    Model j has weight ``params[j, :-1]`` (D, C) and bias ``params[j, -1]``; its loss is
    the ``sample_weight``-weighted sum of cross-entropies (the weights sum to 1) plus
    ``strengths[j] / 2 * ||W_j||^2``. Rows are processed in chunks so the (rows, k, C)
    intermediates stay bounded; all k models share one (D, k*C) product per chunk.

    With standardised rows (``X.mean``/``X.std``: z = (x - m) / s), the models' weights apply
    to z. The rows are not standardised: z W + b = x (W / s) + (b - (m / s) W), and the
    weights' gradient z^T r = (x^T r - m (sum r)) / s, so each chunk costs one conversion to
    float32 and the same two products as rows standardised beforehand.
    """
    X = ChunkedRows.of(X)
    n_models, n_rows_w, n_classes = params.shape
    stacked = params[:, :-1].permute(1, 0, 2).reshape(n_rows_w - 1, n_models * n_classes)
    bias = params[:, -1]
    if X.mean is not None:  # weights and bias that act on the raw rows (see the docstring)
        raw_weights = stacked / X.std[:, None]
        raw_bias = bias - ((X.mean / X.std) @ stacked).view(n_models, n_classes)
    else:
        raw_weights, raw_bias = stacked, bias
    loss = torch.zeros(n_models, dtype=torch.float64, device=X.device)
    grad_stacked = torch.zeros_like(stacked)
    grad_bias = torch.zeros_like(bias)
    for start, stop, x in X.chunks():
        target, w = y[start:stop], sample_weight[start:stop, None]
        index = target[:, None, None].expand(-1, n_models, 1)
        log_p = torch.log_softmax((x @ raw_weights).view(-1, n_models, n_classes) + raw_bias, dim=2)
        loss -= (w * log_p.gather(2, index).squeeze(2)).sum(0, dtype=torch.float64)
        residual = log_p.exp_()  # softmax - one_hot, weighted: d loss / d logits
        residual.scatter_add_(2, index, torch.full(index.shape, -1.0, dtype=residual.dtype, device=X.device))
        residual.mul_(w[:, :, None])
        grad_stacked.addmm_(x.T, residual.view(-1, n_models * n_classes))
        grad_bias += residual.sum(0)
    if X.mean is not None:
        grad_stacked -= X.mean[:, None] * grad_bias.view(1, -1)
        grad_stacked /= X.std[:, None]
    weight = params[:, :-1]
    loss += (strengths / 2 * weight.square().sum((1, 2))).double()
    grad_weight = grad_stacked.view(-1, n_models, n_classes).permute(1, 0, 2) + strengths[:, None, None] * weight
    return loss, torch.cat([grad_weight, grad_bias[:, None]], dim=1)


class FeatureSpectrum:
    """The leading eigenpairs of the (standardised) features' second moment ``E[x x^T]``.

    The preconditioner needs the spectrum's shape, not its exact value, so it is estimated
    on a seeded sample of at most ``rows`` rows of ``X`` (N, D): the top ``rank``
    eigenpairs by seeded randomized subspace iteration, and the rest of the spectrum taken
    as flat at its mean (``rest``). With D at most 4 * ``rank`` every eigenpair is
    computed exactly and ``rest`` is None. On 1,280-dimensional features 128 eigenpairs
    save about as many iterations as all of them, at a fraction of the cost (``eigh``
    grows as D^3).
    """

    def __init__(self, X, *, seed, rows=SPECTRUM_ROWS, rank=SPECTRUM_RANK):
        """``X``: a tensor or :class:`ChunkedRows` (its standardised rows are sampled)."""
        n_rows, n_dims = X.shape
        generator = torch.Generator().manual_seed(seed)
        sample_rows = torch.randperm(n_rows, generator=generator)[:rows].sort().values
        sample = X[sample_rows.to(X.device)]
        if n_dims <= 4 * rank:
            values, self.vectors = torch.linalg.eigh(sample.T @ sample / len(sample_rows))
            self.values, self.rest = values.clamp_min(0), None
            return
        basis = torch.randn(n_dims, rank, generator=generator).to(X.device)
        for _ in range(3):  # subspace iteration: the basis turns toward the top eigenvectors
            basis = torch.linalg.qr(sample.T @ (sample @ basis)).Q
        projected = sample @ basis
        values, rotation = torch.linalg.eigh(projected.T @ projected / len(sample_rows))
        self.values, self.vectors = values.clamp_min(0), basis @ rotation
        total = float(sample.square().sum()) / len(sample_rows)
        self.rest = max(total - float(self.values.sum()), 0.0) / (n_dims - rank)
class Preconditioner:
    """The inverse Hessian of k models' losses at the start, applied to (k, D+1, C) tensors.

    At W = 0 every prediction is uniform over the C classes, so model j's Hessian is
    exactly ``S (x) P / C + lambda_j`` on the weights and ``P / C`` on the bias, where S is
    the features' second moment (:class:`FeatureSpectrum`, V diag(e) V^T) and
    ``P = I - 11^T / C`` centres over classes. Along 1 (every class shifted alike) the
    weights feel only ``lambda_j`` and the bias nothing: softmax ignores such a shift.
    As L-BFGS's initial inverse Hessian it makes the first step Newton's, and the
    curvature pairs only have to follow how the Hessian drifts from there, which cuts the
    iterations on badly conditioned features several-fold. One application costs two
    (D, r) x (r, k*C) products.
    """

    def __init__(self, spectrum, *, strengths, n_classes):
        self.spectrum, self.strengths, self.curvature = spectrum, strengths, 1.0 / n_classes

    def _parts(self, rows, g):
        """Split ``g`` into its class-mean and class-centred parts, in the eigenbasis."""
        n_models, n_weight_rows, n_classes = g.shape[0], g.shape[1] - 1, g.shape[2]
        mean = g.mean(2, keepdim=True)
        centred = g - mean
        flat = centred[:, :-1].permute(1, 0, 2).reshape(n_weight_rows, n_models * n_classes)
        lam = self.strengths[rows].repeat_interleave(n_classes)
        inverse = 1.0 / (self.curvature * self.spectrum.values[:, None] + lam)
        inverse_rest = None if self.spectrum.rest is None else 1.0 / (self.curvature * self.spectrum.rest + lam)
        return mean, centred, flat, self.spectrum.vectors.T @ flat, inverse, inverse_rest

    def apply(self, rows, g):
        """``M^-1 g`` for the models ``rows``."""
        mean, centred, flat, coef, inverse, inverse_rest = self._parts(rows, g)
        if inverse_rest is None:
            out = self.spectrum.vectors @ (coef * inverse)
        else:  # the unknown eigenvectors span what the known ones leave of flat
            out = self.spectrum.vectors @ (coef * (inverse - inverse_rest)) + flat * inverse_rest
        weights = out.view(g.shape[1] - 1, *g.shape[::2]).permute(1, 0, 2)
        weights += mean[:, :-1] / self.strengths[rows, None, None]
        return torch.cat([weights, centred[:, -1:] / self.curvature], dim=1)

    def inner(self, rows, g):
        """``g . M^-1 g`` (k,) float64 for the models ``rows``, with one matrix product."""
        mean, centred, flat, coef, inverse, inverse_rest = self._parts(rows, g)
        n_classes = g.shape[2]

        def per_model(t):
            return t.view(t.shape[0], -1, n_classes).sum((0, 2), dtype=torch.float64)

        total = per_model(coef.square() * inverse)
        if inverse_rest is not None:
            total += per_model((flat.square().sum(0) - coef.square().sum(0)).clamp_min(0)[None] * inverse_rest)
        total += n_classes * mean[:, :-1].square().sum((1, 2), dtype=torch.float64) / self.strengths[rows].double()
        return total + centred[:, -1].square().sum(1, dtype=torch.float64) / self.curvature


def fit_multinomial(X, y, sample_weight, strengths, params, spectrum, *, max_iter, tol):
    """Fit one model per strength (k,) from ``params`` (k, D+1, C), updated in place.

    Minimises :func:`multinomial_loss_and_grad` by :func:`batched_lbfgs`, preconditioned by
    the Hessian at zero built from ``spectrum`` (a :class:`FeatureSpectrum` of ``X``), each
    line search capped by the loss's lower bound 0. Returns its
    :class:`~pipeline.heads.lbfgs.LBFGSResult`.
    """
    return batched_lbfgs(
        lambda P, rows: multinomial_loss_and_grad(X, y, sample_weight, P, strengths[rows]), params,
        max_iter=max_iter, tol=tol, lower_bound=0.0,
        preconditioner=Preconditioner(spectrum, strengths=strengths, n_classes=params.shape[2]),
    )
