"""A data owner's own examples: the readers, the node in the ``own`` mode, the features cache.

Fast: no Flower runtime. Files are written by each test; the node's QUERY answer and one round
of training run in this process on the tiny BERT.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

import hlora.federation
from hlora.config import RunConfig, load_config
from hlora.data.collate import tokenize_pairs
from hlora.data.files import columns, read_own_data
from hlora.data.glue import Example, load_task
from hlora.engines.flower import features as feature_cache
from hlora.engines.flower import node as node_task
from hlora.engines.flower.codec import NODE_INFO, RUN, decode_reply, encode_instruction
from hlora.engines.flower.manifest import RunManifest, model_sha256
from hlora.errors import ConfigError, DataError
from hlora.protocol import TrainInstruction
from hlora.runtime import ModelRuntime
from tiny_models import tiny_overrides

ROWS = [
    Example("The cat sat on the mat.", "A cat was sitting on a mat.", 1),
    Example("Stocks fell sharply today.", "The weather was sunny.", 0),
    Example("He bought a new car.", "He purchased a new automobile.", 1),
    Example("She likes tea.", "Coffee is served at noon.", 0),
    Example("Rain is expected tomorrow.", "Tomorrow it will probably rain.", 1),
]


def write_jsonl(path: Path, rows: list[Example], task: str = "mrpc") -> Path:
    a, b, y = columns(task)
    lines = [
        json.dumps({a: e.text_a, b: e.text_b, y: e.label, "idx": i}) for i, e in enumerate(rows)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[Example], task: str = "mrpc") -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns(task))
        writer.writerows([e.text_a, e.text_b, e.label] for e in rows)
    return path


def write_mrpc_tsv(path: Path, rows: list[Example]) -> Path:
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    body = [f"{e.label}\t{i}\t{i + 100}\t{e.text_a}\t{e.text_b}" for i, e in enumerate(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *body]) + "\n", encoding="utf-8")
    return path


# -- the readers ---------------------------------------------------------------------------------


def test_every_form_reads_exactly_the_rows_written(tmp_path: Path) -> None:
    expected = tuple(ROWS)
    assert read_own_data(write_jsonl(tmp_path / "a.jsonl", ROWS), "mrpc").train == expected
    assert read_own_data(write_csv(tmp_path / "a.csv", ROWS), "mrpc").train == expected
    tsv = read_own_data(write_mrpc_tsv(tmp_path / "a.tsv", ROWS), "mrpc")
    assert tsv.train == expected and tsv.held_out == ()
    folder = tmp_path / "glue"
    write_mrpc_tsv(folder / "MRPC" / "train.tsv", ROWS[:3])
    only_train = read_own_data(folder, "mrpc")
    assert only_train.train == expected[:3] and only_train.held_out == ()
    write_mrpc_tsv(folder / "MRPC" / "dev.tsv", ROWS[3:])
    both = read_own_data(folder, "mrpc")
    assert both.train == expected[:3] and both.held_out == expected[3:]
    assert both.files == (folder / "MRPC" / "train.tsv", folder / "MRPC" / "dev.tsv")


def test_rte_labels_by_name_and_qqp_columns(tmp_path: Path) -> None:
    rte = tmp_path / "rte.jsonl"
    rte.write_text(
        '{"sentence1": "a", "sentence2": "b", "label": "not_entailment"}\n'
        '{"sentence1": "c", "sentence2": "d", "label": 0}\n'
        '{"sentence1": "e", "sentence2": "f", "label": "1"}\n'
    )
    assert read_own_data(rte, "rte").train == (
        Example("a", "b", 1),
        Example("c", "d", 0),
        Example("e", "f", 1),
    )
    qqp = write_csv(tmp_path / "qqp.csv", ROWS[:2], "qqp")
    assert qqp.read_text().splitlines()[0] == "question1,question2,label"
    assert read_own_data(qqp, "qqp").train == tuple(ROWS[:2])


def test_the_real_glue_file_reads_as_the_task_loader_reads_it(glue_dir: Path) -> None:
    mine = read_own_data(glue_dir / "RTE" / "train.tsv", "rte").train
    assert mine == load_task("rte", glue_dir).train


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.csv", "sentence1,label\nx,1\n", r"'{f}' line 1: no 'sentence2' column in the header"),
        ("a.csv", "sentence1,sentence2,label\nx,y,1\nx,y,2\n", r"'{f}' line 3: label '2' is not"),
        ("a.csv", "sentence1,sentence2,label\nx,y,yes\n", r"'{f}' line 2: label 'yes' is not one"),
        ("a.csv", "sentence1,sentence2,label\nx,,1\n", r"'{f}' line 2: column 'sentence2' is ''"),
        ("a.csv", "sentence1,sentence2,label\nx,y\n", r"'{f}' line 2: no 'label' column"),
        ("a.csv", "sentence1,sentence2,label\nx,y,1,z\n", r"'{f}' line 2: more fields than"),
        ("a.csv", "sentence1,sentence2,label\n", r"'{f}' line 1: the file has no data rows"),
        ("a.csv", "", r"'{f}' line 1: the file is empty"),
        ("a.jsonl", "\n  \n", r"'{f}' line 1: the file is empty"),
        (
            "a.jsonl",
            '{"sentence1": "x", "sentence2": "y", "label": 1}\n{"sentence1": "x", "label": 0}\n',
            r"'{f}' line 2: no 'sentence2' column",
        ),
        ("a.jsonl", '{"sentence1": "x", "sentence2": "y", "label": 1.5}\n', r"line 1: label 1\.5"),
        ("a.jsonl", '{"sentence1": "x", "sentence2": "y", "label": true}\n', r"line 1: label True"),
        (
            "a.jsonl",
            '{"sentence1": "x", "sentence2": "y", "label": 1}\n{oops\n',
            r"line 2: not JSON",
        ),
        ("a.jsonl", "[1, 2]\n", r"'{f}' line 1: a list, not a JSON object"),
        ("a.jsonl", '{"sentence1": "x", "sentence2": 3, "label": 1}\n', r"'sentence2' is 3"),
        ("a.tsv", "Quality\t#1 String\n1\tx\n", r"'{f}' line 1: unexpected header"),
        (
            "a.tsv",
            "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tx\ty\n7\t1\t2\tx\ty\n",
            r"'{f}' line 3: label '7' is not one of",
        ),
        ("a.tsv", "", r"'{f}' line 1: the file is empty"),
        ("a.txt", "x", r"own data '{f}' has suffix '\.txt': expected a GLUE-layout folder"),
    ],
)
def test_a_malformed_file_names_the_file_and_the_line(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message.format(f=re.escape(str(path)))):
        read_own_data(path, "mrpc")


def test_a_missing_path_or_a_folder_without_the_task_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"own data '{tmp_path / 'none.csv'}' does not exist"):
        read_own_data(tmp_path / "none.csv", "mrpc")
    with pytest.raises(DataError, match=r"is a folder without 'MRPC/train\.tsv'"):
        read_own_data(tmp_path, "mrpc")
    with pytest.raises(DataError, match="unknown task 'sst2'"):
        read_own_data(tmp_path, "sst2")


# -- the node in the own mode --------------------------------------------------------------------


def _config(tiny_bert_dir: Path, glue_dir: Path, out: Path) -> RunConfig:
    return load_config(None, tuple(tiny_overrides(tiny_bert_dir, glue_dir, out)))


def _own_node(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> tuple[RunConfig, RunManifest, dict[str, str], ModelRuntime]:
    """The tiny federation's configuration and manifest, a node on its own file of ``ROWS``,
    and the runtime that node sets up."""
    config = _config(tiny_bert_dir, glue_dir, tmp_path)
    manifest = RunManifest.of(config, model_sha256(config))
    own = write_jsonl(tmp_path / "mine.jsonl", ROWS)
    node = {"own-data": str(own), "model-dir": str(tiny_bert_dir)}
    content = RecordDict({RUN: manifest.to_record()})
    runtime = node_task.node_setup(node_task.run_config(None, node, content)[0], node)[0]
    return config, manifest, node, runtime


@pytest.fixture
def fresh_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node process's caches emptied, as in a fresh ClientApp process; no shared task read."""
    monkeypatch.setattr(node_task, "_RUNTIMES", {})
    monkeypatch.setattr(node_task, "_PARTITIONS", {})
    monkeypatch.setattr(node_task, "_HELD_OUT", {})
    monkeypatch.setattr(node_task, "_MODEL_SHA", {})

    def no_shared_task(*args: object, **kwargs: object) -> None:
        raise AssertionError("a node with its own data read the shared task")

    monkeypatch.setattr(hlora.federation, "load_task", no_shared_task)
    monkeypatch.setattr(node_task, "load_run_task", no_shared_task)


