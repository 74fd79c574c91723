"""The kNN head: weighted cosine k-nearest-neighbours over the training features, and its trainer.

As in DINOv2's kNN evaluation: features are centred on the mean of the training features and
L2-normalised, a query's similarity to a reference is their dot product, and each of the k
most similar references votes for its class with weight ``exp(similarity / temperature)``;
a class's probability is its share of the votes.

Similarities are computed a block of queries against a block of references at a time, with a
running top-k per query on the device, so memory is bounded by the block sizes, not by the
number of references (``bench/knn.py``: 100,000 references x 10,000 queries).

:class:`KNNClassifier`, a scikit-learn classifier, chooses k from a grid with the same rules as
the linear classifier's strength (:mod:`pipeline.heads.selection`) and becomes a :class:`KNNHead`,
which stores the centred, normalised references in float16 with their labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import defaults
from pipeline.devices import resolve_device
from pipeline.errors import PipeValueError
from pipeline.heads.estimator import HeadEstimator
from pipeline.heads.features import feature_stats, row_chunks, unit_rows
from pipeline.heads.head_file import Head, common_fields
from pipeline.heads.selection import (
    SCORED_ON, Parameter, chance_warning, default_warning, plan_selection, score_splits,
)

DEFAULT_KS = defaults.KNN_KS
# k when nothing can be chosen (a class with a single image): the smallest of the default grid.
# With one reference per class every k predicts the same class (the nearest reference's, whose
# vote weighs most), so only classes of unequal size make k matter there, and a small k keeps
# the larger classes from outvoting a near singleton.
K = Parameter("k", "k", "--k", DEFAULT_KS[0])
QUERY_ROWS = 1024  # queries scored at once
REFERENCE_ROWS = 16384  # references compared at once: with QUERY_ROWS, a 64 MB similarity block
# Choosing k scores at most this many query x reference pairs per split: beyond, a seeded sample
# of the scored images (never fewer than MIN_SCORED) is scored, so that 1 M references take
# minutes on two cores (2,000 of 10,000 val images; bench/scale.py); smaller files score all.
MAX_SIMILARITIES = 2 * 10**9
MIN_SCORED = 1000


def nearest(queries, references, k, device):
    """Similarities (Nq, k) and row indices (Nq, k) of the ``k`` most similar ``references``
    (torch (Nr, D), any float dtype, on ``device``) to each of ``queries`` (numpy (Nq, D) unit
    rows), most similar first. Blocks of ``QUERY_ROWS`` x ``REFERENCE_ROWS`` similarities, a
    running top-k merging each block."""
    k = min(k, references.shape[0])
    sims, index = [], []
    for q0, q1 in row_chunks(queries.shape[0], QUERY_ROWS):
        q = torch.from_numpy(np.ascontiguousarray(queries[q0:q1], dtype=np.float32)).to(device)
        best_sims = torch.full((q1 - q0, 0), -np.inf, device=device)
        best_index = torch.zeros((q1 - q0, 0), dtype=torch.int64, device=device)
        for r0, r1 in row_chunks(references.shape[0], REFERENCE_ROWS):
            block = q @ references[r0:r1].to(torch.float32).T
            block_sims, block_index = block.topk(min(k, r1 - r0), dim=1)
            merged = torch.cat([best_sims, block_sims], dim=1)
            keep = merged.topk(min(k, merged.shape[1]), dim=1)
            best_sims = keep.values
            best_index = torch.cat([best_index, block_index + r0], dim=1).gather(1, keep.indices)
        sims.append(best_sims.cpu())
        index.append(best_index.cpu())
    return torch.cat(sims).numpy(), torch.cat(index).numpy()


def vote(sims, neighbour_labels, n_classes, temperature):
    """Class probabilities (N, C) float32 from the neighbours' similarities (N, k), most
    similar first, and their labels (N, k): each votes ``exp(sim / temperature)``."""
    weights = np.exp((sims - sims[:, :1]) / temperature)  # scaled by the largest: no overflow
    votes = np.zeros((len(sims), n_classes), dtype=np.float64)
    np.add.at(votes, (np.arange(len(sims))[:, None], neighbour_labels), weights)
    return (votes / votes.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass
class KNNHead(Head):
    """Weighted cosine kNN over stored reference features.

    ``references`` (N, D) float16 are the training features centred on ``mean`` (D,) and
    L2-normalised; ``reference_labels`` (N,) their class indices into ``classes``; ``k`` the
    neighbours that vote, ``temperature`` the vote's sharpness. ``device`` is where
    similarities are computed (not stored in the file).
    """

    references: np.ndarray
    reference_labels: np.ndarray
    mean: np.ndarray
    k: int
    temperature: float
    classes: list[str]
    fingerprint: str
    source: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    path: str | None = field(default=None, compare=False)
    device: str = field(default="auto", compare=False)

    kind = "knn"
    payload_keys = ("references", "reference_labels", "mean", "k", "temperature")

    @property
    def feature_dim(self) -> int:
        return self.references.shape[1]

    def describe(self) -> str:
        return (f"{len(self.classes)} classes, {len(self.reference_labels)} references x {self.feature_dim} "
                f"features (knn, k {self.k}, temperature {self.temperature:g})")

    def predict_proba(self, X):
        """Class probabilities (N, C): each class's share of the k nearest references' votes."""
        self.check_features(X)
        device = resolve_device(self.device)
        references = torch.from_numpy(self.references).to(device)
        proba = np.empty((X.shape[0], len(self.classes)), dtype=np.float32)
        for start, stop in row_chunks(X.shape[0]):
            sims, index = nearest(unit_rows(X[start:stop], self.mean), references, self.k, device)
            proba[start:stop] = vote(sims, self.reference_labels[index], len(self.classes), self.temperature)
        return proba

    def to_payload(self) -> dict:
        return {
            "references": np.asarray(self.references, dtype=np.float16),
            "reference_labels": np.asarray(self.reference_labels, dtype=np.int64),
            "mean": np.asarray(self.mean, dtype=np.float32),
            "k": int(self.k),
            "temperature": float(self.temperature),
        }

    @classmethod
    def from_payload(cls, payload: dict, path: str) -> KNNHead:
        return cls(payload["references"], payload["reference_labels"],
                   payload["mean"], int(payload["k"]), float(payload["temperature"]),
                   **common_fields(payload, path))


class KNNClassifier(HeadEstimator):
    """Trains a :class:`KNNHead`: chooses k from ``k`` (default ``DEFAULT_KS``) as the linear
    probe chooses its strength (on val, a hold-out or k-fold cross-validation, else
    ``K.default`` with a warning), then keeps train + val as the references.

    A k larger than the references available is clipped to their number, with a warning;
    ties go to the smallest k (within a selection split, larger ones may have been clipped to
    the split's fewer references). Learned attributes: ``classes_``, ``grid_`` (the k tried,
    after clipping), ``grid_scores_`` (list of ``(k, accuracy)``), ``best_k_``, ``selection_``,
    ``chance_``, ``mean_``, ``references_`` (float16), ``labels_`` (positions into
    ``classes_``), ``warnings_``, ``n_train_``, ``n_val_``, ``fit_seconds_``, ``scored_sample_``
    (None, or how many images of each selection split were scored: a seeded sample when the
    references are so many that scoring all would exceed ``MAX_SIMILARITIES``).
    """

    trainer = "knn"
    parameter = K
    recorded = {"temperature": "temperature", "scored_sample": "scored_sample_"}

    def __init__(self, *, k=None, temperature=defaults.KNN_TEMPERATURE, seed=defaults.SEED, device=defaults.DEVICE,
                 selection=defaults.SELECTION):
        self.k = k
        self.temperature = temperature
        self.seed = seed
        self.device = device
        self.selection = selection

    @property
    def best_value_(self):
        """The chosen k, under the name every trainer shares."""
        return self.best_k_

    def fit(self, X, y, X_val=None, y_val=None):
        """Choose k with ``(X_val, y_val)`` (or splits of train + val) and keep train + val as
        the references. Inputs as for :meth:`LinearClassifier.fit`. Returns ``self``."""
        started = time.perf_counter()
        ks = DEFAULT_KS if self.k is None else self.k
        if not len(ks) or not all(float(k).is_integer() and k >= 1 for k in ks):
            raise PipeValueError(f"k must be whole numbers of at least 1, got {list(ks)}")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise PipeValueError(f"the temperature must be a positive number, got {self.temperature}")
        parts = self._single_label_parts(X, y, X_val, y_val)
        labels = [y for _, _, y in parts]
        self.n_train_, self.n_val_ = len(labels[0]), sum(map(len, labels[1:]))
        n_pool = self.n_train_ + self.n_val_
        self.warnings_, self.scored_sample_ = [], None
        too_many = sorted({int(k) for k in ks if k > n_pool})
        if too_many:
            self.warnings_.append(f"k {', '.join(map(str, too_many))} is more than the {n_pool} reference images "
                                  f"(train + val); clipped to {n_pool}")
        self.grid_ = sorted({min(int(k), n_pool) for k in ks})
        # planned on the k asked for: k clipped to one value still had to be chosen among them
        self.selection_, splits = plan_selection(labels, len(set(ks)), mode=self.selection, seed=self.seed,
                                                 parameter=K)
        self.grid_scores_, self.chance_ = [], None
        if splits:
            scores, self.chance_, _ = score_splits(parts, splits, self._score_split)
            best = max(range(len(scores)), key=lambda i: (scores[i], -self.grid_[i]))
            self.grid_scores_ = [(k, float(a)) for k, a in zip(self.grid_, scores)]
            self.best_k_ = self.grid_[best]
            warning = chance_warning(scores[best], self.chance_, SCORED_ON[self.selection_.method])
            if warning:
                self.warnings_.append(warning)
        elif self.selection_.method == "given":
            self.best_k_ = self.grid_[0]
        else:
            self.best_k_ = min(int(K.default), n_pool)
            self.warnings_.append(default_warning(self.selection_, K))
        self.mean_ = feature_stats(parts)[0]
        self.references_ = unit_rows([X for _, X, _ in parts], self.mean_, np.float16)
        self.labels_ = np.concatenate(labels)
        self.fit_seconds_ = time.perf_counter() - started
        return self

    def _score_split(self, fit_parts, score_parts):
        """Accuracy of every k of the grid on ``score_parts``, with ``fit_parts`` as references."""
        mean = feature_stats(fit_parts)[0]
        # float16, as the head will hold them: the k chosen is scored on the references it votes with
        references = unit_rows([X for _, X, _ in fit_parts], mean, np.float16)
        reference_labels = np.concatenate([y for _, _, y in fit_parts])
        queries = unit_rows([X for _, X, _ in score_parts], mean)
        truth = np.concatenate([y for _, _, y in score_parts])
        limit = max(MIN_SCORED, MAX_SIMILARITIES // len(references))
        if len(truth) > limit:  # a seeded sample of the scored rows (see MAX_SIMILARITIES)
            keep = np.sort(np.random.default_rng(self.seed).choice(len(truth), limit, replace=False))
            queries, truth = queries[keep], truth[keep]
            self.scored_sample_ = limit
        device = resolve_device(self.device)
        sims, index = nearest(queries, torch.from_numpy(references).to(device), self.grid_[-1], device)
        n_classes = int(max(reference_labels.max(), truth.max())) + 1
        accuracy = [(vote(sims[:, :k], reference_labels[index[:, :k]], n_classes, self.temperature)
                     .argmax(axis=1) == truth).mean() for k in self.grid_]
        return np.array(accuracy), None

    def _head(self, class_names, positions, **metadata):
        return KNNHead(self.references_, positions[self.labels_], self.mean_, self.best_k_, self.temperature,
                       class_names, device=self.device, **metadata)
