"""Causal-LM instruction tuning: rendering, answer-only loss, answer scoring, a whole run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from hlora.adapters import LoraBank
from hlora.cli import main
from hlora.config import RunConfig, TrainConfig, load_config
from hlora.data.glue import Example, get_task
from hlora.errors import CheckpointError, ConfigError, DataError, ModelError
from hlora.federation import run
from hlora.generation import GENERATIONS_FILE, generate_answers, generate_from_run
from hlora.models import load_backbone
from hlora.objectives import CausalLanguageModeling, make_objective
from hlora.objectives.causal_lm import IGNORE_INDEX
from hlora.objectives.prompts import (
    PLAIN_PROMPT,
    pair_instruction,
    render_turns,
    system_turns,
    with_system,
)
from hlora.protocol import TrainInstruction
from hlora.runtime import ModelRuntime
from tiny_models import (
    TINY_CHAT_TEMPLATE,
    build_tiny_causal_backbone,
    save_tiny_causal_model,
    tiny_overrides,
)

PAIRS = [
    Example("the movie was good", "the film was great", 1),
    Example("i loved it", "i hated it", 0),
    Example("what a boring plot", "the story was dull and the acting was bad too", 1),
    Example("yes", "no", 0),
]


def _objective(chat_template: bool = True, max_length: int = 64) -> CausalLanguageModeling:
    backbone = build_tiny_causal_backbone(chat_template=chat_template)
    objective = make_objective(backbone, get_task("mrpc"), max_length)
    assert isinstance(objective, CausalLanguageModeling)
    return objective


def test_chat_rendering_puts_the_loss_on_the_answer_and_end_of_turn_only() -> None:
    objective = _objective()
    tok = objective.tokenizer
    features = objective.train_features(PAIRS)
    for example, feature in zip(PAIRS, features, strict=True):
        ids, labels = feature["input_ids"], feature["labels"]
        assert len(ids) == len(labels)
        answer_start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert all(label == IGNORE_INDEX for label in labels[:answer_start])
        assert labels[answer_start:] == ids[answer_start:]
        prompt = tok.decode(ids[:answer_start])
        completion = tok.decode(ids[answer_start:])
        answer = ("no", "yes")[example.label]
        assert prompt.startswith("<|user|>") and prompt.rstrip().endswith("<|assistant|>")
        assert "sentence 1" in prompt.lower() and example.text_a in prompt.lower()
        assert completion.replace(" ", "") == f"{answer}</s>"
        assert feature["class_label"] == example.label


def test_a_tokenizer_without_chat_template_gets_the_plain_layout() -> None:
    objective = _objective(chat_template=False)
    prompt, completion = render_turns(objective.tokenizer, "say yes", "yes")
    assert prompt == PLAIN_PROMPT.format(user="say yes")
    assert completion == "yes</s>"
    feature = objective.train_features(PAIRS[:1])[0]
    answered = [
        t
        for t, label in zip(feature["input_ids"], feature["labels"], strict=True)
        if label != IGNORE_INDEX
    ]
    assert objective.tokenizer.decode(answered).replace(" ", "") == "yes</s>"


#: A template that opens every conversation without a system turn with its own (as SmolLM2's).
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|system|>\nYou are a helpful assistant.</s>\n"
    "{% endif %}" + TINY_CHAT_TEMPLATE
)


@pytest.mark.parametrize("default_system", [False, True])
def test_system_prompt_opens_every_prompt_without_its_own(default_system: bool) -> None:
    """'template' leaves the template's own behaviour; a text becomes a system turn; 'none' drops
    a template's default system prompt with an empty turn, and adds nothing where there is no
    default; an example's own system turn always wins."""
    backbone = build_tiny_causal_backbone()
    tok = backbone.tokenizer
    if default_system:
        tok.chat_template = DEFAULT_SYSTEM_TEMPLATE

    def prompt_of(system_prompt: str) -> str:
        objective = make_objective(backbone, get_task("mrpc"), 64, system_prompt)
        feature = objective.train_features(PAIRS[:1])[0]
        start = next(i for i, y in enumerate(feature["labels"]) if y != IGNORE_INDEX)
        return str(tok.decode(feature["input_ids"][:start])).lower()  # the tiny vocabulary

    assert system_turns(tok, "template") == []
    assert ("you are a helpful assistant" in prompt_of("template")) == default_system
    brief = prompt_of("Answer in one word.")
    assert brief.startswith("<|system|>") and "answer in one word." in brief
    assert "you are a helpful assistant" not in brief
    none = prompt_of("none")
    assert "you are a helpful assistant" not in none
    if default_system:
        assert system_turns(tok, "none") == [{"role": "system", "content": ""}]
        assert none.startswith("<|system|>") and len(none) < len(prompt_of("template"))
    else:
        assert system_turns(tok, "none") == [] and none == prompt_of("template")
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi?"}]
    assert with_system(own, system_turns(tok, "Answer in one word.")) == own
    assert with_system("Hi?", []) == "Hi?"
    plain = build_tiny_causal_backbone(chat_template=False).tokenizer
    assert system_turns(plain, "none") == []
    assert render_turns(plain, with_system("Hi?", system_turns(plain, "Be brief.")), "yes")[
        0
    ].startswith("### System:\nBe brief.")