def test_a_node_with_its_own_file_trains_on_exactly_its_examples(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, fresh_node: None
) -> None:
    config = _config(tiny_bert_dir, glue_dir, tmp_path)
    manifest = RunManifest.of(config, model_sha256(config))
    own = write_jsonl(tmp_path / "mine.jsonl", ROWS)
    node = {"own-data": str(own), "model-dir": str(tiny_bert_dir), "partition-id": 2}
    content = RecordDict({RUN: manifest.to_record()})

    answer = node_task.node_info(None, node, content)[NODE_INFO]
    assert isinstance(answer, ConfigRecord)
    assert dict(answer) == {
        "data-mode": "own",
        "num-examples": 5,
        "label-counts": [2, 3],
        "eval-examples": 0,
        "rank": 0,
        "memory-mb": 0.0,
    }

    runtime, features, data = node_task.node_setup(
        node_task.run_config(None, node, content)[0], node
    )
    assert data.mode == "own" and data.own_data == str(own)
    backbone = node_task.client_runtime(node_task.run_config(None, node, content)[0])[1]
    assert features == tokenize_pairs(backbone.tokenizer, ROWS, config.model.max_length)

    instruction = TrainInstruction(
        client_id="client01",  # named by the server (node id order), not by partition-id
        round_num=1,
        rank=2,
        scaling=config.model.lora_scaling,
        factors=None,
        extras=runtime.bank.get_extras(2),
        init_seed=1,
        train_seed=1,
    )
    train_content = encode_instruction(instruction)
    train_content[RUN] = manifest.to_record()
    reply = decode_reply(node_task.train(None, node, train_content), "client01")
    assert reply.update.num_examples == 5
    assert reply.steps == config.train.local_epochs  # 5 examples, batch 8: one step an epoch
    assert all(torch.isfinite(f.A).all() for f in reply.update.factors.values())


