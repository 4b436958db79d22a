"""Causal-LM tasks on a tiny Llama saved to disk: data, loss masking, generation metrics,
the runner end to end, and the PEFT / merged export round trip (docs/decoders.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from increlora import cli
from increlora.tasks import CausalFormatError, get_task, load_task
from increlora.tasks.causal_lm import (
    PromptResponse,
    read_jsonl,
    read_natural_instructions,
    short_instruction,
)
from increlora.tasks.generation_metrics import (
    exact_match,
    generation_scores,
    normalize_answer,
    token_f1,
)

WORDS = (
    "what is the a of color sky blue red green grass sun yellow fact question answer"
    " and earthquakes can damage buildings how do cause shaking ground plants need water light"
    " write correct to given based on associated"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_tokenizer(chat_template: str | None = None):
    """A word-level tokenizer with BOS/EOS/PAD (splits on whitespace and punctuation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<s>", "</s>", "<user>", "<assistant>", "<system>"]
    vocab = {w: i for i, w in enumerate([*special, *sorted(set(WORDS)), *".,?!'_:"])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    raw.decoder = decoders.WordPiece()  # joins tokens with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-16 LlamaForCausalLM and its tokenizer, saved like a hub model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


QA = [
    ("what is the color of the sky?", "blue."),
    ("what is the color of grass?", "green."),
    ("what is the color of the sun?", "yellow."),
    ("what do plants need?", "water and light."),
    ("what can damage buildings?", "earthquakes."),
    ("how do earthquakes cause damage?", "shaking of the ground."),
]


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jsonl")
    train = [{"prompt": q, "response": a} for q, a in QA * 2]
    train[1] = {"messages": [{"role": "user", "content": QA[1][0]}, {"role": "assistant", "content": QA[1][1]}]}  # fmt: skip
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "validation.jsonl", [{"prompt": q, "response": a} for q, a in QA[:4]])
    write_jsonl(out / "test.jsonl", [{"prompt": q, "response": a} for q, a in QA[2:]])
    return out


# ------------------------------------------------------------------ SQuAD metrics
@pytest.mark.parametrize(
    "text,normalized",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple,  a pear ", "apple pear"),
        ("Theater", "theater"),  # 'the' only as a word
        ("earthquakes.", "earthquakes"),
    ],
)
def test_normalize_answer_as_squad(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_exact_match_and_f1_hand_computed() -> None:
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("a black cat", "the cat") == 0.0
    # pred {black, cat} vs ref {cat}: precision 1/2, recall 1 -> F1 2/3
    assert token_f1("a black cat", "the cat") == pytest.approx(2 / 3)
    # pred {in, 1876} vs ref {1876}: P 1/2, R 1 -> 2/3 (SQuAD's classic example)
    assert token_f1("in 1876", "1876") == pytest.approx(2 / 3)
    # repeated tokens count as a bag: {cat, cat} vs {cat}: common 1, P 1/2, R 1
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    # several references: the best one counts; means over examples
    scores = generation_scores(
        ["Denver Broncos", "in 1876", "dog"],
        [("Broncos", "Denver Broncos"), ("1876",), ("cat",)],
    )
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


# ------------------------------------------------------------------ data sources
def test_natural_instructions_parser(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    data = {
        "task_prefix": "Definition: long text. Prompt: Answer the question from the fact.",
        "examples": [
            {"input": "Fact: sun is yellow. \nQuestion: what is yellow?", "target": ["sun."]},
            {"input": "Fact: x. \nQuestion: y?", "target": "z."},
            {"input": "Fact: x. \nQuestion: y?", "target": ["dup."]},
            {"input": "Q?", "target": ["a.", "b.", "a."]},
        ],
    }
    path.write_text(json.dumps(data))
    examples, info = read_natural_instructions(path)
    assert len(examples) == 3 and info["dropped_duplicates"] == 1
    assert examples[0].prompt == (
        "Answer the question from the fact.\n\nFact: sun is yellow. \nQuestion: what is yellow?"
    )
    assert examples[0].response == "sun." and examples[1].references == ("z.",)
    assert examples[2].references == ("a.", "b.")
    assert short_instruction("no marker here") == "no marker here"
    data["examples"].append({"input": "Q2?", "target": [3]})
    path.write_text(json.dumps(data))
    with pytest.raises(CausalFormatError, match=r"examples\[4\]: field 'target'"):
        read_natural_instructions(path)


def test_offline_causal_task_splits_are_seeded_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    items = [{"input": f"Question {i}?", "target": [f"answer {i}."]} for i in range(1700)]
    path.write_text(json.dumps({"task_prefix": "Prompt: Answer.", "examples": items}))
    data = load_task("qasc", path, seed=3, train_size=50, validation_size=100)
    info = data.split_info
    assert info["full_sizes"] == {"train": 600, "validation": 100, "test": 1000}
    assert info["sizes"] == {"train": 50, "validation": 100, "test": 1000}
    assert data.task.eval_splits == ("validation", "test") and data.task.main_metric == (
        "exact_match"
    )
    again = load_task("qasc", path, seed=4, train_size=60, validation_size=100)
    assert again.split_info["sha256"]["test"] == info["sha256"]["test"]
    assert again.split_info["sha256"]["validation"] == info["sha256"]["validation"]
    prompts = {split: {ex.prompt for ex in exs} for split, exs in data.evals.items()}
    assert not prompts["test"] & prompts["validation"]
    assert not {ex.prompt for ex in again.train} & (prompts["test"] | prompts["validation"])
    other = load_task("qasc", path, split_seed=1)
    assert other.split_info["sha256"]["test"] != info["sha256"]["test"]
    assert get_task("WinoGrande").name == "winogrande"


def test_jsonl_records_prompt_response_and_messages(jsonl_dir: Path) -> None:
    data = load_task("jsonl", jsonl_dir)
    assert data.task.eval_splits == ("validation", "test")
    assert len(data.train) == 12 and data.split_info["sizes"]["test"] == 4
    from_messages = data.train[1]
    assert from_messages.messages == ({"role": "user", "content": QA[1][0]},)
    assert from_messages.response == QA[1][1]


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", r"train\.jsonl:2: not valid JSON"),
        ('["a"]', r"train\.jsonl:2: expected a JSON object"),
        ('{"prompt": "q"}', r"train\.jsonl:2: missing field 'response'"),
        ('{"prompt": 3, "response": "a"}', r"train\.jsonl:2: field 'prompt' must be a string"),
        ('{"prompt": "q", "response": "  "}', r"train\.jsonl:2: field 'response' is empty"),
        ('{"messages": "hi"}', r"train\.jsonl:2: field 'messages' must be a list"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}',
            r"train\.jsonl:2: field 'messages\[1\]\.role' must be one of",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "q"}, {"role": "user", "content": "a"}]}',
            r"train\.jsonl:2: field 'messages\[1\]\.role' must be 'assistant'",
        ),
        (
            '{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]}',
            r"train\.jsonl:2: field 'messages\[0\]\.content' must be a string",
        ),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "q", "response": "a"}\n' + line + "\n")
    with pytest.raises(CausalFormatError, match=message):
        read_jsonl(path)