def test_too_long_prompts_keep_their_answer() -> None:
    objective = _objective(max_length=12)
    for feature in objective.train_features(PAIRS):
        assert len(feature["input_ids"]) == 12
        assert feature["labels"][-1] != IGNORE_INDEX
    with pytest.raises(DataError, match="no room for a prompt"):
        _objective(max_length=2)


def test_answer_only_loss_matches_the_model_s_own_loss_on_each_example() -> None:
    """Left padding, position ids and the last-K logits give the per-token mean of HF's loss."""
    objective = _objective()
    model = objective_model(objective)
    features = objective.train_features(PAIRS)
    batch = objective.collate(features)
    assert batch["input_ids"].shape[1] % 8 == 0
    ours = objective.loss(model, batch, None)
    total, count = 0.0, 0
    for feature in features:
        ids = torch.tensor([feature["input_ids"]])
        labels = torch.tensor([feature["labels"]])
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    assert_close(float(ours), total / count, rtol=1e-5, atol=1e-6)


def test_logit_adjustment_shifts_the_first_answer_token_by_the_label_log_prior() -> None:
    objective = _objective()
    model = objective_model(objective)
    features = objective.train_features(PAIRS)
    batch = objective.collate(features)
    log_prior = torch.tensor([0.7, -1.3])
    ours = objective.loss(model, batch, log_prior)
    with torch.no_grad():
        logits = model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        ).logits
    total, count = 0.0, 0
    for row in range(len(features)):
        labels = batch["labels"][row]
        positions = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        for j, pos in enumerate(positions):
            step = logits[row, pos - 1].float().clone()
            if j == 0:
                for label, answer in enumerate(objective.candidates):
                    step[answer[0]] += log_prior[label]
            total -= float(torch.log_softmax(step, -1)[labels[pos]])
            count += 1
    assert_close(float(ours), total / count, rtol=1e-5, atol=1e-6)
    assert float(ours) != pytest.approx(float(objective.loss(model, batch, None)))


def objective_model(objective: CausalLanguageModeling) -> torch.nn.Module:
    backbone = build_tiny_causal_backbone()
    assert backbone.tokenizer.get_vocab() == objective.tokenizer.get_vocab()
    return backbone.model


def _reference_scores(
    model: torch.nn.Module, objective: CausalLanguageModeling, example: Example
) -> list[float]:
    """Log-likelihood of each answer word after the prompt, one unpadded sequence each."""
    prompt = objective.eval_features([example])[0]["input_ids"]
    scores = []
    for answer in objective.candidates:
        ids = torch.tensor([prompt + answer])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        scores.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer)))
    return scores


