"""HDML inside PML's machinery: the trainer (gradients equal HDMLLoss's, HookContainer +
record-keeper CSV/SQLite, tester, checkpoint resume), logging of HDMLLoss in loss_funcs, named
non-finite failures, integer label widths, unusable wrapped losses, the synthetic-tuple cap."""
import copy
import math
import os
import sqlite3

import pytest
import torch
from pytorch_metric_learning import losses, miners, testers, trainers
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import logging_presets
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_ext.losses import EmbeddingExpansionLoss, HDMLLoss, HDMLNonFiniteError
from pml_ext.losses.hdml_loss import DEFAULT_MAX_SYNTHETIC_TUPLES, default_hdml_generator
from pml_ext.trainers import HardnessAwareDeepMetricLearning

record_keeper = pytest.importorskip("record_keeper")

IN, FEAT, EMB, C, PER = 10, 16, 6, 8, 4
B = 16
TERMS = ("J_m", "J_syn", "J_metric", "J_gen", "J_recon", "J_soft", "J_cls", "J_avg", "metric_weight")
CPU = torch.device("cpu")


def make_models(seed=0, custom_generator=False):
    torch.manual_seed(seed)
    trunk = torch.nn.Sequential(torch.nn.Linear(IN, FEAT), torch.nn.ReLU(), torch.nn.Linear(FEAT, FEAT))
    models = {"trunk": trunk, "embedder": torch.nn.Linear(FEAT, EMB)}
    if custom_generator:  # a user's own Sequential: numbered children, no BatchNorm
        models["generator"] = torch.nn.Sequential(torch.nn.Linear(EMB, 20), torch.nn.Tanh(), torch.nn.Linear(20, FEAT))
    return models


