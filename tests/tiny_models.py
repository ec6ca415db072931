"""Tiny, randomly initialised backbones for fast tests (no download, deterministic, < 1 s).

``build_tiny_backbone`` gives a 2-layer BERT encoder (hidden 32, 2 heads, intermediate 64) with a
real WordPiece ``BertTokenizerFast`` read from a vocabulary file written to a temporary folder.
``build_tiny_llama_backbone`` gives a 2-layer Llama decoder (hidden 32, 4 query heads, 2 key/value
heads, so ``v_proj`` is 16x32) with ``pad token = eos``. Both have dropout 0 so that train and eval
mode give the same outputs.

Usage from a test module: ``from tiny_models import build_tiny_backbone``.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from hlora.models import Backbone, build_backbone
from hlora.tasktypes import CAUSAL_LM

TINY_MAX_LENGTH = 64

_WORD_TEXT = (
    "the a an and or but not no is are was were be been it this that these those i you he she "
    "we they my your his her our their of in on at to for with from by as very really quite so "
    "too more most less movie film story plot acting actor actors scene scenes director music "
    "good great bad awful terrible wonderful excellent boring fun funny dull brilliant best "
    "worst love loved hate hated like liked enjoy enjoyed recommend waste time money watch "
    "watched sentence question answer same different yes true false what why how who"
)
_WORDS = tuple(_WORD_TEXT.split())
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_LETTERS = string.ascii_lowercase + string.digits
_PUNCT = tuple(".,!?'\"-:;()/")


def tiny_vocabulary() -> list[str]:
    """The tiny WordPiece vocabulary: specials, words, letters/digits and ``##`` continuations.

    Any lower-case ASCII word can be tokenized without ``[UNK]`` (letter by letter at worst).
    """
    pieces = [*_WORDS, *_LETTERS, *_PUNCT, *(f"##{c}" for c in _LETTERS)]
    return [*_SPECIALS, *dict.fromkeys(pieces)]


def _bert_tokenizer() -> BertTokenizerFast:
    with tempfile.TemporaryDirectory(prefix="hlora-tiny-vocab-") as folder:
        (Path(folder) / "vocab.txt").write_text("\n".join(tiny_vocabulary()) + "\n")
        return BertTokenizerFast.from_pretrained(folder, model_max_length=TINY_MAX_LENGTH)


def build_tiny_backbone(num_labels: int = 2, seed: int = 0, hidden_size: int = 32) -> Backbone:
    """A tiny randomly initialised BERT sequence classifier and its tokenizer.

    Args:
        num_labels: Number of classes of the head.
        seed: Seed of all weights (the global RNG state is left untouched).
        hidden_size: Its width (2 attention heads; the MLP twice as wide).

    Returns:
        Backbone named ``"tiny-bert"``, architecture ``"encoder"``, targets ``("query", "value")``;
        every query/value layer is ``hidden_size`` x ``hidden_size`` (32x32 by default).
    """
    tokenizer = _bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=TINY_MAX_LENGTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = BertForSequenceClassification(config)
    model.eval()
    return build_backbone(model, tokenizer, "tiny-bert")


def _llama_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = ["<unk>", "<s>", "</s>", *tiny_vocabulary()[len(_SPECIALS) :]]
    backend = Tokenizer(
        models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="<unk>")
    )
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=TINY_MAX_LENGTH,
    )


def _tiny_llama_config(tokenizer: PreTrainedTokenizerFast, **extra: object) -> LlamaConfig:
    """2 layers, hidden 32, 4 query and 2 key/value heads, MLP 64, the tokenizer's ids."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def save_tiny_causal_model(folder: Path, seed: int = 0) -> Path:
    """:func:`build_tiny_causal_backbone` saved as a model folder (weights and tokenizer)."""
    backbone = build_tiny_causal_backbone(seed=seed)
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    return folder


def build_tiny_llama_backbone(num_labels: int = 2, seed: int = 0) -> Backbone:
    """A tiny randomly initialised Llama sequence classifier (decoder, pad = eos).

    Args:
        num_labels: Number of classes of the head (``score``, no bias).
        seed: Seed of all weights (the global RNG state is left untouched).

    Returns:
        Backbone named ``"tiny-llama"``, architecture ``"decoder"``, targets
        ``("q_proj", "v_proj")``; q_proj is 32x32 and v_proj 16x32.
    """
    tokenizer = _llama_tokenizer()
    config = _tiny_llama_config(
        tokenizer,
        max_position_embeddings=TINY_MAX_LENGTH,
        num_labels=num_labels,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    model.eval()
    return build_backbone(model, tokenizer, "tiny-llama")


#: A small chat template in the usual layout: a role header, the content, an end-of-turn token.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_chat_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """The tiny Llama tokenizer with role tokens and (optionally) :data:`TINY_CHAT_TEMPLATE`."""
    tokenizer = _llama_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]}
    )
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_causal_backbone(seed: int = 0, chat_template: bool = True) -> Backbone:
    """A tiny randomly initialised Llama causal LM (decoder, pad = eos) with a chat template.

    Returns:
        Backbone named ``"tiny-causal-llama"``, task type ``"causal-lm"``, targets all seven
        projections (q/k/v/o 32x32 or 16x32, gate/up 64x32, down 32x64).
    """
    tokenizer = tiny_chat_tokenizer(chat_template)
    config = _tiny_llama_config(
        tokenizer,
        max_position_embeddings=4 * TINY_MAX_LENGTH,
        tie_word_embeddings=True,
        # Wide enough embeddings that a frozen, tied output layer can still express confident
        # predictions (at the usual 0.02 every logit stays within about +-1).
        initializer_range=0.3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return build_backbone(model, tokenizer, "tiny-causal-llama", CAUSAL_LM)


def tiny_overrides(model_dir: Path, glue: Path, out: Path, **extra: object) -> list[str]:
    """``--set`` overrides of a tiny federation: 3 clients x 2 rounds of the tiny BERT on MRPC.

    Args:
        model_dir: A saved tiny model folder (the ``tiny_bert_dir`` fixture).
        glue: The GLUE folder (the ``glue_dir`` fixture).
        out: Parent folder of the run folders.
        **extra: ``section.key`` -> TOML value, overriding the defaults below.
    """
    values: dict[str, object] = {
        "model.name": f'"{model_dir}"',
        "model.max_length": 64,
        "model.lora_dropout": 0.0,
        "data.data_dir": f'"{glue}"',
        "data.train_limit": 48,
        "data.dev_limit": 24,
        "federation.num_clients": 3,
        "federation.rounds": 2,
        "federation.ranks": "[2, 4]",
        "train.batch_size": 8,
        "train.learning_rate": 0.01,
        "train.device": '"cpu"',
        "output.dir": f'"{out}"',
        "output.progress": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
