"""The differentiable values of EE's selected hardest pairs (Ko & Gu, CVPR 2020, §3.2).

Both searches (blocked and grouped) run without autograd and return, for every class pair, the
two expanded points of its hardest pair. Every expanded point is ``s·(w₁·x_i + w₂·x_j)`` (two
originals, EE Eq. 1; s = 1/‖·‖ for an L2-normalised synthetic point, EE Eq. 2, else 1), so the
pair's value needs four entries of the originals' Gram matrix, and its gradient goes back to
twelve (four for the inner product, four for each point's squared norm through s or, for
Euclidean distances, through the norm of an original). :class:`_SelectedPairs` computes the
value with one gather and its gradient with one ``index_add`` into the Gram matrix.
"""
from __future__ import annotations

import torch

from .primitives import safe_sqrt, take, take_columns

__all__: list = []  # internal to the searches


def synthetic_scale(sq: torch.Tensor, synthetic: torch.Tensor) -> torch.Tensor:
    """EE Eq. 2's scale 1/‖x̄‖ of every synthetic point from its squared norm (0 for a zero-norm
    point, which then stays at the origin), 1 for the originals. For the searches (no autograd)."""
    inv = torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).rsqrt(), 0.0)
    return torch.where(synthetic, inv, 1.0)


def scaled_points(gd: torch.Tensor, endpoints: torch.Tensor, weights: torch.Tensor, sq: torch.Tensor,
                  synthetic: torch.Tensor, normalizing: bool):
    """A list of points on the Gram matrix ``gd`` (no autograd), as the grouped and the row search
    read them: ``(weights, sq, scale, gt)``, the [2, M] endpoint weights and [M] squared norms with
    EE Eq. 2's scale folded in (``scale`` None when not ``normalizing``), and ``gt`` [B, M] = G Wᵀ,
    every original's inner product with every point (two column gathers of ``gd``)."""
    scale = None
    if normalizing:
        scale = synthetic_scale(sq, synthetic)
        weights, sq = weights * scale, sq * scale * scale
    (f, s), (wf, ws) = endpoints, weights
    gt = gd.index_select(1, f).mul_(wf).addcmul_(gd.index_select(1, s), ws)
    return weights, sq, scale, gt


