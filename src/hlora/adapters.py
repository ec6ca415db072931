"""LoRA adapters of several ranks on one shared, frozen backbone (the only hlora module using peft).

A LoRA layer adds a low-rank update to a frozen linear layer ``W`` of shape (out, in)::

    y = x @ (W + s * B @ A).T + bias        A: (r, in),  B: (out, r)

**Scaling rule.** hlora uses ONE constant scaling ``s`` shared by every client whatever its rank
``r``. In peft the scaling is ``lora_alpha / r``, so the rank-``r`` adapter is created with
``lora_alpha = s * r``; the server's aggregation receives ``s`` for every client. (The original
heterogeneous-rank papers kept ``lora_alpha`` fixed while ``r`` varied, which silently scales the
updates of low-rank clients up and of high-rank clients down; hlora does not.)

**Memory.** A :class:`LoraBank` holds ONE frozen base model for all simulated clients. It carries
one peft adapter per distinct rank (named ``"r{rank}"``) plus, per rank, a copy of a sequence
classifier's head (peft's ``modules_to_save``, trained and aggregated like the factors; a causal
LM keeps its language-modelling head frozen and has none). Clients
of the same rank share that slot: the caller writes a client's factors in with
:meth:`LoraBank.set_factors` before it trains and reads them back with :meth:`LoraBank.get_factors`
after. Memory therefore grows with the number of distinct ranks (by the small adapter and head
sizes), never with the number of clients.

**Names.** Factors, deltas and extras are keyed by canonical names that do not depend on peft: the
adapted layer's module path in the plain transformers model (e.g.
``"bert.encoder.layer.0.attention.self.query"``) and, for the head, the parameter path (e.g.
``"classifier.weight"``). peft's own keys (``...lora_A.r8.weight``, ``modules_to_save``) stay inside
this module.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME, ModulesToSaveWrapper
from safetensors.torch import save_file

from hlora.aggregation import LowRankDelta
from hlora.errors import ModelError
from hlora.models import Backbone
from hlora.quantization import is_quantized
from hlora.tasktypes import CAUSAL_LM

__all__ = ["LayerShape", "LoraBank"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 8


@dataclass(frozen=True)
class LayerShape:
    """Shape of an adapted linear layer's weight ``W`` of shape (out_features, in_features)."""

    out_features: int
    in_features: int


def _adapter_name(rank: int) -> str:
    return f"r{rank}"


