"""The synthetic tuples of Hardness-Aware Deep Metric Learning (Zheng, Chen, Lu, Zhou, CVPR 2019,
arXiv 1903.05503) and what is computed on them, as part of :class:`pml_ext.losses.HDMLLoss`.

Per batch: the tuples (given, mined or the wrapped loss's default; capped at
``max_synthetic_tuples`` synthetic negatives: a random subset of the triplets, or in N-pair mode of
the anchors, each kept anchor with its whole candidate row), their negatives pulled toward the
anchors, and then either

- without a generator: ``J_syn``, the wrapped loss on the pulled negatives in embedding space;
- with the generator: the generator maps the real embeddings and the pulled negatives back to
  feature space (its objective ``J_gen = J_recon + J_soft``), the same embedder re-embeds them,
  and ``J_syn`` is the wrapped loss on those synthetic tuples.

The tensor math (gathers, pulled negatives, the synthetic batch layout) is
:mod:`pml_ext.functional.hardness_aware_tuples`; this mixin holds what needs the loss module's
settings and submodules (wrapped loss, generator, classifier). ``J_m``, the weighting into
``J_metric``, the running averages and the records are :class:`~pml_ext.losses.HDMLLoss`'s own.
Semantics follow the paper and the official TensorFlow code (wzzheng/HDML); no code was copied.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as tnf
from pytorch_metric_learning import losses
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..functional import hardness_aware as HA
from ..functional import hardness_aware_tuples as HT
from ..functional.embedding_expansion import gram_kind
from .embedding_expansion_dense import _reads_losses_alone
from .hdml_generator import _frozen_call, _RoutedCall, _zero_from

__all__: list = []  # internal to HDMLLoss


def _rowwise_triplet_kind(loss) -> Optional[str]:
    """"inner" / "euclidean" when ``loss`` is a plain TripletMarginLoss whose values can be computed
    triplet by triplet (the distances and reducers EE's dense paths accept), else None."""
    if type(loss) is not losses.TripletMarginLoss or getattr(loss, "embedding_regularizer", None) is not None:
        return None
    if not _reads_losses_alone(loss.reducer):
        return None
    return gram_kind(loss.distance)


class _HDMLSyntheticTuples:
    """Mixin of :class:`~pml_ext.losses.HDMLLoss`: builds the synthetic tuples and computes J_syn
    (and, with a generator, J_recon, J_soft, J_gen) from the module's settings (``tuple_mode``,
    ``alpha``, ``synthesize``, ``triplets_per_anchor``, ``max_synthetic_tuples``, ``lambda_``,
    ``softmax_factor``) and submodules (``loss``, ``generator``, ``classifier``)."""

    def _synthetic_terms(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        emb: torch.Tensor,
        embedder,
        indices_tuple,
        routed: bool,
        j_avg: float,
        zero_emb: torch.Tensor,
        gen_params: List[torch.Tensor],
    ) -> Tuple[int, torch.Tensor, Dict[str, torch.Tensor], Dict[str, float]]:
        """``(num_synthetic_tuples, J_syn, terms, records)``: ``terms`` holds J_recon, J_soft and
        J_gen with a generator (zeros connected to its parameters on a batch without synthetic
        tuples, where J_syn is ``zero_emb``); ``records`` the pull statistics."""
        B = emb.shape[0]
        rec = {}

        # ---------------- synthetic tuples in embedding space
        if self.tuple_mode == "triplet":
            a_idx, p_idx, n_idx = self._triplets(indices_tuple, labels)
            T = len(a_idx)
            if T > 0:
                z_neg, coef, mask = HT.batch_triplet_negatives(emb, a_idx, p_idx, n_idx, self.alpha, j_avg)
        else:
            a_idx, p_idx = lmu.convert_to_pos_pairs_with_unique_labels(indices_tuple, labels)
            a_idx, p_idx = a_idx.to(labels.device).long(), p_idx.to(labels.device).long()
            T = len(a_idx)
            # the cap counts synthetic negatives: over it, R random anchors keep their whole
            # candidate rows (rows = their positions in a_idx, also their target columns);
            # None = every row, and no random number drawn
            rows = HT.cap_npair_rows(T, self.max_synthetic_tuples, labels.device)
            a_syn = a_idx if rows is None else a_idx.index_select(0, rows)  # the synthetic rows' anchors
            if T > 0:
                # [R, N, D] (R = N uncapped); statistics over the kept rows' real negatives only
                z_neg, coef, mask = HT.batch_npair_negatives(emb, a_idx, p_idx, self.alpha, j_avg, rows=rows)
        n_syn = T if self.tuple_mode == "triplet" else len(a_syn) * max(T - 1, 0)

        terms: Dict[str, torch.Tensor] = {}

        if n_syn == 0:
            # degenerate batch: no synthetic tuple; zero losses connected to the graph
            j_syn = zero_emb
            if self.use_generator:
                terms["J_recon"] = _zero_from(gen_params, zero_emb)
                terms["J_soft"] = _zero_from(gen_params, zero_emb)
                terms["J_gen"] = terms["J_recon"] + terms["J_soft"]
            return n_syn, j_syn, terms, rec

        rec["mean_pull_coefficient"] = float(coef.detach().mean())
        rec["fraction_pullable"] = float(mask.float().mean())
        if not self.use_generator:
            if self.tuple_mode == "triplet":
                syn_emb, syn_labels, syn_tuple = HT.synthetic_triplets(emb, z_neg, labels, a_idx, p_idx, n_idx)
                j_syn = self._triplet_syn_loss(syn_emb, syn_labels, syn_tuple)
            else:
                j_syn = self._npair_syn_loss(HT.gather_rows(emb, a_syn), z_neg, a_syn, labels, rows)
            return n_syn, j_syn, terms, rec

        y_real = features.detach() if routed else features
        D = emb.shape[1]
        z_neg_flat = z_neg.reshape(-1, D)
        z_in = torch.cat([emb, z_neg_flat], 0)  # real embeddings (reconstruction) + pulled negatives
        y_gen, y_met = self._generate(z_in, routed)
        # --- generator objective
        recon_gen = y_gen[:B]
        syn_gen = y_gen[B:]
        terms["J_recon"] = HA.hdml_reconstruction_loss(recon_gen, y_real, self.lambda_)
        if self.tuple_mode == "triplet":
            neg_labels = labels[n_idx]
            logits = self._classify(syn_gen, routed)
            soft_lab = neg_labels
            if self.synthesize == "all":
                # the classifier is row-wise: classify the B regenerated rows once and
                # gather their logits for the T anchors and positives (not 2T rows)
                recon_logits = self._classify(recon_gen, routed)
                logits = torch.cat(
                    [HT.gather_rows(recon_logits, a_idx), HT.gather_rows(recon_logits, p_idx), logits], 0
                )
                soft_lab = torch.cat([labels[a_idx], labels[p_idx], neg_labels], 0)
            terms["J_soft"] = HA.hdml_soft_loss(logits, soft_lab, self.lambda_, self.softmax_factor)
        else:
            cand_labels = labels[p_idx].unsqueeze(0).expand(len(a_syn), T).reshape(-1)
            j_soft = HA.hdml_soft_loss(
                self._classify(syn_gen, routed), cand_labels, self.lambda_, self.softmax_factor
            )
            if self.synthesize == "all":  # official genSoftmax: + CE on regenerated anchors
                j_soft = j_soft + HA.hdml_soft_loss(
                    self._classify(HT.gather_rows(recon_gen, a_syn), routed), labels[a_syn], self.lambda_,
                    self.softmax_factor,
                )
            terms["J_soft"] = j_soft
        terms["J_gen"] = terms["J_recon"] + terms["J_soft"]
        # --- metric path: re-embed with the same embedder
        syn_emb_all = embedder(y_met)
        recon_emb, neg_emb = syn_emb_all[:B], syn_emb_all[B:]
        if self.tuple_mode == "triplet":
            base = recon_emb if self.synthesize == "all" else emb
            syn_emb, syn_labels, syn_tuple = HT.synthetic_triplets(base, neg_emb, labels, a_idx, p_idx, n_idx)
            j_syn = self._triplet_syn_loss(syn_emb, syn_labels, syn_tuple)
        else:
            cands = neg_emb.reshape(len(a_syn), T, -1)
            if self.synthesize == "all":
                anchors = HT.gather_rows(recon_emb, a_syn)
            else:
                anchors = HT.gather_rows(emb, a_syn)
                cands = HT.npair_candidates_with_positives(cands, HT.gather_rows(emb, p_idx), rows)
            j_syn = self._npair_syn_loss(anchors, cands, a_syn, labels, rows)
        return n_syn, j_syn, terms, rec

    def _triplets(self, indices_tuple, labels):
        a, p, n = lmu.convert_to_triplets(indices_tuple, labels, t_per_anchor=self.triplets_per_anchor)
        a, p, n = a.to(labels.device).long(), p.to(labels.device).long(), n.to(labels.device).long()
        return HT.cap_tuples((a, p, n), self.max_synthetic_tuples)

    def _triplet_syn_loss(self, syn_emb, syn_labels, syn_tuple):
        """The wrapped loss on the synthetic triplets (B real rows + T synthetic negatives).

        PML's TripletMarginLoss builds the full (B+T)² distance matrix to read 2T entries of it;
        with thousands of mined triplets that matrix dominated the step. For a plain
        TripletMarginLoss (Lp-2 / cosine / dot distance, a reducer that reads the losses only, no
        embedding regulariser) the same per-triplet values are computed row-wise (tested against
        PML's own path); any other loss runs as is.
        """
        loss = self.loss
        kind = _rowwise_triplet_kind(loss)
        if kind is None:
            return loss(syn_emb, syn_labels, syn_tuple)
        a, p, n = syn_tuple
        dist = loss.distance
        q = dist.maybe_normalize(syn_emb)

        def pair(i, j):
            return HT.row_pair_values(q, i, j, kind, dist.power)

        ap, an = pair(a, p), pair(a, n)
        if loss.swap:
            an = dist.smallest_dist(an, pair(p, n))
        violation = dist.margin(ap, an) + loss.margin
        per = tnf.softplus(violation) if loss.smooth_loss else tnf.relu(violation)
        return loss.reducer({"loss": {"losses": per, "indices": syn_tuple, "reduction_type": "triplet"}},
                            syn_emb, syn_labels)

    def _npair_syn_loss(self, anchors, cands, a_idx, labels, rows=None):
        """N-pair CE where anchor i's candidates are row i of ``cands`` [N, N, D], target i; with
        ``rows`` (the N-pair cap), ``cands`` is [R, N, D] and row r's target is ``rows[r]``."""
        dist = self.loss.distance
        r, n, d = cands.shape
        # one call of the distance's own forward (normalisation, power, as the wrapped loss does),
        # [R, R*N], then keep anchor i against its own row: sim[i, j] = mat[i, i*N + j]
        mat = dist(anchors, cands.reshape(r * n, d))
        sim = HT.own_row_similarities(mat, n)
        if not dist.is_inverted:
            sim = -sim
        target = torch.arange(n, device=sim.device) if rows is None else rows.to(sim.device)
        ce = tnf.cross_entropy(sim, target, reduction="none")
        loss_dict = {"loss": {"losses": ce, "indices": a_idx, "reduction_type": "element"}}
        return self.loss.reducer(loss_dict, anchors, labels[a_idx])

    def _generate(self, z_in, routed):
        """Generator outputs for the gen objective (``y_gen``) and for the metric path (``y_met``)."""
        if not routed:
            y = self.generator(z_in)
            return y, y
        return _RoutedCall.apply(self.generator, z_in, *self.generator.parameters())

    def _classify(self, y, routed):
        return _frozen_call(self.classifier, y) if routed else self.classifier(y)
