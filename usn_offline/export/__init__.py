"""Export: ONNX model, TensorRT engine, deployment-gap check and the bundle.

The names are imported on first use, so that importing the package costs nothing. The
TensorRT engine builder and runner live in ``usn_offline.runtime.tensorrt_engine``: the
robot builds and runs engines without torch."""

from __future__ import annotations

import importlib

_WHERE = {"ExportConfig": "bundle_writer", "bundle_summary": "bundle_writer", "write_bundle": "bundle_writer",
          "export_onnx": "onnx_model"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