def make_data(n_per_class=PER, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(n_per_class)
    centres = torch.randn(C, IN, generator=g)
    x = centres[y] + 0.5 * torch.randn(len(y), IN, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def make_trainer(models, dataset, **kw):
    kw.setdefault("loss_funcs", {"metric_loss": losses.TripletMarginLoss(margin=0.1)})
    kw.setdefault("mining_funcs", {"tuple_miner": miners.TripletMarginMiner(margin=0.1, type_of_triplets="all")})
    kw.setdefault("num_classes", C)
    kw.setdefault("alpha", 0.05)
    return HardnessAwareDeepMetricLearning(models=models, optimizers=kw.pop("optimizers", None), batch_size=B,
                                           dataset=dataset, dataloader_num_workers=0, data_device=CPU, **kw)


def new_record_keeper(folder):
    return record_keeper.RecordKeeper(record_writer=record_keeper.RecordWriter(str(folder)),
                                      attributes_to_search_for=c_f.list_of_recordable_attributes_list_names())


def start(trainer):
    """What BaseTrainer.train does before its first forward_and_backward."""
    trainer.initialize_dataloader()
    trainer.epoch, trainer.iteration = 1, 0
    trainer.set_to_train()


def tables(db_path):
    with sqlite3.connect(db_path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


# ------------------------------------------------------------------ the trainer == HDMLLoss
def test_trainer_gradients_equal_hdmlloss_on_the_same_batch():
    """Same seeds, same initial weights, one step each: every parameter's gradient is equal."""
    dataset = make_data()
    models = make_models(seed=3)
    trainer = make_trainer(models, dataset, sampler=torch.utils.data.SequentialSampler(dataset), beta=1.0,
                           max_synthetic_tuples=None)
    ref_models = copy.deepcopy(models)  # after the defaults were built: same generator/classifier init
    hdml = trainer.loss_funcs["hdml"]
    hdml.javg_tracker.value.fill_(0.1)  # negatives pulled, and w = exp(-1/J_gen_avg) < 1: J_syn matters
    hdml.jgen_tracker.value.fill_(2.0)
    ref = HDMLLoss(losses.TripletMarginLoss(margin=0.1), generator=ref_models["generator"],
                   classifier=ref_models["classifier"], miner=miners.TripletMarginMiner(margin=0.1, type_of_triplets="all"),
                   alpha=0.05, beta=1.0, max_synthetic_tuples=None)
    ref.load_state_dict(hdml.state_dict())
    start(trainer)
    trainer.forward_and_backward()
    x, y = dataset.tensors[0][:B], dataset.tensors[1][:B]
    out = ref(ref_models["trunk"](x), y, ref_models["embedder"])
    out.backward()
    assert hdml.fraction_pullable > 0 and 0 < hdml.metric_weight < 1
    assert out.item() == pytest.approx(trainer.losses["J_metric"].item(), rel=1e-6)
    for name in ("trunk", "embedder", "generator", "classifier"):
        for (pn, p), q in zip(models[name].named_parameters(), ref_models[name].parameters()):
            assert p.grad is not None and q.grad is not None, (name, pn)
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), (name, pn)
            assert p.grad.abs().sum() > 0, (name, pn)
    assert trainer.losses["total_loss"].item() == pytest.approx(
        sum(trainer.losses[k].item() for k in ("J_metric", "J_gen", "J_cls")), rel=1e-6)


# ------------------------------------------------------------------ PML's real machinery
@pytest.mark.parametrize("custom_generator", [False, True])
def test_trainer_with_hooks_record_keeper_tester_and_resume(tmp_path, custom_generator):
    train_set, val_set = make_data(seed=1), make_data(n_per_class=3, seed=2)
    logs, model_folder = tmp_path / "logs", tmp_path / "models"
    rk = new_record_keeper(logs)
    hooks = logging_presets.HookContainer(rk, primary_metric="precision_at_1", validation_split_name="val", log_freq=1)
    tester = testers.GlobalEmbeddingSpaceTester(
        end_of_testing_hook=hooks.end_of_testing_hook, dataloader_num_workers=0, batch_size=B, data_device=CPU,
        accuracy_calculator=AccuracyCalculator(include=("precision_at_1",), k=2))
    end_of_epoch = hooks.end_of_epoch_hook(tester, {"val": val_set}, str(model_folder), test_interval=1)
    models = make_models(seed=0, custom_generator=custom_generator)
    schedulers = {}
    trainer = make_trainer(models, train_set, iterations_per_epoch=3, hdml_options={"block_size": 2},
                           end_of_iteration_hook=hooks.end_of_iteration_hook, end_of_epoch_hook=end_of_epoch,
                           lr_schedulers=schedulers)
    schedulers["generator_scheduler_by_iteration"] = torch.optim.lr_scheduler.StepLR(
        trainer.optimizers["generator_optimizer"], step_size=1, gamma=0.5)
    trainer.train(num_epochs=2)

    # lr scheduler stepped every iteration; J_avg / J_gen_avg left their starting 1e6 (block of 2)
    assert trainer.optimizers["generator_optimizer"].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 6)
    hdml = trainer.loss_funcs["hdml"]
    assert hdml.J_avg_value < 1e6 and hdml.J_gen_avg_value < 1e6

    # CSV and SQLite: every HDML term in loss_histories, finite, one row per iteration
    db = logs / "logs.db"
    assert {"loss_histories", "hdml_HDMLLoss"} <= tables(db)
    assert not [t for t in tables(db) if t[0].isdigit() or "_parameters" in t]
    hist = hooks.get_loss_history(TERMS)
    assert all(len(hist[k]) == 6 and all(math.isfinite(v) for v in hist[k]) for k in TERMS)
    assert all(0 < w <= 1 for w in hist["metric_weight"])
    with open(logs / "loss_histories.csv") as f:
        header = f.readline().strip().split(",")
    assert set(TERMS) <= set(header)
    # the tester ran at the end of each epoch and its accuracy is in the database
    acc = hooks.get_accuracy_history(tester, "val", return_all_metrics=True)
    assert acc["epoch"] == [1, 2]

    # checkpoint: a fresh trainer (other weights) resumes models, optimisers and J_avg / J_gen
    fresh_models = make_models(seed=99, custom_generator=custom_generator)
    resumed = make_trainer(fresh_models, train_set, hdml_options={"block_size": 2})
    assert resumed.loss_funcs["hdml"].J_avg_value == 1e6
    assert hooks.load_latest_saved_models(resumed, str(model_folder), device=CPU) == 3
    new = resumed.loss_funcs["hdml"]
    for k, v in hdml.state_dict().items():
        assert torch.equal(v, new.state_dict()[k]), k
    assert new.J_avg_value == hdml.J_avg_value and new.J_gen_avg_value == hdml.J_gen_avg_value
    for name in ("trunk", "embedder", "generator", "classifier"):
        for p, q in zip(models[name].parameters(), fresh_models[name].parameters()):
            assert torch.equal(p, q), name
    assert resumed.models["generator"] is new.generator  # one generator, shared by the model dict and HDML


@pytest.mark.parametrize("custom_generator", [False, True])
def test_hdmlloss_in_loss_funcs_logs_with_hookcontainer(tmp_path, custom_generator):
    """The user's route before the trainer: HDMLLoss as loss_funcs["metric_loss"] of a 4-line
    MetricLossOnly subclass, with PML's HookContainer (recursive walk over loss_funcs)."""

    class HDMLMetricLossOnly(trainers.MetricLossOnly):
        def calculate_loss(self, curr_batch):
            data, labels = curr_batch
            self.losses["metric_loss"] = self.loss_funcs["metric_loss"](
                self.get_trunk_output(data), labels, self.models["embedder"])

    models = make_models(custom_generator=custom_generator)
    gen = models.pop("generator", None)
    hdml = HDMLLoss(losses.TripletMarginLoss(margin=0.1), embedding_size=EMB, feature_size=FEAT, num_classes=C,
                    generator=gen, miner=miners.TripletMarginMiner(margin=0.1))
    params = [p for m in models.values() for p in m.parameters()]
    rk = new_record_keeper(tmp_path)
    hooks = logging_presets.HookContainer(rk, log_freq=1)
    trainer = HDMLMetricLossOnly(models=models, optimizers={"trunk_optimizer": torch.optim.Adam(params)},
                                 batch_size=B, loss_funcs={"metric_loss": hdml}, dataset=make_data(),
                                 dataloader_num_workers=0, data_device=CPU, iterations_per_epoch=2,
                                 end_of_iteration_hook=hooks.end_of_iteration_hook)
    trainer.train(num_epochs=1)
    rk.save_records()  # crashed with sqlite3.OperationalError: unrecognized token: "0_Linear__parameters"
    found = tables(tmp_path / "logs.db")
    assert "metric_loss_HDMLLoss" in found
    assert any("TripletMarginLoss" in t for t in found) and any("TripletMarginMiner" in t for t in found)
    assert not [t for t in found if t[0].isdigit() or "_parameters" in t or "_buffers" in t]
    rows = rk.query("SELECT J_gen, J_m, num_synthetic_tuples FROM metric_loss_HDMLLoss")
    assert len(rows) == 2 and all(math.isfinite(r["J_gen"]) and r["num_synthetic_tuples"] > 0 for r in rows)
    # hiding the submodules from record-keeper changes nothing torch sees
    assert [n for n, _ in hdml.named_children()] == ["loss", "miner", "generator", "classifier",
                                                      "javg_tracker", "jgen_tracker"]
    clone = copy.deepcopy(hdml)
    assert clone.recorded_modules["loss"] is clone.loss and clone.generator is not hdml.generator
    assert set(clone.state_dict()) == set(hdml.state_dict())


# ------------------------------------------------------------------ named failures
def test_sgd_at_official_lrs_is_a_named_error_not_nan():
    """The issue's report: SGD with the official lrs sends J_gen 1e4 -> 1e21 -> inf in a few steps."""
    models = make_models()
    models["generator"] = default_hdml_generator(EMB, FEAT, 32)
    models["classifier"] = torch.nn.Linear(FEAT, C)
    lrs = {"trunk": 7e-5, "embedder": 7e-5, "generator": 1e-2, "classifier": 1e-3}
    opts = {f"{k}_optimizer": torch.optim.SGD(m.parameters(), lr=lrs[k]) for k, m in models.items()}
    trainer = make_trainer(models, make_data(n_per_class=8), optimizers=opts)
    start(trainer)
    with pytest.raises(HDMLNonFiniteError) as err:
        for _ in range(30):
            trainer.forward_and_backward()
    msg = str(err.value)
    assert msg.startswith(("HDML: J_gen is inf", "HDML: J_gen is nan")) and "recent values" in msg
    assert "learning rate" in msg and "SGD" in msg and "on_nonfinite='skip'" in msg
    hist = list(trainer.loss_funcs["hdml"].history["J_gen"])
    assert len(hist) >= 3 and math.isfinite(hist[0]) and not math.isfinite(hist[-1])


def blow_up(generator):
    with torch.no_grad():
        generator[-1].weight.fill_(1e30)  # float32 outputs overflow: J_recon = inf


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_generator_raise_or_skip_in_hdmlloss(mode):
    models = make_models()
    hdml = HDMLLoss(losses.TripletMarginLoss(margin=0.1), embedding_size=EMB, feature_size=FEAT, num_classes=C,
                    on_nonfinite=mode)
    x, y = make_data().tensors
    feats = models["trunk"](x[:B])
    hdml(feats, y[:B], models["embedder"])  # one finite batch first: part of the recent values
    blow_up(hdml.generator)
    before = {k: v.clone() for k, v in hdml.state_dict().items() if "tracker" in k}
    if mode == "raise":
        with pytest.raises(HDMLNonFiniteError, match=r"J_gen is inf .*recent values, oldest first: [0-9.e+]+, inf"):
            hdml(feats, y[:B], models["embedder"])
        return
    out = hdml(feats, y[:B], models["embedder"])
    assert out.item() == 0.0 and hdml.last_batch_skipped and hdml.num_skipped_batches == 1
    assert math.isinf(hdml.J_gen)  # the record shows what happened
    out.backward()
    for p in list(models["trunk"].parameters()) + list(hdml.generator.parameters()):
        assert p.grad is not None and (p.grad == 0).all()
    for k, v in before.items():
        assert torch.equal(v, hdml.state_dict()[k]), k  # averages untouched
    with torch.no_grad():  # a finite batch again clears the flag
        hdml.generator[-1].weight.normal_(0, 0.1)
    hdml(feats, y[:B], models["embedder"])
    assert not hdml.last_batch_skipped and hdml.num_skipped_batches == 1


def test_trainer_skip_mode_steps_no_optimizer():
    models = make_models()
    trainer = make_trainer(models, make_data(), on_nonfinite="skip")
    blow_up(trainer.models["generator"])
    start(trainer)
    weights = {k: [p.detach().clone() for p in m.parameters()] for k, m in models.items()}
    trainer.forward_and_backward()
    assert trainer.loss_funcs["hdml"].last_batch_skipped and trainer.losses["total_loss"].item() == 0.0
    for k, m in models.items():  # Adam would move them on a zero gradient: no step at all
        assert all(torch.equal(a, b) for a, b in zip(weights[k], m.parameters())), k


def test_nonfinite_features_are_a_clear_error():
    hdml = HDMLLoss(losses.TripletMarginLoss(), embedding_size=EMB, feature_size=FEAT, num_classes=C)
    f = torch.randn(B, FEAT)
    f[3, 2] = float("nan")
    with pytest.raises(ValueError, match="features contain NaN or inf"):
        hdml(f, torch.arange(B) % C, torch.nn.Linear(FEAT, EMB))


@pytest.mark.parametrize("loss", [losses.TripletMarginLoss(), losses.NPairsLoss()])
def test_empty_batch_is_a_clear_error(loss):
    hdml = HDMLLoss(loss, embedding_size=EMB, feature_size=FEAT, num_classes=C)
    with pytest.raises(ValueError, match="empty batch: features has 0 rows"):
        hdml(torch.randn(0, FEAT, requires_grad=True), torch.zeros(0, dtype=torch.long), torch.nn.Linear(FEAT, EMB))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32])
