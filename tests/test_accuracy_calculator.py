"""Tests of pml_ext.utils.accuracy_calculator against brute-force references."""

from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.utils import inference as pml_inference
from pytorch_metric_learning.utils.accuracy_calculator import (
    AccuracyCalculator as PMLAccuracyCalculator,
)
from sklearn.metrics import normalized_mutual_info_score

from pml_ext.utils import AccuracyCalculator, pair_counting_f1

CPU = torch.device("cpu")
PML_NAMES = [
    "AMI",
    "NMI",
    "mean_average_precision",
    "mean_average_precision_at_r",
    "mean_reciprocal_rank",
    "precision_at_1",
    "r_precision",
]


# --------------------------------------------------------------------------- brute force
def brute_f1(labels_true: Sequence, labels_pred: Sequence) -> float:
    """Explicit loop over all unordered pairs (Song et al. 2016 definition)."""
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(labels_true)), 2):
        same_class = labels_true[i] == labels_true[j]
        same_cluster = labels_pred[i] == labels_pred[j]
        tp += same_class and same_cluster
        fp += same_cluster and not same_class
        fn += same_class and not same_cluster
    if tp == 0:
        return 0.0
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r)


def brute_recall(
    query: np.ndarray,
    query_labels: np.ndarray,
    reference: np.ndarray,
    reference_labels: np.ndarray,
    ref_includes_query: bool,
    ks: Sequence[int],
) -> Dict[int, Dict[str, float]]:
    """Loop over queries.  Returns, per K, the recall when neighbours are
    ordered by (distance, index) ("ordered"), and tie-aware bounds: any valid
    K-set holds every item strictly closer than the K-th distance dK plus at
    least one item at distance exactly dK, so a hit is certain ("lower") if a
    same-label item is strictly closer or all items at dK share the label,
    and possible ("upper") if a same-label item is at distance <= dK."""
    sums = {K: {"ordered": 0.0, "lower": 0.0, "upper": 0.0} for K in ks}
    n_valid = 0
    for i in range(len(query)):
        cand = [j for j in range(len(reference)) if not (ref_includes_query and j == i)]
        d = {j: float(np.sum((reference[j].astype(np.float64) - query[i]) ** 2)) for j in cand}
        same = {j: reference_labels[j] == query_labels[i] for j in cand}
        if not any(same.values()):
            continue  # lone query label: excluded, as PML does
        n_valid += 1
        order = sorted(cand, key=lambda j: (d[j], j))
        for K in ks:
            dK = d[order[K - 1]] if K <= len(order) else math.inf
            sums[K]["ordered"] += any(same[j] for j in order[:K])
            closer = any(same[j] and d[j] < dK for j in cand)
            tie_group = [same[j] for j in cand if d[j] == dK]  # >= 1 of them is retrieved
            sums[K]["lower"] += closer or all(tie_group)
            sums[K]["upper"] += closer or any(tie_group)
    if n_valid == 0:
        return {K: {key: math.nan for key in v} for K, v in sums.items()}
    return {K: {key: val / n_valid for key, val in v.items()} for K, v in sums.items()}


class RecordingKNN:
    """FaissKNN that records the k it is asked for and what it returned."""

    def __init__(self) -> None:
        self.inner = pml_inference.FaissKNN()
        self.ks: List[int] = []
        self.indices: Optional[torch.Tensor] = None

    def __call__(self, query, k, reference=None, ref_includes_query=False):
        self.ks.append(k)
        distances, self.indices = self.inner(query, k, reference, ref_includes_query)
        return distances, self.indices


def clustered(n: int, classes: int, dim: int, seed: int, noise: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = centres[labels] + noise * torch.randn(n, dim, generator=g)
    return x, labels


def recall_names(ks: Sequence[int]) -> tuple:
    return tuple(f"recall_at_{K}" for K in ks)


# --------------------------------------------------------------------------- F1
@pytest.mark.parametrize("seed", range(8))
def test_f1_matches_pair_enumeration_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 120))
    t = rng.integers(0, int(rng.integers(1, 15)), n)
    p = rng.integers(0, int(rng.integers(1, 15)), n)
    expected = brute_f1(list(t), list(p))
    assert pair_counting_f1(t, p) == pytest.approx(expected, abs=1e-12)
    assert pair_counting_f1(torch.from_numpy(t), torch.from_numpy(p)) == pytest.approx(expected, abs=1e-12)
    # float labels (as PML passes them), arbitrary label values
    assert pair_counting_f1(torch.from_numpy(t).float() * 3.5 - 7, p + 1000) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=0, max_size=40)
)
def test_f1_property(pairs) -> None:
    t = [a for a, _ in pairs]
    p = [b for _, b in pairs]
    assert pair_counting_f1(np.array(t), np.array(p)) == pytest.approx(brute_f1(t, p), abs=1e-12)


