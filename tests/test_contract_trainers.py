"""One contract, every public trainer, timm-style: construction errors are ValueErrors naming the
argument; PML's HookContainer + record-keeper log, test and resume it; reassigned dict entries
take effect at the next step; degenerate batches give finite, well-defined losses; bad batches
are clear errors; PML's dtype / label / freeze / scheduler options work. The tests PML's own
trainers must pass as well run over them as references (WITH_PML): they ask of ours only what
PML's trainers guarantee."""
import math
import sqlite3

import pytest
import torch
from pytorch_metric_learning import losses, miners, testers, trainers
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import logging_presets
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_ext.losses import HDMLLoss
from pml_ext.trainers import HardnessAwareDeepMetricLearning

TRAINERS = {"HardnessAwareDeepMetricLearning": HardnessAwareDeepMetricLearning}
OURS = list(TRAINERS)
WITH_PML = ["MetricLossOnly", "TrainWithClassifier"] + OURS
T_IN, T_FEAT, T_EMB, T_C = 10, 12, 6, 5
CPU = torch.device("cpu")
# models a reassignment must reach at the next iteration (PML's trainers read their dicts each time)
SWAPPABLE = {"MetricLossOnly": ["embedder"], "TrainWithClassifier": ["embedder", "classifier"],
             "HardnessAwareDeepMetricLearning": ["embedder", "generator", "classifier"]}


def trainer_models(seed=0):
    torch.manual_seed(seed)
    return {"trunk": torch.nn.Sequential(torch.nn.Linear(T_IN, T_FEAT), torch.nn.ReLU()),
            "embedder": torch.nn.Linear(T_FEAT, T_EMB)}