@pytest.mark.parametrize("single_token", [True, False])
def test_scoring_picks_the_likeliest_answer(single_token: bool) -> None:
    objective = _objective()
    assert objective.single_token  # "no" and "yes" are one token each
    objective.single_token = single_token  # False: the general path, one row per answer
    model = objective_model(objective)
    with torch.no_grad():
        scored = objective.score(model, objective.collate(objective.eval_features(PAIRS)))
        reference = [_reference_scores(model, objective, e) for e in PAIRS]
    assert scored.labels == [e.label for e in PAIRS]
    assert scored.preds == [max(range(2), key=lambda j: s[j]) for s in reference]
    expected_loss = -sum(s[e.label] for s, e in zip(reference, PAIRS, strict=True))
    assert_close(scored.loss_sum, expected_loss, rtol=1e-5, atol=1e-5)
    assert scored.loss_count == len(PAIRS)


def test_training_fits_the_answers() -> None:
    """A few local steps on four examples make the true answer the likeliest for each."""
    backbone = build_tiny_causal_backbone()
    objective = make_objective(backbone, get_task("mrpc"), 64)
    bank = LoraBank(backbone, [4], scaling=2.0)
    assert len(bank.layer_names()) == 2 * 7 and bank.extra_names() == ()
    train = TrainConfig(local_epochs=30, batch_size=4, learning_rate=0.02, precision="fp32")
    runtime = ModelRuntime(bank, objective, train, torch.device("cpu"))
    features = objective.train_features(PAIRS)
    before = runtime.evaluate({}, {}, objective.eval_features(PAIRS), ("accuracy",), 4)
    reply = runtime.train_client(
        TrainInstruction("c0", 1, 4, 2.0, None, {}, init_seed=1, train_seed=2), features
    )
    deltas = {n: f.low_rank(2.0) for n, f in reply.update.factors.items()}
    after = runtime.evaluate(deltas, {}, objective.eval_features(PAIRS), ("accuracy",), 4)
    assert after["accuracy"] == 1.0
    assert after["loss"] < before["loss"] / 10


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.task_type"):
        load_config(overrides=('model.task_type="chat"',))
    with pytest.raises(ModelError, match="needs a decoder"):
        load_backbone("minilm", task_type="causal-lm")
    with pytest.raises(DataError, match="no instruction form"):
        pair_instruction("sst2")
    with pytest.raises(ConfigError, match=r"data\.system_prompt.*a classifier has none"):
        load_config(overrides=('data.system_prompt="Be brief."',))
    with pytest.raises(ConfigError, match=r"data\.system_prompt.*expected a string"):
        load_config(overrides=('model.task_type="causal-lm"', "data.system_prompt=3"))


def _causal_overrides(model_dir: Path, glue_dir: Path, out: Path) -> list[str]:
    """A tiny causal-LM federation: 3 clients x 2 rounds on 24 MRPC pairs as instructions."""
    extra = {"model.task_type": '"causal-lm"', "model.max_length": 96, "data.train_limit": 24}
    return tiny_overrides(model_dir, glue_dir, out, **extra)


