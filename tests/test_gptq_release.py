"""GptqWeightProvider(release=True) holds one group's Hessian and factor at a time and gives the same codes."""

from __future__ import annotations

import numpy as np

from mxonnx.gptq import GptqWeightProvider
from test_gptq import correlated_layer, hessian_of


def test_release_drops_each_hessian_once_factored_and_changes_nothing():
    layers = {group: correlated_layer(seed, k=64, n=32) for seed, group in enumerate(("qkv", "o"))}
    hessians = {f"layers.0.{g}": hessian_of(x) for g, (x, _) in layers.items()}
    order = [("layers.0.q_proj", "qkv"), ("layers.0.k_proj", "qkv"), ("layers.0.o_proj", "o")]
    kept = GptqWeightProvider(dict(hessians), "mxint4-32")
    given = dict(hessians)
    released = GptqWeightProvider(given, "mxint4-32", release=True)
    for name, group in order:
        w = layers[group][1]
        for a, b in zip(kept(name, w), released(name, w)):
            np.testing.assert_array_equal(a, b)
        assert f"layers.0.{group}" not in given  # dropped once factored
        assert [key for key, _ in released._factors] == [f"layers.0.{group}"]  # only the latest factor
