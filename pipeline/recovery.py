"""Recovery of a pruned model: short knowledge-distillation training from the unpruned teacher.

Pruning changes the network; a short training run brings most of the lost accuracy back. The
student is the physically pruned module (the graph that ships), the teacher the unpruned model.
Loss: temperature-softened KL to the teacher (times T^2, so its gradient scale does not depend on
T) plus cross-entropy where labels exist; with no labels it is distillation alone, so any
unlabelled images of the right kind will do.

Only parameter values change, never the architecture: the result can be written back into the
surgery's ONNX graph by initializer name.

Reproducible and resumable by construction: the samples of step t come from a permutation seeded
by (seed, epoch), their augmentation and every other draw from a generator seeded by (seed, t), so
a run resumed from a checkpoint at step t continues exactly as the uninterrupted run would. The
same holds under `torchrun`: every process draws the global batch and trains on its equal share,
and DistributedDataParallel averages the gradients, which equals the single-process gradient of
the global batch (BatchNorm statistics frozen, the default; dropout is off during recovery).

Checkpoints are safetensors files (no pickle) written atomically: model, optimizer state, best
weights so far, and a JSON record of the step, history and what the run was for (plan digest and
settings), so a checkpoint for another plan is refused instead of silently mixed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from calibration.data import CalibrationSet
from calibration.errors import FairEdgeError
from calibration.fileio import atomic_write_bytes, read_safetensors

CHECKPOINT_SCHEMA = "fair-edge/recovery-checkpoint"
CHECKPOINT_VERSION = 1
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
AUGMENT = ("none", "shift", "shift+flip")
BN_MODES = ("frozen", "train")


class RecoveryError(FairEdgeError):
    """Recovery settings, data, teacher or checkpoint that cannot be used."""


@dataclass(frozen=True)
class RecoveryConfig:
    """Everything that decides the recovered weights (part of the checkpoint's identity)."""

    epochs: float = 1.0
    """Passes over the recovery data; ignored when `steps` is set."""
    steps: int | None = None
    batch_size: int = 128
    lr: float = 0.01
    optimizer: str = "sgd"
    """sgd (momentum 0.9, the method's own fine-tuning) or adamw."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    temperature: float = 4.0
    kd_weight: float = 0.9
    """Share of the loss that is distillation; the rest is cross-entropy (labels only)."""
    augment: str = "shift"
    """Light augmentation of image batches: random shift up to 2 pixels, optional h-flip."""
    bn_mode: str = "frozen"
    """frozen: BatchNorm keeps its (re-estimated) statistics, exact under torchrun; train:
    batch statistics, per process under torchrun on CPU."""
    eval_every: int | None = None
    """Steps between held-out evaluations (default: four per run)."""
    patience: int = 0
    """Stop after this many held-out evaluations without improvement (0: never stop early)."""
    seed: int = 0

    def validate(self) -> RecoveryConfig:
        def bad(msg: str) -> RecoveryError:
            return RecoveryError(f"recovery: {msg}")

        if self.steps is None and not self.epochs > 0:
            raise bad(f"--recover-epochs must be > 0, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise bad(f"--recover-steps must be >= 1, got {self.steps}")
        if self.batch_size < 2:
            raise bad(f"--recover-batch-size must be >= 2, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad(f"--recover-lr must be a positive number, got {self.lr}")
        for name, value, choices in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("schedule", self.schedule, SCHEDULES),
            ("augment", self.augment, AUGMENT),
            ("bn_mode", self.bn_mode, BN_MODES),
        ):
            if value not in choices:
                raise bad(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise bad(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if not self.temperature > 0:
            raise bad(f"temperature must be > 0, got {self.temperature}")
        if self.eval_every is not None and self.eval_every < 1:
            raise bad(f"eval_every must be >= 1, got {self.eval_every}")
        if self.patience < 0:
            raise bad(f"patience must be >= 0, got {self.patience}")
        return self

    def total_steps(self, n_samples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, round(self.epochs * n_samples / self.batch_size))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecoveryConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecoveryError(f"recovery: unknown setting {unknown[0]!r}")
        return cls(**data).validate()

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RecoveryResult:
    """The recovered model and what happened: steps, losses, held-out accuracy over time."""

    model: nn.Module
    config: RecoveryConfig
    steps: int
    total_steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    heldout_before: float | None = None
    heldout_after: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    resumed_from: int | None = None
    seconds: float = 0.0
    samples_per_second: float = 0.0
    world_size: int = 1
    label_free: bool = False

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        d["config"] = self.config.to_json()
        return d


# ------------------------------------------------------------------------------ distributed


@dataclass(frozen=True)
class Dist:
    """This process's rank and the world size (1 and 0 outside torchrun)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Dist:
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            return cls(td.get_rank(), td.get_world_size())
        return cls()

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as td

        t = torch.tensor(values, dtype=torch.float64)
        td.all_reduce(t)
        return t.tolist()

    def device(self) -> torch.device:
        """Where this process computes: its own GPU (cuda:LOCAL_RANK) under NCCL, else the CPU."""
        import torch.distributed as td

        if self.world > 1 and td.get_backend() == "nccl":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def share_model(self, model: nn.Module) -> None:
        """Give every process rank 0's parameters and buffers (as DDP does when it wraps a
        model): a factory with an unseeded random initialisation builds a different model in
        each process, and scoring shares of batches needs one model."""
        if self.world == 1:
            return
        import torch.distributed as td

        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                td.broadcast(t.data, src=0)

    def same_everywhere(self, value: str) -> bool:
        """Whether `value` (a content hash) is the same in every process."""
        if self.world == 1:
            return True
        import torch.distributed as td

        got: list[Any] = [None] * self.world
        td.all_gather_object(got, value)
        return len(set(got)) == 1

    def close(self) -> None:
        """Leave the process group: a gloo group left open can abort the process at exit
        ("terminate called without an active exception", seen once in CI)."""
        import torch.distributed as td

        if self.world > 1 and td.is_initialized():
            td.destroy_process_group()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()


def init_distributed() -> Dist:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when launched by torchrun;
    under NCCL each process takes the GPU of its LOCAL_RANK first (NCCL refuses two ranks on
    one GPU), so put the model on Dist.device()."""
    import torch.distributed as td

    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise FairEdgeError(
                    f"torchrun process {local} of this machine has no GPU of its own "
                    f"({torch.cuda.device_count()} found); use --nproc_per_node "
                    f"{torch.cuda.device_count()} or fewer"
                )
            torch.cuda.set_device(local)
        td.init_process_group(backend)
    return Dist.current()


# ------------------------------------------------------------------------------ steps


def _seed_of(*parts: int) -> int:
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed_of(seed, 1, epoch)))


def step_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Global batch of `step`: a function of (seed, step) alone, so a resumed run is exact."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = _epoch_order(n, seed, epoch)
    if n < batch_size:
        return order
    return order[i * batch_size : (i + 1) * batch_size]


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random shift (zero padded, up to `shift` pixels) and optional horizontal flip, per sample."""
    if mode == "none" or x.ndim != 4:
        return x
    n, _, h, w = x.shape
    dy = torch.randint(-shift, shift + 1, (n,), generator=gen)
    dx = torch.randint(-shift, shift + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    padded = F.pad(x, (shift, shift, shift, shift))
    rows = (torch.arange(h)[None, :] + shift - dy[:, None]).clamp(0, h + 2 * shift - 1)
    cols = torch.arange(w)[None, :] + shift - dx[:, None]
    if mode == "shift+flip":
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]  # fmt: skip
    return out.contiguous()


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    kd_weight: float,
) -> torch.Tensor:
    """kd_weight * T^2 * KL(teacher_T || student_T) + (1 - kd_weight) * CE(student, labels)."""
    t = temperature
    kd = F.kl_div(
        F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
        reduction="batchmean", log_target=True,
    ) * (t * t)  # fmt: skip
    if labels is None or kd_weight >= 1.0:
        return kd
    return kd_weight * kd + (1.0 - kd_weight) * F.cross_entropy(student, labels)