def test_integer_labels_of_any_width(dtype):
    models = make_models()
    x, y = make_data().tensors
    outs = []
    for lab in (y[:B], y[:B].to(dtype)):
        torch.manual_seed(0)
        hdml = HDMLLoss(losses.TripletMarginLoss(margin=0.1), embedding_size=EMB, feature_size=FEAT, num_classes=C,
                        max_synthetic_tuples=None)
        outs.append(hdml(models["trunk"](x[:B]), lab, models["embedder"]))
    assert torch.equal(outs[0], outs[1])
    # and through the trainer (PML's dataloader keeps the dataset's label dtype)
    ds = torch.utils.data.TensorDataset(x, y.to(dtype))
    trainer = make_trainer(make_models(), ds)
    start(trainer)
    trainer.forward_and_backward()
    assert math.isfinite(trainer.losses["total_loss"].item())


def test_unusable_wrapped_losses_fail_at_construction():
    with pytest.raises(ValueError, match="cannot wrap EmbeddingExpansionLoss: it expands every batch"):
        HDMLLoss(EmbeddingExpansionLoss(losses.TripletMarginLoss()), embedding_size=4, feature_size=8, num_classes=3)
    with pytest.raises(ValueError, match="cannot wrap PNPLoss: .*indices_tuple"):
        HDMLLoss(losses.PNPLoss(), embedding_size=4, feature_size=8, num_classes=3)
    with pytest.raises(ValueError, match="cannot wrap CrossBatchMemory"):
        HDMLLoss(losses.CrossBatchMemory(losses.ContrastiveLoss(), 4), embedding_size=4, feature_size=8, num_classes=3)
    with pytest.raises(ValueError, match="cannot wrap EmbeddingExpansionLoss"):
        make_trainer(make_models(), make_data(),
                     loss_funcs={"metric_loss": EmbeddingExpansionLoss(losses.TripletMarginLoss())})


