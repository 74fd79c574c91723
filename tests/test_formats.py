"""Files written by earlier versions of pipe still load and give the same results."""

import json
from pathlib import Path

import numpy as np

from pipeline.heads import LinearHead

FIXTURES = Path(__file__).parent / "fixtures"


def test_head_file_written_before_the_heads_package_still_loads_and_predicts_the_same():
    # written by tests/fixtures/make_head_v1.py with the single-module heads.py (commit 04e6cfd)
    expected = np.load(FIXTURES / "head-v1-expected.npz")
    meta = json.loads(str(expected["meta"]))
    head = LinearHead.load(FIXTURES / "head-v1.pt")
    for name in ("weight", "bias", "mean", "std"):
        np.testing.assert_array_equal(getattr(head, name), expected[name])
        assert getattr(head, name).dtype == np.float32
    assert head.classes == meta["classes"] == ["cat", "dog", "fox"]
    assert head.fingerprint == meta["fingerprint"] == "fp0123456789abcd"
    assert head.source == meta["source"] and head.training == meta["training"]
    assert head.path == str(FIXTURES / "head-v1.pt")
    np.testing.assert_allclose(head.predict_proba(expected["X"]), expected["proba"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(head.predict(expected["X"]), expected["proba"].argmax(axis=1))