def test_a_node_trains_at_the_frozen_residual_it_is_sent(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, fresh_node: None
) -> None:
    """``server.residual = "frozen"`` over Flower: the node adds the instruction's base delta
    to its frozen weights before training (its loss differs from the one without it, and the
    same delta again trains the same), and resets them when the next instruction has none."""
    from hlora.aggregation import LowRankDelta
    from hlora.server import residual_version

    config, manifest, node, runtime = _own_node(tiny_bert_dir, glue_dir, tmp_path)
    head = {k: v.clone() for k, v in runtime.bank.get_extras(2).items()}
    generator = torch.Generator().manual_seed(0)
    rest = {  # components beyond rank 2, large enough to move this tiny model's loss
        name: LowRankDelta(
            left=torch.randn(w.shape[0], 2, generator=generator),
            right=torch.randn(2, w.shape[1], generator=generator),
        )
        for name in runtime.bank.layer_names()
        for w in [runtime.bank.base_weight(name)]
    }

    def reply_loss(base_delta: dict[str, LowRankDelta] | None) -> float:
        instruction = TrainInstruction(
            client_id="client00",
            round_num=2,
            rank=2,
            scaling=config.model.lora_scaling,
            factors=None,
            extras=head,
            init_seed=1,
            train_seed=1,
            base_version=residual_version(2, 2) if base_delta is not None else 0,
            base_delta=base_delta,
        )
        train_content = encode_instruction(instruction)
        train_content[RUN] = manifest.to_record()
        return decode_reply(node_task.train(None, node, train_content), "client00").loss

    frozen, plain = reply_loss(rest), reply_loss(None)
    assert abs(frozen - plain) > 1e-3
    assert reply_loss(rest) == frozen  # the same base again: the same training
    assert reply_loss(None) == plain  # the base was reset to the pretrained weights


def test_a_node_sends_the_moments_of_its_own_examples(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, fresh_node: None
) -> None:
    from hlora.engines.flower.codec import decode_moments_reply, encode_eval_instruction
    from hlora.protocol import EvalInstruction

    _, manifest, node, runtime = _own_node(tiny_bert_dir, glue_dir, tmp_path)

    def ask(client_id: str, node_config: dict) -> RecordDict:
        message = encode_eval_instruction(
            EvalInstruction(client_id, 2, {}, runtime.bank.get_extras(2))
        )
        message[RUN] = manifest.to_record()
        return node_task.moments(None, node_config, message)

    reply = decode_moments_reply(ask("client03", node), "client03")
    assert reply.moments.count.tolist() == [2.0, 3.0]  # the file's labels, nobody else's
    assert reply.moments.mean.shape == (2, 32) and reply.moments.cov.shape == (2, 32, 32)


