"""The `fair-edge` command line: score, plan, prune, export, bench, deploy, report, devices.

Every subcommand takes its options as flags with the same names as the keys of a `--config`
TOML file (flags win over the file). `--json` prints one JSON object on stdout, `--quiet` turns
progress bars and chatter off. Bad input ends with one line `fair-edge: error: ...` on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from calibration.errors import FairEdgeError
from fair_edge.config import (
    AUGMENT,
    METRICS,
    NORMALIZE,
    OPTIMIZERS,
    PRECISIONS,
    PROVIDERS,
    QUANTIZE,
    RESIZE_MODES,
    ROUND_MODES,
    RUN_ON,
    RUNTIMES,
    SCHEDULES,
    WHERE,
    Options,
    resolve,
)
from fair_edge.quiet import silenced

EXIT_ERROR = 2


def _shape(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 3,224,224, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers like 0.5,0.5,0.5, got {text!r}"
        ) from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# name -> (argparse keyword arguments). Flags are `--name-with-dashes`; defaults stay None so
# that only what the user typed overrides the config file.
FLAGS: dict[str, dict[str, Any]] = {
    "model": {"help": "module:factory, file.py:factory, a torchvision name, or an .onnx file "
              "(default: the built-in SmallCNN trained on Fashion-MNIST)"},
    "weights": {"help": "state_dict file for --model (read with torch.load(weights_only=True))"},
    "num_classes": {"type": int, "help": "classes of the model's output layer"},
    "input_shape": {"type": _shape, "help": "one sample's shape, e.g. 3,224,224"},
    "data": {"help": "calibration data: fashion-mnist[:split], digits, a class folder, .npz/.npy, IDX"},
    "eval_data": {"help": "held-out data for accuracy (default: the model's test split or --data)"},
    "device": {"help": "device profile name or profile .toml (see `fair-edge devices`)"},
    "tod": {"type": float, "help": "tolerance of difference alpha, in (0, 1) (default 0.05)"},
    "target": {"type": float, "help": "share of --metric to remove (searches the ToD level)"},
    "metric": {"choices": METRICS, "help": "what --target counts"},
    "latency_ms": {"type": float,
                   "help": "plan for this p50 latency (ms) on --device instead of --tod/--target"},
    "plan": {"help": "a plan .json to apply instead of scoring"},
    "scores": {"help": "a scores .npz to plan from instead of scoring"},
    "samples_per_class": {"type": int, "help": "calibration samples per class for scoring"},
    "projections": {"type": int, "help": "random directions for the sliced W1 of conv maps"},
    "where": {"choices": WHERE, "help": "where the Utilization score is measured"},
    "seed": {"type": int, "help": "seed of every random draw"},
    "max_memory": {"help": "memory budget of scoring, e.g. 8G (default: in use + 80%% of free)"},
    "runtime": {"choices": RUNTIMES, "help": "runtimes to build (auto: TFLite when the profile lists it)"},
    "run_on": {"choices": RUN_ON, "help": "where to measure (auto: board over SSH, emulated, or local)"},
    "round": {"action": argparse.BooleanOptionalAction,
              "help": "round kept channels to the profile's channel_multiple"},
    "round_mode": {"choices": ROUND_MODES,
                   "help": "auto: up for --tod (keeps accuracy), nearest for --target"},
    "quantize": {"choices": QUANTIZE, "help": "also build an int8 or fp16 variant"},
    "recalibrate_bn": {"action": argparse.BooleanOptionalAction,
                       "help": "re-estimate BatchNorm statistics of the pruned model on the "
                               "calibration data, no training (default: when the PyTorch model "
                               "has BatchNorm)"},
    "recover": {"action": argparse.BooleanOptionalAction,
                "help": "recover the pruned model: distillation from the unpruned model plus "
                        "cross-entropy where labels exist (default: on for the built-in model)"},
    "recover_data": {"help": "training images for recovery, any --data form, labels optional "
                             "(default: the model's training split, else --data)"},
    "recover_epochs": {"type": float, "help": "passes over the recovery data (default 1)"},
    "recover_steps": {"type": int, "help": "recovery steps (overrides --recover-epochs)"},
    "recover_lr": {"type": float, "help": "learning rate (default 1e-3 adamw, 1e-2 sgd)"},
    "recover_optimizer": {"choices": OPTIMIZERS, "help": "adamw (default) or sgd (momentum 0.9)"},
    "recover_batch_size": {"type": int, "help": "global batch size (default 128)"},
    "recover_schedule": {"choices": SCHEDULES, "help": "learning-rate schedule (default cosine)"},
    "recover_augment": {"choices": AUGMENT, "help": "light image augmentation (default shift)"},
    "recover_patience": {"type": int,
                         "help": "stop after this many held-out checks without gain (0: never)"},
    "recover_heldout": {"type": int,
                        "help": "samples held out of the recovery data for the best-weights pick"},
    "checkpoint": {"help": "recovery checkpoint .safetensors (resumed when it exists)"},
    "rounds": {"type": int, "help": "prune/recover rounds to reach --target (default 1)"},
    "max_drop": {"type": float,
                 "help": "accuracy budget in top-1 points: the plan with the fewest FLOPs within it"},
    "max_drop_tries": {"type": int, "help": "plans tried by the --max-drop search (default 6)"},
    "task": {"choices": ("classification", "segmentation", "detection"),
             "help": "what the model outputs: per-sample logits, per-pixel logits (U per "
                     "position), or raw detection heads (needs --loss)"},
    "loss": {"help": "module:function or file.py:function (output, targets) -> scalar loss "
                     "for the R score (default: cross-entropy, per pixel for segmentation)"},
    "out": {"help": "output folder (default dist)"},
    "name": {"help": "bundle name (default <model>-<device>)"},
    "eval_samples": {"type": int, "help": "evaluation samples for accuracy (default 10000)"},
    "runs": {"type": int, "help": "timed runs per model"},
    "warmup": {"type": int, "help": "untimed warm-up runs per model"},
    "cache": {"action": argparse.BooleanOptionalAction, "help": "re-use cached stages (scores)"},
    # -- GPU run settings (TensorRT / CUDA) --
    "provider": {"choices": list(PROVIDERS),
                 "help": "execution providers: auto (the profile's, falling back), or tensorrt, "
                         "cuda, cpu (must be on the board)"},
    "precision": {"choices": PRECISIONS, "help": "TensorRT precision (default: the profile's)"},
    "trt_cache": {"help": "engine and timing-cache folder on the board, kept between runs"},
    "workspace_mb": {"type": int, "help": "TensorRT builder workspace in MiB"},
    # image data preprocessing and plan controls
    "image_size": {"type": _shape, "help": "resize images to H,W (one value: square; default: "
                   "--input-shape's, else the images' own)"},
    "channels": {"type": int, "help": "1 (grayscale) or 3 (RGB) (default: --input-shape's, else 3)"},
    "mean": {"type": _floats, "help": "per-channel mean of pixels in 0..1, e.g. 0.485,0.456,0.406"},
    "std": {"type": _floats, "help": "per-channel std of pixels in 0..1, e.g. 0.229,0.224,0.225"},
    "normalize": {"choices": NORMALIZE, "help": "a named mean/std preset instead of --mean/--std"},
    "resize_mode": {"choices": RESIZE_MODES, "help": "stretch (default), shorter-side (keep "
                    "aspect, centre crop) or center-crop (no scaling)"},
    "labels_file": {"help": "class names one per line, in the model's output order (default: the "
                    "model's class_names attribute, else sorted folder names)"},
    "ignore_layers": {"type": _names, "help": "layers never pruned: names or shell patterns, "
                      "comma-separated (e.g. 'stem.*,head')"},
    "max_layer_ratio": {"type": float, "help": "the largest share of any layer's units removed"},
    "allocation": {"help": "how a budget is spread over layers: tod (default), tod-capped:M (no "
                   "layer loses more than M x the uniform ratio, e.g. tod-capped:1.5) or blend:W"},
    "round_to": {"type": int, "help": "round kept channels to this multiple (instead of the "
                 "device profile's channel_multiple)"},
    "opset": {"type": int, "help": "ONNX opset of the exports, 17 to 20 (default 17)"},
}  # fmt: skip

MODEL = ["model", "weights", "num_classes", "input_shape", "opset", "task", "loss"]
DATA = ["data", "seed", "image_size", "channels", "mean", "std", "normalize", "resize_mode",
        "labels_file"]  # fmt: skip
SCORING = ["samples_per_class", "projections", "where", "max_memory", "cache"]
PLANNING = ["device", "tod", "target", "metric", "latency_ms", "round", "round_mode",
            "round_to", "ignore_layers", "max_layer_ratio", "allocation"]  # fmt: skip
GPU = ["provider", "precision", "trt_cache", "workspace_mb"]
MEASURE = ["device", "run_on", "runs", "warmup", *GPU]
RECOVERY = ["recover_data", "recover_epochs", "recover_steps", "recover_lr", "recover_optimizer",
            "recover_batch_size", "recover_schedule", "recover_augment", "recover_patience",
            "recover_heldout", "checkpoint"]  # fmt: skip

SUBCOMMANDS: dict[str, tuple[str, list[str]]] = {
    "score": ("compute FAIR scores (U and R) of a model on calibration data", MODEL + DATA + SCORING + ["out"]),
    "plan": ("turn scores into a pruning plan at a ToD level or budget",
             MODEL + DATA + SCORING + PLANNING + ["scores", "out"]),
    "prune": ("apply a plan to the ONNX export (graph surgery, verified, simplified)",
              MODEL + DATA + SCORING + PLANNING + ["plan", "scores", "out"]),
    "export": ("export a model to ONNX (and TFLite / int8 / fp16)",
               MODEL + DATA + ["device", "runtime", "quantize", "out"]),
    "bench": ("time model files on a device (two files: original and pruned, one run)", MEASURE),
    "deploy": ("the whole chain: score, plan, prune, convert, measure, bundle",
               MODEL + DATA + ["eval_data", "eval_samples"] + SCORING + PLANNING
               + ["plan", "scores", "recalibrate_bn", "recover", "rounds", "max_drop",
                  "max_drop_tries"] + RECOVERY
               + ["runtime", "quantize", "run_on", "runs", "warmup", *GPU, "out", "name"]),
    "recover": ("prune by a plan (or plan first) and recover the pruned model by distillation; "
                "writes the recovered pruned ONNX, its PyTorch weights and the plan",
                MODEL + DATA + ["eval_data", "eval_samples"] + SCORING + PLANNING
                + ["plan", "scores", "recalibrate_bn"] + RECOVERY + ["out"]),
    "report": ("verify a bundle's hashes and print its report", []),
    "devices": ("list the device profiles", []),
}  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one error form: `fair-edge: error: ...`, exit 2, no usage."""

    def error(self, message: str) -> typing.NoReturn:
        command = self.prog.removeprefix("fair-edge").strip()
        where = f"{command}: " if command else ""
        print(f"fair-edge: error: {where}{' '.join(message.split())}; see `{self.prog} --help`",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(EXIT_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fair-edge",
        description="FAIR-Pruner structured pruning to edge devices, measured.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (help_text, options) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="TOML file holding any of these options (flags override)")
        p.add_argument("--quiet", action="store_true", default=None, help="no progress or chatter")
        p.add_argument("--json", action="store_true", default=None, help="print one JSON object")
        for opt in dict.fromkeys(options):
            kwargs = dict(FLAGS[opt])
            kwargs.setdefault("default", None)
            p.add_argument("--" + opt.replace("_", "-"), dest=opt, **kwargs)
        if name == "bench":
            p.add_argument(
                "files", nargs="+", help="model files (.onnx/.tflite): one, or original and pruned"
            )
        if name == "report":
            p.add_argument("bundle", help="a bundle folder written by `fair-edge deploy`")
    return parser


def _options(args: argparse.Namespace) -> Options:
    flags = {k: v for k, v in vars(args).items() if k in FLAGS or k in ("quiet", "json")}
    return resolve(args.config, flags)


def _emit(opts: Options, payload: dict[str, Any], text: str) -> None:
    if opts.json:
        print(json.dumps(payload, indent=1, default=str))
    elif text:
        print(text)


def _log(opts: Options) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if not opts.quiet and not opts.json:
            print(msg, file=sys.stderr)

    return log


# ------------------------------------------------------------------------------ commands


def cmd_devices(opts: Options, args: argparse.Namespace) -> int:
    from devices.profile import ALIASES, list_profiles, load_profile

    rows = []
    for name in list_profiles():
        p = load_profile(name)
        rows.append({"name": name, "arch": p.arch, "description": p.description,
                     "runtimes": [r.name for r in p.runtimes], "channel_multiple": p.channel_multiple})  # fmt: skip
    text = "\n".join(f"{r['name']:<18} {r['arch']:<8} {r['description']}" for r in rows)
    text += "\naliases: " + ", ".join(f"{a} -> {t}" for a, t in sorted(ALIASES.items()))
    _emit(opts, {"profiles": rows, "aliases": ALIASES}, text)
    return 0


def _model_and_data(opts: Options):
    from fair_edge.inputs import resolve_inputs

    return resolve_inputs(opts)


def cmd_score(opts: Options, args: argparse.Namespace) -> int:
    from fair_edge.data_checks import scoring_sample, short_warning
    from fair_edge.plan_stage import compute_scores
    from fair_edge.stage_cache import StageCache
    from pipeline.recovery import init_distributed

    inp = _model_and_data(opts)
    dist = init_distributed()  # under torchrun: each process scores its share of the batches
    model = inp.source.require_torch("scoring").to(dist.device())
    cache = StageCache.default(opts.cache)
    try:
        scores, hit = compute_scores(model, inp.calibration, opts, cache, dist)
        dist.barrier()  # process 0's cache entry is written before any process leaves
    finally:
        dist.close()
    if dist.rank != 0:
        return 0
    out = Path(opts.out) / f"{inp.source.name}.scores.npz"
    scores.save(out)
    sample = scoring_sample(inp.calibration, opts.samples_per_class, opts.seed)
    warning = short_warning(sample)
    if warning:
        _log(opts)(f"warning: {warning}")
    _emit(opts, {"scores": str(out), "cached": hit, "layers": scores.names(), "sampling": sample,
                 "warnings": [warning] if warning else []},
          f"scores of {len(scores.names())} layers -> {out}{' (cached)' if hit else ''}")  # fmt: skip
    return 0


def _plan(opts: Options, inp: Any = None):
    """(inputs, ONNX export, plan); `inp` when the caller has resolved model and data already."""
    from exporters.onnx_export import export_onnx
    from fair_edge.inputs import example_input
    from fair_edge.plan_stage import compute_scores, make_plan
    from fair_edge.stage_cache import StageCache
    from pipeline.scores import Scores

    inp = inp or _model_and_data(opts)
    model = inp.source.require_torch("planning")
    if opts.scores:
        scores = Scores.load(opts.scores)
    else:
        scores = compute_scores(model, inp.calibration, opts, StageCache.default(opts.cache))[0]
    proto = export_onnx(model, example_input(inp.calibration), None, opset=opts.opset)
    return inp, proto, make_plan(scores, proto, model, opts, inp.profile)


def cmd_plan(opts: Options, args: argparse.Namespace) -> int:
    inp, _, plan = _plan(opts)
    out = Path(opts.out) / f"{inp.source.name}.plan.json"
    plan.save(out)
    kept = {n: lp.kept for n, lp in plan.layers.items()}
    _emit(opts, {"plan": str(out), "pruned_units": plan.pruned_units(), "kept": kept},
          f"plan removes {plan.pruned_units()} units -> {out}")  # fmt: skip
    return 0


def cmd_prune(opts: Options, args: argparse.Namespace) -> int:
    from exporters.onnx_export import export_onnx, load_onnx
    from exporters.surgery import apply_plan, save_model
    from fair_edge.deploy import simplify_file
    from fair_edge.inputs import calibration_subset, example_input
    from pipeline.plan import Plan

    if opts.plan:
        inp = _model_and_data(opts)
        plan = Plan.load(opts.plan)
        if inp.source.model is not None:
            plan.check_model(inp.source.model)
            proto = export_onnx(
                inp.source.model, example_input(inp.calibration), None, opset=opts.opset
            )
        else:
            proto = load_onnx(inp.source.onnx_path)
    else:
        inp, proto, plan = _plan(opts)
    verify_x = calibration_subset(inp.calibration, 64, opts.seed)
    pruned, report = apply_plan(proto, plan, verify_inputs=verify_x)
    out_dir = Path(opts.out)
    raw = out_dir / f".{inp.source.name}.pruned.raw.onnx"
    out = out_dir / f"{inp.source.name}.pruned.onnx"
    save_model(pruned, raw)
    try:
        simplify_file(raw, out, verify_x)
    finally:
        raw.unlink(missing_ok=True)
    _emit(
        opts,
        {"model": str(out), "surgery": report.to_json()},
        f"{report.to_markdown()}\npruned model -> {out}",
    )
    return 0


def cmd_export(opts: Options, args: argparse.Namespace) -> int:
    from exporters.onnx_export import export_onnx
    from fair_edge.inputs import calibration_subset, example_input

    inp = _model_and_data(opts)
    model = inp.source.require_torch("export")
    out_dir = Path(opts.out)
    x0 = example_input(inp.calibration)
    onnx_path = out_dir / f"{inp.source.name}.onnx"
    export_onnx(model, x0, onnx_path, opset=opts.opset)
    files: dict[str, Any] = {"onnx": str(onnx_path)}
    calib = calibration_subset(inp.calibration, 256, opts.seed)
    if opts.runtime == "tflite" or (opts.runtime == "auto" and inp.profile.runtime("tflite")):
        from exporters.tflite import convert_tflite, verify_tflite

        tfl = convert_tflite(model, x0, out_dir / f"{inp.source.name}.tflite")
        files["tflite"] = verify_tflite(tfl, onnx_path, calib[:64]).to_json()
    if opts.quantize != "none":
        from exporters.quantize import quantize

        q = out_dir / f"{inp.source.name}.{opts.quantize}.onnx"
        ev = inp.evaluation
        files[opts.quantize] = quantize(
            opts.quantize, onnx_path, q, calib, ev.inputs, ev.labels,
            symmetric=inp.profile.tensorrt,  # TensorRT takes int8 QDQ with zero points 0 only
        ).to_json()  # fmt: skip
    text = "\n".join(f"{k}: {v if isinstance(v, str) else v['path']}" for k, v in files.items())
    _emit(opts, files, text)
    return 0


def cmd_bench(opts: Options, args: argparse.Namespace) -> int:
    from devices.report import measure_pair
    from fair_edge.deploy import choose_where
    from fair_edge.gpu_stage import run_spec
    from fair_edge.inputs import resolve_profile

    profile = resolve_profile(opts.device)
    where, why = choose_where(profile, opts.run_on)
    spec = run_spec(opts)
    files = [Path(f) for f in args.files]
    if len(files) > 2:
        raise FairEdgeError("bench takes one model file, or two (original and pruned)")
    for f in files:
        if not f.is_file():
            raise FairEdgeError(f"model file {str(f)!r} does not exist")
    if len(files) == 2:
        comp = measure_pair(files[0], files[1], profile, where, spec)
        _emit(opts, comp.to_dict(), comp.headline())
        return 0
    if where == "local":
        from devices.local import run_local as run
    elif where == "ssh":
        from devices.ssh import run_ssh as run
    else:
        from devices.emulation import run_emulated as run
    m = run(files[0], profile, spec)
    _emit(opts, m.to_dict(), f"{files[0].name} on {m.device}: p50 {m.p50_ms:.3f} ms ({why})")
    return 0


def cmd_report(opts: Options, args: argparse.Namespace) -> int:
    from exporters.bundle import read_report, verify_bundle

    bundle = Path(args.bundle)
    manifest = verify_bundle(bundle)
    report, text = read_report(bundle)
    text = text.rstrip()
    _emit(opts, {"bundle": str(bundle), "files_verified": len(manifest["files"]),
                 "summary": report.get("summary")}, text)  # fmt: skip
    return 0


def cmd_recover(opts: Options, args: argparse.Namespace) -> int:
    from exporters.bn_recal import batchnorm_layers, recalibrate_bn
    from exporters.onnx_export import export_onnx
    from exporters.surgery import apply_plan, save_model
    from exporters.torch_prune import prune_torch
    from exporters.weights import save_pruned_weights, write_back
    from fair_edge.inputs import (
        INT8_CALIBRATION,
        apply_model_defaults,
        calibration_subset,
        example_input,
        show_progress,
        torch_accuracy,
    )
    from fair_edge.recovery_stage import recovery_config, recovery_data, run_recovery
    from fair_edge.stage_cache import StageCache
    from pipeline.plan import Plan

    inp = _model_and_data(opts)
    opts = apply_model_defaults(opts, inp.source, [])
    model = inp.source.require_torch("recovery")
    if opts.plan:
        plan = Plan.load(opts.plan)
        plan.check_model(model)
        proto = export_onnx(model, example_input(inp.calibration), None, opset=opts.opset)
    else:
        inp, proto, plan = _plan(opts, inp)
    plan.method.setdefault("input_shape", [1, *inp.calibration.sample_shape])
    x0 = example_input(inp.calibration)
    verify_x = calibration_subset(inp.calibration, 64, opts.seed)
    pruned_proto, _ = apply_plan(proto, plan, verify_inputs=verify_x)
    student = prune_torch(model, plan, x0, proto)
    acc = {"unpruned": torch_accuracy(model, inp.evaluation),
           "one-shot": torch_accuracy(student, inp.evaluation)}  # fmt: skip
    if opts.recalibrate_bn is not False and batchnorm_layers(student):
        recal_x = calibration_subset(inp.calibration, INT8_CALIBRATION, opts.seed)
        student = recalibrate_bn(student, recal_x)[0]
        acc["BN re-estimated"] = torch_accuracy(student, inp.evaluation)
    data = recovery_data(opts, inp.source.calibration_data, inp.calibration, model)
    rec = run_recovery(model, student, plan, data, recovery_config(opts),
                       StageCache.default(opts.cache), checkpoint=opts.checkpoint,
                       progress=show_progress(opts))  # fmt: skip
    acc["recovered"] = torch_accuracy(rec.model, inp.evaluation)
    pruned_proto, wb = write_back(rec.model, pruned_proto, verify_x)
    out_dir = Path(opts.out)
    name = inp.source.name
    onnx_path, weights_path = (
        out_dir / f"{name}.recovered.onnx",
        out_dir / f"{name}.weights.safetensors",
    )
    plan_path = out_dir / f"{name}.plan.json"
    save_model(pruned_proto, onnx_path)
    save_pruned_weights(rec.model, plan, weights_path)
    plan.save(plan_path)
    on = "the calibration data" if inp.eval_is_calibration else inp.evaluation.source
    lines = [f"top-1 on {on} ({len(inp.evaluation)} samples):"]
    lines += [f"  {k:<16} {'n/a' if v is None else format(v, '.4f')}" for k, v in acc.items()]
    lines += [f"recovered ONNX -> {onnx_path} (ONNX Runtime vs torch max diff {wb.max_abs_diff:.2g})",
              f"PyTorch weights -> {weights_path}", f"plan -> {plan_path}"]  # fmt: skip
    _emit(opts, {"onnx": str(onnx_path), "weights": str(weights_path), "plan": str(plan_path),
                 "accuracy": acc, "accuracy_on": on, "recovery": rec.record,
                 "write_back": wb.to_json()}, "\n".join(lines))  # fmt: skip
    return 0


def cmd_deploy(opts: Options, args: argparse.Namespace) -> int:
    from fair_edge.deploy import deploy

    result = deploy(opts, log=_log(opts))
    r = result.summary["ratios"]

    def f(v: float | None, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    text = (
        f"bundle: {result.bundle}\nreport: {result.report}\n"
        f"latency speed-up {f(r['latency_speedup'], '.2f')}x, memory {f(r['memory'], '.3f')}, "
        f"size {f(r['size'], '.3f')}, FLOPs {f(r['flops'], '.3f')}, "
        f"accuracy change {f(r['accuracy_change_points'], '+.2f')} points "
        f"({result.summary['measured_where']})"
    )
    if opts.quiet and not opts.json:
        text = str(result.bundle)
    _emit(opts, result.to_json(), text)
    return 0


COMMANDS: dict[str, Callable[[Options, argparse.Namespace], int]] = {
    "score": cmd_score,
    "plan": cmd_plan,
    "prune": cmd_prune,
    "export": cmd_export,
    "bench": cmd_bench,
    "deploy": cmd_deploy,
    "recover": cmd_recover,
    "report": cmd_report,
    "devices": cmd_devices,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return the exit code (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        opts = _options(args)
        # Third-party libraries (absl, TFLite, torchao, torch) write to stderr themselves; under
        # --quiet/--json only fair-edge's own error line (printed below, after) may reach it.
        expected = (FairEdgeError, KeyboardInterrupt)
        with silenced(bool(opts.quiet or opts.json), expected=expected):
            return COMMANDS[args.command](opts, args)
    except FairEdgeError as exc:
        message = " ".join(str(exc).split())
        print(f"fair-edge: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fair-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
