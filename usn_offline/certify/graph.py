"""Lower a torch network, preceded by the semantic perturbation layer, into a small graph.

The network is traced with ``torch.fx`` so any feed-forward graph of supported
operations works (sequential stacks, residual blocks, ...). BatchNorm following a
convolution is folded into it; any other BatchNorm becomes a per-channel affine op.
The perturbation layer x'(a, b) = clip(a x + b, 0, 1) is prepended as
``z = a x + b``, ``x' = relu(z) - relu(z - 1)`` (clipping modelled exactly), or
``x' = z`` for the unclipped variant.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from usn_offline.certify.errors import CertificationError
from usn_offline.certify.ops import (
    AddOp,
    AffineOp,
    AvgPool2dOp,
    ChannelAffineOp,
    Conv2dOp,
    FlattenOp,
    LinearOp,
    ReluOp,
    SemanticInputOp,
    input_terms,
)
from usn_offline.certify.standardise import Standardise


@dataclass
class GraphOp:
    """One operation of the lowered graph: ``op`` applied to the outputs of the operations
    ``inputs`` (indices into ``Graph.nodes``), giving ``shape``."""

    op: object
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    name: str


@dataclass
class Graph:
    """Nodes in topological order; node 0 is the semantic input z = a x + b."""

    nodes: list[GraphOp]
    output: int
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    users: list[list[int]] = field(default_factory=list)
    # The network standardises its input first (certify/standardise.py): node 0 is then the
    # standardised input, and bounds go through :func:`standardised_sets` to the body.
    standardise: Standardise | None = None

    def __post_init__(self) -> None:
        self.users = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            for j in node.inputs:
                self.users[j].append(i)

    def astype(self, dtype: torch.dtype) -> Graph:
        """The same graph computing in ``dtype`` (cached; used for cheap float32 screening)."""
        if dtype == self.dtype:
            return self
        cache = self.__dict__.setdefault("_dtype_cache", {})
        if dtype not in cache:
            nodes = []
            for node in self.nodes:
                op = node.op
                if dataclasses.is_dataclass(op):
                    changes = {f.name: getattr(op, f.name).to(dtype) for f in dataclasses.fields(op)
                               if isinstance(getattr(op, f.name), torch.Tensor)}
                    op = dataclasses.replace(op, **changes)
                nodes.append(GraphOp(op, node.inputs, node.shape, node.name))
            cache[dtype] = Graph(nodes=nodes, output=self.output, input_shape=self.input_shape, dtype=dtype,
                                 device=self.device, standardise=self.standardise)
        return cache[dtype]

    def bias_map(self, i: int) -> torch.Tensor:
        """The bias of affine node i broadcast to its output shape (cached)."""
        cache = self.__dict__.setdefault("_bias_cache", {})
        if i not in cache:
            node = self.nodes[i]
            zeros = torch.zeros(1, *self.nodes[node.inputs[0]].shape, dtype=self.dtype, device=self.device)
            cache[i] = node.op.apply(zeros)[0]
        return cache[i]

    @property
    def has_residual(self) -> bool:
        """Whether two paths of the network are added (a residual block; the clip's
        relu(z) - relu(z - 1) aside)."""
        return any(isinstance(n.op, AddOp) and n.op.coeffs == (1.0, 1.0) for n in self.nodes)

    def default_cut(self) -> int | None:
        """Where the backward pass hands over to forward linear bounds by default: the output
        of the first network ReLU whose resolution is at most a quarter of the input's.
        Early layers are nearly exact in forward mode and the most expensive to go back
        through (measured on CNN7: 2x faster backward for ~15 % wider bounds)."""
        area = self.input_shape[-1] * self.input_shape[-2]
        for i in self.relu_indices:
            shape = self.nodes[i].shape
            if self.nodes[i].name.startswith("clip."):
                continue
            if len(shape) == 3 and shape[1] * shape[2] * 4 <= area:
                return i
            if len(shape) == 1:
                return None
        return None

    @property
    def relu_indices(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if isinstance(n.op, ReluOp)]

    def evaluate(self, images: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 fill: torch.Tensor | float = 0.5) -> torch.Tensor:
        """Exact network output on clip(a x + b) for a batch: images (N, C, H, W) (or (1, ...)
        broadcast), a and b of shape (N,). Differentiable in a and b.

        For pixel sets (:func:`~usn_offline.certify.ops.input_terms`) the input is
        a x + b m + c with c = c_lo + fill (c_hi - c_lo), ``fill`` in [0, 1] (a scalar or a
        tensor broadcast against (N, C, H, W)): one member of the set.

        With :attr:`standardise`, that input (clipped first for plain images when its
        ``clip`` says so; a pixel set models clipping itself) is standardised first."""
        values: list[torch.Tensor | None] = [None] * len(self.nodes)
        for i, node in enumerate(self.nodes):
            op = node.op
            if isinstance(op, SemanticInputOp):
                view = (-1,) + (1,) * len(self.input_shape)
                x, m, c_lo, c_hi = input_terms(images, self.input_shape[0])
                values[i] = x * a.view(view) + (b.view(view) if m is None else
                                                b.view(view) * m + c_lo + fill * (c_hi - c_lo))
                if self.standardise is not None:
                    pre = values[i].clamp(0.0, 1.0) if m is None and self.standardise.clip else values[i]
                    values[i] = self.standardise.apply(pre)
            elif isinstance(op, AffineOp):
                values[i] = op.apply(values[node.inputs[0]])
            elif isinstance(op, ReluOp):
                values[i] = torch.relu(values[node.inputs[0]])
            elif isinstance(op, AddOp):
                values[i] = sum(c * values[j] for c, j in zip(op.coeffs, node.inputs, strict=True))
            else:  # pragma: no cover - lowering only creates the ops above
                raise CertificationError(f"cannot evaluate {type(op).__name__}")
        return values[self.output]


def _bn_affine(bn: nn.BatchNorm2d, dtype, device, keep_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise CertificationError("BatchNorm without running statistics cannot be certified")
    take = (lambda t: t.to(device, dtype)) if keep_grad else (lambda t: t.detach().to(device, dtype))  # noqa: E731
    var = bn.running_var.detach().to(device, dtype)
    mean = bn.running_mean.detach().to(device, dtype)
    gamma = take(bn.weight) if bn.weight is not None else torch.ones_like(var)
    beta = take(bn.bias) if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _Lowering:
    def __init__(self, input_shape, dtype, device, keep_grad: bool = False):
        self.keep_grad = keep_grad
        self.nodes: list[GraphOp] = []
        self.dtype, self.device = dtype, device
        self.input_shape = tuple(input_shape)
        # Input standardisation found at the head of the network, and whether the input
        # before it is clipped (then node 0 is z = a x + b itself, see clip_input).
        self.standardise: Standardise | None = None
        self.clip = True

    def add(self, op, inputs, shape, name) -> int:
        self.nodes.append(GraphOp(op, tuple(inputs), tuple(shape), name))
        return len(self.nodes) - 1

    def t(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        return tensor.to(self.device, self.dtype) if self.keep_grad else tensor.detach().to(self.device, self.dtype)

    def module(self, mod: nn.Module, src: int, name: str) -> int:
        shape = self.nodes[src].shape
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1 or _pair(mod.dilation) != (1, 1) or mod.padding_mode != "zeros":
                raise CertificationError(f"{name}: only plain Conv2d (groups=1, dilation=1, zero padding)")
            if isinstance(mod.padding, str):
                raise CertificationError(f"{name}: string padding '{mod.padding}' is not supported")
            stride, padding = _pair(mod.stride), _pair(mod.padding)
            k = mod.weight.shape[2:]
            out = (mod.out_channels,) + tuple(
                (shape[1 + i] + 2 * padding[i] - k[i]) // stride[i] + 1 for i in range(2))
            op = Conv2dOp(self.t(mod.weight), self.t(mod.bias), stride, padding, shape, out)
            return self.add(op, [src], out, name)
        if isinstance(mod, nn.BatchNorm2d):
            # Folded into its convolution later (_fold_batchnorms), once the whole graph shows
            # whether anything else reads that convolution's output.
            scale, shift = _bn_affine(mod, self.dtype, self.device, self.keep_grad)
            return self.add(ChannelAffineOp(scale, shift, shape, shape), [src], shape, name)
        if isinstance(mod, nn.Linear):
            if len(shape) != 1:
                raise CertificationError(f"{name}: Linear needs a flat input, got shape {shape}")
            out = (mod.out_features,)
            return self.add(LinearOp(self.t(mod.weight), self.t(mod.bias), shape, out), [src], out, name)
        if isinstance(mod, nn.ReLU):
            if mod.inplace:
                raise CertificationError(_INPLACE.format(name=name))
            return self.add(ReluOp(shape), [src], shape, name)
        if isinstance(mod, nn.Flatten):
            if mod.start_dim != 1 or mod.end_dim != -1:
                raise CertificationError(f"{name}: only Flatten(start_dim=1) is supported")
            return self.flatten(src, name)
        if isinstance(mod, nn.AvgPool2d):
            if _pair(mod.padding) != (0, 0) or mod.ceil_mode or mod.divisor_override is not None:
                raise CertificationError(f"{name}: only AvgPool2d without padding, ceil_mode or divisor_override")
            kernel = _pair(mod.kernel_size)
            stride = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
            out = (shape[0],) + tuple((shape[1 + i] - kernel[i]) // stride[i] + 1 for i in range(2))
            return self.add(AvgPool2dOp(kernel, stride, shape, out), [src], out, name)
        if isinstance(mod, nn.InstanceNorm2d):
            return self.standardisation(mod, src, name)
        if isinstance(mod, (nn.Identity, nn.Dropout)):
            return src
        raise CertificationError(f"unsupported layer {name}: {type(mod).__name__} (supported: Conv2d, "
                                 "Linear, ReLU, BatchNorm2d, AvgPool2d, Flatten, residual add)")

    def standardisation(self, mod: nn.InstanceNorm2d, src: int, name: str) -> int:
        """The network's input standardisation: only as its very first step, on one channel,
        without affine parameters or running statistics (then it is exactly
        :class:`Standardise`); the input node then carries it."""
        if mod.affine or mod.track_running_stats:
            raise CertificationError(f"{name}: only InstanceNorm2d(affine=False, track_running_stats=False) "
                                     "(input standardisation) is supported")
        if src != 0 or self.nodes[0].shape[0] != 1 or self.standardise is not None:
            raise CertificationError(f"{name}: an InstanceNorm2d is supported only as the network's first "
                                     "operation on a one-channel input (input standardisation)")
        self.standardise = Standardise(float(mod.eps), clip=self.clip)
        return src

    def flatten(self, src: int, name: str) -> int:
        shape = self.nodes[src].shape
        if len(shape) == 1:
            return src
        out = (int(torch.tensor(shape).prod()),)
        return self.add(FlattenOp(shape, out), [src], out, name)


def clip_input(low: _Lowering, input_shape: tuple[int, ...], clip: bool, standardised: bool = False) -> int:
    """Add the perturbation layer z = a x + b and, with ``clip``, x' = relu(z) - relu(z - 1);
    returns the node the network reads. ``standardised``: the network standardises its
    input first; the clip then stays inside that step (:class:`Standardise`), not in the
    graph, whose node 0 is the standardised input."""
    low.clip = clip
    z = low.add(SemanticInputOp(input_shape), [], input_shape, "semantic_input")
    if not clip or standardised:
        return z
    zero = torch.zeros(input_shape[0], dtype=low.dtype, device=low.device)
    one = torch.ones(input_shape[0], dtype=low.dtype, device=low.device)
    shifted = low.add(ChannelAffineOp(one, zero - 1.0, input_shape, input_shape), [z], input_shape, "clip.shift")
    r0 = low.add(ReluOp(input_shape), [z], input_shape, "clip.relu0")
    r1 = low.add(ReluOp(input_shape), [shifted], input_shape, "clip.relu1")
    return low.add(AddOp((1.0, -1.0), input_shape), [r0, r1], input_shape, "clip")


def lower(model: nn.Module, input_shape: tuple[int, ...], clip: bool = True,
          dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
          differentiable: bool = False) -> Graph:
    """Lower ``model`` (in eval mode) for inputs of shape ``input_shape`` = (C, H, W).

    ``differentiable``: the graph's weights stay attached to the module's parameters, so
    bounds computed on it have gradients (bound-based training); the numerical check
    against the module is skipped then (it is a training loss, not a certificate; tests
    check that both lowerings agree)."""
    if differentiable:
        return _lower(model, input_shape, clip, dtype, torch.device(device), True)
    with torch.no_grad():
        return _lower(model, input_shape, clip, dtype, torch.device(device), False)


def _lower(model: nn.Module, input_shape: tuple[int, ...], clip: bool, dtype: torch.dtype, device: torch.device,
           differentiable: bool) -> Graph:
    training = [name or "the model" for name, module in model.named_modules() if module.training]
    if training:  # a submodule left in training mode too: the check below runs an eval() copy
        raise CertificationError(f"put the model in eval mode before certification (BatchNorm statistics): "
                                 f"{', '.join(training[:3])} {'is' if len(training) == 1 else 'are'} training")
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise CertificationError(f"cannot trace the model with torch.fx: {exc}") from exc
    low = _Lowering(input_shape, dtype, device, keep_grad=differentiable)
    modules = dict(traced.named_modules())
    standardised = any(n.op == "call_module" and isinstance(modules.get(n.target), nn.InstanceNorm2d)
                       for n in traced.graph.nodes)
    if standardised:
        readers = [user for n in traced.graph.nodes if n.op == "placeholder" for user in n.users]
        if len(readers) != 1 or readers[0].op != "call_module" or not isinstance(
                modules.get(readers[0].target), nn.InstanceNorm2d):
            raise CertificationError("an InstanceNorm2d (input standardisation) must be the only reader of the "
                                     "network's input")
    x_in = clip_input(low, tuple(input_shape), clip, standardised)

    env: dict[str, int] = {}
    output = None
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            if env:
                raise CertificationError("the model must take exactly one input tensor")
            env[node.name] = x_in
            continue
        if node.op == "output":
            arg = node.args[0]
            if not isinstance(arg, torch.fx.Node):
                raise CertificationError("the model must return a single tensor")
            output = env[arg.name]
            continue
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        srcs = [env[a.name] for a in args]
        if node.op == "call_module":
            env[node.name] = low.module(modules[node.target], srcs[0], node.target)
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            if len(srcs) != 2 or len(node.args) != 2 or node.kwargs:
                raise CertificationError(f"{node.name}: only tensor + tensor additions are supported")
            shape = low.nodes[srcs[0]].shape
            if low.nodes[srcs[1]].shape != shape:
                raise CertificationError(f"{node.name}: residual add of different shapes")
            env[node.name] = low.add(AddOp((1.0, 1.0), shape), srcs, shape, node.name)
        elif node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu):
            if node.kwargs.get("inplace") or (len(node.args) > 1 and node.args[1] is True):
                raise CertificationError(_INPLACE.format(name=node.name))
            env[node.name] = low.add(ReluOp(low.nodes[srcs[0]].shape), srcs[:1], low.nodes[srcs[0]].shape,
                                     node.name)
        elif (node.op == "call_function" and node.target is torch.flatten) or (
                node.op == "call_method" and node.target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            if start != 1:
                raise CertificationError(f"{node.name}: only flatten(x, 1) is supported")
            env[node.name] = low.flatten(srcs[0], node.name)
        else:
            raise CertificationError(f"unsupported operation {node.op} '{node.target}' in {node.name}")
    if output is None:
        raise CertificationError("the traced model has no output")
    nodes, output = _prune_unused(*_fold_batchnorms(*_prune_unused(low.nodes, output)))
    graph = Graph(nodes=nodes, output=output, input_shape=tuple(input_shape), dtype=dtype, device=device,
                  standardise=low.standardise)
    if not differentiable:
        _check_equal(graph, model, input_shape)
    return graph


def _fold_batchnorms(nodes: list[GraphOp], output: int) -> tuple[list[GraphOp], int]:
    """Fold each BatchNorm (a channel affine op) into the convolution it reads, when that
    convolution's output has no other reader; the BatchNorm node then passes through."""
    users = [0] * len(nodes)
    for node in nodes:
        for j in node.inputs:
            users[j] += 1
    nodes = list(nodes)
    alias: dict[int, int] = {}
    for i, node in enumerate(nodes):
        inputs = tuple(alias.get(j, j) for j in node.inputs)
        node = GraphOp(node.op, inputs, node.shape, node.name)
        nodes[i] = node
        if isinstance(node.op, ChannelAffineOp):
            src = inputs[0]
            conv = nodes[src]
            if isinstance(conv.op, Conv2dOp) and users[src] == 1 and src != output:
                nodes[src] = GraphOp(_fold_batchnorm_affine(conv.op, node.op), conv.inputs, conv.shape,
                                  f"{conv.name}+{node.name}")
                alias[i] = src
                users[src] = users[i]  # the folded conv now has the BatchNorm's readers
    return nodes, alias.get(output, output)