def test_a_simulated_partition_sends_moments_only_for_its_own_client(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    from hlora.engines.flower.codec import decode_moments_reply, encode_eval_instruction
    from hlora.errors import HloraError
    from hlora.protocol import EvalInstruction

    config = _config(tiny_bert_dir, glue_dir, tmp_path)
    manifest = RunManifest.of(config, model_sha256(config))
    node = {"partition-id": 1, "num-partitions": 3, "model-dir": str(tiny_bert_dir)}
    node["data-dir"] = str(glue_dir)
    content = RecordDict({RUN: manifest.to_record()})
    runtime, features, _ = node_task.node_setup(node_task.run_config(None, node, content)[0], node)

    def ask(client_id: str) -> RecordDict:
        message = encode_eval_instruction(
            EvalInstruction(client_id, 2, {}, runtime.bank.get_extras(2))
        )
        message[RUN] = manifest.to_record()
        return node_task.moments(None, node, message)

    reply = decode_moments_reply(ask("client01"), "client01")
    assert int(reply.moments.count.sum()) == len(features)
    with pytest.raises(HloraError, match="partition-id 1 got client00's message"):
        ask("client00")


def test_a_node_with_a_bad_file_refuses_in_one_line_naming_file_and_line(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, fresh_node: None
) -> None:
    config = _config(tiny_bert_dir, glue_dir, tmp_path)
    manifest = RunManifest.of(config, model_sha256(config))
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence1,sentence2,label\nx,y,1\nx,y,maybe\n")
    node = {"own-data": str(bad), "model-dir": str(tiny_bert_dir)}
    answer = node_task.node_info(None, node, RecordDict({RUN: manifest.to_record()}))[NODE_INFO]
    assert isinstance(answer, ConfigRecord) and list(answer) == ["refused"]
    assert str(answer["refused"]) == (f"'{bad}' line 3: label 'maybe' is not one of 0, 1")


def test_a_node_evaluates_the_global_model_on_its_own_held_out_file(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, fresh_node: None
) -> None:
    """The EVALUATE answer holds the counts of the model the server sent, on exactly the
    node's held-out rows: the same as evaluating those rows in the server's process."""
    from hlora.aggregation import LowRankDelta
    from hlora.engines.flower.codec import decode_eval_reply, encode_eval_instruction
    from hlora.protocol import EvalInstruction

    config = _config(tiny_bert_dir, glue_dir, tmp_path)
    manifest = RunManifest.of(config, model_sha256(config))
    held = load_task("mrpc", glue_dir).dev[:11]
    node = {
        "own-data": str(write_jsonl(tmp_path / "mine.jsonl", ROWS)),
        "eval-data": str(write_csv(tmp_path / "held.csv", list(held))),
        "model-dir": str(tiny_bert_dir),
    }
    content = RecordDict({RUN: manifest.to_record()})
    answer = node_task.node_info(None, node, content)[NODE_INFO]
    assert answer["eval-examples"] == 11  # type: ignore[index]

    runtime = node_task.node_setup(node_task.run_config(None, node, content)[0], node)[0]
    g = torch.Generator().manual_seed(0)
    layers = {
        name: LowRankDelta(
            torch.randn(shape.out_features, 3, generator=g),
            torch.randn(3, shape.in_features, generator=g),
            0.05,
        )
        for name, shape in runtime.bank.layer_shapes().items()
    }
    extras = {k: v + 0.3 for k, v in runtime.bank.get_extras(runtime.bank.ranks[0]).items()}
    message = encode_eval_instruction(EvalInstruction("client04", 2, layers, extras))
    message[RUN] = manifest.to_record()
    reply = decode_eval_reply(node_task.evaluate(None, node, message), "client04", 2, 11, True)

    backbone = node_task.client_runtime(node_task.run_config(None, node, content)[0])[1]
    features = tokenize_pairs(backbone.tokenizer, list(held), config.model.max_length)
    expected = runtime.evaluation_counts(layers, extras, features, config.server.eval_batch_size)
    assert reply.counts == expected and reply.num_examples == 11
    untouched = runtime.evaluation_counts({}, runtime.bank.get_extras(2), features, 8)
    assert untouched.loss_sum != expected.loss_sum  # the sent model was the one evaluated

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence1": "a", "sentence2": "b", "label": 1}\n{"sentence1": "a"}\n')
    refused = node_task.node_info(None, {**node, "eval-data": str(bad)}, content)[NODE_INFO]
    assert list(refused) == ["refused"] and str(refused["refused"]).startswith(f"'{bad}' line 2")


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({}, "this node declares no data: start it with flower-supernode --node-config"),
        ({"partition-id": 0}, "this node declares no data"),
        ({"partition-id": "x", "num-partitions": 3}, "'partition-id' must be an integer, got 'x'"),
        ({"partition-id": 3, "num-partitions": 3}, r"partition-id 3 is not in \[0, num-part"),
        ({"partition-id": True, "num-partitions": 3}, "'partition-id' must be an integer"),
    ],
)
def test_a_node_config_without_usable_data_is_refused(node: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        node_task.NodeData.from_node_config(node)


def test_node_data_modes_are_named_and_own_data_wins() -> None:
    own = node_task.NodeData.from_node_config({"own-data": "/d.csv", "partition-id": 1})
    assert (own.mode, own.own_data, own.partition_id) == ("own", "/d.csv", -1)
    sim = node_task.NodeData.from_node_config({"partition-id": "1", "num-partitions": 3})
    assert (sim.mode, sim.partition_id, sim.num_partitions) == ("simulated-partition", 1, 3)
    with pytest.raises(ConfigError, match="node data mode 'shared' is not one of"):
        node_task.NodeData("shared")
    with pytest.raises(ConfigError, match="node data mode 'own' needs 'own-data'"):
        node_task.NodeData("own")


# -- the features cache ---------------------------------------------------------------------------


def test_features_are_cached_by_file_and_tokenizer_and_read_back_equal(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, fresh_node: None
) -> None:
    config = load_config(None, tuple(tiny_overrides(tiny_bert_dir, glue_dir, tmp_path)))
    _, backbone = node_task.client_runtime(config)
    own = write_csv(tmp_path / "mine.csv", ROWS)
    data = node_task.NodeData("own", own_data=str(own), cache_dir=str(tmp_path / "cache"))
    made = node_task.node_features(config, backbone, data)
    entries = list((tmp_path / "cache" / "features").glob("*.npz"))
    assert len(entries) == 1
    calls = []
    again = feature_cache.cached_features(
        tmp_path / "cache",
        entries[0].stem,
        lambda: calls.append(1) or [],  # type: ignore[func-returns-value]
    )
    assert calls == [] and again == made  # read from disk, equal (ids, masks, labels)
    assert node_task.node_features(config, backbone, data) == made
    write_csv(own, ROWS[:4])  # the file changed: a new key, never the stale entry
    assert len(node_task.node_features(config, backbone, data)) == 4
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 2
    off = node_task.NodeData("own", own_data=str(own), cache_dir="none")
    assert feature_cache.resolve_cache_dir(off.cache_dir) is None
    assert len(node_task.node_features(config, backbone, off)) == 4


def test_a_corrupt_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    features = [
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 1},
        {"input_ids": [4], "attention_mask": [1], "labels": 0},
    ]
    assert feature_cache.cached_features(tmp_path, "k", lambda: features) == features
    assert feature_cache.cached_features(tmp_path, "k", lambda: []) == features
    (tmp_path / "features" / "k.npz").write_bytes(b"not a zip")
    assert feature_cache.cached_features(tmp_path, "k", lambda: features[:1]) == features[:1]
    assert feature_cache.cached_features(tmp_path, "k", lambda: []) == features[:1]


