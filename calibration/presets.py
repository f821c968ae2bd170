"""Preprocessing choices by name: resize modes and mean/std presets.

Kept apart from calibration.data (which needs torch) so the command line can list and check
these choices without importing torch at start-up.
"""

from __future__ import annotations

RESIZE_MODES = ("stretch", "shorter-side", "center-crop")
"""stretch: resize to (h, w), aspect ratio not kept; shorter-side: scale so the image covers
(h, w), keeping its aspect ratio, then crop the centre (the usual ImageNet evaluation transform
with crop ratio 1); center-crop: crop the centre (h, w) without scaling."""
# Named mean/std presets (per channel, of pixels scaled to 0..1).
NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "zero-one": ((0.0,), (1.0,)),
    "minus-one-one": ((0.5,), (0.5,)),
}

__all__ = ["NORMALIZE_PRESETS", "RESIZE_MODES"]
