"""Errors of the exporters layer: each is a one-line FairEdgeError the CLI prints as is."""

from __future__ import annotations

from calibration.errors import FairEdgeError


class ExportError(FairEdgeError):
    """A model that cannot be exported to ONNX, or an ONNX file that cannot be read."""


class SurgeryError(FairEdgeError):
    """A graph surgery that cannot be carried out (unsupported graph, invalid result)."""


class VerificationError(SurgeryError):
    """A pruned model whose outputs differ from the masked original beyond the tolerance."""
