"""attention.fuse_attention on real TorchScript exports of scaled-dot-product attention: what it fuses (default and
explicit scales, self and cross attention) gives torch's numbers at other shapes than the traced ones, and what
it must not fuse (a mask, a scale it cannot read) is left as it was. ExportOptions decides where it applies."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from pydantic import ValidationError  # noqa: E402

from skillgen.inference.attention import fuse_attention  # noqa: E402
from skillgen.inference.export import ExportOptions  # noqa: E402


class Attention(torch.nn.Module):
    def __init__(self, heads=2, dim=16, scale=None, causal=False, scale_fn=None, out_rank=3):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.heads, self.scale, self.causal, self.scale_fn, self.out_rank = heads, scale, causal, scale_fn, out_rank

    def forward(self, x, context):
        b, _, d = x.shape
        q, k, v = (
            lin(t).view(b, -1, self.heads, d // self.heads).transpose(1, 2)
            for lin, t in ((self.q, x), (self.k, context), (self.v, context))
        )
        scale = self.scale_fn(x) if self.scale_fn else self.scale
        mask = torch.ones(x.shape[1], context.shape[1], dtype=torch.bool).tril() if self.causal else None
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out = out.transpose(1, 2)
        return out.reshape(b, -1, d) if self.out_rank == 3 else out.reshape(b, -1, 2, d // 2)


def _export(module, tmp_path):
    import onnx

    path = tmp_path / "attention.onnx"
    x, context = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x, context), str(path), dynamo=False, opset_version=17, input_names=["x", "context"],
            output_names=["out"], dynamic_axes={"x": {0: "b", 1: "s"}, "context": {0: "b", 1: "l"}},
        )
    return onnx.load(str(path))


def _run(model, x, context):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy(), "context": context.numpy()})[0]


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize(
    "kwargs,scale_attr",
    [({}, None), ({"scale": 0.3}, 0.3), ({"heads": 4}, None), ({"heads": 1, "scale": 2.0}, 2.0)],
)
def test_fused_attention_is_torchs_attention_at_new_shapes(tmp_path, kwargs, scale_attr):
    torch.manual_seed(0)
    module = Attention(**kwargs).eval()
    model = _export(module, tmp_path)
    plain_ops = _ops(model)
    assert fuse_attention(model) == 1
    ops = _ops(model)
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops and len(ops) < len(plain_ops)
    (mha,) = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    attrs = {a.name: (a.f if a.name == "scale" else a.i) for a in mha.attribute}
    assert attrs["num_heads"] == module.heads
    assert attrs.get("scale") == (pytest.approx(scale_attr) if scale_attr else None)
    # The projections are still there, reading the same inputs: fed weights (LoRA) keep working.
    assert ops.count("MatMul") == 3
    for batch, tokens, context_tokens in ((3, 7, 9), (1, 4, 4)):
        x, context = torch.randn(batch, tokens, 16), torch.randn(batch, context_tokens, 16)
        with torch.no_grad():
            want = module(x, context).numpy()
        np.testing.assert_allclose(_run(model, x, context), want, atol=2e-6, rtol=1e-5)


def test_self_attention_fuses_too(tmp_path):
    class SelfAttention(Attention):
        def forward(self, x, context=None):
            return super().forward(x, x)

    module = SelfAttention().eval()
    x = torch.randn(2, 5, 16)
    import onnx

    path = tmp_path / "self.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["out"], dynamic_axes={"x": {0: "b", 1: "s"}})
    model = onnx.load(str(path))
    assert fuse_attention(model) == 1
    import onnxruntime as ort

    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": (x2 := torch.randn(3, 11, 16)).numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x2).numpy(), atol=2e-6, rtol=1e-5)


def _scale_numerator_times(model, factor: float) -> None:
    """Multiply the 1 in the exported default scale sqrt(1 / sqrt(d)) by `factor`: a scale computed from the
    head size that is not the default, which the pass cannot state as one number."""
    from onnx import numpy_helper

    producer = {o: n for n in model.graph.node for o in n.output}
    (div,) = [n for n in model.graph.node if n.op_type == "Div" and producer[n.input[1]].op_type == "Sqrt"]
    const = producer[div.input[0]]
    value = numpy_helper.to_array(const.attribute[0].t)
    assert value.item() == 1.0
    const.attribute[0].t.CopyFrom(numpy_helper.from_array(value * np.float32(factor), const.output[0]))


@pytest.mark.parametrize("case", ["mask", "unreadable-scale", "4d-output"])
def test_what_it_cannot_read_stays_plain_and_right(tmp_path, case):
    module = Attention(causal=case == "mask", out_rank=4 if case == "4d-output" else 3).eval()
    model = _export(module, tmp_path)
    if case == "unreadable-scale":
        _scale_numerator_times(model, 4.0)
    before = [(n.op_type, list(n.input)) for n in model.graph.node]
    want = _run(model, x := torch.randn(2, 5, 16), context := torch.randn(2, 5, 16))
    assert fuse_attention(model) == 0
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == before
    np.testing.assert_array_equal(_run(model, x, context), want)
    if case != "unreadable-scale":
        with torch.no_grad():
            np.testing.assert_allclose(want, module(x, context).numpy(), atol=2e-6, rtol=1e-5)
    else:  # the edit really changed the attention: a pass that ignored the scale would not be caught otherwise
        with torch.no_grad():
            assert not np.allclose(want, module(x, context).numpy(), atol=1e-3)


def test_export_options_fuse_where_measured_and_never_for_tensorrt():
    assert ExportOptions().fused_attention is True
    assert ExportOptions(precision="int8").fused_attention is True
    assert ExportOptions(precision="fp16").fused_attention is False
    assert ExportOptions(target="cuda").fused_attention is False
    assert ExportOptions(target="tensorrt").fused_attention is False
    assert ExportOptions(target="cuda", fused_attention=True).fused_attention is True
    with pytest.raises(ValidationError, match="TensorRT cannot run fused attention"):
        ExportOptions(target="tensorrt", fused_attention=True)
    # The resolved value is part of the cache key, and an old manifest's options still parse.
    assert ExportOptions().model_dump()["fused_attention"] is True
    assert ExportOptions.model_validate({"precision": "fp32", "target": "cpu"}) == ExportOptions()
