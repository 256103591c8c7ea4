"""Brute-force references for Embedding Expansion, written from the formulas (loops, float64).

Deliberately slow and plain: every point, pair and class pair is visited in Python.
"""
import math

import torch

# The nine PML losses the issue names, each with a loop reference in loss_from_matrix.
WRAPPED_LOSSES = [
    "TripletMarginLoss",
    "ContrastiveLoss",
    "LiftedStructureLoss",
    "GeneralizedLiftedStructureLoss",
    "NPairsLoss",
    "MultiSimilarityLoss",
    "CircleLoss",
    "NTXentLoss",
    "SupConLoss",
]


def normalize_rows(x):
    return [v / v.norm() for v in x]


def division_pairs(labels, pairs):
    labels = [int(v) for v in labels]
    out = []
    if pairs == "all":
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                if labels[i] == labels[j]:
                    out.append((i, j))
        return out
    seen = {}
    for i, lab in enumerate(labels):  # batch order within each class
        seen.setdefault(lab, []).append(i)
    for members in seen.values():
        for t in range(0, len(members) - 1, 2):
            out.append((members[t], members[t + 1]))
    return sorted(out, key=lambda p: (int(labels[p[0]]), p[0]))


def synthetic_points(x, labels, n, normalize, pairs):
    """EE Eq. 1 (+ Eq. 2): n internal division points of every pair."""
    pts, labs, owner = [], [], []
    for i, j in division_pairs(labels, pairs):
        for k in range(1, n + 1):
            v = (k * x[i] + (n + 1 - k) * x[j]) / (n + 1)
            if normalize:
                v = v / v.norm()
            pts.append(v)
            labs.append(int(labels[i]))
            owner.append((i, j))
    return pts, labs, owner


def pair_value(u, v, kind):
    if kind in ("l2", "l2raw"):
        return math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(u, v)))
    if kind == "l2sq":
        return sum((float(a) - float(b)) ** 2 for a, b in zip(u, v))
    if kind == "l1":
        return sum(abs(float(a) - float(b)) for a, b in zip(u, v))
    if kind in ("cos", "dot"):
        return sum(float(a) * float(b) for a, b in zip(u, v))
    if kind == "snr":  # PML's SNRDistance: var(u - v) / var(u), unbiased variances (asymmetric)
        def var(w):
            w = [float(t) for t in w]
            mean = sum(w) / len(w)
            return sum((t - mean) ** 2 for t in w) / (len(w) - 1)

        return var([a - b for a, b in zip(u, v)]) / var(u)
    raise ValueError(kind)


INVERTED = {"l2": False, "l2raw": False, "l2sq": False, "l1": False, "cos": True, "dot": True, "snr": False}
NORMALIZES = {"l2": True, "l2raw": False, "l2sq": True, "l1": True, "cos": True, "dot": False, "snr": True}


def kind_of(distance) -> str:
    """The pair_value kind of a PML distance object (its settings as PML's defaults give them)."""
    name = type(distance).__name__
    if name == "SNRDistance" and distance.normalize_embeddings and distance.power == 1:
        return "snr"
    if name in ("CosineSimilarity", "DotProductSimilarity") and distance.power == 1:
        return "cos" if distance.normalize_embeddings else "dot"
    if name == "LpDistance":
        key = (distance.p, distance.power, distance.normalize_embeddings)
        kinds = {(2, 1, True): "l2", (2, 1, False): "l2raw", (2, 2, True): "l2sq", (1, 1, True): "l1"}
        if key in kinds:
            return kinds[key]
    raise ValueError(f"no brute-force reference for {distance!r}")


def hardened_matrix(x, labels, n, normalize, pairs, kind):
    """H[i][k] = value(x_i, x_k) for positives, hardest over the two expanded sets for negatives."""
    x = x.double()
    if NORMALIZES[kind]:
        if kind == "l1":
            x = torch.stack([v / v.abs().sum() for v in x])  # PML normalises with p of the distance
        else:
            x = torch.stack(normalize_rows(x))
    pts, labs, _ = synthetic_points(x, labels, n, normalize, pairs)
    all_pts = list(x) + pts
    all_labs = [int(v) for v in labels] + labs
    inv = INVERTED[kind]
    classes = sorted(set(all_labs))
    hardest = {}
    for a in classes:
        for b in classes:
            if a == b:
                continue
            best = None
            for p, lp in zip(all_pts, all_labs):
                if lp != a:
                    continue
                for q, lq in zip(all_pts, all_labs):
                    if lq != b:
                        continue
                    v = pair_value(p, q, kind)
                    if best is None or (v > best if inv else v < best):
                        best = v
            hardest[(a, b)] = best
    B = len(labels)
    H = [[0.0] * B for _ in range(B)]
    for i in range(B):
        for k in range(B):
            yi, yk = int(labels[i]), int(labels[k])
            H[i][k] = pair_value(x[i], x[k], kind) if yi == yk else hardest[(yi, yk)]
    return H


