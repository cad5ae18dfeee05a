"""``--target-bits B``: a weight format per linear from a candidate set, so that the stored bits per weight averaged
over the quantized linears (weighted by their weight counts) is at most B and the estimated loss is least.

Sensitivity (cheap, measured before the block-by-block run, on the float model's inputs): for linear ``i`` with
weight ``W [K, N]``, input Hessian ``H = X^T X`` (calibration tokens, :func:`mxonnx.calibrate.block_hessians` with
float activations) and candidate ``c``, the Hessian-weighted round-to-nearest error

    L_ic = tr((W - Q_c(W))^T H (W - Q_c(W)))

(the second-order loss GPTQ minimises; RTN's is a fair proxy for GPTQ's). Allocation: the multiple-choice knapsack
``min sum_i L_ic(i)  s.t.  sum_i bits_ic(i) <= budget``, solved by **Lagrangian relaxation plus a greedy fill**
(:func:`allocate`), not by an exact solver: for a multiplier ``lam`` each linear independently takes
``argmin_c L_ic + lam * bits_ic``; ``lam`` is bisected over the breakpoints where some choice changes to the
smallest one whose total fits the budget (that choice is optimal for its own total, a vertex of the lower convex
hull of the loss/bits trade-off); the leftover budget is then filled greedily, upgrading the linear with the
largest loss drop per extra bit that still fits, until none does. Exact whenever the budget falls on a hull
vertex; otherwise within the gap between the two neighbouring vertices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from mxonnx import formats
from mxonnx.errors import InputError
from mxonnx.ops import packing


def stored_bits(fmt: str | formats.MXFormat, k: int, n: int) -> int:
    """Bits a weight ``[K, N]`` takes on disk in ``fmt`` as the rewrite stores it (``mxonnx inspect`` counts the
    same): codes in their storage type (4-bit two to a byte) plus E8M0 exponents (MX, one byte per block of the
    reduction axis, a partial block padded) or float32 scales (int, per output channel or per group)."""
    fmt = formats.parse_format(fmt)
    if fmt.kind == "none":
        return 32 * k * n
    code_bits = 4 if packing.code_storage(fmt).name in ("INT4", "UINT4") else 8
    codes = 8 * (-(-k * n * code_bits // 8))
    if fmt.kind == "mx":
        return codes + 8 * (-(-k // fmt.block_size)) * n
    groups = 1 if fmt.block_size is None else -(-k // fmt.block_size)
    return codes + 32 * groups * n


def hessian_error(w: np.ndarray, hessian: np.ndarray, fmt: str | formats.MXFormat, columns: int = 1024) -> float:
    """``tr((W - Q(W))^T H (W - Q(W)))`` for ``W [K, N]`` rounded to nearest in ``fmt`` (blocks along K), ``H
    [K, K]``; the product ``H E`` in float32 (a sensitivity, not a result: half the time of float64), the sum in
    float64, over chunks of ``columns`` output channels."""
    w = np.asarray(w, np.float32)
    h = np.asarray(hessian, np.float32)
    total = 0.0
    for c in range(0, w.shape[1], columns):
        part = w[:, c:c + columns]
        e = part - formats.quantize_dequantize(part, fmt, axis=0)
        total += float(np.einsum("kn,kn->", h @ e, e, dtype=np.float64))
    return total


def lagrangian_choice(losses: np.ndarray, bits: np.ndarray, lam: float) -> np.ndarray:
    """Per row ``i``, ``argmin_c losses[i, c] + lam * bits[i, c]``; ties go to the fewer bits."""
    objective = losses + lam * bits
    best = objective.min(axis=1, keepdims=True)
    scale = np.abs(losses).max(axis=1, keepdims=True) + lam * np.abs(bits).max(axis=1, keepdims=True)
    tied = objective <= best + 1e-9 * scale  # a breakpoint lam computed in floating point: both ends count as equal
    return np.where(tied, bits, np.inf).argmin(axis=1)


def _breakpoints(losses: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Every ``lam > 0`` where a row's two candidates have equal objective: ``(L_a - L_b) / (bits_b - bits_a)``."""
    dl = losses[:, :, None] - losses[:, None, :]
    db = bits[:, None, :] - bits[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = dl / db
    lam = lam[(db > 0) & (dl > 0) & np.isfinite(lam)]
    return np.unique(lam)


def allocate(losses: np.ndarray, bits: np.ndarray, budget: float) -> np.ndarray:
    """Candidate index per row minimising ``sum losses[i, c_i]`` with ``sum bits[i, c_i] <= budget`` (the module
    docstring's Lagrangian bisection and greedy fill). ``losses``, ``bits``: ``[items, candidates]``. Raises
    ``ValueError`` when even the cheapest choice exceeds the budget."""
    losses, bits = np.asarray(losses, np.float64), np.asarray(bits, np.float64)
    rows = np.arange(len(losses))
    if bits.min(axis=1).sum() > budget:
        raise ValueError(f"the cheapest choice takes {bits.min(axis=1).sum():g} bits, over the budget {budget:g}")

    def total(choice: np.ndarray) -> float:
        return float(bits[rows, choice].sum())

    choice = lagrangian_choice(losses, bits, 0.0)
    lams = _breakpoints(losses, bits)
    if total(choice) > budget and len(lams):
        lo, hi = 0, len(lams) - 1  # the largest breakpoint gives every row its cheapest least-loss candidate
        while lo < hi:  # smallest breakpoint whose choice fits
            mid = (lo + hi) // 2
            if total(lagrangian_choice(losses, bits, lams[mid])) <= budget:
                hi = mid
            else:
                lo = mid + 1
        choice = lagrangian_choice(losses, bits, lams[lo])
        if total(choice) > budget:  # only a row's cheapest candidate fits: take it (lam -> infinity)
            choice = np.where(bits == bits.min(axis=1, keepdims=True), losses, np.inf).argmin(axis=1)
    return greedy_fill(losses, bits, choice, budget)


def greedy_fill(losses: np.ndarray, bits: np.ndarray, choice: np.ndarray, budget: float) -> np.ndarray:
    """Spend what ``budget`` leaves over ``choice``: repeatedly move the row whose upgrade (a candidate with less
    loss and more bits that still fits) lowers the loss most per extra bit, until no upgrade fits."""
    choice = np.array(choice)
    rows = np.arange(len(losses))
    left = budget - float(bits[rows, choice].sum())
    while True:
        extra = bits - bits[rows, choice][:, None]
        gain = losses[rows, choice][:, None] - losses
        usable = (extra > 0) & (gain > 0) & (extra <= left)
        if not usable.any():
            return choice
        ratio = np.where(usable, gain / np.where(usable, extra, 1.0), -np.inf)
        i, c = np.unravel_index(int(ratio.argmax()), ratio.shape)
        left -= float(extra[i, c])
        choice[i] = c


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The formats ``--target-bits`` chose: ``formats`` per allocated linear, and the stored bits per weight of all
    quantized linears (``bits_per_weight``, the allocated and the fixed ones) against ``target_bits``."""

    formats: dict[str, str]
    bits_per_weight: float
    target_bits: float
    loss: float

    def as_dict(self) -> dict:
        return {"target_bits": self.target_bits, "bits_per_weight": self.bits_per_weight, "loss": self.loss,
                "formats": dict(self.formats)}

    @classmethod
    def from_dict(cls, d: Mapping) -> Allocation:
        return cls(dict(d["formats"]), float(d["bits_per_weight"]), float(d["target_bits"]), float(d["loss"]))


def choose_formats(target_bits: float, candidates: Sequence[str | formats.MXFormat], shapes: Mapping[str, tuple[int, int]],
                   losses: Mapping[str, Sequence[float]], fixed_bits: int = 0, fixed_weights: int = 0) -> Allocation:
    """The allocation of ``candidates`` to the linears of ``shapes`` (``{name: (K, N)}``) with ``losses[name][c]``,
    such that ``(fixed_bits + allocated bits) / (fixed_weights + allocated weights) <= target_bits``; the fixed
    part is the other quantized linears (``--override``, lm_head). A target below what the cheapest candidates
    give raises ``InputError``."""
    cands = [formats.parse_format(c) for c in candidates]
    names = list(shapes)
    bits = np.array([[stored_bits(c, *shapes[n]) for c in cands] for n in names], np.float64)
    loss = np.array([list(losses[n]) for n in names], np.float64)
    weights = fixed_weights + sum(k * n for k, n in shapes.values())
    budget = target_bits * weights - fixed_bits
    lowest = (fixed_bits + bits.min(axis=1).sum()) / weights
    if lowest > target_bits * (1 + 1e-12):
        raise InputError(f"--target-bits {target_bits:g} is below the {lowest:.4f} bits per weight of the cheapest "
                         f"candidate ({', '.join(c.name for c in cands)}) for every linear; raise it or add cheaper "
                         "--candidates")
    choice = allocate(loss, bits, max(budget, float(bits.min(axis=1).sum())))
    rows = np.arange(len(names))
    achieved = (fixed_bits + bits[rows, choice].sum()) / weights
    return Allocation({n: cands[c].name for n, c in zip(names, choice)}, float(achieved), float(target_bits),
                      float(loss[rows, choice].sum()))


def measure_losses(runner, blocks, names: Sequence[str], candidates: Sequence[str | formats.MXFormat],
                   progress: bool = False) -> dict[str, list[float]]:
    """``{name: [L_ic for c in candidates]}`` for the decoder linears named ``names``: one pass of ``runner``
    (:class:`mxonnx.blockwise.BlockwiseRunner`, at block 0 of the float model) over the blocks, advancing through
    each, with each block's Hessians of float inputs and every linear's weight rounded to each candidate."""
    from tqdm.auto import tqdm

    from mxonnx.calibrate import block_hessians
    from mxonnx.stats import group_key

    cands = [formats.parse_format(c) for c in candidates]
    wanted = set(names)
    none = formats.parse_format("none")
    losses: dict[str, list[float]] = {}
    tokens = runner.windows.size
    last = max((b.index for b in blocks if any(l.name in wanted for l in b.linears())), default=-1)
    for block in tqdm(blocks[: last + 1], desc="sensitivity", unit="block", disable=not progress, leave=False):
        hessians = block_hessians(runner, block, none, advance=block.index < last)
        for group, linears in block.groups().items():
            h = hessians[group_key(block, group)] * (tokens / 2.0)  # block_hessians gives 2/n X^T X
            for linear in linears:
                if linear.name in wanted:
                    w = linear.weight_array
                    losses[linear.name] = [hessian_error(w, h, c) for c in cands]
        del hessians
    return losses