def test_f1_hand_made() -> None:
    # perfect clustering, cluster ids permuted
    assert pair_counting_f1([0, 0, 1, 1, 2, 2], [5, 5, 3, 3, 9, 9]) == 1.0
    # everything in one cluster: P = 3/15, R = 1 -> F1 = 2*3/(15+3)
    assert pair_counting_f1([0, 0, 1, 1, 2, 2], [0] * 6) == pytest.approx(6 / 18)
    # classes {0,1,2},{3,4}; clusters {0,1},{2,3,4}: TP = 1 + 1 = 2,
    # same-class pairs 3 + 1, same-cluster pairs 1 + 3 -> F1 = 4/8
    assert pair_counting_f1([0, 0, 0, 1, 1], [0, 0, 1, 1, 1]) == pytest.approx(0.5)
    # no positive pair anywhere (0/0): convention 0.0, like brute force
    assert pair_counting_f1([0, 1, 2], [0, 1, 2]) == 0.0 == brute_f1([0, 1, 2], [0, 1, 2])
    assert pair_counting_f1([], []) == 0.0
    with pytest.raises(ValueError):
        pair_counting_f1([0, 1], [0])


def test_f1_large_sparse_contingency_is_cheap() -> None:
    # 20k classes x 20k clusters would be a 4e8-cell dense table
    rng = np.random.default_rng(0)
    t = np.arange(40000) // 2
    p = rng.permutation(40000) // 2
    f1 = pair_counting_f1(t, p)
    assert 0.0 <= f1 <= 1.0
    assert pair_counting_f1(t, t) == 1.0


# --------------------------------------------------------------------------- recall
@pytest.mark.parametrize("seed", range(4))
def test_recall_matches_brute_force_same_set(seed: int) -> None:
    x, y = clustered(150, 30, 8, seed)
    y[:3] = torch.tensor([100, 101, 102])  # lone labels
    ks = (1, 2, 4, 8, 16)
    calc = AccuracyCalculator(include=recall_names(ks), recall_at_k=ks, device=CPU)
    res = calc.get_accuracy(x, y)
    ref = brute_recall(x.numpy(), y.numpy(), x.numpy(), y.numpy(), True, ks)
    assert set(res) == set(recall_names(ks))
    for K in ks:
        assert res[f"recall_at_{K}"] == pytest.approx(ref[K]["ordered"], abs=1e-12)
    assert all(res[f"recall_at_{a}"] <= res[f"recall_at_{b}"] for a, b in zip(ks, ks[1:]))


@pytest.mark.parametrize("seed", range(3))
def test_recall_matches_brute_force_separate_sets(seed: int) -> None:
    xq, yq = clustered(80, 20, 8, seed)
    xr, yr = clustered(120, 20, 8, seed + 100)
    yq[:5] = 555  # label absent from the reference: lone, excluded
    ks = (1, 3, 10, 500)  # 500 > |reference|: every non-lone query hits
    calc = AccuracyCalculator(include=recall_names(ks), recall_at_k=ks, device=CPU)
    res = calc.get_accuracy(xq, yq, xr, yr, ref_includes_query=False)
    ref = brute_recall(xq.numpy(), yq.numpy(), xr.numpy(), yr.numpy(), False, ks)
    for K in ks:
        assert res[f"recall_at_{K}"] == pytest.approx(ref[K]["ordered"], abs=1e-12)
    assert res["recall_at_500"] == 1.0


