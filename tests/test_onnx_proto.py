"""pipeline.onnx_proto: the top-level ModelProto fields pipe reads and writes without the onnx
package, checked against the onnx package's own parser and checker."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from pipeline import onnx_proto

# unicode of 1 to 4 UTF-8 bytes, empty strings, and lengths whose varints take 2 and 3 bytes
TRICKY = {"classes": '["chat", "Hund", "猫", "🐟"]', "": "empty key", "empty value": "",
          "long": "x" * 200, "longer": "é" * 9000, "ключ": "значение\n\t\"quoted\""}


def model_bytes(opsets=(("", 17),), producer="torch", props=None) -> bytes:
    """A small valid model (one Relu, one weight) as the exporter might write it."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.5, -2.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["s"]), helper.make_node("Relu", ["s"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                              producer_name=producer, producer_version="2.14")
    helper.set_model_props(model, props or {})
    return model.SerializeToString()


def test_new_metadata_and_producer_replace_the_old_and_onnx_reads_them_exactly():
    original = model_bytes(props={"old": "gone", "classes": "stale"})
    written = onnx_proto.with_metadata(original, "pipe", "0.1.0", TRICKY)
    model = onnx.load_model_from_string(written)
    onnx.checker.check_model(model, full_check=True)
    assert (model.producer_name, model.producer_version) == ("pipe", "0.1.0")
    assert [(p.key, p.value) for p in model.metadata_props] == list(TRICKY.items())
    assert onnx_proto.metadata(written) == TRICKY
    before = onnx.load_model_from_string(original)
    assert model.graph == before.graph and model.opset_import == before.opset_import
    assert model.ir_version == before.ir_version
    # writing again replaces rather than adds
    again = onnx_proto.with_metadata(written, "pipe", "0.2.0", {"only": "this"})
    assert onnx_proto.metadata(again) == {"only": "this"}
    assert onnx.load_model_from_string(again).producer_version == "0.2.0"


def test_opsets_agree_with_onnx():
    written = model_bytes(opsets=(("", 300), ("com.microsoft", 1), ("custom.domain", 2)))
    assert onnx_proto.opsets(written) == {"": 300, "com.microsoft": 1, "custom.domain": 2}  # 300: a 2-byte varint
    model = onnx.load_model_from_string(written)
    assert onnx_proto.opsets(written) == {o.domain: o.version for o in model.opset_import}
    assert onnx_proto.opsets(model_bytes(opsets=(("ai.onnx", 18),))) == {"": 18}


@pytest.mark.parametrize("kept", [1 / 100, 1 / 2, 99 / 100])
def test_a_truncated_model_is_refused(kept):
    written = model_bytes(props={"classes": "x" * 50})
    with pytest.raises(ValueError):
        onnx_proto.metadata(written[:int(len(written) * kept)])


def test_text_is_not_a_model():
    with pytest.raises(ValueError):
        onnx_proto.metadata(b"PK\x03\x04 not protobuf at all")
