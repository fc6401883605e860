"""Each merge method against a hand computation on small tensors; parameter resolution as mergekit does it."""

from __future__ import annotations

import math

import pytest
import torch

from distill.errors import ConfigError
from distill.merge import methods
from distill.merge.config import Param, evaluate_setting, parse_merge_config, resolve

B = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
X = torch.tensor([[2.0, -2.0], [0.0, 5.0]])  # delta vs B: [[1, 0], [-0.5, 1]]
Y = torch.tensor([[0.0, -1.0], [1.5, 3.0]])  # delta vs B: [[-1, 1], [1, -1]]


def test_linear_weighted_average():
    out = methods.linear([X, Y], [3.0, 1.0])
    assert torch.allclose(out, (3 * X + Y) / 4)
    assert torch.allclose(methods.linear([X, Y], [3.0, 1.0], normalize=False), 3 * X + Y)


def test_task_arithmetic_is_base_plus_weighted_task_vectors():
    out = methods.task_arithmetic(B, [X, Y], [0.5, 2.0])
    assert torch.allclose(out, B + 0.5 * (X - B) + 2.0 * (Y - B))
    # lambda scales the summed vector; normalize divides by the sum of weights
    out = methods.task_arithmetic(B, [X, Y], [0.5, 2.0], normalize=True, lambda_=0.5)
    assert torch.allclose(out, B + 0.5 * (0.5 * (X - B) + 2.0 * (Y - B)) / 2.5)


def test_magnitude_trim_keeps_largest_fraction():
    d = torch.tensor([0.1, -3.0, 0.2, 2.0, -0.05, 1.0])
    m = methods.magnitude_mask(d, 0.5)  # keep 3 of 6: |-3|, |2|, |1|
    assert m.tolist() == [0, 1, 0, 1, 0, 1]
    assert methods.magnitude_mask(d, 0.01).sum() == 1  # at least one element survives
    assert torch.equal(methods.sparsify(d, 1.0, "magnitude"), d)


def test_ties_trim_elect_disjoint_mean():
    # task vectors (weights 1): dX = [[1, 0], [-0.5, 1]], dY = [[-1, 1], [1, -1]]
    dx, dy = X - B, Y - B
    out = methods.task_arithmetic(B, [X, Y], [1.0, 1.0], [0.5, 1.0], "magnitude", "sum", normalize=True)
    # trim dX to density 0.5 (2 of 4 kept: the two 1's), dY kept whole
    tx = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(methods.sparsify(dx, 0.5, "magnitude"), tx)
    # elect sign of the sum per entry: [[0 -> +], [1 -> +]], [[1 -> +], [0 -> +]]
    # entry (0,0): +1 and -1 -> sum 0 -> sign + -> only dX (1) agrees -> mean 1
    # entry (0,1): 0 and +1 -> + -> only dY agrees -> 1
    # entry (1,0): 0 and +1 -> + -> dY -> 1
    # entry (1,1): +1 and -1 -> sum 0 -> + -> dX -> 1
    expected = B + torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert torch.allclose(out, expected)
    # with weights the elected mean is weighted by the agreeing weights only
    out = methods.task_arithmetic(B, [X, Y], [3.0, 1.0], [1.0, 1.0], "magnitude", "sum", normalize=True)
    wx, wy = 3 * dx, 1 * dy
    sign = torch.where((wx + wy) >= 0, 1.0, -1.0)
    mx, my = (wx.sign() == sign).float(), (wy.sign() == sign).float()
    div = 3 * mx + 1 * my
    div[div == 0] = 1
    assert torch.allclose(out, B + (wx * mx + wy * my) / div)


def test_dare_random_drop_rescale_matches_hand_computation():
    torch.manual_seed(0)
    base = torch.randn(64, 32)
    a, b = base + torch.randn(64, 32) * 0.1, base + torch.randn(64, 32) * 0.1
    g1 = torch.Generator().manual_seed(7)
    out = methods.task_arithmetic(
        base, [a, b], [0.7, 0.3], [0.4, 0.6], "random", None, rescale=True, generator=g1
    )
    # replay the same masks by hand
    g2 = torch.Generator().manual_seed(7)
    parts = []
    for x, w, p in ((a, 0.7, 0.4), (b, 0.3, 0.6)):
        d = x - base
        mask = torch.bernoulli(torch.full(d.shape, p), generator=g2)
        kept = d * mask
        kept = kept * (d.abs().sum() / kept.abs().sum())  # L1 rescale (mergekit's rescale)
        parts.append(w * kept)
        # DARE keeps about `density` of the entries
        assert abs(mask.mean().item() - p) < 0.06
    assert torch.allclose(out, base + parts[0] + parts[1], atol=1e-6)
    # dare_ties: the same drops, then the TIES sign election
    g3 = torch.Generator().manual_seed(7)
    out_t = methods.task_arithmetic(
        base, [a, b], [0.7, 0.3], [0.4, 0.6], "random", "sum", rescale=True, generator=g3
    )
    st = torch.stack(parts)
    mask = (st.sign() == torch.where(st.sum(0) >= 0, 1.0, -1.0)).float()
    assert torch.allclose(out_t, base + (st * mask).sum(0), atol=1e-6)