def test_recall_ref_includes_query_with_extra_reference() -> None:
    xq, yq = clustered(60, 15, 6, 7)
    xe, ye = clustered(90, 15, 6, 8)
    xr, yr = torch.cat([xq, xe]), torch.cat([yq, ye])
    ks = (1, 5, 20)
    calc = AccuracyCalculator(include=recall_names(ks), recall_at_k=ks, device=CPU)
    res = calc.get_accuracy(xq, yq, xr, yr, ref_includes_query=True)
    ref = brute_recall(xq.numpy(), yq.numpy(), xr.numpy(), yr.numpy(), True, ks)
    for K in ks:
        assert res[f"recall_at_{K}"] == pytest.approx(ref[K]["ordered"], abs=1e-12)


def hand_made_tie_case():
    """2-D points with exact integer distances and many ties (incl. with
    self, distance 0) that never straddle a hit/miss boundary."""
    pts = [
        ((0, 0), 0),  # 0: p1, p2 tie at 1 (both wrong), p3 at 4 -> rank 3
        ((1, 0), 1),  # 1: p0 at 1 wrong, p2 at 4 right        -> rank 2
        ((-1, 0), 1),  # 2: p0 at 1 wrong, p1 at 4 right       -> rank 2
        ((0, 2), 0),  # 3: p0 at 4 right                       -> rank 1
        ((5, 5), 2),  # 4: duplicate of 5, same label, ties self -> rank 1
        ((5, 5), 2),  # 5: idem                                -> rank 1
        ((9, 9), 3),  # 6: lone label                          -> excluded
        ((20, 20), 4),  # 7: dup of 8 (other label) at 0, p9 at 4 -> rank 2
        ((20, 20), 5),  # 8: p7 0, p9 4, p11 9 wrong, p10 100    -> rank 4
        ((20, 22), 4),  # 9: p11 at 1 right                     -> rank 1
        ((30, 20), 5),  # 10: p12 at 1 right                    -> rank 1
        ((20, 23), 4),  # 11: p9 at 1 right                     -> rank 1
        ((30, 21), 5),  # 12: p10 at 1 right                    -> rank 1
    ]
    x = torch.tensor([p for p, _ in pts], dtype=torch.float32)
    y = torch.tensor([lab for _, lab in pts])
    ranks = [3, 2, 2, 1, 1, 1, None, 2, 4, 1, 1, 1, 1]
    return x, y, ranks


def test_recall_hand_made_ties_and_lone_labels() -> None:
    x, y, ranks = hand_made_tie_case()
    ks = (1, 2, 3, 4, 5)
    calc = AccuracyCalculator(
        include=recall_names(ks) + ("precision_at_1",), recall_at_k=ks, device=CPU
    )
    res = calc.get_accuracy(x, y)
    valid = [r for r in ranks if r is not None]
    ref = brute_recall(x.numpy(), y.numpy(), x.numpy(), y.numpy(), True, ks)
    for K in ks:
        expected = sum(r <= K for r in valid) / len(valid)
        assert ref[K]["lower"] == ref[K]["upper"] == pytest.approx(expected)  # unambiguous
        assert res[f"recall_at_{K}"] == pytest.approx(expected, abs=1e-12)
    assert res["recall_at_1"] == pytest.approx(7 / 12)
    assert res["recall_at_1"] == res["precision_at_1"]


