"""The engine on a small subset: it learns, it is reproducible by seed, it stops on a NaN loss."""

import copy

import pytest
import torch

import models
from trainer import engine
from trainer.config import OPTIMIZERS, SCHEDULERS, Config
from trainer.data import to_device


def config(data_dir, model="step5", **overrides):
    options = {"subset": 1000, "epochs": 2, "workers": 1, "data_dir": data_dir, **overrides}
    return Config.for_variant(models.get_variant(model).recipe, model=model, **options)


def run(cfg):
    engine.seed_everything(cfg.seed)
    model = models.get_model(cfg.model, cfg.dropout)
    history = []
    engine.fit(cfg, model, torch.device("cpu"), lambda epoch, metrics, state: history.append(metrics))
    return [{k: v for k, v in m.items() if k not in ("preds", "epoch_seconds")} for m in history]


def test_loss_decreases_over_a_few_steps(data_dir):
    cfg = config(data_dir, model="step3", augment="none", batch_size=64)
    model = models.get_model("step3")
    train_loader, _, _ = engine.make_loaders(cfg, torch.device("cpu"))
    optimizer = engine.make_optimizer(cfg, model)
    x, y = to_device(next(iter(train_loader)), torch.device("cpu"))
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_same_seed_gives_the_same_metrics_epoch_for_epoch(data_dir):
    first, second = run(config(data_dir, seed=7)), run(config(data_dir, seed=7, workers=0))
    assert first == second  # worker count does not change the augmented images either
    assert run(config(data_dir, seed=8)) != first


def fit_keeping_states(cfg):
    """fit, keeping a copy of every epoch's checkpoint state: (model, test_loader, last metrics, states)."""
    engine.seed_everything(cfg.seed)
    model, states, history = models.get_model(cfg.model, cfg.dropout), [], []

    def save(epoch, metrics, state):
        states.append(copy.deepcopy(state))
        history.append(metrics)

    test_loader, last = engine.fit(cfg, model, torch.device("cpu"), save)
    assert last["test_acc"] == history[-1]["test_acc"]
    return model, test_loader, history[-1], states


def test_with_an_ema_the_averaged_weights_are_evaluated_checkpointed_and_kept(data_dir):
    cfg = engine.resolve(config(data_dir, ema=0.9, epochs=1), torch.device("cpu"))  # amp as fit resolves it
    model, test_loader, metrics, (state,) = fit_keeping_states(cfg)
    live, averaged = state["model"]["0.weight"], state["ema"]["module.0.weight"]
    assert not torch.equal(live, averaged)  # the checkpoint keeps both, for a resume
    assert torch.equal(model.state_dict()["0.weight"], averaged)  # the model ends with the averaged weights
    assert engine.evaluate(model, test_loader, torch.device("cpu"), cfg.amp)["test_acc"] == metrics["test_acc"]
    assert "ema" not in fit_keeping_states(config(data_dir, ema=0.0, epochs=1))[3][0]


def test_non_finite_loss_stops_training(data_dir):
    cfg = config(data_dir, lr=1e6, scheduler="none", epochs=1)
    with pytest.raises(engine.NonFiniteLoss):
        run(cfg)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_schedule_steps_per_batch_to_its_end(scheduler):
    cfg = Config.for_variant(
        models.get_variant("step5").recipe, model="step5", scheduler=scheduler, epochs=3, step_size=1
    )
    optimizer = engine.make_optimizer(cfg, models.get_model("step5"))
    schedule = engine.make_scheduler(cfg, optimizer, steps_per_epoch=10)
    lrs = []
    for _ in range(30):
        optimizer.step()
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    if scheduler == "none":
        assert set(lrs) == {cfg.lr}
    else:
        assert lrs[-1] < cfg.lr / 5


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizers(name):
    cfg = Config.for_variant(models.get_variant("step5").recipe, model="step5", optimizer=name, lr=0.01)
    optimizer = engine.make_optimizer(cfg, models.get_model("step5"))
    assert type(optimizer).__name__.lower() == name and optimizer.param_groups[0]["lr"] == 0.01


def test_training_leaves_the_workers_their_cores_and_omp_num_threads_overrides(monkeypatch):
    monkeypatch.setattr(engine, "CORES", 4)
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 4)  # 3 augmentation workers by default
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert engine.compute_threads() == (1, 4)  # train beside the workers, evaluate on every core
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert engine.compute_threads() == (4, 4)
    before = torch.get_num_threads()
    with engine.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_compile_trains_the_same_model_and_checkpoints_it_unwrapped(data_dir):
    (eager,) = run(config(data_dir, epochs=1))
    model, _, compiled, (state,) = fit_keeping_states(config(data_dir, epochs=1, compile=True))
    assert state["model"].keys() == model.state_dict().keys() == models.get_model("step5").state_dict().keys()
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=0.02)  # other kernels, same training
    assert abs(compiled["test_acc"] - eager["test_acc"]) <= 1.0


def test_the_ema_decay_warms_up():
    """min(ema, (1 + n) / (10 + n)) after n updates: the first updates move the average most of the way."""
    cfg = Config.for_variant(models.get_variant("step5").recipe, model="step5")
    model = models.get_model("step5")
    ema = engine.make_ema(cfg, model)
    ema.update_parameters(model)  # the first update copies
    weight = next(model.parameters())
    with torch.no_grad():
        weight.add_(1.0)
    ema.update_parameters(model)  # n = 1: decay 2/11, so 9/11 of the step is taken
    moved = next(ema.module.parameters()) - (weight - 1.0)
    assert torch.allclose(moved, torch.full_like(moved, 9 / 11), atol=1e-6)