def search_values(sq: torch.Tensor, kind: str, distance, normalize: bool):
    """How the grouped and the row search turn inner products into search values, from the
    points' squared norms ``sq``: ``(transform, inverted, worst)``. ``transform(r, sq_q, sq_p)``
    maps inner products ``r`` to search values (``sq_q``/``sq_p`` give the squared norms, called
    only for Euclidean values off the sphere); larger values are harder when ``inverted``;
    ``worst`` fills what a reduction must ignore. When every point is on the unit sphere
    (L2-normalising Lp distance, ``normalize=True``) the Euclidean distance decreases with the
    inner product, so the search runs on the inner products themselves, without square roots."""
    on_sphere = (kind == "euclidean" and normalize and distance.normalize_embeddings and distance.power > 0
                 and bool((sq > 0.5).all()))
    inverted = True if on_sphere else distance.is_inverted

    def transform(r, sq_q, sq_p):
        if on_sphere:
            return r
        if kind == "euclidean":
            r = safe_sqrt(sq_q() + sq_p() - 2 * r)
        return r**distance.power if distance.power != 1 else r

    return transform, inverted, float("-inf") if inverted else float("inf")


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[2, 2, ...] products a_α · b_β of two [2, ...] weight pairs."""
    return a[:, None] * b[None, :]


class _SelectedPairs(torch.autograd.Function):
    """The distance of selected pairs of expanded points, from the originals' Gram matrix.

    ``ends`` [4, ...] long: the row point's two originals, then the column point's; ``wn``
    [4, ...]: their weights with EE Eq. 2's scale folded in (so the pair's inner product is
    ``Σ wn_α·wn_β·G[e_α, e_β]``); ``sqn_r``/``sqn_c``: each point's squared norm after that scale
    (Euclidean only); ``syn_r``/``syn_c``: the point is an L2-normalised synthetic point, whose
    scale depends on G; ``same``: the pair is one point (distance 0).
    """

    @staticmethod
    def forward(ctx, gram, ends, wn, sqn_r, sqn_c, syn_r, syn_c, same, euclidean: bool, power):
        b = gram.shape[0]
        er, ec, wr, wc = ends[:2], ends[2:], wn[:2], wn[2:]
        lin_rc = er[:, None] * b + ec[None, :]  # [2, 2, ...]
        w_rc = _outer(wr, wc)
        base = (take(gram, lin_rc) * w_rc).sum((0, 1))  # inner product of the two points
        value = base
        if euclidean:
            value = safe_sqrt((sqn_r + sqn_c - 2 * base).masked_fill(same, 0))
        out = value**power if power != 1 else value
        ctx.save_for_backward(ends, wn, lin_rc, w_rc, base, value, syn_r, syn_c)
        ctx.euclidean, ctx.power, ctx.b = euclidean, power, b
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, u):
        ends, wn, lin_rc, w_rc, base, value, syn_r, syn_c = ctx.saved_tensors
        b = ctx.b
        if ctx.power != 1:
            u = u * ctx.power * value ** (ctx.power - 1)
        if ctx.euclidean:
            # d value / d inner = -1/value; d value / d n̂ = 1/(2·value) for an original (n̂ = G_ii);
            # 0 where the distance is 0 (safe_sqrt)
            u_d2 = torch.where(value > 0, 0.5 * u / value.clamp_min(torch.finfo(value.dtype).tiny), 0.0)
            u_inner = -2 * u_d2
        else:
            u_d2, u_inner = None, u
        # through EE Eq. 2's scale s = n^(-1/2) of a synthetic point: -½·u_inner·inner on wn⊗wn
        syn_term = -0.5 * u_inner * base
        zero = torch.zeros_like(u_inner)
        c_r = torch.where(syn_r, syn_term, zero if u_d2 is None else u_d2)
        c_c = torch.where(syn_c, syn_term, zero if u_d2 is None else u_d2)
        er, ec, wr, wc = ends[:2], ends[2:], wn[:2], wn[2:]
        lin = torch.cat([lin_rc, er[:, None] * b + er[None, :], ec[:, None] * b + ec[None, :]])
        vals = torch.cat([u_inner * w_rc, c_r * _outer(wr, wr), c_c * _outer(wc, wc)])
        grad = torch.zeros(b * b, dtype=u.dtype, device=u.device)
        grad.index_add_(0, lin.reshape(-1), vals.reshape(-1))
        return grad.view(b, b), None, None, None, None, None, None, None, None, None


def selected_pair_values(gram, ends, wn, sqn_r, sqn_c, syn_r, syn_c, same, kind: str, power) -> torch.Tensor:
    """Differentiable (through ``gram``) values of the selected pairs: :class:`_SelectedPairs`."""
    return _SelectedPairs.apply(gram, ends, wn, sqn_r, sqn_c, syn_r, syn_c, same, kind == "euclidean", power)


def point_pair_values(gram, rows, cols, endpoints, weights, sq, synthetic, same, kind: str, power) -> torch.Tensor:
    """:func:`selected_pair_values` of the pairs (``rows[x, y]``, ``cols[x, y]``) of points
    given as one list: ``endpoints`` [2, M] every point's two originals, ``weights`` [2, M] their
    weights with EE Eq. 2's scale, ``sq`` [M] their squared norms after it, ``synthetic`` [M] the
    points whose scale depends on the Gram matrix (None: none does); ``same`` marks pairs of one
    point. The grouped and the row search list their points this way."""
    shape = rows.shape
    idx = torch.stack([rows, cols])
    ends = take_columns(endpoints, idx).transpose(0, 1).reshape(4, *shape)  # [r1, r2, c1, c2]
    wn = take_columns(weights, idx).transpose(0, 1).reshape(4, *shape)
    sqn = take(sq, idx)
    syn = torch.zeros_like(idx, dtype=torch.bool) if synthetic is None else take(synthetic, idx)
    return selected_pair_values(gram, ends, wn, sqn[0], sqn[1], syn[0], syn[1], same, kind, power)