@pytest.mark.parametrize("seed", range(4))
def test_recall_with_random_ties_within_tie_aware_bounds(seed: int) -> None:
    # small integer coordinates: exact float32 distances, lots of ties and
    # duplicate points, so the K-set is ambiguous; any valid K-set must give
    # a value between the tie-aware bounds.
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (120, 3), generator=g).float()
    y = torch.randint(0, 12, (120,), generator=g)
    ks = (1, 2, 5, 10)
    res = AccuracyCalculator(include=recall_names(ks), recall_at_k=ks, device=CPU).get_accuracy(x, y)
    ref = brute_recall(x.numpy(), y.numpy(), x.numpy(), y.numpy(), True, ks)
    for K in ks:
        assert ref[K]["lower"] - 1e-12 <= res[f"recall_at_{K}"] <= ref[K]["upper"] + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_recall_with_ties_exact_given_the_returned_neighbours(seed: int) -> None:
    # Exact per-query check under ties: the neighbour lists actually returned
    # must be valid K-nearest sets (self excluded), and recall_at_K must be the
    # Python-loop recall over those lists.
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 5, (150, 3), generator=g).float()
    y = torch.randint(0, 15, (150,), generator=g)
    ks = (1, 2, 5, 10)
    knn = RecordingKNN()
    res = AccuracyCalculator(include=recall_names(ks), recall_at_k=ks, knn_func=knn, device=CPU).get_accuracy(x, y)
    nn_idx = knn.indices.numpy()
    xn, yn = x.numpy().astype(np.float64), y.numpy()
    hits = {K: [] for K in ks}
    for i in range(len(x)):
        d = ((xn - xn[i]) ** 2).sum(1)
        others = np.delete(np.arange(len(x)), i)
        assert i not in nn_idx[i]
        assert np.array_equal(np.sort(d[nn_idx[i]]), np.sort(d[others])[: nn_idx.shape[1]])
        if not (yn[others] == yn[i]).any():
            continue  # lone
        for K in ks:
            hits[K].append(any(yn[j] == yn[i] for j in nn_idx[i][:K]))
    for K in ks:
        assert res[f"recall_at_{K}"] == pytest.approx(np.mean(hits[K]), abs=1e-12)


def test_all_queries_lone_gives_nan() -> None:
    x = torch.randn(10, 4)
    y = torch.arange(10)
    res = AccuracyCalculator(include=("recall_at_1", "recall_at_2"), recall_at_k=(1, 2), device=CPU).get_accuracy(x, y)
    assert math.isnan(res["recall_at_1"]) and math.isnan(res["recall_at_2"])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", ["plain", "avg_of_avgs", "return_per_class"])
@pytest.mark.parametrize("same_set", [True, False])
def test_recall_at_1_equals_pml_precision_at_1(seed: int, mode: str, same_set: bool) -> None:
    x, y = clustered(200, 25, 16, seed, noise=1.2)
    y[:4] = 1000 + torch.arange(4)  # lone
    flags = {"avg_of_avgs": mode == "avg_of_avgs", "return_per_class": mode == "return_per_class"}
    ours = AccuracyCalculator(include=("recall_at_1", "precision_at_1"), recall_at_k=(1, 4), device=CPU, **flags)
    pml = PMLAccuracyCalculator(include=("precision_at_1",), device=CPU, **flags)
    if same_set:
        args = (x, y)
    else:
        args = (x[:100], y[:100], x[100:], y[100:], False)
    r_ours, r_pml = ours.get_accuracy(*args), pml.get_accuracy(*args)
    assert r_ours["recall_at_1"] == r_pml["precision_at_1"]
    assert r_ours["recall_at_1"] == r_ours["precision_at_1"]


# --------------------------------------------------------------------------- include / exclude / names
def test_metric_names_include_exclude() -> None:
    calc = AccuracyCalculator(recall_at_k=(1, 10, 100, 1000), device=CPU)
    assert set(calc.get_curr_metrics()) == set(PML_NAMES) | {
        "F1",
        "recall_at_1",
        "recall_at_10",
        "recall_at_100",
        "recall_at_1000",
    }
    assert set(AccuracyCalculator(device=CPU).get_curr_metrics()) >= set(recall_names((1, 2, 4, 8)))

    x, y = clustered(120, 10, 8, 0)
    calc = AccuracyCalculator(include=("recall_at_1", "NMI"), device=CPU)
    assert set(calc.get_accuracy(x, y)) == {"recall_at_1", "NMI"}

    calc = AccuracyCalculator(
        exclude=("recall_at_2", "AMI", "mean_average_precision", "mean_reciprocal_rank"), device=CPU
    )
    res = calc.get_accuracy(x, y)
    assert set(res) == (set(PML_NAMES) | {"F1", "recall_at_1", "recall_at_4", "recall_at_8"}) - {
        "AMI",
        "mean_average_precision",
        "mean_reciprocal_rank",
    }
    # include / exclude at call time
    assert set(calc.get_accuracy(x, y, include=("recall_at_4", "F1"))) == {"recall_at_4", "F1"}
    assert set(calc.get_accuracy(x, y, include=("recall_at_1", "recall_at_4"), exclude=("recall_at_1",))) == {
        "recall_at_4"
    }

    with pytest.raises(ValueError):
        AccuracyCalculator(include=("recall_at_3",), recall_at_k=(1, 2), device=CPU)
    with pytest.raises(ValueError):
        AccuracyCalculator(recall_at_k=(0, 2), device=CPU)
    with pytest.raises(ValueError):
        AccuracyCalculator(recall_at_k=(1.5,), device=CPU)
    # no recall metrics at all is allowed
    assert "recall_at_1" not in AccuracyCalculator(recall_at_k=(), device=CPU).get_curr_metrics()