def _lse(values):
    if not values:
        return 0.0
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _softplus(v):
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _mean(v):
    return sum(v) / len(v) if v else 0.0


def _mean_nonzero(v):
    nz = [t for t in v if t > 0]
    return sum(nz) / len(nz) if nz else 0.0


def loss_from_matrix(name, H, labels):
    """The PML loss `name` with its default arguments and reducer, from a pair-value matrix."""
    y = [int(v) for v in labels]
    B = len(y)
    pos = [(a, p) for a in range(B) for p in range(B) if a != p and y[a] == y[p]]
    neg = [(a, n) for a in range(B) for n in range(B) if y[a] != y[n]]
    if name == "TripletMarginLoss":  # margin 0.05, all triplets, AvgNonZero
        ls = [max(H[a][p] - H[a][n] + 0.05, 0.0) for a, p in pos for n in range(B) if y[n] != y[a]]
        return _mean_nonzero(ls)
    if name == "ContrastiveLoss":  # pos margin 0, neg margin 1, AvgNonZero per sub-loss
        return _mean_nonzero([max(H[a][p], 0.0) for a, p in pos]) + _mean_nonzero(
            [max(1 - H[a][n], 0.0) for a, n in neg]
        )
    if name == "LiftedStructureLoss":  # Oh Song et al. Eq. 4 as PML writes it, mean over pos pairs
        ls = []
        for a, p in pos:
            vals = [1 - H[i][n] for i, n in neg if i in (a, p)]
            ls.append(max(_lse(vals) + H[a][p], 0.0) ** 2 / 2)
        return _mean(ls)
    if name == "GeneralizedLiftedStructureLoss":
        ls = []
        for i in range(B):
            lp = _lse([H[i][p] for a, p in pos if a == i])
            ln = _lse([1 - H[i][n] for a, n in neg if a == i])
            ls.append(max(lp + ln, 0.0))
        return _mean(ls)
    if name == "MultiSimilarityLoss":  # alpha 2, beta 50, base 0.5
        ls = []
        for i in range(B):
            sp = [-2 * (H[i][p] - 0.5) for a, p in pos if a == i]
            sn = [50 * (H[i][n] - 0.5) for a, n in neg if a == i]
            ls.append(_lse(sp + [0.0]) / 2 + _lse(sn + [0.0]) / 50)
        return _mean(ls)
    if name == "CircleLoss":  # m 0.4, gamma 80, AvgNonZero
        m, g = 0.4, 80
        ls = []
        for i in range(B):
            sp = [-g * max(1 + m - H[i][p], 0) * (H[i][p] - (1 - m)) for a, p in pos if a == i]
            sn = [g * max(H[i][n] + m, 0) * (H[i][n] - m) for a, n in neg if a == i]
            ls.append(_softplus(_lse(sp) + _lse(sn)) if sp and sn else 0.0)
        return _mean_nonzero(ls)
    if name == "NTXentLoss":  # temperature 0.07, mean over positive pairs
        t = 0.07
        ls = []
        for a, p in pos:
            num = H[a][p] / t
            den = _lse([num] + [H[a][n] / t for n in range(B) if y[n] != y[a]])
            ls.append(den - num)
        return _mean(ls)
    if name == "SupConLoss":  # temperature 0.1, AvgNonZero over anchors
        t = 0.1
        ls = []
        for i in range(B):
            den = _lse([H[i][k] / t for k in range(B) if k != i])
            lp = [H[i][p] / t - den for a, p in pos if a == i]
            ls.append(-_mean(lp))
        return _mean_nonzero(ls)
    if name == "NPairsLoss":  # one positive pair per class: first anchor of each label
        from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

        a_idx, p_idx = lmu.convert_to_pos_pairs_with_unique_labels(None, torch.tensor(y))
        a_idx, p_idx = a_idx.tolist(), p_idx.tolist()
        ls = []
        for r, a in enumerate(a_idx):
            row = [H[a][p] for p in p_idx]
            ls.append(_lse(row) - row[r])
        return _mean(ls)
    raise ValueError(name)


def hphn_triplet(x, labels, n, normalize, pairs, margin):
    """Official EE + HPHN triplet (Euclidean on L2-normalised embeddings), mean over anchors."""
    x = torch.stack(normalize_rows(x.double()))
    y = [int(v) for v in labels]
    pts, labs, owner = synthetic_points(x, labels, n, normalize, pairs)
    all_pts = list(x) + pts
    all_labs = y + labs
    ls = []
    for i in range(len(y)):
        ap = [pair_value(x[i], x[j], "l2") for j in range(len(y)) if j != i and y[j] == y[i]]
        group = [x[i]] + [p for p, o in zip(pts, owner) if i in o]
        an = [pair_value(u, v, "l2") for u in group for v, lv in zip(all_pts, all_labs) if lv != y[i]]
        if ap and an:
            ls.append(max(max(ap) - min(an) + margin, 0.0))
    return _mean(ls)
