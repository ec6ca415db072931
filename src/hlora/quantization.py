"""A 4-bit frozen base (QLoRA): ``model.quantization = "nf4"``.

The base model's linear layers are loaded as bitsandbytes ``Linear4bit`` (4-bit NormalFloat,
double quantization, bf16 compute), as in "QLoRA: Efficient Finetuning of Quantized LLMs"
(Dettmers et al., 2023). The head (a classifier's ``classifier`` / ``score``, a causal LM's
``lm_head``), the embeddings and the norms stay at full precision, and so do the LoRA adapters,
which peft puts beside each 4-bit layer. Nothing of the aggregation changes: clients still send
and receive factors. A 4-bit weight cannot take a dense update, so a quantized base is evaluated
with the global update applied in factored form (:meth:`hlora.adapters.LoraBank.evaluating`),
and ``flora`` (which merges every round into the base) is refused.

The run asks for a CUDA GPU (:func:`check_supported`): bitsandbytes' 4-bit kernels are what make
QLoRA worth it, and on a CPU they are slow. :func:`nf4_config` itself does not look at the device,
so the loading and training path can be tested on a CPU where bitsandbytes runs there.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Final

import torch

from hlora.errors import ConfigError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

NO_QUANTIZATION: Final = "none"
"""``model.quantization``: the frozen base at full precision."""
NF4: Final = "nf4"
"""4-bit NormalFloat with double quantization and bf16 compute."""
QUANTIZATIONS: Final[tuple[str, ...]] = (NO_QUANTIZATION, NF4)
"""The values of ``model.quantization``."""

_KEEP_FULL: Final = ("classifier", "score", "lm_head")
"""Modules kept at full precision: the heads hlora trains or scores with."""


def nf4_config() -> BitsAndBytesConfig:
    """The bitsandbytes configuration of an ``nf4`` base (heads kept at full precision)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=list(_KEEP_FULL),
    )


def check_supported(quantization: str, device: torch.device) -> None:
    """Refuse a quantized base where it cannot run as QLoRA is meant to.

    Raises:
        ConfigError: ``quantization`` is not ``"none"`` and the device is not a CUDA GPU, or
            the bitsandbytes package is missing.
    """
    if quantization == NO_QUANTIZATION:
        return
    if device.type != "cuda":
        raise ConfigError(
            f"model.quantization = '{quantization}' needs a CUDA GPU (bitsandbytes' 4-bit "
            f"kernels), and this run's device is {device.type}: set model.quantization = "
            "'none' on a CPU"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization = '{quantization}' needs the bitsandbytes package "
            "(pip install bitsandbytes)"
        )


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit weight (packed, with a quantization state)."""
    return getattr(weight, "quant_state", None) is not None


def load_kwargs(quantization: str, device: torch.device) -> dict[str, object]:
    """What ``from_pretrained`` needs for ``quantization`` on ``device`` (none: nothing).

    Raises:
        ConfigError: An unknown quantization.
    """
    if quantization == NO_QUANTIZATION:
        return {}
    if quantization != NF4:
        raise ConfigError(
            f"model.quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}"
        )
    return {"quantization_config": nf4_config(), "device_map": {"": str(device)}}
