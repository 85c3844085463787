"""Retrieval metrics of paper 002 (section 4.2) and the works it follows.

Every metric scores rankings of a gallery for a set of queries; an item is relevant when it shares
the query's class (the emotion for mAP8 and the others, the polarity for mAP2). Definitions:

- AP: mean of precision@k over the ranks k of the relevant items; mAP its mean over queries.
- NN: share of queries whose first result is relevant.
- FT / ST (first / second tier): recall within the top R / 2R results, R = the query's relevant count.
- DCG: discounted cumulative gain with gain 1 for a relevant item, ``G_1 + Σ_{i≥2} G_i / log2(i)``,
  divided by the ideal value (all relevant items first), as in the shape-retrieval benchmarks.
- F1@K: harmonic mean of precision and recall within the top K (K = 32 by default, the E-measure's).
- ANMRR (MPEG-7): ranks beyond ``K(q) = min(4 R, 2 max_q R)`` count as ``1.25 K(q)``;
  ``NMRR = (AVR - 0.5 - R/2) / (1.25 K - 0.5 - R/2)``; 0 is perfect, 1 is worst.

Queries without any relevant gallery item are left out (they have no defined AP or recall).
"""

from __future__ import annotations

import numpy as np


def rank_gallery(queries: np.ndarray, gallery: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """Gallery indices by decreasing inner product for each query, (Q, G); with ``exclude_self``
    (leave-one-out, queries = gallery) a query's own item is put last and must be ignored."""
    scores = queries @ gallery.T
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1, kind="stable")


def relevance(ranking: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
              exclude_self: bool = False) -> np.ndarray:
    """Boolean (Q, G') matrix: is the item at each rank relevant (G' = G - 1 when leaving one out)."""
    rel = gallery_labels[ranking] == query_labels[:, None]
    return rel[:, :-1] if exclude_self else rel


def _average_precision(rel: np.ndarray) -> np.ndarray:
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    return (hits / ranks * rel).sum(1) / rel.sum(1)


def _dcg(rel: np.ndarray) -> np.ndarray:
    n = rel.shape[1]
    discount = np.ones(n)
    discount[1:] = 1 / np.log2(np.arange(2, n + 1))
    gained = (rel * discount).sum(1)
    ideal = np.cumsum(discount)[rel.sum(1) - 1]
    return gained / ideal


def _anmrr(rel: np.ndarray) -> float:
    counts = rel.sum(1)
    gtm = counts.max()
    nmrr = []
    for row, ng in zip(rel, counts):
        k = min(4 * ng, 2 * gtm)
        ranks = np.flatnonzero(row) + 1.0
        ranks[ranks > k] = 1.25 * k
        avr = ranks.sum() / ng
        nmrr.append((avr - 0.5 - ng / 2) / (1.25 * k - 0.5 - ng / 2))
    return float(np.mean(nmrr))


def retrieval_report(rel_emotion: np.ndarray, rel_polarity: np.ndarray | None = None, f1_k: int = 32) -> dict[str, float]:
    """All metrics from relevance matrices (rank order, one row per query)."""
    usable = rel_emotion.sum(1) > 0
    rel = rel_emotion[usable]
    if not len(rel):
        raise ValueError("no query has a relevant gallery item")
    counts = rel.sum(1)
    hits = np.cumsum(rel, axis=1)
    n = rel.shape[1]
    first = hits[np.arange(len(rel)), np.minimum(counts, n) - 1]
    second = hits[np.arange(len(rel)), np.minimum(2 * counts, n) - 1]
    k = min(f1_k, n)
    precision, recall = hits[:, k - 1] / k, hits[:, k - 1] / counts
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    out = {
        "map8": float(_average_precision(rel).mean()),
        "nn": float(rel[:, 0].mean()),
        "ft": float((first / counts).mean()),
        "st": float((second / counts).mean()),
        "dcg": float(_dcg(rel).mean()),
        "f1": float(f1.mean()),
        "anmrr": _anmrr(rel),
        "queries": float(len(rel)),
    }
    if rel_polarity is not None:
        polar = rel_polarity[rel_polarity.sum(1) > 0]
        out["map2"] = float(_average_precision(polar).mean()) if len(polar) else float("nan")
    return out


def evaluate_retrieval(query_embeddings: np.ndarray, query_labels: np.ndarray, gallery_embeddings: np.ndarray | None,
                       gallery_labels: np.ndarray | None, polarity: list[int | None], f1_k: int = 32) -> dict[str, float]:
    """Paper 002's protocol: queries against a gallery (test vs train), or leave-one-out when the
    gallery is ``None`` (small sets). ``polarity[c]`` is class c's polarity (None: left out of mAP2)."""
    leave_one_out = gallery_embeddings is None
    if leave_one_out:
        gallery_embeddings, gallery_labels = query_embeddings, query_labels
    ranking = rank_gallery(query_embeddings, gallery_embeddings, exclude_self=leave_one_out)
    rel_e = relevance(ranking, query_labels, gallery_labels, leave_one_out)
    pol = np.array([-1 if p is None else p for p in polarity])
    q_pol, g_pol = pol[query_labels], pol[gallery_labels]
    rel_p = relevance(ranking, q_pol, g_pol, leave_one_out) & (q_pol[:, None] >= 0)
    return retrieval_report(rel_e, rel_p, f1_k)
