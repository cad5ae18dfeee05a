"""Per-linear formats (``--override PATTERN=FORMAT``): parsing, glob matching over the short and Hugging Face names,
precedence, one-line errors before any work; a mixed-format tiny model's logits equal a per-linear torch emulation
built from ``mxonnx.formats``; GPTQ's Hessians and AWQ's search per linear; ``inspect`` lists every linear; the
lowering keeps mixed formats; the resume fingerprint sees the overrides."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import visible_lines

from mxonnx import formats
from mxonnx.allocate import stored_bits
from mxonnx.blockwise import BlockwiseRunner
from mxonnx.calibrate import block_hessians, config_windows
from mxonnx.cli import main
from mxonnx.config import LM_HEAD_DEFAULT, QuantizeConfig
from mxonnx.errors import InputError
from mxonnx.eval import OrtCausalLM
from mxonnx.inspect import format_inspection, inspect_model
from mxonnx.layer_formats import linear_aliases, matches, parse_override, resolve_formats
from mxonnx.modelio import resolve_model
from mxonnx.passes.llama_structure import find_decoder_blocks
from mxonnx.quantize import quantize_model, run_fingerprint

IDS = np.random.default_rng(1).integers(3, 96, (2, 40))
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NAMES = [f"layers.{i}.{r}" for i in range(12) for r in ROLES] + ["lm_head"]

# q of layer 0 reads the shared norm output in another activation format than k and v; layer 1 stays float but
# for k_proj's weight; down_proj everywhere 8-bit
MIXED = ("layers.*.mlp.down_proj=mxint8-32/mxint8-64", "layers.0.self_attn.q_proj=mxfp4-16/mxfp8e4m3-32",
         "layers.1.*=none", "layers.1.k_proj=mxint4-128")
MIXED_FORMATS = {
    **{f"layers.0.{r}": ("mxint4-32", "mxint8-32") for r in ROLES},
    "layers.0.q_proj": ("mxfp4-16", "mxfp8e4m3-32"), "layers.0.down_proj": ("mxint8-32", "mxint8-64"),
    **{f"layers.1.{r}": ("none", "none") for r in ROLES}, "layers.1.k_proj": ("mxint4-128", "none"),
    "lm_head": (LM_HEAD_DEFAULT, LM_HEAD_DEFAULT),  # the default for an MX decoder
}


def test_parse_override_spellings():
    o = parse_override("layers.*.mlp.down_proj=mxint8-32")
    assert (o.pattern, o.weights.name, o.acts) == ("layers.*.mlp.down_proj", "mxint8-32", None)
    o = parse_override(" lm_head = MXINT8-32/mxfp8e4m3-32 ")
    assert (o.pattern, o.weights.name, o.acts.name) == ("lm_head", "mxint8-32", "mxfp8e4m3-32")
    o = parse_override("layers.0.*=none")  # the linear stays float: weights and activations
    assert (o.weights.kind, o.acts.kind) == ("none", "none")
    o = parse_override("layers.0.*=none/mxint8-32")
    assert (o.weights.kind, o.acts.name) == ("none", "mxint8-32")


@pytest.mark.parametrize("text", ["layers.0.q_proj", "=mxint4-32", "layers.0.q_proj=", "x=mxint9-32",
                                  "x=mxint4-32/bogus", "x=mxint4-33"])
def test_parse_override_errors(text):
    with pytest.raises(InputError, match="--override"):
        parse_override(text)


def test_names_match_short_and_hugging_face_spellings():
    assert linear_aliases("layers.3.down_proj") == ("layers.3.down_proj", "layers.3.mlp.down_proj",
                                                    "model.layers.3.mlp.down_proj")
    assert linear_aliases("layers.3.q_proj")[1] == "layers.3.self_attn.q_proj"
    assert linear_aliases("lm_head") == ("lm_head",)
    hit = lambda pattern: [n for n in NAMES if matches(pattern, n)]  # noqa: E731
    assert hit("layers.*.mlp.down_proj") == hit("layers.*.down_proj") == [f"layers.{i}.down_proj" for i in range(12)]
    assert hit("layers.*.self_attn.q_proj") == [f"layers.{i}.q_proj" for i in range(12)]
    assert hit("layers.1.*") == [f"layers.1.{r}" for r in ROLES]  # not layers.10 / layers.11
    assert hit("layers.1?.o_proj") == ["layers.10.o_proj", "layers.11.o_proj"]
    assert hit("layers.[0-1].mlp.*") == [f"layers.{i}.{r}" for i in (0, 1) for r in ROLES[4:]]
    assert hit("model.layers.2.self_attn.*") == [f"layers.2.{r}" for r in ROLES[:4]]
    assert hit("lm_head") == ["lm_head"] and hit("*") == NAMES


def test_later_overrides_win_and_weights_only_keep_the_acts():
    got = resolve_formats(NAMES, "mxint4-128", "mxint8-128", [
        "layers.*=mxint4-32/mxint8-32", "layers.0.*=mxint8-32", "*.down_proj=none", "layers.0.down_proj=mxfp4-32"])
    pair = lambda name: (got[name].weights.name, got[name].acts.name)  # noqa: E731
    assert pair("layers.5.q_proj") == ("mxint4-32", "mxint8-32")
    assert pair("layers.0.q_proj") == ("mxint8-32", "mxint8-32")  # the weights changed, the acts stayed
    assert pair("layers.5.down_proj") == ("none", "none")
    assert pair("layers.0.down_proj") == ("mxfp4-32", "none")  # after 'none': weights again, acts still none
    assert pair("lm_head") == ("mxint4-128", "mxint8-128")  # "layers.*" does not reach lm_head
    with pytest.raises(InputError, match="matches no linear"):
        resolve_formats(NAMES, "mxint4-128", "mxint8-128", ["layers.*=mxint4-32", "layers.12.*=mxint8-32"])


def emulated_logits(hf_folder, ids: np.ndarray, linear_formats: dict) -> np.ndarray:
    """The torch model with each decoder linear's weight (and lm_head's, untied from the embedding) replaced by
    quantize_dequantize(W) in its own format and its input by quantize_dequantize(x) in its own activation format
    (``mxonnx.formats`` only); lm_head stays float when ``linear_formats`` has no entry for it."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_folder).eval()
    linears = {"lm_head": model.lm_head}
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        linears.update({f"layers.{i}.{role}": linear for role, linear in zip(ROLES, (
            attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj))})
    for name, (weights, acts) in linear_formats.items():
        linear = linears[name]
        w = linear.weight.detach().numpy()  # [N, K]: the reduction axis is 1
        linear.weight = torch.nn.Parameter(torch.from_numpy(formats.quantize_dequantize(w, weights, axis=1)))
        linear.register_forward_pre_hook(
            lambda module, args, acts=acts: (torch.from_numpy(formats.quantize_dequantize(args[0].numpy(), acts)),))
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


