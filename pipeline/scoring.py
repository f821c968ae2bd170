"""FAIR scores (Utilization U, Reconstruction R) for every candidate layer, in one pass.

Candidates are the Conv1d/Conv2d/Linear modules called once per forward whose output does not
reach the model's output without passing through another Conv/Linear (found on the autograd
graph of a 2-sample probe pass, so 'output layer' means graph position, not module order).

U: one forward pass over the balanced calibration samples. A forward hook per candidate turns its
output into units x positions (C x H*W for a conv, F x 1 for a linear), projects the positions
immediately onto P seeded unit directions (one torch.Generator per layer, seeded from
(seed, crc32(layer name))) and stores only N x C x P float32 per layer (N x C for one-position
outputs, where the 1-D W1 is exact) in a U store (pipeline/ustore.py): in memory, or in files on
disk when the memory budget (pipeline/membudget.py) cannot hold it beside a batch; the budget
also sets the batch size. Peak memory: what is in use at the start plus one batch of activations
plus the store when in memory; then a few copies of one chunk of units while its W1 is computed
(chunks of whole units over all samples). W1: each class's samples are sorted and
laid out as its quantile function on the grid shared by all classes (equal counts: the sorted
samples / n; unequal counts: the union of the breakpoints i/n_c, widths folded in), so W1(a, b)
is the L1 distance of two rows, exactly scipy.stats.wasserstein_distance; one batched
torch.cdist(p=1) per chunk of units gives every class pair for every unit and direction.
U = max over pairs of the mean over directions.

R: per batch, sum over samples and positions of a * dL/da on each candidate's raw output a
(equal to sum w * dL/dw + b * dL/db of the unit's weights, bias included), from one
torch.autograd.grad call per batch over all candidate outputs; signed per batch, absolute value
after the last batch. Eval mode by default; reference_compat=True scores in train mode like the
authors' reference (BN batch statistics), restoring every buffer afterwards.

'where' picks the tensor U is measured on: 'raw' (the layer output), 'bn' (the output of the
BatchNorm module whose input is exactly that tensor), 'act' (the output of the activation module
whose input is the BN output, or the raw output when there is no BN). Found by tensor identity
in the probe pass; when a stage is missing the layer falls back to the latest one present
(act -> bn -> raw) and Scores records what was used per layer.

Under torchrun every process scores batches b with b % world == rank; per-batch R is summed in
batch order after an all-reduce, and chunk j of U's units is computed on process j % world from
every process's rows (gather), so the result equals one process with the same batch size.

The user's model is left as it was: train/eval flag of every module, requires_grad of every
parameter, .grad, buffers, hooks and the global RNG state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from calibration.errors import CalibrationError
from pipeline.attention import HeadOutputs, heads_exposed
from pipeline.membudget import (
    ACTIVATION_FACTOR,
    STORES,
    MemoryPlan,
    default_budget,
    gb,
    parse_size,
    peak_bytes,
    plan_memory,
    release_free_memory,
    reserve,
    used_bytes,
)
from pipeline.plan import ModelFingerprint
from pipeline.recovery import Dist
from pipeline.scores import LayerScores, Scores, ScoringError
from pipeline.ustore import FLOAT_BYTES, DiskStore, MemoryStore, UStore

CANDIDATE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear, HeadOutputs)
ACTIVATION_TYPES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.LogSigmoid,
)
WHERE_CHOICES = ("raw", "bn", "act")
PAIR_CHUNK_ELEMENTS = 1 << 23  # float32 elements per class-pair chunk of the W1 computation
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- directions, W1


def layer_seed(seed: int, layer: str) -> int:
    """A stable per-layer seed (crc32 of the name, not Python's salted hash())."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(layer.encode("utf-8"))) % (1 << 63)


def projection_directions(seed: int, layer: str, dim: int, projections: int) -> torch.Tensor:
    """The layer's P unit directions in R^dim (dim x P, float32, CPU), shared by all classes."""
    g = torch.Generator(device="cpu").manual_seed(layer_seed(seed, layer))
    d = torch.randn(dim, projections, generator=g, dtype=torch.float64)
    d /= d.norm(dim=0, keepdim=True)
    return d.to(torch.float32)


def unit_view(out: torch.Tensor, kind: str) -> torch.Tensor:
    """A layer output as batch x units x positions, float32."""
    out = out.detach()
    b = out.shape[0]
    if kind == "conv":
        v = out.reshape(b, out.shape[1], -1)
    elif out.dim() == 2:
        v = out.unsqueeze(-1)
    else:
        v = out.reshape(b, -1, out.shape[-1]).transpose(1, 2)
    return v.to(torch.float32)


def merged_quantile_grid(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The quantile grid shared by classes with these sample counts.

    Every class's empirical quantile function is constant on each interval (t_{j-1}, t_j] of the
    union of the breakpoints {i / n_c}; there it equals the class's sorted sample idx[c, j]
    (0-based). Returns idx (K x L, int64) and the interval widths w (L, float64), so that
    W1(a, b) = sum_j w[j] * |sorted_a[idx[a, j]] - sorted_b[idx[b, j]]| exactly
    (scipy.stats.wasserstein_distance computes the same integral on the CDF side).
    """
    points = sorted({Fraction(i, n) for n in set(counts) for i in range(1, n + 1)})
    num = np.array([f.numerator for f in points], dtype=np.int64)
    den = np.array([f.denominator for f in points], dtype=np.int64)
    w = np.diff(np.concatenate([[0.0], num / den]))
    n = np.asarray(counts, dtype=np.int64)[:, None]
    idx = (num[None, :] * n + den[None, :] - 1) // den[None, :] - 1  # ceil(t * n_c) - 1
    return idx, w


def class_quantiles(x: torch.Tensor, cls: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """C x Q x K x L: per unit and direction, each class's quantile function on the shared grid,
    already multiplied by the grid widths, so W1(a, b) is the L1 distance of two rows."""
    n, c, q = x.shape
    k, n_max = len(counts), max(counts)
    order = torch.argsort(cls, stable=True)
    equal = all(m == n_max for m in counts)
    if equal:
        xs = x[order].reshape(k, n_max, c, q)
    else:
        cnt = torch.tensor(counts, device=x.device)
        starts = torch.cumsum(cnt, 0) - cnt
        pos = torch.arange(n, device=x.device) - starts[cls[order]]
        xs = x.new_full((k, n_max, c, q), float("inf"))
        xs[cls[order], pos] = x[order]
    xs = xs.permute(2, 3, 0, 1).contiguous()  # C x Q x K x n_max
    if xs.device.type == "cpu":  # numpy's SIMD sort is ~10x faster than torch's on short rows
        xs.numpy().sort(axis=-1)
    else:
        xs = torch.sort(xs, dim=-1).values
    if equal:
        return xs.mul_(1.0 / n_max)
    idx, w = merged_quantile_grid(counts)
    idx_t = torch.from_numpy(idx).to(x.device)
    xs = torch.gather(xs, -1, idx_t.expand(c, q, k, idx.shape[1]))
    return xs.mul_(torch.from_numpy(w).to(device=x.device, dtype=xs.dtype))


def pairwise_w1_max(x: torch.Tensor, cls: torch.Tensor, n_classes: int) -> torch.Tensor:
    """U per unit: max over class pairs of the (direction-averaged) 1-D W1 distance.

    x: N x C x Q samples (Q directions, 1 for exact 1-D), cls: N class indices in 0..K-1, every
    class with at least 2 samples. All class pairs at once as a batched L1 distance matrix
    (torch.cdist, p=1) per unit and direction, units in chunks of PAIR_CHUNK_ELEMENTS.
    Returns C float64 values (on x's device).
    """
    _, c, q = x.shape
    cls = cls.to(x.device)
    counts = torch.bincount(cls, minlength=n_classes).tolist()
    quant = class_quantiles(x.to(torch.float32), cls, counts)  # C x Q x K x L
    k, length = quant.shape[2], quant.shape[3]
    out = torch.empty(c, dtype=torch.float64, device=x.device)
    step = max(1, PAIR_CHUNK_ELEMENTS // (q * k * k))
    for s in range(0, c, step):  # chunks of units, to bound the K x K distance matrices
        blk = quant[s : s + step].reshape(-1, k, length)
        d = torch.cdist(blk, blk, p=1).reshape(-1, q, k, k).mean(dim=1)  # mean over directions
        out[s : s + step] = d.amax(dim=(1, 2)).double()  # the diagonal is 0: max is over pairs
    return out


# --------------------------------------------------------------------------- model state


@contextlib.contextmanager
def _model_untouched(model: nn.Module, train: bool, candidates: list[nn.Module]) -> Iterator[None]:
    """Set the scoring mode; restore modes, requires_grad, buffers and the RNG afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if train else []
    try:
        model.train(train)
        for m in candidates:
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
        yield
    finally:
        for m, t in modes:
            m.training = t
        for p, rg in grads:
            p.requires_grad_(rg)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


# --------------------------------------------------------------------------- calibration data


@dataclass
class _Selection:
    x: torch.Tensor  # N x ..., in forward order (classes interleaved)
    y: torch.Tensor  # N original labels
    cls: torch.Tensor  # N class indices into `classes`
    classes: list[int]
    counts: list[int]
    n_classes_total: int


def _as_tensor(v: Any, what: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach()
    try:
        return torch.as_tensor(np.asarray(v))
    except (TypeError, ValueError) as exc:
        raise CalibrationError(
            f"calibration {what} is not an array or tensor ({type(v).__name__})"
        ) from exc


def _batches(data: Any) -> Iterable[Any]:
    if hasattr(data, "inputs") and hasattr(data, "labels"):
        return [(data.inputs, data.labels)]
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], (torch.Tensor, np.ndarray))
    ):
        return [tuple(data)]
    return data


def _pseudo_labels(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Top-1 predictions of the unpruned model, for calibration data without labels."""
    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            o = model(x[s : s + batch_size])
            if not isinstance(o, torch.Tensor):
                raise CalibrationError(
                    "unlabelled calibration data needs a model returning one logits tensor"
                )
            out.append(o.reshape(o.shape[0], -1).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _select(
    model: nn.Module,
    data: Any,
    spc: int,
    max_classes: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    budget: int,
) -> _Selection:
    """The first `spc` samples of each class in data order; a seeded class subset above the cap.
    Stops in one line as soon as the samples kept so far no longer fit in the memory budget."""
    per_class: dict[int, list[torch.Tensor]] = {}
    taken: dict[int, int] = {}
    in_use = used_bytes(device)
    room, held = budget - reserve(budget) - in_use, 0
    if room <= 0:
        raise ScoringError(
            f"scoring needs at least {gb(in_use + reserve(budget))} before any sample "
            f"({gb(in_use)} in use, {gb(reserve(budget))} reserve) but the memory budget is "
            f"{gb(budget)}; raise --max-memory"
        )
    try:
        it = iter(_batches(data))
    except TypeError as exc:
        raise CalibrationError(
            f"calibration data must be (inputs, labels), a CalibrationSet or an iterable of "
            f"(inputs, labels) batches, not {type(data).__name__}"
        ) from exc
    for batch in it:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise CalibrationError("each calibration batch must be an (inputs, labels) pair")
        xb = _as_tensor(batch[0], "inputs")
        if xb.dim() == 0 or xb.shape[0] == 0:
            continue
        if batch[1] is None:
            xb = xb.to(device)
            xb = xb.to(dtype) if xb.is_floating_point() else xb
            yb = _pseudo_labels(model, xb, batch_size)
        else:
            yb = _as_tensor(batch[1], "labels").reshape(-1).cpu()
            if yb.is_floating_point() or yb.is_complex() or yb.dtype == torch.bool:
                raise CalibrationError(f"calibration labels must be integers, got {yb.dtype}")
            yb = yb.long()
            if yb.numel() and int(yb.min()) < 0:
                raise CalibrationError(f"calibration labels must be >= 0, found {int(yb.min())}")
        if yb.shape[0] != xb.shape[0]:
            raise CalibrationError(
                f"calibration batch has {xb.shape[0]} inputs but {yb.shape[0]} labels"
            )
        for c in torch.unique(yb).tolist():
            need = spc - taken.get(c, 0)
            if need <= 0:
                continue
            idx = torch.nonzero(yb == c).flatten()[:need]
            rows = xb[idx.to(xb.device)].to(device)  # only the kept rows move to the device
            per_class.setdefault(c, []).append(rows.to(dtype) if rows.is_floating_point() else rows)
            taken[c] = taken.get(c, 0) + idx.numel()
            held += per_class[c][-1].nbytes
            if held > room:
                raise ScoringError(
                    f"the calibration samples alone pass the memory budget {gb(budget)} after "
                    f"{sum(taken.values())} samples ({gb(held)} beside what is in use and the "
                    "reserve); raise --max-memory or lower --samples-per-class"
                )
    if not per_class:
        raise CalibrationError(
            "calibration data is empty: give at least 2 samples of each of 2 classes"
        )
    classes = sorted(per_class)
    n_total = len(classes)
    if n_total < 2:
        raise CalibrationError(
            f"calibration data has only one class ({classes[0]}); U compares classes, give at least 2"
        )
    if n_total > max_classes:
        rng = np.random.default_rng(seed)
        classes = sorted(int(c) for c in rng.choice(classes, size=max_classes, replace=False))
    small = [c for c in classes if taken[c] < 2]
    if small:
        raise CalibrationError(
            f"class(es) {small[:10]} have fewer than 2 calibration samples; give at least 2 per class"
        )
    counts = [taken[c] for c in classes]
    # interleave classes so every batch mixes them (matters for train-mode BN statistics)
    key = torch.cat([torch.arange(n) * len(classes) + i for i, n in enumerate(counts)])
    order = torch.argsort(key)
    cls_idx = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(counts)])[
        order
    ]
    x = _interleaved(per_class, classes, order)
    y = torch.tensor(classes, dtype=torch.long)[cls_idx]
    return _Selection(x, y.to(device), cls_idx, classes, counts, n_total)


def _selection_hash(sel: _Selection, rows: int = 256) -> str:
    """SHA-256 of the selected samples and labels, read a few rows at a time (no full copy)."""
    h = hashlib.sha256(sel.y.cpu().numpy().tobytes())
    for s in range(0, sel.x.shape[0], rows):  # as bytes: numpy has no bfloat16
        h.update(sel.x[s : s + rows].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _interleaved(
    per_class: dict[int, list[torch.Tensor]], classes: list[int], order: torch.Tensor
) -> torch.Tensor:
    """torch.cat of the classes' samples, rows permuted by `order`, written in place class by
    class while each class's pieces are freed: the samples exist about once, not four times
    (the pieces, each class's cat, the cat of all and its permuted copy were 8.2 GB at 3,200
    resnet50 samples, a peak above the whole scoring pass)."""
    first = per_class[classes[0]][0]
    n = int(order.numel())
    x = torch.empty((n, *first.shape[1:]), dtype=first.dtype, device=first.device)
    dest = torch.empty_like(order)
    dest[order] = torch.arange(n)  # row i of the class-major cat goes to dest[i]
    dest = dest.to(x.device)
    kept = set(classes)
    for c in [c for c in per_class if c not in kept]:
        del per_class[c]  # classes left out by max_classes
    start, freed = 0, 0
    for c in classes:
        pieces = per_class.pop(c)
        for piece in pieces:
            k = piece.shape[0]
            x[dest[start : start + k]] = piece
            start += k
            freed += piece.nbytes
        del pieces
        if freed > 8 << 20:  # small pieces live on the heap: hand their pages back as we go
            release_free_memory()
            freed = 0
    return x


# --------------------------------------------------------------------------- probe


@dataclass
class _Probe:
    candidates: list[str]  # execution order
    kinds: dict[str, str]
    output_layers: list[str]
    skipped: dict[str, str]
    inplace: set[str]
    bn: dict[str, str]
    act: dict[str, str]
    graph: dict[str, dict[str, Any]]
    logits: int | None = None  # width of a single 2-D output tensor
    saved_per_sample: int = 0  # bytes autograd saves per sample (activations, not parameters)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _reach(starts: Iterable[Any], stop: dict[Any, str]) -> list[str]:
    """Conv/Linear layers reached backwards on the autograd graph, stopping at each one."""
    found: list[str] = []
    seen: set[Any] = set()
    stack = [s for s in starts if s is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in stop:
            if stop[node] not in found:
                found.append(stop[node])
            continue
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return found


def _probe(model: nn.Module, x: torch.Tensor) -> _Probe:
    """A small forward pass with hooks on every leaf module: graph facts the scoring pass needs."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[str, nn.Module, list[torch.Tensor], torch.Tensor | None, int]] = []
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(mod: nn.Module, inp: Any, out: Any) -> None:
        o = out if isinstance(out, torch.Tensor) else None
        calls.append((names[mod], mod, _tensors(inp), o, o._version if o is not None else 0))

    def pre(mod: nn.Module, inp: Any) -> None:
        inputs.setdefault(names[mod], _tensors(inp))

    for m in model.modules():
        if next(m.children(), None) is None or isinstance(m, CANDIDATE_TYPES):
            handles.append(m.register_forward_hook(hook))
        if isinstance(m, CANDIDATE_TYPES):
            handles.append(m.register_forward_pre_hook(pre))
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:  # sizes what a backward pass keeps alive
        with contextlib.suppress(RuntimeError):  # tensors without storage (sparse, nested)
            if t.untyped_storage().data_ptr() not in fixed:  # not weights, not the input batch
                saved[(t.data_ptr(), t.nbytes)] = t.nbytes  # a view counts its own bytes only
        return t

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    n_calls: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, (name, mod, _, _, _) in enumerate(calls):
        if isinstance(mod, CANDIDATE_TYPES):
            n_calls[name] = n_calls.get(name, 0) + 1
            first.setdefault(name, i)
    skipped = {
        n: f"called {k} times per forward (shared weights)" for n, k in n_calls.items() if k > 1
    }
    layer_calls = {n: calls[i] for n, i in first.items()}
    stop = {
        c[3].grad_fn: n
        for n, c in layer_calls.items()
        if c[3] is not None and c[3].grad_fn is not None
    }
    outs = _tensors(out)
    output_layers = _reach([t.grad_fn for t in outs], stop)
    for n, c in layer_calls.items():
        if c[3] is None:
            skipped.setdefault(n, "its output is not a tensor")
        elif any(c[3] is t for t in outs) and n not in output_layers:
            output_layers.append(n)
    if not output_layers:  # output not on the autograd graph of a layer: take the last one called
        last = [n for n in sorted(layer_calls, key=first.__getitem__) if n not in skipped]
        output_layers = last[-1:]
    candidates = [
        n
        for n in sorted(layer_calls, key=first.__getitem__)
        if n not in skipped and n not in output_layers
    ]
    inplace = {n for n in candidates if layer_calls[n][3]._version != layer_calls[n][4]}
    consumers: dict[int, list[int]] = {}
    for i, (_, _, ins, _, _) in enumerate(calls):
        if ins:
            consumers.setdefault(id(ins[0]), []).append(i)

    def next_of(t: torch.Tensor, after: int, types: tuple[type, ...]) -> int | None:
        for j in consumers.get(id(t), []):
            if j > after and isinstance(calls[j][1], types):
                return j
        return None

    bn: dict[str, str] = {}
    act: dict[str, str] = {}
    bn_params: dict[str, int] = {}
    for n in candidates:
        i = first[n]
        t = layer_calls[n][3]
        j = next_of(t, i, (nn.modules.batchnorm._BatchNorm,))
        if j is not None and calls[j][3] is not None:
            bn[n] = calls[j][0]
            bn_params[n] = sum(p.numel() for p in calls[j][1].parameters(recurse=False))
            i, t = j, calls[j][3]
        k = next_of(t, i, ACTIVATION_TYPES)
        if k is not None:
            act[n] = calls[k][0]
    graph: dict[str, dict[str, Any]] = {}
    for n, (_, mod, _, o, _) in layer_calls.items():
        if o is None:
            continue
        kind = "linear" if isinstance(mod, nn.Linear) else "conv"
        units = o.shape[-1] if kind == "linear" else o.shape[1]
        producers = _reach([t.grad_fn for t in inputs.get(n, [])], stop)
        graph[n] = {
            "kind": kind,
            "weight_shape": _weight_shape(mod),
            "bias": getattr(mod, "bias", None) is not None,
            "groups": int(getattr(mod, "groups", 1)),
            "positions": int(o.numel() // max(1, o.shape[0] * units)),
            "producers": [p for p in producers if p in candidates],
            "per_channel_params": int(bn_params.get(n, 0)),
            "role": "output"
            if n in output_layers
            else ("skipped" if n in skipped else "candidate"),
        }
    kinds = {n: graph[n]["kind"] for n in candidates}
    logits = int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None
    per_sample = -(-sum(saved.values()) // max(1, x.shape[0]))
    return _Probe(
        candidates, kinds, output_layers, skipped, inplace, bn, act, graph, logits, per_sample
    )


# --------------------------------------------------------------------------- scoring pass


@dataclass
class _PassState:
    offset: int = 0
    raw: dict[str, torch.Tensor] = field(default_factory=dict)
    version: dict[str, int] = field(default_factory=dict)
    chain: dict[str, torch.Tensor] = field(default_factory=dict)
    chain_bn: dict[str, torch.Tensor] = field(default_factory=dict)
    finite: list[tuple[str, torch.Tensor]] = field(default_factory=list)


def _default_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise ScoringError(
            "the model does not return one logits tensor: pass loss=callable(output, labels)"
        )
    return F.cross_entropy(output.float(), target)


def _weight_shape(mod: nn.Module) -> list[int]:
    """A layer's weight shape; for attention heads, the packed in-projection's."""
    if isinstance(mod, HeadOutputs):
        return [int(d) for d in mod.in_proj_shape]
    return [int(d) for d in mod.weight.shape]


def _heads_named(scores: Scores, names: dict[str, str], model: nn.Module) -> Scores:
    """Scores of '<attn>.heads' filed under the attention module '<attn>' (the name its channel
    group and plan use); a head is one unit. Its out-projection, which nn.MultiheadAttention
    calls functionally (no hook sees it), is recorded as skipped, fed by the heads."""
    if not names:
        return scores

    def rn(n: str) -> str:
        return names.get(n, n)

    scores.layers = {
        rn(n): dataclasses.replace(ls, name=rn(n), kind="heads" if n in names else ls.kind)
        for n, ls in scores.layers.items()
    }
    scores.output_layers = [rn(n) for n in scores.output_layers]
    scores.skipped = {rn(n): why for n, why in scores.skipped.items()}
    scores.graph = {
        rn(n): {
            **g,
            "kind": "heads" if n in names else g["kind"],
            "producers": [rn(p) for p in g.get("producers", [])],
        }
        for n, g in scores.graph.items()
    }
    for attn in names.values():
        g = scores.graph.get(attn)
        proj = model.get_submodule(f"{attn}.out_proj" if attn else "out_proj")
        if g is None or not isinstance(proj, nn.Linear):
            continue
        name = f"{attn}.out_proj" if attn else "out_proj"
        scores.skipped[name] = "nn.MultiheadAttention calls it functionally; its inputs are heads"
        scores.graph[name] = {
            "kind": "linear",
            "weight_shape": [int(d) for d in proj.weight.shape],
            "bias": proj.bias is not None,
            "groups": 1,
            "positions": int(g["positions"] // model.get_submodule(attn).head_dim),
            "producers": [attn],
            "per_channel_params": 0,
            "role": "skipped",
        }
    return scores


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def score(
    model: nn.Module,
    data: Any,
    *,
    loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    samples_per_class: int = 32,
    projections: int = 128,
    seed: int = 0,
    where: str = "raw",
    max_classes: int = 100,
    reference_compat: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    batch_size: int = 64,
    max_memory: int | str | None = None,
    u_store: str = "auto",
    task: str = "classification",
) -> Scores:
    """U and R for every candidate layer of `model` from one forward+backward pass per batch.

    `data`: (inputs, labels) arrays/tensors, a CalibrationSet, or an iterable of (inputs,
    labels) batches; labels None -> the model's own top-1 predictions. The first
    `samples_per_class` samples of each class (in data order) are used for both scores; with
    more than `max_classes` classes a seeded random subset of classes is used (recorded).
    `max_memory` (bytes or '8G'; default: in use now + 80% of what is free) caps the memory of
    scoring: reading stops in one line once the kept samples alone pass it, and the batch size
    (at most `batch_size`) and where U's samples wait follow from it. The log (INFO) gives the
    estimated peak beside the measured one.
    `u_store`: 'auto' (memory when it fits, else temporary files on disk), 'memory' or 'disk';
    both keep the exact float32 samples. Under torchrun every process scores its share of the
    batches of rank 0's model (its weights are broadcast, as DDP does) on data checked to be the
    same in every process; the result equals a single-process run with the same batch size.
    `task` 'segmentation' or 'detection': U per output position (pipeline.dense_scoring, whose
    docstring gives the data forms); `samples_per_class` then caps positions per class.
    `loss(output, targets)` replaces the task's default loss; its failures and non-scalar
    results end in one ScoringError line.
    """
    from pipeline.dense_scoring import TASKS, checked_loss, score_dense

    if task not in TASKS:
        raise ScoringError(f"task={task!r} is not one of {', '.join(TASKS)}")
    if loss is not None:
        loss = checked_loss(loss, f"the loss {getattr(loss, '__name__', 'function')!r}")
    if task != "classification":
        if device is not None and torch.device(device).type != _model_device_dtype(model)[0].type:
            raise ScoringError(f"the model is not on device={device!r}; move the model first")
        if max_memory is not None:
            raise ScoringError(
                f"a memory budget covers classification scoring, not task {task!r} (which keeps "
                "at most samples_per_class positions per class and layer); leave out --max-memory"
            )
        return score_dense(
            model,
            data,
            task=task,
            loss=loss,
            samples_per_class=samples_per_class,
            seed=seed,
            where=where,
            progress=progress,
            batch_size=batch_size,
        )
    if where not in WHERE_CHOICES:
        raise ScoringError(f"where={where!r} is not one of {', '.join(WHERE_CHOICES)}")
    if samples_per_class < 2:
        raise CalibrationError(
            f"samples_per_class={samples_per_class}: W1 needs at least 2 per class"
        )
    if projections < 1:
        raise ScoringError(f"projections={projections}: need at least one direction")
    if max_classes < 2:
        raise CalibrationError(f"max_classes={max_classes}: U compares classes, need at least 2")
    if batch_size < 1:
        raise ScoringError(f"batch_size={batch_size} must be positive")
    if u_store not in STORES:
        raise ScoringError(f"u_store={u_store!r} is not one of {', '.join(STORES)}")
    mdev, mdtype = _model_device_dtype(model)
    budget = parse_size(max_memory) if max_memory is not None else default_budget(mdev)
    want = torch.device(device) if device is not None else mdev
    if want.type != mdev.type or (want.index is not None and want.index != mdev.index):
        raise ScoringError(f"the model is on {mdev} but device={device!r}; move the model first")
    dist = Dist.current()
    dist.share_model(model)  # under torchrun: rank 0's weights everywhere, as DDP does
    with heads_exposed(model) as head_names:  # attention heads scored as units
        loss_fn = loss or _default_loss
        all_candidates = [m for m in model.modules() if isinstance(m, CANDIDATE_TYPES)]
        if not all_candidates:
            raise ScoringError("the model has no Conv1d/Conv2d/Linear layer to prune")
        fork_devices = [mdev] if mdev.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=fork_devices),
            _model_untouched(model, reference_compat, all_candidates),
        ):
            torch.manual_seed(seed)
            model.eval()
            sel = _select(
                model, data, samples_per_class, max_classes, seed, mdev, mdtype, batch_size, budget
            )
            if dist.world > 1 and not dist.same_everywhere(_selection_hash(sel)):
                raise CalibrationError(
                    "the calibration data differs between the torchrun processes; give every "
                    "process the same data (and seed)"
                )
            probe = _probe(model, sel.x[: min(2, sel.x.shape[0])])
            if not probe.candidates:
                raise ScoringError(
                    "the model has no prunable layer: every Conv/Linear is the output layer or shared"
                )
            if loss is None and probe.logits is not None and max(sel.classes) >= probe.logits:
                raise CalibrationError(
                    f"label {max(sel.classes)} is out of range for a model with {probe.logits} "
                    "outputs; check the labels (or pass loss=)"
                )
            release_free_memory()  # what the probe pass left behind
            plan = _memory_plan(probe, sel, projections, batch_size, budget, u_store, mdev, dist)
            log.info(plan.line())
            share = _Share.of(sel, plan.batch_size, dist)
            store = _make_store(plan, share.rows[dist.rank], sel.x.shape[0], mdev)
            peaks = [peak_bytes(mdev)]
            try:
                model.train(reference_compat)
                r_signed, positions, where_used = _run_pass(
                    model,
                    sel,
                    probe,
                    loss_fn,
                    projections,
                    seed,
                    where,
                    progress,
                    share,
                    store,
                    dist,
                )
                peaks.append(peak_bytes(mdev))
                util = _utilization(
                    store, probe.candidates, share, len(sel.classes), mdev, progress, dist
                )
                peaks.append(peak_bytes(mdev))
                log.info(_peak_line(plan, peaks))
            finally:
                store.close()
        layers: dict[str, LayerScores] = {}
        for name in probe.candidates:
            mod = model.get_submodule(name)
            layers[name] = LayerScores(
                name=name,
                kind=probe.kinds[name],
                U=util[name].numpy(),
                R=r_signed[name].abs().cpu().numpy(),
                weight_shape=_weight_shape(mod),
                positions=positions[name],
                where=where_used[name],
                bn=probe.bn.get(name),
                act=probe.act.get(name),
            )
        scores = Scores(
            layers=layers,
            fingerprint=ModelFingerprint.from_model(model),
            where=where,
            seed=seed,
            projections=projections,
            samples_per_class=samples_per_class,
            classes=sel.classes,
            class_counts=sel.counts,
            n_classes_total=sel.n_classes_total,
            mode="train" if reference_compat else "eval",
            reference_compat=reference_compat,
            output_layers=probe.output_layers,
            skipped=probe.skipped,
            graph=probe.graph,
        )
    return _heads_named(scores, head_names, model)


def _run_pass(
    model: nn.Module,
    sel: _Selection,
    probe: _Probe,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    projections: int,
    seed: int,
    where: str,
    progress: bool,
    share: _Share,
    store: UStore,
    dist: Dist,
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, str]]:
    dev = sel.x.device
    st = _PassState()
    seen: set[str] = set()
    parts: list[tuple[int, list[torch.Tensor]]] = []  # under torchrun: (batch, R per layer)
    dirs: dict[str, torch.Tensor | None] = {}
    positions: dict[str, int] = {}
    r_signed: dict[str, torch.Tensor] = {}
    where_used: dict[str, str] = {}
    for name in probe.candidates:
        w = where
        if w == "act" and name not in probe.act:
            w = "bn"
        if w == "bn" and name not in probe.bn:
            w = "raw"
        where_used[name] = w

    def record(name: str, t: torch.Tensor) -> None:
        v = unit_view(t, probe.kinds[name])
        if name not in seen:
            seen.add(name)
            positions[name] = v.shape[2]
            dirs[name] = (
                None
                if v.shape[2] == 1
                else projection_directions(seed, name, v.shape[2], projections).to(dev)
            )
        d = dirs[name]
        p = v if d is None else torch.matmul(v, d)
        store.write(name, st.offset, p)
        st.finite.append((name, torch.isfinite(p.sum())))  # NaN/inf anywhere -> sum is too

    def layer_hook(name: str) -> Callable[..., Any]:
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> torch.Tensor | None:
            st.raw[name] = out
            st.version[name] = out._version
            chained = out.clone() if name in probe.inplace else out
            st.chain[name] = chained
            if where_used[name] == "raw":
                record(name, out)
            return chained if chained is not out else None

        return hook

    def follower_hook(users: list[str], stage: str) -> Callable[..., Any]:
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            x = inp[0] if inp else None
            for name in users:
                src = (
                    st.chain_bn.get(name)
                    if stage == "act" and name in probe.bn
                    else st.chain.get(name)
                )
                if src is None or x is not src:
                    continue
                if stage == "bn":
                    st.chain_bn[name] = out
                if where_used[name] == stage:
                    record(name, out)

        return hook

    handles = []
    try:
        for name in probe.candidates:
            handles.append(model.get_submodule(name).register_forward_hook(layer_hook(name)))
        for stage, table in (("bn", probe.bn), ("act", probe.act)):
            users: dict[str, list[str]] = {}
            for layer, mod_name in table.items():
                users.setdefault(mod_name, []).append(layer)
            for mod_name, layer_names in users.items():
                handles.append(
                    model.get_submodule(mod_name).register_forward_hook(
                        follower_hook(layer_names, stage)
                    )
                )
        mine = share.mine(dist.rank)
        bar = tqdm(
            total=share.rows[dist.rank],
            desc=f"FAIR scoring (batch {share.batch_size}, U in {store.kind})",
            unit="sample",
            disable=not progress or dist.rank != 0,
        )
        for bi, (s, e) in mine:
            st.raw.clear()
            st.chain.clear()
            st.chain_bn.clear()
            st.finite.clear()
            xb, yb = sel.x[s:e], sel.y[s:e]
            with torch.enable_grad():
                out = model(xb)
                ok = torch.stack([f for _, f in st.finite]).cpu() if st.finite else None
                bad = (
                    []
                    if ok is None or bool(ok.all())
                    else [st.finite[int(i)][0] for i in torch.nonzero(~ok)]
                )
                if bad:
                    raise CalibrationError(
                        f"layer {bad[0]!r} produced NaN or inf activations on the calibration data; "
                        "check the model weights and the input preprocessing"
                    )
                missing = [name for name in probe.candidates if name not in st.raw]
                if missing:
                    raise ScoringError(f"layer {missing[0]!r} was not called in this forward pass")
                lv = loss_fn(out, yb)
                if not bool(torch.isfinite(lv).all()):
                    raise CalibrationError(
                        "the loss is NaN or inf on the calibration data; check labels and model"
                    )
                if not lv.requires_grad:
                    raise ScoringError(
                        "the loss does not depend on the model's layers (detached output?); "
                        "return the logits from forward"
                    )
                outs = [st.raw[name] for name in probe.candidates]
                for name, a in zip(probe.candidates, outs, strict=True):
                    if a._version != st.version[name]:
                        raise ScoringError(
                            f"layer {name!r}'s output was modified in place; cannot score it"
                        )
                grads = torch.autograd.grad(lv, outs, allow_unused=True)
            part: list[torch.Tensor] = []
            with torch.no_grad():
                for name, a, g in zip(probe.candidates, outs, grads, strict=True):
                    if name not in r_signed:
                        r_signed[name] = torch.zeros(
                            a.shape[1 if probe.kinds[name] == "conv" else -1],
                            dtype=torch.float64,
                            device=dev,
                        )
                    if g is None:
                        part.append(torch.zeros_like(r_signed[name]))
                        continue
                    af, gf, b = a.float(), g.float(), a.shape[0]
                    if probe.kinds[name] == "conv":  # per sample and channel, then over samples
                        r = torch.linalg.vecdot(
                            af.reshape(b, a.shape[1], -1), gf.reshape(b, a.shape[1], -1)
                        )
                    else:
                        f = a.shape[-1]
                        r = torch.linalg.vecdot(af.reshape(b, -1, f), gf.reshape(b, -1, f), dim=1)
                    part.append(r.sum(dim=0).double())
            if dist.world == 1:
                for name, r in zip(probe.candidates, part, strict=True):
                    r_signed[name] += r
            else:
                parts.append((bi, part))
            st.offset += e - s
            st.raw.clear()
            st.chain.clear()
            st.chain_bn.clear()
            release_free_memory()
            bar.update(e - s)
            bar.set_postfix(mem=gb(used_bytes(dev)), refresh=False)
        bar.close()
    finally:
        for h in handles:
            h.remove()
    if dist.world > 1:
        _sum_r_in_batch_order(r_signed, probe.candidates, parts, len(share.batches))
    for name in probe.candidates:  # NaN/inf persists in the sums: one check at the end
        if not bool(torch.isfinite(r_signed[name]).all()):
            raise CalibrationError(
                f"layer {name!r} has NaN or inf gradients on the calibration data"
            )
    return r_signed, positions, where_used


# --------------------------------------------------------------------------- budget, shares, U


@dataclass(frozen=True)
class _Share:
    """Which batches each process scores: batch b goes to process b % world."""

    batches: list[tuple[int, int]]  # every batch's rows [s, e), in order
    batch_size: int
    world: int
    rows: list[int]  # rows per process
    cls: list[torch.Tensor]  # per process: the class index of its rows, in scoring order

    @classmethod
    def of(cls, sel: _Selection, batch_size: int, dist: Dist) -> _Share:
        n = sel.x.shape[0]
        batches = [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
        if len(batches) < dist.world:
            raise ScoringError(
                f"{len(batches)} batch(es) of {batch_size} for {dist.world} processes; "
                "use fewer processes or more calibration samples"
            )
        own = [batches[r :: dist.world] for r in range(dist.world)]
        rows = [sum(e - s for s, e in b) for b in own]
        cls_ = [torch.cat([sel.cls[s:e] for s, e in b]) for b in own]
        return cls(batches, batch_size, dist.world, rows, cls_)

    def mine(self, rank: int) -> list[tuple[int, tuple[int, int]]]:
        return [(b, self.batches[b]) for b in range(rank, len(self.batches), self.world)]


def _comm_device(device: torch.device) -> torch.device:
    import torch.distributed as td

    return device if td.get_backend() == "nccl" else torch.device("cpu")


def _memory_plan(
    probe: _Probe,
    sel: _Selection,
    projections: int,
    max_batch: int,
    budget: int,
    u_store: str,
    device: torch.device,
    dist: Dist,
) -> MemoryPlan:
    """The budget's plan; under torchrun the smallest batch and chunk of all processes, so every
    process cuts the same batches and unit chunks."""
    n = sel.x.shape[0]
    per_row = FLOAT_BYTES * sum(
        probe.graph[m]["weight_shape"][0] * (1 if probe.graph[m]["positions"] == 1 else projections)
        for m in probe.candidates
    )
    rows = n if dist.world == 1 else min(n, -(-n // dist.world) + max_batch)
    act = int(ACTIVATION_FACTOR * probe.saved_per_sample)
    plan = plan_memory(budget, used_bytes(device), act, rows * per_row, max_batch, u_store)
    if dist.world > 1:
        import torch.distributed as td

        agreed = torch.tensor([plan.batch_size, plan.chunk_bytes], device=_comm_device(device))
        td.all_reduce(agreed, op=td.ReduceOp.MIN)
        plan = dataclasses.replace(plan, batch_size=int(agreed[0]), chunk_bytes=int(agreed[1]))
    return plan


def _peak_line(plan: MemoryPlan, peaks: list[int | None]) -> str:
    """The estimate beside the process's peak (VmHWM: whole-process, so it is read before the
    pass too, to tell a peak set by earlier work from one set by scoring)."""
    est = f"memory: estimated peak {plan.estimated_peak / 1e9:.2f} GB"
    if any(p is None for p in peaks):
        return f"{est}, measured peak not available"
    before, after_pass, after_w1 = (f"{p / 1e9:.2f} GB" for p in peaks)  # type: ignore[operator]
    return (
        f"{est}; process peak {before} before the scoring pass, {after_pass} after it, "
        f"{after_w1} after the W1 step (budget {plan.budget / 1e9:.2f} GB)"
    )


def _make_store(plan: MemoryPlan, rows: int, n_total: int, device: torch.device) -> UStore:
    """Chunks of whole units sized on all n_total samples, the same in every process."""

    def chunk_units(units: int, q: int) -> int:
        return plan.chunk_bytes // (n_total * q * FLOAT_BYTES)

    if plan.store == "memory":
        return MemoryStore(rows, chunk_units, device)
    return DiskStore(rows, chunk_units)


def _sum_r_in_batch_order(
    r_signed: dict[str, torch.Tensor],
    names: list[str],
    parts: list[tuple[int, list[torch.Tensor]]],
    n_batches: int,
) -> None:
    """Every process's per-batch R, summed in batch order as one process would (exactly)."""
    import torch.distributed as td

    sizes = [r_signed[m].numel() for m in names]
    dev = _comm_device(next(iter(r_signed.values())).device)
    table = torch.zeros((n_batches, sum(sizes)), dtype=torch.float64, device=dev)
    for b, part in parts:
        table[b] = torch.cat(part).to(dev)
    td.all_reduce(table)  # one process wrote each row, the others added zeros
    for row in table.to(next(iter(r_signed.values())).device):
        for m, r in zip(names, torch.split(row, sizes), strict=True):
            r_signed[m] += r


def _gather_rows(x: torch.Tensor, share: _Share, owner: int, dist: Dist) -> torch.Tensor | None:
    """All processes' rows of one unit chunk, on `owner` (process order); None elsewhere."""
    import torch.distributed as td

    dev = _comm_device(x.device)
    buf = x.new_zeros((max(share.rows), *x.shape[1:]), device=dev)
    buf[: x.shape[0]] = x
    got = [torch.empty_like(buf) for _ in range(dist.world)] if dist.rank == owner else None
    td.gather(buf, got, dst=owner)
    if got is None:
        return None
    return torch.cat([g[:k] for g, k in zip(got, share.rows, strict=True)])


def _utilization(
    store: UStore,
    names: list[str],
    share: _Share,
    n_classes: int,
    device: torch.device,
    progress: bool,
    dist: Dist,
) -> dict[str, torch.Tensor]:
    """U per layer from the store, one chunk of units at a time (under torchrun chunk j is
    computed by process j % world from every process's rows, then shared)."""
    cls_all = torch.cat(share.cls)
    work = [(m, c0, c1) for m in names for c0, c1 in store.chunks(m)]
    util = {m: torch.zeros(store.shapes[m][0], dtype=torch.float64) for m in names}
    bar = tqdm(
        total=len(work), desc="FAIR U (W1)", unit="chunk", disable=not progress or dist.rank != 0
    )
    for j, (m, c0, c1) in enumerate(work):
        x: torch.Tensor | None = store.read(m, c0, c1)
        if dist.world > 1:
            x = _gather_rows(x, share, j % dist.world, dist)
        if x is not None:
            util[m][c0:c1] = pairwise_w1_max(x.to(device), cls_all, n_classes).cpu()
        if c1 == store.shapes[m][0]:
            store.drop(m)
        bar.update(1)
        bar.set_postfix(mem=gb(used_bytes(device)), refresh=False)
    bar.close()
    if dist.world > 1:
        import torch.distributed as td

        flat = torch.cat([util[m] for m in names]).to(_comm_device(device))
        td.all_reduce(flat)  # each chunk was computed by one process, the others added zeros
        for m, u in zip(
            names, torch.split(flat.cpu(), [util[m].numel() for m in names]), strict=True
        ):
            util[m] = u
    return util
