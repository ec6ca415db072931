"""A probe of SCAFFOLD-style control variates in the space of the update ``dW`` (docs/RESULTS.md).

Not a feature of hlora: a measurement, to decide whether one is worth building. It runs a whole
federation like ``hlora run`` (in-process engine), with every client's gradient corrected as
SCAFFOLD does (Karimireddy et al., 2020): a client ``k`` trains on ``g_k(y) - c_k + c``, where
``c_k`` is the mean gradient of its own loss over its last local training and
``c = sum_k (n_k / n) c_k`` the federation's.

The control variates live where every strategy's clients agree, whatever their ranks: in the
space of each adapted layer's dense update ``dW (out, in)``. A client holds ``dW = s B A``, so
the correction ``C = c - c_k (out, in)`` reaches its factors as the gradient of ``<C, s B A>``:
``s C A^T`` for ``B (out, r)`` and ``s B^T C`` for ``A (r, in)``. The head's control variates
are in its own parameter space. ``c_k`` of a layer is the gradient of the loss with respect to
a zero dense matrix added to the layer's output (``x P^T``): ``sum_t delta_t^T x_t`` per step,
the mean over the client's steps (the layer's input as it reaches the frozen weight: LoRA's
own dropout is not applied to it). The state is dense (``(out, in)`` per layer per client): sized
for MiniLM, not for LLM shapes. Clients start at ``c_k = 0`` (round 1 is plain training).

    python experiments/scaffold_probe.py OUT_FOLDER [config.toml] --set KEY=VALUE ...
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from round_anatomy import add_config_arguments, config_from
from torch import Tensor

import hlora.federation as fed_module
from hlora.protocol import TrainInstruction, TrainReply
from hlora.runtime import ModelRuntime

Variates = dict[str, Tensor]


class ControlVariates:
    """Every client's ``c_k`` and the federation's ``c`` (dense; layer or head name -> tensor)."""

    def __init__(self, federation_examples: int) -> None:
        self.federation_examples = federation_examples  # n: every client's examples
        self.clients: dict[str, Variates] = {}
        self.mean: Variates = {}
        self.pending: list[tuple[str, int, Variates]] = []
        self.round = 0

    def start(self, round_num: int) -> None:
        """Applies the last round's reports once a new round starts (``c`` is fixed in a round)."""
        if round_num != self.round:
            for report in self.pending:
                self.report(*report)
            self.pending = []
            self.round = round_num

    def correction(self, client_id: str) -> Variates:
        """``c - c_k`` for one client (empty before any client reported)."""
        own = self.clients.get(client_id, {})
        return {n: c - own.get(n, torch.zeros_like(c)) for n, c in self.mean.items()}

    def report(self, client_id: str, examples: int, variates: Variates) -> None:
        """Replaces a client's ``c_k``; ``c`` weighs each client ``n_k / n``."""
        old = self.clients.get(client_id, {})
        weight = examples / self.federation_examples
        for name, value in variates.items():
            previous = old.get(name, torch.zeros_like(value))
            self.mean[name] = self.mean.get(name, torch.zeros_like(value)) + weight * (
                value - previous
            )
        self.clients[client_id] = variates


def correction_of_a(c: Tensor, b: Tensor, scale: float) -> Tensor:
    """The gradient of ``<c, s B A>`` with respect to ``A``: ``s B^T c``, ``(r, in)``, float32.

    Args:
        c: The correction ``c - c_k`` of one layer, ``(out, in)``.
        b: The client's ``B``, ``(out, r)``.
        scale: The LoRA scaling ``s``.
    """
    return scale * b.detach().float().T @ c


def correction_of_b(c: Tensor, a: Tensor, scale: float) -> Tensor:
    """The gradient of ``<c, s B A>`` with respect to ``B``: ``s c A^T``, ``(out, r)``, float32.

    Args:
        c: The correction ``c - c_k`` of one layer, ``(out, in)``.
        a: The client's ``A``, ``(r, in)``.
        scale: The LoRA scaling ``s``.
    """
    return scale * c @ a.detach().float().T