def test_trainer_argument_errors_and_defaults():
    with pytest.raises(ValueError, match="num_classes"):
        make_trainer(make_models(), make_data(), num_classes=None)
    no_head = make_models()
    no_head["embedder"] = torch.nn.Sequential(torch.nn.Linear(FEAT, EMB), torch.nn.ReLU())
    with pytest.raises(ValueError, match="feature_size"):
        make_trainer(no_head, make_data())
    ok = make_trainer(no_head, make_data(), feature_size=FEAT, embedding_size=EMB)
    assert ok.models["generator"][-1].out_features == FEAT and ok.models["classifier"].in_features == FEAT
    with pytest.raises(ValueError, match="metric_loss"):
        make_trainer(make_models(), make_data(), loss_funcs={})
    with pytest.raises(ValueError, match="on_nonfinite"):
        make_trainer(make_models(), make_data(), on_nonfinite="ignore")
    t = make_trainer(make_models(), make_data())
    lrs = {k: o.param_groups[0]["lr"] for k, o in t.optimizers.items()}
    assert lrs == {"trunk_optimizer": 7e-5, "embedder_optimizer": 7e-5, "generator_optimizer": 1e-2,
                   "classifier_optimizer": 1e-3}
    assert all(isinstance(o, torch.optim.Adam) for o in t.optimizers.values())
    assert t.loss_funcs["hdml"].max_synthetic_tuples == DEFAULT_MAX_SYNTHETIC_TUPLES
    assert t.loss_funcs["hdml"].alpha == 0.05 and t.loss_funcs["hdml"].beta == 1e4