def trainer_data(labels=None, seed=1):
    y = torch.arange(T_C).repeat_interleave(4) if labels is None else torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T_C, T_IN, generator=g)[y % T_C] + 0.5 * torch.randn(len(y), T_IN, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def make_trainer(name, models=None, dataset=None, **kw):
    """``name`` with a Triplet loss + miner, Adam optimisers, a sequential sampler, on the CPU."""
    models = trainer_models() if models is None else models
    dataset = trainer_data() if dataset is None else dataset
    kw.setdefault("batch_size", 8)
    kw.setdefault("loss_funcs", {"metric_loss": losses.TripletMarginLoss(margin=0.1)})
    kw.setdefault("mining_funcs", {"tuple_miner": miners.TripletMarginMiner(margin=0.1, type_of_triplets="all")})
    kw.update(dataset=dataset, dataloader_num_workers=0, data_device=CPU,
              sampler=torch.utils.data.SequentialSampler(range(len(dataset))))
    if name in TRAINERS:
        kw.setdefault("num_classes", T_C)
        kw.setdefault("alpha", 0.05)
        return TRAINERS[name](models=models, optimizers=kw.pop("optimizers", None), **kw)
    if name == "TrainWithClassifier":
        models["classifier"] = torch.nn.Linear(T_EMB, T_C).to(next(models["trunk"].parameters()).dtype)
        kw["loss_funcs"] = dict(kw["loss_funcs"], classifier_loss=torch.nn.CrossEntropyLoss())
    opts = {f"{k}_optimizer": torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    return getattr(trainers, name)(models=models, optimizers=kw.pop("optimizers", opts), **kw)


def one_step(trainer):
    """BaseTrainer.train's set-up, then one iteration."""
    if not hasattr(trainer, "dataloader_iter"):
        trainer.initialize_dataloader()
        trainer.epoch, trainer.iteration = 1, 0
    trainer.set_to_train()
    trainer.forward_and_backward()
    return {k: float(v) for k, v in trainer.losses.items()}


BAD_TRAINER_ARGS = [
    ("models-typo", lambda kw: kw["models"].update(genrator=torch.nn.Linear(T_EMB, T_FEAT)), "models key 'genrator'"),
    ("models-not-module", lambda kw: kw["models"].update(embedder="linear"), r"models\['embedder'\]"),
    ("no-trunk", lambda kw: kw["models"].pop("trunk"), "trunk"),
    ("metric-loss-not-pml", lambda kw: kw.update(loss_funcs={"metric_loss": torch.nn.MSELoss()}), "PML loss"),
    ("loss-funcs-typo", lambda kw: kw["loss_funcs"].update(classifier_loss=torch.nn.CrossEntropyLoss()),
     "loss_funcs key 'classifier_loss'"),
    ("hdml-given", lambda kw: kw["loss_funcs"].update(hdml=HDMLLoss(losses.TripletMarginLoss(), num_classes=T_C,
                                                                   embedding_size=T_EMB, feature_size=T_FEAT)),
     r'loss_funcs\["hdml"\] is built by the trainer'),
    ("optimizer-typo", lambda kw: kw.update(optimizers={"trunk_optimiser": torch.optim.SGD(
        kw["models"]["trunk"].parameters(), lr=0.1)}), "optimizers key 'trunk_optimiser'"),
    ("optimizer-not-optimizer", lambda kw: kw.update(optimizers={"trunk_optimizer": 0.1}),
     r"optimizers\['trunk_optimizer'\] must be an optimizer"),
    ("miner-typo", lambda kw: kw.update(mining_funcs={"tuple_mine": miners.TripletMarginMiner()}),
     "mining_funcs key 'tuple_mine'"),
    ("loss-weights-partial", lambda kw: kw.update(loss_weights={"J_metric": 1.0}), "loss_weights must give all"),
    ("loss-weights-nan", lambda kw: kw.update(loss_weights={"J_metric": 1.0, "J_gen": float("nan"), "J_cls": 1.0}),
     r"loss_weights\['J_gen'\] must be a finite number"),
    ("freeze-typo", lambda kw: kw.update(freeze_these=("generater",)), "freeze_these entry 'generater'"),
    ("freeze-string", lambda kw: kw.update(freeze_these="generator"), "freeze_these must be a list"),
    ("scheduler-typo", lambda kw: kw.update(lr_schedulers={"trunk_scheduler": None}),
     "lr_schedulers key 'trunk_scheduler'"),
    ("clipper-typo", lambda kw: kw.update(gradient_clippers={"trunk_clipper": None}),
     "gradient_clippers key 'trunk_clipper'"),
    ("batch-size-0", lambda kw: kw.update(batch_size=0), "batch_size must be a positive int"),
    ("num-classes-float", lambda kw: kw.update(num_classes=2.5), "num_classes must be a positive int"),
    ("num-classes-bool", lambda kw: kw.update(num_classes=True), "num_classes must be a positive int"),
    ("embedding-size-0", lambda kw: kw.update(embedding_size=0), "embedding_size must be a positive int"),
    ("embedding-size-disagrees", lambda kw: kw.update(embedding_size=T_EMB + 1), "embedding_size=7 but"),
    ("feature-size-disagrees", lambda kw: kw.update(feature_size=T_FEAT + 1), "feature_size=13 but"),
    ("identity-sizes-differ", lambda kw: (kw["models"].pop("embedder"), kw.update(feature_size=T_FEAT,
                                                                                   embedding_size=T_EMB)),
     "differ, but there is no embedder"),
    ("hidden-size-float", lambda kw: kw.update(generator_hidden_size=1.5), "generator_hidden_size must be"),
    ("hdml-options-not-dict", lambda kw: kw.update(hdml_options=[("block_size", 2)]), "hdml_options must be a dict"),
    ("hdml-options-unknown", lambda kw: kw.update(hdml_options={"blok_size": 2}),
     r"hdml_options\['blok_size'\] is not an HDMLLoss option"),
    ("hdml-options-duplicate", lambda kw: kw.update(hdml_options={"alpha": 3.0}),
     r"hdml_options\['alpha'\]: set alpha through the trainer"),
    ("alpha-negative", lambda kw: kw.update(alpha=-1.0), "alpha must be"),
    ("on-nonfinite", lambda kw: kw.update(on_nonfinite="ignore"), "on_nonfinite"),
]


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("case", [c[1:] for c in BAD_TRAINER_ARGS], ids=[c[0] for c in BAD_TRAINER_ARGS])
def test_trainer_bad_arguments_are_named_value_errors(name, case):
    mutate, match = case
    kw = {"models": trainer_models(), "loss_funcs": {"metric_loss": losses.TripletMarginLoss(margin=0.1)}}
    mutate(kw)
    with pytest.raises(ValueError, match=match):
        make_trainer(name, **kw)


@pytest.mark.parametrize("name", WITH_PML)
def test_trainer_composes_with_hookcontainer_and_record_keeper(tmp_path, name):
    """PML's logging preset: every entry of trainer.losses logged per iteration and finite, the
    loss_funcs' records in their tables, the tester run per epoch, and a resume that restores every
    model, optimiser and loss_funcs state."""
    record_keeper = pytest.importorskip("record_keeper")
    rk = record_keeper.RecordKeeper(record_writer=record_keeper.RecordWriter(str(tmp_path / "logs")),
                                    attributes_to_search_for=c_f.list_of_recordable_attributes_list_names())
    hooks = logging_presets.HookContainer(rk, primary_metric="precision_at_1", validation_split_name="val",
                                          log_freq=1)
    tester = testers.GlobalEmbeddingSpaceTester(end_of_testing_hook=hooks.end_of_testing_hook, batch_size=8,
                                                dataloader_num_workers=0, data_device=CPU,
                                                accuracy_calculator=AccuracyCalculator(include=("precision_at_1",), k=1))
    folder = str(tmp_path / "models")
    end_of_epoch = hooks.end_of_epoch_hook(tester, {"val": trainer_data(seed=2)}, folder, test_interval=1)
    trainer = make_trainer(name, iterations_per_epoch=2, end_of_iteration_hook=hooks.end_of_iteration_hook,
                           end_of_epoch_hook=end_of_epoch, lr_schedulers={})
    trainer.train(num_epochs=2)
    names = list(trainer.loss_tracker.losses)
    assert "total_loss" in names and set(trainer.loss_names) <= set(names)
    hist = hooks.get_loss_history(names)
    assert set(hist) == set(names)
    assert all(len(hist[k]) == 4 and all(math.isfinite(v) for v in hist[k]) for k in names), hist
    rk.save_records()
    with sqlite3.connect(tmp_path / "logs" / "logs.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for key, fn in trainer.loss_funcs.items():
        if getattr(fn, "_record_these", None):
            assert f"{key}_{type(fn).__name__}" in tables, (key, tables)
    assert hooks.get_accuracy_history(tester, "val", return_all_metrics=True)["epoch"] == [1, 2]

    fresh = make_trainer(name, models=trainer_models(seed=99))
    assert hooks.load_latest_saved_models(fresh, folder, device=CPU) == 3
    for attr in ("models", "optimizers", "loss_funcs"):
        old, new = getattr(trainer, attr), getattr(fresh, attr)
        assert set(old) == set(new), attr
        for k in old:
            a, b = old[k].state_dict(), new[k].state_dict()
            if attr == "optimizers":
                a, b = a["state"], b["state"]
                a, b = {i: s.get("exp_avg") for i, s in a.items()}, {i: s.get("exp_avg") for i, s in b.items()}
            assert set(a) == set(b), (attr, k)
            assert all(torch.equal(a[i], b[i]) for i in a), (attr, k)


@pytest.mark.parametrize("name", WITH_PML)
def test_trainer_reads_its_dicts_every_iteration(name):
    """Reassigning loss_funcs["metric_loss"], a model or loss_weights takes effect at the next step."""

    class Counted(losses.TripletMarginLoss):
        calls = 0

        def forward(self, *args, **kwargs):
            type(self).calls += 1
            return super().forward(*args, **kwargs)

    # margins of 1 so that every batch has violating triplets: the metric loss reaches the embedder
    trainer = make_trainer(name, loss_funcs={"metric_loss": losses.TripletMarginLoss(margin=1.0)},
                           mining_funcs={"tuple_miner": miners.TripletMarginMiner(margin=1.0)})
    one_step(trainer)
    trainer.loss_funcs["metric_loss"] = Counted(margin=1.0)
    new = {}
    for k in SWAPPABLE[name]:
        old = trainer.models[k]
        new[k] = torch.nn.Linear(old.in_features, old.out_features) if isinstance(old, torch.nn.Linear) else \
            torch.nn.Sequential(torch.nn.Linear(T_EMB, 8), torch.nn.Tanh(), torch.nn.Linear(8, T_FEAT))
        trainer.models[k] = new[k]
    out = one_step(trainer)
    assert Counted.calls >= 1 and math.isfinite(out["total_loss"])
    for k, m in new.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), k
    # loss weights: every objective but the first weighted 0, so total_loss is the first alone
    first = trainer.loss_names[0]
    trainer.loss_weights = {k: (1.0 if k == first else 0.0) for k in trainer.loss_weights}
    out = one_step(trainer)
    assert out["total_loss"] == pytest.approx(out[first], rel=1e-6) and out[first] != 0
    if name in OURS:  # tuple_mode="auto" follows a new loss
        hdml = trainer.loss_funcs["hdml"]
        assert hdml.loss is trainer.loss_funcs["metric_loss"] and hdml.tuple_mode == "triplet"
        trainer.mining_funcs.clear()
        trainer.loss_funcs["metric_loss"] = losses.NPairsLoss()
        out = one_step(trainer)
        assert hdml.tuple_mode == "npair" and hdml.num_synthetic_tuples > 0 and math.isfinite(out["J_syn"])
        trainer.loss_funcs["metric_loss"] = torch.nn.MSELoss()
        with pytest.raises(ValueError, match="PML loss"):
            one_step(trainer)


DEGENERATE_LABELS = [
    pytest.param([3] * 6, id="one-class"),
    pytest.param([0, 1, 2, 3, 4], id="singletons"),
    pytest.param([2], id="one-sample"),
    pytest.param([0, 0, 1], id="one-pair-and-one"),
    pytest.param([0, 0, 0, 1, 1, 2], id="odd-counts"),
]
TRAINER_LOSSES = {
    "triplet": lambda: ({"metric_loss": losses.TripletMarginLoss(margin=0.1)},
                        {"tuple_miner": miners.TripletMarginMiner(margin=0.1, type_of_triplets="all")}),
    "npair": lambda: ({"metric_loss": losses.NPairsLoss()}, {}),
    "contrastive": lambda: ({"metric_loss": losses.ContrastiveLoss()}, {}),
}


@pytest.mark.parametrize("name", WITH_PML)
@pytest.mark.parametrize("loss", list(TRAINER_LOSSES))
@pytest.mark.parametrize("labels", DEGENERATE_LABELS)
def test_trainer_degenerate_batches_are_finite_and_well_defined(name, loss, labels):
    """One class, singleton classes, one sample: every logged term finite, gradients finite; for
    HDML, J_m is the plain loss on the batch and, with no synthetic tuple, J_syn = J_gen = 0."""
    loss_funcs, mining_funcs = TRAINER_LOSSES[loss]()
    ds = trainer_data(labels)
    trainer = make_trainer(name, dataset=ds, batch_size=len(labels), loss_funcs=loss_funcs, mining_funcs=mining_funcs)
    models = {k: m for k, m in trainer.models.items()}
    x, y = ds.tensors
    with torch.no_grad():
        emb = models["embedder"](models["trunk"](x))  # before the step moves the weights
    miner = mining_funcs.get("tuple_miner")
    plain = loss_funcs["metric_loss"](emb, y, None if miner is None else miner(emb, y))
    out = one_step(trainer)
    assert all(math.isfinite(v) for v in out.values()), out
    for k, m in models.items():
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters()), k
    if name in OURS:
        hdml = trainer.loss_funcs["hdml"]
        assert out["J_m"] == pytest.approx(plain.item(), rel=1e-5, abs=1e-7)
        if hdml.num_synthetic_tuples == 0:
            assert out["J_syn"] == 0 and out["J_gen"] == 0
        assert out["J_cls"] > 0


@pytest.mark.parametrize("name", OURS)
def test_trainer_bad_batches_are_clear_errors(name):
    cases = [([0, 0, T_C, T_C], r"labels must lie in \[0, 5\)"), ([-1, -1, 0, 0], r"labels must lie in \[0, 5\)"),
             (torch.tensor([0.0, 0.0, 1.0, 1.0]), "integer")]
    for labels, match in cases:
        ds = trainer_data(torch.as_tensor(labels).long())
        ds = torch.utils.data.TensorDataset(ds.tensors[0], torch.as_tensor(labels))
        with pytest.raises(ValueError, match=match):
            one_step(make_trainer(name, dataset=ds, batch_size=4))
    ds = trainer_data([0, 0, 1, 1])
    ds.tensors[0][1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        one_step(make_trainer(name, dataset=ds, batch_size=4))


@pytest.mark.parametrize("name", WITH_PML)
def test_trainer_float64_and_pml_options(name):
    """PML's dtype, set_min_label_to_zero, freeze_these, gradient clippers and schedulers work as in PML."""
    models = {k: m.double() for k, m in trainer_models().items()}
    ds = trainer_data()
    ds = torch.utils.data.TensorDataset(ds.tensors[0].double(), ds.tensors[1] + 100)  # labels 100..104
    clipped = []
    kw = dict(dtype=torch.float64, set_min_label_to_zero=True, dataset_labels=ds.tensors[1].numpy(),
              freeze_these=("trunk",), gradient_clippers={"embedder_grad_clipper": lambda: clipped.append(
                  torch.nn.utils.clip_grad_norm_(models["embedder"].parameters(), 1e-3))})
    trunk_w = [p.detach().clone() for p in models["trunk"].parameters()]
    trainer = make_trainer(name, models=models, dataset=ds, **kw)
    group = trainer.optimizers["embedder_optimizer"].param_groups[0]
    lr0 = group["lr"]
    sched = torch.optim.lr_scheduler.StepLR(trainer.optimizers["embedder_optimizer"], step_size=1, gamma=0.5)
    trainer.lr_schedulers = {"embedder_scheduler_by_iteration": sched}
    seen = []
    trainer.end_of_iteration_hook = lambda t: seen.append({k: float(v) for k, v in t.losses.items()})
    trainer.train(num_epochs=1)  # 20 samples, batches of 8, the last one dropped: 2 iterations
    assert trainer.iterations_per_epoch == len(seen) == len(clipped) == 2
    assert group["lr"] == pytest.approx(lr0 * 0.5 ** 2)
    assert all(torch.equal(a, b) for a, b in zip(trunk_w, models["trunk"].parameters()))
    assert all(p.dtype == torch.float64 for m in trainer.models.values() for p in m.parameters())
    assert all(math.isfinite(v) for losses_ in seen for v in losses_.values()), seen