def test_pml_metrics_unchanged() -> None:
    x, y = clustered(200, 20, 8, 3, noise=1.0)
    names = ("NMI", "AMI", "mean_average_precision_at_r", "r_precision", "precision_at_1")
    ours = AccuracyCalculator(include=names, device=CPU).get_accuracy(x, y)
    pml = PMLAccuracyCalculator(include=names, k="max_bin_count", device=CPU).get_accuracy(x, y)
    for name in names:
        assert ours[name] == pytest.approx(pml[name], abs=1e-12)


# --------------------------------------------------------------------------- k selection
def test_default_k_is_max_recall_k() -> None:
    x, y = clustered(300, 10, 8, 0)  # classes of ~30 > max K
    knn = RecordingKNN()
    calc = AccuracyCalculator(include=("recall_at_1", "recall_at_8", "NMI"), knn_func=knn, device=CPU)
    calc.get_accuracy(x, y)
    assert knn.ks == [8]  # FaissKNN itself adds 1 for the query itself
    calc.get_accuracy(x, y, include=("recall_at_1",))
    assert knn.ks[-1] == 1
    calc.get_accuracy(x[:100], y[:100], x[100:], y[100:])
    assert knn.ks[-1] == 8
    # PML's precision_at_1 only needs one neighbour
    calc = AccuracyCalculator(include=("precision_at_1", "NMI"), knn_func=knn, device=CPU)
    calc.get_accuracy(x, y)
    assert knn.ks[-1] == 1


def test_k_grows_only_for_max_bin_count_metrics() -> None:
    x, y = clustered(300, 10, 8, 1)
    max_bin = int(torch.bincount(y).max())
    knn = RecordingKNN()
    calc = AccuracyCalculator(recall_at_k=(1, 2), knn_func=knn, device=CPU)
    calc.get_accuracy(x, y, include=("recall_at_2", "r_precision"))
    assert knn.ks[-1] == max_bin - 1
    calc.get_accuracy(x, y, include=("recall_at_2", "mean_average_precision_at_r"))
    assert knn.ks[-1] == max_bin - 1
    calc.get_accuracy(x[:100], y[:100], x[100:], y[100:], include=("r_precision",))
    assert knn.ks[-1] == max(int((y[100:] == lab).sum()) for lab in torch.unique(y[:100]))
    # recall K larger than the biggest class wins
    calc = AccuracyCalculator(recall_at_k=(1, 200), knn_func=knn, device=CPU)
    calc.get_accuracy(x, y, include=("recall_at_200", "r_precision"))
    assert knn.ks[-1] == 200


def test_k_capped_at_reference_size() -> None:
    x, y = clustered(50, 5, 4, 2)
    knn = RecordingKNN()
    calc = AccuracyCalculator(include=("recall_at_1", "recall_at_1000"), recall_at_k=(1, 1000), knn_func=knn, device=CPU)
    res = calc.get_accuracy(x, y)
    assert knn.ks[-1] == 49
    assert res["recall_at_1000"] == 1.0
    calc.get_accuracy(x[:20], y[:20], x[20:], y[20:])
    assert knn.ks[-1] == 30


