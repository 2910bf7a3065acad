"""preftune.data: loaders for every file type and kind, validation errors, rankings, tokenization."""

from __future__ import annotations

import csv
import json
import logging

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from preftune.data import (DataError, PairRecord, PromptRecord, RankingRecord, SFTRecord,
                           UnpairedRecord, encode_prompt_completion, load_records, pairs_to_unpaired,
                           rankings_to_pairs, read_rows, render, tokenize_pairs, tokenize_sft)

SYSTEM = "You are a helpful assistant."
# ChatML with a BOS in the template and a default system prompt when the conversation has none:
# the two things that get duplicated when a template is applied per segment.
CHATML = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + SYSTEM +
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def backend():
    """A byte-level BPE trained here (offline, lossless on any text) whose encoder adds BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([SYSTEM, "The capital of France is Paris.", "What is two plus two?"] * 4,
                            trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    return tok


def make_tokenizer(backend, template=CHATML):
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", chat_template=template)


@pytest.fixture(scope="module")
def tokenizer(backend):
    return make_tokenizer(backend)


# ------------------------------------------------------------------------------------ file writers

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_json(path, rows):
    path.write_text(json.dumps(rows), encoding="utf-8")
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def csv_cell(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)
    return str(path)


def write_saved(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


WRITERS = {"jsonl": write_jsonl, "json": write_json, "parquet": write_parquet, "csv": write_csv,
           "saved": write_saved}

ROWS = {
    "sft": [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "Hi", "completion": " Hello!"}],
    "pairs": [{"prompt": "Sky?", "chosen": " Blue.", "rejected": " Green."}],
    "rankings": [{"prompt": "Q", "completions": [" a", " b", " c"], "ranking": [[1], [0, 2]]}],
    "unpaired": [{"prompt": "Q", "completion": " yes", "label": True},
                 {"prompt": "Q", "completion": " no", "label": False}],
    "prompts": [{"prompt": "Tell me a joke."}],
}
EXPECTED = {
    "sft": [SFTRecord("2+2=", " 4"), SFTRecord("Hi", " Hello!")],
    "pairs": [PairRecord("Sky?", " Blue.", " Green.")],
    "rankings": [RankingRecord("Q", [" a", " b", " c"], [[1], [0, 2]])],
    "unpaired": [UnpairedRecord("Q", " yes", True), UnpairedRecord("Q", " no", False)],
    "prompts": [PromptRecord("Tell me a joke.")],
}
CONVERSATION = [user("What is the capital of France?"), assistant("Paris.")]


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("kind", sorted(ROWS))
def test_every_kind_loads_from_every_file_type(tmp_path, fmt, kind):
    suffix = "" if fmt == "saved" else "." + fmt
    source = WRITERS[fmt](tmp_path / f"data{suffix}", ROWS[kind])
    records = load_records(source, kind)
    assert records == EXPECTED[kind]
    assert [r.row for r in records] == list(range(1, len(records) + 1))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "saved"])
def test_conversational_rows_load_from_every_file_type(tmp_path, fmt):
    rows = [{"messages": CONVERSATION}]
    suffix = "" if fmt == "saved" else "." + fmt
    [record] = load_records(WRITERS[fmt](tmp_path / f"d{suffix}", rows), "sft")
    assert record == SFTRecord([CONVERSATION[0]], [CONVERSATION[1]])


@pytest.mark.parametrize("fmt", ["parquet", "saved"])
def test_columnar_null_columns_count_as_absent(tmp_path, fmt):
    # Mixed row shapes in one table: each row holds None in the other shape's columns.
    rows = [{"messages": CONVERSATION, "prompt": None, "completion": None},
            {"messages": None, "prompt": [user("Hi")], "completion": [assistant("Yo")]}]
    suffix = "" if fmt == "saved" else "." + fmt
    got = load_records(WRITERS[fmt](tmp_path / f"d{suffix}", rows), "sft")
    assert got == [SFTRecord([CONVERSATION[0]], [CONVERSATION[1]]),
                   SFTRecord([user("Hi")], [assistant("Yo")])]


def test_csv_cells_hold_json_messages(tmp_path):
    rows = [{"prompt": [user("Hi")], "chosen": [assistant("Hello")], "rejected": [assistant("Bye")]}]
    assert load_records(write_csv(tmp_path / "d.csv", rows), "pairs") == [
        PairRecord([user("Hi")], [assistant("Hello")], [assistant("Bye")])]


def test_sft_shapes(tmp_path):
    rows = [{"prompt": [user("Hi")], "completion": [assistant("Hello")]},
            {"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Yo")]},
            {"text": "Once upon a time."}]
    got = load_records(write_jsonl(tmp_path / "d.jsonl", rows), "sft")
    assert got == [SFTRecord([user("Hi")], [assistant("Hello")]),
                   SFTRecord([{"role": "system", "content": "Be brief."}, user("Hi")],
                             [assistant("Yo")]),
                   SFTRecord("", "Once upon a time.")]


def test_prompts_from_messages_and_unpaired_int_labels(tmp_path):
    [p] = load_records(write_jsonl(tmp_path / "p.jsonl", [{"messages": [user("Hi")]}]), "prompts")
    assert p == PromptRecord([user("Hi")])
    rows = [{"prompt": "Q", "completion": " a", "label": 1}, {"prompt": "Q", "completion": " b",
                                                              "label": 0}]
    got = load_records(write_jsonl(tmp_path / "u.jsonl", rows), "unpaired")
    assert [r.label for r in got] == [True, False]


def test_json_with_split_key_and_saved_datasetdict(tmp_path):
    import datasets

    path = tmp_path / "d.json"
    path.write_text(json.dumps({"test": ROWS["pairs"], "train": ROWS["pairs"] * 2}))
    assert len(load_records(str(path), "pairs")) == 2
    assert len(load_records(str(path), "pairs", split="test")) == 1
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS["sft"]),
                               "test": datasets.Dataset.from_list(ROWS["sft"][:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_records(str(tmp_path / "dd"), "sft", split="test") == EXPECTED["sft"][:1]
    with pytest.raises(DataError, match="no split 'validation'; the dataset has 'train', 'test'"):
        load_records(str(tmp_path / "dd"), "sft", split="validation")


def test_builtin_dataset_is_valid_sft_chat_data():
    records = load_records("builtin:tiny_instructions", "sft")
    assert len(records) >= 60
    assert all(r.prompt[-1]["role"] == "user" and r.completion[0]["role"] == "assistant"
               for r in records)
    assert len({r.prompt[-1]["content"] for r in records}) == len(records)  # no duplicates
    with pytest.raises(DataError, match="no built-in dataset 'nope'; available: .*tiny_instructions"):
        load_records("builtin:nope", "sft")


def test_hub_names_go_to_datasets_and_offline_is_a_clear_error(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError("Couldn't reach 'someone/prefs' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="no such file or directory, and loading it as a Hugging "
                                        "Face hub dataset failed") as e:
        load_records("someone/prefs", "pairs")
    assert e.value.source == "someone/prefs"
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, split: datasets.Dataset.from_list(ROWS["pairs"]))
    assert load_records("someone/prefs", "pairs") == EXPECTED["pairs"]


def test_implicit_prompt_pairs(tmp_path):
    system = {"role": "system", "content": "Be kind."}
    rows = [{"chosen": [system, user("Hi"), assistant("Hello!")],
             "rejected": [system, user("Hi"), assistant("Go away.")]},
            {"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    # One form per file (a mixed file is an error, see below): each shape from its own file.
    got = [load_records(write_jsonl(tmp_path / f"d{i}.jsonl", [row]), "pairs")[0] for i, row in enumerate(rows)]
    assert got == [PairRecord([system, user("Hi")], [assistant("Hello!")], [assistant("Go away.")]),
                   PairRecord("The sky is", " blue.", " green.")]  # TRL's extract_prompt rule


def test_implicit_prompt_needs_a_common_prefix(tmp_path):
    rows = [{"chosen": [user("A"), assistant("x")], "rejected": [user("B"), assistant("y")]}]
    with pytest.raises(DataError, match="share no leading messages") as e:
        load_records(write_jsonl(tmp_path / "d.jsonl", rows), "pairs")
    assert (e.value.row, e.value.field) == (1, "prompt")


def test_identical_pairs_are_dropped_and_counted(tmp_path, caplog):
    rows = [{"prompt": "Q", "chosen": " a", "rejected": " a"}, ROWS["pairs"][0],
            {"chosen": "Q a", "rejected": "Q a"}]  # one form per file: text, like the rows above
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="preftune.data"):
        got = load_records(path, "pairs")
    assert got == EXPECTED["pairs"] and got[0].row == 2
    assert "dropped 2 pair(s) whose chosen and rejected are identical" in caplog.text
    assert len(load_records(path, "pairs", drop_identical_pairs=False)) == 3


def test_rankings_to_pairs_with_ties(tmp_path):
    row = {"prompt": "Q", "completions": ["c0", "c1", "c2", "c3"], "ranking": [2, [0, 3], 1]}
    [rec] = load_records(write_jsonl(tmp_path / "r.jsonl", [row]), "rankings")
    assert rec.ranking == [[2], [0, 3], [1]]
    pairs = lambda mode: [(p.chosen, p.rejected) for p in rankings_to_pairs([rec], mode)]
    assert pairs("all") == [("c2", "c0"), ("c2", "c3"), ("c2", "c1"), ("c0", "c1"), ("c3", "c1")]
    assert pairs("best_vs_rest") == [("c2", "c0"), ("c2", "c3"), ("c2", "c1")]
    tied_top = RankingRecord("Q", ["a", "b", "c"], [[0, 1], [2]])
    assert [(p.chosen, p.rejected) for p in rankings_to_pairs([tied_top], "best_vs_rest")] == [
        ("a", "c"), ("b", "c")]
    assert all(p.prompt == "Q" and p.row == 1 for p in rankings_to_pairs([rec]))


def test_pairs_to_unpaired():
    got = pairs_to_unpaired([PairRecord("Q", " a", " b", row=4)])
    assert got == [UnpairedRecord("Q", " a", True), UnpairedRecord("Q", " b", False)]
    assert [u.row for u in got] == [4, 4]


# ------------------------------------------------------------------------------------------ errors

def load_error(tmp_path, rows, kind, name="bad.jsonl"):
    """Load rows that must fail; returns the single DataError."""
    path = WRITERS[name.rsplit(".", 1)[1]](tmp_path / name, rows)
    with pytest.raises(DataError) as e:
        load_records(path, kind)
    return e.value, path


def test_error_message_is_one_located_line(tmp_path):
    err, path = load_error(tmp_path, [ROWS["pairs"][0], {"prompt": "Q", "chosen": 5,
                                                         "rejected": " b"}], "pairs")
    assert str(err) == (f"{path}, row 2, field 'chosen': expected a string or a list of messages, "
                        f"got int")
    assert (err.source, err.row, err.field) == (path, 2, "chosen")
    assert "\n" not in str(err)


BAD_ROWS = [
    ("pairs", {"prompt": "Q", "chosen": " a"}, "rejected",
     r"missing field; expected 'prompt', 'chosen' and 'rejected'.*the row has 'prompt', 'chosen'"),
    ("sft", {"question": "Q", "answer": "A"}, "prompt", r"the row has 'question', 'answer'"),
    ("sft", {"prompt": "Q", "completion": "   "}, "completion", "empty completion"),
    ("sft", {"prompt": "Q", "completion": None}, "completion", "got null"),
    ("sft", {"prompt": [user("Q")], "completion": " text"}, "completion",
     "the prompt is a list of messages but 'completion' is text"),
    ("sft", {"messages": [user("Q"), {"role": "assitant", "content": "A"}]}, "messages",
     "message 2: unknown role 'assitant'"),
    ("sft", {"messages": [user("Q"), {"from": "gpt", "value": "A"}]}, "messages",
     "message 2: expected an object with 'role' and 'content', got keys 'from', 'value'"),
    ("sft", {"messages": [user("Q"), {"role": "assistant", "content": ["A"]}]}, "messages",
     "'content' must be a string, got list"),
    ("sft", {"messages": [assistant("A"), user("Q")]}, "messages",
     "last message must be from the assistant"),
    ("rankings", {"prompt": "Q", "completions": ["a", "b", "c"], "ranking": [0, 5]}, "ranking",
     "names completion 5 but the row has 3 completions"),
    ("rankings", {"prompt": "Q", "completions": ["a", "b", "c"], "ranking": [0, [1, 0], 2]},
     "ranking", "completion 0 appears more than once"),
    ("rankings", {"prompt": "Q", "completions": ["a", "b", "c"], "ranking": [0, 1]}, "ranking",
     r"does not place completion\(s\) 2"),
    ("rankings", {"prompt": "Q", "completions": ["a"], "ranking": [0]}, "completions",
     "at least 2 completions"),
    ("rankings", {"prompt": "Q", "completions": ["a", 3], "ranking": [0, 1]}, "completions",
     "completion 1: expected a string or a list of messages, got int"),
    ("unpaired", {"prompt": "Q", "completion": " a", "label": "yes"}, "label",
     "expected a boolean .*got str 'yes'"),
    ("unpaired", {"prompt": "Q", "completion": " a", "label": 2}, "label", "got int 2"),
    ("prompts", {"prompt": "  "}, "prompt", "empty prompt"),
]


@pytest.mark.parametrize("kind,bad,field,match", BAD_ROWS)
def test_malformed_row_names_row_and_field(tmp_path, kind, bad, field, match):
    path = write_jsonl(tmp_path / "bad.jsonl", ROWS[kind] + [bad])
    with pytest.raises(DataError, match=match) as e:
        load_records(path, kind)
    err = e.value
    assert (err.source, err.row, err.field) == (path, len(ROWS[kind]) + 1, field)
    assert str(err).startswith(f"{path}, row {err.row}, field '{field}': ")


def test_csv_errors_are_located(tmp_path):
    err, _ = load_error(tmp_path, ROWS["unpaired"] + [{"prompt": "Q", "completion": " a",
                                                       "label": "maybe"}], "unpaired", "b.csv")
    assert (err.row, err.field) == (3, "label")
    err, _ = load_error(tmp_path, ROWS["rankings"] + [{"prompt": "Q", "completions": [" a", " b"],
                                                       "ranking": [[0], [3]]}], "rankings", "r.csv")
    assert (err.row, err.field) == (2, "ranking") and "names completion 3" in str(err)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(ROWS["sft"][0]).encode()
    path.write_bytes(good + b"\n\n" + b'{"prompt": "caf\xe9", "completion": " x"}\n')
    with pytest.raises(DataError, match=r"row 3: line is not valid UTF-8 \(byte 0xe9") as e:
        load_records(str(path), "sft")
    assert (e.value.row, e.value.field) == (3, None)
    path = tmp_path / "bad.csv"
    path.write_bytes(b"prompt,completion\nQ,A\nQ,caf\xe9\n")
    with pytest.raises(DataError, match="line 3 of the file is not valid UTF-8") as e:
        load_records(str(path), "sft")
    assert e.value.row == 2


def test_bad_json_and_non_object_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS["sft"][0]) + "\n{not json}\n")
    with pytest.raises(DataError, match=r"row 2: invalid JSON") as e:
        load_records(str(path), "sft")
    assert e.value.row == 2
    path.write_text('["a list"]\n')
    with pytest.raises(DataError, match="row 1: expected a JSON object"):
        load_records(str(path), "sft")
    path = tmp_path / "lines.json"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match="belongs in a .jsonl file"):
        load_records(str(path), "prompts")


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.json", "[]"),
                                          ("e.json", ""), ("e.csv", "prompt,completion\n")])
def test_empty_file_is_no_rows(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match="no rows") as e:
        load_records(str(tmp_path / name), "sft")
    assert (e.value.source, e.value.row, e.value.field) == (str(tmp_path / name), None, None)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="data/nope.jsonl: no such file or directory"):
        load_records("data/nope.jsonl", "sft")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        list(read_rows(str(tmp_path / "d.txt")))
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="could not read the Parquet file"):
        load_records(str(tmp_path / "x.parquet"), "sft")
    with pytest.raises(ValueError, match="unknown data kind 'dpo'"):
        load_records("builtin:tiny_instructions", "dpo")


# ------------------------------------------------------------------------- templates and encoding

def test_chat_template_applied_once(tokenizer):
    records = [SFTRecord([user("What is the capital of France?")],
                         [assistant("The capital of France is Paris.")], row=7)]
    [ex], report = tokenize_sft(records, tokenizer, max_length=512)
    ids = ex["prompt_ids"] + ex["completion_ids"]
    text = tokenizer.decode(ids)
    assert text.count(SYSTEM) == 1
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ex["completion_ids"]) == "The capital of France is Paris.<|im_end|>"
    assert ex["completion_ids"].count(tokenizer.eos_token_id) == 1  # not appended twice
    assert text == tokenizer.apply_chat_template(records[0].prompt + records[0].completion,
                                                 tokenize=False).rstrip("\n")
    assert (report.total, report.truncated_prompts, report.dropped) == (1, 0, 0)


def test_pairs_share_one_rendered_prompt(tokenizer):
    sys = {"role": "system", "content": "Answer in French."}
    rec = PairRecord([sys, user("Hi")], [assistant("Bonjour")], [assistant("Hello")])
    [ex], _ = tokenize_pairs([rec], tokenizer, max_length=512)
    chosen = tokenizer.decode(ex["prompt_ids"] + ex["chosen_ids"])
    assert chosen.count("Answer in French.") == 1 and SYSTEM not in chosen  # user system wins
    assert tokenizer.decode(ex["rejected_ids"]) == "Hello<|im_end|>"
    assert (ex["prompt_ids"] + ex["chosen_ids"]).count(tokenizer.bos_token_id) == 1


def test_render_text_and_text_as_chat(tokenizer):
    assert render(tokenizer, "2+2=", " 4") == ("2+2=", " 4")
    prompt, completion = render(tokenizer, "2+2=", "4", text_as_chat=True)
    assert prompt.endswith("<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.count(SYSTEM) == 1 and completion == "4<|im_end|>"
    assert render(tokenizer, [user("Hi")])[1] == ""


def test_text_encoding_adds_bos_once_and_eos(tokenizer):
    prompt_ids, completion_ids = encode_prompt_completion(tokenizer, "Paris", " is nice")
    assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids.count(tokenizer.bos_token_id) == 1
    assert completion_ids[-1] == tokenizer.eos_token_id and tokenizer.bos_token_id not in completion_ids
    again, _ = encode_prompt_completion(tokenizer, "<s>Paris", " is nice")
    assert again == prompt_ids  # BOS already in the text: not added a second time
    _, no_eos = encode_prompt_completion(tokenizer, "Paris", " is nice", add_eos=False)
    assert no_eos == completion_ids[:-1]


def test_prefix_inconsistent_template_is_a_located_error(backend):
    # A "thinking" template: the generation prompt opens a block that the full rendering lacks.
    template = CHATML.replace("<|im_start|>assistant\n{% endif %}",
                              "<|im_start|>assistant\n<think>{% endif %}")
    tok = make_tokenizer(backend, template)
    records = [SFTRecord([user("Hi")], [assistant("Hello")], row=3)]
    with pytest.raises(DataError, match="not prefix-consistent") as e:
        tokenize_sft(records, tok, max_length=64, source="x.jsonl")
    assert (e.value.source, e.value.row) == ("x.jsonl", 3)


def test_unpaired_and_prompt_records_tokenize(tokenizer):
    examples, _ = tokenize_sft([UnpairedRecord("Q", " a", False), PromptRecord([user("Hi")])],
                               tokenizer, max_length=256)
    assert examples[0]["label"] is False and examples[0]["completion_ids"][-1] == tokenizer.eos_token_id
    assert examples[1]["completion_ids"] == [] and "label" not in examples[1]
    assert tokenizer.decode(examples[1]["prompt_ids"]).endswith("<|im_start|>assistant\n")


# -------------------------------------------------------------------------------------- truncation

LONG_PROMPT = "What is two plus two? " * 6
LONG_ANSWER = " The capital of France is Paris." * 4


def test_keep_end_truncation(tokenizer):
    p, c = encode_prompt_completion(tokenizer, LONG_PROMPT, LONG_ANSWER)
    assert len(p) > 8 and len(c) > 12
    fits = SFTRecord("Q", " a")
    examples, report = tokenize_sft([SFTRecord(LONG_PROMPT, LONG_ANSWER), fits], tokenizer,
                                    max_length=20, max_prompt_length=8)
    assert examples[0]["prompt_ids"] == p[-8:]  # the END of the prompt survives
    assert examples[0]["completion_ids"] == c[:12]  # the completion is cut at its end
    assert (examples[1]["prompt_ids"], examples[1]["completion_ids"]) == encode_prompt_completion(
        tokenizer, "Q", " a")  # a row that fits is untouched
    assert (report.total, report.truncated_prompts, report.truncated_completions,
            report.dropped) == (2, 1, 1, 0)
    assert str(report) == "2 rows: 1 prompts left-truncated, 1 completions cut at the end, 0 dropped"


def test_rows_that_fit_are_untouched_even_with_a_long_prompt(tokenizer):
    p, c = encode_prompt_completion(tokenizer, LONG_PROMPT, " a")
    [ex], report = tokenize_sft([SFTRecord(LONG_PROMPT, " a")], tokenizer,
                                max_length=len(p) + len(c), max_prompt_length=4)
    assert ex["prompt_ids"] == p and report.truncated_prompts == 0


def test_drop_truncation_counts(tokenizer):
    records = [SFTRecord(LONG_PROMPT, LONG_ANSWER), SFTRecord("Q", " a"),
               SFTRecord("Q", LONG_ANSWER)]
    examples, report = tokenize_sft(records, tokenizer, max_length=20, truncation="drop")
    assert len(examples) == 1 and (report.total, report.dropped) == (3, 2)


def test_error_truncation_names_row_field_and_counts(tokenizer):
    p, _ = encode_prompt_completion(tokenizer, LONG_PROMPT, " a")
    with pytest.raises(DataError, match=rf"data.jsonl, row 5, field 'prompt': the prompt is "
                                        rf"{len(p)} tokens, over max_prompt_length=8") as e:
        tokenize_sft([SFTRecord("Q", " a"), SFTRecord(LONG_PROMPT, " a", row=5)], tokenizer,
                     max_length=16, max_prompt_length=8, truncation="error", source="data.jsonl")
    assert (e.value.row, e.value.field) == (5, "prompt")
    with pytest.raises(DataError, match="over max_length=16") as e:
        tokenize_pairs([PairRecord("Q", " a", LONG_ANSWER)], tokenizer, max_length=16,
                       truncation="error")
    assert (e.value.row, e.value.field) == (1, "rejected")


def test_pair_truncation_shares_the_prompt(tokenizer):
    p, c = encode_prompt_completion(tokenizer, LONG_PROMPT, LONG_ANSWER)
    _, short = encode_prompt_completion(tokenizer, LONG_PROMPT, " no")
    [ex], report = tokenize_pairs([PairRecord(LONG_PROMPT, LONG_ANSWER, " no")], tokenizer,
                                  max_length=20, max_prompt_length=8)
    assert ex["prompt_ids"] == p[-8:]
    assert ex["chosen_ids"] == c[:12] and ex["rejected_ids"] == short
    assert (report.truncated_prompts, report.truncated_completions) == (1, 1)


def test_prompt_records_keep_room_to_generate(tokenizer):
    p, _ = encode_prompt_completion(tokenizer, LONG_PROMPT, " a")
    [ex], report = tokenize_sft([PromptRecord(LONG_PROMPT)], tokenizer, max_length=64,
                                max_prompt_length=8)
    assert ex["prompt_ids"] == p[-8:] and len(p) < 64 and report.truncated_prompts == 1


def test_bad_limits_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        tokenize_sft([SFTRecord("Q", " a")], tokenizer, max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="unknown truncation 'keep_start'"):
        tokenize_sft([SFTRecord("Q", " a")], tokenizer, max_length=8, truncation="keep_start")


@pytest.mark.parametrize("kind, row, field", [
    ("pairs", {"prompt": None, "chosen": "a b", "rejected": "a c"}, "prompt"),
    ("sft", {"prompt": None, "completion": "yes"}, "prompt"),
    ("unpaired", {"prompt": "p", "completion": "c", "label": None}, "label"),
    ("prompts", {"prompt": None, "messages": [user("hi")]}, "prompt"),
])  # fmt: skip
@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_json_null_is_an_error_not_a_missing_field(tmp_path, kind, row, field, fmt):
    """In JSON a null is written on purpose; read as absent, a null prompt would train as an empty one."""
    path = WRITERS[fmt](tmp_path / f"n.{fmt}", [ROWS[kind][0], row])
    with pytest.raises(DataError) as e:
        load_records(str(path), kind)
    assert (e.value.row, e.value.field) == (2, field) and "got null" in str(e.value)


@pytest.mark.parametrize("fmt", ["jsonl", "json"])  # a Parquet column cannot hold both forms
def test_mixing_text_and_conversation_rows_is_an_error(tmp_path, fmt):
    rows = [{"prompt": "Hi", "chosen": " yes", "rejected": " no"},
            {"prompt": "Ho", "chosen": " sure", "rejected": " nah"},
            {"prompt": [user("Hey")], "chosen": [assistant("ok")], "rejected": [assistant("no")]}]
    path = WRITERS[fmt](tmp_path / f"m.{fmt}", rows)
    with pytest.raises(DataError) as e:
        load_records(str(path), "pairs")
    assert e.value.row == 3
    assert "this row is a conversation (lists of messages) but row 1 is plain text" in str(e.value)


def test_json_errors_read_as_one_sentence(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "an unterminated\n')
    with pytest.raises(DataError) as e:
        load_records(str(path), "prompts")
    assert "at at" not in str(e.value) and "column" in str(e.value)
    path.write_bytes(b'{"prompt": "unterminated')
    with pytest.raises(DataError, match=r"invalid JSON \(Unterminated string starting at column 12\)"):
        load_records(str(path), "prompts")
    path = tmp_path / "cut.json"
    path.write_bytes(b'[{"prompt": "unterminated')
    with pytest.raises(DataError, match=r"invalid JSON \(Unterminated string starting at line 1, column 13\)"):
        load_records(str(path), "prompts")
