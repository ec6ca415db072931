"""The configuration travels with the run: the server's manifest, and what a node checks.

Fast: no Flower runtime. The node's QUERY answer is computed in this process on the tiny BERT
and real MRPC slices.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from hlora.config import RunConfig, load_config, replace, to_toml
from hlora.engines.flower.codec import NODE_INFO, RUN, CodecError
from hlora.engines.flower.manifest import (
    RunManifest,
    model_sha256,
    node_run_config,
    portable_config,
)
from hlora.errors import HloraError
from tiny_models import build_tiny_backbone, tiny_overrides


def _config(tiny_bert_dir: Path, glue_dir: Path, out: Path) -> RunConfig:
    return load_config(None, tuple(tiny_overrides(tiny_bert_dir, glue_dir, out)))


def _content(manifest: RunManifest) -> RecordDict:
    return RecordDict({RUN: manifest.to_record()})


def test_the_portable_config_holds_no_path_of_this_machine(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    config = _config(tiny_bert_dir, glue_dir, tmp_path)
    portable, folder = portable_config(config)
    assert folder and portable.model.name == tiny_bert_dir.name
    assert portable.data.data_dir == "" and portable.output.dir == "runs"
    text = to_toml(portable)
    for path in (tiny_bert_dir, glue_dir, tmp_path):
        assert str(path) not in text
    # Everything else is the server's.
    assert portable.federation == config.federation and portable.train == config.train
    alias = load_config(None, ("model.name=minilm",))
    assert portable_config(alias) == (replace(alias, data={"data_dir": ""}), False)


def test_the_manifest_round_trips_and_tampering_is_caught(tmp_path: Path) -> None:
    config = load_config(None, ("model.lora_scaling=4.0", "federation.ranks=[2, 8]"))
    manifest = RunManifest.of(config, "ab" * 32)
    back = RunManifest.from_content(_content(manifest))
    assert back == manifest
    assert manifest.summary() == {
        "model": "minilm",
        "model-sha256": "ab" * 32,
        "task": config.data.task,
        "target-modules": [],
        "scaling": 4.0,
        "ranks": [2, 8],
    }
    assert RunManifest.from_content(RecordDict()) is None  # an older server sends none
    record = manifest.to_record()
    record["config"] = str(record["config"]).replace("lora_scaling = 4.0", "lora_scaling = 8.0")
    with pytest.raises(CodecError, match=r"fingerprint is .*, the server stated"):
        RunManifest.from_content(RecordDict({RUN: record}))
    del record["model-sha256"]
    with pytest.raises(CodecError, match=r"malformed 'hlora\.run' record"):
        RunManifest.from_content(RecordDict({RUN: record}))


def test_a_node_fills_in_only_its_own_paths(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    server = _config(tiny_bert_dir, glue_dir, tmp_path)
    manifest = RunManifest.of(server, "00" * 32)
    own = node_run_config(manifest, None, {"model-dir": "/node/model", "data-dir": "/node/glue"})
    assert (own.model.name, own.data.data_dir) == ("/node/model", "/node/glue")
    assert own.federation == server.federation and own.model.lora_scaling == 2.0
    local = replace(server, model={"lora_scaling": 9.0})  # a node's stale copy: paths only
    from_local = node_run_config(manifest, local, {})
    assert from_local.model.name == str(tiny_bert_dir)
    assert from_local.data.data_dir == str(glue_dir)
    assert from_local.model.lora_scaling == 2.0  # the server's, not the copy's
    with pytest.raises(HloraError, match="give this node its copy with --node-config model-dir"):
        node_run_config(manifest, None, {})


def test_a_node_refuses_another_model_or_missing_data_in_one_line(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    from hlora.engines.flower.identity import parse_node_info
    from hlora.engines.flower.node import node_info

    config = _config(tiny_bert_dir, glue_dir, tmp_path)
    manifest = RunManifest.of(config, model_sha256(config))
    node = {"partition-id": 1, "num-partitions": 3, "data-dir": str(glue_dir)}

    ok = node_info(None, {**node, "model-dir": str(tiny_bert_dir)}, _content(manifest))
    record = ok[NODE_INFO]
    assert isinstance(record, ConfigRecord) and "refused" not in record
    assert record["partition-id"] == 1 and int(record["num-examples"]) > 0  # type: ignore[arg-type]

    other = tmp_path / "other-model"
    backbone = build_tiny_backbone(num_labels=2, seed=1)  # same shapes, other weights
    backbone.model.save_pretrained(other)
    backbone.tokenizer.save_pretrained(other)
    refused = node_info(None, {**node, "model-dir": str(other)}, _content(manifest))[NODE_INFO]
    assert isinstance(refused, ConfigRecord) and list(refused) == ["refused"]
    line = str(refused["refused"])
    assert "\n" not in line
    assert f"this node's model '{other}'" in line and "is not the run's 'tiny-bert" in line

    no_data = {**node, "model-dir": str(tiny_bert_dir), "data-dir": str(tmp_path / "nothing")}
    missing = node_info(None, no_data, _content(manifest))[NODE_INFO]
    assert isinstance(missing, ConfigRecord) and list(missing) == ["refused"]
    assert str(tmp_path / "nothing") in str(missing["refused"]), missing["refused"]

    class Reply:  # the server's view of the refusal
        content = RecordDict({NODE_INFO: refused})

        def has_error(self) -> bool:
            return False

    with pytest.raises(HloraError, match=r"^refused: this node's model"):
        parse_node_info(7, Reply(), None)  # type: ignore[arg-type]


def test_a_node_without_any_configuration_refuses() -> None:
    from hlora.engines.flower.node import node_info

    refused = node_info(None, {"partition-id": 0, "num-partitions": 1}, RecordDict())[NODE_INFO]
    assert isinstance(refused, ConfigRecord)
    assert "the server sent no run configuration and this node has none" in str(refused["refused"])
