"""FAIR scores for dense tasks (segmentation, detection): U per output position.

A classifier has one label per sample; a dense model has one per output position. Each
position's label is the target label map (segmentation), the class of the smallest box covering
it (detection, background 0 elsewhere), or the unpruned model's own per-pixel argmax when no
targets are given. For every candidate layer the label map is brought to the layer's output
resolution by majority pooling (one-hot, adaptive average pool, argmax; ties to the lower class
index; nearest when the layer is finer than the map). A conv channel's value at one position is
a scalar, so each class's distribution is 1-D and W1 is exact (no projections). Positions are
subsampled per class with a seeded cap (`samples_per_class`): every position draws a uniform key
from a per-layer generator and each class keeps the positions with the smallest keys (a uniform
sample without replacement), merged batch by batch, so memory per layer is at most
classes x cap x channels floats. Background is a class; the label 255 is ignored.

R is the classifier's Taylor term, sum over images and positions of a * dL/da, with the task's
loss: pixel-wise cross-entropy for segmentation, a user loss (module:function) otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from calibration.errors import CalibrationError
from pipeline.plan import ModelFingerprint
from pipeline.scores import LayerScores, Scores, ScoringError

TASKS = ("classification", "segmentation", "detection")
IGNORE = 255  # label-map value that marks positions without a label (VOC convention)

Loss = Callable[[Any, Any], torch.Tensor]


# --------------------------------------------------------------------------- outputs, targets


def dense_logits(output: Any) -> torch.Tensor:
    """The N x classes x H x W logits of a segmentation model's output (tensor, dict 'out', tuple)."""
    t: Any = output
    if isinstance(output, dict):
        t = output.get("out", next(iter(output.values()), None) if len(output) == 1 else None)
    elif isinstance(output, (tuple, list)):
        t = output[0] if output else None
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(output).__name__
        raise ScoringError(
            f"a segmentation model must return N x classes x H x W logits (a tensor, a dict with "
            f"'out', or a tuple starting with it), got {got}; pass --loss module:function for "
            "other outputs"
        )
    return t


def boxes_to_label_map(boxes: np.ndarray, labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """H x W map: the class of the smallest box covering each pixel, background 0 elsewhere.

    boxes: M x 4 (x1, y1, x2, y2) in pixels, labels: M classes >= 1. Boxes are painted largest
    first, so the smallest covering box wins (ties: the later box in the list).
    """
    h, w = shape
    out = np.zeros((h, w), dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    if len(boxes) != len(labels):
        raise CalibrationError(f"{len(boxes)} boxes but {len(labels)} box labels in one image")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in np.argsort(-area, kind="stable"):
        x1, y1, x2, y2 = boxes[i]
        c0, r0 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        c1, r1 = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
        if c1 > c0 and r1 > r0:
            out[r0:r1, c0:c1] = int(labels[i])
    return out


def pool_labels(labels: torch.Tensor, size: tuple[int, int], n_classes: int) -> torch.Tensor:
    """N x H x W label maps at N x h x w: majority per cell (IGNORE kept as its own value)."""
    if tuple(labels.shape[1:]) == tuple(size):
        return labels
    if size[0] >= labels.shape[1] and size[1] >= labels.shape[2]:
        up = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
        return up[:, 0].long()
    ign = labels == IGNORE
    idx = torch.where(ign, torch.full_like(labels, n_classes), labels)
    onehot = F.one_hot(idx, n_classes + 1).permute(0, 3, 1, 2).float()
    pooled = F.adaptive_avg_pool2d(onehot, size).argmax(dim=1)
    return torch.where(pooled == n_classes, torch.full_like(pooled, IGNORE), pooled)


def segmentation_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy; label maps are brought to the logits' size (nearest)."""
    logits = dense_logits(output)
    if tuple(target.shape[1:]) != tuple(logits.shape[2:]):
        target = F.interpolate(target[:, None].float(), size=logits.shape[2:], mode="nearest")
        target = target[:, 0].long()
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE)


def checked_loss(fn: Loss, what: str) -> Loss:
    """`fn` with its failures and non-scalar results turned into one ScoringError line."""

    def run(output: Any, target: Any) -> torch.Tensor:
        try:
            value = fn(output, target)
        except (ScoringError, CalibrationError):
            raise
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc) else ""
            raise ScoringError(
                f"{what} failed: {type(exc).__name__}: {msg}; it must take (model output, "
                "targets) and return a scalar tensor"
            ) from exc
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ScoringError(
                f"{what} returned {got}, not a scalar tensor; reduce it (e.g. .mean())"
            )
        return value.reshape(())

    return run


