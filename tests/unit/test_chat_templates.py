"""Chat templates (llama2, chatml, hf = the tokenizer's Jinja template): the ids equal transformers'
apply_chat_template(messages, tokenize=True) with the Hugging Face template text written here (the
reference), labels train on the assistant's answers only, predict prompts end in the generation prompt."""
from __future__ import annotations

import json

import datasets
import pytest

from hf_tokenizer_files import CHATML_JINJA, LLAMA2_JINJA, LLAMA3_JINJA, bpe_directory
from mftune.data.labelling import IGNORE_TOKEN_ID, tokenize_chats
from mftune.data.preprocess import preprocess_conversations
from mftune.data.templates import get_template
from mftune.data.tokenizer_kinds import build_tokenizer
from mftune.errors import DataError, RecordError

transformers = pytest.importorskip("transformers")
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4."}, {"role": "user", "content": "你好 😀"},
            {"role": "assistant", "content": "Hello world!\n  code: def f(): pass"}]
GENERATION_JINJA = CHATML_JINJA.replace(
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
    "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
    "{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {"llama3": bpe_directory(str(root / "llama3"), LLAMA3_JINJA),
            "chatml": bpe_directory(str(root / "chatml"), CHATML_JINJA, bos=None, eos="<|im_end|>"),
            "llama2": bpe_directory(str(root / "llama2"), LLAMA2_JINJA, bos="<s>", eos="</s>"),
            "generation": bpe_directory(str(root / "gen"), GENERATION_JINJA, bos=None, eos="<|im_end|>")}


CASES = [("hf", "llama3", LLAMA3_JINJA), ("hf", "chatml", CHATML_JINJA), ("chatml", "chatml", CHATML_JINJA),
         ("llama2", "llama2", LLAMA2_JINJA), ("hf", "llama2", LLAMA2_JINJA), ("hf", "generation", GENERATION_JINJA)]


@pytest.mark.parametrize("name,directory,reference", CASES)
def test_ids_equal_apply_chat_template_and_only_answers_are_labelled(dirs, name, directory, reference):
    ref = transformers.AutoTokenizer.from_pretrained(dirs[directory])
    tok = build_tokenizer(dirs[directory])
    template = get_template(name, tok)
    messages = MESSAGES if directory != "generation" else MESSAGES[1:]
    (sample,) = tokenize_chats([template.sample_text({"messages": messages}, 0)], tok, 400)
    expected = ref.apply_chat_template(messages, tokenize=True, chat_template=reference)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert sample.input_ids[:sample.length] == expected
    trained = ref.decode([t for t in sample.labels if t != IGNORE_TOKEN_ID])
    for m in messages:  # every answer is trained on, nothing the user or system said is
        assert (m["content"].strip() in trained) == (m["role"] == "assistant"), (m, trained)
    assert sample.labels[sample.length:] == [IGNORE_TOKEN_ID] * (400 - sample.length)
    prompt = template.prompt_ids(tok, "Hi there")
    assert prompt == ref.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=True,
                                             chat_template=reference, add_generation_prompt=True)["input_ids"]


def test_conversation_records_with_system_turns_and_packing(dirs, tmp_path):
    tok = build_tokenizer(dirs["chatml"])
    records = [{"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello!"}]}, {"messages": MESSAGES[1:3]}]
    summary = preprocess_conversations([("a.json", records)], tok, 63, str(tmp_path / "out"), packing=True,
                                       template="hf")
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert summary.samples == 2 and len(ds) == 1 and len(ds[0]["input_ids"]) == 64
    trained = tok.decode([t for t in ds[0]["labels"] if t != IGNORE_TOKEN_ID])
    # the answers with their end of turn (<|im_end|> decodes to nothing; the "\n" the template puts after it
    # belongs to the answer when spans come from rendering prefixes)
    assert trained == "Hello!\n4.\n"


def test_template_errors_name_the_fix(dirs, tmp_path):
    tok = build_tokenizer(dirs["chatml"])
    with pytest.raises(DataError, match="has no bos token"):
        get_template("vicuna", tok)
    alternating = get_template("llama2", build_tokenizer(dirs["llama2"]))
    with pytest.raises(RecordError, match="chat template refuses it: Conversation roles must alternate"):
        alternating.sample_text({"messages": [{"role": "assistant", "content": "x"}]}, 0)
    with pytest.raises(RecordError, match="no assistant"):
        alternating.sample_text({"messages": [{"role": "user", "content": "x"}]}, 3)
    no_template = bpe_directory(str(tmp_path / "none"), None)
    with pytest.raises(DataError, match="has no chat template"):
        get_template("hf", build_tokenizer(no_template))
    assert json.loads(get_template("chatml", tok).sample_text({"messages": MESSAGES[1:3]}, 0))["spans"]
    assert get_template("chatml", tok).stop_tokens == ("<|im_end|>",)
