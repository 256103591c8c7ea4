"""Hardness-Aware Deep Metric Learning (Zheng et al., CVPR 2019) as a pytorch-metric-learning trainer,
used like PML's ``trainers.DeepAdversarialMetricLearning`` (the generator is a model with its own
optimizer). The maths is :class:`pml_ext.losses.HDMLLoss`'s: the trainer runs one inside.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Iterable, Optional

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.trainers import BaseTrainer
from pytorch_metric_learning.utils.loss_tracker import LossTracker

from ..losses.hdml_loss import DEFAULT_MAX_SYNTHETIC_TUPLES, HDMLLoss, _check_pos_int, default_hdml_generator

__all__ = ["HardnessAwareDeepMetricLearning"]

# what each optimiser minimises (loss_weights apply to these; total_loss is their weighted sum)
OBJECTIVES = ("J_metric", "J_gen", "J_cls")
# logged alongside in loss_histories, never summed or weighted
DIAGNOSTICS = ("J_m", "J_syn", "J_recon", "J_soft", "J_avg", "J_gen_avg", "metric_weight")
# the official code's learning rates (Adam): backbone + embedding head, generator, classifier
OFFICIAL_LRS = {"trunk": 7e-5, "embedder": 7e-5, "generator": 1e-2, "classifier": 1e-3}
MODEL_KEYS = ("trunk", "embedder", "generator", "classifier")
LOSS_KEYS = ("metric_loss", "hdml")  # "hdml" is built by the trainer
SCHEDULER_SUFFIXES = ("_scheduler_by_iteration", "_scheduler_by_epoch", "_scheduler_by_plateau")
# HDMLLoss arguments the trainer sets itself (its own arguments, models, mining_funcs)
_OWNED_HDML_ARGS = ("loss", "embedding_size", "feature_size", "num_classes", "generator", "classifier",
                    "generator_hidden_size", "alpha", "beta", "lambda_", "softmax_factor", "max_synthetic_tuples",
                    "on_nonfinite", "miner", "use_generator")


def _hdml_option_names():
    names = [n for n in inspect.signature(HDMLLoss.__init__).parameters if n not in ("self", "kwargs")]
    return tuple(n for n in names if n not in _OWNED_HDML_ARGS) + ("collect_stats",)


def _check_keys(what: str, given: Optional[Iterable[str]], allowed: Iterable[str]) -> None:
    """PML's KeyChecker rule (a key must start with an allowed name), as a ValueError."""
    allowed = tuple(allowed)
    for k in given or ():
        if not isinstance(k, str) or not k.startswith(allowed):
            raise ValueError(f"{what} key {k!r} is not one this trainer uses; allowed: {', '.join(allowed)}")