def test_jsonl_cli_errors_are_one_line(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "response": "a"}])
    (tmp_path / "validation.jsonl").write_text('{"prompt": "q", "answer": "a"}\n')
    args = ["train", "--model", str(tiny_llama_dir), "--task", "jsonl"]
    code = cli.main([*args, "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "validation.jsonl:1: missing field 'response'" in err
    (tmp_path / "validation.jsonl").unlink()
    code = cli.main([*args, "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "r")])
    assert code == 2 and "validation.jsonl" in capsys.readouterr().err


# ------------------------------------------------------------------ encoding
def test_loss_masks_the_prompt_and_appends_eos() -> None:
    from increlora.runner.generation import CausalCollator, CausalLMDataset, encode

    tokenizer = make_tokenizer()
    example = PromptResponse(
        ({"role": "user", "content": "what is the sky?"},), "blue.", ("blue.",)
    )
    dataset = CausalLMDataset([example], tokenizer, max_length=64)
    item = dataset[0]
    plain = tokenizer("what is the sky?\n")["input_ids"]  # plain format: prompt + "\n", BOS
    assert plain[0] == tokenizer.bos_token_id
    response = tokenizer("blue.", add_special_tokens=False)["input_ids"]
    assert item["input_ids"] == plain + response + [tokenizer.eos_token_id]
    assert item["labels"] == [-100] * len(plain) + response + [tokenizer.eos_token_id]
    short = PromptResponse(({"role": "user", "content": "sky?"},), "blue.", ("blue.",))
    batch = CausalCollator(tokenizer.pad_token_id, generation=True)(
        [item, CausalLMDataset([short], tokenizer, 64)[0]]
    )
    # training side: right padding, padding labelled -100
    assert batch["input_ids"][1, -1] == tokenizer.pad_token_id and batch["labels"][1, -1] == -100
    assert batch["attention_mask"][1].tolist()[-1] == 0
    # generation side: prompts padded on the LEFT
    assert batch["prompt_input_ids"][1, 0] == tokenizer.pad_token_id
    assert batch["prompt_attention_mask"][1, 0] == 0 and batch["prompt_attention_mask"][1, -1] == 1
    # truncation keeps the end of the prompt and the response
    cut = encode(tokenizer, example, max_length=6)
    assert cut.truncated and len(cut.prompt) + len(cut.response) == 6
    assert cut.response == response + [tokenizer.eos_token_id]


def test_training_loss_is_the_mean_response_token_loss_of_the_evaluation() -> None:
    """The model's own loss on a padded batch = response_loss (what evaluation reports)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from increlora.runner.generation import CausalCollator, CausalLMDataset, response_loss

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    examples = [PromptResponse(({"role": "user", "content": q},), a, (a,)) for q, a in QA[:3]]
    dataset = CausalLMDataset(examples, tokenizer, 64)
    batch = CausalCollator(tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    with torch.no_grad():
        out = model(**batch)
    sums, counts = response_loss(out.logits, batch["labels"])
    response_tokens = [len(e.response) for e in dataset.encoded]
    assert counts.tolist() == response_tokens  # response + EOS, nothing of the prompt
    assert float(sums.sum() / counts.sum()) == pytest.approx(float(out.loss), rel=1e-5)


def test_chat_template_is_used_when_the_tokenizer_has_one() -> None:
    from increlora.runner.generation import encode

    tokenizer = make_tokenizer(CHAT_TEMPLATE)
    example = PromptResponse(
        ({"role": "system", "content": "answer"}, {"role": "user", "content": "sky?"}),
        "blue.",
        ("blue.",),
    )
    encoded = encode(tokenizer, example, 64)
    text = "<system> answer </s><user> sky? </s><assistant>"
    assert encoded.prompt == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded.response[-1] == tokenizer.eos_token_id


def test_length_grouped_sampler_is_seeded_and_groups_lengths() -> None:
    from increlora.runner.generation import LengthGroupedSampler

    lengths = list(range(40))
    sampler = LengthGroupedSampler(lengths, batch_size=2, seed=0)
    sampler.chunk = 10
    first = list(sampler)
    assert sorted(first) == lengths and list(sampler) == first
    for start in range(0, 40, 10):  # longest first inside each chunk
        chunk = [lengths[i] for i in first[start : start + 10]]
        assert chunk == sorted(chunk, reverse=True)
    sampler.set_epoch(1)
    assert list(sampler) != first


# ------------------------------------------------------------------ end to end
def causal_args(model: Path, data: Path, out: Path) -> list[str]:
    """A 6-step IncreLoRA run (growth every step from step 1), evaluated at steps 3 and 6."""
    return [
        "train",
        "--model",
        str(model),
        "--task",
        "jsonl",
        "--data-dir",
        str(data),
        "--batch-size",
        "4",
        "--max-steps",
        "6",
        "--eval-every",
        "3",
        "--log-every",
        "1",
        "--lr",
        "0.05",
        "--max-length",
        "48",
        "--max-new-tokens",
        "6",
        "--output-dir",
        str(out),
        "--method-arg",
        "init_warmup=1",
        "--method-arg",
        "interval=1",
        "--method-arg",
        "top_h=4",
    ]


@pytest.fixture(scope="module")
def causal_run(tiny_llama_dir: Path, jsonl_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "llama-jsonl"
    code = cli.main(causal_args(tiny_llama_dir, jsonl_dir, out))
    assert code == 0
    return out


def test_causal_run_writes_the_output_contract(causal_run: Path) -> None:
    metrics = json.loads((causal_run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["steps"] == 6
    assert metrics["main_metric"] == "exact_match" and metrics["eval_split"] == "validation"
    for split in ("validation", "test"):
        scores = metrics["final"]["metrics"][split]
        assert set(scores) == {"exact_match", "f1", "loss", "perplexity"}
        assert scores["perplexity"] == pytest.approx(float(torch.tensor(scores["loss"]).exp()))
    # the Llama preset: q, k, v, o, gate, up, down in each of the 2 layers
    assert {name.rsplit(".", 1)[-1] for name in metrics["ranks"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert len(metrics["ranks"]) == 14 and metrics["resolved"]["trained_modules"] == []
    assert (causal_run / "increlora_adapter").is_dir()
    config = json.loads((causal_run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None
    records = [json.loads(x) for x in (causal_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == [3, 6]
    assert all(r["loss"] > 0 for r in records if r["event"] == "train")
    samples = [json.loads(x) for x in (causal_run / "samples.jsonl").read_text().splitlines()]
    assert {s["split"] for s in samples} == {"validation", "test"}
    assert samples[0]["step"] == metrics["adapter"]["step"]
    assert {"prompt", "references", "generation", "exact_match", "f1"} <= set(samples[0])


def _prompts(run: Path, tokenizer, split: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The left-padded prompts of a split, as the run's evaluation built them."""
    from increlora.runner.generation import CausalCollator, CausalLMDataset

    config = json.loads((run / "run_config.json").read_text())
    data = load_task("jsonl", config["data"]["data_dir"])
    dataset = CausalLMDataset(data.evals[split], tokenizer, config["data"]["max_length"])
    batch = CausalCollator(tokenizer.pad_token_id, generation=True)(
        [dataset[i] for i in range(len(dataset))]
    )
    return batch["prompt_input_ids"], batch["prompt_attention_mask"], list(range(len(dataset)))


def _sample_ids(run: Path, split: str) -> dict[int, list[int]]:
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    return {s["index"]: s["generated_ids"] for s in samples if s["split"] == split}


def _greedy(model, tokenizer, run: Path, split: str) -> dict[int, list[int]]:
    from increlora.runner.generation import greedy_generate

    ids, mask, order = _prompts(run, tokenizer, split)
    tokens = greedy_generate(model, ids, mask, 6, tokenizer.pad_token_id, tokenizer.eos_token_id)
    return {
        i: [t for t in row if t != tokenizer.pad_token_id] for i, row in zip(order, tokens.tolist())
    }


def test_peft_and_merged_exports_generate_what_the_run_generated(
    causal_run: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from increlora.adapter import load_adapter

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    expected = {split: _sample_ids(causal_run, split) for split in ("validation", "test")}
    assert all(expected.values())

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()

    ids, mask, _ = _prompts(causal_run, tokenizer, "validation")
    with torch.no_grad():
        base_logits = base()(input_ids=ids, attention_mask=mask).logits
        own = load_adapter(base(), causal_run / "increlora_adapter").model.eval()
        own_logits = own(input_ids=ids, attention_mask=mask).logits
        peft_model = PeftModel.from_pretrained(base(), causal_run / "adapter").eval()
        peft_logits = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (own_logits - base_logits).abs().max() > 1e-4, "the adapter must change the model"
    torch.testing.assert_close(peft_logits, own_logits, atol=1e-4, rtol=1e-4)
    for split, tokens in expected.items():
        assert _greedy(peft_model, tokenizer, causal_run, split) == tokens, split

    merged_dir = tmp_path / "merged"
    code = cli.main(
        ["export", "--adapter", str(causal_run / "adapter"), "--output", str(merged_dir)]
    )
    assert code == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    for split, tokens in expected.items():
        assert _greedy(merged, merged_tokenizer, causal_run, split) == tokens, split


def test_base_model_evaluation_is_the_plain_base_models(
    causal_run: Path, tiny_llama_dir: Path
) -> None:
    """metrics.json base_model = a plain transformers model of the base checkpoint, greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from increlora.runner.generation import decode_generation
    from increlora.tasks.generation_metrics import generation_scores

    metrics = json.loads((causal_run / "metrics.json").read_text())
    base = metrics["base_model"]["metrics"]
    assert set(base) == {"validation", "test"}
    assert metrics["base_model"]["main"] == base["validation"]["exact_match"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    config = json.loads((causal_run / "run_config.json").read_text())
    data = load_task("jsonl", config["data"]["data_dir"])
    for split in ("validation", "test"):
        with torch.no_grad():
            generated = _greedy(plain, tokenizer, causal_run, split)
        predictions = [decode_generation(tokenizer, generated[i]) for i in sorted(generated)]
        references = [data.evals[split][i].references for i in sorted(generated)]
        expected = generation_scores(predictions, references)
        assert base[split]["exact_match"] == pytest.approx(expected["exact_match"])
        assert base[split]["f1"] == pytest.approx(expected["f1"])
    # the trained adapter moved away from the base model
    assert base["validation"]["loss"] != metrics["best"]["metrics"]["validation"]["loss"]
    records = [json.loads(x) for x in (causal_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval_base"] == [0]


def test_evaluate_reproduces_the_run_metrics(causal_run: Path, capsys) -> None:
    metrics = json.loads((causal_run / "metrics.json").read_text())
    best = metrics["best"]["metrics"]
    for adapter in ("adapter", "increlora_adapter"):
        assert cli.main(["evaluate", "--adapter", str(causal_run / adapter)]) == 0
        shown = json.loads(capsys.readouterr().out)
        for split, scores in best.items():
            assert shown["metrics"][split]["exact_match"] == scores["exact_match"]
            assert shown["metrics"][split]["f1"] == pytest.approx(scores["f1"])
            assert shown["metrics"][split]["loss"] == pytest.approx(scores["loss"], rel=1e-4)


def test_a_causal_run_learns_to_answer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """IncreLoRA on the tiny Llama memorises 6 answers: greedy exact match from 0 to >= 0.8
    (the prompt masking, EOS and generation path end to end; 100 steps, ~4 s)."""
    data = tmp_path / "data"
    data.mkdir()
    records = [{"prompt": q, "response": a} for q, a in QA]
    write_jsonl(data / "train.jsonl", records)
    write_jsonl(data / "validation.jsonl", records)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama_dir), "--task", "jsonl", "--data-dir", str(data)]
    args += ["--batch-size", "6", "--max-steps", "100", "--eval-every", "50", "--lr", "0.05"]
    args += ["--max-new-tokens", "8", "--target-rank", "8", "--warmup-ratio", "0"]
    assert cli.main([*args, "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best"]["metrics"]["validation"]["exact_match"] >= 0.8
    assert metrics["base_model"]["metrics"]["validation"]["exact_match"] == 0.0


def test_causal_run_stopped_and_resumed_equals_the_uninterrupted_run(
    causal_run: Path, tiny_llama_dir: Path, jsonl_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "resumed"
    args = causal_args(tiny_llama_dir, jsonl_dir, out)
    assert cli.main([*args, "--stop-at-step", "4"]) == 0
    assert not (out / "metrics.json").exists()
    assert cli.main(["train", "--resume", "--output-dir", str(out)]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (causal_run, out))
    for key in ("final", "best", "base_model", "ranks", "trainable_params", "steps"):
        assert a[key] == b[key], key
    assert (causal_run / "samples.jsonl").read_text() == (out / "samples.jsonl").read_text()


def test_base_model_evaluation_leaves_training_unchanged(
    causal_run: Path, tiny_llama_dir: Path, jsonl_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "no-base"
    assert cli.main([*causal_args(tiny_llama_dir, jsonl_dir, out), "--no-eval-base"]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (causal_run, out))
    assert "base_model" in a and "base_model" not in b
    for key in ("final", "best", "ranks", "steps"):
        assert a[key] == b[key], key


def test_a_gguf_loaded_model_becomes_plain_so_the_merged_export_saves(tmp_path: Path) -> None:
    """transformers keeps its GGUF "quantizer" on a model whose weights it has dequantized;
    save_pretrained then refuses it. The loader turns such a model into a plain one."""
    from transformers import LlamaForCausalLM
    from transformers.quantizers.auto import get_hf_quantizer

    from increlora.runner.model import _as_plain_model

    model = tiny_llama()
    # what from_pretrained(..., gguf_file=...) attaches (transformers' own quantizer object)
    quantizer, model.config, *_ = get_hf_quantizer(model.config, None, None, True, {}, "m.gguf")
    model.hf_quantizer, model.is_quantized = quantizer, True
    model.config.quantization_config = quantizer.quantization_config
    with pytest.raises(ValueError, match="gguf"):
        model.save_pretrained(tmp_path / "refused")
    plain = _as_plain_model(model)
    plain.save_pretrained(tmp_path / "saved")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "saved")
    assert getattr(reloaded.config, "quantization_config", None) is None
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_gradient_checkpointing_changes_nothing_but_memory(
    causal_run: Path, tiny_llama_dir: Path, jsonl_dir: Path, tmp_path: Path
) -> None:
    """Recomputing activations re-runs each layer's forward in the backward pass: IncreLoRA's
    task-gradient capture must still see each step once (same scores, ranks and metrics)."""
    out = tmp_path / "checkpointed"
    args = [*causal_args(tiny_llama_dir, jsonl_dir, out), "--gradient-checkpointing"]
    assert cli.main(args) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (causal_run, out))
    assert a["ranks"] == b["ranks"]
    for split, scores in a["final"]["metrics"].items():
        for name, value in scores.items():
            assert b["final"]["metrics"][split][name] == pytest.approx(value, rel=1e-4), name

    def growth(run: Path) -> list[dict]:
        records = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
        return [r for r in records if r["event"] == "growth"]

    grown_a, grown_b = growth(causal_run), growth(out)
    assert len(grown_a) == len(grown_b) > 0
    for x, y in zip(grown_a, grown_b):
        assert [g["module"] for g in x["grown"]] == [g["module"] for g in y["grown"]]
        for name, score in x["scores"].items():
            assert y["scores"][name] == pytest.approx(score, rel=1e-3, abs=1e-12), name