def test_explicit_k() -> None:
    x, y = clustered(100, 5, 4, 3)
    knn = RecordingKNN()
    AccuracyCalculator(include=("recall_at_4",), k=10, knn_func=knn, device=CPU).get_accuracy(x, y)
    assert knn.ks[-1] == 4  # k is PML's k: recall alone reads 4 neighbours
    AccuracyCalculator(include=("recall_at_4", "mean_average_precision"), k=10, knn_func=knn,
                       device=CPU).get_accuracy(x, y)
    assert knn.ks[-1] == 10
    # k < the largest recall K: recall still looks at K neighbours, PML's metrics at k
    res = AccuracyCalculator(recall_at_k=(1, 10, 60), include=("recall_at_60", "mean_reciprocal_rank"), k=5,
                             knn_func=knn, device=CPU).get_accuracy(x, y)
    assert knn.ks[-1] == 60
    pml = PMLAccuracyCalculator(include=("mean_reciprocal_rank", "precision_at_1"), k=5, device=CPU).get_accuracy(x, y)
    assert res["mean_reciprocal_rank"] == pml["mean_reciprocal_rank"]
    max_bin = int(torch.bincount(y).max())
    AccuracyCalculator(include=("recall_at_1",), k="max_bin_count", knn_func=knn, device=CPU).get_accuracy(x, y)
    assert knn.ks[-1] == 1  # no PML k-NN metric requested: only what recall reads
    AccuracyCalculator(include=("recall_at_1", "r_precision"), k="max_bin_count", knn_func=knn,
                       device=CPU).get_accuracy(x, y)
    assert knn.ks[-1] == max_bin - 1
    AccuracyCalculator(recall_at_k=(1, 90), include=("recall_at_90",), k="max_bin_count", knn_func=knn, device=CPU).get_accuracy(x, y)
    assert knn.ks[-1] == 90


PML_KNN_NAMES = ("precision_at_1", "mean_average_precision", "mean_average_precision_at_r", "r_precision",
                 "mean_reciprocal_rank")


@pytest.mark.parametrize("k", [None, "max_bin_count", 3, 40, 1000])
@pytest.mark.parametrize("same_set", [True, False])
@pytest.mark.parametrize("recall_k", [(1, 2, 4, 8), (1, 100)])
def test_every_pml_metric_equals_pml_for_every_k(k, same_set, recall_k) -> None:
    """PML's metrics are computed on PML's k neighbours, whatever recall K needs (issue: MAP was
    0.4895 vs PML's 0.5669 with k=None)."""
    x, y = clustered(160, 10, 8, 7, noise=1.3)
    args = (x, y) if same_set else (x[:60], y[:60], x[60:], y[60:], False)
    names = PML_KNN_NAMES
    # k beyond the reference set: PML indexes faiss's -1 fillers (MAP 6.7 here); ours caps k at the
    # reference set, which is PML's k=None
    pml = PMLAccuracyCalculator(include=names, k=None if k == 1000 else k, device=CPU).get_accuracy(*args)
    recalls = tuple(f"recall_at_{K}" for K in recall_k)
    for include in (names + recalls, recalls + (names[0],), (names[1],) + recalls[-1:], (names[2],), (names[4],)):
        ours = AccuracyCalculator(include=include, k=k, recall_at_k=recall_k, device=CPU).get_accuracy(*args)
        for name in include:
            if name in pml:
                assert ours[name] == pytest.approx(pml[name], abs=1e-12), (name, include)
    full = AccuracyCalculator(include=recalls, k=k, recall_at_k=recall_k, device=CPU).get_accuracy(*args)
    q, ref_ = (x, x) if same_set else (x[:60], x[60:])
    qy, ry = (y, y) if same_set else (y[:60], y[60:])
    want = brute_recall(q.numpy(), qy.numpy(), ref_.numpy(), ry.numpy(), same_set, recall_k)
    for K in recall_k:
        assert full[f"recall_at_{K}"] == pytest.approx(want[K]["ordered"], abs=1e-12)


