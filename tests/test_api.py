"""`fair_edge.prune`, the one-call Python API: it finds the channel groups itself (a residual
model plans and cuts with no `groups=`), honours the controls, and its pruned module and pruned
ONNX graph agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration.loaders import load_digits
from exporters.evaluate import onnx_outputs
from exporters.onnx_export import export_onnx
from exporters.surgery import apply_plan
from fair_edge import PruneResult, prune
from pipeline.models import ResNet
from pipeline.plan import PlanError
from pipeline.planning import plan
from pipeline.scoring import score

X0 = torch.zeros(1, 1, 8, 8)


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return ResNet(blocks=(1, 1), widths=(8, 16), in_channels=1).eval()


def test_prune_builds_the_groups_of_a_residual_model(resnet, tmp_path) -> None:
    data = load_digits()
    r = prune(resnet, X0, data, target=0.3, samples_per_class=8, projections=8)
    assert isinstance(r, PruneResult)
    residual = [g for g in r.groups if len(g.members) > 1 and not g.frozen]
    assert residual, "a residual add must tie layers into one group"
    for g in residual:  # coupled layers lose the same channels
        pruned = {tuple(r.plan.layers[m].pruned) for m in g.members}
        assert len(pruned) == 1
    assert r.plan.method["budget"]["achieved"] >= 0.3 and r.flops_kept <= 0.7 + 1e-9
    assert r.surgery.verification["max_abs_diff"] <= r.surgery.verification["bound"]
    x = data.inputs[:32]
    with torch.no_grad():
        torch_out = r.model(torch.from_numpy(x)).numpy()
    paths = r.save(tmp_path)
    np.testing.assert_allclose(onnx_outputs(paths["pruned"], x), torch_out, atol=1e-4)
    assert r.sampling["per_class"] == 8 and r.sampling["samples"] == 80
    # without the groups, the stage functions give a plan that surgery refuses: what prune() spares
    s = score(resnet, data, samples_per_class=8, projections=8, progress=False)
    with pytest.raises(PlanError, match="coupled"):
        apply_plan(export_onnx(resnet, X0, None), plan(s, 0.5, model=resnet))


def test_prune_controls_and_opset(resnet) -> None:
    free = prune(resnet, X0, load_digits(), tod=0.5, samples_per_class=8, projections=8)
    assert any(len(lp.pruned) > int(0.25 * lp.n_units) for lp in free.plan.layers.values())
    assert any(lp.pruned for n, lp in free.plan.layers.items() if n.startswith("layers.1."))
    r = prune(resnet, X0, load_digits(), tod=0.5, samples_per_class=8, projections=8,
              ignore_layers="layers.1.*", max_layer_ratio=0.25, round_to=2, opset=18)  # fmt: skip
    for name, lp in r.plan.layers.items():
        if name.startswith("layers.1."):
            assert lp.pruned == []
        assert len(lp.pruned) <= int(0.25 * lp.n_units)
        assert lp.kept % 2 == 0 or lp.kept == lp.n_units
    assert r.plan.method["controls"]["ignore_layers"] == ["layers.1.*"]
    assert r.plan.method["export"] == {"opset": 18}
    assert {o.domain: o.version for o in r.pruned.opset_import}[""] == 18
    with pytest.raises(PlanError, match="matches no layer"):
        prune(resnet, X0, load_digits(), samples_per_class=8, projections=8, ignore_layers="nope")


def test_an_ignored_group_member_keeps_its_group(resnet) -> None:
    """Ignoring one member of a residual group keeps the whole group (its partner layer too)."""
    data = load_digits()
    free = prune(resnet, X0, data, tod=0.5, samples_per_class=8, projections=8)
    assert free.plan.layers["layers.1.conv2"].pruned  # tied to the shortcut, pruned when free
    r = prune(resnet, X0, data, tod=0.5, samples_per_class=8, projections=8,
              ignore_layers="layers.1.shortcut")  # fmt: skip
    assert r.plan.layers["layers.1.shortcut.0"].pruned == []
    assert r.plan.layers["layers.1.conv2"].pruned == []
    assert "held group" in r.plan.method["held"]["layers.1.conv2"]
    assert r.plan.method["controls"]["ignored"] == ["layers.1.shortcut.0"]


def test_unlabelled_inputs_use_the_models_own_top1() -> None:
    from calibration.loaders import load_fashion_mnist
    from pipeline.train import default_model

    x = load_fashion_mnist("test").inputs[:300]
    r = prune(default_model(progress=False), torch.zeros(1, 1, 28, 28), (x, None), target=0.3,
              samples_per_class=8, projections=8)  # fmt: skip
    assert r.sampling == {"samples": 300, "label_source": "none"}
    assert r.plan.method["budget"]["achieved"] >= 0.3
    assert r.surgery.verification["max_abs_diff"] <= r.surgery.verification["bound"]