def test_trainer_freeze_these_generator():
    models = make_models()
    trainer = make_trainer(models, make_data(), freeze_these=("generator",))
    assert "generator_optimizer" not in trainer.optimizers
    gen = trainer.models["generator"]
    w = [p.detach().clone() for p in gen.parameters()]
    trunk_w = [p.detach().clone() for p in models["trunk"].parameters()]
    trainer.train(num_epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(w, gen.parameters()))
    assert not gen.training  # frozen models stay in eval mode (BatchNorm statistics too)
    assert not all(torch.equal(a, b) for a, b in zip(trunk_w, models["trunk"].parameters()))


def test_synthetic_tuple_cap():
    """The default cap bounds the synthetic triplets; J_m still uses every mined triplet."""
    models = make_models()
    x, y = make_data(n_per_class=8).tensors  # 64 samples: 64 * 7 * 56 = 25,088 triplets
    miner = miners.TripletMarginMiner(margin=0.1, type_of_triplets="all")
    hdml = HDMLLoss(losses.TripletMarginLoss(margin=0.1), embedding_size=EMB, feature_size=FEAT, num_classes=C,
                    miner=miner)
    feats = models["trunk"](x)
    hdml(feats, y, models["embedder"]).backward()
    assert hdml.num_synthetic_tuples == DEFAULT_MAX_SYNTHETIC_TUPLES
    emb = models["embedder"](feats)
    assert hdml.J_m == pytest.approx(losses.TripletMarginLoss(margin=0.1)(emb, y, miner(emb, y)).item(), rel=1e-6)


# ------------------------------------------------------------------ the example
def test_example_hdml_trainer_reduced(tmp_path):
    """examples/hdml_trainer.py --steps 3: PML trainer + tester + HookContainer on the embedded data."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)  # this checkout's pml_ext, not an installed one
    cmd = [sys.executable, os.path.join("examples", "hdml_trainer.py"), "--steps", "3", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test fonts: " in proc.stdout and "J_gen=" in proc.stdout
    result = json.loads((tmp_path / "hdml_trainer.json").read_text())
    assert 0.0 <= result["metrics"]["precision_at_1_level0"] <= 1.0
    db = tmp_path / "logs" / "logs.db"
    assert "loss_histories" in tables(db)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT J_m, J_gen, J_avg, metric_weight FROM loss_histories").fetchall()
    assert len(rows) == 1 and all(v is not None and math.isfinite(v) for v in rows[0])  # log_freq 10: iteration 0
    assert (tmp_path / "models" / "hdml_1.pth").exists() and (tmp_path / "models" / "generator_1.pth").exists()
