"""The linear estimators: scikit-learn classifiers that train a
:class:`~pipeline.heads.head_file.LinearHead` on features.

Both follow the published linear-probe recipe (:class:`_SweepClassifier`): sweep the L2 strength
over a log grid, pick the best by validation accuracy (on val, a hold-out or k-fold
cross-validation, whichever the data's size allows: :mod:`pipeline.heads.selection`), refit
on train + val.
:class:`LinearClassifier` (torch) trains the whole grid as one batched problem
(:mod:`pipeline.heads.multinomial`), or on streamed mini-batches; :class:`SklearnLinearClassifier`
is the scikit-learn baseline. :func:`make_estimator` builds any head trainer by name.

The L2 strength ``lambda`` is weight decay on the mean cross-entropy::

    loss(W, b) = mean_i CE_i + lambda / 2 * ||W||^2        (bias unpenalised)

which is scikit-learn's objective with ``C = 1 / (lambda * n_train)``.
"""

from __future__ import annotations

import inspect
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from pipeline import defaults
from pipeline.devices import resolve_device
from pipeline.errors import PipeValueError
from pipeline.heads.estimator import HeadEstimator
from pipeline.heads.features import (
    CHUNK_ROWS, class_weights, feature_stats, parts_accuracies, row_chunks, standardize, standardized_parts,
)
from pipeline.heads.head_file import LinearHead
from pipeline.heads.knn import KNNClassifier
from pipeline.heads.lbfgs import CONVERGED, LINE_SEARCH, MAX_ITER
from pipeline.heads.multinomial import (
    ChunkedRows, FeatureSpectrum, fit_multinomial, one_thread, parallel_fits, threads_for,
)
from pipeline.heads.selection import (
    SCORED_ON, STRENGTH, chance_warning, default_warning, merge_records, plan_selection, score_splits, split_parts,
)

DEFAULT_GRID = tuple(float(s) for s in np.logspace(-6, 0, 16))
MAX_STRENGTH = 1e6  # far past any useful strength (every weight ~0); float32 still holds its square
PATIENCE_EPOCHS = 3


def strength_grid(grid) -> list[float]:
    """The L2 strengths to sweep (``DEFAULT_GRID`` for None), checked."""
    strengths = [float(s) for s in (DEFAULT_GRID if grid is None else grid)]
    if not strengths or not all(np.isfinite(s) and 0 < s <= MAX_STRENGTH for s in strengths):
        raise PipeValueError(f"L2 strengths must be positive numbers up to {MAX_STRENGTH:g}, got {strengths}")
    return strengths


