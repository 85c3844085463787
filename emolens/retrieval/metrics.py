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

Queries without any relevant gallery item are left out (they have no defined AP or recall). Tied
scores never favour the gallery's order: every figure is its expected value under a random order of
each tie (exactly for AP, NN, FT, ST, DCG and F1; ANMRR from the expected relevance at each rank).
"""

from __future__ import annotations

import numpy as np


#: Scores closer than this are ties (identical embeddings can differ in the last bits of a matrix product).
TIE_TOLERANCE = 1e-6


def rank_gallery(queries: np.ndarray, gallery: np.ndarray, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(gallery indices by decreasing inner product, the scores in that order), each (Q, G); with
    ``exclude_self`` (leave-one-out, queries = gallery) a query's own item is put last and must be ignored."""
    scores = queries @ gallery.T
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    ranking = np.argsort(-scores, axis=1, kind="stable")
    return ranking, np.take_along_axis(scores, ranking, axis=1)


def tie_groups(ranked_scores: np.ndarray) -> np.ndarray:
    """(Q, G) ids of the runs of tied scores in each ranking, numbered 0, 1, ... from the top."""
    steps = np.abs(np.diff(ranked_scores, axis=1)) > TIE_TOLERANCE
    return np.concatenate([np.zeros((len(ranked_scores), 1), dtype=np.int64), np.cumsum(steps, axis=1)], axis=1)


def relevance(ranking: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
              exclude_self: bool = False, groups: np.ndarray | None = None) -> np.ndarray:
    """(Q, G') relevance of the item at each rank (G' = G - 1 when leaving one out). With tie ``groups``,
    tied items share their mean relevance: the expected relevance at those ranks when the tie is broken
    at random, so no figure depends on the order of the gallery."""
    rel = (gallery_labels[ranking] == query_labels[:, None]).astype(np.float64)
    if exclude_self:
        rel = rel[:, :-1]
    if groups is None:
        return rel
    out = np.empty_like(rel)
    for i, (row, group) in enumerate(zip(rel, groups[:, :rel.shape[1]])):
        out[i] = (np.bincount(group, weights=row) / np.bincount(group))[group]
    return out


def _average_precision(rel: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """AP per query; with tie ``groups``, its expected value over random orders of each tie (McSherry and
    Najork, ECIR 2008): a relevant item at offset o of a tie of n items with r relevant has, in expectation,
    R_before + o (r - 1) / (n - 1) + 1 relevant items at or above it."""
    n = rel.shape[1]
    ranks = np.arange(1, n + 1)
    if groups is None:
        return (np.cumsum(rel, axis=1) / ranks * rel).sum(1) / rel.sum(1)
    out = np.empty(len(rel))
    for i, (row, group) in enumerate(zip(rel, groups[:, :n])):
        size = np.bincount(group)
        relevant = np.bincount(group, weights=row)
        before = np.cumsum(relevant) - relevant
        start = np.cumsum(size) - size
        offset = np.arange(n) - start[group]
        share = np.where(size > 1, (relevant - 1) / np.maximum(size - 1, 1), 0.0)[group]
        out[i] = (row * (before[group] + offset * share + 1) / ranks).sum() / row.sum()
    return out


def _relevant_counts(rel: np.ndarray) -> np.ndarray:
    """Relevant items per query (tie-averaged relevance still sums to a whole number)."""
    return np.rint(rel.sum(1)).astype(np.int64)


def _dcg(rel: np.ndarray) -> np.ndarray:
    n = rel.shape[1]
    discount = np.ones(n)
    discount[1:] = 1 / np.log2(np.arange(2, n + 1))
    gained = (rel * discount).sum(1)
    ideal = np.cumsum(discount)[_relevant_counts(rel) - 1]
    return gained / ideal


def _anmrr(rel: np.ndarray) -> float:
    counts = _relevant_counts(rel)
    gtm = counts.max()
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    nmrr = []
    for row, ng in zip(rel, counts):
        k = min(4 * ng, 2 * gtm)
        avr = (row * np.where(ranks > k, 1.25 * k, ranks)).sum() / ng  # relevance-weighted mean rank
        nmrr.append((avr - 0.5 - ng / 2) / (1.25 * k - 0.5 - ng / 2))
    return float(np.mean(nmrr))


def retrieval_report(rel_emotion: np.ndarray, rel_polarity: np.ndarray | None = None, f1_k: int = 32,
                     groups: np.ndarray | None = None) -> dict[str, float]:
    """All metrics from relevance matrices (rank order, one row per query; tie-averaged with ``groups``)."""
    rel_emotion = np.asarray(rel_emotion, dtype=np.float64)
    usable = rel_emotion.sum(1) > 0
    rel = rel_emotion[usable]
    rel_groups = None if groups is None else groups[usable]
    if not len(rel):
        raise ValueError("no query has a relevant gallery item")
    counts = _relevant_counts(rel)
    hits = np.cumsum(rel, axis=1)
    n = rel.shape[1]
    first = hits[np.arange(len(rel)), np.minimum(counts, n) - 1]
    second = hits[np.arange(len(rel)), np.minimum(2 * counts, n) - 1]
    k = min(f1_k, n)
    precision, recall = hits[:, k - 1] / k, hits[:, k - 1] / counts
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    out = {
        "map8": float(_average_precision(rel, rel_groups).mean()),
        "nn": float(rel[:, 0].mean()),
        "ft": float((first / counts).mean()),
        "st": float((second / counts).mean()),
        "dcg": float(_dcg(rel).mean()),
        "f1": float(f1.mean()),
        "anmrr": _anmrr(rel),
        "queries": float(len(rel)),
    }
    if rel_polarity is not None:
        rel_polarity = np.asarray(rel_polarity, dtype=np.float64)
        polar = rel_polarity.sum(1) > 0
        out["map2"] = (float(_average_precision(rel_polarity[polar], None if groups is None else groups[polar]).mean())
                       if polar.any() else float("nan"))
    return out


def evaluate_retrieval(query_embeddings: np.ndarray, query_labels: np.ndarray, gallery_embeddings: np.ndarray | None,
                       gallery_labels: np.ndarray | None, polarity: list[int | None], f1_k: int = 32) -> dict[str, float]:
    """Paper 002's protocol: queries against a gallery (test vs train), or leave-one-out when the
    gallery is ``None`` (small sets). ``polarity[c]`` is class c's polarity (None: left out of mAP2)."""
    leave_one_out = gallery_embeddings is None
    if leave_one_out:
        gallery_embeddings, gallery_labels = query_embeddings, query_labels
    ranking, scores = rank_gallery(query_embeddings, gallery_embeddings, exclude_self=leave_one_out)
    groups = tie_groups(scores[:, :-1] if leave_one_out else scores)
    rel_e = relevance(ranking, query_labels, gallery_labels, leave_one_out, groups)
    pol = np.array([-1 if p is None else p for p in polarity])
    q_pol, g_pol = pol[query_labels], pol[gallery_labels]
    rel_p = relevance(ranking, q_pol, g_pol, leave_one_out, groups) * (q_pol[:, None] >= 0)
    return retrieval_report(rel_e, rel_p, f1_k, groups)