def _check_arguments(models, optimizers, batch_size, loss_funcs, kwargs, hdml_options, sizes) -> None:
    """Every argument error as a ValueError naming the argument, before anything is built."""
    if not isinstance(models, dict) or "trunk" not in models:
        raise ValueError('models must be a dict with at least "trunk" (and optionally "embedder", '
                         '"generator", "classifier")')
    _check_keys("models", models, MODEL_KEYS)
    for k, m in models.items():
        if not isinstance(m, torch.nn.Module):
            raise ValueError(f"models[{k!r}] must be a torch.nn.Module, got {type(m).__name__}")
    if not isinstance(loss_funcs, dict) or "metric_loss" not in loss_funcs:
        raise ValueError('loss_funcs must be a dict with "metric_loss" (a PML tuple loss)')
    if "hdml" in loss_funcs:
        raise ValueError('loss_funcs["hdml"] is built by the trainer from loss_funcs["metric_loss"]; pass HDML '
                         "settings as the trainer's arguments or hdml_options")
    _check_keys("loss_funcs", loss_funcs, LOSS_KEYS)
    if not isinstance(loss_funcs["metric_loss"], BaseMetricLossFunction):
        raise ValueError('loss_funcs["metric_loss"] must be a PML loss (BaseMetricLossFunction: Triplet, N-pair, '
                         f"Contrastive, MS, ...), got {type(loss_funcs['metric_loss']).__name__}")
    if optimizers is not None:
        if not isinstance(optimizers, dict):
            raise ValueError("optimizers must be a dict of PML-named optimizers (trunk_optimizer, ...) or None")
        _check_keys("optimizers", optimizers, [f"{k}_optimizer" for k in MODEL_KEYS + LOSS_KEYS])
        for k, o in optimizers.items():
            if not (callable(getattr(o, "step", None)) and callable(getattr(o, "zero_grad", None))):
                raise ValueError(f"optimizers[{k!r}] must be an optimizer (step, zero_grad), got {type(o).__name__}")
    _check_pos_int("batch_size", batch_size)
    _check_keys("mining_funcs", kwargs.get("mining_funcs"), ("subset_batch_miner", "tuple_miner"))
    _check_keys("lr_schedulers", kwargs.get("lr_schedulers"),
                [k + s for s in SCHEDULER_SUFFIXES for k in MODEL_KEYS + LOSS_KEYS])
    _check_keys("gradient_clippers", kwargs.get("gradient_clippers"),
                [f"{k}_grad_clipper" for k in MODEL_KEYS + LOSS_KEYS])
    freeze = kwargs.get("freeze_these", ())
    if isinstance(freeze, str):
        raise ValueError(f"freeze_these must be a list or tuple of names, not the string {freeze!r}")
    for k in freeze:
        if k not in MODEL_KEYS + LOSS_KEYS:
            raise ValueError(f"freeze_these entry {k!r} is not one of {', '.join(MODEL_KEYS + LOSS_KEYS)}")
    weights = kwargs.get("loss_weights")
    if weights is not None:
        if not isinstance(weights, dict) or set(weights) != set(OBJECTIVES):
            raise ValueError(f"loss_weights must give all of {', '.join(OBJECTIVES)} (as PML requires), got "
                             f"{sorted(weights) if isinstance(weights, dict) else weights!r}")
        for k, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"loss_weights[{k!r}] must be a finite number, got {w!r}")
    if hdml_options is not None:
        if not isinstance(hdml_options, dict):
            raise ValueError(f"hdml_options must be a dict of HDMLLoss keywords, got {type(hdml_options).__name__}")
        for k in hdml_options:
            if k in _OWNED_HDML_ARGS:
                raise ValueError(f"hdml_options[{k!r}]: set {k} through the trainer (its own argument, models or "
                                 "mining_funcs), not hdml_options")
            if k not in _hdml_option_names():
                raise ValueError(f"hdml_options[{k!r}] is not an HDMLLoss option; options: "
                                 f"{', '.join(_hdml_option_names())}")
    for name in ("embedding_size", "feature_size", "num_classes"):
        if sizes[name] is not None:  # None: taken from the models
            _check_pos_int(name, sizes[name])
    _check_pos_int("generator_hidden_size", sizes["generator_hidden_size"])


class _TermTracker(LossTracker):
    """PML's LossTracker over the three objectives, with HDML's diagnostics kept in the same
    ``losses`` dict (so HookContainer logs them to ``loss_histories``) but out of the weighting
    and out of ``total_loss``."""

    def __init__(self, objectives, diagnostics):
        super().__init__(objectives)
        self.diagnostics = tuple(diagnostics)
        self.losses.update({k: 0 for k in self.diagnostics})

    def update(self, loss_weight_dict):
        for k in self.loss_weights:
            self.loss_weights[k] = loss_weight_dict.get(k, 1.0)
        skip = ("total_loss",) + self.diagnostics
        self.weight_the_losses(exclude_loss=skip)
        self.get_total_loss(exclude_loss=skip)


def _sizes_from_embedder(embedder: torch.nn.Module):
    """(feature_size, embedding_size) when the embedder shows them (a Linear or no embedder)."""
    if isinstance(embedder, torch.nn.Linear):
        return embedder.in_features, embedder.out_features
    return None, None


