"""The user's data as the model needs it: image preprocessing and class order from the options.

Image folders (and raw .npz/.npy images) take their size, channels, mean/std (or a named preset),
resize mode and class order from the command line or config; `--input-shape C,H,W` supplies
channels and size when those are not given. The resulting `Preprocessing` travels with the
data into the bundle's manifest, so the board can prepare its inputs the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calibration.data import CalibrationSet, Preprocessing
from calibration.errors import CalibrationError
from calibration.presets import NORMALIZE_PRESETS
from fair_edge.config import Options

IMAGE_OPTIONS = ("image_size", "channels", "mean", "std", "normalize", "labels_file")


def image_options_given(opts: Options) -> list[str]:
    """The image-preprocessing options the user set (flags or config)."""
    given = [f"--{n.replace('_', '-')}" for n in IMAGE_OPTIONS if getattr(opts, n) is not None]
    return given + (["--resize-mode"] if opts.resize_mode != "stretch" else [])


def image_preprocessing(opts: Options) -> Preprocessing:
    """Preprocessing for raw images: the options, with --input-shape's C,H,W filling the gaps."""
    shape = opts.input_shape if opts.input_shape and len(opts.input_shape) == 3 else None
    size = opts.image_size or (shape[1:] if shape else None)
    resize = None if size is None else ((size[0], size[0]) if len(size) == 1 else tuple(size))
    channels = opts.channels or (shape[0] if shape and shape[0] in (1, 3) else 3)
    if opts.normalize is not None:
        mean, std = NORMALIZE_PRESETS[opts.normalize]
        what = f"--normalize {opts.normalize}"
    else:
        mean, std = tuple(opts.mean or (0.0,)), tuple(opts.std or (1.0,))
        what = "--mean/--std"
    if channels == 1 and max(len(mean), len(std)) > 1:
        raise CalibrationError(
            f"{what} gives 3 channel values but the images are read with 1 channel; give one "
            "value each, or --channels 3"
        )
    return Preprocessing(
        resize=resize,
        mean=mean,
        std=std,
        scale=1 / 255,
        channels=channels,
        resize_mode=opts.resize_mode,
    )


def class_order(opts: Options, model: Any = None) -> list[str] | None:
    """The model's output order of class names: --labels-file, else `model.class_names`."""
    from calibration.loaders import read_labels_file

    if opts.labels_file is not None:
        return read_labels_file(opts.labels_file)
    names = getattr(model, "class_names", None)
    if isinstance(names, list | tuple) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def load_user_data(spec: str, opts: Options, model: Any = None) -> CalibrationSet:
    """Load a --data / --eval-data / --recover-data spec with the image options applied."""
    from calibration.loaders import load_arrays, load_data, load_image_folder

    path = Path(spec)
    if path.is_dir():
        return load_image_folder(
            path, preprocessing=image_preprocessing(opts), classes=class_order(opts, model)
        )
    given = image_options_given(opts)
    if not given:
        return load_data(spec)
    if path.suffix.lower() in (".npz", ".npy") and path.is_file():
        return load_arrays(
            path, preprocessing=image_preprocessing(opts), class_names=class_order(opts, model)
        )
    raise CalibrationError(
        f"{', '.join(given)} apply to image folders and raw .npz/.npy images, not to {spec!r} "
        "(which brings its own preprocessing); drop them"
    )


def first_layer_hint(model: Any) -> str:
    """What the model's first Conv/Linear takes, as advice for a data/model mismatch ('' if unknown)."""
    import torch

    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            return (
                f"the model's first convolution takes {mod.in_channels} channel(s): set "
                f"--channels {mod.in_channels} and --image-size to the size it was trained on"
            )
        if isinstance(mod, torch.nn.Linear):
            return f"the model's first linear layer takes {mod.in_features} features"
    return ""