@pytest.fixture(scope="module")
def mixed_folder(tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "q"
    quantize_model(tiny_onnx, out, QuantizeConfig(weights="mxint4-32", acts="mxint8-32", method="rtn",
                                                  overrides=MIXED, progress=False))
    return out


def test_mixed_formats_logits_equal_the_per_linear_emulation(mixed_folder, tiny_hf):
    logits = OrtCausalLM(mixed_folder / "model.onnx").logits(IDS)
    np.testing.assert_allclose(logits, emulated_logits(tiny_hf, IDS, MIXED_FORMATS), rtol=0, atol=1e-5)
    uniform = dict.fromkeys(MIXED_FORMATS, ("mxint4-32", "mxint8-32"))
    assert np.abs(logits - emulated_logits(tiny_hf, IDS, uniform)).max() > 1e-3  # the overrides changed something


def test_inspect_lists_every_linear(mixed_folder, capsys):
    d = inspect_model(mixed_folder)
    listed = {l["name"]: l for l in d["linears"]}
    assert set(listed) == set(MIXED_FORMATS)
    for name, (weights, acts) in MIXED_FORMATS.items():
        assert (listed[name]["weights"], listed[name]["acts"]) == (weights, acts), name
    model = ir.load(mixed_folder / "model.onnx")
    quantized = [l for l in d["linears"] if l["weights"] != "none"]
    assert d["quantized_matmuls"] == len(quantized) == 9  # 8 decoder linears and lm_head
    for linear in quantized:  # each one's bits are what its format stores for its shape
        k, n = model.graph.initializers[f"{linear['name']}.weight_codes"].const_value.shape
        assert linear["weights_count"] == k * n
        assert linear["bits_per_weight"] * k * n == stored_bits(linear["weights"], k, n)
    decoder = [l for l in quantized if l["name"] != "lm_head"]  # lm_head is listed but left out of the average
    average = sum(l["bits_per_weight"] * l["weights_count"] for l in decoder) / sum(l["weights_count"] for l in decoder)
    assert d["bits_per_weight"] == pytest.approx(average, rel=1e-12)
    table = format_inspection(d)
    assert "layer 0  mxfp4-16/mxfp8e4m3-32" in table
    assert "layer 1  none/none" in table and "mxint4-128/none" in table
    assert main(["inspect", str(mixed_folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["linears"] == json.loads(json.dumps(d["linears"]))


def test_lowering_keeps_mixed_formats(tiny_onnx, tmp_path):
    src = tmp_path / "q"
    quantize_model(tiny_onnx, src, QuantizeConfig(weights="mxint4-16", acts="mxint8-32", method="rtn", progress=False,
                                                  overrides=("*.down_proj=mxint8-32", "layers.0.o_proj=mxint4-128/none")))
    reference = OrtCausalLM(src / "model.onnx").logits(IDS)
    for target in ("matmulnbits", "qdq", "inline"):
        assert main(["lower", str(src), "-o", str(tmp_path / target), "--target", target, "--json"]) == 0
        np.testing.assert_allclose(OrtCausalLM(tmp_path / target / "model.onnx").logits(IDS), reference,
                                   rtol=0, atol=1e-4, err_msg=target)


def test_lowering_refuses_what_matmulnbits_cannot_hold(mixed_folder, tmp_path, capsys):
    assert main(["lower", str(mixed_folder), "-o", str(tmp_path / "nbits"), "--target", "matmulnbits"]) == 2
    err = capsys.readouterr().err
    assert "mxfp4-16" in err and len(visible_lines(err)) == 1 and not (tmp_path / "nbits").exists()


def test_gptq_hessians_per_linear_when_a_group_mixes_activation_formats(tiny_onnx, tiny_text):
    model = ir.load(tiny_onnx / "model.onnx")
    blocks = find_decoder_blocks(model)
    windows = config_windows(tiny_onnx, QuantizeConfig(calib_path=tiny_text, calib_samples=4, calib_seqlen=32))
    a, b = formats.parse_format("mxint8-16"), formats.parse_format("mxfp8e4m3-32")
    uniform = {fmt.name: block_hessians(BlockwiseRunner(model, blocks, windows), blocks[0], fmt) for fmt in (a, b)}
    per_linear = {linear.name: b for linear in blocks[0].linears()}
    per_linear["layers.0.q_proj"] = a
    mixed = block_hessians(BlockwiseRunner(model, blocks, windows), blocks[0], per_linear)
    assert set(mixed) == {"layers.0.q_proj", "layers.0.k_proj", "layers.0.v_proj", "layers.0.o", "layers.0.gate_up",
                          "layers.0.down"}
    np.testing.assert_array_equal(mixed["layers.0.q_proj"], uniform[a.name]["layers.0.qkv"])
    np.testing.assert_array_equal(mixed["layers.0.k_proj"], uniform[b.name]["layers.0.qkv"])
    np.testing.assert_array_equal(mixed["layers.0.down"], uniform[b.name]["layers.0.down"])
    assert not np.array_equal(uniform[a.name]["layers.0.qkv"], uniform[b.name]["layers.0.qkv"])


@pytest.mark.parametrize("method", ["awq+gptq", "sq+gptq"])
def test_every_method_takes_mixed_formats(method, tiny_onnx, tiny_text, tmp_path):
    out = tmp_path / "q"
    overrides = ("layers.0.q_proj=mxint8-16/mxint8-16", "layers.*.mlp.*=mxint4-16", "layers.1.down_proj=none",
                 "layers.1.o_proj=mxint8-16")
    quantize_model(tiny_onnx, out, QuantizeConfig(weights="mxint4-32", acts="mxint8-32", method=method,
                                                  calib_path=tiny_text, calib_samples=8, calib_seqlen=32,
                                                  overrides=overrides, progress=False))
    listed = {l["name"]: (l["weights"], l["acts"]) for l in inspect_model(out)["linears"]}
    assert listed["layers.0.q_proj"] == ("mxint8-16", "mxint8-16")
    assert listed["layers.0.k_proj"] == listed["layers.1.v_proj"] == ("mxint4-32", "mxint8-32")
    assert listed["layers.0.gate_proj"] == ("mxint4-16", "mxint8-32")
    assert listed["layers.1.o_proj"] == ("mxint8-16", "mxint8-32")  # weights only: the acts stayed
    assert listed["layers.1.down_proj"] == ("none", "none")
    logits = OrtCausalLM(out / "model.onnx").logits(IDS)
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("flags, message", [
    (["--override", "layers.*.mlp.nothing=mxint8-32"], "matches no linear"),
    (["--override", "layers.0.q_proj=mxint9-32"], "9 bits is outside"),
    (["--override", "layers.0.q_proj"], "expected PATTERN=FORMAT"),
    (["--lm-head", "none", "--override", "lm_head=mxint8-32"], "lm_head stays float in this run"),
    (["--weights", "int8", "--acts", "none", "--override", "lm_head=mxint8-32"], "lm_head stays float in this run"),
    (["--override", "*=none"], "nothing to quantize"),
    (["--override", "layers.0.q_proj=mxint4-32/int4"], "not supported"),
    (["--override", "lm_head=mxint8-32/int8", "--quantize-lm-head"], "lm_head with int8"),
    (["--method", "gptq", "--override", "*=none/mxint8-32"], "every linear's weights are 'none'"),
])
def test_bad_overrides_are_one_line_exit_2_before_any_work(flags, message, tiny_onnx, tiny_text, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_onnx), "-o", str(out), "--method", "rtn", "--calib", str(tiny_text), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(visible_lines(err)) == 1, err
    assert list(tmp_path.iterdir()) == []  # no output, no work folder


def test_resume_fingerprint_sees_the_overrides(tiny_onnx):
    paths = resolve_model(tiny_onnx)
    base = QuantizeConfig(method="rtn", overrides=("layers.0.*=mxint8-32",))
    same = QuantizeConfig(method="rtn", overrides=("layers.0.*=mxint8-32",))
    assert run_fingerprint(paths, base) == run_fingerprint(paths, same)
    for other in (QuantizeConfig(method="rtn"), QuantizeConfig(method="rtn", overrides=("layers.0.*=mxint8-16",)),
                  QuantizeConfig(method="rtn", overrides=("layers.0.*=mxint8-32", "layers.1.*=none")),
                  QuantizeConfig(method="rtn", overrides=("layers.0.*=mxint8-32",), target_bits=4.5),
                  QuantizeConfig(method="rtn", overrides=("layers.0.*=mxint8-32",), target_bits=4.5,
                                 candidates=("mxint4-32", "mxint8-32"))):
        assert run_fingerprint(paths, other) != run_fingerprint(paths, base), other