class HardnessAwareDeepMetricLearning(BaseTrainer):
    r"""HDML (Zheng, Chen, Lu, Zhou, CVPR 2019) as a PML trainer, used like
    ``trainers.DeepAdversarialMetricLearning``.

    Per iteration: ``features = trunk(data)``; the trunk's features, the labels and the
    ``embedder`` go through HDML (:class:`pml_ext.losses.HDMLLoss`, paper Eq. 6-13): tuples from
    ``mining_funcs["tuple_miner"]`` (or the loss's default), negatives pulled toward their
    anchors by ``exp(-alpha/J_avg)``, mapped back to feature space by the ``generator`` and
    re-embedded by the same ``embedder``. Three objectives, each reaching only its own models
    through one ``total_loss.backward()``:

    - ``J_metric = w·J_m + (1-w)·J_syn``, ``w = exp(-beta/J_gen_avg)`` -> trunk, embedder (and
      ``metric_loss``'s own parameters);
    - ``J_gen = J_recon + J_soft`` -> generator;
    - ``J_cls`` = cross-entropy of ``classifier(features)`` -> classifier (note: HDML's classifier
      reads the trunk's *features*, unlike TrainWithClassifier's, which reads embeddings).

    ``total_loss`` is their ``loss_weights``-weighted sum (its value is dominated by J_gen ~1e4).

    Args (besides BaseTrainer's: batch_size, dataset, mining_funcs, iterations_per_epoch,
    data_device, dtype, sampler, collate_fn, lr_schedulers, gradient_clippers, freeze_these,
    freeze_trunk_batchnorm, label_hierarchy_level, dataloader_num_workers, data_and_label_getter,
    dataset_labels, set_min_label_to_zero, end_of_iteration_hook, end_of_epoch_hook):
        models: ``{"trunk", "embedder", "generator", "classifier"}``; ``"trunk"`` is required.
            Without ``"generator"`` the paper's (embedding -> Linear(generator_hidden_size) ->
            ReLU -> BatchNorm -> Linear(feature_size)) is built; without ``"classifier"``
            ``Linear(feature_size, num_classes)``; both on the trunk's device and dtype.
        optimizers: ``{"trunk_optimizer", "embedder_optimizer", "generator_optimizer",
            "classifier_optimizer"}`` (PML's names) or None. Missing generator/classifier
            optimizers, and all four when ``optimizers=None``, are Adam at the official learning
            rates (:data:`OFFICIAL_LRS`: 7e-5 for trunk and embedder, 1e-2 generator, 1e-3
            classifier). The generator's objective is ~1e4 times the metric loss: use a
            scale-invariant optimiser (Adam) for it, or scale its lr down.
        loss_funcs: ``{"metric_loss": any PML tuple loss}`` (Triplet, N-pair, Contrastive, MS,
            ...). The trainer adds ``loss_funcs["hdml"]``, the :class:`HDMLLoss` it runs: its
            running J_avg / J_gen are buffers, so PML's HookContainer saves and resumes them with
            the other ``loss_funcs``.
        loss_weights: optional ``{"J_metric", "J_gen", "J_cls"}`` (all three, as PML requires).
        embedding_size, feature_size: needed for the default generator/classifier unless the
            embedder is an ``nn.Linear`` (then read from it).
        num_classes: training classes, for the default classifier (labels must lie in
            ``[0, num_classes)``; PML's ``set_min_label_to_zero`` helps).
        alpha, beta, lambda\_, softmax_factor, max_synthetic_tuples, on_nonfinite: as in
            :class:`HDMLLoss` (official 90, 1e4, 0.5, 1e4; cap 512 synthetic negatives, triplet and
            N-pair mode; ``"raise"``). With ``on_nonfinite="skip"`` a non-finite batch steps no optimiser.
        generator_hidden_size: hidden width of the default generator (512).
        hdml_options: any other :class:`HDMLLoss` keyword (``synthesize``, ``tuple_mode``,
            ``average``, ``block_size``, ``initial_average``, ``javg_source``,
            ``synthetic_weight``, ``triplets_per_anchor``, ...).

    ``loss_histories`` (``trainer.losses``, what HookContainer logs) holds J_metric, J_gen,
    J_cls, total_loss and, unweighted, J_m, J_syn, J_recon, J_soft, J_avg, J_gen_avg and
    metric_weight.

    Like PML's trainers, it reads ``models`` and ``loss_funcs`` every iteration: reassigning
    ``loss_funcs["metric_loss"]`` (``tuple_mode="auto"`` follows the new loss), ``models["generator"]``
    or ``models["classifier"]`` takes effect at the next step. Argument errors (unknown dict keys,
    a non-PML ``metric_loss``, sizes that disagree with the embedder, ``hdml_options`` that are not
    HDMLLoss options or that duplicate the trainer's own arguments) are ValueErrors naming the
    argument, also under ``python -O`` (PML's own key checks are asserts).
    """

    def __init__(
        self,
        models: Dict[str, torch.nn.Module],
        optimizers: Optional[Dict[str, torch.optim.Optimizer]],
        batch_size: int,
        loss_funcs: Dict[str, torch.nn.Module],
        dataset,
        *,
        alpha: float = 90.0,
        beta: float = 1e4,
        lambda_: float = 0.5,
        softmax_factor: float = 1e4,
        max_synthetic_tuples: Optional[int] = DEFAULT_MAX_SYNTHETIC_TUPLES,
        on_nonfinite: str = "raise",
        embedding_size: Optional[int] = None,
        feature_size: Optional[int] = None,
        num_classes: Optional[int] = None,
        generator_hidden_size: int = 512,
        hdml_options: Optional[Dict[str, Any]] = None,
        **kwargs,
    ):
        self._sizes = dict(embedding_size=embedding_size, feature_size=feature_size, num_classes=num_classes,
                           generator_hidden_size=generator_hidden_size)
        _check_arguments(models, optimizers, batch_size, loss_funcs, kwargs, hdml_options, self._sizes)
        self._hdml_args = dict(
            hdml_options or {}, alpha=alpha, beta=beta, lambda_=lambda_, softmax_factor=softmax_factor,
            max_synthetic_tuples=max_synthetic_tuples, on_nonfinite=on_nonfinite,
        )
        self._optimizers_given = optimizers is not None
        super().__init__(models, {} if optimizers is None else optimizers, batch_size, loss_funcs, dataset,
                         **kwargs)

    # ------------------------------------------------------------------ setup
    def custom_setup(self):
        models = self.models
        models.setdefault("embedder", torch.nn.Identity())
        ref = next(iter(models["trunk"].parameters()), None)
        place = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        if "generator" not in models or "classifier" not in models:
            feat, emb = self._default_sizes()
            if "generator" not in models:
                models["generator"] = default_hdml_generator(
                    emb, feat, self._sizes["generator_hidden_size"]).to(**place)
            if "classifier" not in models:
                n = self._sizes["num_classes"]
                if n is None:
                    raise ValueError("num_classes is needed to build the default HDML classifier "
                                     "(Linear(feature_size, num_classes)); pass it or models['classifier']")
                models["classifier"] = torch.nn.Linear(feat, n).to(**place)
        for name, model in models.items():
            frozen = name in self.freeze_these
            wanted = name in ("generator", "classifier") or not self._optimizers_given
            params = [p for p in model.parameters() if p.requires_grad]
            if f"{name}_optimizer" not in self.optimizers and wanted and params and not frozen:
                self.optimizers[f"{name}_optimizer"] = torch.optim.Adam(params, lr=OFFICIAL_LRS.get(name, 7e-5))
        self.loss_funcs["hdml"] = HDMLLoss(
            self.loss_funcs["metric_loss"], generator=models["generator"], classifier=models["classifier"],
            num_classes=self._sizes["num_classes"], **self._hdml_args,
        )
        self.loss_names = list(OBJECTIVES)

    def _default_sizes(self):
        feat, emb = self._sizes["feature_size"], self._sizes["embedding_size"]
        seen_feat, seen_emb = _sizes_from_embedder(self.models["embedder"])
        for name, given, seen in (("feature_size", feat, seen_feat), ("embedding_size", emb, seen_emb)):
            if given is not None and seen is not None and given != seen:
                raise ValueError(f"{name}={given} but models['embedder'] is {self.models['embedder']} "
                                 f"({name} {seen}); leave {name} out or make them agree")
        if isinstance(self.models["embedder"], torch.nn.Identity):
            if feat is not None and emb is not None and feat != emb:
                raise ValueError(f"feature_size={feat} and embedding_size={emb} differ, but there is no embedder "
                                 "(the embeddings are the trunk's features)")
            feat = feat if feat is not None else emb
            emb = emb if emb is not None else feat
        feat = feat if feat is not None else seen_feat
        emb = emb if emb is not None else seen_emb
        if feat is None or emb is None:
            raise ValueError("the default HDML generator and classifier need feature_size (the trunk's output "
                             "size) and embedding_size (the embedder's); pass them, or models['generator'] "
                             "and models['classifier']")
        return feat, emb

    def verify_dict_keys(self):
        """PML's schema check, its AssertionErrors as ValueErrors (``__init__`` checked the keys
        already, also under ``python -O``)."""
        try:
            super().verify_dict_keys()
        except AssertionError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None

    def modify_schema(self):
        self.schema["models"].keys += ["generator", "classifier"]
        self.schema["models"].essential += ["generator", "classifier"]
        self.schema["loss_funcs"].keys += ["hdml"]
        self.schema["loss_funcs"].essential += ["metric_loss"]

    def initialize_loss_tracker(self):
        self.loss_tracker = _TermTracker(self.loss_names, DIAGNOSTICS)
        self.losses = self.loss_tracker.losses

    # ------------------------------------------------------------------ training step
    def calculate_loss(self, curr_batch):
        data, labels = curr_batch
        features = self.get_trunk_output(data)
        hdml = self._synced_hdml()
        terms = hdml.compute_terms(features, labels, self.get_final_embeddings, routed=True,
                                   miner=self.mining_funcs.get("tuple_miner"))
        for k in OBJECTIVES:
            self.losses[k] = terms[k]
        for k in DIAGNOSTICS:
            self.losses[k] = float(getattr(hdml, k))

    def _synced_hdml(self) -> HDMLLoss:
        """``loss_funcs["hdml"]`` using the current ``loss_funcs["metric_loss"]``, ``models["generator"]``
        and ``models["classifier"]``: like PML's trainers, this one reads its dicts every iteration,
        so reassigning an entry takes effect at the next step (give a new model its optimizer, as
        in PML)."""
        hdml = self.loss_funcs["hdml"]
        current = {"loss": self.loss_funcs["metric_loss"], "generator": self.models["generator"],
                   "classifier": self.models["classifier"]}
        for attr, obj in current.items():
            if getattr(hdml, attr) is not obj:
                if attr == "loss" and not isinstance(obj, BaseMetricLossFunction):
                    raise ValueError('loss_funcs["metric_loss"] must be a PML loss (BaseMetricLossFunction), '
                                     f"got {type(obj).__name__}")
                setattr(hdml, attr, obj)  # HDMLLoss checks a new loss and re-resolves tuple_mode="auto"
        return hdml

    def step_optimizers(self):
        if self.loss_funcs["hdml"].last_batch_skipped:  # on_nonfinite="skip": no step at all
            return
        super().step_optimizers()

    def set_to_train(self):
        super().set_to_train()
        for name in self.freeze_these:  # loss_funcs["hdml"].train() re-enabled its submodules
            if name in self.models:
                self.models[name].eval()
