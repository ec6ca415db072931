"""The federated round loop, written once against :class:`hlora.protocol.Transport`.

Each round: pick the clients, send each its instruction (factors at its own rank), collect the
replies, screen them (:mod:`hlora.trust`: the example count accepted at join time, the run's
scaling and precision, an optional norm bound), validate and aggregate them with the chosen
strategy (a client whose update fails a check is dropped with a logged reason), check the new
global state for non-finite values (a bad one is not taken: the round keeps the old state and
records why), after the last round optionally refit the global head from the clients' feature
moments (``server.head_calibration``; :mod:`hlora.calibration`), evaluate the global model,
append a metrics record and checkpoint the state. The in-process engine and the Flower engine
both drive this loop.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hlora.aggregation import (
    AggregationOptions,
    ClientUpdate,
    GlobalUpdate,
    InvalidUpdateError,
    LowRankDelta,
    UpdateSpec,
    get_strategy,
)
from hlora.aggregation.factored import qr_svd, split_singular_values
from hlora.aggregation.spectrum import energy_beyond
from hlora.calibration import calibrated_head, check_moments
from hlora.checkpoint import ClientState, ServerState, save_state
from hlora.errors import HloraError
from hlora.metrics import EvalCounts, metrics_of
from hlora.protocol import (
    CalibratingTransport,
    EvalInstruction,
    EvaluatingTransport,
    RoundResult,
    TrainInstruction,
    TrainReply,
    Transport,
    instruction_bytes,
    update_bytes,
)
from hlora.report import MetricsLog, RoundProgress
from hlora.schedule import round_schedule
from hlora.server_opt import SERVER_FACTOR_SPACES, ServerOptimizer, rank_profile, server_step
from hlora.trust import Screened, TrustPolicy, nonfinite_state, screen_update

logger = logging.getLogger(__name__)

SERVER_EVAL = "server"
FEDERATED_EVAL = "federated"
EVALUATIONS: tuple[str, ...] = (SERVER_EVAL, FEDERATED_EVAL, "both")
"""Where the global model is evaluated: on the server's evaluation set, on the clients' own
held-out data (a federated evaluation, summed over clients), or both."""


class FederationError(HloraError):
    """A round cannot go on (e.g. fewer valid updates than ``min_clients``)."""


@dataclass(frozen=True)
class ClientSlot:
    """The server's view of one client."""

    client_id: str
    rank: int
    num_examples: int


EvaluateFn = Callable[..., dict[str, float]]


@dataclass(frozen=True)
class LoopSettings:
    """What the round loop needs from the run configuration."""

    mode: str  # a strategy name, or "local"
    rounds: int
    clients_per_round: int  # 0: all
    scaling: float
    seed: int
    min_clients: int
    eval_every: int
    eval_truncations: str  # never | final | every
    options: AggregationOptions
    lr_schedule: str = "round"  # see hlora.schedule
    learning_rate: float = 0.0  # the schedule's peak
    warmup_ratio: float = 0.0
    server_optimizer: ServerOptimizer | None = None  # None: the global update is the aggregate
    label_prior: tuple[float, ...] | None = None  # sent when clients adjust their logits
    freeze_head: bool = False  # the global head stays as it is (train.freeze_head)
    residual: str = "drop"  # drop | frozen: components beyond a client's rank (server.residual)
    window: str = "leading"  # leading | rolling: the components a client trains (server.window)
    trust: TrustPolicy = field(default_factory=TrustPolicy)  # checks on replies (hlora.trust)
    evaluation: str = SERVER_EVAL  # one of EVALUATIONS
    metric_names: tuple[str, ...] = ()  # of a federated evaluation (the task's)
    head_calibration: str = "none"  # after the last round: none | ccvr (hlora.calibration)
    calibration_samples: float = 10.0  # virtual features per training example (ccvr)
    head_linear: str = ""  # the head's final linear layer: its prefix among the extras' names
    num_labels: int = 0  # the task's classes (ccvr)


