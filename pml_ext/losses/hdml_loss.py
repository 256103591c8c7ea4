"""Hardness-Aware Deep Metric Learning (Zheng, Chen, Lu, Zhou, CVPR 2019, arXiv 1903.05503) as a
PML-style loss module that wraps any pytorch-metric-learning tuple loss.

Semantics follow the paper and the official TensorFlow code
(wzzheng/HDML, ``lib/HDML.py``, ``main_triplet.py``, ``main_npair.py``); no code was copied.

This module holds the loss: its settings, the real-batch term J_m, the weighting into J_metric,
the gradient routing of ``forward``, the running averages' updates, the records and the
non-finite handling. The synthetic tuples and the terms computed on them (J_syn, J_gen) are
:mod:`.hdml_synthetic_tuples` (tensor math: :mod:`pml_ext.functional.hardness_aware_tuples`), the
generator and its routed calls :mod:`.hdml_generator`, the running averages
:mod:`.running_loss_average`, the argument and batch checks :mod:`.hdml_checks`.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as tnf
from pytorch_metric_learning.losses import NPairsLoss
from pytorch_metric_learning.utils.module_with_records import ModuleWithRecords

from ..functional import hardness_aware as HA
from .hdml_checks import _check_batch, _check_nonneg, _check_pos_int, _check_wrapped_loss
from .hdml_generator import _zero_from, default_hdml_generator
from .hdml_synthetic_tuples import _HDMLSyntheticTuples
from .running_loss_average import RunningLossAverage

__all__ = ["HDMLLoss", "HDMLNonFiniteError", "RunningLossAverage", "default_hdml_generator"]

# the default cap on synthetic negatives per step (max_synthetic_tuples: triplets, or N-pair anchor
# rows of T-1 negatives), chosen from ``python -m benchmarks.perf_steps --hdml-caps ...`` (README, HDML)
DEFAULT_MAX_SYNTHETIC_TUPLES = 512


class HDMLNonFiniteError(FloatingPointError):
    """An HDML objective (J_gen, J_metric or J_cls) became NaN or inf during training."""


class _Unwalked(collections.UserDict):
    """A mapping that is not a ``dict``, so record-keeper's walk does not enter it.

    PML's ``HookContainer`` asks record-keeper to walk ``loss_funcs`` recursively through every
    attribute that is a Module or a dict, ``nn.Module._modules`` included; inside a generator such
    as an ``nn.Sequential`` that walk names SQLite tables after child indices
    ("0_Linear__parameters") and crashes at the first ``save_records()``, and it records every
    weight tensor on the way. torch only needs a mutable mapping as ``_modules``; :class:`HDMLLoss`
    uses this one and exposes what is worth recording (its own terms, the wrapped loss and miner)
    explicitly."""


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------
class HDMLLoss(_HDMLSyntheticTuples, ModuleWithRecords):
    r"""Hardness-Aware Deep Metric Learning around any PML loss (Zheng et al., CVPR 2019).

    Per batch (``features`` y from the backbone, ``z = embedder(y)``):

    1. tuples come from ``indices_tuple`` if given, else from ``miner(z, labels)`` if a miner is
       set, else from the wrapped loss's default (all triplets for ``"triplet"`` mode, one
       positive pair per class for ``"npair"`` mode);
    2. every tuple's negative is pulled toward its anchor
       (:func:`pml_ext.functional.hardness_aware.hardness_aware_negatives`; N-pair layout:
       :func:`~pml_ext.functional.hardness_aware.hardness_aware_npair_negatives`), with the
       running average ``J_avg`` of the metric loss;
    3. with a generator (default): the generator maps the real embeddings and the pulled
       negatives back to feature space, the SAME ``embedder`` re-embeds them, and
       ``J_syn`` = the wrapped loss on the synthetic tuples; the generator is trained with
       ``J_gen = J_recon + J_soft``,
       ``J_recon = (1-λ) Σ‖G(z) - y‖²``, ``J_soft = softmax_factor·λ·CE(classifier(ỹ), labels)``;
       the linear softmax ``classifier`` is trained with ``J_cls = CE(classifier(y), labels)``
       on real features;
    4. ``J_metric = w·J_m + (1-w)·J_syn`` with ``w = exp(-β / J_gen_avg)`` (J_m = wrapped loss
       on the real batch and tuples).

    Without a generator (``use_generator=False``: "hardness-aware negatives only") the pulled
    negatives are used directly in embedding space, J_gen/J_cls do not exist, and
    ``J_metric = (1 - s)·J_m + s·J_syn`` with ``s = synthetic_weight`` (default 0.5; our choice,
    no official counterpart).

    **Gradient routing (one backward, one optimiser with parameter groups).** ``forward`` returns
    a tensor whose *value* is ``J_metric`` and whose gradient delivers, in one ``backward()``:

    - to the backbone, the embedder and the wrapped loss's own parameters: ∂J_metric only
      (its J_syn part reaches them through the generator, whose parameters are used as
      constants on that path);
    - to the generator: ∂J_gen only (computed on detached embeddings/features, with the
      classifier's parameters used as constants in J_soft);
    - to the classifier: ∂J_cls only (CE on detached real features).

    It is ``J_metric + (J_gen - J_gen.detach()) + (J_cls - J_cls.detach())``, where the three
    terms are built on disjoint parameter paths (the generator is evaluated twice: once with live
    parameters on detached inputs for J_gen, once with frozen parameters on the live inputs for
    J_syn; BN running stats are updated once; RNG state is replayed so both passes see the same
    dropout). This is exactly what the official code's three optimisers with disjoint variable
    lists compute. Give each group its own learning rate with :meth:`param_groups`. The
    ``embedder`` is applied to the generator's outputs too (as in the official code), so it must
    accept feature-shaped inputs, and BatchNorm layers inside it see the synthetic batch as well. Because
    ``J_gen`` is ~1e4 times larger than ``J_metric`` (softmax_factor), use an optimiser that is
    invariant to gradient scale per group (Adam, as the official code) or scale the lr.
    :meth:`compute_terms` returns the un-routed terms for those who prefer separate optimisers
    (``torch.autograd.backward(term, inputs=group_params)`` per group).

    Args:
        loss: a PML loss (``TripletMarginLoss``, ``NPairsLoss``, ``ContrastiveLoss``, ...) called
            as ``loss(embeddings, labels)`` on the real batch (``loss(embeddings, labels,
            indices_tuple)`` when tuples are given or mined) and as ``loss(synthetic_embeddings,
            synthetic_labels, synthetic_triplets)`` for J_syn in triplet mode, so it must accept
            PML's ``indices_tuple`` argument. Registered as a submodule, so its
            own parameters (if any) are part of ``self.parameters()`` and get ∂J_metric.
        embedding_size, feature_size: sizes of z and y (needed to build the default generator and
            classifier).
        num_classes: number of training classes (default classifier).
        miner: optional PML miner for the tuples of both J_m and J_syn.
        alpha: pulling factor α (official default 90). Pull strength is ``1 - exp(-α/J_avg)``;
            choose α on the scale of your metric loss.
        beta: β of ``exp(-β/J_gen)`` (official default 1e4). β = 0 gives w = 1, i.e. the plain
            metric loss J_m for the metric parameters; β → ∞ gives w = 0, i.e. J_syn only.
            Choose β on the scale of J_gen (official: J_gen ~ 1e4 at the start).
        lambda_: λ trade-off in J_gen (official 0.5).
        softmax_factor: scale of J_soft (official 1e4).
        use_generator: False for the hardness-aware-negatives-only mode.
        generator: custom generator module (maps [*, embedding_size] -> [*, feature_size]);
            default :func:`default_hdml_generator`.
        classifier: custom classifier (features -> logits); default ``Linear(feature_size,
            num_classes)``.
        generator_hidden_size: hidden width of the default generator (512).
        tuple_mode: ``"triplet"``, ``"npair"`` or ``"auto"`` (npair iff ``loss`` is an NPairsLoss).
            In npair mode every anchor is paired with all other positives as negatives (its own
            positive kept) and J_syn is the N-pair cross-entropy over each anchor's own synthetic
            candidate row, computed with ``loss.distance`` and reduced with ``loss.reducer``.
        synthesize: ``"all"`` (official code: anchors and positives are regenerated by the
            generator too, i.e. ỹ = G(z)) or ``"negatives"`` (only pulled negatives are
            synthetic; anchors/positives stay real). Ignored without a generator.
        synthetic_weight: fixed weight s of J_syn (J_metric = (1-s) J_m + s J_syn); ``None`` =
            adaptive ``1 - exp(-β/J_gen_avg)`` with a generator, 0.5 without.
        triplets_per_anchor: triplets synthesised when no tuples are given/mined; ``None`` = the
            wrapped loss's ``triplets_per_anchor`` if it has one, else ``"all"``.
        max_synthetic_tuples: cap on synthetic negatives per step; J_m still sees every tuple.
            Triplets: a random subset (the official code uses 40 per batch). N-pair (T anchors,
            T·(T-1) negatives): R = max(1, cap // (T-1)) random anchors keep their whole candidate
            rows, own positive as target (R·(T-1) negatives); at or below the cap nothing changes.
            Default 512, chosen side by side (README, HDML; FontGlyphs step / plain without and with
            it: Triplet, semi-hard mining, 1.29x / 1.12x; N-pair, 32 classes, 1.19x / 1.12x); ``None`` = no cap.
        average: ``"block"`` (official) or ``"ema"`` for J_avg and J_gen_avg.
        block_size: block length of the block average (official 64).
        ema_momentum: momentum of the ema option.
        initial_average: starting J_avg and J_gen_avg (official 1e6: no pull, w ≈ 1).
        javg_source: what feeds J_avg: ``"weighted"`` (official: ``w·J_m``) or ``"raw"`` (J_m);
            ``None`` = weighted with a generator, raw without.
        on_nonfinite: ``"raise"`` (default): a NaN/inf J_gen, J_metric or J_cls raises
            :class:`HDMLNonFiniteError` naming the term, its recent values and the usual cause.
            ``"skip"`` (the official code's behaviour): the batch gives a zero loss connected to
            the graph, the running averages are left alone, ``num_skipped_batches`` counts it and
            ``last_batch_skipped`` is True (Adam still moves the parameters on a zero-gradient
            step by its momentum; skip the optimiser step when that flag is set, as the trainer
            :class:`pml_ext.trainers.HardnessAwareDeepMetricLearning` does).

    Labels may be any integer dtype (int8 ... int64, uint8); they are used as int64.

    Recordable attributes (``_record_these``, read by record-keeper): J_m, J_syn, J_metric,
    J_gen, J_recon, J_soft, J_cls, J_avg, J_gen_avg, metric_weight (w), syn_weight (1-w or s),
    hardness_decay (exp(-α/J_avg)), pull_strength (1 - hardness_decay), mean_pull_coefficient
    (mean λ0 = ‖ẑ⁻ - z‖/‖z⁻ - z‖ over synthetic tuples; 1 = not pulled), fraction_pullable
    (share of tuples with d+ < d-, the ones the augmentor moves unless exp(-α/J_avg) = 1),
    num_synthetic_tuples, and the constants alpha, beta, lambda_, softmax_factor.

    Running averages are only updated in training mode and only on batches with at least one
    synthetic tuple (degenerate batches give a zero loss connected to the graph and leave the
    averages untouched).
    """

    TUPLE_MODES = ("auto", "triplet", "npair")
    SYNTHESIZE = ("all", "negatives")
    JAVG_SOURCES = ("weighted", "raw")
    ON_NONFINITE = ("raise", "skip")
    CHECKED_TERMS = ("J_gen", "J_metric", "J_cls")  # in the order their failures cause each other
    HISTORY = 8  # recent values shown in a non-finite error

    def __init__(
        self,
        loss: torch.nn.Module,
        embedding_size: Optional[int] = None,
        feature_size: Optional[int] = None,
        num_classes: Optional[int] = None,
        miner: Optional[torch.nn.Module] = None,
        alpha: float = 90.0,
        beta: float = 1e4,
        lambda_: float = 0.5,
        softmax_factor: float = 1e4,
        use_generator: bool = True,
        generator: Optional[torch.nn.Module] = None,
        classifier: Optional[torch.nn.Module] = None,
        generator_hidden_size: int = 512,
        tuple_mode: str = "auto",
        synthesize: str = "all",
        synthetic_weight: Optional[float] = None,
        triplets_per_anchor=None,
        max_synthetic_tuples: Optional[int] = DEFAULT_MAX_SYNTHETIC_TUPLES,
        average: str = "block",
        block_size: int = 64,
        ema_momentum: float = 0.99,
        initial_average: float = 1e6,
        javg_source: Optional[str] = None,
        on_nonfinite: str = "raise",
        **kwargs,
    ):
        super().__init__(**kwargs)
        # ---- validation
        # what the loss decides when these are left to it (also on a later ``hdml.loss = ...``)
        self._tuple_mode_arg, self._triplets_per_anchor_arg = tuple_mode, triplets_per_anchor
        tuple_mode, triplets_per_anchor = self._loss_settings(loss)
        if on_nonfinite not in self.ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {self.ON_NONFINITE}, got {on_nonfinite!r}")
        if miner is not None and (not callable(miner) or not isinstance(miner, torch.nn.Module)):
            raise ValueError(f"miner must be a PML miner (torch.nn.Module) or None, got {type(miner).__name__}")
        _check_nonneg("alpha", alpha)
        _check_nonneg("beta", beta)
        _check_nonneg("lambda_", lambda_, upper=1.0)
        _check_nonneg("softmax_factor", softmax_factor)
        if not isinstance(use_generator, bool):
            raise ValueError(f"use_generator must be a bool, got {use_generator!r}")
        if tuple_mode not in self.TUPLE_MODES:
            raise ValueError(f"tuple_mode must be one of {self.TUPLE_MODES}, got {tuple_mode!r}")
        if synthesize not in self.SYNTHESIZE:
            raise ValueError(f"synthesize must be one of {self.SYNTHESIZE}, got {synthesize!r}")
        if synthetic_weight is not None:
            _check_nonneg("synthetic_weight", synthetic_weight, upper=1.0)
        if javg_source is not None and javg_source not in self.JAVG_SOURCES:
            raise ValueError(f"javg_source must be one of {self.JAVG_SOURCES} or None, got {javg_source!r}")
        if max_synthetic_tuples is not None:
            _check_pos_int("max_synthetic_tuples", max_synthetic_tuples)
        if triplets_per_anchor is not None and triplets_per_anchor != "all":
            _check_pos_int("triplets_per_anchor", triplets_per_anchor)

        if use_generator:
            if generator is None:
                _check_pos_int("embedding_size", embedding_size)
                _check_pos_int("feature_size", feature_size)
                _check_pos_int("generator_hidden_size", generator_hidden_size)
                generator = default_hdml_generator(embedding_size, feature_size, generator_hidden_size)
            elif not isinstance(generator, torch.nn.Module):
                raise ValueError(f"generator must be a torch.nn.Module, got {type(generator).__name__}")
            if classifier is None:
                _check_pos_int("feature_size", feature_size)
                _check_pos_int("num_classes", num_classes)
                classifier = torch.nn.Linear(feature_size, num_classes)
            elif not isinstance(classifier, torch.nn.Module):
                raise ValueError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
        else:
            if generator is not None or classifier is not None:
                raise ValueError("use_generator=False (hardness-aware negatives only) takes no generator/classifier")
        if num_classes is not None:
            _check_pos_int("num_classes", num_classes)

        self.loss = loss
        self.miner = miner
        self.generator = generator
        self.classifier = classifier
        self.use_generator = use_generator
        self.num_classes = num_classes
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.lambda_ = float(lambda_)
        self.softmax_factor = float(softmax_factor)
        self.tuple_mode = tuple_mode
        self.synthesize = synthesize
        self.fixed_synthetic_weight = None if synthetic_weight is None else float(synthetic_weight)
        self.triplets_per_anchor = triplets_per_anchor
        self.max_synthetic_tuples = max_synthetic_tuples
        self.javg_source = javg_source if javg_source is not None else ("weighted" if use_generator else "raw")
        self.javg_tracker = RunningLossAverage(average, block_size, ema_momentum, initial_average)
        self.jgen_tracker = RunningLossAverage(average, block_size, ema_momentum, initial_average)
        self.on_nonfinite = on_nonfinite
        self.num_skipped_batches = 0
        self.last_batch_skipped = False
        self.history = _Unwalked({k: collections.deque(maxlen=self.HISTORY) for k in self.CHECKED_TERMS})

        self.add_to_recordable_attributes(list_of_names=["alpha", "beta", "lambda_", "softmax_factor"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=[
                "J_m", "J_syn", "J_metric", "J_gen", "J_recon", "J_soft", "J_cls",
                "J_avg", "J_gen_avg", "metric_weight", "syn_weight", "hardness_decay",
                "pull_strength", "mean_pull_coefficient", "fraction_pullable", "num_synthetic_tuples",
                "num_skipped_batches",
            ],
            is_stat=False,
        )
        self._set_records({})
        # record-keeper: hide the submodules (generator, classifier, running averages) from
        # HookContainer's recursive walk; show it the wrapped loss and miner (see _Unwalked)
        self.__dict__["_modules"] = _Unwalked(self._modules)
        self.__dict__["recorded_modules"] = {"loss": loss, "miner": miner}

    def __setattr__(self, name, value):
        settings = None
        if name == "loss" and "recorded_modules" in self.__dict__:  # a new wrapped loss after construction
            settings = self._loss_settings(value)
        super().__setattr__(name, value)
        if settings is not None:  # what "auto" / None resolve to follows the new loss
            self.tuple_mode, self.triplets_per_anchor = settings
        if name in ("loss", "miner") and "recorded_modules" in self.__dict__:
            self.__dict__["recorded_modules"][name] = value

    def _loss_settings(self, loss) -> Tuple[str, Any]:
        """Checks a wrapped loss; (tuple_mode, triplets_per_anchor) for it: ``tuple_mode="auto"``
        is "npair" for NPairsLoss, else "triplet"; ``triplets_per_anchor=None`` is the loss's own
        (or "all")."""
        if not callable(loss) or not isinstance(loss, torch.nn.Module):
            raise ValueError(f"loss must be a torch.nn.Module loss (e.g. a PML loss), got {type(loss).__name__}")
        _check_wrapped_loss(loss)
        tuple_mode = self._tuple_mode_arg
        if tuple_mode == "auto":
            tuple_mode = "npair" if isinstance(loss, NPairsLoss) else "triplet"
        if tuple_mode == "npair" and not (hasattr(loss, "distance") and hasattr(loss, "reducer")):
            raise ValueError("tuple_mode='npair' needs a PML loss with .distance and .reducer (e.g. NPairsLoss)")
        tpa = self._triplets_per_anchor_arg
        return tuple_mode, (getattr(loss, "triplets_per_anchor", "all") if tpa is None else tpa)

    # ---------------------------------------------------------------- public helpers
    @property
    def J_avg_value(self) -> float:
        return self.javg_tracker.read()

    @property
    def J_gen_avg_value(self) -> float:
        return self.jgen_tracker.read()

    def current_weights(self):
        """(metric_weight w, syn_weight) used by the next forward."""
        if self.fixed_synthetic_weight is not None:
            s = self.fixed_synthetic_weight
            return 1.0 - s, s
        if not self.use_generator:
            return 0.5, 0.5
        w = float(HA.adaptive_metric_weight(self.jgen_tracker.read(), self.beta))
        return w, 1.0 - w

    def param_groups(
        self,
        metric_params: Iterable[torch.nn.Parameter],
        metric_lr: float = 7e-5,
        generator_lr: float = 1e-2,
        classifier_lr: float = 1e-3,
        **group_kwargs,
    ) -> List[Dict]:
        """Optimiser parameter groups for the one-backward scheme: ``metric_params`` (backbone +
        embedder) plus the wrapped loss's own parameters at ``metric_lr``; generator at
        ``generator_lr``; classifier at ``classifier_lr`` (official lrs: 7e-5, 1e-2, 1e-3)."""
        metric, seen = [], set()
        for p in list(metric_params) + list(self.loss.parameters()):
            if id(p) not in seen:
                seen.add(id(p))
                metric.append(p)
        groups = [dict(params=metric, lr=metric_lr, **group_kwargs)]
        if self.use_generator:
            groups.append(dict(params=list(self.generator.parameters()), lr=generator_lr, **group_kwargs))
            groups.append(dict(params=list(self.classifier.parameters()), lr=classifier_lr, **group_kwargs))
        return groups

    # ---------------------------------------------------------------- forward
    def forward(self, features, labels, embedder: Callable, indices_tuple=None):
        """Returns a tensor whose value is J_metric and whose backward routes ∂J_metric to the
        backbone/embedder/loss parameters, ∂J_gen to the generator and ∂J_cls to the classifier
        (see class docstring)."""
        terms = self._compute(features, labels, embedder, indices_tuple, routed=True)
        out = terms["J_metric"]
        if self.use_generator:
            for k in ("J_gen", "J_cls"):  # zero-valued gradient carriers (cast: J_gen may be fp32 under fp16)
                out = out + (terms[k] - terms[k].detach()).to(out.dtype)
        return out

    def compute_terms(self, features, labels, embedder: Callable, indices_tuple=None, routed: bool = False,
                      miner: Optional[Callable] = None) -> Dict[str, torch.Tensor]:
        """The terms as a dict: J_m, J_syn, J_metric and, with a generator, J_recon, J_soft, J_gen,
        J_cls. Updates the running averages like ``forward`` (in training mode).

        ``routed=False`` (the plain graph, as in the official code): every term is connected to
        every parameter it depends on; restrict each backward to its own group yourself, e.g.
        ``torch.autograd.backward(terms["J_gen"], inputs=list(hdml.generator.parameters()))``.
        ``routed=True``: J_metric reaches only the backbone/embedder (and the wrapped loss),
        J_gen only the generator, J_cls only the classifier, so ``J_metric + J_gen + J_cls`` can
        be backpropagated at once (what the trainer does). ``miner`` overrides ``self.miner``."""
        return self._compute(features, labels, embedder, indices_tuple, routed=routed, miner=miner)

    # ---------------------------------------------------------------- internals
    def _set_records(self, rec):
        w, s = self.current_weights()
        defaults = {
            "J_m": 0.0, "J_syn": 0.0, "J_metric": 0.0, "J_gen": 0.0, "J_recon": 0.0, "J_soft": 0.0,
            "J_cls": 0.0, "J_avg": self.javg_tracker.read(), "J_gen_avg": self.jgen_tracker.read(),
            "metric_weight": w, "syn_weight": s,
            "hardness_decay": float(HA.hardness_decay(self.alpha, self.javg_tracker.read())),
            "mean_pull_coefficient": 1.0, "fraction_pullable": 0.0, "num_synthetic_tuples": 0,
        }
        defaults["pull_strength"] = 1.0 - defaults["hardness_decay"]
        defaults.update(rec)
        for k, v in defaults.items():
            setattr(self, k, v)

    def _nonfinite(self, terms: Dict[str, torch.Tensor]) -> Optional[str]:
        """Logs this batch's checked terms; returns the first non-finite one (None if all finite)."""
        values = {k: float(terms[k].detach()) for k in self.CHECKED_TERMS if k in terms}
        for k, v in values.items():
            self.history[k].append(v)
        return next((k for k, v in values.items() if not math.isfinite(v)), None)

    def _nonfinite_message(self, term: str, terms: Dict[str, torch.Tensor]) -> str:
        recent = ", ".join(f"{v:.4g}" for v in self.history[term])
        parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        causes = {
            "J_gen": "The generator's objective diverged. Usual cause: the generator's learning rate with a "
            "scale-sensitive optimiser. J_gen = J_recon + J_soft is ~1e4 times J_metric (softmax_factor "
            "1e4, summed reconstruction), so e.g. SGD at the official generator lr 1e-2 takes steps ~1e4 "
            "times too large; use Adam (scale-invariant, as the official code) or lower the generator's "
            "lr by about that factor.",
            "J_metric": "The metric loss on the real (J_m) or synthetic (J_syn) tuples is not finite. Usual "
            "cause: the generator diverged first (see J_gen's recent values) and fed non-finite synthetic "
            "features to the embedder, i.e. the generator's learning rate with a scale-sensitive optimiser "
            "(SGD); otherwise the backbone/embedder learning rate is too high for its optimiser.",
            "J_cls": "The softmax classifier's cross-entropy on real features diverged. Usual cause: the "
            "classifier's learning rate with a scale-sensitive optimiser (the official code uses Adam, lr 1e-3).",
        }
        return (f"HDML: {term} is {float(terms[term].detach())} on this batch (recent values, oldest first: "
                f"{recent}; all terms now: {parts}). {causes[term]} To skip such batches instead (the "
                "official code's behaviour), pass on_nonfinite='skip'.")

    def _compute(self, features, labels, embedder, indices_tuple, routed, miner=None):
        self.reset_stats()
        _check_batch(features, labels, embedder, self.use_generator, self.classifier, self.num_classes)
        labels = labels.to(device=features.device, dtype=torch.long)  # any integer width (CE needs int64)
        emb = embedder(features)
        if not torch.is_tensor(emb) or emb.dim() != 2 or emb.shape[0] != features.shape[0]:
            raise ValueError("embedder(features) must return a [batch, embedding_size] tensor")
        miner = self.miner if miner is None else miner
        if indices_tuple is None and miner is not None:
            indices_tuple = miner(emb, labels)

        j_avg = self.javg_tracker.read()
        w, s = self.current_weights()
        decay = float(HA.hardness_decay(self.alpha, j_avg))
        zero_emb = (emb * 0).sum()
        gen_params = list(self.generator.parameters()) if self.use_generator else []
        # synthetic tuples, J_syn and the generator's terms (hdml_synthetic_tuples.py); the pull
        # statistics start the records
        n_syn, j_syn, terms, rec = self._synthetic_terms(
            features, labels, emb, embedder, indices_tuple, routed, j_avg, zero_emb, gen_params
        )

        if self.use_generator:
            cls_in = features.detach() if routed else features
            terms["J_cls"] = tnf.cross_entropy(self.classifier(cls_in), labels)

        # J_m last so the wrapped loss's recorded stats describe the real batch
        j_m = self.loss(emb, labels) if indices_tuple is None else self.loss(emb, labels, indices_tuple)
        j_syn = j_syn if n_syn > 0 else zero_emb
        terms["J_m"] = j_m
        terms["J_syn"] = j_syn
        terms["J_metric"] = w * j_m + s * j_syn

        self.last_batch_skipped = False
        bad = self._nonfinite(terms)
        if bad is not None:
            if self.on_nonfinite == "raise":
                raise HDMLNonFiniteError(self._nonfinite_message(bad, terms))
            # skip the batch: zeros connected to the graph (features are finite: checked above)
            zero = (features * 0).sum()
            rec = {k: float(v.detach()) for k, v in terms.items()}
            self.num_skipped_batches += 1
            self._set_records(dict(rec, metric_weight=w, syn_weight=s, hardness_decay=decay,
                                   pull_strength=1.0 - decay, num_synthetic_tuples=n_syn))
            self.last_batch_skipped = True
            return {k: zero + _zero_from(gen_params, zero) if k in ("J_gen", "J_recon", "J_soft") else zero
                    for k in terms}

        # ---------------- running averages and records
        jm_val = float(j_m.detach())
        if self.training and n_syn > 0:
            self.javg_tracker.update(w * jm_val if self.javg_source == "weighted" else jm_val)
            if self.use_generator:
                self.jgen_tracker.update(float(terms["J_gen"].detach()))
        rec.update(
            J_m=jm_val,
            J_syn=float(j_syn.detach()),
            J_metric=float(terms["J_metric"].detach()),
            num_synthetic_tuples=n_syn,
        )
        for k in ("J_gen", "J_recon", "J_soft", "J_cls"):
            if k in terms:
                rec[k] = float(terms[k].detach())
        # the weights/decay actually used in this forward (averages may have just been updated)
        rec.update(metric_weight=w, syn_weight=s, hardness_decay=decay, pull_strength=1.0 - decay)
        self._set_records(rec)
        # J_avg / J_gen_avg records: values after the update (what the next forward will use)
        self.J_avg = self.javg_tracker.read()
        self.J_gen_avg = self.jgen_tracker.read()
        return terms