class _SweepClassifier(HeadEstimator):
    """Shared recipe: sweep the L2 strength, select it (:mod:`pipeline.heads.selection`), refit.

    Subclasses implement ``_fit_grid`` (one model per strength, on some rows) and
    ``_fit_one`` (one model at the chosen strength, on train + val). Learned attributes:
    ``weight_`` (C, D), ``bias_`` (C,) (rows in the order of ``classes_``), ``mean_``/``std_``
    (D,) or None, ``classes_`` (the labels seen in train), ``n_features_in_``,
    ``best_strength_``, ``selection_`` (a
    :class:`~pipeline.heads.selection.Selection`: how the strength was chosen),
    ``grid_scores_`` (list of ``(strength, accuracy)``: on val or the hold-out, or the mean
    over cross-validation folds), ``iterations_`` (optimiser iterations: ``{"sweep": [per
    strength], "refit": n}``, epochs on the mini-batch path), ``n_iter_`` (the final fit's
    iterations, or epochs), ``stop_`` (why each
    optimiser stopped: ``{"sweep": [reason, ...], "refit": reason}`` with the reasons of
    :mod:`pipeline.heads.lbfgs`; under cross-validation a strength's "sweep" reason is
    "converged" only if every fold's fit converged, and ``"folds"`` lists each fold's),
    ``converged_`` (every reason in ``stop_`` is "converged"; the mini-batch path runs whole
    epochs and records no reasons, so it is True there), ``chance_`` (the accuracy of always
    answering the most frequent class, on the rows scored), ``warnings_`` (one line each:
    nothing could be chosen, the final fit did not converge, the head is at chance level),
    ``n_train_``, ``n_val_``, ``fit_seconds_``, and ``out_of_fold_proba_``: after
    cross-validation, each train + val row's class probabilities (n_train + n_val, C; train rows
    first) from the chosen strength's model of the folds that left the row out, what
    scikit-learn's ``cross_val_predict(method="predict_proba")`` gives (None after any other
    selection).
    """

    parameter = STRENGTH
    recorded = {"balanced": "balanced", "standardize": "standardize", "n_iter": "iterations_",
                "converged": "converged_", "stop": "stop_"}

    def __init__(self, *, grid, balanced, seed, max_iter, tol, standardize, selection):
        self.grid = grid
        self.balanced = balanced
        self.seed = seed
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.selection = selection

    def fit(self, X, y, X_val=None, y_val=None):
        """Train on ``(X, y)``, choosing the strength with ``(X_val, y_val)``.

        ``X`` and ``X_val`` are (N, D) arrays of numbers, or a :class:`~pipeline.heads.RowSubset` (rows of
        a feature file, read as they are needed); ``y`` and ``y_val`` are labels (any kind scikit-learn
        classifiers take; every val label must be a train label).
        How the strength is chosen depends on the sizes (``selection="auto"``): on val when
        it holds enough images, else on a hold-out of train + val or by k-fold
        cross-validation over them, else a default strength
        (:func:`~pipeline.heads.selection.plan_selection`). The final model is fitted on
        train + val. A grid of one strength needs no selection: the model is fitted once,
        on train + val, and ``grid_scores_`` is empty. Returns ``self``.
        """
        started = time.perf_counter()
        self.grid_ = strength_grid(self.grid)
        parts = self._single_label_parts(X, y, X_val, y_val)
        mean, std = feature_stats(parts)  # also the finiteness check, so always computed
        self.mean_, self.std_ = (mean, std) if self.standardize else (None, None)
        self.n_train_, self.n_val_ = len(parts[0][2]), sum(len(labels) for _, _, labels in parts[1:])
        self.selection_, splits = plan_selection([labels for _, _, labels in parts], len(self.grid_),
                                                 mode=self.selection, seed=self.seed)
        if self.selection_.method == "holdout":  # as before there was cross-validation: rows fitted / scored
            self.n_train_, self.n_val_ = self.selection_.n_fit, self.selection_.n_score
        self.iterations_, self.stop_, self.grid_scores_, self.warnings_ = {}, {}, [], []
        init, epochs, self.chance_, self.out_of_fold_proba_ = None, None, None, None
        if splits:
            def score_split(fit_parts, score_parts):
                weights, biases, record = self._fit_grid(fit_parts, score_parts)
                return parts_accuracies(weights, biases, score_parts, self.mean_, self.std_), \
                    (weights, biases, record)

            scores, self.chance_, fits = self._score_splits(parts, splits, score_split)
            # ties go to the strongest penalty, the simplest model
            best = max(range(len(scores)), key=lambda k: (scores[k], self.grid_[k]))
            if self.selection_.method == "cv":
                self.out_of_fold_proba_ = self._out_of_fold(parts, splits, [fit[:2] for fit in fits], best)
            self.grid_scores_ = [(s, float(a)) for s, a in zip(self.grid_, scores)]
            self.best_strength_ = self.grid_[best]
            self._record_sweep([record for _, _, record in fits])
            epochs = self.iterations_.get("sweep_epochs", [None] * len(self.grid_))[best]
            if len(splits) == 1:  # the refit starts from the split's solution
                weights, biases, _ = fits[0]
                init = (weights[best], biases[best])
        else:  # one strength: nothing to choose; too few images: nothing can be chosen
            self.best_strength_ = self.grid_[0] if self.selection_.method == "given" else STRENGTH.default
        self.weight_, self.bias_, refit = self._fit_one(parts, self.best_strength_, init, epochs)
        for key, value in (("refit", refit["n_iter"]), ("refit_epochs", refit["epochs"])):
            if value is not None:
                self.iterations_[key] = value
        self.n_iter_ = refit["n_iter"] if refit["n_iter"] is not None else refit["epochs"]
        if refit["stop"] is not None:
            self.stop_["refit"] = refit["stop"]
        reasons = (self.stop_.get("sweep") or []) + ([self.stop_["refit"]] if "refit" in self.stop_ else [])
        self.converged_ = all(reason == CONVERGED for reason in reasons)
        self._check(parts, refit)
        self.__dict__.pop("_spectrum", None)  # the sweep's, handed to the refit; not part of the model
        self.fit_seconds_ = time.perf_counter() - started
        return self

    @property
    def best_value_(self):
        """The chosen strength, under the name every trainer shares."""
        return self.best_strength_

    def _score_splits(self, parts, splits, score_split):
        """:func:`~pipeline.heads.selection.score_splits`, one split after the other."""
        return score_splits(parts, splits, score_split)

    def _out_of_fold(self, parts, splits, fits, best):
        """Class probabilities (n_pool, C) of every pool row from the model of the ``best``
        strength fitted on the folds that left it out (``fits``: weights (K, C, D) and biases
        (K, C) per split)."""
        proba = np.empty((sum(len(labels) for _, _, labels in parts), len(self.classes_)), dtype=np.float32)
        for mask, (weights, biases) in zip(splits, fits):
            model = LinearHead(weights[best], biases[best], self.mean_, self.std_, list(self.classes_), "")
            proba[mask] = np.concatenate([model.predict_proba(X) for _, X, _ in split_parts(parts, mask)[1]])
        return proba

    def _record_sweep(self, records):
        """Write the splits' fit records into ``iterations_`` and ``stop_`` (and the mean best
        epochs of the mini-batch path)."""
        merged = merge_records(records)
        if merged["n_iter"] is not None:
            self.iterations_["sweep"] = merged["n_iter"]
        if merged["epochs"] is not None:
            self.iterations_["sweep_epochs"] = merged["epochs"]
        if merged["stop"] is not None:
            self.stop_["sweep"] = merged["stop"]
        if len(records) > 1:
            self.iterations_["folds"] = [r["n_iter"] if r["n_iter"] is not None else r["epochs"] for r in records]
            if merged["stop"] is not None:
                self.stop_["folds"] = [r["stop"] for r in records]

    def _check(self, parts, refit):
        """Fill ``warnings_``: what a user must know before trusting the head."""
        method = self.selection_.method
        if method == "default":
            self.warnings_.append(default_warning(self.selection_, STRENGTH))
        if refit["stop"] not in (None, CONVERGED):
            why = (f"reached --max-iter ({self.max_iter}) first" if refit["stop"] == MAX_ITER
                   else "its line search failed (the loss would not decrease)")
            self.warnings_.append(f"the final fit did not converge: {why} after {refit['n_iter']} iterations; "
                                  "its weights are the last accepted step")
        if self.grid_scores_:
            accuracy = dict(self.grid_scores_)[self.best_strength_]
            where = SCORED_ON[method]
        else:  # no selection scores: the head on the rows it was fitted on
            head_weights, head_biases = self.weight_[None], self.bias_[None]
            accuracy = float(parts_accuracies(head_weights, head_biases, parts, self.mean_, self.std_)[0])
            labels = np.concatenate([labels for _, _, labels in parts])
            self.chance_, where = float(np.bincount(labels).max() / len(labels)), "its own training images"
        warning = chance_warning(accuracy, self.chance_, where)
        if warning:
            self.warnings_.append(warning)

    def _head(self, class_names, positions, **metadata):
        """A :class:`LinearHead` over ``class_names``; classes without a row of the model
        (absent from the training labels) get zero weight and a bias of -inf: never predicted."""
        weight, bias = self.weight_, self.bias_
        if len(positions) < len(class_names):
            weight = np.zeros((len(class_names), self.weight_.shape[1]), dtype=np.float32)
            bias = np.full(len(class_names), -np.inf, dtype=np.float32)
            weight[positions], bias[positions] = self.weight_, self.bias_
        return LinearHead(weight, bias, self.mean_, self.std_, class_names, **metadata)

    def decision_function(self, X):
        """Class scores (n_samples, n_classes) before the softmax; with two classes, the score
        of the second minus the first's (n_samples,), positive where it is predicted."""
        scores = self._predicting_head().decision_function(self._check_X(X))
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def _encoded(self, parts):
        """Standardised float32 features and class positions (into ``classes_``) of ``parts``."""
        return standardized_parts(parts, self.mean_, self.std_), np.concatenate([labels for _, _, labels in parts])

    def _fit_grid(self, parts, val):
        """One model per strength of ``grid_`` on ``parts``; ``val`` are the parts it will be
        scored on (the mini-batch path stops early on them). Returns weights (K, C, D), biases
        (K, C) and a record ``{"n_iter": [...] or None, "stop": [...] or None, "epochs": [...]
        or None}`` (per strength: iterations, why it stopped, best epoch)."""
        raise NotImplementedError

    def _fit_one(self, parts, strength, init, epochs):
        """One model at ``strength`` on ``parts`` (train + val), from ``init`` (a sweep's
        weight and bias) or None, for ``epochs`` (mini-batch path; None: ``max_epochs``).
        Returns weight (C, D), bias (C,) and a record ``{"n_iter", "stop", "epochs"}``."""
        raise NotImplementedError


