"""Random plans over channel groups, for tests and benchmarks (coverage, not quality)."""

from __future__ import annotations

import math

import numpy as np

from pipeline.groups import ChannelGroup
from pipeline.plan import LayerPlan, ModelFingerprint, Plan


def random_plan(
    groups: list[ChannelGroup],
    fraction: float,
    seed: int,
    fingerprint: ModelFingerprint,
    multiple: int = 1,
) -> Plan:
    """Remove round(fraction * n) random channels (at most n - 1) of every non-frozen group.

    With `multiple` > 1 the kept count is rounded to a multiple of it (when the group has more
    than `multiple` channels), as hardware-friendly widths are; an attention group's kept heads
    are rounded so their channels are.

    Coupled members get the same group channels, translated by their index maps when the
    group records non-identity maps (ChannelGroup.extra['index_maps']).
    """
    rng = np.random.default_rng(seed)
    layers: dict[str, LayerPlan] = {}
    for g in groups:
        if g.frozen or g.n_channels < 2:
            continue
        k = min(int(round(fraction * g.n_channels)), g.n_channels - 1)
        head_dim = int((g.extra.get("attention") or {}).get("head_dim", 1))
        mult = multiple // math.gcd(head_dim, multiple)  # units are heads of head_dim channels
        if mult > 1 and g.n_channels > mult:
            kept = max(mult, int(round((g.n_channels - k) / mult)) * mult)
            k = g.n_channels - min(kept, g.n_channels)
        if k <= 0:
            continue
        segs = g.extra.get("conv_groups")
        if segs:  # the same count from every conv group of a grouped convolution
            size = len(segs[0])
            per = min(int(round(k / len(segs))), size - 1)
            step = multiple // math.gcd(len(segs), multiple)
            if step > 1 and size > step:  # total kept a multiple of `multiple`
                per = size - min(size, max(step, int(round((size - per) / step)) * step))
            if per <= 0:
                continue
            chans = np.concatenate([rng.choice(seg, size=per, replace=False) for seg in segs])
        else:
            chans = rng.choice(g.n_channels, size=k, replace=False)
        maps = g.extra.get("index_maps", {})
        for m in g.members:
            mp = np.asarray(maps.get(m, np.arange(g.n_channels)))
            layers[m] = LayerPlan(m, g.n_channels, sorted(int(i) for i in mp[chans]), group=g.name)
    return Plan(
        fingerprint=fingerprint,
        layers=layers,
        method={"name": "random", "fraction": fraction, "seed": seed, "multiple": multiple},
        groups=list(groups),
    )
