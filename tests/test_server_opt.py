"""The server optimizer: pseudo-gradients and update rules against dense fp64 references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from hlora.aggregation import ClientUpdate, GlobalUpdate, LoraFactors, LowRankDelta, get_strategy
from hlora.server_opt import ServerOptimizer, rank_profile, server_step

OUT, IN = 24, 20
SCALING = 2.0


def _factors(rank: int, gen: torch.Generator) -> LoraFactors:
    return LoraFactors(
        A=torch.randn(rank, IN, generator=gen, dtype=torch.float64),
        B=torch.randn(OUT, rank, generator=gen, dtype=torch.float64),
    )


def _updates(ranks: list[int], sizes: list[int], seed: int) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(
            client_id=f"c{k}",
            num_examples=n,
            rank=r,
            scaling=SCALING,
            factors={"l0": _factors(r, gen), "l1": _factors(r, gen)},
            extras={"head": torch.randn(3, generator=gen, dtype=torch.float64)},
        )
        for k, (r, n) in enumerate(zip(ranks, sizes, strict=True))
    ]


def _weights(sizes: list[int]) -> list[float]:
    return [n / sum(sizes) for n in sizes]


def _delta_pseudo_gradient(
    updates: list[ClientUpdate], previous: GlobalUpdate | None, name: str
) -> torch.Tensor:
    """``sum_k w_k (s B'_k A'_k - start_k)``, each client's start its truncation: dense fp64."""
    weights = _weights([u.num_examples for u in updates])
    g = torch.zeros(OUT, IN, dtype=torch.float64)
    for u, w in zip(updates, weights, strict=True):
        g += w * u.factors[name].delta(u.scaling)
        if previous is not None:
            g -= w * previous.client_factors(u.rank, u.scaling)[name].delta(u.scaling)
    return g


def _run(
    opt: ServerOptimizer, strategy: str, ranks: list[int], rounds: int, space: str | None = None
) -> tuple[list[GlobalUpdate], list[list[ClientUpdate]]]:
    sizes = [30, 10, 20, 40][: len(ranks)]
    aggregate = get_strategy(strategy).aggregate
    space = space or get_strategy(strategy).optimizer_space
    state: dict[str, torch.Tensor] = {}
    previous: GlobalUpdate | None = None
    head = {"head": torch.zeros(3, dtype=torch.float64)}
    history, inputs = [], []
    for t in range(rounds):
        updates = _updates(ranks, sizes, seed=t)
        agg = aggregate(updates)
        profile = rank_profile(ranks, _weights(sizes))
        previous, state = server_step(opt, space, previous, head, agg, profile, state)
        head = dict(previous.extras)
        history.append(previous)
        inputs.append(updates)
    return history, inputs


def test_rank_profile() -> None:
    assert_close(
        rank_profile([2, 4, 1], [0.5, 0.3, 0.2]),
        torch.tensor([1.0, 0.8, 0.3, 0.3], dtype=torch.float64),
    )