def test_slerp_hand_computation_and_endpoints():
    a = torch.tensor([1.0, 0.0, 0.0, 0.0])
    b = torch.tensor([0.0, 2.0, 0.0, 0.0])
    # theta = pi/2: coefficients sin((1-t)θ)/sinθ and sin(tθ)/sinθ applied to the raw vectors
    out = methods.slerp(0.5, a, b)
    c = math.sin(math.pi / 4)
    assert torch.allclose(out, torch.tensor([c, 2 * c, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(methods.slerp(0.0, a, b), a, atol=1e-6)
    assert torch.allclose(methods.slerp(1.0, a, b), b, atol=1e-6)
    # nearly parallel vectors fall back to linear interpolation
    out = methods.slerp(0.25, a, 3 * a)
    assert torch.allclose(out, 0.75 * a + 0.25 * 3 * a)
    # matrices are treated as one vector (not row by row), and keep their shape
    m0, m1 = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = methods.slerp(0.5, m0, m1)
    assert out.shape == (2, 2)
    assert torch.allclose(out, (m0 + m1) * math.sin(math.pi / 4), atol=1e-6)


def test_sign_consensus_count_vs_sum():
    st = torch.tensor([[3.0], [-1.0], [-1.0]])
    assert methods.sign_consensus(st, "sum").flatten().tolist() == [1, 0, 0]
    assert methods.sign_consensus(st, "count").flatten().tolist() == [0, 1, 1]


# -- parameters ---------------------------------------------------------------------------------

F = Param("t", "float", "shared")


def test_gradient_interpolates_across_layers():
    g = [0.0, 0.5, 0.3, 0.7, 1.0]
    assert evaluate_setting("x", g, 0.0, F.validate) == 0.0
    assert evaluate_setting("x", g, 1.0, F.validate) == 1.0
    # t = 0.375 -> position 1.5 between 0.5 and 0.3
    assert evaluate_setting("x", g, 0.375, F.validate) == pytest.approx(0.4)


def test_filters_pick_first_matching_entry():
    s = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.9}, {"value": 0.5}]
    assert evaluate_setting("model.layers.1.self_attn.q_proj.weight", s, 0.5, F.validate) == 0.5
    assert evaluate_setting("model.layers.1.self_attn.q_proj.weight", s, 1.0, F.validate) == 1.0
    assert evaluate_setting("model.layers.0.mlp.up_proj.weight", s, 0.0, F.validate) == 0.9
    assert evaluate_setting("model.norm.weight", s, 0.0, F.validate) == 0.5
    assert evaluate_setting("model.norm.weight", [{"filter": "mlp", "value": 1}], 0.0, F.validate) is None


def test_resolution_precedence_and_required():
    w = Param("weight", "float", "input")
    assert resolve(w, [{"weight": 2}, {"weight": 1}], "n", 0, "m") == 2.0
    assert resolve(w, [None, {"weight": 1}], "n", 0, "m") == 1.0
    with pytest.raises(ConfigError, match="missing required parameter 'weight'"):
        resolve(w, [None, {}], "n", 0, "m")
    assert resolve(Param("density", "float", "non_base", 1.0), [None], "n", 0, "m") == 1.0


def test_config_rejects_what_we_do_not_implement():
    ok = {"merge_method": "ties", "base_model": "a", "models": [{"model": "b", "parameters": {"weight": 1}}]}
    assert parse_merge_config(ok, "f.yaml").merge_method == "ties"
    with pytest.raises(ConfigError, match="not supported"):
        parse_merge_config({**ok, "merge_method": "model_stock"}, "f.yaml")
    with pytest.raises(ConfigError, match="union"):
        parse_merge_config({**ok, "tokenizer_source": "union"}, "f.yaml")
    with pytest.raises(ConfigError, match="f.yaml: modules: unknown or unsupported key"):
        parse_merge_config({**ok, "modules": {}}, "f.yaml")
    with pytest.raises(ConfigError, match="same number of layers"):
        parse_merge_config(
            {
                "merge_method": "passthrough",
                "slices": [
                    {
                        "sources": [
                            {"model": "a", "layer_range": [0, 2]},
                            {"model": "b", "layer_range": [0, 3]},
                        ]
                    }
                ],
            },  # fmt: skip
            "f.yaml",
        )