# --------------------------------------------------------------------------- per-class sample


@dataclass
class _Sample:
    """Per class, the `cap` positions with the smallest seeded keys seen so far."""

    cap: int
    gen: torch.Generator
    vals: torch.Tensor | None = None  # M x C
    lab: torch.Tensor | None = None  # M
    key: torch.Tensor | None = None  # M

    def add(self, vals: torch.Tensor, lab: torch.Tensor) -> None:
        key = torch.rand(lab.shape[0], generator=self.gen, dtype=torch.float64).to(lab.device)
        keep = lab != IGNORE
        vals, lab, key = vals[keep], lab[keep], key[keep]
        if self.vals is not None:
            vals, lab, key = (
                torch.cat([self.vals, vals]),
                torch.cat([self.lab, lab]),
                torch.cat([self.key, key]),
            )
        order = torch.argsort(key)
        order = order[torch.argsort(lab[order], stable=True)]  # by class, then key
        lab_s = lab[order]
        first = torch.ones_like(lab_s, dtype=torch.bool)
        first[1:] = lab_s[1:] != lab_s[:-1]
        starts = torch.cummax(torch.where(first, torch.arange(len(lab_s), device=lab.device), 0), 0)
        rank = torch.arange(len(lab_s), device=lab.device) - starts.values
        sel = order[rank < self.cap]
        self.vals, self.lab, self.key = vals[sel], lab[sel], key[sel]


def exact_u(vals: torch.Tensor, lab: torch.Tensor) -> tuple[np.ndarray, list[int]]:
    """U per channel (max over class pairs of the exact 1-D W1) and the classes it compared."""
    from pipeline.scoring import pairwise_w1_max

    classes, counts = torch.unique(lab, return_counts=True)
    usable = classes[counts >= 2]
    if usable.numel() < 2:
        return np.zeros(vals.shape[1]), [int(c) for c in usable]
    keep = torch.isin(lab, usable)
    cls = torch.searchsorted(usable, lab[keep])
    u = pairwise_w1_max(vals[keep][:, :, None], cls, int(usable.numel()))
    return u.cpu().numpy(), [int(c) for c in usable]


# --------------------------------------------------------------------------- scoring


def _targets(
    model: nn.Module, task: str, x: torch.Tensor, targets: Any, batch_size: int
) -> tuple[torch.Tensor, Any, str]:
    """(N x H x W label maps for U, targets for the loss, where the labels came from)."""
    n, hw = x.shape[0], tuple(x.shape[-2:])
    if task == "detection":
        if targets is None:
            raise CalibrationError(
                "detection scoring needs box targets (boxes and labels per image); the raw head "
                "outputs cannot be decoded into pseudo labels here"
            )
        if not isinstance(targets, (list, tuple)) or len(targets) != n:
            raise CalibrationError(
                f"detection targets must be one dict of 'boxes' and 'labels' per image ({n})"
            )
        maps = [
            boxes_to_label_map(np.asarray(t["boxes"]), np.asarray(t["labels"]), hw) for t in targets
        ]
        return torch.from_numpy(np.stack(maps)), list(targets), "boxes"
    if targets is None:
        with torch.no_grad():
            maps = [
                dense_logits(model(x[s : s + batch_size])).argmax(dim=1).cpu()
                for s in range(0, n, batch_size)
            ]
        y = torch.cat(maps)
        return y, y, "pseudo"
    y = torch.as_tensor(np.asarray(targets))
    if y.dim() != 3 or y.shape[0] != n:
        raise CalibrationError(
            f"segmentation label maps must be N x H x W with N={n}, got {list(y.shape)}"
        )
    if y.is_floating_point() or y.dtype == torch.bool:
        raise CalibrationError(f"label maps must hold integer classes, got {y.dtype}")
    y = y.long()
    if int(y.min()) < 0:
        raise CalibrationError(f"label maps must be >= 0 (255 = ignore), found {int(y.min())}")
    return y, y, "given"