@pytest.mark.parametrize("name", ["sgd", "avgm", "adam", "yogi"])
def test_dense_delta_space_matches_reference(name: str) -> None:
    ranks = [2, 4, 8, 4]
    opt = ServerOptimizer(name, learning_rate=0.7, momentum=0.8, beta2=0.9, epsilon=1e-2)
    history, inputs = _run(opt, "hlora", ranks, rounds=3)
    x = torch.zeros(OUT, IN, dtype=torch.float64)
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    previous = None
    for global_update, updates in zip(history, inputs, strict=True):
        g = _delta_pseudo_gradient(updates, previous, "l0")
        if name == "sgd":
            u = g
        elif name == "avgm":
            m = 0.8 * m + g
            u = m
        else:
            m = 0.8 * m + 0.2 * g
            v = 0.9 * v + 0.1 * g * g if name == "adam" else v - 0.1 * g * g * torch.sign(v - g * g)
            u = m / (v.sqrt() + 1e-2)
        x = x + 0.7 * u
        assert_close(global_update.layers["l0"].dense(), x, rtol=1e-10, atol=1e-10)
        previous = global_update
    # the new global is an SVD: leading components give each client its best rank-r part
    s = history[-1].layers["l0"].singular_values
    assert s is not None
    assert_close(s, torch.linalg.svdvals(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_server_factors_match_a_dense_reference(name: str) -> None:
    """``server-factors``: the server's own factors ``L``, ``Rt`` step along the pulled-back
    progress ``g Rt^T`` and ``L^T g``; what clients receive is the SVD of ``L Rt``."""
    ranks = [2, 4, 3]
    opt = ServerOptimizer(
        name, learning_rate=0.3, momentum=0.8, beta2=0.9, epsilon=1e-2, global_rank=max(ranks)
    )
    history, inputs = _run(opt, "hlora", ranks, rounds=3, space="server-factors")
    previous = None
    moments: dict[str, torch.Tensor] = {}

    def direction(key: str, g: torch.Tensor) -> torch.Tensor:
        if name == "sgd":
            return g
        m = 0.8 * moments.get("m" + key, torch.zeros_like(g)) + 0.2 * g
        v = 0.9 * moments.get("v" + key, torch.zeros_like(g)) + 0.1 * g * g
        moments["m" + key], moments["v" + key] = m, v
        return m / (v.sqrt() + 1e-2)

    for t, (global_update, updates) in enumerate(zip(history, inputs, strict=True)):
        g = _delta_pseudo_gradient(updates, previous, "l0")  # (OUT, IN)
        if t == 0:  # L = 0, Rt = the leading right singular vectors of the first progress
            left = torch.zeros(OUT, max(ranks), dtype=torch.float64)
            right = torch.linalg.svd(g)[2][: max(ranks)]
        g_left, g_right = g @ right.T, left.T @ g
        left = left + 0.3 * direction("L", g_left)
        right = right + 0.3 * direction("R", g_right)
        layer = global_update.layers["l0"]
        assert_close(layer.dense(), left @ right, rtol=1e-9, atol=1e-12)
        assert layer.rank <= max(ranks)
        assert layer.singular_values is not None  # an SVD: clients get their best rank-r part
        assert_close(layer.singular_values, torch.linalg.svdvals(left @ right)[: layer.rank])
        previous = global_update
    # the step is not the delta space's: the same run there ends elsewhere
    delta, _ = _run(opt, "hlora", ranks, rounds=3, space="delta")
    assert not torch.allclose(delta[-1].layers["l0"].dense(), history[-1].layers["l0"].dense())


def test_server_factors_take_a_global_rank_and_refuse_unknown_spaces() -> None:
    opt = ServerOptimizer("adam", learning_rate=0.1, global_rank=2, space="server-factors")
    history, _ = _run(opt, "hlora", [2, 4], rounds=2, space="server-factors")
    assert all(layer.rank <= 2 for layer in history[-1].layers.values())
    with pytest.raises(ValueError, match="unknown optimizer space 'weights'"):
        ServerOptimizer("adam", space="weights")
    # a global update to step from, but a state without the server's factors of it
    agg = get_strategy("hlora").aggregate(_updates([2, 4], [10, 20], seed=0))
    head = {"head": torch.zeros(3, dtype=torch.float64)}
    with pytest.raises(ValueError, match="layer l0: the optimizer state holds no server factors"):
        server_step(opt, "server-factors", agg, head, agg, rank_profile([2, 4], [0.5, 0.5]), {})
    unranked = ServerOptimizer("adam", learning_rate=0.1)
    with pytest.raises(ValueError, match="server factors need their rank"):
        server_step(unranked, "server-factors", None, head, agg, rank_profile([2, 4], [1, 1]), {})


def _sgd_step_updates(
    start: GlobalUpdate, ranks: list[int], scalings: list[float], lr: float, seed: int
) -> tuple[list[ClientUpdate], list[torch.Tensor]]:
    """Clients that each take one SGD step on ``f_k(W) = |W - W*_k|^2 / 2`` from their
    truncation of ``start`` (``W = s B A``), and each one's ``grad_W f_k`` (layer ``l0``);
    client 0 sits at its optimum (``W*_0`` = its start, so its gradient is zero)."""
    gen = torch.Generator().manual_seed(seed)
    updates, grads = [], []
    for k, (r, s) in enumerate(zip(ranks, scalings, strict=True)):
        factors = {}
        for name in ("l0", "l1"):
            factor = start.client_factors(r, s)[name]
            a, b = factor.A, factor.B
            w = s * b @ a
            target = w if k == 0 else torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
            grad = w - target  # (OUT, IN)
            factors[name] = LoraFactors(A=a - lr * s * b.T @ grad, B=b - lr * s * grad @ a.T)
            if name == "l0":
                grads.append(grad)
        updates.append(
            ClientUpdate(
                client_id=f"c{k}",
                num_examples=10 * (k + 1),
                rank=r,
                scaling=s,
                factors=factors,
                extras={"head": torch.zeros(3, dtype=torch.float64)},
            )
        )
    return updates, grads


@pytest.mark.parametrize("split", ["balanced", "orthonormal-a"])
@pytest.mark.parametrize("ranks", [[4, 4, 4], [2, 4]])
def test_factor_steps_are_the_gradients_of_the_server_factors(split: str, ranks: list[int]) -> None:
    """``factor-steps``: after one SGD step of each client, the pseudo-gradients of ``L``, ``Rt``
    are ``-lr grad Rt^T`` and ``-lr L^T grad`` (``grad = sum_k w_k s_k grad_W f_k``, the step
    naive averaging's server takes on factors its clients start from), for every factor split;
    a lower-rank client at its optimum adds nothing."""
    lr, eta, rank = 0.05, 0.3, max(ranks)
    scalings = [0.5, 2.0, 1.0][: len(ranks)]
    opt = ServerOptimizer("sgd", learning_rate=eta, global_rank=rank, space="factor-steps")
    head = {"head": torch.zeros(3, dtype=torch.float64)}
    zeropad, hlora = get_strategy("zeropad").aggregate, get_strategy("hlora").aggregate
    first = _updates(ranks, [10, 20, 30][: len(ranks)], seed=0)  # round 1: fresh adapters
    profile = rank_profile(ranks, _weights([u.num_examples for u in first]))
    start, state = server_step(
        opt, "factor-steps", None, head, hlora(first), profile, {}, split, zeropad(first)
    )
    plain, _ = server_step(opt, "server-factors", None, head, hlora(first), profile, {}, split)
    assert_close(start.layers["l0"].dense(), plain.layers["l0"].dense())  # round 1: the same
    left, right = state["x.layer.l0.left"], state["x.layer.l0.right"]

    updates, grads = _sgd_step_updates(start, ranks, scalings, lr, seed=1)
    weights = _weights([u.num_examples for u in updates])
    profile = rank_profile(ranks, weights)
    new, new_state = server_step(
        opt, "factor-steps", start, head, hlora(updates), profile, state, split, zeropad(updates)
    )
    grad = sum(w * s * g for w, s, g in zip(weights, scalings, grads, strict=True))
    assert isinstance(grad, torch.Tensor)
    want_left = left + eta * (-lr * grad @ right.T)
    want_right = right + eta * (-lr * left.T @ grad)
    assert_close(new_state["x.layer.l0.left"], want_left, rtol=1e-8, atol=1e-10)
    assert_close(new_state["x.layer.l0.right"], want_right, rtol=1e-8, atol=1e-10)
    assert_close(new.layers["l0"].dense(), want_left @ want_right, rtol=1e-8, atol=1e-10)
    # the product's pullback of server-factors is another step
    other, _ = server_step(opt, "server-factors", start, head, hlora(updates), profile, state)
    assert not torch.allclose(other.layers["l0"].dense(), new.layers["l0"].dense())
    with pytest.raises(ValueError, match="'factor-steps' space needs the clients' mean factors"):
        server_step(opt, "factor-steps", start, head, hlora(updates), profile, state, split)


@pytest.mark.parametrize("ranks", [[4, 4, 4], [2, 4, 4]])
def test_factor_steps_adam_steps_a_component_at_the_share_that_trains_it(ranks: list[int]) -> None:
    """``factor-steps`` with Adam: the first moment follows the clients' weighted steps, the
    second their mean over the clients that hold each component, so with every client at the
    server's rank it is Adam on ``-lr grad Rt^T``, and a component only some clients hold steps
    at their share of the rate (dense fp64 reference from the clients' true gradients)."""
    lr, eta, rank, eps = 0.05, 0.3, max(ranks), 1e-12
    scalings = [0.5, 2.0, 1.0]
    opt = ServerOptimizer(
        "adam", learning_rate=eta, momentum=0.9, beta2=0.99, epsilon=eps, global_rank=rank
    )
    head = {"head": torch.zeros(3, dtype=torch.float64)}
    zeropad, hlora = get_strategy("zeropad").aggregate, get_strategy("hlora").aggregate
    first = _updates(ranks, [10, 20, 30], seed=0)
    profile = rank_profile(ranks, _weights([u.num_examples for u in first]))
    start, state = server_step(
        opt, "factor-steps", None, head, hlora(first), profile, {}, "balanced", zeropad(first)
    )
    left, right = state["x.layer.l0.left"], state["x.layer.l0.right"]
    updates, grads = _sgd_step_updates(start, ranks, scalings, lr, seed=2)
    weights = _weights([u.num_examples for u in updates])
    profile = rank_profile(ranks, weights)
    _, new_state = server_step(
        opt,
        "factor-steps",
        start,
        head,
        hlora(updates),
        profile,
        state,
        "balanced",
        zeropad(updates),
    )
    # each client's step of B, sqrt(s) folded in: -lr s grad a0[:r]^T, zero beyond its rank
    a0 = start.layers["l0"].right  # (R, in)
    steps = []
    for r, s, g in zip(ranks, scalings, grads, strict=True):
        step = torch.zeros(OUT, rank, dtype=torch.float64)
        step[:, :r] = -lr * s * g @ a0[:r].T
        steps.append(step)
    g_b = sum(w * st for w, st in zip(weights, steps, strict=True))
    assert isinstance(g_b, torch.Tensor)
    t = right @ torch.linalg.pinv(a0)  # L Rt = B0 A0: Rt = T A0
    g_left, full_left = g_b @ t.T, (g_b / profile) @ t.T
    m_left = (state["m.left.l0"] * 0.9 + 0.1 * g_left) if "m.left.l0" in state else 0.1 * g_left
    v_left = (state["v.left.l0"] * 0.99 if "v.left.l0" in state else 0) + 0.01 * full_left**2
    want = left + eta * m_left / (v_left.sqrt() + eps)
    assert_close(new_state["x.layer.l0.left"], want, rtol=1e-7, atol=1e-10)
    if len(set(ranks)) == 1:  # Adam on the server factors' true gradients
        assert_close(
            g_left,
            -lr
            * sum(w * s * g for w, s, g in zip(weights, scalings, grads, strict=True))
            @ right.T,
        )


def test_sgd_at_one_keeps_what_no_client_holds() -> None:
    # With eta = 1 the new global is the aggregate plus the part of the old global that the
    # clients' truncations left out (sum_k w_k (G - trunc_rk(G))).
    opt = ServerOptimizer("sgd", learning_rate=1.0)
    history, inputs = _run(opt, "hlora", [2, 4], rounds=2)
    first, second = history
    weights = _weights([u.num_examples for u in inputs[1]])
    expected = get_strategy("hlora").aggregate(inputs[1]).layers["l1"].dense()
    for u, w in zip(inputs[1], weights, strict=True):
        held = first.client_factors(u.rank, SCALING)["l1"].delta(SCALING)
        expected = expected + w * (first.layers["l1"].dense() - held)
    assert_close(second.layers["l1"].dense(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["sgd", "avgm"])
def test_factored_state_equals_dense_when_the_budget_holds_the_rank(name: str) -> None:
    ranks = [1, 2, 3]
    dense = ServerOptimizer(name, learning_rate=0.9, momentum=0.6, state="dense")
    factored = ServerOptimizer(name, learning_rate=0.9, momentum=0.6, state="factored")
    small = ServerOptimizer(name, learning_rate=0.9, momentum=0.6, state="factored", state_rank=3)
    want, _ = _run(dense, "hlora", ranks, rounds=3)
    got, _ = _run(factored, "hlora", ranks, rounds=3)
    truncated, _ = _run(small, "hlora", ranks, rounds=3)
    for a, b in zip(want, got, strict=True):
        for name_ in ("l0", "l1"):
            assert_close(b.layers[name_].dense(), a.layers[name_].dense(), rtol=1e-9, atol=1e-9)
    for layer in truncated[-1].layers.values():
        assert layer.rank <= 3
    # a budget below the true rank loses energy: the dense path is what it approximates
    error = (truncated[-1].layers["l0"].dense() - want[-1].layers["l0"].dense()).norm()
    assert 0 < error < want[-1].layers["l0"].dense().norm()


def test_factored_truncation_follows_its_own_recursion() -> None:
    # avgm with state_rank k: m <- trunc_k(beta m + g), x <- trunc_k(x + eta m), in fp64 dense.
    k = 4
    opt = ServerOptimizer("avgm", learning_rate=0.5, momentum=0.5, state="factored", state_rank=k)
    history, inputs = _run(opt, "hlora", [2, 3], rounds=3)

    def trunc(x: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(x)
        return (u[:, :k] * s[:k]) @ vh[:k]

    x = torch.zeros(OUT, IN, dtype=torch.float64)
    m = torch.zeros_like(x)
    previous = None
    for global_update, updates in zip(history, inputs, strict=True):
        g = _delta_pseudo_gradient(updates, previous, "l0")
        m = trunc(0.5 * m + g)
        x = trunc(x + 0.5 * m)
        assert_close(global_update.layers["l0"].dense(), x, rtol=1e-8, atol=1e-8)
        previous = global_update


def test_factor_space_for_fedavg_and_zeropad() -> None:
    # fedavg, sgd at eta = 1 is plain fedavg; avgm steps the averaged factors themselves.
    plain, inputs = _run(ServerOptimizer("sgd", learning_rate=1.0), "fedavg", [4, 4, 4], 2)
    for got, updates in zip(plain, inputs, strict=True):
        want = get_strategy("fedavg").aggregate(updates)
        assert_close(got.layers["l0"].left, want.layers["l0"].left)
        assert_close(got.layers["l0"].right, want.layers["l0"].right)
        assert_close(got.extras["head"], want.extras["head"])
    opt = ServerOptimizer("avgm", learning_rate=0.5, momentum=0.9)
    history, inputs = _run(opt, "zeropad", [2, 4], rounds=2)
    weights = _weights([u.num_examples for u in inputs[0]])
    first = get_strategy("zeropad").aggregate(inputs[0]).layers["l0"]
    assert_close(history[0].layers["l0"].left, 0.5 * first.left)
    # round 2: client k started from the leading r_k columns; g = aggregate - sum_k w_k start_k
    c = torch.tensor([1.0, 1.0, weights[1], weights[1]], dtype=torch.float64)
    second = get_strategy("zeropad").aggregate(inputs[1]).layers["l0"]
    g = second.left - history[0].layers["l0"].left * c
    m = 0.9 * first.left + g
    assert_close(history[1].layers["l0"].left, history[0].layers["l0"].left + 0.5 * m)


def test_increment_space_for_flora() -> None:
    opt = ServerOptimizer("avgm", learning_rate=1.0, momentum=0.5)
    history, inputs = _run(opt, "flora", [2, 4], rounds=2)
    first = get_strategy("flora").aggregate(inputs[0]).layers["l0"].dense()
    second = get_strategy("flora").aggregate(inputs[1]).layers["l0"].dense()
    assert history[1].merge_into_base
    assert_close(history[1].layers["l0"].dense(), 0.5 * first + second, rtol=1e-10, atol=1e-10)


def test_inputs_are_not_mutated() -> None:
    updates = _updates([2, 4], [10, 20], seed=0)
    agg = get_strategy("hlora").aggregate(updates)
    before = {k: t.clone() for k, t in agg.layers["l0"].__dict__.items() if torch.is_tensor(t)}
    state = {"m.layer.l0": torch.ones(OUT, IN, dtype=torch.float64)}
    opt = ServerOptimizer("avgm")
    head = {"head": torch.zeros(3, dtype=torch.float64)}
    server_step(opt, "delta", None, head, agg, rank_profile([2, 4], [1 / 3, 2 / 3]), state)
    assert_close(state["m.layer.l0"], torch.ones(OUT, IN, dtype=torch.float64))
    for k, t in before.items():
        assert_close(getattr(agg.layers["l0"], k), t)


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="unknown server optimizer 'lamb'"):
        ServerOptimizer("lamb")
    with pytest.raises(ValueError, match="'adam' needs dense state"):
        ServerOptimizer("adam", state="factored")
    with pytest.raises(ValueError, match="learning_rate > 0"):
        ServerOptimizer("sgd", learning_rate=0.0)
    agg = GlobalUpdate("hlora", {"l0": LowRankDelta(torch.ones(2, 1), torch.ones(1, 2))}, {})
    with pytest.raises(ValueError, match="unknown optimizer space 'weights'"):
        server_step(ServerOptimizer("sgd"), "weights", None, {}, agg, torch.ones(1), {})


@pytest.mark.parametrize("state", ["dense", "factored"])
def test_factor_split_of_the_stepped_update(state: str) -> None:
    """The re-decomposed update has the same product under either split, and ``orthonormal-a``
    hands clients orthonormal rows of ``A``."""
    opt = ServerOptimizer("avgm", learning_rate=0.9, momentum=0.6, state=state)
    ranks, sizes = [1, 2, 3], [30, 10, 20]
    profile = rank_profile(ranks, _weights(sizes))
    space = get_strategy("hlora").optimizer_space
    head = {"head": torch.zeros(3, dtype=torch.float64)}
    results = {}
    for split in ("balanced", "orthonormal-a"):
        previous, opt_state = None, {}
        for t in range(2):
            agg = get_strategy("hlora").aggregate(_updates(ranks, sizes, seed=t))
            previous, opt_state = server_step(
                opt, space, previous, head, agg, profile, opt_state, split
            )
        results[split] = previous
    for name in ("l0", "l1"):
        a, b = results["balanced"].layers[name], results["orthonormal-a"].layers[name]
        assert_close(b.dense(), a.dense(), rtol=1e-9, atol=1e-9)
        right = b.right
        assert_close(
            right @ right.T, torch.eye(right.shape[0], dtype=right.dtype), atol=1e-9, rtol=0
        )


def test_the_learning_rate_schedule_across_rounds() -> None:
    """``at_round`` reads the schedule at the middle of each round's stretch of the run."""
    flat = ServerOptimizer("adam", learning_rate=0.8)
    assert flat.at_round(3, 10) is flat
    linear = ServerOptimizer("sgd", learning_rate=0.8, schedule="linear", warmup_ratio=0.2)
    # round 1 of 10 sits at progress 0.05, a quarter of the warm-up; round 10 at 0.95
    assert linear.at_round(1, 10).learning_rate == pytest.approx(0.2)
    assert linear.at_round(10, 10).learning_rate == pytest.approx(0.8 * (1 - 0.75 / 0.8))
    stepped = linear.at_round(10, 10)
    assert (stepped.schedule, stepped.warmup_ratio, stepped.name) == ("constant", 0.0, "sgd")
    cosine = ServerOptimizer("sgd", learning_rate=1.0, schedule="cosine")
    assert cosine.at_round(2, 4).learning_rate == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.375))
    )
    warm = ServerOptimizer("sgd", learning_rate=1.0, warmup_ratio=0.5)  # constant after it
    assert [warm.at_round(t, 4).learning_rate for t in (1, 2, 3, 4)] == pytest.approx(
        [0.25, 0.75, 1.0, 1.0]
    )
    with pytest.raises(ValueError, match="schedule must be one of"):
        ServerOptimizer("sgd", schedule="step")
    with pytest.raises(ValueError, match="warmup_ratio in"):
        ServerOptimizer("sgd", warmup_ratio=1.0)