class LinearClassifier(_SweepClassifier):
    """Torch linear probe: the whole strength grid is trained at once, in one batched computation.

    Full batch (default): features stay at their own precision (moved to ``device`` once;
    rows of a feature file that did not fit the memory budget are read from it in chunks on
    every pass) and the K grid points are trained together by a batched L-BFGS (:func:`~pipeline.heads.multinomial.fit_multinomial`):
    one (D, K*C) matrix product per evaluation serves every model, while each model keeps
    its own curvature history and step length and stops on scikit-learn's rule (largest
    gradient entry <= ``tol``, at most ``max_iter`` iterations). Its initial inverse Hessian
    is the exact one at the start (:class:`~pipeline.heads.multinomial.Preconditioner`),
    which cuts the iterations several-fold on real features. After a single split (val or
    a hold-out) the refit starts from the chosen grid solution; after cross-validation,
    from zero.

    Mini-batch (``batch_size`` set): contiguous row chunks are streamed, the K models trained together
    with Adam (learning rate ``lr``) for up to ``max_epochs``, each kept at its best
    validation epoch (early stopping after ``PATIENCE_EPOCHS`` epochs without any
    improvement); the refit trains from scratch on train + val for the chosen model's
    best epoch count (``iterations_["sweep_epochs"]``, the mean over cross-validation folds).
    Memory is bounded by the chunk size.
    """

    trainer = "linear"

    def __init__(self, *, grid=None, balanced=False, seed=defaults.SEED, device=defaults.DEVICE,
                 max_iter=defaults.MAX_ITER["linear"], tol=defaults.TOL, standardize=True, selection=defaults.SELECTION,
                 batch_size=None, max_epochs=defaults.MAX_EPOCHS, lr=defaults.LEARNING_RATE):
        super().__init__(grid=grid, balanced=balanced, seed=seed, max_iter=max_iter, tol=tol,
                         standardize=standardize, selection=selection)
        self.device = device
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.lr = lr

    def _streaming(self, parts):
        return self.batch_size is not None

    def _score_splits(self, parts, splits, score_split):
        """The splits' sweeps (each a fit on one thread) run in parallel when they are small
        enough (:func:`~pipeline.heads.multinomial.parallel_fits`)."""
        n_fit = max(int((~mask).sum()) for mask in splits)
        workers = 1 if self._streaming(parts) else parallel_fits(
            n_fit * parts[0][1].shape[1], resolve_device(self.device), len(splits))
        if workers == 1:
            return score_splits(parts, splits, score_split)
        with one_thread():
            return score_splits(parts, splits, score_split, workers=workers)

    def _fit_grid(self, parts, val):
        if self._streaming(parts):
            weights, biases, best_epochs = self._adam(parts, self.grid_, self.max_epochs, val)
            return weights, biases, {"n_iter": None, "stop": None, "epochs": best_epochs.tolist()}
        weights, biases, n_iter, stop = self._lbfgs(parts, self.grid_, init=None)
        return weights, biases, {"n_iter": n_iter, "stop": stop, "epochs": None}

    def _fit_one(self, parts, strength, init, epochs):
        if self._streaming(parts):
            epochs = self.max_epochs if epochs is None else epochs
            weights, biases, _ = self._adam(parts, [strength], epochs, val=None)
            return weights[0], biases[0], {"n_iter": None, "stop": None, "epochs": epochs}
        start = None if init is None else (init[0][None], init[1][None])
        weights, biases, n_iter, stop = self._lbfgs(parts, [strength], init=start)
        return weights[0], biases[0], {"n_iter": n_iter[0], "stop": stop[0], "epochs": None}

    def _lbfgs(self, parts, strengths, init):
        """Fit one model per strength on the rows of ``parts`` with batched, preconditioned L-BFGS.

        The rows are read in chunks at their stored precision, the standardisation folded into
        the weights (:class:`~pipeline.heads.multinomial.ChunkedRows`): no standardised copy.
        Returns weights (K, C, D), biases (K, C), the iterations each model took and why
        it stopped. A fit from scratch measures the feature spectrum behind the
        preconditioner; a refit started from a sweep's solution (``init``) reuses the sweep's.
        """
        device = resolve_device(self.device)
        n_classes = len(self.classes_)
        X_t = ChunkedRows([x for _, x, _ in parts], device, self.mean_, self.std_)
        y = np.concatenate([labels for _, _, labels in parts])
        y_t = torch.from_numpy(y).to(device)
        sw = torch.from_numpy(class_weights(y, n_classes, self.balanced)[y] / len(y)).to(device)
        lam = torch.tensor(strengths, dtype=torch.float32, device=device)
        if init is None:
            params = torch.zeros(len(strengths), X_t.shape[1] + 1, n_classes, device=device)
        else:  # rows 0..D-1 hold W (K, D, C), the last row the bias
            weight, bias = init
            params = torch.from_numpy(np.concatenate([weight.transpose(0, 2, 1), bias[:, None]], axis=1)).to(device)
        with threads_for(X_t.shape[0] * X_t.shape[1], device):
            if init is None:
                spectrum = FeatureSpectrum(X_t, seed=self.seed)
                self._spectrum = spectrum  # for the refit after a single split (no other fit runs then)
            else:
                spectrum = self._spectrum
            result = fit_multinomial(X_t, y_t, sw, lam, params, spectrum, max_iter=self.max_iter, tol=self.tol)
        params = result.params.cpu().numpy()
        return np.ascontiguousarray(params[:, :-1].transpose(0, 2, 1)), params[:, -1], result.n_iter, result.stop

    def _adam(self, parts, strengths, epochs, val):
        """Mini-batch training of K models over streamed chunks; returns weights, biases, best epochs."""
        n_values = sum(x.shape[0] for _, x, _ in parts) * parts[0][1].shape[1]
        with threads_for(n_values, resolve_device(self.device)):
            return self._adam_epochs(parts, strengths, epochs, val)

    def _adam_epochs(self, parts, strengths, epochs, val):
        device = resolve_device(self.device)
        n_classes, n_dims, n_models = len(self.classes_), parts[0][1].shape[1], len(strengths)
        labels = np.concatenate([y for _, _, y in parts])
        class_weight = torch.from_numpy(class_weights(labels, n_classes, self.balanced)).to(device)
        lam = torch.tensor(strengths, dtype=torch.float32, device=device)
        generator = torch.Generator().manual_seed(self.seed)
        weight = torch.zeros(n_models, n_dims, n_classes, device=device, requires_grad=True)
        bias = torch.zeros(n_models, n_classes, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=self.lr)
        batch = self.batch_size or CHUNK_ROWS
        chunks = [(X, y, start, stop) for _, X, y in parts for start, stop in row_chunks(X.shape[0], batch)]
        best_acc = np.full(n_models, -1.0)
        best_epoch = np.zeros(n_models, dtype=np.int64)
        best_w, best_b = np.zeros((n_models, n_classes, n_dims), np.float32), np.zeros((n_models, n_classes), np.float32)
        for epoch in range(1, epochs + 1):
            for i in torch.randperm(len(chunks), generator=generator).tolist():
                X, y, start, stop = chunks[i]
                x = torch.from_numpy(standardize(X[start:stop], self.mean_, self.std_)).to(device)
                target = torch.from_numpy(y[start:stop]).to(device)
                logits = torch.einsum("nd,kdc->nkc", x, weight) + bias
                ce = torch.nn.functional.cross_entropy(
                    logits.permute(0, 2, 1), target[:, None].expand(-1, n_models),
                    weight=class_weight, reduction="none").mean(0)
                loss = (ce + lam / 2 * weight.square().sum((1, 2))).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            current_w = weight.detach().transpose(1, 2).cpu().numpy()
            current_b = bias.detach().cpu().numpy()
            if val is None:
                best_w, best_b = current_w, current_b
                continue
            acc = parts_accuracies(current_w, current_b, val, self.mean_, self.std_)
            improved = acc > best_acc
            best_acc[improved], best_epoch[improved] = acc[improved], epoch
            best_w[improved], best_b[improved] = current_w[improved], current_b[improved]
            if epoch - best_epoch.max() >= PATIENCE_EPOCHS:
                break
        return best_w, best_b, best_epoch


