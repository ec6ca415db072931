"""The server optimizer on the global update (FedOpt: Reddi et al., "Adaptive Federated
Optimization", 2021; FedAvgM: Hsu et al., 2019).

Without it (``server.optimizer = "none"``) the new global update is the round's aggregate, as in
the paper. With it, the round's **pseudo-gradient** is the weighted mean of what the clients
*learned* in the round, ``g = sum_k w_k (x'_k - x0_k)`` (``x0_k``: what client ``k`` started
from, ``x'_k``: what it sent back), and the server steps ``x <- x + eta * u(g)`` (``eta``: the
round's value of the server's schedule, :meth:`ServerOptimizer.at_round`)::

    sgd    u = g
    avgm   m <- beta1 m + g;                                   u = m
    adam   m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2;
                                                               u = m / (sqrt(v) + tau)
    yogi   as adam, but v <- v - (1 - beta2) g^2 sign(v - g^2)

(no bias correction, as in Reddi et al.; ``v`` starts at zero.) Where ``x`` lives depends on the
strategy (:attr:`hlora.aggregation.Strategy.optimizer_space`):

- ``delta`` (``hlora``): ``x`` is each layer's whole update ``dW (out, in)``. Client ``k``
  started from the best rank-``r_k`` part of the global update, so
  ``sum_k w_k x0_k = G.scale * G.left[:, :R] diag(c) G.right[:R]`` with the **rank profile**
  ``c_j = sum of w_k over clients with r_k >= j`` (``R = max r_k``), and
  ``g = aggregate - that``. The new global update is re-decomposed by SVD, so that every
  client still receives its best rank-``r_k`` factors of it. Components no client can hold stay
  in the global update (they are not erased by a truncation, as they are without optimizer).
- ``factors`` (``fedavg``, ``zeropad``): ``x`` is the global factors ``left (out, k)`` and
  ``right (k, in)``; client ``k`` started from their leading ``r_k`` columns / rows, so
  ``sum_k w_k x0_k = left * c`` (column ``j`` times ``c_j``), likewise for ``right``.
- ``increment`` (``flora``): clients start from fresh adapters (``x0_k = 0``); ``g`` is the
  round's exact increment and ``eta * u`` is what gets merged into the base.
- ``server-factors`` (``hlora``, chosen with ``server.hlora_space``): the server keeps its own
  factors of the global update, ``L (out, R)`` and ``Rt (R, in)`` (``R``: the global rank;
  :class:`hlora.server.RoundLoop` sets it to the largest client rank by default), which no SVD
  re-makes, so the optimizer's moments stay attached to the same coordinates from round to
  round, as ``factors``' do. ``g`` is the delta space's exact progress ``(out, in)`` (never
  formed), pulled back to the factors as the gradient of ``<g, L Rt>``: ``g_L = g Rt^T``,
  ``g_Rt = L^T g``; the optimizer steps ``L`` and ``Rt``, and the global update the clients
  receive is the SVD of ``L Rt``, so each still gets its best rank-``r_k`` part. ``L`` starts at
  zero and ``Rt`` at the first round's leading right singular vectors (orthonormal rows), as a
  LoRA adapter starts at ``B = 0``.
- ``factor-steps`` (``hlora``): the server factors of ``server-factors``, stepped along what the
  clients' own *factor* steps say about them instead of the product's progress. Every client
  started from the leading columns / rows of the same factors ``B0 (out, R)``, ``A0 (R, in)``
  (the SVD of ``L Rt``), so their weighted mean steps ``g_B = sum_k w_k pad(B'_k) - B0 * c``
  and ``g_A = sum_k w_k pad(A'_k) - c * A0`` (``sqrt(s_k)`` folded in, as zero-padding
  averages them) are, for one SGD step, ``-lr grad_W A0^T`` and ``-lr B0^T grad_W`` column by
  column over the clients whose rank holds that column. They are read as gradients of the
  server's factors through ``L Rt = B0 A0``: ``g_L = g_B T^T`` with ``T = Rt A0^+`` and
  ``g_Rt = T'^T g_A`` with ``T' = A0 Rt^+`` (``(R, R)`` each), which for clients of the
  server's rank is exactly ``-lr grad_W Rt^T`` and ``-lr L^T grad_W``: the step naive
  averaging's server takes on factors its clients start from. Round 1 (fresh adapters, no
  shared start) uses ``server-factors``' pullback. With clients of mixed ranks, column ``j``
  is trained only by the clients that hold it (weight ``c_j``); ``adam``/``yogi`` take their
  second moment from the steps divided by ``c_j`` column by column (the mean over the holders,
  as if every client held it), so such a component steps at ``c_j`` times the rate instead of
  at the full rate that a scale-free rule gives every coordinate (with one rank, plain Adam).

The head (the other trainable tensors) is stepped the same way, its ``g`` being the average
head minus the head sent.

**State.** ``dense`` keeps ``m`` and ``v`` as full tensors (``(out, in)`` per layer in the delta
space). ``factored`` (delta and increment spaces, ``sgd``/``avgm`` only) keeps ``m`` and the
global update as :class:`LowRankDelta` truncated to ``state_rank`` components by the exact
QR-based SVD of the stacked factors, never forming an ``(out, in)`` matrix; with a budget at
least the true rank it equals the dense path (tested). The whole state is a flat
``name -> tensor`` dict, saved in the run's checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from hlora.aggregation import GlobalUpdate, LowRankDelta
from hlora.aggregation._common import pad_to
from hlora.aggregation.factored import qr_svd, split_singular_values
from hlora.schedule import RUN_SCHEDULES, run_learning_rate

OPTIMIZERS: tuple[str, ...] = ("sgd", "avgm", "adam", "yogi")
SPACES: tuple[str, ...] = ("delta", "factors", "increment", "server-factors", "factor-steps")
SERVER_FACTOR_SPACES: tuple[str, ...] = ("server-factors", "factor-steps")  # keep L, Rt
DENSE_STATE_LIMIT = 4 * 2**20  # 'auto': dense state up to this many entries per layer
_PINV_RTOL = 1e-6  # singular values below this share of the largest count as zero


@dataclass(frozen=True)
class ServerOptimizer:
    """Settings of the server optimizer (see the module docstring).

    Attributes:
        name: ``sgd``, ``avgm``, ``adam`` or ``yogi``.
        learning_rate: ``eta > 0``.
        momentum: ``beta1`` (``avgm``'s momentum), in ``[0, 1)``.
        beta2: Second-moment decay of ``adam``/``yogi``, in ``[0, 1)``.
        epsilon: ``tau > 0`` of ``adam``/``yogi``.
        state: ``auto``, ``dense`` or ``factored``.
        state_rank: Component budget of factored state and of a factored global update.
        global_rank: Components kept in the (dense-path) global update; None: all.
        schedule: How ``learning_rate`` moves across rounds (:meth:`at_round`): ``constant``,
            ``linear`` or ``cosine``, as the clients' run-wide schedules.
        warmup_ratio: Share of the run over which ``learning_rate`` warms up from zero.
        space: Where the optimizer steps; None: the strategy's own space
            (:attr:`hlora.aggregation.Strategy.optimizer_space`).
    """

    name: str
    learning_rate: float = 1.0
    momentum: float = 0.9
    beta2: float = 0.99
    epsilon: float = 1e-3
    state: str = "auto"
    state_rank: int = 64
    global_rank: int | None = None
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    space: str | None = None

    def __post_init__(self) -> None:
        if self.schedule not in RUN_SCHEDULES or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(
                f"server optimizer: schedule must be one of {RUN_SCHEDULES} and warmup_ratio "
                "in [0, 1)"
            )
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.name!r} (allowed: {OPTIMIZERS})")
        if self.state not in ("auto", "dense", "factored"):
            raise ValueError(f"unknown optimizer state {self.state!r}")
        if self.state == "factored" and self.name in ("adam", "yogi"):
            raise ValueError(f"'{self.name}' needs dense state (its second moment is elementwise)")
        if self.learning_rate <= 0 or not 0 <= self.momentum < 1 or not 0 <= self.beta2 < 1:
            raise ValueError(
                "server optimizer: need learning_rate > 0, momentum and beta2 in [0, 1)"
            )
        if self.space is not None and self.space not in SPACES:
            raise ValueError(f"unknown optimizer space {self.space!r} (allowed: {SPACES})")
        if self.epsilon <= 0 or self.state_rank < 1:
            raise ValueError("server optimizer: need epsilon > 0 and state_rank >= 1")

    def at_round(self, round_num: int, rounds: int) -> ServerOptimizer:
        """These settings with ``learning_rate`` at round ``round_num`` (from 1) of ``rounds``.

        The schedule is read at the middle of the round's stretch of the run, ``(t - 1/2) / T``:
        ``constant`` without warm-up keeps ``eta`` in every round; ``linear`` and ``cosine``
        warm up over ``warmup_ratio`` of the run, then decay toward zero, never reaching it.
        """
        if self.schedule == "constant" and self.warmup_ratio == 0.0:
            return self
        progress = (round_num - 0.5) / rounds
        eta = run_learning_rate(progress, self.learning_rate, self.schedule, self.warmup_ratio)
        return replace(self, learning_rate=eta, schedule="constant", warmup_ratio=0.0)

    def factored_for(self, out_features: int, in_features: int) -> bool:
        """Whether a layer of this shape keeps factored state."""
        if self.state == "auto":
            return self.name in ("sgd", "avgm") and out_features * in_features > DENSE_STATE_LIMIT
        return self.state == "factored"


def rank_profile(ranks: Sequence[int], weights: Sequence[float]) -> Tensor:
    """``c_j = sum_k w_k [r_k >= j]`` for ``j = 1 .. max(r_k)``, shape ``(max r_k,)``, fp64."""
    profile = torch.zeros(max(ranks), dtype=torch.float64)
    for r, w in zip(ranks, weights, strict=True):
        profile[:r] += w
    return profile


# -- the update rule on dense tensors ----------------------------------------------------------


def _direction(
    opt: ServerOptimizer,
    key: str,
    g: Tensor,
    state: dict[str, Tensor],
    g_full: Tensor | None = None,
) -> Tensor:
    """``u(g)`` of one dense tensor, updating ``state`` (keys ``m.<key>``, ``v.<key>``).

    ``g_full`` (``factor-steps``): what ``g`` would be if every client held every component;
    ``adam``/``yogi`` take their second moment from it, so a component that only part of the
    federation trains steps at that part of the rate instead of at the full rate.
    """
    if opt.name == "sgd":
        return g
    m_key, v_key = f"m.{key}", f"v.{key}"
    m = state.get(m_key, torch.zeros_like(g))
    if opt.name == "avgm":
        m = opt.momentum * m + g
        state[m_key] = m
        return m
    m = opt.momentum * m + (1 - opt.momentum) * g
    v = state.get(v_key, torch.zeros_like(g))
    g2 = g * g if g_full is None else g_full * g_full
    if opt.name == "adam":
        v = opt.beta2 * v + (1 - opt.beta2) * g2
    else:  # yogi
        v = v - (1 - opt.beta2) * g2 * torch.sign(v - g2)
    state[m_key], state[v_key] = m, v
    return m / (v.clamp_min(0).sqrt() + opt.epsilon)


def _svd_delta(dense: Tensor, keep: int | None, split: str) -> LowRankDelta:
    """``dense (out, in)`` as SVD factors split by ``split``, keeping at most ``keep``."""
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    return _kept(u, s, vh, keep, split)


def _truncate(left: Tensor, right: Tensor, keep: int, split: str = "balanced") -> LowRankDelta:
    """Best rank-``keep`` factors of ``left @ right`` (exact QR-based SVD, never dense)."""
    return _kept(*qr_svd(left, right), keep, split)


def _kept(u: Tensor, s: Tensor, vh: Tensor, keep: int | None, split: str) -> LowRankDelta:
    """The leading ``keep`` SVD components (all when None) as a :class:`LowRankDelta`."""
    if keep is not None:
        u, s, vh = u[:, :keep], s[:keep], vh[:keep]
    left, right = split_singular_values(u, s, vh, split)
    return LowRankDelta(left=left, right=right, singular_values=s)


def _started_from(previous: LowRankDelta, profile: Tensor) -> tuple[Tensor, Tensor]:
    """``sum_k w_k`` (client ``k``'s start) as factors: ``(scale * left[:, :R] * c, right[:R])``."""
    k = min(previous.rank, profile.shape[0])
    c = profile[:k].to(previous.left.dtype)
    return previous.scale * previous.left[:, :k] * c, previous.right[:k]


def _factored_progress(
    prev: LowRankDelta | None, agg: LowRankDelta, profile: Tensor
) -> tuple[Tensor, Tensor]:
    """The delta space's pseudo-gradient ``g = aggregate - sum_k w_k start_k`` as stacked
    factors ``(out, m)``, ``(m, in)``, never formed densely."""
    g_left, g_right = agg.scale * agg.left, agg.right
    if prev is not None:
        s_left, s_right = _started_from(prev, profile)
        g_left = torch.cat([g_left, -s_left.to(g_left.dtype)], dim=-1)
        g_right = torch.cat([g_right, s_right.to(g_right.dtype)], dim=-2)
    return g_left, g_right


# -- one server step ---------------------------------------------------------------------------


def server_step(
    opt: ServerOptimizer,
    space: str,
    previous: GlobalUpdate | None,
    previous_extras: Mapping[str, Tensor],
    aggregate: GlobalUpdate,
    profile: Tensor,
    state: Mapping[str, Tensor],
    split: str = "balanced",
    steps: GlobalUpdate | None = None,
) -> tuple[GlobalUpdate, dict[str, Tensor]]:
    """Step the global update with the round's pseudo-gradient (see the module docstring).

    Args:
        opt: The optimizer.
        space: The strategy's optimizer space (``delta``, ``factors``, ``increment``).
        previous: The global update the round's clients started from (None in round 1, and
            for ``increment``, whose clients start from fresh adapters).
        previous_extras: The head the round's clients started from.
        aggregate: The strategy's aggregate of the round's updates.
        profile: :func:`rank_profile` of the aggregated clients.
        state: The optimizer state after the previous round (empty at first); not mutated.
        split: How a re-decomposed global update's ``S`` is split between its factors
            (:func:`~hlora.aggregation.factored.split_singular_values`).
        steps: For ``factor-steps``: the zero-padded weighted mean of the clients' factors
            (:func:`~hlora.aggregation.zeropad.aggregate_zeropad` of the round's updates).

    Returns:
        The new global update (same strategy and layout as ``aggregate``) and the new state.

    Raises:
        ValueError: An unknown space, factor layouts that do not match, or ``factor-steps``
            without ``steps``.
    """
    if space not in SPACES:
        raise ValueError(f"unknown optimizer space {space!r} (allowed: {SPACES})")
    if space == "factor-steps" and steps is None:
        raise ValueError("the 'factor-steps' space needs the clients' mean factors (steps)")
    new_state = dict(state)
    layers: dict[str, LowRankDelta] = {}
    for name, agg in aggregate.layers.items():
        prev = None if previous is None or space == "increment" else previous.layers[name]
        if space == "factors":
            layers[name] = _factor_step(opt, name, prev, agg, profile, new_state)
        elif space in SERVER_FACTOR_SPACES:
            mean = None if steps is None or prev is None else steps.layers[name]
            layers[name] = _server_factor_step(
                opt, name, prev, agg, profile, new_state, split, mean
            )
        elif opt.factored_for(agg.left.shape[0], agg.right.shape[1]):
            layers[name] = _factored_delta_step(opt, name, prev, agg, profile, new_state, split)
        else:
            layers[name] = _dense_delta_step(opt, name, prev, agg, profile, new_state, space, split)
    extras = {}
    for name, head in aggregate.extras.items():
        start = previous_extras[name].to(head.dtype)
        direction = _direction(opt, f"extras.{name}", head - start, new_state)
        extras[name] = start + opt.learning_rate * direction
    return (
        GlobalUpdate(aggregate.strategy, layers, extras, aggregate.merge_into_base),
        new_state,
    )


def _dense_delta_step(
    opt: ServerOptimizer,
    name: str,
    prev: LowRankDelta | None,
    agg: LowRankDelta,
    profile: Tensor,
    state: dict[str, Tensor],
    space: str,
    split: str,
) -> LowRankDelta:
    g = agg.dense()  # (out, in)
    base = torch.zeros_like(g)
    if prev is not None:
        left, right = _started_from(prev, profile)
        g = g - left.to(g.dtype) @ right.to(g.dtype)
        base = prev.dense().to(g.dtype)
    step = opt.learning_rate * _direction(opt, f"layer.{name}", g, state)
    keep = None if space == "increment" else opt.global_rank
    return _svd_delta(base + step, keep, split)


def _factored_delta_step(
    opt: ServerOptimizer,
    name: str,
    prev: LowRankDelta | None,
    agg: LowRankDelta,
    profile: Tensor,
    state: dict[str, Tensor],
    split: str,
) -> LowRankDelta:
    g_left, g_right = _factored_progress(prev, agg, profile)
    if opt.name == "avgm":
        m_left, m_right = f"m.layer.{name}.left", f"m.layer.{name}.right"
        if m_left in state:
            g_left = torch.cat([opt.momentum * state[m_left].to(g_left.dtype), g_left], dim=-1)
            g_right = torch.cat([state[m_right].to(g_right.dtype), g_right], dim=-2)
        m = _truncate(g_left, g_right, opt.state_rank)
        state[m_left], state[m_right] = m.left, m.right
        g_left, g_right = m.left, m.right
    left, right = opt.learning_rate * g_left, g_right  # the step, (out, k) and (k, in)
    if prev is not None:  # x + eta * u, stacked
        left = torch.cat([prev.scale * prev.left.to(left.dtype), left], dim=-1)
        right = torch.cat([prev.right.to(right.dtype), right], dim=-2)
    return _truncate(left, right, opt.global_rank or opt.state_rank, split)


def _factor_step(
    opt: ServerOptimizer,
    name: str,
    prev: LowRankDelta | None,
    agg: LowRankDelta,
    profile: Tensor,
    state: dict[str, Tensor],
) -> LowRankDelta:
    width = agg.left.shape[-1] if prev is None else max(agg.left.shape[-1], prev.rank)
    left, right = pad_to(agg.left, width, -1), pad_to(agg.right, width, -2)  # (out, k), (k, in)
    start_left, start_right = torch.zeros_like(left), torch.zeros_like(right)
    if prev is not None:
        if prev.scale != agg.scale:
            raise ValueError(
                f"layer {name}: scale {agg.scale} differs from the global {prev.scale}"
            )
        c = pad_to(profile, width, 0)[:width].to(left.dtype)
        start_left = pad_to(prev.left, width, -1).to(left.dtype)
        start_right = pad_to(prev.right, width, -2).to(right.dtype)
        g_left = left - start_left * c
        g_right = right - start_right * c.unsqueeze(-1)
    else:
        g_left, g_right = left, right
    new_left = start_left + opt.learning_rate * _direction(opt, f"left.{name}", g_left, state)
    new_right = start_right + opt.learning_rate * _direction(opt, f"right.{name}", g_right, state)
    return LowRankDelta(left=new_left, right=new_right, scale=agg.scale)


def _server_factor_step(
    opt: ServerOptimizer,
    name: str,
    prev: LowRankDelta | None,
    agg: LowRankDelta,
    profile: Tensor,
    state: dict[str, Tensor],
    split: str,
    mean: LowRankDelta | None = None,
) -> LowRankDelta:
    """One step of the server's own factors ``L (out, R)``, ``Rt (R, in)`` (spaces
    ``server-factors`` and, given the clients' ``mean`` factors, ``factor-steps``;
    ``R = opt.global_rank``, which the round loop sets to the federation's largest client rank
    unless the run sets one)."""
    g_left, g_right = _factored_progress(prev, agg, profile)  # g = g_left @ g_right
    l_key, r_key = f"x.layer.{name}.left", f"x.layer.{name}.right"
    if l_key not in state:
        if prev is not None:
            raise ValueError(f"layer {name}: the optimizer state holds no server factors")
        if opt.global_rank is None:
            raise ValueError("server factors need their rank: set the optimizer's global_rank")
        rank = opt.global_rank
        vh = qr_svd(g_left, g_right)[2][:rank]  # L = 0, Rt = the leading right singular vectors
        state[r_key] = pad_to(vh, rank, -2)
        state[l_key] = torch.zeros(g_left.shape[0], rank, dtype=g_left.dtype)
    left, right = state[l_key].to(g_left.dtype), state[r_key].to(g_right.dtype)
    full_left = full_right = None
    if mean is None or prev is None:
        grad_left = g_left @ (g_right @ right.T)  # g Rt^T, (out, R)
        grad_right = (left.T @ g_left) @ g_right  # L^T g, (R, in)
    else:
        grad_left, grad_right, full_left, full_right = _factor_steps_pullback(
            left, right, prev, mean, profile
        )
    left = left + opt.learning_rate * _direction(opt, f"left.{name}", grad_left, state, full_left)
    right = right + opt.learning_rate * _direction(
        opt, f"right.{name}", grad_right, state, full_right
    )
    state[l_key], state[r_key] = left, right
    return _truncate(left, right, left.shape[-1], split)


def _factor_steps_pullback(
    left: Tensor, right: Tensor, prev: LowRankDelta, mean: LowRankDelta, profile: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``factor-steps``' pseudo-gradients of ``L (out, R)`` and ``Rt (R, in)``: the clients'
    mean factor steps from ``prev`` (``B0, A0``), read through ``L Rt = B0 A0`` (module
    docstring); then the same with each column of the steps divided by its profile ``c_j``
    (the mean over the clients that hold it), for Adam's second moment. Returns ``(out, R)``,
    ``(R, in)``, ``(out, R)``, ``(R, in)``."""
    width = left.shape[-1]
    dtype = left.dtype
    c = pad_to(profile, width, 0)[:width].to(dtype)
    b0 = pad_to(prev.scale**0.5 * prev.left, width, -1)[:, :width].to(dtype)  # (out, R)
    a0 = pad_to(prev.scale**0.5 * prev.right, width, -2)[:width].to(dtype)  # (R, in)
    root = mean.scale**0.5
    g_b = pad_to(root * mean.left, width, -1)[:, :width].to(dtype) - b0 * c  # (out, R)
    g_a = pad_to(root * mean.right, width, -2)[:width].to(dtype) - c.unsqueeze(-1) * a0
    t = right @ torch.linalg.pinv(a0, rtol=_PINV_RTOL)  # Rt A0^+, (R, R)
    t_prime = a0 @ torch.linalg.pinv(right, rtol=_PINV_RTOL)  # A0 Rt^+, (R, R)
    held = torch.where(c > 0, 1 / c.clamp_min(torch.finfo(dtype).tiny), 0.0)  # 1 / c_j
    return (
        g_b @ t.T,
        t_prime.T @ g_a,
        (g_b * held) @ t.T,
        t_prime.T @ (held.unsqueeze(-1) * g_a),
    )