def test_the_tokenizer_is_part_of_the_key(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    own = write_csv(tmp_path / "mine.csv", ROWS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    key = feature_cache.features_key([own], tokenizer, ["a"])
    assert feature_cache.features_key([own], tokenizer, ["a"]) == key
    assert feature_cache.features_key([own], tokenizer, ["b"]) != key
    tokenizer.add_tokens(["zzzunseen"])
    assert feature_cache.features_key([own], tokenizer, ["a"]) != key


# -- the server reads only the evaluation data -------------------------------------------------


def test_the_server_reads_only_its_evaluation_data(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    from hlora.engines.flower.server_app import evaluation_federation, evaluation_task

    config = load_config(None, tuple(tiny_overrides(tiny_bert_dir, tmp_path / "no-glue", tmp_path)))
    dev = write_jsonl(tmp_path / "dev.jsonl", ROWS)
    task = evaluation_task(config, str(dev))
    assert task.train == () and task.dev == tuple(ROWS)
    folder = tmp_path / "glue"
    write_mrpc_tsv(folder / "MRPC" / "dev.tsv", ROWS[1:])
    assert evaluation_task(config, str(folder)).dev == tuple(ROWS[1:])
    limited = load_config(None, tuple(tiny_overrides(tiny_bert_dir, glue_dir, tmp_path)))
    assert len(evaluation_task(limited).dev) == limited.data.dev_limit  # the task's dev split
    federation = evaluation_federation(config, task)
    assert federation.clients == [] and len(federation.dev_features) == 5
    assert set(federation.spec.layers) == set(federation.runtime.bank.layer_shapes())