def scaffold_train(
    original: Callable[[ModelRuntime, TrainInstruction, Any], TrainReply],
    state: ControlVariates,
) -> Callable[[ModelRuntime, TrainInstruction, Any], TrainReply]:
    """``ModelRuntime.train_client`` with SCAFFOLD's corrections and ``c_k`` measured."""

    def train(self: ModelRuntime, instruction: TrainInstruction, features: Any) -> TrainReply:
        bank = self.bank
        rank = instruction.rank
        state.start(instruction.round_num)
        correction = state.correction(instruction.client_id)
        layers = bank._layers  # a probe: the bank's adapted modules
        factors = bank._factor_parameters(rank)
        head = bank._head_parameters(rank)
        handles: list[Any] = []
        probes: dict[str, Tensor] = {}
        head_sums: dict[str, Tensor] = {}
        scale = instruction.scaling
        for name, module in layers.items():
            a, b = factors[name]
            probe = torch.zeros(b.shape[0], a.shape[1], device=a.device, requires_grad=True)
            probes[name] = probe

            def add_probe(_m: Any, args: tuple[Any, ...], out: Tensor, p: Tensor = probe) -> Tensor:
                return out + F.linear(args[0].detach(), p.to(out.dtype))

            handles.append(module.register_forward_hook(add_probe))
            if name in correction:
                c = correction[name].to(a.device)

                def fix_b(g: Tensor, c: Tensor = c, a: Tensor = a) -> Tensor:
                    return g + correction_of_b(c, a, scale).to(g.dtype)

                def fix_a(g: Tensor, c: Tensor = c, b: Tensor = b) -> Tensor:
                    return g + correction_of_a(c, b, scale).to(g.dtype)

                handles.append(b.register_hook(fix_b))
                handles.append(a.register_hook(fix_a))
        for name, param in head.items():
            head_sums[name] = torch.zeros_like(param, dtype=torch.float32)
            c_head = correction.get(f"head:{name}")

            def fix_head(g: Tensor, n: str = name, c: Tensor | None = c_head) -> Tensor:
                head_sums[n] += g.float()
                return g if c is None else g + c.to(g.dtype)

            handles.append(param.register_hook(fix_head))
        try:
            reply = original(self, instruction, features)
        finally:
            for handle in handles:
                handle.remove()
        steps = max(reply.steps, 1)
        variates: Variates = {}
        for name, probe in probes.items():
            grad = probe.grad
            variates[name] = (grad / steps) if grad is not None else torch.zeros_like(probe)
        for name, total in head_sums.items():
            variates[f"head:{name}"] = total / steps
        state.pending.append((instruction.client_id, reply.update.num_examples, variates))
        norm_c = sum(float(v.pow(2).sum()) for k, v in variates.items() if ":" not in k) ** 0.5
        norm_corr = sum(float(v.pow(2).sum()) for k, v in correction.items() if ":" not in k) ** 0.5
        print(
            f"round {instruction.round_num} {instruction.client_id}: |c_k| {norm_c:.3e} "
            f"|c - c_k| {norm_corr:.3e} loss {reply.loss:.3f}",
            flush=True,
        )
        return reply

    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the run folder to write")
    add_config_arguments(parser)
    args = parser.parse_args()
    config = config_from(args)
    build = fed_module.build_federation

    def build_and_patch(cfg: Any) -> Any:  # n (every client's examples) needs the partition
        fed = build(cfg)
        state = ControlVariates(sum(slot.num_examples for slot in fed.clients))
        ModelRuntime.train_client = scaffold_train(  # type: ignore[method-assign]
            ModelRuntime.train_client, state
        )
        return fed

    fed_module.build_federation = build_and_patch  # type: ignore[assignment]
    result = fed_module.run(config, run_dir=args.out, progress=False)
    print(result)


if __name__ == "__main__":
    main()