def _fold_batchnorm_affine(conv: Conv2dOp, bn: ChannelAffineOp) -> Conv2dOp:
    weight = conv.weight * bn.scale.view(-1, 1, 1, 1)
    bias = (conv.bias if conv.bias is not None else torch.zeros_like(bn.scale)) * bn.scale + bn.shift
    return Conv2dOp(weight, bias, conv.stride, conv.padding, conv.in_shape, conv.out_shape)


# An in-place ReLU overwrites its input, which a residual path may read afterwards: torch
# then adds relu(h) where the graph would add h, and at a = 1 the check below sees the
# difference only where h < 0 on its few inputs.
_INPLACE = ("{name}: in-place ReLU (inplace=True) is not supported: it overwrites a value other layers may "
            "read; build the model with inplace=False")


def _check_equal(graph: Graph, model: nn.Module, input_shape: tuple[int, ...], samples: int = 4) -> None:
    """Refuse a lowering that does not compute exactly what the module computes.

    The structure is checked while lowering; this also catches what the structure cannot
    show (a layer subclass with its own forward, a module option the lowering ignored): at
    a = 1, b = 0 and inputs in [0, 1] the graph must equal the module, run in float64."""
    import copy

    reference = copy.deepcopy(model).to(device=graph.device, dtype=torch.float64).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((samples, *input_shape), generator=generator, dtype=torch.float64).to(graph.device)
    x[0] = 0.5  # a flat image too
    one = torch.ones(samples, dtype=torch.float64, device=graph.device)
    got = graph.astype(torch.float64).evaluate(x, one, torch.zeros_like(one))
    want = reference(x)
    if want.shape != got.shape:
        raise CertificationError(f"the lowered graph's output shape {tuple(got.shape)} is not the model's "
                                 f"{tuple(want.shape)}")
    scale = 1.0 + float(want.abs().max())
    gap = float((got - want).abs().max())
    if not gap <= 1e-9 * scale:
        raise CertificationError(f"the lowered graph does not compute what the model computes (largest "
                                 f"difference {gap:.3g} on test inputs): the model uses a layer or option the "
                                 "certification engine cannot represent exactly")


def _prune_unused(nodes: list[GraphOp], output: int) -> tuple[list[GraphOp], int]:
    """Drop nodes the output does not depend on (e.g. a BatchNorm folded away)."""
    needed = set()
    stack = [output]
    while stack:
        i = stack.pop()
        if i not in needed:
            needed.add(i)
            stack.extend(nodes[i].inputs)
    needed.add(0)
    remap = {old: new for new, old in enumerate(sorted(needed))}
    kept = [GraphOp(n.op, tuple(remap[j] for j in n.inputs), n.shape, n.name)
            for i, n in enumerate(nodes) if i in needed]
    return kept, remap[output]