def score_dense(
    model: nn.Module,
    data: Any,
    *,
    task: str,
    loss: Loss | None = None,
    samples_per_class: int = 32,
    seed: int = 0,
    where: str = "raw",
    progress: bool = True,
    batch_size: int = 16,
) -> Scores:
    """U (per position, exact 1-D W1) and R (Taylor term of the task loss) for a dense model.

    `data`: (inputs N x C x H x W, targets): targets None (segmentation only: the model's own
    per-pixel argmax), N x H x W integer label maps (segmentation, 255 = ignore), or one dict
    {'boxes': M x 4 xyxy pixels, 'labels': M} per image (detection, with `loss`).
    `samples_per_class`: positions kept per class and layer (a sample is one position here).
    """
    from pipeline.scoring import (
        CANDIDATE_TYPES,
        _model_untouched,
        _probe,
        layer_seed,
    )

    if task not in TASKS[1:]:
        raise ScoringError(f"task={task!r} is not one of {', '.join(TASKS)}")
    if where != "raw":
        raise ScoringError(f"where={where!r}: dense tasks measure U on the raw layer output only")
    if task == "detection" and loss is None:
        raise ScoringError(
            "detection scoring needs the task's loss: pass loss= (--loss module:function) taking "
            "(raw head outputs, targets)"
        )
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise CalibrationError("dense calibration data must be (inputs, targets or None)")
    x = torch.as_tensor(np.asarray(data[0])) if not isinstance(data[0], torch.Tensor) else data[0]
    if x.dim() != 4 or x.shape[0] == 0:
        raise CalibrationError(f"dense tasks need N x C x H x W inputs, got {list(x.shape)}")
    params = [p for p in model.parameters() if p.is_floating_point()]
    dev, dtype = (params[0].device, params[0].dtype) if params else (torch.device("cpu"), x.dtype)
    x = x.detach().to(device=dev, dtype=dtype)
    loss_fn = loss or segmentation_loss
    candidates_all = [m for m in model.modules() if isinstance(m, CANDIDATE_TYPES)]
    if not candidates_all:
        raise ScoringError("the model has no Conv1d/Conv2d/Linear layer to prune")
    with torch.random.fork_rng(), _model_untouched(model, False, candidates_all):
        torch.manual_seed(seed)
        model.eval()
        maps, loss_targets, source = _targets(model, task, x, data[1], batch_size)
        valid = maps[maps != IGNORE]
        present = sorted(int(c) for c in torch.unique(valid))
        if len(present) < 2:
            raise CalibrationError(
                f"the {'pseudo ' if source == 'pseudo' else ''}label maps hold "
                f"{len(present)} class(es); U compares classes, give data with at least 2"
            )
        if task == "segmentation":
            with torch.no_grad():
                k = dense_logits(model(x[:1])).shape[1]
            if max(present) >= k:
                raise CalibrationError(
                    f"label {max(present)} is out of range for a model with {k} classes; check "
                    "the label maps (255 marks ignored pixels)"
                )
        # compact class indices: the pooling's one-hot has one plane per present class only
        lut = torch.full((max(max(present), IGNORE) + 1,), IGNORE, dtype=torch.long)
        lut[torch.tensor(present)] = torch.arange(len(present))
        compact = lut[maps]
        probe = _probe(model, x[:2])
        if not probe.candidates:
            raise ScoringError(
                "the model has no prunable layer: every Conv/Linear is an output layer or shared"
            )
        samples = {
            n: _Sample(
                samples_per_class,
                torch.Generator(device="cpu").manual_seed(layer_seed(seed, n)),
            )
            for n in probe.candidates
        }
        r_signed, positions, notes = _pass(
            model,
            x,
            compact,
            loss_targets,
            loss_fn,
            probe,
            samples,
            len(present),
            batch_size,
            progress,
        )
    layers: dict[str, LayerScores] = {}
    graph = {k: dict(v) for k, v in probe.graph.items()}
    for name in probe.candidates:
        s = samples[name]
        if s.vals is None:
            u, used = np.zeros(r_signed[name].shape[0]), []
        else:
            u, used = exact_u(s.vals, s.lab)
        if len(used) < 2:
            notes.setdefault(
                name, "fewer than 2 classes with 2 positions at this resolution: U set to 0"
            )
        if name in notes:
            graph[name]["u_note"] = notes[name]
        mod = model.get_submodule(name)
        layers[name] = LayerScores(
            name=name,
            kind=probe.kinds[name],
            U=np.asarray(u, dtype=np.float64),
            R=r_signed[name].abs().cpu().numpy(),
            weight_shape=[int(d) for d in mod.weight.shape],
            positions=positions.get(name, 1),
            where="raw",
            bn=probe.bn.get(name),
            act=probe.act.get(name),
        )
    counts = torch.bincount(valid, minlength=max(present) + 1)
    return Scores(
        layers=layers,
        fingerprint=ModelFingerprint.from_model(model),
        where="raw",
        seed=seed,
        projections=1,
        samples_per_class=samples_per_class,
        classes=present,
        class_counts=[int(counts[c]) for c in present],
        n_classes_total=len(present),
        mode="eval",
        output_layers=probe.output_layers,
        skipped=probe.skipped,
        graph=graph,
    )


