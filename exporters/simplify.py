"""BN folding and graph simplification with onnxslim, checked to compute the same outputs.

Surgery works on the unfolded export (BatchNorm parameters are sliced with their conv); deploy
then folds BatchNorm into the convolutions and removes no-op nodes with onnxslim.
"""

from __future__ import annotations

import onnx

from exporters.errors import SurgeryError
from exporters.verify import DEFAULT_TOL, VerificationResult, compare_models


def simplify(
    onnx_model: onnx.ModelProto, verify_inputs: object = None, tol: float = DEFAULT_TOL
) -> onnx.ModelProto:
    """onnxslim-simplified copy of `onnx_model` (BN folded); raises if the outputs change."""
    simplified, _ = simplify_checked(onnx_model, verify_inputs, tol)
    return simplified


def simplify_checked(
    onnx_model: onnx.ModelProto, verify_inputs: object = None, tol: float = DEFAULT_TOL
) -> tuple[onnx.ModelProto, VerificationResult]:
    """Like `simplify`, also returning the output comparison against the input model."""
    import onnxslim

    copy = onnx.ModelProto()
    copy.CopyFrom(onnx_model)
    try:
        simplified = onnxslim.slim(copy)
    except Exception as exc:
        raise SurgeryError(
            f"onnxslim could not simplify the model ({type(exc).__name__}: {exc})"
        ) from exc
    if simplified is None:
        raise SurgeryError("onnxslim returned no model")
    onnx.checker.check_model(simplified)
    result = compare_models(onnx_model, simplified, verify_inputs, tol=tol)
    return simplified, result