# --------------------------------------------------------------------------- clustering reuse
def test_f1_reuses_pml_clustering(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: List[torch.Tensor] = []
    original = pml_inference.FaissKMeans.__call__

    def counting(self, x, nmb_clusters):
        out = original(self, x, nmb_clusters)
        calls.append(out)
        return out

    monkeypatch.setattr(pml_inference.FaissKMeans, "__call__", counting)
    x, y = clustered(200, 8, 8, 5, noise=1.5)
    calc = AccuracyCalculator(include=("NMI", "AMI", "F1", "recall_at_1"), device=CPU)
    res = calc.get_accuracy(x, y)
    assert len(calls) == 1
    cluster_labels = calls[0].numpy()
    assert res["F1"] == pytest.approx(brute_f1(list(y.numpy()), list(cluster_labels)), abs=1e-12)
    assert res["NMI"] == pytest.approx(normalized_mutual_info_score(y.numpy(), cluster_labels))
    # F1 alone also triggers exactly one clustering; no clustering without it
    AccuracyCalculator(include=("F1",), device=CPU).get_accuracy(x, y)
    assert len(calls) == 2
    AccuracyCalculator(include=("recall_at_1",), device=CPU).get_accuracy(x, y)
    assert len(calls) == 2


def test_custom_kmeans_func_and_label_comparison() -> None:
    x, y = clustered(100, 6, 4, 6)
    seen: List[int] = []

    def kmeans(emb: torch.Tensor, n_clusters: int) -> torch.Tensor:
        seen.append(n_clusters)
        return (y + 1) % n_clusters  # a fixed "clustering"

    res = AccuracyCalculator(include=("F1",), kmeans_func=kmeans, device=CPU).get_accuracy(x, y)
    assert seen == [6]
    assert res["F1"] == pytest.approx(brute_f1(list(y.numpy()), list(((y + 1) % 6).numpy())))

    # custom label comparison: labels match if equal modulo 3
    def mod3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a % 3) == (b % 3)

    ks = (1, 3)
    calc = AccuracyCalculator(include=recall_names(ks), recall_at_k=ks, label_comparison_fn=mod3, device=CPU)
    res = calc.get_accuracy(x, y)
    ref = brute_recall(x.numpy(), y.numpy() % 3, x.numpy(), y.numpy() % 3, True, ks)
    for K in ks:
        assert res[f"recall_at_{K}"] == pytest.approx(ref[K]["ordered"], abs=1e-12)


# --------------------------------------------------------------------------- misc
def test_calculate_method_callable_directly() -> None:
    # the calculate_recall_at_K attributes also work outside get_accuracy
    calc = AccuracyCalculator(recall_at_k=(1, 2), device=CPU)
    query_labels = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0])
    knn_labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 2.0], [0.0, 1.0]])
    not_lone = torch.tensor([True, True, True, True, False])
    label_counts = (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([2, 2, 1]))
    kwargs = dict(knn_labels=knn_labels, query_labels=query_labels, not_lone_query_mask=not_lone, label_counts=label_counts)
    assert calc.calculate_recall_at_1(**kwargs) == pytest.approx(2 / 4)
    assert calc.calculate_recall_at_2(**kwargs) == pytest.approx(3 / 4)


def test_mean_reciprocal_rank_alone_copy_and_pickle() -> None:
    import copy
    import pickle

    x, y = clustered(80, 6, 4, 9)
    calc = AccuracyCalculator(include=("mean_reciprocal_rank", "recall_at_1"), k=79, device=CPU)
    res = calc.get_accuracy(x, y)
    pml = PMLAccuracyCalculator(include=("mean_reciprocal_rank", "precision_at_1"), device=CPU).get_accuracy(x, y)
    assert res["mean_reciprocal_rank"] == pytest.approx(pml["mean_reciprocal_rank"])
    # PML 2.9 forgets mean_reciprocal_rank in requires_knn; ours computes it alone
    alone = AccuracyCalculator(include=("mean_reciprocal_rank",), k=79, device=CPU).get_accuracy(x, y)
    assert alone["mean_reciprocal_rank"] == pytest.approx(pml["mean_reciprocal_rank"])
    for clone in (copy.deepcopy(calc), pickle.loads(pickle.dumps(calc))):
        assert clone.calculate_recall_at_1.func.__self__ is clone
        assert clone.get_accuracy(x, y) == res


@pytest.mark.parametrize("seed", range(5))
def test_fast_label_counts_match_pml(seed: int) -> None:
    from pytorch_metric_learning.utils import accuracy_calculator as pml_ac

    from pml_ext.utils.accuracy_calculator import _label_match_counts

    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-3, 20, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).float()
    r = torch.randint(0, 15, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).float()
    for ref in (r, q):
        expected = pml_ac.get_label_match_counts(q, ref, pml_ac.EQUALITY)
        got = _label_match_counts(q, ref, pml_ac.EQUALITY)
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
