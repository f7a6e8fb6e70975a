"""Export: ONNX model, TensorRT engine, deployment-gap check and the bundle.

The names are imported on first use: the robot's runtime imports
``usn_offline.export.tensorrt_engine`` for its TensorRT backend, and that must not pull
in the bundle writer, which needs torch."""

from __future__ import annotations

import importlib

_WHERE = {"ExportConfig": "bundle_writer", "bundle_summary": "bundle_writer", "write_bundle": "bundle_writer",
          "export_onnx": "onnx_model", "build_engine": "tensorrt_engine", "tensorrt_available": "tensorrt_engine"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