def _listing(names: Iterable[str], limit: int = _MAX_LISTED) -> str:
    items = list(names)
    shown = ", ".join(f"'{name}'" for name in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _matches(module_name: str, target: str) -> bool:
    # peft's rule for a list of target names: the full module name or its last dotted parts.
    return module_name == target or module_name.endswith("." + target)


class LoraBank:
    """One frozen base model carrying one peft LoRA adapter per distinct rank.

    Adapter names are ``"r{rank}"``. Clients of the same rank share that adapter slot: the caller
    loads a client's factors into it before the client trains and reads them back after.

    The backbone's model is wrapped in place (peft injects LoRA layers into it): use one bank
    per loaded backbone.

    Attributes:
        model: The ``peft.PeftModel``; call it like the backbone's model (``input_ids``,
            ``attention_mask`` of shape (batch, seq_len) -> output with ``logits`` of shape
            (batch, num_labels)). Its forward uses the adapter last given to :meth:`activate`.
        ranks: The distinct ranks, ascending.
        scaling: The scaling ``s`` shared by all ranks (peft ``lora_alpha = s * r``).
    """

    model: PeftModel
    ranks: tuple[int, ...]
    scaling: float

    def __init__(
        self,
        backbone: Backbone,
        ranks: Iterable[int],
        *,
        scaling: float,
        target_modules: Sequence[str] | None = None,
        dropout: float = 0.0,
    ) -> None:
        """Wraps ``backbone.model`` with one LoRA adapter per distinct rank.

        Args:
            backbone: The backbone; its model is modified in place.
            ranks: Client ranks (duplicates are merged); each must be >= 1 and at most
                ``min(out_features, in_features)`` of every adapted layer.
            scaling: The LoRA scaling ``s`` > 0 shared by all ranks.
            target_modules: Names of the linear layers to adapt (a module path or its last
                dotted parts, e.g. ``"query"``); defaults to ``backbone.default_target_modules``.
            dropout: LoRA dropout probability on the adapter input, in [0, 1).

        Raises:
            ModelError: Invalid ranks, scaling, dropout or target modules.
        """
        self.ranks = self._check_ranks(ranks)
        if not math.isfinite(scaling) or scaling <= 0:
            raise ModelError(f"LoRA scaling must be a finite number > 0, got {scaling!r}")
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.scaling = float(scaling)
        self._backbone_name = backbone.name
        base = backbone.model
        if any(
            isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)) for module in base.modules()
        ):
            raise ModelError(
                f"model '{backbone.name}' already carries peft adapters (a LoraBank wraps its "
                "backbone in place): load a fresh backbone for each LoraBank"
            )
        if target_modules is None:
            targets = tuple(backbone.default_target_modules)
            if not targets:
                available = _listing(_linear_leaf_names(base))
                raise ModelError(
                    f"hlora has no default LoRA target modules for model '{backbone.name}': pass "
                    f"target_modules, e.g. some of its Linear layers {available}"
                )
        else:
            targets = () if isinstance(target_modules, str) else tuple(target_modules)
            if not targets:
                raise ModelError(
                    "target_modules must be a non-empty list of module names, got "
                    f"{target_modules!r}"
                )
        self._check_targets(base, backbone.name, targets)

        peft_task = TaskType.CAUSAL_LM if backbone.task_type == CAUSAL_LM else TaskType.SEQ_CLS

        def config(rank: int) -> LoraConfig:
            return LoraConfig(
                task_type=peft_task,
                r=rank,
                # peft's scaling is lora_alpha / r; it accepts a float alpha.
                lora_alpha=self.scaling * rank,  # type: ignore[arg-type]
                lora_dropout=dropout,
                target_modules=list(targets),
                init_lora_weights=True,
                bias="none",
            )

        first, *others = self.ranks
        with warnings.catch_warnings():
            # peft probes a transformers attribute that transformers 5 deprecates.
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
            )
            self.model = get_peft_model(base, config(first), adapter_name=_adapter_name(first))
            for rank in others:
                self.model.add_adapter(_adapter_name(rank), config(rank))
        inner = self.model.get_base_model()
        assert isinstance(inner, torch.nn.Module)
        self._inner: torch.nn.Module = inner
        self._layers: dict[str, LoraLayer] = {
            name: module
            for name, module in self._inner.named_modules()
            if isinstance(module, LoraLayer)
        }
        self._heads: dict[str, ModulesToSaveWrapper] = {
            name: module
            for name, module in self._inner.named_modules()
            if isinstance(module, ModulesToSaveWrapper)
        }
        self._extra_names = tuple(
            f"{head}.{param}"
            for head, wrapper in self._heads.items()
            for param, _ in _original_module(wrapper).named_parameters()
        )
        self._active: int = first
        self.activate(first)
        logger.info(
            "LoraBank on '%s': ranks %s, scaling %g, %d adapted layers (%s), head %s",
            backbone.name,
            list(self.ranks),
            self.scaling,
            len(self._layers),
            ", ".join(targets),
            list(self._extra_names),
        )

    # ------------------------------------------------------------------ validation helpers

    @staticmethod
    def _check_ranks(ranks: Iterable[int]) -> tuple[int, ...]:
        checked: set[int] = set()
        for rank in ranks:
            if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
                raise ModelError(f"LoRA rank {rank!r} is invalid: ranks must be integers >= 1")
            checked.add(int(rank))
        if not checked:
            raise ModelError("a LoraBank needs at least one LoRA rank")
        return tuple(sorted(checked))

    def _check_targets(self, base: torch.nn.Module, name: str, targets: tuple[str, ...]) -> None:
        modules = dict(base.named_modules())
        matched: dict[str, torch.nn.Linear] = {}
        for target in targets:
            hits = {key: module for key, module in modules.items() if _matches(key, target)}
            if not hits:
                raise ModelError(
                    f"LoRA target module '{target}' matches no layer of model '{name}'; its "
                    f"Linear layers are named {_listing(_linear_leaf_names(base))}"
                )
            for key, module in hits.items():
                if not isinstance(module, torch.nn.Linear):
                    raise ModelError(
                        f"LoRA target layer '{key}' of model '{name}' is a "
                        f"{type(module).__name__}; only torch.nn.Linear layers can be adapted"
                    )
                matched[key] = module
        key, layer = min(
            matched.items(), key=lambda item: min(item[1].out_features, item[1].in_features)
        )
        limit = min(layer.out_features, layer.in_features)
        too_large = [rank for rank in self.ranks if rank > limit]
        if too_large:
            raise ModelError(
                f"LoRA rank {too_large[0]} is too large for layer '{key}' of model '{name}' "
                f"(weight {layer.out_features}x{layer.in_features}): ranks must be at most "
                f"min(out_features, in_features) = {limit}"
            )

    def _name(self, rank: int) -> str:
        if rank not in self.ranks:
            raise ModelError(
                f"rank {rank!r} has no adapter in this LoraBank; its ranks are {list(self.ranks)}"
            )
        return _adapter_name(rank)

    def _check_layer_names(self, names: Iterable[str], what: str, *, complete: bool) -> None:
        given = list(names)
        unknown = [name for name in given if name not in self._layers]
        if unknown:
            raise ModelError(
                f"{what}: unknown layer(s) {_listing(unknown)}; the adapted layers are "
                f"{_listing(self._layers)}"
            )
        if complete:
            missing = [name for name in self._layers if name not in set(given)]
            if missing:
                raise ModelError(f"{what}: missing layer(s) {_listing(missing)}")

    def _check_factors(
        self, rank: int, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        what = f"factors of rank {rank}"
        self._check_layer_names(factors, what, complete=True)
        shapes = self.layer_shapes()
        for name, pair in factors.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ModelError(f"{what}: layer '{name}' must map to a pair (A, B) of tensors")
            a, b = pair
            shape = shapes[name]
            want_a = (rank, shape.in_features)
            want_b = (shape.out_features, rank)
            if not (
                isinstance(a, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and tuple(a.shape) == want_a
                and tuple(b.shape) == want_b
            ):
                got_a = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                got_b = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ModelError(
                    f"{what}: layer '{name}' needs A of shape {want_a} and B of shape {want_b}, "
                    f"got A {got_a} and B {got_b}"
                )

    def _check_deltas(self, deltas: Mapping[str, torch.Tensor], what: str) -> None:
        self._check_layer_names(deltas, what, complete=False)
        shapes = self.layer_shapes()
        for name, delta in deltas.items():
            shape = shapes[name]
            want = (shape.out_features, shape.in_features)
            if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != want:
                got = (
                    tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
                )
                raise ModelError(f"{what}: layer '{name}' needs a delta of shape {want}, got {got}")

    def _check_extras(self, extras: Mapping[str, torch.Tensor], what: str) -> None:
        reference = self._original_head_parameters()
        unknown = [name for name in extras if name not in reference]
        missing = [name for name in reference if name not in extras]
        if unknown or missing:
            problem = f"unknown {_listing(unknown)}" if unknown else f"missing {_listing(missing)}"
            raise ModelError(f"{what}: {problem}; the extra tensors are {_listing(reference)}")
        for name, value in extras.items():
            want = tuple(reference[name].shape)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
                got = (
                    tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                )
                raise ModelError(f"{what}: '{name}' needs shape {want}, got {got}")

    # ------------------------------------------------------------------ parameter access

    def _factor_parameters(
        self, rank: int
    ) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        name = self._name(rank)
        return {
            layer: (_weight(module.lora_A[name]), _weight(module.lora_B[name]))
            for layer, module in self._layers.items()
        }

    def _head_parameters(self, rank: int) -> dict[str, torch.nn.Parameter]:
        name = self._name(rank)
        return {
            f"{head}.{param}": value
            for head, wrapper in self._heads.items()
            for param, value in _module(wrapper.modules_to_save, name).named_parameters()
        }

    def _original_head_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {
            f"{head}.{param}": value
            for head, wrapper in self._heads.items()
            for param, value in _original_module(wrapper).named_parameters()
        }

    # ------------------------------------------------------------------ public API

    def layer_names(self) -> tuple[str, ...]:
        """Canonical names of the adapted layers, in module order.

        Returns:
            Module paths in the plain transformers model, e.g.
            ``"bert.encoder.layer.0.attention.self.query"``.
        """
        return tuple(self._layers)

    def layer_shapes(self) -> dict[str, LayerShape]:
        """Weight shape (out_features, in_features) of each adapted layer, by canonical name."""
        shapes = {}
        for name, module in self._layers.items():
            base = module.get_base_layer()  # a 4-bit weight is packed: ask the layer, not it
            assert isinstance(base, torch.nn.Linear)  # bitsandbytes' Linear4bit is one too
            shapes[name] = LayerShape(out_features=base.out_features, in_features=base.in_features)
        return shapes

    @property
    def quantized(self) -> bool:
        """Whether the frozen base is 4-bit (``model.quantization``): it cannot take a dense
        update, so it is evaluated with the update in factored form (:meth:`evaluating`)."""
        return any(is_quantized(_base_weight(layer)) for layer in self._layers.values())

    def head_linear(self, rank: int | None = None) -> tuple[str, torch.nn.Linear]:
        """The head's final linear layer, the one that writes the logits: its canonical prefix
        among :meth:`extra_names` (``"classifier"`` for BERT, ``"classifier.out_proj"`` for
        RoBERTa, ``"score"`` for Llama) and its module: in the original head, which holds the
        head while :meth:`evaluating` (``rank`` None), or in the copy that rank ``rank``'s
        adapter trains.

        Raises:
            ModelError: A model without a head (a causal LM), or a head whose last layer is not
                a ``torch.nn.Linear``.
        """
        last: tuple[str, torch.nn.Linear] | None = None
        for head, wrapper in self._heads.items():
            if rank is None:
                holder = _original_module(wrapper)
            else:
                holder = _module(wrapper.modules_to_save, self._name(rank))
            for name, module in holder.named_modules():
                if isinstance(module, torch.nn.Linear):
                    last = (f"{head}.{name}" if name else head, module)
        if last is None:
            raise ModelError("this model has no linear classifier head")
        return last

    def extra_names(self) -> tuple[str, ...]:
        """Canonical names of the other trainable tensors: the head's parameters.

        Returns:
            E.g. ``("classifier.weight", "classifier.bias")`` for BERT, ``("score.weight",)``
            for Llama.
        """
        return self._extra_names

    @property
    def active_rank(self) -> int:
        """The rank whose adapter is active (:meth:`activate`)."""
        return self._active

    def activate(self, rank: int) -> None:
        """Makes the rank's adapter (and its head copy) the active and only trainable tensors.

        Args:
            rank: One of :attr:`ranks`.
        """
        name = self._name(rank)
        self.model.set_adapter(name)
        self._active = rank
        self._apply_requires_grad(rank)

    def _apply_requires_grad(self, rank: int) -> None:
        trainable = {id(param) for param in self.trainable_parameters(rank)}
        for param in self.model.parameters():
            param.requires_grad_(id(param) in trainable)

    def trainable_parameters(self, rank: int) -> list[torch.nn.Parameter]:
        """The parameters a rank-``rank`` client trains: every layer's A and B, then the head.

        The same Parameter objects stay in place across :meth:`set_factors` and
        :meth:`set_extras`, so an optimizer built over them stays valid.
        """
        factors, head = self.parameter_groups(rank)
        return factors + head

    def parameter_groups(
        self, rank: int
    ) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """:meth:`trainable_parameters` in two lists: every layer's A and B, and the head."""
        factors: list[torch.nn.Parameter] = []
        for a, b in self._factor_parameters(rank).values():
            factors.extend((a, b))
        return factors, list(self._head_parameters(rank).values())

    def get_factors(self, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Reads the rank's adapter.

        Returns:
            Canonical layer name -> (A of shape (rank, in), B of shape (out, rank)): detached
            float32 clones.
        """
        return {
            layer: (
                a.detach().to(torch.float32, copy=True),
                b.detach().to(torch.float32, copy=True),
            )
            for layer, (a, b) in self._factor_parameters(rank).items()
        }

    def set_factors(
        self, rank: int, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Copies a client's factors into the rank's adapter slot.

        Args:
            rank: One of :attr:`ranks`.
            factors: Canonical layer name -> (A (rank, in), B (out, rank)) for every adapted layer.

        Raises:
            ModelError: Missing or unknown layers, or wrong shapes.
        """
        self._name(rank)
        self._check_factors(rank, factors)
        params = self._factor_parameters(rank)
        with torch.no_grad():
            for layer, (a, b) in factors.items():
                param_a, param_b = params[layer]
                param_a.copy_(a)
                param_b.copy_(b)

    def init_factors(self, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Fresh factors initialised like peft's default LoRA init; not written into the model.

        A is Kaiming-uniform (``a = sqrt(5)``, as ``torch.nn.Linear``), B is zero, so the update
        ``s * B @ A`` starts at zero. Deterministic from ``seed`` (global RNG untouched).

        Returns:
            Canonical layer name -> (A (rank, in), B (out, rank)), float32.
        """
        self._name(rank)
        generator = torch.Generator().manual_seed(seed)
        factors = {}
        for layer, shape in self.layer_shapes().items():
            a = torch.empty(rank, shape.in_features, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            b = torch.zeros(shape.out_features, rank, dtype=torch.float32)
            factors[layer] = (a, b)
        return factors

    def get_extras(self, rank: int) -> dict[str, torch.Tensor]:
        """Reads the rank's copy of the head.

        Returns:
            Canonical parameter name (see :meth:`extra_names`) -> detached float32 clone.
        """
        return {
            name: value.detach().to(torch.float32, copy=True)
            for name, value in self._head_parameters(rank).items()
        }

    def set_extras(self, rank: int, extras: Mapping[str, torch.Tensor]) -> None:
        """Copies head parameters into the rank's head copy.

        Args:
            rank: One of :attr:`ranks`.
            extras: Canonical parameter name -> tensor, for every name of :meth:`extra_names`.

        Raises:
            ModelError: Missing or unknown names, or wrong shapes.
        """
        params = self._head_parameters(rank)
        self._check_extras(extras, f"extras of rank {rank}")
        with torch.no_grad():
            for name, value in extras.items():
                params[name].copy_(value)

    def base_weight(self, layer: str) -> torch.Tensor:
        """The frozen base weight of an adapted layer.

        Returns:
            A detached view of shape (out, in) sharing the model's storage: do not modify it.
        """
        self._check_layer_names([layer], "base_weight", complete=False)
        return _base_weight(self._layers[layer]).detach()

    def add_to_base(self, deltas: Mapping[str, torch.Tensor]) -> None:
        """Adds updates to the frozen base weights in place: ``W += delta`` (FLoRA-style merge).

        This changes the base model shared by every rank.

        Args:
            deltas: Canonical layer name -> delta of shape (out, in); any subset of the layers.
        """
        self._check_deltas(deltas, "add_to_base")
        self._check_dense_base("add_to_base")
        with torch.no_grad():
            for layer, delta in deltas.items():
                weight = _base_weight(self._layers[layer])
                weight.add_(delta.to(device=weight.device, dtype=weight.dtype))

    @contextmanager
    def evaluating_dense(
        self, deltas: Mapping[str, torch.Tensor], extras: Mapping[str, torch.Tensor]
    ) -> Iterator[torch.nn.Module]:
        """Temporarily evaluates the base model with dense updates merged and a given head.

        Inside the block, the base weights are ``W + delta``, every adapter is disabled, the
        head holds ``extras`` and the model is in eval mode. Afterwards the weights, the head,
        the train/eval modes and the active adapter are restored exactly (from copies, not by
        subtraction), also when the block raises.

        Args:
            deltas: Canonical layer name -> delta of shape (out, in); any subset of the layers.
            extras: Canonical head parameter name -> tensor, for every name of
                :meth:`extra_names`.

        Yields:
            The transformers model: call it with ``input_ids``/``attention_mask`` of shape
            (batch, seq_len); its output's ``logits`` have shape (batch, num_labels).
        """
        self._check_deltas(deltas, "evaluating_dense")
        self._check_dense_base("evaluating_dense")
        self._check_extras(extras, "evaluating_dense extras")
        weights = {layer: _base_weight(self._layers[layer]) for layer in deltas}
        saved_weights = {layer: weight.detach().clone() for layer, weight in weights.items()}
        try:
            with torch.no_grad():
                for layer, delta in deltas.items():
                    weight = weights[layer]
                    weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
            with self._evaluating_head(extras) as model:
                yield model
        finally:
            with torch.no_grad():
                for layer, saved in saved_weights.items():
                    weights[layer].copy_(saved)

    @contextmanager
    def evaluating_factored(
        self, deltas: Mapping[str, LowRankDelta], extras: Mapping[str, torch.Tensor]
    ) -> Iterator[torch.nn.Module]:
        """Like :meth:`evaluating_dense`, with each update applied in factored form: the base
        weights are left as they are, and each adapted layer's output gets
        ``scale * (x @ right.T) @ left.T`` added (a forward hook; no ``(out, in)`` matrix is
        formed). Works on a 4-bit base; equal to the dense merge up to rounding.

        Args:
            deltas: Canonical layer name -> its update (``left`` of shape (out, k), ``right``
                of shape (k, in)); any subset of the layers.
            extras: As :meth:`evaluating_dense`.
        """
        self._check_layer_names(deltas, "evaluating_factored", complete=False)
        shapes = self.layer_shapes()
        for layer, delta in deltas.items():
            want = (shapes[layer].out_features, shapes[layer].in_features)
            got = (int(delta.left.shape[0]), int(delta.right.shape[-1]))
            if got != want or delta.left.shape[-1] != delta.right.shape[0]:
                raise ModelError(
                    f"evaluating_factored: layer '{layer}' update of shape {got} with inner "
                    f"sizes {delta.left.shape[-1]} and {delta.right.shape[0]}; expected {want}"
                )
        self._check_extras(extras, "evaluating_factored extras")
        hooks = []
        try:
            for layer, delta in deltas.items():
                base = self._layers[layer].get_base_layer()
                device = _base_weight(self._layers[layer]).device
                hooks.append(
                    base.register_forward_hook(
                        _FactoredUpdate(
                            delta.left.to(device), delta.right.to(device), float(delta.scale)
                        )
                    )
                )
            with self._evaluating_head(extras) as model:
                yield model
        finally:
            for hook in hooks:
                hook.remove()

    @contextmanager
    def evaluating(
        self, deltas: Mapping[str, LowRankDelta], extras: Mapping[str, torch.Tensor]
    ) -> Iterator[torch.nn.Module]:
        """The base with ``deltas`` and the head ``extras``, for evaluation: merged densely
        into a full-precision base (:meth:`evaluating_dense`), in factored form on a 4-bit
        one (:meth:`evaluating_factored`)."""
        if self.quantized:
            with self.evaluating_factored(deltas, extras) as model:
                yield model
        else:
            dense = {name: delta.dense() for name, delta in deltas.items()}
            with self.evaluating_dense(dense, extras) as model:
                yield model

    @contextmanager
    def _evaluating_head(self, extras: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
        """The model in eval mode, every adapter disabled and the head holding ``extras``
        (checked by the caller); afterwards the head, the modes and the active adapter are
        restored exactly."""
        head = self._original_head_parameters()
        saved_head = {name: param.detach().clone() for name, param in head.items()}
        modes = {module: module.training for module in self.model.modules()}
        try:
            with torch.no_grad():
                for name, value in extras.items():
                    head[name].copy_(value)
            with self.model.disable_adapter():
                self.model.eval()
                yield self._inner
        finally:
            with torch.no_grad():
                for name, saved in saved_head.items():
                    head[name].copy_(saved)
            for module, training in modes.items():
                module.training = training
            self.activate(self._active)

    def _check_dense_base(self, what: str) -> None:
        if self.quantized:
            raise ModelError(
                f"{what}: the base of '{self._backbone_name}' is 4-bit and cannot take a dense "
                "update (evaluate with evaluating_factored; flora and a merged export need a "
                "full-precision base)"
            )

    def export_peft(
        self,
        rank: int,
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        extras: Mapping[str, torch.Tensor],
        out_dir: str | Path,
    ) -> Path:
        """Writes a standard peft adapter folder for one rank.

        The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` directly (not
        in a sub-folder named after the adapter). ``PeftModel.from_pretrained(base, out_dir)``
        on a freshly loaded base model with the bank's current base weights gives the same
        outputs as this bank's rank-``rank`` adapter holding ``factors`` and ``extras``. The
        bank itself is not modified. After :meth:`add_to_base`, the base weights differ from a
        fresh load: export :meth:`merged_model` instead.

        Args:
            rank: One of :attr:`ranks`.
            factors: Canonical layer name -> (A (rank, in), B (out, rank)) for every layer.
            extras: Canonical head parameter name -> tensor, for every extra name.
            out_dir: Destination folder, created if needed.

        Returns:
            The folder.
        """
        name = self._name(rank)
        self._check_factors(rank, factors)
        self._check_extras(extras, f"export_peft extras of rank {rank}")
        keys = {id(param): key for key, param in self.model.named_parameters()}
        state: dict[str, torch.Tensor] = {}
        for layer, (param_a, param_b) in self._factor_parameters(rank).items():
            a, b = factors[layer]
            state[keys[id(param_a)]] = a.detach().to(param_a.dtype).cpu().contiguous()
            state[keys[id(param_b)]] = b.detach().to(param_b.dtype).cpu().contiguous()
        for extra, param in self._head_parameters(rank).items():
            state[keys[id(param)]] = extras[extra].detach().to(param.dtype).cpu().contiguous()
        exported = get_peft_model_state_dict(
            self.model, state_dict=state, adapter_name=name, save_embedding_layers=False
        )
        if len(exported) != len(state):
            raise ModelError(
                f"export_peft: peft kept {len(exported)} of the {len(state)} tensors of "
                f"adapter '{name}'; this peft version ({peft.__version__}) is not supported"
            )
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {key: value.clone() for key, value in exported.items()},
            str(folder / SAFETENSORS_WEIGHTS_NAME),
            metadata={"format": "pt"},
        )
        config = copy.deepcopy(self.model.peft_config[name])
        config.inference_mode = True
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = (
                getattr(self._inner, "name_or_path", None) or self._backbone_name
            )
        config.save_pretrained(str(folder))
        logger.info("exported rank-%d adapter to %s", rank, folder)
        return folder

    def merged_model(
        self, deltas: Mapping[str, torch.Tensor], extras: Mapping[str, torch.Tensor]
    ) -> transformers.PreTrainedModel:
        """A standalone copy of the base model with updates merged and the head set.

        The copy has no peft layers, its weights are ``W + delta`` and its head holds
        ``extras``; it is in eval mode with all parameters trainable, ready for
        ``save_pretrained``. The bank is not modified.

        Args:
            deltas: Canonical layer name -> delta of shape (out, in); any subset of the layers.
            extras: Canonical head parameter name -> tensor, for every extra name.

        Returns:
            The merged transformers model.
        """
        self._check_deltas(deltas, "merged_model")
        self._check_extras(extras, "merged_model extras")
        merged = copy.deepcopy(self._inner)
        replaced: list[str] = []
        for key, module in list(merged.named_modules()):
            if any(key.startswith(prefix + ".") for prefix in replaced):
                continue
            if isinstance(module, BaseTunerLayer):
                plain = module.get_base_layer()
            elif isinstance(module, ModulesToSaveWrapper):
                plain = _original_module(module)
            else:
                continue
            parent_name, _, child = key.rpartition(".")
            setattr(merged.get_submodule(parent_name), child, plain)
            replaced.append(key)
        for attribute in ("peft_config", "_hf_peft_config_loaded"):
            if attribute in vars(merged):
                delattr(merged, attribute)
        with torch.no_grad():
            for layer, delta in deltas.items():
                weight = _weight(merged.get_submodule(layer))
                weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
            for extra, value in extras.items():
                merged.get_parameter(extra).copy_(value)
        merged.requires_grad_(True)
        merged.eval()
        if not isinstance(merged, transformers.PreTrainedModel):
            raise ModelError(f"merged_model: {type(merged).__name__} is not a transformers model")
        return merged


def _weight(module: torch.nn.Module) -> torch.nn.Parameter:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter):
        raise ModelError(f"{type(module).__name__} has no weight parameter")
    return weight


class _FactoredUpdate:
    """A forward hook adding ``scale * (x @ right.T) @ left.T`` to a linear layer's output."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, scale: float) -> None:
        self.left = left  # (out, k)
        self.right = right  # (k, in)
        self.scale = scale

    def __call__(
        self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        x = inputs[0]
        dtype = output.dtype
        update = torch.nn.functional.linear(
            torch.nn.functional.linear(x.to(self.right.dtype), self.right), self.left
        )
        return output + (self.scale * update).to(dtype)


def _base_weight(layer: LoraLayer) -> torch.nn.Parameter:
    """The frozen weight (out, in) of the linear layer a LoRA layer wraps."""
    return _weight(layer.get_base_layer())


def _module(modules: torch.nn.ModuleDict, key: str) -> torch.nn.Module:
    module = modules[key]
    assert isinstance(module, torch.nn.Module)
    return module


def _original_module(wrapper: ModulesToSaveWrapper) -> torch.nn.Module:
    module = wrapper.original_module
    assert isinstance(module, torch.nn.Module)
    return module


def _linear_leaf_names(model: torch.nn.Module) -> list[str]:
    """Distinct last name parts of the model's Linear layers, in module order."""
    names: dict[str, None] = {}
    for key, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            names.setdefault(key.rsplit(".", 1)[-1], None)
    return list(names)