class SklearnLinearClassifier(_SweepClassifier):
    """The scikit-learn baseline: one ``LogisticRegression(solver="lbfgs")`` per strength.

    Strength ``lambda`` maps to ``C = 1 / (lambda * n)`` (``n`` rows being fitted), the
    same objective as :class:`LinearClassifier`. Features must fit in memory. A fit that
    scikit-learn reports as not converged stopped at ``max_iter`` or, with fewer
    iterations, in its line search.
    """

    trainer = "sklearn"

    def __init__(self, *, grid=None, balanced=False, seed=defaults.SEED, max_iter=defaults.MAX_ITER["sklearn"],
                 tol=defaults.TOL, standardize=True, selection=defaults.SELECTION):
        super().__init__(grid=grid, balanced=balanced, seed=seed, max_iter=max_iter, tol=tol,
                         standardize=standardize, selection=selection)

    def _fit_grid(self, parts, val):
        X, y = self._encoded(parts)
        fits = [self._logistic(X, y, strength) for strength in self.grid_]
        record = {"n_iter": [n_iter for _, _, n_iter, _ in fits], "stop": [stop for _, _, _, stop in fits],
                  "epochs": None}
        return np.stack([w for w, _, _, _ in fits]), np.stack([b for _, b, _, _ in fits]), record

    def _fit_one(self, parts, strength, init, epochs):
        X, y = self._encoded(parts)
        weight, bias, n_iter, stop = self._logistic(X, y, strength)
        return weight, bias, {"n_iter": n_iter, "stop": stop, "epochs": None}

    def _logistic(self, X, y, strength):
        """Fit one model at ``strength``; returns multinomial (C, D), (C,), iterations and
        why it stopped.

        With two classes scikit-learn fits a binary model ``w``; the multinomial model
        with the same penalty is ``[-w/2, w/2]``, which needs ``C = 2 / (lambda * n)``.
        """
        binary = len(self.classes_) == 2
        weight, bias, n_iter, stop = sklearn_logistic(
            X, y, (2.0 if binary else 1.0) / (strength * len(y)), max_iter=self.max_iter, tol=self.tol,
            class_weight="balanced" if self.balanced else None)
        if binary:
            weight, bias = np.concatenate([-weight, weight]) / 2, np.concatenate([-bias, bias]) / 2
        return weight, bias, n_iter, stop


