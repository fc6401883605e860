"""Merge methods on tensors: one output tensor from the same tensor of several models.

The arithmetic follows mergekit 0.1.5 (`merge_methods/linear.py`, `slerp.py`,
`generalized_task_arithmetic.py`, `sparsify.py`) so that the same YAML gives the same tensors;
`bench/merge_vs_mergekit.py` checks it. We implement it rather than import mergekit because
mergekit pins versions of pydantic/accelerate/safetensors that conflict with ours, and its
executor loads through its own architecture tables; these functions are small and pure.

Conventions: `base` is the base model's tensor, `others` the fine-tunes' tensors (same shape),
`weights`/`densities` one float per entry of `others`. Every function returns a new tensor in the
dtype of its first input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Sparsify = Literal["magnitude", "random"]
Consensus = Literal["sum", "count"]


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    import torch

    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Weighted average: sum(w_i * x_i) / sum(w_i) (or the plain weighted sum if not normalize)."""
    import torch

    first = tensors[0]
    dtype = _work_dtype(first)
    out = torch.zeros(first.shape, dtype=dtype)
    for x, w in zip(tensors, weights, strict=True):
        out.add_(x.to(dtype), alpha=float(w))
    if normalize:
        out.div_(float(sum(float(w) for w in weights)))
    return out.to(first.dtype)


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1), treating each tensor as one vector.

    Directions come from the normalized tensors; the interpolation applies to the raw tensors.
    Nearly colinear (or antipodal) pairs, |cos| > dot_threshold, fall back to linear interpolation.
    """
    import torch

    dtype = _work_dtype(v0)
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    if a.numel() == 0:
        return v0.clone()
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        theta = torch.acos(dot)
        s = torch.sin(theta)
        out = (torch.sin((1 - t) * theta) / s) * a + (torch.sin(t * theta) / s) * b
    return out.reshape(v0.shape).to(v0.dtype)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """1 where |delta| is among the top `density` fraction (at least one element), else 0."""
    import torch

    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    w = delta.abs().reshape(-1).float()
    top = torch.argsort(w, descending=True)[:k]
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[top] = 1
    return mask.reshape(delta.shape)


def random_mask(
    delta: torch.Tensor, density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Bernoulli(density) keep-mask (DARE's random drop keeps each entry with probability density)."""
    import torch

    work = delta.dtype if delta.dtype == torch.bfloat16 else torch.float32
    return torch.bernoulli(torch.full(delta.shape, float(density), dtype=work), generator=generator)


def rescale_l1(delta: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale `masked` so its L1 norm equals that of `delta` (mergekit's `rescale: true`).

    In expectation this is DARE's 1/density rescale, but it is exact per tensor.
    """
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def sparsify(
    delta: torch.Tensor,
    density: float,
    method: Sparsify,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Trim a task vector: keep the largest `density` fraction (magnitude) or a random one (DARE)."""
    if density >= 1:
        return delta
    if method == "magnitude":
        mask = magnitude_mask(delta, density)
        masked = delta * mask
        return rescale_l1(delta, masked) if rescale else masked
    if method == "random":
        work = random_mask(delta, density, generator)
        d = delta.to(work.dtype)
        masked = d * work
        return (rescale_l1(d, masked) if rescale else masked).to(delta.dtype)
    raise ValueError(f"unknown sparsification {method!r}")


def sign_consensus(weighted: torch.Tensor, method: Consensus = "sum") -> torch.Tensor:
    """TIES sign election over stacked weighted deltas [n, ...]: 1 where an entry agrees.

    'sum': the elected sign is that of the summed deltas (the TIES paper); 'count': the sign most
    entries have. Zeros never agree (sign 0), so trimmed entries drop out of the normalizer too.
    """
    sign = weighted.sign()
    if method == "sum":
        majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    elif method == "count":
        majority = (sign.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    else:
        raise ValueError(f"unknown consensus method {method!r}")
    return (sign == majority).to(weighted.dtype)


def task_arithmetic(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    sparsification: Sparsify | None = None,
    consensus: Consensus | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generalized task arithmetic: base + lambda * combine(w_i * sparsify(x_i - base)).

    - task arithmetic: no sparsification, no consensus, plain weighted sum of task vectors;
    - TIES: magnitude trimming (density), sign election ('sum'), disjoint mean (normalize);
    - DARE: random drop with rescale, then either a weighted sum (dare_linear) or TIES-style
      election (dare_ties).
    With `normalize` the combined delta is divided by the sum of the weights of the entries that
    contribute at each position (all of them without consensus).
    """
    import torch

    if not others:
        return base.clone()
    densities = list(densities) if densities is not None else [1.0] * len(others)
    deltas = torch.empty((len(others), *base.shape), dtype=base.dtype)
    for i, (x, d) in enumerate(zip(others, densities, strict=True)):
        delta = x.to(base.dtype) - base
        if sparsification:
            delta = sparsify(delta, d, sparsification, rescale, generator)
        deltas[i] = delta
    w = torch.tensor([float(x) for x in weights], dtype=deltas.dtype)
    while w.dim() < deltas.dim():
        w = w.unsqueeze(-1)
    deltas.mul_(w)
    if consensus:
        mask = sign_consensus(deltas, consensus)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base + mixed).to(base.dtype)


# name -> (sparsification, consensus, default normalize, default rescale), as mergekit registers them
TASK_METHODS: dict[str, tuple[Sparsify | None, Consensus | None, bool, bool]] = {
    "task_arithmetic": (None, None, False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", None, False, True),
}
