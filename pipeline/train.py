"""Training and evaluation on a CalibrationSet, and the built-in default model.

The default model is `SmallCNN` trained once on (a subset of) the Fashion-MNIST training set from
the Debian package; its weights are cached under `cache_dir("models")`, keyed by a hash of the
architecture and the training configuration, so every later call (and every test) loads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.data import CalibrationSet
from calibration.errors import FairEdgeError
from calibration.fileio import atomic_write_bytes, atomic_write_text, cache_dir
from calibration.loaders import load_fashion_mnist
from pipeline.models import SmallCNN


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (it is part of the cache key)."""

    epochs: int = 1
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    n_train: int | None = None  # first-n of a seeded shuffle of the training set; None: all

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The default model: width 32 is big enough that its latency is compute, not per-run overhead
# (about 0.5 ms on one core), and trains once in under two minutes on 2 CPU cores.
DEFAULT_WIDTH = 32
DEFAULT_CONFIG = TrainConfig(epochs=2, batch_size=128, lr=3e-3, seed=0, n_train=30720)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the block; the model's own training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def train(
    model: nn.Module,
    train_set: CalibrationSet,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    *,
    weight_decay: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train in place with Adam and a one-cycle learning rate; returns each epoch's mean loss.

    Seeded: shuffling and dropout draw from a forked RNG, so the caller's RNG state is untouched.
    The model is left in eval mode.
    """
    labels = train_set.require_labels()
    if epochs < 1 or batch_size < 1:
        raise FairEdgeError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    x_all = torch.from_numpy(train_set.inputs)
    y_all = torch.from_numpy(labels)
    n = len(train_set)
    steps_per_epoch = max(1, n // batch_size)  # drop the ragged last batch (BN needs > 1 sample)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.25
    )
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        step = 0
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            bar = tqdm(
                range(steps_per_epoch),
                desc=f"train {epoch + 1}/{epochs}",
                disable=not progress,
                leave=False,
            )
            for i in bar:
                idx = perm[i * batch_size : (i + 1) * batch_size] if n >= batch_size else perm
                loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_value = loss.item()
                total += loss_value
                step += 1
                if on_step is not None:
                    on_step(step, loss_value)
                if i % 20 == 0:
                    bar.set_postfix(loss=f"{loss_value:.3f}")
            losses.append(total / steps_per_epoch)
    model.eval()
    return losses


@torch.no_grad()
def predict(
    model: nn.Module, inputs: np.ndarray | torch.Tensor, batch_size: int = 1000
) -> np.ndarray:
    """The model's outputs (logits) for `inputs`, in eval mode, as a float32 array."""
    x = torch.as_tensor(inputs)
    outs = []
    with _eval_mode(model):
        for i in range(0, len(x), batch_size):
            outs.append(model(x[i : i + batch_size]).float())
    return torch.cat(outs).numpy()


def evaluate(
    model: nn.Module, cs: CalibrationSet, batch_size: int = 1000, *, top_k: int = 1
) -> float:
    """Top-k accuracy (default top-1) of `model` on a labelled set, in [0, 1]."""
    labels = cs.require_labels()
    logits = predict(model, cs.inputs, batch_size)
    if top_k == 1:
        return float(np.mean(logits.argmax(1) == labels))
    top = np.argsort(-logits, axis=1)[:, :top_k]
    return float(np.mean((top == labels[:, None]).any(axis=1)))


def default_data(split: str = "train") -> CalibrationSet:
    """The default model's data: Fashion-MNIST 'train' or 'test' from the Debian package."""
    return load_fashion_mnist(split)


def model_key(model: nn.Module, config: TrainConfig, data: str) -> str:
    """A hash of the architecture (module tree and parameter shapes), training config and data."""
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    blob = json.dumps(
        {"arch": repr(model), "shapes": shapes, "config": config.to_json(), "data": data},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _subset_for(cs: CalibrationSet, config: TrainConfig) -> CalibrationSet:
    if config.n_train is None or config.n_train >= len(cs):
        return cs
    order = np.random.default_rng(config.seed).permutation(len(cs))[: config.n_train]
    return cs.subset(np.sort(order))


def train_cached(
    name: str,
    build: Callable[[], nn.Module],
    config: TrainConfig,
    *,
    data: str = "fashion-mnist",
    train_set: Callable[[], CalibrationSet] | None = None,
    test_set: Callable[[], CalibrationSet] | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a model (seeded) and load its cached weights, or train it once and cache them.

    The cache holds `<name>-<key>.pt` (a state_dict, loaded with weights_only=True) and
    `<name>-<key>.json` (config, training time, test accuracy). A file lock makes concurrent
    processes wait for one training instead of all training.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build()
    key = model_key(model, config, data)
    folder = cache_dir("models")
    weights = folder / f"{name}-{key}.pt"
    meta_path = folder / f"{name}-{key}.json"
    with open(folder / f".{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if weights.is_file() and meta_path.is_file():
            return _load(model, weights), json.loads(meta_path.read_text())
        ts = (train_set or (lambda: default_data("train")))()
        t0 = time.perf_counter()
        losses = train(
            model,
            _subset_for(ts, config),
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            progress=progress,
            weight_decay=config.weight_decay,
        )
        seconds = time.perf_counter() - t0
        meta: dict[str, Any] = {
            "name": name,
            "key": key,
            "data": data,
            "config": config.to_json(),
            "train_seconds": round(seconds, 2),
            "train_losses": losses,
            "torch": torch.__version__,
        }
        if test_set is not None:
            te = test_set()
            meta["test_accuracy"] = evaluate(model, te)
            meta["test_source"] = te.source
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        atomic_write_bytes(weights, buf.getvalue())
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
    return model, meta


def _load(model: nn.Module, path: Path) -> nn.Module:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # a corrupt cache file: say which one to delete
        raise FairEdgeError(
            f"cached weights {path} cannot be loaded ({exc}); delete the file to retrain"
        ) from exc
    return model.eval()


def default_model_info(progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The default model and its training record (config, seconds, Fashion-MNIST test accuracy)."""
    return train_cached(
        "smallcnn",
        lambda: SmallCNN(in_channels=1, num_classes=10, width=DEFAULT_WIDTH),
        DEFAULT_CONFIG,
        train_set=lambda: default_data("train"),
        test_set=lambda: default_data("test"),
        progress=progress,
    )


def default_model(progress: bool = True) -> nn.Module:
    """The built-in default: SmallCNN (width 16) trained on Fashion-MNIST, cached; eval mode."""
    return default_model_info(progress)[0]