def sklearn_logistic(X, y, C, *, max_iter, tol, class_weight=None):
    """One scikit-learn ``LogisticRegression(solver="lbfgs")`` fit: coefficients and
    intercepts as float32, iterations, and why it stopped (a ConvergenceWarning means
    ``max_iter`` when it ran that many iterations, else its line search)."""
    model = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=tol, class_weight=class_weight)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)  # reported as the reason it stopped
        model.fit(X, y)
    for warning in caught:  # pass the others on
        if not issubclass(warning.category, ConvergenceWarning):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    n_iter = int(np.max(model.n_iter_))
    stop = CONVERGED
    if any(issubclass(warning.category, ConvergenceWarning) for warning in caught):
        stop = MAX_ITER if n_iter >= max_iter else LINE_SEARCH
    return model.coef_.astype(np.float32), model.intercept_.astype(np.float32), n_iter, stop


# by the names train-head offers
ESTIMATORS = dict(zip(defaults.HEAD_KINDS, (LinearClassifier, SklearnLinearClassifier, KNNClassifier)))


def make_estimator(kind, **params):
    """Build the head trainer named ``kind`` ("linear", "sklearn" or "knn": :mod:`.knn`) with its parameters."""
    if kind not in ESTIMATORS:
        raise PipeValueError(f"unknown head trainer {kind!r}; choose one of {', '.join(ESTIMATORS)}")
    accepted = inspect.signature(ESTIMATORS[kind]).parameters
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise PipeValueError(f"head trainer {kind!r} does not take {', '.join(unknown)}")
    return ESTIMATORS[kind](**params)