def beyond_rank(update: GlobalUpdate, rank: int) -> dict[str, LowRankDelta] | None:
    """The components of ``update`` beyond the leading ``rank`` (``server.residual =
    "frozen"``): ``left[:, rank:]``, ``right[rank:]`` of every layer that has more, so that a
    client's truncation plus them is the whole update; None when no layer has more."""
    rest = {
        name: LowRankDelta(left=d.left[:, rank:], right=d.right[rank:], scale=d.scale)
        for name, d in update.layers.items()
        if d.rank > rank
    }
    return rest or None


def residual_version(round_num: int, rank: int) -> int:
    """The base tag of a frozen residual (``server.residual = "frozen"``): negative, one per
    round and client rank, so that no other base (W0 is 0, flora's merges are positive) and no
    other rank's residual shares it."""
    return -(round_num * 2**16 + rank)


def _seed(*parts: int) -> int:
    """A deterministic 31-bit seed from integers (independent of Python's hash seed)."""
    value = 0x345678
    for p in parts:
        value = (value * 1_000_003 + p + 0x9E3779B1) % (2**31 - 1)
    return value


class RoundLoop:
    """Drives rounds over a transport (see the module docstring).

    Args:
        settings: Loop settings.
        clients: Every client of the federation.
        spec: Expected layers and head shapes of every update.
        initial_extras: The pretrained model's head (the starting global head).
        transport: Delivers instructions and collects replies.
        evaluate: ``evaluate(deltas, extras, base_version=..., base_delta=...) -> metrics``.
        metrics: The run's metrics log.
        checkpoint_path: Where the state is saved after every round.
        fingerprint: Identifies the configuration (stored in checkpoints).
        progress: Terminal progress display.
    """

    def __init__(
        self,
        settings: LoopSettings,
        clients: Sequence[ClientSlot],
        spec: UpdateSpec,
        initial_extras: Mapping[str, Tensor],
        transport: Transport,
        evaluate: EvaluateFn,
        metrics: MetricsLog,
        checkpoint_path: Path,
        fingerprint: str,
        progress: RoundProgress,
    ) -> None:
        self.settings = settings
        self.clients = {c.client_id: c for c in clients}
        self.order = [c.client_id for c in clients]
        self.spec = spec
        self.initial_extras = {k: v.detach().cpu().clone() for k, v in initial_extras.items()}
        self.transport = transport
        self.evaluate = evaluate
        self.metrics = metrics
        self.checkpoint_path = checkpoint_path
        self.fingerprint = fingerprint
        self.progress = progress
        self.strategy = None if settings.mode == "local" else get_strategy(settings.mode)
        if settings.evaluation not in EVALUATIONS:
            raise FederationError(
                f"evaluation {settings.evaluation!r} is not one of {', '.join(EVALUATIONS)}"
            )
        if settings.evaluation != SERVER_EVAL and (
            settings.mode == "local" or not hasattr(transport, "evaluate_round")
        ):
            raise FederationError(
                "a federated evaluation needs a global model and a transport whose clients "
                "evaluate it (the Flower engine)"
            )
        if settings.head_calibration != "none" and (
            settings.mode == "local" or not hasattr(transport, "feature_moments")
        ):
            raise FederationError(
                "the head's calibration needs a global model and a transport whose clients "
                "report their feature moments (both engines' do)"
            )

    def initial_state(self) -> ServerState:
        """The state before round 1."""
        return ServerState(round_num=0, global_update=None, extras=dict(self.initial_extras))

    # -- one round -----------------------------------------------------------------------

    def sample(self, round_num: int) -> list[str]:
        """The clients taking part in ``round_num`` (seeded; all when clients_per_round = 0)."""
        k = self.settings.clients_per_round
        if k == 0 or k >= len(self.order):
            return list(self.order)
        rng = random.Random(_seed(self.settings.seed, round_num, 7))
        chosen = set(rng.sample(self.order, k))
        return [c for c in self.order if c in chosen]

    def instruction(self, state: ServerState, client_id: str, round_num: int) -> TrainInstruction:
        """What ``client_id`` gets in ``round_num``."""
        slot = self.clients[client_id]
        s = self.settings
        index = self.order.index(client_id)
        factors = None
        extras: Mapping[str, Tensor] = state.extras
        init_seed = _seed(s.seed, 0, 1)  # round 1: one common init per rank
        base_version, base_delta = state.base_version, state.base_delta
        if s.mode == "local":
            own = state.local.get(client_id)
            if own is not None:
                factors, extras = own.factors, own.extras
        elif state.global_update is not None and not state.global_update.merge_into_base:
            start = self.clients_start(state.global_update, round_num)
            factors = start.client_factors(slot.rank, s.scaling)
            if s.residual == "frozen":
                base_delta = beyond_rank(start, slot.rank)
                if base_delta is not None:  # a tag of its own: (round, rank) fixes the residual
                    base_version = residual_version(round_num, slot.rank)
        elif state.global_update is not None:  # flora: fresh adapters every round
            init_seed = _seed(s.seed, round_num, 1)
        return TrainInstruction(
            client_id=client_id,
            round_num=round_num,
            rank=slot.rank,
            scaling=s.scaling,
            factors=factors,
            extras=extras,
            init_seed=init_seed,
            train_seed=_seed(s.seed, round_num, 2, index),
            base_version=base_version,
            base_delta=base_delta,
            schedule=round_schedule(
                round_num, s.rounds, s.learning_rate, s.lr_schedule, s.warmup_ratio
            ),
            label_prior=s.label_prior,
        )

    def aggregate(
        self, updates: list[ClientUpdate], dropped: list[dict[str, str]]
    ) -> tuple[GlobalUpdate, list[ClientUpdate]]:
        """Aggregate, dropping (and recording) every client whose update is invalid."""
        strategy = self.strategy
        if strategy is None:
            raise FederationError("the 'local' mode does not aggregate")
        expected = {cid: slot.rank for cid, slot in self.clients.items()}
        remaining = list(updates)
        while True:
            if len(remaining) < self.settings.min_clients:
                raise FederationError(
                    f"only {len(remaining)} valid client updates in this round, fewer than "
                    f"federation.min_clients = {self.settings.min_clients}"
                )
            try:
                result = strategy.aggregate(remaining, self.settings.options, self.spec, expected)
                return result, remaining
            except InvalidUpdateError as err:
                dropped.append({"client_id": err.client_id, "reason": err.reason})
                self.progress.log(f"dropped {err.client_id}: {err.reason}")
                logger.warning("dropping client %s: %s", err.client_id, err.reason)
                remaining = [u for u in remaining if u.client_id != err.client_id]

    def _drop(self, dropped: list[dict[str, str]], client_id: str, reason: str) -> None:
        dropped.append({"client_id": client_id, "reason": reason})
        self.progress.log(f"dropped {client_id}: {reason}")
        logger.warning("dropping client %s: %s", client_id, reason)

    def screen(
        self, replies: Sequence[TrainReply], chosen: Sequence[str], dropped: list[dict[str, str]]
    ) -> dict[str, Screened]:
        """The replies the server accepts, as they will be aggregated (see :mod:`hlora.trust`).

        A reply from a client not asked this round, a second reply for one client, or one that
        fails :func:`hlora.trust.screen_update` is dropped with its reason.
        """
        asked = set(chosen)
        counts: dict[str, int] = {}
        for r in replies:
            counts[r.update.client_id] = counts.get(r.update.client_id, 0) + 1
        out: dict[str, Screened] = {}
        for reply in replies:
            cid = reply.update.client_id
            if cid not in asked:
                self._drop(dropped, cid, "reply from a client not asked this round")
                continue
            if counts[cid] > 1:
                if cid not in {d["client_id"] for d in dropped}:
                    self._drop(dropped, cid, f"{counts[cid]} replies for one client")
                continue
            slot = self.clients[cid]
            try:
                out[cid] = screen_update(
                    reply.update,
                    accepted_examples=slot.num_examples,
                    scaling=self.settings.scaling,
                    rank=slot.rank,
                    spec=self.spec,
                    policy=self.settings.trust,
                )
            except InvalidUpdateError as err:
                self._drop(dropped, cid, err.reason)
        return out

    def run_round(self, state: ServerState, round_num: int) -> tuple[ServerState, dict[str, Any]]:
        """Run one round and return the new state and its metrics record."""
        start = time.perf_counter()
        opt = self.settings.server_optimizer  # None for the references and the paper's rule
        stepped = None if opt is None else opt.at_round(round_num, self.settings.rounds)
        chosen = self.sample(round_num)
        instructions = [self.instruction(state, cid, round_num) for cid in chosen]
        self.progress.start_round(round_num, len(instructions))
        sent = {i.client_id: instruction_bytes(i) for i in instructions}
        result: RoundResult = self.transport.run_round(instructions)
        dropped = [{"client_id": f.client_id, "reason": f.reason} for f in result.failures]
        for f in result.failures:
            self.progress.log(f"dropped {f.client_id}: {f.reason}")
        screened = self.screen(result.replies, chosen, dropped)
        replies = {r.update.client_id: r for r in result.replies}
        updates = [screened[c].update for c in chosen if c in screened]  # a fixed order
        new_state = replace(state, round_num=round_num)
        rejected = None
        if self.settings.mode == "local":
            if len(updates) < self.settings.min_clients:
                raise FederationError(
                    f"only {len(updates)} client updates in this round, fewer than "
                    f"federation.min_clients = {self.settings.min_clients}"
                )
            local = dict(state.local)
            for u in updates:
                local[u.client_id] = ClientState(dict(u.factors), dict(u.extras))
            new_state = replace(new_state, local=local)
            kept = updates
        else:
            aggregate, kept = self.aggregate(updates, dropped)
            if self.settings.freeze_head:  # whatever the clients sent back; a server step
                aggregate = replace(aggregate, extras=dict(state.extras))  # then moves it by 0
            if stepped is not None:
                aggregate, opt_state = self.server_step(state, aggregate, kept, stepped, round_num)
                new_state = replace(new_state, optimizer=opt_state)
            new_state = replace(new_state, global_update=aggregate, extras=dict(aggregate.extras))
            if aggregate.merge_into_base:
                new_state = replace(
                    new_state,
                    base_version=state.base_version + 1,
                    base_delta=_accumulate(state.base_delta, aggregate.layers),
                    global_update=replace(aggregate, layers={}),
                )
            rejected = nonfinite_state(
                new_state.global_update, new_state.extras, new_state.base_delta, new_state.optimizer
            )
            if rejected is not None:  # the old state stays; the round is recorded as rejected
                self.progress.log(f"round {round_num}: aggregate rejected: {rejected}")
                logger.error("round %d: aggregate rejected, state kept: %s", round_num, rejected)
                new_state = replace(state, round_num=round_num)
                kept = []
        final = round_num == self.settings.rounds
        calibration = None
        if final and self.settings.head_calibration != "none" and rejected is None:
            new_state, calibration = self.calibrate_head(new_state, round_num)
        kept_ids = {u.client_id for u in kept}
        clients_record = []
        for cid in chosen:
            reply = replies.get(cid)
            entry: dict[str, Any] = {
                "client_id": cid,
                "rank": self.clients[cid].rank,
                "num_examples": self.clients[cid].num_examples,
                "bytes_sent": sent[cid],
                "bytes_received": update_bytes(reply.update) if reply else 0,
                "loss": reply.loss if reply else None,
                "seconds": reply.seconds if reply else None,
                "accepted": cid in kept_ids,
            }
            if cid in screened and screened[cid].norm is not None:
                entry["update_norm"] = screened[cid].norm
                entry["clipped"] = screened[cid].clipped
            clients_record.append(entry)
        kept_order = [c for c in chosen if c in kept_ids]  # a fixed order: sums reproduce
        weights = {c: screened[c].update.num_examples for c in kept_order}  # accepted, capped
        losses = [
            replies[c].loss * weights[c] for c in kept_order if math.isfinite(replies[c].loss)
        ]
        weight = sum(weights.values())
        elapsed = time.perf_counter() - start
        new_state = replace(new_state, wall_time_s=state.wall_time_s + elapsed)
        record: dict[str, Any] = {
            "round": round_num,
            "strategy": self.settings.mode,
            "train_loss": sum(losses) / weight if weight else None,
            "clients": clients_record,
            "dropped": dropped,
            "bytes_sent": sum(e["bytes_sent"] for e in clients_record),
            "bytes_received": sum(e["bytes_received"] for e in clients_record),
            "round_time_s": elapsed,
        }
        if rejected is not None:
            record["aggregate_rejected"] = rejected
        if calibration is not None:
            record["head_calibration"] = calibration
        if instructions and instructions[0].schedule is not None:
            record["learning_rate"] = list(instructions[0].schedule.bounds())
        if stepped is not None:
            record["server_learning_rate"] = stepped.learning_rate
        spectrum = self.spectrum(new_state)
        if spectrum:
            record["energy_beyond_rank"] = spectrum
        if final or round_num % self.settings.eval_every == 0:
            eval_start = time.perf_counter()
            if self.settings.evaluation != FEDERATED_EVAL:
                record["eval"] = self.evaluate_global(new_state)
                truncations = self.settings.eval_truncations
                if truncations == "every" or (truncations == "final" and final):
                    by_rank = self.evaluate_truncations(new_state)
                    if by_rank:
                        record["eval_by_rank"] = by_rank
            if self.settings.evaluation != SERVER_EVAL:
                federated = self.evaluate_federated(new_state, round_num)
                record["federated_eval"] = federated
                overall = federated["overall"]
                if self.settings.evaluation == FEDERATED_EVAL and overall is not None:
                    record["eval"] = {k: overall[k] for k in overall if k not in _COUNT_KEYS}
            record["eval_time_s"] = time.perf_counter() - eval_start
        record["wall_time_s"] = new_state.wall_time_s
        return new_state, record

    def global_model(self, state: ServerState, round_num: int) -> list[EvalInstruction]:
        """The global model of ``state`` for every client, in factored form (never a dense
        matrix): what a federated evaluation and the head's calibration send."""
        g = state.global_update
        layers = {} if g is None else dict(g.layers)
        return [
            EvalInstruction(
                cid, round_num, layers, state.extras, state.base_version, state.base_delta
            )
            for cid in self.order
        ]

    def calibrate_head(
        self, state: ServerState, round_num: int
    ) -> tuple[ServerState, dict[str, Any]]:
        """Recalibrate the global head from the clients' feature moments (CCVR; see
        :mod:`hlora.calibration`), after the last round.

        Every client gets the global model and answers with its per-class moments; each reply is
        checked (:func:`hlora.calibration.check_moments`: shapes, finiteness, symmetric
        covariances, class counts adding up to the count accepted when it joined) and a bad one
        is left out with its reason. With fewer than ``min_clients`` good replies the head stays
        as aggregated.

        Returns:
            The state with the new head, and the record: ``method``, ``applied``, ``clients``,
            ``failed``, ``virtual_examples`` (when applied), ``reason`` (when not), and
            ``eval_uncalibrated`` (the server's evaluation of the head before, when the server
            evaluates).
        """
        s = self.settings
        record: dict[str, Any] = {"method": s.head_calibration}
        if s.evaluation != FEDERATED_EVAL:
            record["eval_uncalibrated"] = self.evaluate_global(state)
        transport: CalibratingTransport = self.transport  # type: ignore[assignment]
        g = state.global_update
        replies, failures = transport.feature_moments(self.global_model(state, round_num))
        failed = [{"client_id": f.client_id, "reason": f.reason} for f in failures]
        by_client = {r.client_id: r for r in replies}
        dim = self.spec.extras[f"{s.head_linear}.weight"][1]
        parts = []
        for cid in self.order:  # a fixed order: the pooled moments reproduce
            reply = by_client.get(cid)
            if reply is None:
                continue
            reason = check_moments(reply.moments, s.num_labels, dim, self.clients[cid].num_examples)
            if reason is not None:
                failed.append({"client_id": cid, "reason": reason})
                continue
            parts.append(reply.moments)
        for f in failed:
            self.progress.log(f"{f['client_id']} left out of the head's calibration: {f['reason']}")
        record.update({"clients": len(parts), "failed": failed})
        if len(parts) < s.min_clients:
            record.update(
                applied=False,
                reason=f"{len(parts)} clients sent usable moments, fewer than "
                f"federation.min_clients = {s.min_clients}: the head stays as aggregated",
            )
            logger.warning("head calibration skipped: %s", record["reason"])
            return state, record
        head, virtual = calibrated_head(
            parts,
            state.extras,
            s.head_linear,
            per_example=s.calibration_samples,
            seed=_seed(s.seed, round_num, 11),
        )
        if not all(bool(torch.isfinite(t).all()) for t in head.values()):
            record.update(applied=False, reason="the refitted head is not finite: not taken")
            return state, record
        record.update(applied=True, virtual_examples=virtual)
        new_state = replace(state, extras=head)
        if g is not None:
            new_state = replace(new_state, global_update=replace(g, extras=head))
        return new_state, record

    def server_step(
        self,
        state: ServerState,
        aggregate: GlobalUpdate,
        kept: Sequence[ClientUpdate],
        opt: ServerOptimizer,
        round_num: int,
    ) -> tuple[GlobalUpdate, dict[str, Tensor]]:
        """The step of ``opt`` (the server optimizer at this round's point of its learning-rate
        schedule) from the previous global update, ordered as round ``round_num``'s clients
        started from it (:meth:`clients_start`; see ``server_opt``)."""
        if self.strategy is None:
            raise FederationError("no server optimizer in this run")
        total = sum(u.num_examples for u in kept)
        profile = rank_profile([u.rank for u in kept], [u.num_examples / total for u in kept])
        previous = state.global_update
        if previous is not None and previous.merge_into_base:
            previous = None
        if previous is not None:  # the order whose leading r_k components client k trained
            previous = self.clients_start(previous, round_num)
        space = opt.space or self.strategy.optimizer_space
        if space in SERVER_FACTOR_SPACES and opt.global_rank is None:
            opt = replace(opt, global_rank=max(c.rank for c in self.clients.values()))
        steps = None
        if space == "factor-steps":  # the clients' mean factors, as zero-padding averages them
            expected = {u.client_id: self.clients[u.client_id].rank for u in kept}
            steps = get_strategy("zeropad").aggregate(
                kept, self.settings.options, self.spec, expected
            )
        return server_step(
            opt,
            space,
            previous,
            state.extras,
            aggregate,
            profile,
            state.optimizer,
            self.settings.options.factor_split,
            steps,
        )

    def clients_start(self, update: GlobalUpdate, round_num: int) -> GlobalUpdate:
        """``update`` (sorted by importance) in the order round ``round_num``'s clients take it
        from: a client of rank ``r_k`` trains the leading ``r_k`` components of the result and,
        under ``server.residual = "frozen"``, holds the rest frozen. ``server.window =
        "rolling"`` rolls each layer's components by ``round_num``, so that over ``R`` rounds
        (``R``: the update's rank) every component is trained by every client; the server's
        step reads the clients' factors in the same order."""
        if self.settings.window == "rolling":
            return update.rolled(round_num)
        return update

    def spectrum(self, state: ServerState) -> dict[str, float]:
        """Share of the whole update's energy beyond each client rank (mean over layers)."""
        layers: Mapping[str, LowRankDelta] | None = state.base_delta
        if layers is None and state.global_update is not None:
            layers = state.global_update.layers
        if not layers:
            return {}
        return energy_beyond(layers, {c.rank for c in self.clients.values()})

    # -- evaluation ----------------------------------------------------------------------

    def evaluate_global(self, state: ServerState) -> dict[str, float]:
        """Metrics of the global model (``local``: the mean over the clients' own models)."""
        if self.settings.mode == "local":
            per_client = []
            for cid in self.order:
                own = state.local.get(cid)
                if own is None:
                    continue
                deltas = {n: f.low_rank(self.settings.scaling) for n, f in own.factors.items()}
                per_client.append(
                    self.evaluate(deltas, own.extras, base_version=0, base_delta=None)
                )
            keys = per_client[0].keys()
            return {k: sum(m[k] for m in per_client) / len(per_client) for k in keys}
        g = state.global_update
        layers: Mapping[str, LowRankDelta] = {} if g is None else g.layers
        return self.evaluate(
            layers, state.extras, base_version=state.base_version, base_delta=state.base_delta
        )

    def evaluate_truncations(self, state: ServerState) -> dict[str, dict[str, float]]:
        """Metrics of each client rank's truncation of the global update (not for flora/local)."""
        g = state.global_update
        if g is None or g.merge_into_base or self.settings.mode == "local":
            return {}
        out = {}
        for rank in sorted({c.rank for c in self.clients.values()}):
            factors = g.client_factors(rank, self.settings.scaling)
            deltas = {n: f.low_rank(self.settings.scaling) for n, f in factors.items()}
            out[str(rank)] = self.evaluate(deltas, state.extras, base_version=0, base_delta=None)
        return out

    def evaluate_federated(self, state: ServerState, round_num: int) -> dict[str, Any]:
        """The global model evaluated by the clients on their own held-out data.

        Every client gets the global update in its factored form (never a dense matrix); what
        comes back are confusion counts and loss sums, which add up to those of the union of
        the clients' held-out sets: ``overall`` is that union's metrics (each client weighted by
        its held-out examples, the loss by its tokens or examples), ``clients`` each one's own.

        Returns:
            ``{"overall": metrics + num_examples + confusion (None when no client answered),
            "clients": {client_id: metrics + num_examples}, "failed": [{client_id, reason}]}``.
        """
        transport: EvaluatingTransport = self.transport  # type: ignore[assignment]
        replies, failures = transport.evaluate_round(self.global_model(state, round_num))
        names = self.settings.metric_names
        by_client = {r.client_id: r for r in replies}
        clients: dict[str, Any] = {}
        total: EvalCounts | None = None
        for cid in self.order:  # a fixed order: the loss sum reproduces
            reply = by_client.get(cid)
            if reply is None:
                continue
            clients[cid] = {**metrics_of(reply.counts, names), "num_examples": reply.num_examples}
            total = reply.counts if total is None else total + reply.counts
        overall = None
        if total is not None:
            overall = {
                **metrics_of(total, names),
                "num_examples": sum(r.num_examples for r in replies),
                "confusion": [list(row) for row in total.confusion],
            }
        for f in failures:
            self.progress.log(f"{f.client_id} did not evaluate: {f.reason}")
        return {
            "overall": overall,
            "clients": clients,
            "failed": [{"client_id": f.client_id, "reason": f.reason} for f in failures],
        }

    # -- the loop ------------------------------------------------------------------------

    def run(self, state: ServerState | None = None) -> ServerState:
        """Run the remaining rounds from ``state`` (None: from the start)."""
        state = state or self.initial_state()
        with self.progress:
            for round_num in range(state.round_num + 1, self.settings.rounds + 1):
                state, record = self.run_round(state, round_num)
                self.metrics.append(record)
                save_state(self.checkpoint_path, state, self.fingerprint)
                self.progress.end_round(record)
        return state


_COUNT_KEYS = ("num_examples", "confusion")
"""Keys of a federated evaluation's ``overall`` that are counts, not metrics."""


def _accumulate(
    base: Mapping[str, LowRankDelta] | None, increment: Mapping[str, LowRankDelta]
) -> dict[str, LowRankDelta]:
    """Concatenate a flora round's increment onto the cumulative base update (exact).

    Once the stacked rank exceeds ``min(out, in)`` the factors are re-factored exactly by the
    QR-based SVD into ``min(out, in)`` components, so the cumulative update never takes more
    room than the dense matrix.
    """
    out = {}
    for name, inc in increment.items():
        left = inc.left * inc.scale if inc.scale != 1.0 else inc.left
        right = inc.right
        if base is not None:
            left = torch.cat([base[name].left, left], dim=-1)  # (out, R_total)
            right = torch.cat([base[name].right, right], dim=-2)  # (R_total, in)
        if left.shape[-1] > min(left.shape[-2], right.shape[-1]):
            left, right = split_singular_values(*qr_svd(left, right))
        out[name] = LowRankDelta(left=left, right=right)
    return out
