"""Which cells track which feature: Pearson correlation of every unit's activations with each feature."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from charrnn.inspector.features import Feature
from charrnn.inspector.trace import Trace


def pearson(x: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Pearson r of ``x`` [T] with each column of ``columns`` [T, N] -> [N].

    A constant column (or a constant ``x``) has no correlation; it gets 0 rather than nan.
    """
    x = x.astype(np.float64) - x.mean()
    c = columns.astype(np.float64)
    c = c - c.mean(axis=0)
    denom = np.sqrt((x * x).sum() * (c * c).sum(axis=0))
    num = x @ c
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denom > 0, num / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(r, -1.0, 1.0)


@dataclass(frozen=True)
class Unit:
    state: str  # "c" or "h"
    layer: int  # 0-based
    cell: int  # 0-based index within the layer

    def describe(self) -> str:
        return f"{self.state} layer {self.layer + 1} cell {self.cell}"


@dataclass(frozen=True)
class FeatureRanking:
    feature: Feature
    values: np.ndarray  # float64 [T]: the feature over the text
    best: tuple[tuple[Unit, float], ...]  # (unit, r), by |r| descending; empty when the feature is constant

    @property
    def present(self) -> bool:
        """False when the feature never changes in this text, so no cell can be scored against it."""
        return bool(self.values.size) and bool(np.ptp(self.values) > 0)


def rank_cells(trace: Trace, features: tuple[Feature, ...], top: int = 3) -> tuple[FeatureRanking, ...]:
    """For each feature, the ``top`` units of any state and layer with the largest |r|."""
    units: list[Unit] = []
    blocks = []
    for name, values in trace.states.items():  # [T, L, H]
        T, L, H = values.shape
        units += [Unit(name, layer, cell) for layer in range(L) for cell in range(H)]
        blocks.append(values.reshape(T, L * H))  # layer-major, matching ``units``
    activations = np.concatenate(blocks, axis=1)  # [T, units]
    rankings = []
    for feature in features:
        values = feature.extract(trace.text)
        ranking = FeatureRanking(feature, values, ())
        if ranking.present:
            r = pearson(values, activations)
            order = np.argsort(-np.abs(r), kind="stable")[:top]
            ranking = FeatureRanking(feature, values, tuple((units[i], float(r[i])) for i in order))
        rankings.append(ranking)
    return tuple(rankings)


def feature_window(values: np.ndarray, text: str, width: int) -> tuple[int, int]:
    """[start, end) of about ``width`` characters, beginning at a line start, where the feature varies most.

    Shown pictures and excerpts use it, so a feature that appears once near the
    end of a long text is still visible.
    """
    n = len(text)
    if n <= width:
        return 0, n
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 < n - width // 2]
    best, best_score = 0, -1.0
    for s in starts:
        score = float(np.std(values[s : s + width]))
        if score > best_score + 1e-12:
            best, best_score = s, score
    return best, min(n, best + width)
