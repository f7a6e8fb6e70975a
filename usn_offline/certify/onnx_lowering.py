"""Lower an ONNX model (the one a bundle serves) into the certification graph.

Per-frame proofs must be about the network the robot runs, so the node lowers the
bundle's ``model.onnx`` itself rather than a checkpoint. The operator set is the one our
exporter writes (Conv, Relu, Gemm, Flatten, Add, AveragePool, BatchNormalization, and an
InstanceNormalization at the input for standardising models);
anything else, or an attribute the engine cannot represent, is refused with the node's
name. Like :func:`~usn_offline.certify.graph.lower`, the result is checked numerically
against the model itself (ONNX Runtime) before it is used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from usn_offline.certify.errors import CertificationError
from usn_offline.certify.graph import Graph, _fold_batchnorms, _Lowering, _prune_unused, clip_input
from usn_offline.certify.ops import AddOp


def _attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv(node, attrs: dict, weights: dict[str, np.ndarray]) -> nn.Conv2d:
    weight = weights.get(node.input[1])
    if weight is None or weight.ndim != 4:
        raise CertificationError(f"Conv {node.name}: the weight must be a 4-D initializer")
    if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
        raise CertificationError(f"Conv {node.name}: only group=1 and dilation 1 are supported")
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise CertificationError(f"Conv {node.name}: auto_pad is not supported")
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if pads[0] != pads[2] or pads[1] != pads[3]:
        raise CertificationError(f"Conv {node.name}: asymmetric padding {pads} is not supported")
    bias = weights.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]),
                     stride=tuple(attrs.get("strides", [1, 1])), padding=(pads[0], pads[1]), bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
        if bias is not None:
            conv.bias.copy_(torch.from_numpy(bias))
    return conv


def _gemm(node, attrs: dict, weights: dict[str, np.ndarray]) -> nn.Linear:
    weight = weights.get(node.input[1])
    if weight is None or weight.ndim != 2:
        raise CertificationError(f"Gemm {node.name}: the weight must be a 2-D initializer")
    if attrs.get("transA", 0) != 0 or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise CertificationError(f"Gemm {node.name}: only transA=0, alpha=1, beta=1 are supported")
    if attrs.get("transB", 0) == 0:
        weight = weight.T
    bias = weights.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if bias is not None and bias.shape != (weight.shape[0],):
        raise CertificationError(f"Gemm {node.name}: bias of shape {bias.shape} is not per output")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        if bias is not None:
            linear.bias.copy_(torch.from_numpy(bias))
    return linear


def _batchnorm(node, attrs: dict, weights: dict[str, np.ndarray]) -> nn.BatchNorm2d:
    try:
        scale, bias, mean, var = (weights[name] for name in node.input[1:5])
    except KeyError as exc:
        raise CertificationError(f"BatchNormalization {node.name}: parameters must be initializers") from exc
    bn = nn.BatchNorm2d(scale.shape[0], eps=float(attrs.get("epsilon", 1e-5)))
    with torch.no_grad():
        for param, value in ((bn.weight, scale), (bn.bias, bias), (bn.running_mean, mean), (bn.running_var, var)):
            param.copy_(torch.from_numpy(value))
    return bn.eval()


def _instance_norm(node, attrs: dict, weights: dict[str, np.ndarray]) -> nn.InstanceNorm2d:
    """Only the plain standardisation (scale 1, bias 0) the exporter writes for ``input_norm``."""
    try:
        scale, bias = (weights[name] for name in node.input[1:3])
    except (KeyError, ValueError) as exc:
        raise CertificationError(f"InstanceNormalization {node.name}: scale and bias must be constants") from exc
    if not (np.all(scale == 1.0) and np.all(bias == 0.0)):
        raise CertificationError(f"InstanceNormalization {node.name}: only scale 1 and bias 0 (input "
                                 "standardisation) are supported")
    return nn.InstanceNorm2d(scale.shape[0], eps=float(attrs.get("epsilon", 1e-5)), affine=False)


def _avgpool(node, attrs: dict) -> nn.AvgPool2d:
    if any(attrs.get("pads", [0, 0, 0, 0])) or attrs.get("ceil_mode", 0):
        raise CertificationError(f"AveragePool {node.name}: only pads=0 and ceil_mode=0 are supported")
    kernel = tuple(attrs["kernel_shape"])
    return nn.AvgPool2d(kernel, stride=tuple(attrs.get("strides", kernel)))


def lower_onnx(path: Path | str, clip: bool = True, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> Graph:
    """The certification graph of the ONNX model at ``path`` (one input (1, C, H, W), one
    output), preceded by the perturbation layer; refused unless it computes what ONNX
    Runtime computes on test inputs."""
    import onnx
    from onnx import numpy_helper

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise CertificationError(f"cannot read the ONNX model {path}: {exc}") from exc
    graph_proto = proto.graph
    weights = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in graph_proto.initializer}
    inputs = [i for i in graph_proto.input if i.name not in weights]
    if len(inputs) != 1 or len(graph_proto.output) != 1:
        raise CertificationError(f"{path}: the model must have one input and one output")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or any(d <= 0 for d in dims[1:]):
        raise CertificationError(f"{path}: the input must be (1, C, H, W) with a static size, got {dims}")
    input_shape = tuple(dims[1:])
    device = torch.device(device)
    low = _Lowering(input_shape, dtype, device)
    standardised = any(node.op_type == "InstanceNormalization" for node in graph_proto.node)
    if standardised:
        readers = [node for node in graph_proto.node if inputs[0].name in node.input]
        if len(readers) != 1 or readers[0].op_type != "InstanceNormalization":
            raise CertificationError(f"{path}: an InstanceNormalization (input standardisation) must be the only "
                                     "reader of the model's input")
    env = {inputs[0].name: clip_input(low, input_shape, clip, standardised)}
    for node in graph_proto.node:
        attrs = _attributes(node)
        if node.op_type == "Constant":  # the exporter writes small tensors (norm scale, bias) as nodes
            if "value" not in attrs:
                raise CertificationError(f"Constant {node.name}: only a tensor 'value' is supported")
            weights[node.output[0]] = numpy_helper.to_array(attrs["value"]).astype(np.float64)
            continue
        try:
            srcs = [env[name] for name in node.input if name and name not in weights]
        except KeyError as exc:
            raise CertificationError(f"{node.op_type} {node.name}: input {exc} is not produced by the graph") from exc
        name = node.name or node.output[0]
        if node.op_type == "Conv":
            out = low.module(_conv(node, attrs, weights), srcs[0], name)
        elif node.op_type == "Gemm":
            out = low.module(_gemm(node, attrs, weights), srcs[0], name)
        elif node.op_type == "BatchNormalization":
            out = low.module(_batchnorm(node, attrs, weights), srcs[0], name)
        elif node.op_type == "AveragePool":
            out = low.module(_avgpool(node, attrs), srcs[0], name)
        elif node.op_type == "InstanceNormalization":
            out = low.module(_instance_norm(node, attrs, weights), srcs[0], name)
        elif node.op_type == "Relu":
            out = low.module(nn.ReLU(), srcs[0], name)
        elif node.op_type == "Flatten":
            if attrs.get("axis", 1) != 1:
                raise CertificationError(f"Flatten {name}: only axis=1 is supported")
            out = low.flatten(srcs[0], name)
        elif node.op_type == "Add":
            if len(srcs) != 2 or low.nodes[srcs[0]].shape != low.nodes[srcs[1]].shape:
                raise CertificationError(f"Add {name}: only the sum of two tensors of one shape is supported")
            out = low.add(AddOp((1.0, 1.0), low.nodes[srcs[0]].shape), srcs, low.nodes[srcs[0]].shape, name)
        else:
            raise CertificationError(f"unsupported ONNX operator {node.op_type} ({name}); supported: Conv, Relu, "
                                     "Gemm, Flatten, Add, AveragePool, BatchNormalization, InstanceNormalization "
                                     "(input standardisation)")
        env[node.output[0]] = out
    output_name = graph_proto.output[0].name
    if output_name not in env:
        raise CertificationError(f"{path}: the output {output_name} is not computed by the graph")
    nodes, output = _prune_unused(*_fold_batchnorms(*_prune_unused(low.nodes, env[output_name])))
    graph = Graph(nodes=nodes, output=output, input_shape=input_shape, dtype=dtype, device=device,
                  standardise=low.standardise)
    _check_against_runtime(graph, path)
    return graph


def _check_against_runtime(graph: Graph, path: Path | str, samples: int = 4) -> None:
    """The lowered graph (float64) must equal ONNX Runtime (float32) on test inputs to
    float32 precision: a structural mistake shows up orders of magnitude larger."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    x = rng.random((samples, *graph.input_shape)).astype(np.float32)
    x[0] = 0.5
    want = np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(samples)]).astype(np.float64)
    one = torch.ones(samples, dtype=torch.float64)
    with torch.no_grad():
        got = graph.astype(torch.float64).evaluate(torch.from_numpy(x.astype(np.float64)).to(graph.device),
                                                   one.to(graph.device), torch.zeros_like(one).to(graph.device))
    got = got.cpu().numpy().reshape(want.shape) if got.numel() == want.size else None
    if got is None:
        raise CertificationError(f"{path}: the lowered graph's output size differs from the model's")
    gap = float(np.abs(got - want).max())
    if not gap <= 1e-4 * (1.0 + float(np.abs(want).max())):
        raise CertificationError(f"{path}: the lowered graph does not compute what the ONNX model computes "
                                 f"(largest difference {gap:.3g}): an operator attribute the engine ignores")
