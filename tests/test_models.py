"""Tests of hlora.models: offline backbones, local folders, hub errors and the SmolLM2 cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from filelock import FileLock, Timeout
from transformers import BertForSequenceClassification, LlamaForSequenceClassification

import hlora.models
from hlora.adapters import LayerShape, LoraBank
from hlora.errors import ModelError
from hlora.io import default_cache_dir
from hlora.models import OFFLINE_MODELS, Backbone, load_backbone
from tiny_models import build_tiny_backbone, build_tiny_llama_backbone


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub access: huggingface_hub reads HF_HUB_OFFLINE once, at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def minilm() -> Backbone:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return load_backbone("minilm", num_labels=3, seed=7)


# ----------------------------------------------------------------------------- offline aliases


def test_offline_aliases() -> None:
    assert {"minilm", "smollm2-135m"} <= set(OFFLINE_MODELS)
    assert OFFLINE_MODELS["minilm"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_minilm_loads_offline(minilm: Backbone) -> None:
    assert isinstance(minilm.model, BertForSequenceClassification)
    assert minilm.name == "minilm"
    assert minilm.architecture == "encoder"
    assert minilm.default_target_modules == ("query", "value")
    assert minilm.num_labels == 3
    assert minilm.model.dtype == torch.float32
    assert minilm.tokenizer.pad_token == "[PAD]"
    assert minilm.model.config.pad_token_id == minilm.tokenizer.pad_token_id
    encoded = minilm.tokenizer(
        ["a great movie", "what a waste of time that was"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = minilm.model(**encoded).logits
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


def test_minilm_lora_bank_has_twelve_square_layers(offline: None) -> None:
    bank = LoraBank(load_backbone("minilm"), [4, 16], scaling=2.0)
    names = bank.layer_names()
    assert len(names) == 12
    assert names[:2] == (
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
    )
    assert set(bank.layer_shapes().values()) == {LayerShape(384, 384)}
    assert bank.extra_names() == ("classifier.weight", "classifier.bias")


def test_head_is_seeded(minilm: Backbone, offline: None) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    same = load_backbone("all-MiniLM-L6-v2", num_labels=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    other = load_backbone("minilm", num_labels=3, seed=8)
    head = minilm.model.classifier.weight
    assert torch.equal(same.model.classifier.weight, head)
    assert not torch.equal(other.model.classifier.weight, head)
    # The pretrained weights do not depend on the seed.
    assert torch.equal(
        other.model.bert.encoder.layer[0].attention.self.query.weight,
        minilm.model.bert.encoder.layer[0].attention.self.query.weight,
    )


def test_dtype_is_honoured(offline: None) -> None:
    backbone = load_backbone("minilm", torch_dtype=torch.bfloat16)
    assert backbone.model.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- local folders


def test_local_folder_loads(tmp_path: Path, offline: None) -> None:
    tiny = build_tiny_backbone(num_labels=2)
    tiny.model.save_pretrained(tmp_path / "tiny")
    tiny.tokenizer.save_pretrained(tmp_path / "tiny")
    backbone = load_backbone(str(tmp_path / "tiny"))
    assert backbone.name == str(tmp_path / "tiny")
    assert backbone.architecture == "encoder"
    assert backbone.default_target_modules == ("query", "value")
    encoded = tiny.tokenizer(["the movie"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(backbone.model(**encoded).logits, tiny.model(**encoded).logits)


def test_local_decoder_folder_gets_pad_token_and_targets(tmp_path: Path, offline: None) -> None:
    tiny = build_tiny_llama_backbone()
    assert tiny.tokenizer.pad_token == tiny.tokenizer.eos_token == "</s>"
    tiny.model.save_pretrained(tmp_path / "llama")
    tiny.tokenizer.pad_token = None  # as most decoder tokenizers ship
    tiny.tokenizer.save_pretrained(tmp_path / "llama")
    backbone = load_backbone(str(tmp_path / "llama"), num_labels=2)
    assert isinstance(backbone.model, LlamaForSequenceClassification)
    assert backbone.architecture == "decoder"
    assert backbone.default_target_modules == ("q_proj", "v_proj")
    assert backbone.tokenizer.pad_token == backbone.tokenizer.eos_token
    assert backbone.model.config.pad_token_id == backbone.tokenizer.eos_token_id


@pytest.mark.parametrize(
    "path", ["./no/such/model", "/no/such/model", "no/such/model", "~/no-such-hlora-model"]
)
def test_missing_local_folder(path: str, offline: None) -> None:
    with pytest.raises(ModelError, match=rf"^model folder '{path}' does not exist$"):
        load_backbone(path)


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"has no config\.json"):
        load_backbone(str(tmp_path))


def test_unknown_hub_id_with_hub_unreachable(
    offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offline, the error comes at once: no retry waits out a back-off.
    def no_waiting(seconds: float) -> None:
        raise AssertionError(f"waited {seconds} s before failing")

    monkeypatch.setattr(time, "sleep", no_waiting)
    with pytest.raises(ModelError) as caught:
        load_backbone("no-such-org/no-such-model")
    message = str(caught.value)
    assert "'no-such-org/no-such-model'" in message
    assert "hub is unreachable (offline?) or does not know that id" in message
    assert "'minilm'" in message and "'smollm2-135m'" in message


def test_bad_num_labels() -> None:
    with pytest.raises(ModelError, match="num_labels must be an integer >= 1, got 0"):
        load_backbone("minilm", num_labels=0)


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("HLORA_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "hlora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "hlora"


def _fake_conversion(calls: list[Path]) -> Callable[[Path, Path], None]:
    """A stand-in for the GGUF conversion: records its cache folder and writes the marker there;
    it checks that it runs under the conversion's lock (nobody else can take that lock) and
    draws random numbers, as building the model does."""

    def build(gguf_folder: Path, cache: Path) -> None:
        with pytest.raises(Timeout):
            FileLock(cache.parent / f".{cache.name}.lock").acquire(timeout=0)
        torch.rand(4)
        calls.append(cache)
        cache.mkdir()
        (cache / hlora.models._CACHE_MARKER).write_text("{}")

    return build


def test_the_smollm2_copy_is_converted_once_under_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(hlora.models, "_build_smollm2_cache", _fake_conversion(calls))
    cache = tmp_path / "cache" / "smollm2"  # its parent does not exist yet
    state = torch.get_rng_state()
    hlora.models._ensure_smollm2_cache(tmp_path, cache)
    hlora.models._ensure_smollm2_cache(tmp_path, cache)
    assert calls == [cache]
    assert torch.equal(torch.get_rng_state(), state)  # the conversion's draws leave no trace


def test_a_process_that_waited_for_the_lock_reads_the_copy_another_one_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(hlora.models, "_build_smollm2_cache", _fake_conversion(calls))
    cache = tmp_path / "smollm2"

    class ConvertedWhileWaiting(FileLock):
        """The lock another process held while converting: the copy is there once it is ours."""

        def __enter__(self) -> ConvertedWhileWaiting:
            cache.mkdir()
            (cache / hlora.models._CACHE_MARKER).write_text("{}")
            return super().__enter__()

    monkeypatch.setattr(hlora.models, "FileLock", ConvertedWhileWaiting)
    hlora.models._ensure_smollm2_cache(tmp_path, cache)
    assert calls == []


def test_an_unwritable_cache_folder_is_a_model_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("HLORA_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with pytest.raises(ModelError, match=r"cannot create the cache folder .*; set HLORA_CACHE_DIR"):
        load_backbone("smollm2-135m")


def test_tiny_backbones_are_small_and_deterministic() -> None:
    first = build_tiny_backbone(seed=3)
    assert sum(p.numel() for p in first.model.parameters()) < 100_000  # what keeps tests fast
    second = build_tiny_backbone(seed=3)
    other = build_tiny_backbone(seed=4)
    for (name, a), b in zip(first.model.named_parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first.model.classifier.weight, other.model.classifier.weight)
    ids = first.tokenizer("The film was brilliant, 10/10!")["input_ids"]
    assert first.tokenizer.unk_token_id not in ids


# ----------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_loads_as_classifier_and_is_cached(
    monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    # The session's cache folder (tests/conftest.py): converted here or by an earlier test.
    torch.manual_seed(5)
    state = torch.get_rng_state()
    backbone = load_backbone("smollm2-135m", num_labels=2, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(backbone.model, LlamaForSequenceClassification)
    assert backbone.architecture == "decoder"
    assert backbone.default_target_modules == ("q_proj", "v_proj")
    assert backbone.num_labels == 2
    assert backbone.tokenizer.pad_token == backbone.tokenizer.eos_token
    assert backbone.model.config.pad_token_id == backbone.tokenizer.pad_token_id
    assert "quantization_config" not in backbone.model.config.to_dict()
    encoded = backbone.tokenizer(
        ["What a wonderful film!", "No."], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = backbone.model(**encoded).logits
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()

    cache = default_cache_dir() / "smollm2-135m-instruct-q4_1"
    assert (cache / "model.safetensors").is_file()
    assert (cache / "hlora-cache.json").is_file()

    # A second load reads the cache and never touches the GGUF file again.
    def no_rebuild(*args: object) -> None:
        raise AssertionError("the cached copy was not reused")

    monkeypatch.setattr(hlora.models, "_build_smollm2_cache", no_rebuild)
    again = load_backbone("smollm2-135m", num_labels=2, seed=1)
    with torch.no_grad():
        assert torch.equal(again.model(**encoded).logits, logits)

    bank = LoraBank(again, [8], scaling=2.0)
    shapes = bank.layer_shapes()
    assert len(shapes) == 60
    assert shapes["model.layers.0.self_attn.q_proj"] == LayerShape(576, 576)
    assert shapes["model.layers.0.self_attn.v_proj"] == LayerShape(192, 576)
    assert bank.extra_names() == ("score.weight",)