def test_a_causal_lm_federation_runs_exports_and_generates(
    tmp_path: Path, glue_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny causal-LM federation evaluates accuracy and F1 every round; its export at a rank
    that holds the whole update loads with peft and gives the merged model's logits; both
    generate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hlora.export import export_run

    model_dir = save_tiny_causal_model(tmp_path / "tiny-causal")
    overrides = _causal_overrides(model_dir, glue_dir, tmp_path / "runs")
    overrides.append('data.system_prompt="Answer in one word."')
    result = run(load_config(overrides=tuple(overrides)))
    records = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    scored = [r for r in records if "f1" in json.dumps(r)]
    assert len(scored) >= 2  # every round
    assert 0.0 <= result.summary["final"]["accuracy"] <= 1.0

    folder = export_run(result.run_dir, rank=16)  # 16 = min(out, in) of v_proj: exact
    merged_dir = export_run(result.run_dir, rank=1, merged=str(tmp_path / "merged"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the movie was good"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, folder).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        tuned_logits = tuned(input_ids=ids).logits
        assert_close(merged(input_ids=ids).logits, tuned_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)  # training changed it
    for model in (tuned, merged):
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        assert out.shape[1] > ids.shape[1]

    samples = [json.loads(line) for line in (result.run_dir / GENERATIONS_FILE).open()]
    assert len(samples) == 4 and all(s["expected"] in ("yes", "no") for s in samples)
    system = {"role": "system", "content": "Answer in one word."}
    assert samples[0]["prompt"][0] == system and "Sentence 1" in samples[0]["prompt"][1]["content"]
    # ``hlora generate``: the whole update answers as the merged export does, rank 16 as the
    # rank-16 adapter does (both exact here), each prompt opened by the run's system prompt.
    prompts = ["the movie was good", "is it the same?"]
    whole = generate_from_run(result.run_dir, prompts, rank=0, max_new_tokens=4)
    asked = [[system, {"role": "user", "content": p}] for p in prompts]
    assert whole == generate_answers(merged, tokenizer, asked, max_new_tokens=4)
    assert generate_from_run(result.run_dir, prompts, rank=16, max_new_tokens=4) == whole
    assert main(["generate", str(result.run_dir), "--prompt", prompts[0], "--rank", "2"]) == 0
    assert capsys.readouterr().out.startswith(f">>> {prompts[0]}\n")
    with pytest.raises(ConfigError, match="invalid --rank"):
        generate_from_run(result.run_dir, prompts, rank=-1)


def test_generation_refuses_a_classifier_run(
    tmp_path: Path, glue_dir: Path, tiny_bert_dir: Path
) -> None:
    overrides = tiny_overrides(tiny_bert_dir, glue_dir, tmp_path, **{"federation.rounds": 1})
    result = run(load_config(overrides=tuple(overrides)))
    assert not (result.run_dir / GENERATIONS_FILE).exists()
    with pytest.raises(ConfigError, match=r"generation needs model\.task_type = 'causal-lm'"):
        generate_from_run(result.run_dir, ["hello"])
    with pytest.raises(CheckpointError, match="not a run folder"):
        generate_from_run(tmp_path / "nowhere", ["hello"])


def _write_instructions(path: Path, categories: tuple[str, ...] = ("movies", "facts")) -> Path:
    rows = []
    for k in range(24):
        category = categories[k % len(categories)]
        system = [{"role": "system", "content": "answer briefly"}] if k % 3 == 0 else []
        question, answer = (
            (f"was the movie good {k}", "yes it was great")
            if k % 2 == 0
            else ("say what you liked", "i loved the music and the story")
        )
        turns = [*system, {"role": "user", "content": question}]
        turns.append({"role": "assistant", "content": answer})
        rows.append({"messages": turns, "category": category})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_instruction_examples_render_their_own_turns_and_score_by_token_loss(
    tmp_path: Path,
) -> None:
    from hlora.data.instructions import load_instruction_task

    task = load_instruction_task(_write_instructions(tmp_path / "data.jsonl"))
    assert task.task.num_labels == 2 and {e.label for e in task.train} == {0, 1}
    backbone = build_tiny_causal_backbone()
    objective = make_objective(backbone, task.task, 64)
    assert isinstance(objective, CausalLanguageModeling)
    assert not objective.supports_logit_adjustment and objective.metrics == ("perplexity",)
    features = objective.train_features(task.train[:3])
    chat = objective.tokenizer.decode(features[0]["input_ids"])
    assert chat.startswith("<|system|>") and "<|user|>" in chat
    answer = [
        t for t, y in zip(features[0]["input_ids"], features[0]["labels"], strict=True) if y >= 0
    ]
    assert objective.tokenizer.decode(answer).replace(" ", "") == "yesitwasgreat</s>"
    assert objective.eval_features(task.train[:3]) == features
    model = backbone.model
    with torch.no_grad():
        scored = objective.score(model, objective.collate(features))
        total, count = 0.0, 0
        for feature in features:
            labels = torch.tensor([feature["labels"]])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += (
                float(model(input_ids=torch.tensor([feature["input_ids"]]), labels=labels).loss) * n
            )
            count += n
    assert scored.preds == [] and scored.loss_count == count
    assert_close(scored.loss_sum, total, rtol=1e-5, atol=1e-4)
    with pytest.raises(DataError, match="logit adjustment needs label answers"):
        objective.loss(model, objective.collate(features), torch.zeros(2))


def test_an_instruction_federation_partitions_by_category_and_reports_perplexity(
    tmp_path: Path, glue_dir: Path
) -> None:
    model_dir = save_tiny_causal_model(tmp_path / "tiny-causal")
    data = _write_instructions(tmp_path / "train.jsonl")
    overrides = tiny_overrides(
        model_dir,
        glue_dir,
        tmp_path / "runs",
        **{
            "model.task_type": '"causal-lm"',
            "data.task": '"instructions"',
            "data.data_dir": '""',
            "data.train_file": f'"{data}"',
            "data.eval_file": f'"{data}"',
            "data.partition": '"category"',
            "data.min_client_examples": 2,
            "federation.num_clients": 2,
        },
    )
    result = run(load_config(overrides=tuple(overrides)))
    clients = json.loads((result.run_dir / "clients.json").read_text())
    assert len(clients) == 2
    perplexity = result.summary["final"]["perplexity"]
    assert perplexity is not None and perplexity > 1.0
    assert result.summary["majority_class"] == {}
    samples = [json.loads(line) for line in (result.run_dir / GENERATIONS_FILE).open()]
    assert (
        samples[0]["expected"] == "yes it was great" and samples[0]["prompt"][0]["role"] == "system"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            (
                'data.task="instructions"',
                'data.train_file="x.jsonl"',
                "data.validation_fraction=0.1",
            ),
            "model.task_type",
        ),
        (('model.task_type="causal-lm"', 'data.task="instructions"'), "needs a file"),
        (
            (
                'model.task_type="causal-lm"',
                'data.task="instructions"',
                'data.train_file="x.jsonl"',
            ),
            "needs held-out data",
        ),
        (('data.train_file="x.jsonl"',), "only task 'instructions' reads files"),
        (('data.partition="by-topic"',), "data.partition"),
    ],
)
def test_instruction_configuration_errors(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=overrides)


def _own_instructions_config(data: Path, *extra: str) -> RunConfig:
    """A causal-LM run on the instruction file ``data``, 20 % held out, 64 tokens."""
    return load_config(
        overrides=(
            'model.task_type="causal-lm"',
            'data.task="instructions"',
            f'data.train_file="{data}"',
            "data.validation_fraction=0.2",
            "model.max_length=64",
            *extra,
        )
    )


def test_a_node_s_own_instruction_file_is_tokenized_and_cached_whole(tmp_path: Path) -> None:
    from hlora.data.instructions import read_instructions
    from hlora.engines.flower.features import cached_features
    from hlora.engines.flower.node import own_data_files, own_features

    data = _write_instructions(tmp_path / "mine.jsonl")
    config = _own_instructions_config(data)
    backbone = build_tiny_causal_backbone()
    features = own_features(config, backbone, str(data))
    objective = make_objective(backbone, get_task("instructions"), 64)
    assert features == objective.train_features(read_instructions(data))
    assert len(features) == 24 and own_data_files(str(data), "instructions") == [data]
    calls: list[int] = []

    def make() -> list[dict]:
        calls.append(1)
        return features

    first = cached_features(tmp_path / "cache", "k", make)
    again = cached_features(tmp_path / "cache", "k", make)
    assert first == again == features and len(calls) == 1
    assert isinstance(again[0]["labels"], list) and isinstance(again[0]["class_label"], int)


def test_a_node_s_cached_features_follow_its_system_prompt(tmp_path: Path) -> None:
    """Features cached under one system prompt are never read back under another."""
    from hlora.engines.flower.node import NodeData, node_features

    data = _write_instructions(tmp_path / "mine.jsonl")
    backbone = build_tiny_causal_backbone()
    node = NodeData("own", own_data=str(data), cache_dir=str(tmp_path / "cache"))

    def features(system_prompt: str) -> list[dict]:
        config = _own_instructions_config(data, f'data.system_prompt="{system_prompt}"')
        return node_features(config, backbone, node)

    plain = features("template")
    brief = features("Answer in one word.")
    assert brief != plain and len(list((tmp_path / "cache").rglob("*.npz"))) == 2
    assert features("template") == plain


def test_a_hub_dataset_fails_at_once_when_the_hub_is_off(tmp_path: Path) -> None:
    """``hub:NAME`` goes to the hub loader, which refuses before any network call offline."""
    from hlora.federation import load_run_task

    config = load_config(
        overrides=(
            'model.task_type="causal-lm"',
            'data.task="instructions"',
            'data.train_file="hub:databricks/databricks-dolly-15k"',
            "data.validation_fraction=0.1",
        )
    )
    with pytest.raises(
        DataError, match=r"hub dataset 'databricks/databricks-dolly-15k'.*switched off"
    ):
        load_run_task(config)


@pytest.mark.distributed
@pytest.mark.usefixtures("flower_env")
def test_flower_simulation_matches_inprocess_for_a_causal_lm(
    tmp_path: Path, glue_dir: Path
) -> None:
    """The causal-LM objective runs in Flower's simulation with the in-process engine's
    results: the same clients, payloads and metrics."""
    import math

    from hlora.config import replace
    from hlora.engines.flower.simulation import run_flower_simulation

    model_dir = save_tiny_causal_model(tmp_path / "tiny-causal")
    overrides = _causal_overrides(model_dir, glue_dir, tmp_path / "runs")
    config = load_config(overrides=tuple(overrides))
    reference = run(replace(config, output={"name": "inprocess"}), progress=False)
    flower = run_flower_simulation(
        replace(config, output={"name": "flower"}), tmp_path / "flower", progress=False
    )
    ref, got = (
        [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
        for r in (reference, flower)
    )
    assert [r["round"] for r in got] == [1, 2]
    for a, b in zip(ref, got, strict=True):
        for ca, cb in zip(a["clients"], b["clients"], strict=True):
            assert cb["client_id"] == ca["client_id"] and cb["accepted"]
            assert cb["bytes_sent"] == ca["bytes_sent"]  # round 1: no head, no factors yet
            assert cb["bytes_received"] == ca["bytes_received"] > 0
            assert math.isclose(cb["loss"], ca["loss"], rel_tol=1e-4, abs_tol=1e-5)
        assert b["eval"]["accuracy"] == a["eval"]["accuracy"]
        assert math.isclose(b["eval"]["loss"], a["eval"]["loss"], rel_tol=1e-4, abs_tol=1e-5)
    assert (flower.run_dir / GENERATIONS_FILE).is_file()


def test_checkpointing_uses_the_old_name_on_transformers_releases_before_the_rename() -> None:
    """transformers before the 5.x rename has only ``gradient_checkpointing_enable``; both
    names get non-reentrant checkpointing."""
    from hlora.stack import _enable_activation_checkpointing

    calls: list[tuple[str, object]] = []

    class Old:
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: object) -> None:
            calls.append(("gradient", gradient_checkpointing_kwargs))

    class New(Old):
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs: object) -> None:
            calls.append(("activation", activation_checkpointing_kwargs))

    _enable_activation_checkpointing(Old())  # type: ignore[arg-type]
    _enable_activation_checkpointing(New())  # type: ignore[arg-type]
    off = {"use_reentrant": False}
    assert calls == [("gradient", off), ("activation", off)]