def _pass(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    loss_targets: Any,
    loss_fn: Loss,
    probe: Any,
    samples: dict[str, _Sample],
    n_classes: int,
    batch_size: int,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, str]]:
    """One forward+backward per batch: per-class position samples (U) and a * dL/da sums (R)."""
    raw: dict[str, torch.Tensor] = {}
    version: dict[str, int] = {}
    positions: dict[str, int] = {}
    notes: dict[str, str] = {}
    r_signed: dict[str, torch.Tensor] = {}
    cur: dict[str, torch.Tensor] = {}
    pooled: dict[tuple[int, int], torch.Tensor] = {}

    def record(name: str, out: torch.Tensor) -> None:
        o = out.detach().float()
        if o.dim() == 4:
            size = (o.shape[2], o.shape[3])
        elif o.dim() == 2:
            size = (1, 1)
        else:
            notes[name] = f"output of shape {list(o.shape)} has no image positions: U set to 0"
            return
        positions[name] = size[0] * size[1]
        if size not in pooled:
            pooled[size] = pool_labels(cur["maps"], size, n_classes)
        lab = pooled[size].reshape(-1).to(o.device)
        vals = o.reshape(o.shape[0], o.shape[1], -1).permute(0, 2, 1).reshape(-1, o.shape[1])
        samples[name].add(vals, lab)

    def hook(name: str) -> Callable[..., Any]:
        def run(mod: nn.Module, inp: Any, out: torch.Tensor) -> torch.Tensor | None:
            raw[name] = out
            version[name] = out._version
            record(name, out)
            return out.clone() if name in probe.inplace else None

        return run

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in probe.candidates]
    n = x.shape[0]
    try:
        for s in tqdm(
            range(0, n, batch_size), desc="FAIR scoring", unit="batch", disable=not progress
        ):
            raw.clear()
            pooled.clear()
            cur["maps"] = maps[s : s + batch_size]
            tb = loss_targets[s : s + batch_size]
            with torch.enable_grad():
                out = model(x[s : s + batch_size])
                lv = loss_fn(out, tb.to(x.device) if isinstance(tb, torch.Tensor) else tb)
                if not bool(torch.isfinite(lv).all()):
                    raise CalibrationError(
                        "the loss is NaN or inf on the calibration data; check targets and model"
                    )
                if not lv.requires_grad:
                    raise ScoringError(
                        "the loss does not depend on the model's layers; return the raw outputs"
                    )
                outs = [raw[m] for m in probe.candidates]
                for m, a in zip(probe.candidates, outs, strict=True):
                    if a._version != version[m]:
                        raise ScoringError(f"layer {m!r}'s output was modified in place")
                grads = torch.autograd.grad(lv, outs, allow_unused=True)
            with torch.no_grad():
                for m, a, g in zip(probe.candidates, outs, grads, strict=True):
                    ch = 1 if probe.kinds[m] == "conv" else -1
                    r = r_signed.setdefault(
                        m, torch.zeros(a.shape[ch], dtype=torch.float64, device=a.device)
                    )
                    if g is None:
                        continue
                    af, gf = a.float(), g.float()
                    if ch == -1:
                        af, gf = af.reshape(-1, a.shape[-1]).T, gf.reshape(-1, a.shape[-1]).T
                    else:
                        af = af.transpose(0, 1).reshape(a.shape[1], -1)
                        gf = gf.transpose(0, 1).reshape(a.shape[1], -1)
                    r += torch.linalg.vecdot(af, gf).double()
    finally:
        for h in handles:
            h.remove()
    for m in probe.candidates:
        if not bool(torch.isfinite(r_signed[m]).all()):
            raise CalibrationError(f"layer {m!r} has NaN or inf gradients on the calibration data")
    return r_signed, positions, notes
