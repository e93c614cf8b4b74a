"""Fused attention for exported graphs: scaled-dot-product attention, as the TorchScript exporter spells it out,
becomes one com.microsoft MultiHeadAttention node, and the Q, K and V projections stay where they are.

Why our own pass: ONNX Runtime's transformer optimizer fuses UNet attention only with constant projection
weights (ours are graph inputs, for LoRA), its patterns did not match our torch 2.13 export even with constant
weights (0 of 32 attentions on the bench model), and its LoRA-aware variant emits packed QKV/KV, which the CPU
provider does not implement. MultiHeadAttention with separate Q, K and V does run on the CPU provider, and because
it starts after the projections, weights fed as inputs (and so LoRA switching) work exactly as before.

The pattern, per Softmax (names as torch.onnx.export writes them for F.scaled_dot_product_attention):

    q = Transpose[0,2,1,3](Reshape(Q, [b, -1, heads, d]));  k = Transpose[0,2,3,1](Reshape(K, ...))
    p = Softmax(MatMul(Mul(q, sq), Mul(k, sk)));  o = Reshape(Transpose[0,2,1,3](MatMul(p, v)), ...)

`sq` and `sk` are constants (an explicit scale) or computed from the head size; they are read symbolically, and
an attention whose scale is neither the default 1/sqrt(d) nor a constant is left as it is, as is any attention
with a mask (an Add before the Softmax: CLIP's causal mask) or a shape the pattern does not name.
"""

from __future__ import annotations

import math

MHA_DOMAIN = "com.microsoft"


