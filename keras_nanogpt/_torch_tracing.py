"""PyTorch backend only: one function of tensors traced once into an ATen graph, made lean, run as a graph.

Keras's layers cost Python at every call on PyTorch (input checks, name and autocast scopes, the
`torch.nn.Module` call), tens of microseconds each, 40 and more times in one forward pass of a 4-layer
GPT. Traced by `make_fx`, the same computation is a flat list of ATen operations over the tensors
passed in (the model's variables among them: one model definition, its Keras code run once while
tracing). `lean` then removes what the trace copied from Keras's Python rather than from the arithmetic:
operations on constants alone (index ranges, scalars turned into tensors) are computed once and kept,
views and expansions to the shape a tensor already has are dropped, and unused results are removed.

Decoding (`_torch_compile`) and training (`_torch_training`) both run their step through `trace`;
TorchInductor can compile the same graph further (`inductor`).

Example:
    >>> graph = trace(lambda a, b: (a @ b).relu(), [torch.ones(2, 3), torch.ones(3, 4)])  # doctest: +SKIP
    >>> graph(torch.ones(2, 3), torch.ones(3, 4)).shape  # doctest: +SKIP
    torch.Size([2, 4])
"""

import operator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental import proxy_tensor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.overrides import TorchFunctionMode

_aten = torch.ops.aten
# Operations that return a tensor of the input's shape as a view, or the input itself, when the
# requested shape is the input's own.
_SHAPE_OPS = {_aten.view.default, _aten._unsafe_view.default, _aten.expand.default, _aten.reshape.default}
_FOLDABLE_BLOCKLIST = {_aten.empty.memory_format, _aten.empty_strided.default}
# Functions with a number argument that scales their second operand: `alpha` (x + alpha * other) and
# `value` (x + value * tensor1 * tensor2, x + value * tensor1 / tensor2).
_SCALING_KEYWORDS = {
    **dict.fromkeys(("add", "add_", "sub", "sub_", "_foreach_add", "_foreach_add_", "_foreach_sub",
                     "_foreach_sub_"), "alpha"),
    **dict.fromkeys(("addcmul", "addcmul_", "addcdiv", "addcdiv_", "_foreach_addcmul", "_foreach_addcmul_",
                     "_foreach_addcdiv", "_foreach_addcdiv_"), "value")}


def trace(function, example_inputs):
    """`function` traced into a lean ATen graph (a `torch.fx.GraphModule` taking the same tensors).

    Tracing runs `function` once for real on `example_inputs`, so pass copies of tensors it mutates.

    Args:
        function: a function of tensors returning tensors (or tuples of them).
        example_inputs: tensors of the shapes and dtypes of later calls.

    Example:
        >>> trace(torch.sin, [torch.zeros(3)])(torch.zeros(3))  # doctest: +SKIP
        tensor([0., 0., 0.])
    """
    with _TensorScalars():
        graph_module = make_fx(function)(*example_inputs)
    return lean(graph_module)


