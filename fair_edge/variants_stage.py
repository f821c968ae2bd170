"""The TFLite and quantized (int8 / fp16) variants of the pruned model, and what a TensorRT
profile's build_engine.sh builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from devices.profile import DeviceProfile
from fair_edge.config import Options
from fair_edge.inputs import (
    INT8_CALIBRATION,
    VERIFY_SAMPLES,
    DeployError,
    Inputs,
    calibration_subset,
    example_input,
)
from fair_edge.plan_stage import prune_torch_model
from pipeline.plan import Plan


def build_tflite(
    opts: Options,
    inp: Inputs,
    model: torch.nn.Module | None,
    pruned_model: torch.nn.Module | None,
    original_proto: onnx.ModelProto,
    the_plan: Plan,
    pruned_onnx: Path,
    original_onnx: Path,
    work: Path,
    verify_x: np.ndarray,
    files: dict[str, Path],
    reports: dict[str, Any],
    notes: list[str],
) -> torch.nn.Module | None:
    """Convert original and pruned torch models to TFLite; verify the pruned one against ONNX."""
    from exporters.tflite import convert_tflite, verify_tflite

    if model is None:
        if opts.runtime == "tflite":
            raise DeployError("TFLite needs the PyTorch model; an ONNX input can only go to ONNX")
        notes.append("TFLite skipped: the model came as ONNX (TFLite converts from PyTorch)")
        return None
    x0 = example_input(inp.calibration)
    if pruned_model is None:
        pruned_model = prune_torch_model(model, the_plan, x0, original_proto)
    pruned_tfl = convert_tflite(pruned_model, x0, work / "model.tflite")
    labels = None
    reports["pruned"] = verify_tflite(pruned_tfl, pruned_onnx, verify_x, labels).to_json()
    files["model.tflite"] = pruned_tfl
    original_tfl = convert_tflite(model, x0, work / "original.tflite")
    reports["original"] = verify_tflite(original_tfl, original_onnx, verify_x, labels).to_json()
    files["reference/original.tflite"] = original_tfl
    return pruned_model


def build_variants(
    opts: Options,
    inp: Inputs,
    pruned_model: torch.nn.Module | None,
    pruned_onnx: Path,
    work: Path,
    variants: list[dict[str, Any]],
    files: dict[str, Path],
    tflite_files: dict[str, Path],
    tflite_reports: dict[str, Any],
    notes: list[str],
    original_onnx: Path,
) -> None:
    """int8 (ONNX QDQ, and TFLite full-integer when TFLite is built) or fp16 (ONNX).

    On a TensorRT profile the int8 QDQ model is symmetric (zero points 0, what TensorRT takes);
    on a GPU profile the original gets the same variant, so the two are timed as a pair.
    """
    from exporters.quantize import convert_fp16_onnx, quantize_int8_onnx
    from fair_edge.gpu_stage import gpu_profile

    calib = calibration_subset(inp.calibration, INT8_CALIBRATION, opts.seed)
    trt = inp.profile.tensorrt
    pair = gpu_profile(inp.profile)
    if opts.quantize == "int8":
        path = quantize_int8_onnx(pruned_onnx, work / "model.int8.onnx", calib, symmetric=trt)
        files["model.int8.onnx"] = path
        kind = ("int8 QDQ symmetric per-channel, zero points 0 (TensorRT)" if trt
                else "int8 QDQ per-channel (ONNX Runtime)")  # fmt: skip
        variants.append(
            {"file": "model.int8.onnx", "kind": kind, "kind_id": "int8",
             "calibration_samples": len(calib), "size_bytes": path.stat().st_size}
        )  # fmt: skip
        if pair:
            ref = quantize_int8_onnx(original_onnx, work / "original.int8.onnx", calib,
                                     symmetric=trt)  # fmt: skip
            files["reference/original.int8.onnx"] = ref
            variants[-1]["original_file"] = "reference/original.int8.onnx"
        if "model.tflite" in tflite_files and pruned_model is not None:
            from exporters.tflite import convert_tflite, verify_tflite

            tpath = convert_tflite(
                pruned_model, example_input(inp.calibration), work / "model.int8.tflite",
                quantization="int8", calibration_inputs=calib,
            )  # fmt: skip
            tflite_reports["pruned_int8"] = verify_tflite(
                tpath, pruned_onnx, calib[:VERIFY_SAMPLES], None, quantization="int8"
            ).to_json()
            files["model.int8.tflite"] = tpath
            variants.append(
                {"file": "model.int8.tflite", "kind": "int8 PT2E static (litert-torch)",
                 "calibration_samples": len(calib), "size_bytes": tpath.stat().st_size}
            )  # fmt: skip
    elif opts.quantize == "fp16":
        if not any(
            "CUDA" in p or "Tensorrt" in p for r in inp.profile.runtimes for p in r.providers
        ):
            notes.append(
                f"fp16 requested for {inp.profile.name}, whose runtimes list no GPU provider; "
                "CPU fp16 is usually slower"
            )
        path = convert_fp16_onnx(pruned_onnx, work / "model.fp16.onnx")
        files["model.fp16.onnx"] = path
        variants.append(
            {"file": "model.fp16.onnx", "kind": "fp16 (float32 inputs/outputs)", "kind_id": "fp16",
             "calibration_samples": 0, "size_bytes": path.stat().st_size}
        )  # fmt: skip
        if pair:
            ref = convert_fp16_onnx(original_onnx, work / "original.fp16.onnx")
            files["reference/original.fp16.onnx"] = ref
            variants[-1]["original_file"] = "reference/original.fp16.onnx"


def engine_models(
    opts: Options,
    profile: DeviceProfile,
    pruned_onnx: Path,
    original_onnx: Path,
    variants: list[dict[str, Any]],
    files: dict[str, Path],
) -> dict[str, tuple[Path, str]]:
    """The bundle's ONNX models build_engine.sh builds, each at the precision it is timed at."""
    from devices.runspec import gpu_settings
    from fair_edge.gpu_stage import run_spec, variant_precision

    base = gpu_settings(run_spec(opts), profile)["precision"]
    models = {"model.onnx": (pruned_onnx, base), "reference/original.onnx": (original_onnx, base)}
    for v in variants:
        if v["file"].endswith(".onnx"):
            prec = variant_precision(v["kind_id"])
            models[v["file"]] = (files[v["file"]], prec)
            if v.get("original_file"):
                models[v["original_file"]] = (files[v["original_file"]], prec)
    return models
