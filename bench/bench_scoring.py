"""Scoring benchmark: fair-edge `score` vs the authors' `network-pruner` 2.16 `get_metrics`.

Run from the repository root with the benchmark environment (both packages in one process):

    bash bench/setup_reference_env.sh
    bench/.env/bin/python -m bench.bench_scoring [--models vgg16,resnet] [--ref-layers N]

Per model (VGG-16-style and ResNet-style, CIFAR size 3x32x32, 10 classes x 32 samples, CPU):
time of our scoring, of their get_metrics, of one plain forward+backward over the same samples;
Spearman rank correlation per layer of our R with theirs (train mode = reference_compat, and
eval mode) and of our U with theirs. The networks are randomly initialised with BatchNorm
statistics warmed up on the calibration data (no CIFAR on this machine; the timing does not
depend on the weights). `--ref-layers N` times the reference on its first N layers only when the
full run would take too long; the report says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from pipeline.models import VGG, VGG16_CFG, ResNet  # noqa: E402
from pipeline.scoring import score  # noqa: E402

K, SPC, BATCH = 10, 32, 64


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes x 32 samples, 3x32x32, labels already interleaved (same batches both sides)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K * SPC) % K
    patterns = torch.randn(K, 3, 32, 32, generator=g)
    x = torch.randn(K * SPC, 3, 32, 32, generator=g) + 0.5 * patterns[y]
    return x, y


def make_model(name: str, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = VGG(VGG16_CFG) if name == "vgg16" else ResNet(blocks=(2, 2, 2), widths=(32, 64, 128))
    model.train()
    with torch.no_grad():  # realistic BN statistics for eval mode
        for _ in range(3):
            for s in range(0, len(x), BATCH):
                model(x[s : s + BATCH])
    return model.eval()


class Timer:
    """Wall time and this process's CPU time (all threads): the machine is shared, so CPU time
    is the steadier measure of work; both are reported."""

    def __enter__(self) -> Timer:
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def fwd_bwd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Timer:
    m = copy.deepcopy(model).eval()
    with Timer() as t:
        for s in range(0, len(x), BATCH):
            F.cross_entropy(m(x[s : s + BATCH]), y[s : s + BATCH]).backward()
    return t


def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, compat: bool):
    with Timer() as t:
        s = score(
            model,
            (x, y),
            samples_per_class=SPC,
            batch_size=BATCH,
            reference_compat=compat,
            progress=False,
        )
    return t, s


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]):
    from Network_Pruner import FAIR_Pruner as fp

    index = {n: i for i, (n, _) in enumerate(model.named_modules())}
    layers = [index[n] for n in names]
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    m = copy.deepcopy(model)
    random.seed(0)
    torch.manual_seed(0)
    with (
        tempfile.TemporaryDirectory() as d,
        contextlib.redirect_stdout(io.StringIO()),
        Timer() as t,
    ):
        res = fp.get_metrics(
            m,
            loader,
            layers,
            layers,
            device=torch.device("cpu"),
            the_samplesize_for_compute_distance=SPC,
            results_save_path=f"{d}/r.pkl",
        )
    r = {n: res[f"RE_{j}_hat"].double().numpy() for j, n in enumerate(names)}
    u = {n: torch.as_tensor(res[f"D_{j}"]).double().numpy() for j, n in enumerate(names)}
    return t, r, u


def reference_r(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], bn_eval: bool
):
    """Their R routine alone, per layer. bn_eval=True holds BatchNorm in eval mode (their
    routine calls model.train()): the like-for-like check of our eval-mode R."""
    impl = sys.modules["Network_Pruner.FAIR_Pruner"]
    m = copy.deepcopy(model)
    if bn_eval:
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.eval()
                mod.train = lambda mode=True, _m=mod: _m  # their model.train() leaves BN in eval
    index = {n: i for i, (n, _) in enumerate(m.named_modules())}
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for n in names:
            out[n] = (
                impl._get_reconstructionScore_fast(
                    m, loader, index[n], torch.device("cpu"), nn.CrossEntropyLoss()
                )
                .double()
                .numpy()
            )
    return out


def spread(names: list[str], k: int) -> list[str]:
    """k layers spread over the network: first, ..., last."""
    idx = np.unique(np.linspace(0, len(names) - 1, k).round().astype(int))
    return [names[i] for i in idx]


def rho(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a, b).statistic)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_model(name: str, ref_layers: int | None, r_layers: int, repeats: int) -> dict:
    x, y = make_data()
    model = make_model(name, x)
    fb, ev_runs, tr_runs = [], [], []
    for i in range(repeats):  # interleaved, so load changes hit all three alike
        fb.append(fwd_bwd(model, x, y))
        ev_runs.append(ours(model, x, y, compat=False))
        tr_runs.append(ours(model, x, y, compat=True))
        log(
            f"{name} round {i}: wall/cpu fwd+bwd {fb[-1].wall:.1f}/{fb[-1].cpu:.1f}s, "
            f"ours {ev_runs[-1][0].wall:.1f}/{ev_runs[-1][0].cpu:.1f}s, "
            f"ours compat {tr_runs[-1][0].wall:.1f}/{tr_runs[-1][0].cpu:.1f}s"
        )
    s_eval, s_train = ev_runs[0][1], tr_runs[0][1]
    names = s_eval.names()
    ref_names = names if ref_layers is None else names[:ref_layers]
    t_ref, r_ref_gm, u_ref = reference(model, x, y, ref_names) if ref_names else (None, {}, {})
    if t_ref is not None:
        log(
            f"{name} reference get_metrics on {len(ref_names)} layers: {t_ref.wall:.1f}/{t_ref.cpu:.1f}s"
        )
    r_names = spread(names, r_layers)
    r_ref = reference_r(model, x, y, r_names, bn_eval=False)
    r_ref_eval = reference_r(model, x, y, r_names, bn_eval=True)
    log(f"{name} reference R on {r_names}")
    t_ours = {k: float(np.median([getattr(t, k) for t, _ in ev_runs])) for k in ("wall", "cpu")}
    t_compat = {k: float(np.median([getattr(t, k) for t, _ in tr_runs])) for k in ("wall", "cpu")}
    t_fb = {k: float(np.median([getattr(t, k) for t in fb])) for k in ("wall", "cpu")}
    t_rf = {"wall": t_ref.wall, "cpu": t_ref.cpu} if t_ref is not None else None
    per_layer = []
    for n in names:
        if n not in ref_names and n not in r_names:
            continue
        row: dict = {"layer": n, "units": s_eval[n].n_units, "bn": s_eval[n].bn is not None}
        if n in r_names:
            row["rho_R_compat_vs_ref"] = rho(s_train[n].R, r_ref[n])
            row["rho_R_eval_vs_ref"] = rho(s_eval[n].R, r_ref[n])
            row["rho_R_eval_vs_ref_bn_eval"] = rho(s_eval[n].R, r_ref_eval[n])
            row["max_rel_diff_R_eval_vs_ref_bn_eval"] = float(
                np.max(np.abs(s_eval[n].R - r_ref_eval[n]))
                / max(np.max(np.abs(r_ref_eval[n])), 1e-30)
            )
        if n in ref_names:
            row["rho_R_compat_vs_get_metrics"] = rho(s_train[n].R, r_ref_gm[n])
            row["rho_U_vs_get_metrics"] = rho(s_eval[n].U, u_ref[n])
        per_layer.append(row)
    res = {
        "model": name,
        "samples": int(len(x)),
        "layers_scored": len(names),
        "ours_s": t_ours,
        "ours_reference_compat_s": t_compat,
        "fwd_bwd_s": t_fb,
        "ratio_ours_over_fwd_bwd": {k: t_ours[k] / t_fb[k] for k in t_fb},
    }
    if t_rf is not None:
        res.update(
            {
                "reference_layers_timed": len(ref_names),
                "reference_s": t_rf,
                # measured: their time on the timed layers over ours on all layers (conservative)
                "speedup_measured": {k: t_rf[k] / t_ours[k] for k in t_fb},
                # extrapolated: their time per timed layer x all layers (partial reference runs)
                "speedup_extrapolated": {
                    k: t_rf[k] / len(ref_names) * len(names) / t_ours[k] for k in t_fb
                },
                "reference_is_partial": len(ref_names) < len(names),
            }
        )
    res["per_layer"] = per_layer
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg16,resnet")
    ap.add_argument(
        "--ref-layers",
        type=int,
        default=None,
        help="time the reference on the first N layers only (0: skip it)",
    )
    ap.add_argument("--r-layers", type=int, default=3, help="layers (spread) for the R comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    from importlib.metadata import version

    import Network_Pruner  # noqa: F401  (fail early when the reference is missing)

    env = {
        "torch": torch.__version__,
        "network_pruner": version("network-pruner"),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(env), flush=True)
    results = []
    for name in args.models.split(","):
        res = run_model(name, args.ref_layers, args.r_layers, args.repeats)
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "per_layer"}, indent=1), flush=True)
        for row in res["per_layer"]:
            print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