class _TensorScalars(TorchFunctionMode):
    """While tracing: a tensor passed where PyTorch takes a number (`alpha=`, `value=`) scales the operand
    it multiplies instead. Eagerly PyTorch reads such a tensor into Python (`Tensor.item()`), which a
    trace cannot record: Keras's SGD and Adadelta on PyTorch pass their learning rate, a variable, as
    `torch._foreach_add_(variables, grads, alpha=-learning_rate)`.

    And a tensor computed from the inputs read into numpy or Python lists (which tracing on real tensors
    allows, silently keeping the value of the tracing call in the graph) fails the trace instead.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VALUE_READS and args and isinstance(args[0], torch.Tensor) and _depends_on_inputs(args[0]):
            raise RuntimeError(f"{getattr(func, '__name__', func)}() reads a traced tensor's value into Python: "
                               "the graph would keep the value it had while tracing")
        keyword = _SCALING_KEYWORDS.get(getattr(func, "__name__", None))
        scale = kwargs.get(keyword)
        if isinstance(scale, torch.Tensor) and len(args) > 1:
            operand = args[1]
            if isinstance(operand, (list, tuple)):
                operand = torch._foreach_mul(list(operand), scale)
            else:
                operand = operand * scale
            args = (args[0], operand, *args[2:])
            kwargs = {k: v for k, v in kwargs.items() if k != keyword}
        return func(*args, **kwargs)


def written_in_place(tensors, function):
    """While `trace` traces: `function()`'s result, and the positions in `tensors` of those it wrote in
    place (itself or through a view), read from the operations it added to the graph.

    Example:
        >>> written_in_place([a, b], lambda: a.add_(1))  # doctest: +SKIP
        (tensor(...), {0})
    """
    tracer = proxy_tensor.get_proxy_mode().tracer
    before = set(tracer.graph.nodes)
    result = function()
    written = set()
    for node in tracer.graph.nodes:
        if node in before:
            continue
        for target in _written(node):
            while target not in written:  # the written tensor, then the tensors it views
                written.add(target)
                if not (target.op == "call_function" and _is_view(target) and target.args
                        and isinstance(target.args[0], torch.fx.Node)):
                    break
                target = target.args[0]
    return result, {i for i, t in enumerate(tensors)
                    if proxy_tensor.has_proxy_slot(t, tracer)
                    and proxy_tensor.get_proxy_slot(t, tracer).proxy.node in written}


def lean(graph_module):
    """Make a traced graph run fewer operations for the same results; returns `graph_module`, changed.

    In order: fold operations on constants into constants (one buffer per distinct value); forward
    inputs through shape operations that change nothing (a view to the shape a tensor has, element i of
    a stacked index tuple); merge repeated computations of the same value; write in place a copy of an
    input that the graph only updates and copies back; merge chains of views; remove unused results.
    Nothing that reads or writes a tensor some operation mutates is folded, merged or reordered.
    """
    graph = graph_module.graph
    touched = _touched_by_mutation(graph)
    constants = {}  # node -> value, for nodes that depend on no input
    buffers = []  # (value, get_attr node): one per distinct constant
    seen = {}  # (target, arguments) -> node, for merging repeated computations
    for node in list(graph.nodes):
        if node.op == "get_attr":
            value = getattr(graph_module, node.target)
            if isinstance(value, torch.Tensor) and node not in touched:
                constants[node] = value
            continue
        if node.op != "call_function":
            continue
        source = _forwarded_input(node)
        if source is not None:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            continue
        if not _is_pure(node) or any(n in touched for n in node.all_input_nodes) or node in touched:
            continue
        if all(n in constants for n in node.all_input_nodes):
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: constants[n])
            value = node.target(*args, **kwargs)
            if isinstance(value, torch.Tensor):
                replacement = _constant_node(graph_module, node, value, buffers)
                node.replace_all_uses_with(replacement)
                graph.erase_node(node)
                constants[replacement] = value
                continue
        key = (node.target, _hashable(node.args), _hashable(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node
    _update_copies_in_place(graph)
    _merge_view_chains(graph)
    graph.eliminate_dead_code()
    graph.lint()
    graph_module.recompile()
    return graph_module


def _constant_node(graph_module, node, value, buffers):
    """A `get_attr` node for `value`, shared with an earlier constant of the same value."""
    for other, other_node in buffers:
        if (other.dtype == value.dtype and other.shape == value.shape and other.device == value.device
                and torch.equal(other, value)):
            return other_node
    name = f"_folded_{len(buffers)}"
    graph_module.register_buffer(name, value, persistent=False)
    with graph_module.graph.inserting_before(node):
        replacement = graph_module.graph.get_attr(name)
    replacement.meta["val"] = value
    buffers.append((value, replacement))
    return replacement


def _update_copies_in_place(graph):
    """`x2 = clone(x); <in-place updates of x2>; copy_(x, x2)` where `x` is an input read nowhere else:
    update `x` itself (no copy of it made, none copied back)."""
    for node in list(graph.nodes):
        if node.target is not _aten.copy_.default or node.users:
            continue
        target, source = node.args[0], node.args[1]
        while isinstance(source, torch.fx.Node) and _is_mutation(source) and source.target is not _aten.copy_.default:
            source = source.args[0]  # an in-place operation returns its first argument
        if (isinstance(source, torch.fx.Node) and source.target is _aten.clone.default
                and source.args[0] is target and target.op == "placeholder"
                and set(target.users) == {source, node}):
            source.replace_all_uses_with(target)
            graph.erase_node(node)
            graph.erase_node(source)


def _merge_view_chains(graph):
    """`view(view(x, a), b)` as `view(x, b)` where that gives the same strides."""
    for node in list(graph.nodes):
        if node.target not in (_aten.view.default, _aten._unsafe_view.default):
            continue
        inner = node.args[0]
        if not (isinstance(inner, torch.fx.Node) and inner.target in (_aten.view.default, _aten._unsafe_view.default)):
            continue
        base, result = inner.args[0].meta.get("val"), node.meta.get("val")
        if not (isinstance(base, torch.Tensor) and isinstance(result, torch.Tensor)):
            continue
        try:
            merged = base.view(node.args[1])
        except RuntimeError:
            continue
        if merged.stride() == result.stride():
            node.args = (inner.args[0], node.args[1])


def _written(node):
    """The nodes whose tensors `node` writes in place (the arguments its schema marks as written)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return []
    written = []
    for i, argument in enumerate(target._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        written.extend(v for v in values if isinstance(v, torch.fx.Node))
    return written


def _touched_by_mutation(graph):
    """Nodes whose tensors some in-place operation writes: the written ones, and their views either way."""
    touched = {written for node in graph.nodes for written in _written(node)}
    views = [node for node in graph.nodes if node.op == "call_function" and _is_view(node)]
    changed = True
    while changed:
        changed = False
        for node in views:
            base = node.args[0]
            if (node in touched) != (base in touched):
                touched.update((node, base))
                changed = True
    return touched


def _is_pure(node):
    """An operation whose result depends on its inputs alone: no writes, no random draws."""
    target = node.target
    return (isinstance(target, torch._ops.OpOverload) and not _is_mutation(node)
            and not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
            and target not in _FOLDABLE_BLOCKLIST)


def _is_view(node):
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return target is operator.getitem
    return target._schema.returns and any(
        r.alias_info is not None and not r.alias_info.is_write for r in target._schema.returns)


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        return id(value)
    return value


def inductor(graph_module, example_inputs):
    """`graph_module` compiled by TorchInductor for the static shapes of `example_inputs` (CUDA graphs on a
    GPU), called once on them so that compiling happens now.

    On CPU, TorchInductor runs without Dynamo (nothing is left to trace, no guards to check at each
    call), given fake inputs with a shape environment as Dynamo gives it (its on-disk caches need one),
    and its C++ kernels on one thread: a token's attention and norms are microseconds of work, and
    OpenMP's barriers inside a kernel cost more on a busy machine; matrix multiplies stay ATen's.
    """
    if example_inputs[0].device.type == "cuda":
        compiled = torch.compile(graph_module, mode="reduce-overhead", fullgraph=True, dynamic=False)
    else:
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        compiled = torch._inductor.compile(
            graph_module, [fake_mode.from_tensor(t, static_shapes=True) for t in example_inputs],
            options={"cpp.threads": 1})
    compiled(*example_inputs)
    return compiled


def count_operations(graph_module):
    """How many ATen operations a traced graph runs per call."""
    return sum(node.op == "call_function" for node in graph_module.graph.nodes)


def _is_mutation(node):
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def _forwarded_input(node):
    """The input node that `node` only passes on, or None: a view, reshape or expansion to the shape its
    input already has, or element i of a `stack` of tensors picked by `select(..., 0, i)` (how Keras
    builds an index tuple such as `[0, 0, cache_index]`)."""
    if node.target in _SHAPE_OPS and node.args and isinstance(node.args[0], torch.fx.Node):
        source, result = node.args[0].meta.get("val"), node.meta.get("val")
        if (isinstance(source, torch.Tensor) and isinstance(result, torch.Tensor)
                and tuple(source.shape) == tuple(result.shape) and source.stride() == result.stride()):
            return node.args[0]
    if (node.target in (_aten.div.Tensor, _aten.mul.Tensor) and len(node.args) == 2
            and type(node.args[1]) is float and node.args[1] == 1.0 and isinstance(node.args[0], torch.fx.Node)):
        source, result = node.args[0].meta.get("val"), node.meta.get("val")
        if (isinstance(source, torch.Tensor) and isinstance(result, torch.Tensor)
                and source.dtype == result.dtype and source.shape == result.shape):
            return node.args[0]  # x / 1.0 and x * 1.0 are x exactly
    if node.target is _aten.select.int and node.args[1] == 0:
        stacked = node.args[0]
        if (isinstance(stacked, torch.fx.Node) and stacked.target is _aten.stack.default
                and stacked.kwargs.get("dim", stacked.args[1] if len(stacked.args) > 1 else 0) == 0):
            item = stacked.args[0][node.args[2]]
            value, result = item.meta.get("val"), node.meta.get("val")
            if (isinstance(value, torch.Tensor) and isinstance(result, torch.Tensor)
                    and value.shape == result.shape and value.dtype == result.dtype):
                return item
    return None


_VALUE_READS = {torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.tolist}


def _depends_on_inputs(tensor):
    """Whether `tensor`, while `trace` traces, is computed from the traced function's inputs."""
    mode = proxy_tensor.get_proxy_mode()
    if mode is None or not proxy_tensor.has_proxy_slot(tensor, mode.tracer):
        return False
    stack, seen = [proxy_tensor.get_proxy_slot(tensor, mode.tracer).proxy.node], set()
    while stack:
        node = stack.pop()
        if node.op == "placeholder":
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return False
