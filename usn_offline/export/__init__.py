"""Export: ONNX model, TensorRT engine, deployment-gap check and the bundle."""

from usn_offline.export.bundle_writer import ExportConfig, bundle_summary, write_bundle
from usn_offline.export.onnx_model import export_onnx
from usn_offline.export.tensorrt_engine import build_engine, tensorrt_available

__all__ = ["ExportConfig", "build_engine", "bundle_summary", "export_onnx", "tensorrt_available",
           "write_bundle"]