def test_gradient_checkpointing_gives_the_same_update(tmp_path: Path) -> None:
    """``train.gradient_checkpointing`` recomputes activations: the same loss and factors."""
    from hlora.stack import build_stack

    model_dir = save_tiny_causal_model(tmp_path / "tiny-causal")
    replies = []
    for checkpointing in (False, True):
        config = load_config(
            overrides=(
                f'model.name="{model_dir}"',
                'model.task_type="causal-lm"',
                "model.lora_dropout=0.0",
                f"train.gradient_checkpointing={str(checkpointing).lower()}",
                'train.precision="fp32"',
            )
        )
        stack = build_stack(config, [4])
        assert stack.backbone.model.is_activation_checkpointing is checkpointing
        features = stack.objective.train_features(PAIRS)
        instruction = TrainInstruction("c0", 1, 4, 2.0, None, {}, init_seed=1, train_seed=2)
        replies.append(stack.runtime.train_client(instruction, features))
    plain, checkpointed = replies
    assert checkpointed.loss == pytest.approx(plain.loss, rel=1e-5)
    for name, f in plain.update.factors.items():
        assert_close(checkpointed.update.factors[name].B, f.B, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config(overrides=('train.gradient_checkpointing="yes"',))


@pytest.mark.slow
def test_the_real_smollm2_instruction_tunes_exports_and_generates(
    tmp_path: Path, glue_dir: Path
) -> None:
    """SmolLM2-135M-Instruct end to end as a causal LM: two clients (ranks 2 and 8) train a round
    on MRPC pairs asked as questions; the global model is scored by answer likelihood (accuracy
    and F1 on the 8 dev pairs, each rank's truncation too) and writes its sample answers; the
    rank-16 export (which holds the whole update: rank <= 2 + 8) loads with peft on the base the
    adapter names, changes the model, and answers as ``hlora generate`` does."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hlora.export import export_run

    overrides = (
        "model.name=smollm2-135m",
        'model.task_type="causal-lm"',
        "model.max_length=160",
        f'data.data_dir="{glue_dir}"',
        "data.train_limit=8",
        "data.dev_limit=8",
        "federation.num_clients=2",
        "federation.rounds=1",
        "federation.ranks=[2, 8]",
        "train.batch_size=4",
        "server.eval_truncations=final",
        f'output.dir="{tmp_path / "runs"}"',
        "output.progress=false",
    )
    result = run(load_config(None, overrides), progress=False)
    final = result.summary["final"]
    assert 0.0 <= final["accuracy"] <= 1.0 and 0.0 <= final["f1"] <= 1.0
    assert sorted(result.summary["final_by_rank"]) == ["2", "8"]
    samples = [json.loads(line) for line in (result.run_dir / GENERATIONS_FILE).open()]
    assert len(samples) == 4 and all(s["expected"] in ("yes", "no") for s in samples)
    assert all(s["answer"].strip() for s in samples)

    folder = export_run(result.run_dir, rank=16)
    base_path = PeftConfig.from_pretrained(folder).base_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    prompt = "Do these two sentences mean the same thing? A: It rained. B: It was raining."
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_path)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        tuned_logits = tuned(input_ids=ids).logits
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)  # training changed it
    answer = generate_answers(tuned, tokenizer, [prompt], max_new_tokens=6)
    assert answer == generate_from_run(result.run_dir, [prompt], rank=16, max_new_tokens=6)
    assert answer[0].strip()