def _lr_at(config: RecoveryConfig, step: int, total: int) -> float:
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _make_optimizer(config: RecoveryConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _set_modes(model: nn.Module, bn_mode: str) -> None:
    """Eval everywhere (no dropout: reproducible under any process layout); BN per `bn_mode`."""
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


def _logits(out: Any, who: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor) and out.ndim == 2:
        return out
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    raise RecoveryError(
        f"recovery needs N x classes logits from the {who}, got {shape}; recover classifiers, or "
        "wrap the model so it returns one logits tensor"
    )


@torch.no_grad()
def heldout_accuracy(
    model: nn.Module, data: CalibrationSet, dist: Dist = Dist(), batch_size: int = 500
) -> float:
    """Top-1 on `data` in eval mode, each process counting its share (summed across processes)."""
    labels = data.require_labels()
    was = model.training
    model.eval()
    idx = np.arange(dist.rank, len(data), dist.world)
    correct = 0
    for i in range(0, len(idx), batch_size):
        part = idx[i : i + batch_size]
        out = _logits(model(torch.from_numpy(data.inputs[part])), "student")
        correct += int((out.argmax(1).numpy() == labels[part]).sum())
    model.train(was)
    total_correct, total = dist.all_sum([float(correct), float(len(idx))])
    return total_correct / max(1.0, total)


# ------------------------------------------------------------------------------ checkpoints


def _checkpoint_tensors(
    model: nn.Module, opt: torch.optim.Optimizer, best: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    tensors = {f"model/{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{i}/{key}"] = value.detach().clone().contiguous()
    for k, v in (best or {}).items():
        tensors[f"best/{k}"] = v.clone().contiguous()
    return tensors


def save_checkpoint(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    best: dict[str, torch.Tensor] | None,
    record: dict[str, Any],
) -> None:
    """Atomically write a safetensors checkpoint (no pickle) with a JSON record in its metadata."""
    from safetensors.torch import save

    meta = {"schema": CHECKPOINT_SCHEMA, "version": str(CHECKPOINT_VERSION),
            "record": json.dumps(record)}  # fmt: skip
    atomic_write_bytes(path, save(_checkpoint_tensors(model, opt, best), metadata=meta))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and record of a checkpoint; one clear error for anything that is not one."""
    try:
        tensors, meta = read_safetensors(path)
    except Exception as exc:
        raise RecoveryError(
            f"recovery checkpoint {str(path)!r} cannot be read ({type(exc).__name__}); delete it "
            "to start over"
        ) from exc
    if meta.get("schema") != CHECKPOINT_SCHEMA:
        raise RecoveryError(
            f"{str(path)!r} is not a fair-edge recovery checkpoint; point --checkpoint elsewhere"
        )
    if meta.get("version") != str(CHECKPOINT_VERSION):
        raise RecoveryError(
            f"recovery checkpoint {str(path)!r} has version {meta.get('version')}, this fair-edge "
            f"reads {CHECKPOINT_VERSION}; delete it to start over"
        )
    try:
        record = json.loads(meta["record"])
    except (KeyError, ValueError) as exc:
        raise RecoveryError(f"recovery checkpoint {str(path)!r} has no readable record") from exc
    return tensors, record


def _restore(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    plan_digest: str,
    config: RecoveryConfig,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    tensors, record = read_checkpoint(path)
    if record.get("plan") != plan_digest:
        raise RecoveryError(
            f"recovery checkpoint {str(path)!r} was written for another plan; delete it or give "
            "another --checkpoint"
        )
    if record.get("config") != config.digest():
        raise RecoveryError(
            f"recovery checkpoint {str(path)!r} was written with other recovery settings "
            f"({record.get('settings')}); use the same settings, or delete it to start over"
        )
    state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RecoveryError(
            f"recovery checkpoint {str(path)!r} does not fit this pruned model; delete it"
        ) from exc
    opt_state = opt.state_dict()
    for i, group_state in _optimizer_entries(tensors).items():
        opt_state["state"][i] = group_state
    opt.load_state_dict(opt_state)
    best = {k[len("best/") :]: v for k, v in tensors.items() if k.startswith("best/")} or None
    return record, best


def _optimizer_entries(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, i, key = k.split("/", 2)
            out.setdefault(int(i), {})[key] = v
    return out


# ------------------------------------------------------------------------------ recover


def check_pair(student: nn.Module, teacher: nn.Module, data: CalibrationSet) -> int:
    """Student and teacher must give logits of one shape on the data; labels must fit them."""
    x = torch.from_numpy(np.ascontiguousarray(data.inputs[:2]))
    with torch.no_grad():
        try:
            s = _logits(student.eval()(x), "student")
            t = _logits(teacher.eval()(x), "teacher")
        except RecoveryError:
            raise
        except Exception as exc:
            raise RecoveryError(
                f"recovery: a model cannot run on the data's samples {list(data.sample_shape)} "
                f"({type(exc).__name__}); give data with the model's input shape"
            ) from exc
    if s.shape != t.shape:
        raise RecoveryError(
            f"recovery: the teacher gives {tuple(t.shape[1:])} outputs per sample but the pruned "
            f"student gives {tuple(s.shape[1:])}; the teacher must be the unpruned model of the plan"
        )
    classes = int(s.shape[1])
    if data.labels is not None and len(data) and int(data.labels.max()) >= classes:
        raise RecoveryError(
            f"recovery: labels go up to {int(data.labels.max())} but the model has {classes} "
            "outputs; the labels do not fit this model (wrong data, or --num-classes)"
        )
    return classes


def recover(
    student: nn.Module,
    teacher: nn.Module,
    data: CalibrationSet,
    heldout: CalibrationSet | None = None,
    config: RecoveryConfig | None = None,
    *,
    plan_digest: str = "",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> RecoveryResult:
    """Train `student` in place toward `teacher` (and labels) on `data`; return it and a record.

    `heldout` (labelled, never the training samples) gives the accuracy on the progress bar, the
    early stop, and the best weights, which are the ones returned. With `checkpoint`, a checkpoint
    is written every `checkpoint_every` steps and at the end, and an existing one for the same
    plan and settings is resumed. `stop_after` ends the run after that many steps of this call
    (what an interruption does), leaving the checkpoint to resume from.
    """
    config = (config or RecoveryConfig()).validate()
    if len(data) < 2:
        raise RecoveryError(
            f"recovery needs training samples (labelled or not), got {len(data)}; give "
            "--recover-data"
        )
    if not np.all(np.isfinite(data.inputs[: min(len(data), 4096)])):
        raise RecoveryError("recovery data contains NaN or inf values")
    dist = Dist.current()
    if config.batch_size % dist.world:
        raise RecoveryError(
            f"recovery batch size {config.batch_size} does not split into {dist.world} equal "
            "process shares; choose a multiple of the process count"
        )
    check_pair(student, teacher, data)
    if heldout is not None:
        heldout.require_labels()
        check_pair(student, teacher, heldout)
    teacher.eval()  # its outputs are taken under no_grad; its own flags stay the caller's
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise RecoveryError("recovery: the pruned model has no trainable parameter")
    opt = _make_optimizer(config, params)
    total = config.total_steps(len(data))
    eval_every = config.eval_every or max(1, total // 4)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    labels = None if data.labels is None else torch.from_numpy(data.labels.astype(np.int64))
    x_all = torch.from_numpy(data.inputs)

    start, history, best_state, best_acc, best_step, bad_evals = 0, [], None, -1.0, None, 0
    resumed, stopped = None, False
    if ckpt is not None and ckpt.is_file():
        record, best_state = _restore(ckpt, student, opt, plan_digest, config)
        start, history = int(record["step"]), list(record["history"])
        best_acc, best_step = float(record["best_acc"]), record["best_step"]
        bad_evals, resumed = int(record["bad_evals"]), start
        stopped = bool(record.get("stopped", False))
    before = None
    if heldout is not None:
        before = (
            history[0]["heldout"]
            if history and "heldout" in history[0]
            else heldout_accuracy(student, heldout, dist)
        )
        if not history:
            history.append({"step": 0, "heldout": before})
    train_model: nn.Module = student
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(student, broadcast_buffers=config.bn_mode == "train")

    def write_checkpoint(step: int) -> None:
        if ckpt is None:
            return
        if dist.rank == 0:
            record = {"plan": plan_digest, "config": config.digest(),
                      "settings": config.to_json(), "step": step, "history": history,
                      "best_acc": best_acc, "best_step": best_step, "bad_evals": bad_evals,
                      "stopped": stopped}  # fmt: skip
            save_checkpoint(ckpt, student, opt, best_state, record)
        dist.barrier()

    share = config.batch_size // dist.world
    t0 = time.perf_counter()
    seen = 0
    step = start
    bar = tqdm(total=total, initial=start, desc="recover", disable=not progress or dist.rank != 0,
               leave=False, unit="step")  # fmt: skip
    with bar, torch.random.fork_rng(devices=[]):
        while step < total and not stopped:
            if stop_after is not None and step - start >= stop_after:
                write_checkpoint(step)
                break
            gen = torch.Generator().manual_seed(_seed_of(config.seed, 2, step))
            idx = step_indices(len(data), config.batch_size, config.seed, step)
            xb = augment_batch(x_all[idx], config.augment, gen)
            lo = dist.rank * share if len(idx) >= config.batch_size else 0
            hi = lo + share if len(idx) >= config.batch_size else len(idx)
            xb = xb[lo:hi]
            yb = None if labels is None else labels[idx][lo:hi]
            torch.manual_seed(_seed_of(config.seed, 3, step))
            for group in opt.param_groups:
                group["lr"] = _lr_at(config, step, total)
            with torch.no_grad():
                t_out = _logits(teacher(xb), "teacher")
            _set_modes(student, config.bn_mode)
            s_out = _logits(train_model(xb), "student")
            loss = distillation_loss(s_out, t_out, yb, config.temperature, config.kd_weight)
            if not torch.isfinite(loss):
                raise RecoveryError(
                    f"recovery diverged at step {step} (loss {loss.item()}); lower --recover-lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(xb) * dist.world
            loss_value = dist.all_sum([loss.item()])[0] / dist.world
            if on_step is not None:
                on_step(step, loss_value)
            entry: dict[str, float] = {"step": step, "loss": loss_value}
            if heldout is not None and (step % eval_every == 0 or step == total):
                acc = heldout_accuracy(student, heldout, dist)
                entry["heldout"] = acc
                if acc > best_acc:
                    best_acc, best_step, bad_evals = acc, step, 0
                    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
                else:
                    bad_evals += 1
                bar.set_postfix(loss=f"{loss_value:.3f}", heldout=f"{acc:.4f}")
                if config.patience and bad_evals >= config.patience:
                    stopped = True
            elif step % 10 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if step % 10 == 0 or "heldout" in entry or step == total:
                history.append(entry)
            bar.update(1)
            if stopped:
                break
            if step % checkpoint_every == 0 and step < total:
                write_checkpoint(step)
    seconds = time.perf_counter() - t0
    finished = step >= total or stopped
    if finished:
        if best_state is not None and heldout is not None:
            student.load_state_dict(best_state)
        write_checkpoint(step)
    student.eval()
    after = heldout_accuracy(student, heldout, dist) if heldout is not None and finished else None
    return RecoveryResult(
        model=student,
        config=config,
        steps=step,
        total_steps=total,
        history=history,
        heldout_before=before,
        heldout_after=after,
        best_step=best_step,
        stopped_early=stopped,
        resumed_from=resumed,
        seconds=seconds,
        samples_per_second=seen / seconds if seconds > 0 else 0.0,
        world_size=dist.world,
        label_free=labels is None,
    )