class _Graph:
    def __init__(self, graph):
        from onnx import numpy_helper

        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.rank = {
            v.name: len(v.type.tensor_type.shape.dim)
            for v in (*graph.value_info, *graph.input, *graph.output)
            if v.type.tensor_type.HasField("shape")
        }
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def parent(self, name: str, op: str):
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op else None

    def only_child(self, name: str, op: str):
        c = self.consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op else None

    def scalar(self, name: str) -> float | None:
        v = self.constants.get(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _perm(node) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _symbolic(g: _Graph, name: str, head_tensors: set[str], depth: int = 0) -> tuple[float, float] | None:
    """`name` as (c, p) with value c * d**p, d the head size, or None when it is anything else."""
    const = g.scalar(name)
    if const is not None:
        return const, 0.0
    n = g.producer.get(name)
    if n is None or depth > 12:
        return None
    if n.op_type == "Cast":
        return _symbolic(g, n.input[0], head_tensors, depth + 1)
    if n.op_type == "Sqrt":
        x = _symbolic(g, n.input[0], head_tensors, depth + 1)
        return None if x is None or x[0] < 0 else (math.sqrt(x[0]), x[1] / 2)
    if n.op_type in ("Div", "Mul"):
        a = _symbolic(g, n.input[0], head_tensors, depth + 1)
        b = _symbolic(g, n.input[1], head_tensors, depth + 1)
        if a is None or b is None or (n.op_type == "Div" and b[0] == 0):
            return None
        return (a[0] / b[0], a[1] - b[1]) if n.op_type == "Div" else (a[0] * b[0], a[1] + b[1])
    if n.op_type == "Slice":  # Shape(t)[-1:], t with the head size last
        shape = g.parent(n.input[0], "Shape")
        starts = g.scalar(n.input[1]) if len(n.input) > 1 else None
        ends = g.scalar(n.input[2]) if len(n.input) > 2 else None
        axes = g.scalar(n.input[3]) if len(n.input) > 3 and n.input[3] else 0.0
        steps = g.scalar(n.input[4]) if len(n.input) > 4 and n.input[4] else 1.0
        extra_ok = axes in (0.0, -1.0) and steps == 1.0
        if shape is not None and shape.input[0] in head_tensors and starts == -1 and ends and ends > 1e9:
            return (1.0, 1.0) if extra_ok and not shape.attribute else None
    return None


def _match(g: _Graph, softmax):
    """(q, k, v, output, heads, scale or None for the default) for one attention, or None."""
    mm1 = g.parent(softmax.input[0], "MatMul")
    if mm1 is None or any(a.name == "axis" and a.i not in (-1, 3) for a in softmax.attribute):
        return None
    qmul, kmul = g.parent(mm1.input[0], "Mul"), g.parent(mm1.input[1], "Mul")
    if qmul is None or kmul is None:
        return None
    qt, kt = g.parent(qmul.input[0], "Transpose"), g.parent(kmul.input[0], "Transpose")
    if qt is None or kt is None or _perm(qt) != [0, 2, 1, 3] or _perm(kt) != [0, 2, 3, 1]:
        return None
    qr, kr = g.parent(qt.input[0], "Reshape"), g.parent(kt.input[0], "Reshape")
    mm2 = g.only_child(softmax.output[0], "MatMul")
    if qr is None or kr is None or mm2 is None or mm2.input[0] != softmax.output[0]:
        return None
    vt = g.parent(mm2.input[1], "Transpose")
    vr = g.parent(vt.input[0], "Reshape") if vt is not None else None
    ot = g.only_child(mm2.output[0], "Transpose")
    out = g.only_child(ot.output[0], "Reshape") if ot is not None else None
    if vr is None or out is None or _perm(vt) != [0, 2, 1, 3] or _perm(ot) != [0, 2, 1, 3]:
        return None
    # MultiHeadAttention reads and writes (batch, tokens, hidden): each split is [batch, -1, heads, d] of a tensor
    # of rank 3 (where the exporter recorded ranks), and the merge gives rank 3 back.
    heads = set()
    for r in (qr, kr, vr):
        shape = g.parent(r.input[1], "Concat")
        ok = shape is not None and len(shape.input) == 4 and g.scalar(shape.input[1]) == -1
        heads.add(g.scalar(shape.input[2]) if ok and g.rank.get(r.input[0], 3) == 3 else None)
    merged = g.parent(out.input[1], "Concat")
    merged_shape = g.constants.get(out.input[1])
    merged_rank = len(merged.input) if merged is not None else merged_shape.size if merged_shape is not None else 0
    if len(heads) != 1 or None in heads or min(heads) < 1 or merged_rank != 3:
        return None
    head_tensors = {qr.output[0], qt.output[0], kr.output[0], vr.output[0], vt.output[0]}
    sq, sk = _symbolic(g, qmul.input[1], head_tensors), _symbolic(g, kmul.input[1], head_tensors)
    if sq is None or sk is None:
        return None
    coef, power = sq[0] * sk[0], sq[1] + sk[1]
    if power == -0.5 and math.isclose(coef, 1.0, rel_tol=1e-6):
        scale = None
    elif power == 0 and coef > 0:
        scale = coef
    else:
        return None
    return qr.input[0], kr.input[0], vr.input[0], out, int(heads.pop()), scale


def fuse_attention(model) -> int:
    """Rewrite every recognised attention in `model` (an onnx ModelProto, changed in place) into one
    MultiHeadAttention node; nodes and constants nothing reads any more are removed. Returns how many."""
    from onnx import helper

    graph = model.graph
    g = _Graph(graph)
    replace = {}
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        found = _match(g, node)
        if found is None:
            continue
        q, k, v, out, heads, scale = found
        attrs = {"num_heads": heads} if scale is None else {"num_heads": heads, "scale": float(scale)}
        replace[id(out)] = helper.make_node(
            "MultiHeadAttention", [q, k, v], [out.output[0]], name=f"{out.name}/MultiHeadAttention",
            domain=MHA_DOMAIN, **attrs,
        )
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in graph.node]
    _keep_live(graph, nodes)
    if not any(o.domain == MHA_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MHA_DOMAIN, 1))
    return len(replace)


def _keep_live(graph, nodes) -> None:
    """Set graph.node to those of `nodes` some graph output depends on, in order, and drop unread initializers."""
    producer = {o: n for n in nodes for o in n.output}
    live: set[int] = set()
    seen: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        n = producer.get(name)
        if n is not None and id(n) not in live:
            live.add(id(n))
            stack.extend(i for i in n.input if i)
            if any(a.type in (5, 10) for a in n.attribute):  # GRAPH, GRAPHS: not in the graphs we export
                raise ValueError(f"{n.name}: node with a subgraph; attention fusion does not handle those")
    kept = [n for n in nodes if id(n) in live]
    del graph.node[:]
    graph.node.extend(kept)
    read = [i for i in graph.initializer if i.name in seen]
    del graph.initializer[:]
    graph.initializer.extend(read)
