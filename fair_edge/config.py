"""Every option of the `fair-edge` command line in one dataclass, loadable from a TOML file.

A config file holds any of the options (top-level keys, `-` or `_` alike); flags given on the
command line override it; anything left unset takes the dataclass default. Unknown keys and
wrongly typed values fail with one line that names them, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from calibration.errors import FairEdgeError
from calibration.presets import NORMALIZE_PRESETS, RESIZE_MODES

RUNTIMES = ("auto", "onnx", "tflite")
QUANTIZE = ("none", "int8", "fp16")
METRICS = ("flops", "params")
WHERE = ("raw", "bn", "act")
RUN_ON = ("auto", "local", "ssh", "emulated")
ROUND_MODES = ("auto", "up", "nearest", "down")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
AUGMENT = ("shift", "shift+flip", "none")
TASKS = ("classification", "segmentation", "detection")
DEFAULT_TOD = 0.05
# GPU run settings (TensorRT / CUDA); --provider names the execution providers it asks for,
# preferred first, and a provider it names must be on the board (no silent CPU fallback).
PROVIDERS = {
    "auto": None,
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
}
PRECISIONS = ("fp32", "fp16", "int8")
NORMALIZE = tuple(NORMALIZE_PRESETS)


class ConfigError(FairEdgeError):
    """A config file or option value that cannot be used."""


@dataclass
class Options:
    """All options of every subcommand; each subcommand reads the ones it needs."""

    model: str | None = None
    """`module:factory`, a torchvision model name, an .onnx file, or None for the built-in default."""
    weights: str | None = None
    num_classes: int | None = None
    input_shape: list[int] | None = None
    """One sample's shape (C, H, W); checked against the data's samples."""
    data: str | None = None
    """Calibration data spec (see calibration.loaders.load_data); None: the default model's data."""
    eval_data: str | None = None
    device: str = "host"
    tod: float | None = None
    """ToD level alpha; None: 0.05, or for the built-in default model its own settings
    (--target 0.5 with --recover), unless --target, --latency-ms or --max-drop is given."""
    target: float | None = None
    """Remove this share of `metric` (0.3 = 30% of FLOPs; searches the ToD level) instead of --tod."""
    metric: str = "flops"
    allocation: str = "tod"
    """How a --target (or --max-drop, --rounds) budget is spread over layers: 'tod' (one ToD
    level for all), 'tod-capped:M' (no layer loses more than M x the uniform ratio), 'blend:W'."""
    latency_ms: float | None = None
    """Plan for this p50 latency on --device (searched with its measured latency model, then
    confirmed by measuring where the device can be reached) instead of --tod or --target."""
    plan: str | None = None
    scores: str | None = None
    samples_per_class: int = 32
    projections: int = 128
    where: str = "raw"
    seed: int = 0
    max_memory: str | None = None
    """Memory budget of scoring, e.g. 8G or 7.5GiB (default: what is in use plus 80% of what is
    free); the batch size and whether U's samples wait in memory or on disk follow from it."""
    runtime: str = "auto"
    """auto: ONNX, plus TFLite when the device profile lists a tflite runtime."""
    run_on: str = "auto"
    """Where to measure: auto (ssh when the profile has a host, emulated when its sysroot is
    built, else local), local, ssh or emulated."""
    round: bool = True
    """Round kept channel counts to the profile's channel_multiple."""
    round_mode: str = "auto"
    """auto: up for a --tod plan (never prunes more than the ToD rule chose, so accuracy is kept),
    nearest for a --target budget (lands closest to the requested share); or up/nearest/down."""
    recalibrate_bn: bool | None = None
    """Re-estimate BatchNorm statistics of the pruned model on the calibration inputs (one
    forward pass, no weight change): recovers much of the one-shot accuracy loss. None (the
    default): whenever the PyTorch model is at hand and has BatchNorm layers."""
    recover: bool | None = None
    """Recover the pruned model by distillation from the unpruned one (short training). None:
    on for the built-in default model, off otherwise."""
    recover_data: str | None = None
    """Training images for recovery (labelled or not); default: the model's training split, or
    --data."""
    recover_epochs: float = 1.0
    recover_steps: int | None = None
    recover_lr: float | None = None
    """None: 1e-3 for adamw, 1e-2 for sgd."""
    recover_optimizer: str = "adamw"
    recover_batch_size: int = 128
    recover_schedule: str = "cosine"
    recover_augment: str = "shift"
    recover_patience: int = 0
    recover_heldout: int = 1000
    """Samples held out of the recovery data for the early stop and best-weights pick."""
    checkpoint: str | None = None
    """Recovery checkpoint (safetensors); an interrupted run resumes from it. Default: one in the
    cache folder per recovery."""
    rounds: int = 1
    """Prune/recover rounds to reach --target (each round re-scores the recovered model)."""
    max_drop: float | None = None
    """Accuracy budget: the fastest plan whose top-1 after the fix (recovery when --recover, else
    BatchNorm re-estimation) stays within this many points of the unpruned model, on held-out
    data."""
    max_drop_tries: int = 6
    task: str = "classification"
    """classification, segmentation (U per pixel; label maps from the data's 'masks' or the
    model's own per-pixel argmax) or detection (raw head outputs; needs --loss and box targets)."""
    loss: str | None = None
    """`module:function` or `file.py:function` (output, targets) -> scalar loss for R; default:
    cross-entropy (per pixel for segmentation)."""
    quantize: str = "none"
    out: str = "dist"
    name: str | None = None
    eval_samples: int = 10000
    runs: int = 50
    warmup: int = 5
    cache: bool = True
    # -- image data preprocessing and plan controls ---------------------------------------------
    image_size: list[int] | None = None
    """Resize images (folders, raw arrays) to H,W (one value: square); default: --input-shape's
    H,W, else the images' own size."""
    channels: int | None = None
    """1 (grayscale) or 3 (RGB); default: --input-shape's C, else 3."""
    mean: list[float] | None = None
    """Per-channel mean (one value or one per channel) of pixels scaled to 0..1."""
    std: list[float] | None = None
    normalize: str | None = None
    """A named mean/std preset instead of --mean/--std (default: mean 0, std 1)."""
    resize_mode: str = "stretch"
    """stretch, shorter-side (keep aspect, centre crop) or center-crop (no scaling)."""
    labels_file: str | None = None
    """Class names one per line in the model's output order; default: the model's own
    `class_names` attribute, else sorted folder names."""
    ignore_layers: list[str] | None = None
    """Layers (names or shell patterns, comma-separated) never pruned."""
    max_layer_ratio: float | None = None
    """The largest share of any one layer's units a plan may remove."""
    layer_ratio_caps: dict[str, float] | None = None
    """Config file only: {pattern: largest share removed} for the layers a pattern matches."""
    round_to: int | None = None
    """Round kept channels to this multiple instead of the profile's channel_multiple."""
    opset: int = 17
    """ONNX opset of every export (17 to 20)."""
    # ---------------------------------------------------------------------------------------------
    quiet: bool = False
    json: bool = False
    # -- GPU run settings (TensorRT / CUDA) --
    provider: str = "auto"
    """auto: the profile's providers in order, falling back to what the board has (the report
    says which ran each node); tensorrt, cuda or cpu: those, and a missing one is an error."""
    precision: str | None = None
    """TensorRT precision fp32, fp16 or int8 (None: the profile's, fp16 on the Jetsons)."""
    trt_cache: str | None = None
    """Folder on the board for TensorRT engines and timing caches (None: the profile's)."""
    workspace_mb: int | None = None
    """TensorRT builder workspace in MiB (None: the profile's)."""

    def validate_gpu(self) -> None:
        """The GPU run settings: known provider and precision, a workspace >= 0."""
        if self.provider not in PROVIDERS:
            raise ConfigError(
                f"--provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}"
            )
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.workspace_mb is not None and self.workspace_mb < 0:
            raise ConfigError(f"--workspace-mb must be >= 0, got {self.workspace_mb}")

    def validate(self) -> Options:
        """Check ranges and choices; return self so calls chain."""
        if self.tod is not None and not 0.0 < self.tod < 1.0:
            raise ConfigError(
                f"--tod must be in (0, 1) (the reference uses 0.005 to 0.05), got {self.tod}"
            )
        if self.target is not None and not 0.0 < self.target < 1.0:
            raise ConfigError(f"--target is the share to remove, in (0, 1), got {self.target}")
        if self.latency_ms is not None:
            if not self.latency_ms > 0:
                raise ConfigError(f"--latency-ms must be a positive number, got {self.latency_ms}")
            if self.target is not None:
                raise ConfigError("give either --target or --latency-ms, not both")
        for name, value, choices in (
            ("runtime", self.runtime, RUNTIMES),
            ("quantize", self.quantize, QUANTIZE),
            ("metric", self.metric, METRICS),
            ("where", self.where, WHERE),
            ("run_on", self.run_on, RUN_ON),
            ("round_mode", self.round_mode, ROUND_MODES),
            ("recover_optimizer", self.recover_optimizer, OPTIMIZERS),
            ("recover_schedule", self.recover_schedule, SCHEDULES),
            ("recover_augment", self.recover_augment, AUGMENT),
            ("task", self.task, TASKS),
        ):
            if value not in choices:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}"
                )
        for name in (
            "samples_per_class",
            "projections",
            "eval_samples",
            "runs",
            "rounds",
            "recover_batch_size",
            "max_drop_tries",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.recover_steps is not None and self.recover_steps < 1:
            raise ConfigError(f"--recover-steps must be at least 1, got {self.recover_steps}")
        if not self.recover_epochs > 0:
            raise ConfigError(f"--recover-epochs must be > 0, got {self.recover_epochs}")
        if self.recover_lr is not None and not self.recover_lr > 0:
            raise ConfigError(f"--recover-lr must be > 0, got {self.recover_lr}")
        if self.recover_patience < 0 or self.recover_heldout < 0:
            raise ConfigError("--recover-patience and --recover-heldout must be >= 0")
        if self.max_drop is not None:
            if not 0.0 <= self.max_drop < 100.0:
                raise ConfigError(
                    f"--max-drop is in top-1 points (0 to 100, e.g. 1.0), got {self.max_drop}"
                )
            if self.target is not None:
                raise ConfigError("give either --target or --max-drop, not both")
        if self.rounds > 1 and self.target is None:
            raise ConfigError("--rounds needs --target (the share of FLOPs to remove in all)")
        if self.max_memory is not None:
            from pipeline.membudget import parse_size

            parse_size(self.max_memory)  # one line naming the bad size
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if self.input_shape is not None and (
            not self.input_shape or any(int(d) < 1 for d in self.input_shape)
        ):
            raise ConfigError(
                f"--input-shape must be positive sizes like 3,224,224, got {self.input_shape}"
            )
        self.validate_gpu()
        self._validate_data_and_controls()
        return self

    def _validate_data_and_controls(self) -> None:
        """Image preprocessing and plan-control options (their own block, see the fields)."""
        if self.image_size is not None and (
            len(self.image_size) not in (1, 2) or min(self.image_size) < 1
        ):
            raise ConfigError(
                f"--image-size is H,W (or one size for both) in pixels, got {self.image_size}"
            )
        if self.channels is not None and self.channels not in (1, 3):
            raise ConfigError(f"--channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) not in (1, 3):
                raise ConfigError(f"--{name} takes one value or one per channel (3), got {v}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"--std values must be positive, got {self.std}")
        if self.normalize is not None:
            if self.normalize not in NORMALIZE:
                raise ConfigError(
                    f"--normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}"
                )
            if self.mean is not None or self.std is not None:
                raise ConfigError("give either --normalize or --mean/--std, not both")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(
                f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}"
            )
        if self.allocation != "tod":  # the parser lives with the planner (which loads torch)
            from pipeline.plan import PlanError
            from pipeline.planning import Allocation

            try:
                Allocation.parse(self.allocation)
            except PlanError as exc:
                raise ConfigError(f"--allocation: {exc}") from exc
        if self.max_layer_ratio is not None and not 0.0 <= self.max_layer_ratio < 1.0:
            raise ConfigError(
                f"--max-layer-ratio is the largest share of a layer removed, in [0, 1), got "
                f"{self.max_layer_ratio}"
            )
        for pat, r in (self.layer_ratio_caps or {}).items():
            if isinstance(r, bool) or not isinstance(r, int | float) or not 0.0 <= r < 1.0:
                raise ConfigError(
                    f"layer_ratio_caps[{pat!r}] must be a share in [0, 1), e.g. 0.5, got {r!r}"
                )
        if self.round_to is not None and self.round_to < 1:
            raise ConfigError(f"--round-to must be a channel multiple >= 1, got {self.round_to}")
        if not 17 <= self.opset <= 20:
            raise ConfigError(
                f"--opset must be 17 to 20 (what the TorchScript ONNX exporter writes), got {self.opset}"
            )
        if self.rounds > 1 and (self.max_layer_ratio is not None or self.layer_ratio_caps):
            raise ConfigError(
                "--max-layer-ratio and layer_ratio_caps apply to one-round plans; drop --rounds "
                "or the caps"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Options:
        return merge(cls(), data, source="JSON")

    def cache_key(self, *names: str) -> dict[str, Any]:
        """The named options as a dict, for content-hash keys of cached stages."""
        return {n: getattr(self, n) for n in names}


def option_names() -> list[str]:
    return [f.name for f in fields(Options)]


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(Options)
    return {f.name: hints[f.name] for f in fields(Options)}


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Check `value` against the field's type hint; ints are accepted where floats are expected."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0], source)
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
    elif origin is list:
        elem = (typing.get_args(hint) or (int,))[0]
        if elem is str and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple) and all(_is(v, elem) for v in value):
            return [elem(v) for v in value]
        wanted = f"a list of {elem.__name__}"
        raise ConfigError(
            f"option {name!r} from {source} must be {wanted}, got {type(value).__name__} {value!r}"
        )
    elif origin is dict and isinstance(value, dict):
        elem = (typing.get_args(hint) or (str, object))[1]
        if elem is object or all(_is(v, elem) for v in value.values()):
            return {str(k): (elem(v) if elem is not object else v) for k, v in value.items()}
    wanted = getattr(origin, "__name__", str(origin))
    raise ConfigError(
        f"option {name!r} from {source} must be {wanted}, got {type(value).__name__} {value!r}"
    )


def _is(value: Any, kind: type) -> bool:
    """`value` fits `kind` (ints count as floats; bools as neither)."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def merge(base: Options, values: dict[str, Any], *, source: str) -> Options:
    """Return `base` with `values` (names with '-' or '_') applied; None values are skipped."""
    types_ = _field_types()
    updates: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in types_:
            raise ConfigError(
                f"unknown option {raw_key!r} in {source}; valid options: {', '.join(option_names())}"
            )
        if value is None:
            continue
        updates[key] = _coerce(raw_key, value, types_[key], source)
    return dataclasses.replace(base, **updates)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML config: top-level keys, or a `[fair-edge]` table, are options."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {str(path)!r} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    if set(data) == {"fair-edge"} and isinstance(data["fair-edge"], dict):
        data = data["fair-edge"]
    return data


def resolve(config_path: str | os.PathLike | None, flags: dict[str, Any]) -> Options:
    """Defaults <- config file <- flags (flags left as None do not override)."""
    opts = Options()
    if config_path is not None:
        opts = merge(
            opts, load_config(config_path), source=f"config file {os.fspath(config_path)!r}"
        )
    opts = merge(opts, flags, source="the command line")
    return opts.validate()
