"""Data pipeline: tokenizer, templates, alpaca_converter / llama_preprocess (their main() in-process;
as subprocesses: tests/e2e/test_data_scripts.py), TrainData.

Expected values come from MindFormers r1.3.0 `mindformers/tools/dataset_preprocess/llama/`
(conversation.py, alpaca_converter.py, llama_preprocess.py; reference/mindformers.md §7.1): the
template strings are copied from there, and the label rule is checked by decoding the unmasked
tokens, which must be exactly the answer followed by </s>.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import datasets
import pytest
import torch

from data_fixtures import index_dataset

from mftune.data import IGNORE_TOKEN_ID, LlamaTokenizer, TrainData, train_sentencepiece
from mftune.data.conversation import PROMPT_DICT, alpaca_prompt, vicuna_prompt
from mftune.data.labelling import tokenize_prompt, tokenize_prompts
from mftune.data.preprocess import preprocess_qa
from mftune.data.records import conversation_prompt, conversation_turns
from mftune.data.sample import generate_records, load_sample_records, train_sample_tokenizer, write_tokenizer_corpus

REPO = Path(__file__).resolve().parents[2]
CONVERTER = REPO / "scripts" / "alpaca_converter.py"
PREPROCESS = REPO / "scripts" / "llama_preprocess.py"
SEQ = 96
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_json(path: Path, obj) -> str:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def model_file(work) -> str:
    corpus = write_tokenizer_corpus(str(work / "corpus.txt"))
    return train_sentencepiece(corpus, str(work / "tok"), 1000)


@pytest.fixture(scope="module")
def tok(model_file) -> LlamaTokenizer:
    return LlamaTokenizer(model_file)


def test_tokenizer_is_llama_like_and_deterministic(work, tok, model_file):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.vocab_size == 1000
    text = "The capital of Peru is Lima.\n\n### Response: ünïcode"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids  # byte fallback: nothing maps to <unk>
    assert tok.decode(ids) == text
    assert tok.id_to_piece(tok.encode("\n", add_bos=False)[-1]) == "<0x0A>"  # as Llama
    other = LlamaTokenizer(train_sample_tokenizer(str(work / "tok_again"), 1000))  # (the files differ only in the recorded model_prefix)
    assert [other.id_to_piece(i) for i in range(1000)] == [tok.id_to_piece(i) for i in range(1000)]
    assert [other.sp.get_score(i) for i in range(1000)] == [tok.sp.get_score(i) for i in range(1000)]


def test_tokenizer_bad_files(tmp_path):
    with pytest.raises(ValueError, match="nope.model"):
        LlamaTokenizer(str(tmp_path / "nope.model"))
    garbled = tmp_path / "garbled.model"
    garbled.write_bytes(b"\x00not a sentencepiece model" * 10)
    with pytest.raises(ValueError, match="garbled.model"):
        LlamaTokenizer(str(garbled))


def test_templates_are_mindformers_strings():
    assert vicuna_prompt("hi", "yo") == VICUNA_SYSTEM + " USER: hi ASSISTANT: yo</s>"
    assert vicuna_prompt("hi") == VICUNA_SYSTEM + " USER: hi ASSISTANT:"
    assert alpaca_prompt("Do it.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo it.\n\n### Response:")
    assert alpaca_prompt("Do it.", "x") == PROMPT_DICT["prompt_input"].format(instruction="Do it.", input="x")
    assert alpaca_prompt("Do it.", "x").startswith("Below is an instruction that describes a task, paired with an "
                                                   "input that provides further context. Write a response")


def test_sample_data_is_deterministic_and_committed():
    assert generate_records() == load_sample_records()
    assert os.path.getsize(REPO / "mftune/data/sample_alpaca.json") < 500_000


def test_converter_skips_malformed(tmp_path, capsys):
    data = [{"instruction": "a", "input": "", "output": "b"}, ["not", "a", "dict"], {"instruction": "a"},
            {"instruction": 3, "output": "x"}, {"instruction": "c", "input": "d", "output": "e"}]
    out = tmp_path / "conv.json"
    rc = _load_script(CONVERTER).main(["--data_path", _write_json(tmp_path / "a.json", data), "--output_path", str(out),
                                       "--max_skipped_ratio", "1"])  # default 0.01: tests/unit/test_silent_inputs.py
    assert rc == 0
    cap = capsys.readouterr()
    assert "Converted 2 records" in cap.out and "Skipped 3 malformed of 5 read" in cap.out
    assert "record 1: field '<record>'" in cap.err
    assert "record 2: field 'output' is missing" in cap.err
    assert "record 3: field 'instruction' must be a string" in cap.err
    assert [r["id"] for r in json.loads(out.read_text())] == ["1", "5"]


def test_multi_round_labels(tok):
    turns = conversation_turns({"conversations": [
        {"from": "gpt", "value": "dropped greeting"},  # a leading gpt turn is dropped, as MindFormers
        {"from": "human", "value": "Add these numbers."}, {"from": "gpt", "value": "12"},
        {"from": "human", "value": "Sort these letters."}, {"from": "gpt", "value": "a b c"}]}, 0)
    prompt = conversation_prompt(turns)
    assert prompt == VICUNA_SYSTEM + " USER: Add these numbers. ASSISTANT: 12</s>USER: Sort these letters. ASSISTANT: a b c</s>"
    t = tokenize_prompt(prompt, tok, 128)
    trained = [x for x, y in zip(t.input_ids, t.labels) if y != IGNORE_TOKEN_ID]
    eos = [i for i, x in enumerate(trained) if x == tok.eos_token_id]
    assert len(eos) == 2 and eos[1] == len(trained) - 1
    assert tok.decode(trained[:eos[0]]) == "12" and tok.decode(trained[eos[0] + 1:-1]) == "a b c"


def _conv(q: str, a: str) -> dict:
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def test_truncation_and_full_masking(tmp_path, tok):
    long = _conv("Repeat the word three times.", " ".join(["apple"] * 60))
    mismatch = _conv("Say it.", "x ASSISTANT: y")  # the answer splits into 3 parts -> MindFormers masks all
    ok = _conv("Convert to uppercase.", "CAT DOG")
    src = _write_json(tmp_path / "c.json", [long, mismatch, ok])
    s = preprocess_qa([src], tok, SEQ, str(tmp_path / "out"))
    assert (s.records, s.truncated, s.fully_masked, s.skipped) == (3, 1, 1, 0)
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert [len(r) for r in ds["input_ids"]] == [SEQ + 1] * 3
    long_ids, long_labels = ds[0]["input_ids"], ds[0]["labels"]
    assert tok.pad_token_id not in long_ids and long_ids[-1] != tok.eos_token_id  # cut, not padded
    assert long_labels[-1] == long_ids[-1]  # answer tokens kept up to the cut
    assert set(ds[1]["labels"]) == {IGNORE_TOKEN_ID}
    assert s.positions == 3 * (SEQ + 1) and 0 < s.ignored_labels < s.positions


def test_batched_tokenization_equals_one_prompt_at_a_time(tok):
    """tokenize_prompts encodes a whole batch in two calls: every prompt's ids and labels must be what
    it gets alone, also after a round with 0 or 2 " ASSISTANT: " separators, several rounds or a cut."""
    turns = {
        "multi": [(0, "Add these numbers."), (1, "7"), (0, "And double it?"), (1, "14")],
        "two_seps": [(0, "Say it."), (1, "x ASSISTANT: y")],
        "long": [(0, "Repeat the word."), (1, " ".join(["apple"] * 60))],
        "plain": [(0, "Convert to uppercase."), (1, "CAT DOG")],
    }
    prompts = [conversation_prompt(t) for t in turns.values()]
    prompts.insert(1, "no separator here</s>USER: q ASSISTANT: a</s>")  # a first round without " ASSISTANT: "
    for record_length in (SEQ + 1, 40):
        batch = tokenize_prompts(prompts, tok, record_length)
        assert batch == [tokenize_prompt(p, tok, record_length) for p in prompts]
    supervised = [any(x != IGNORE_TOKEN_ID for x in t.labels) for t in tokenize_prompts(prompts, tok, SEQ + 1)]
    assert supervised == [True, False, False, True, True]  # the two malformed rounds mask their whole sample


MALFORMED = [
    ("not a record", "record 1: field '<record>'"),
    ({"id": "x"}, "record 2: field 'conversations' is missing"),
    ({"conversations": []}, "record 3: field 'conversations' is empty"),
    ({"conversations": [{"value": "q"}, {"from": "gpt", "value": "a"}]}, "record 4: field 'conversations[0].from' is missing"),
    ({"conversations": [{"from": "human"}]}, "record 5: field 'conversations[0].value' is missing"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "a"}]},
     "record 6: field 'conversations[1].from'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 7}]},
     "record 7: field 'conversations[1].value' must be a string, got int"),
]


def test_malformed_records_skipped_and_reported(tmp_path, model_file, capsys):
    good = _conv("Convert to uppercase.", "CAT")
    src = _write_json(tmp_path / "m.json", [good] + [m for m, _ in MALFORMED] + [good])
    rc = _load_script(PREPROCESS).main(["--dataset_type", "qa", "--input_glob", src, "--model_file", model_file,
                                        "--seq_length", str(SEQ), "--output_file", str(tmp_path / "out"),
                                        "--max_skipped_ratio", "1"])  # default 0.01: test_silent_inputs.py
    assert rc == 0
    cap = capsys.readouterr()
    assert "Transformed 2 records." in cap.out and f"Skipped {len(MALFORMED)} malformed of 9 read" in cap.out
    for _, message in MALFORMED:
        assert f"{src}: {message}" in cap.err
    assert len(datasets.load_from_disk(str(tmp_path / "out"))) == 2


def test_missing_files_exit_2(tmp_path, model_file, capsys):
    main = _load_script(PREPROCESS).main
    src = _write_json(tmp_path / "c.json", [_conv("q", "a")])
    assert main(["--dataset_type", "qa", "--input_glob", str(tmp_path / "none.json"), "--model_file", model_file,
                 "--output_file", str(tmp_path / "o")]) == 2
    assert "none.json" in capsys.readouterr().err
    assert main(["--dataset_type", "qa", "--input_glob", src, "--model_file", str(tmp_path / "tokenizer.model"),
                 "--output_file", str(tmp_path / "o")]) == 2
    assert "tokenizer.model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_output_is_atomic(tmp_path, model_file, monkeypatch, capsys):
    main = _load_script(PREPROCESS).main
    src = _write_json(tmp_path / "c.json", [_conv("q", "a")] * 3)
    args = ["--dataset_type", "qa", "--input_glob", src, "--model_file", model_file, "--seq_length", "96"]
    # A directory that is not a dataset is never replaced.
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(args + ["--output_file", str(keep)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err and os.listdir(keep) == ["notes.txt"]
    # A failure while saving leaves the previous dataset in place and no temp directory behind.
    out = tmp_path / "out"
    assert main(args + ["--output_file", str(out)]) == 0
    before = sorted(os.listdir(tmp_path))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        main(args + ["--seq_length", "80", "--output_file", str(out)])
    assert sorted(os.listdir(tmp_path)) == before
    assert len(datasets.load_from_disk(str(out))[0]["input_ids"]) == 97
    # A dataset directory is replaced on success.
    monkeypatch.undo()
    assert main(args + ["--seq_length", "80", "--output_file", str(out)]) == 0
    assert len(datasets.load_from_disk(str(out))[0]["input_ids"]) == 81




def test_a_dataset_with_nothing_to_train_on_is_refused(tmp_path, model_file, capsys):
    """Every sample cut before its answer (the Vicuna system prompt alone is longer than 33 tokens): the tool
    refuses to write a dataset on which training would run at loss 0, and says why."""
    src = _write_json(tmp_path / "c.json", [_conv("q", "a")] * 3)
    out = tmp_path / "out"
    assert _load_script(PREPROCESS).main(["--dataset_type", "qa", "--input_glob", src, "--model_file", model_file,
                                          "--seq_length", "32", "--output_file", str(out)]) == 2
    assert "all 3 are fully masked" in capsys.readouterr().err and not out.exists()


def test_wiki_chunks(tmp_path, model_file, tok, capsys):
    text = "\n\n".join(["= Title =", "The capital of France is Paris . It is big", "Reverse the following words"] * 20)
    src = tmp_path / "wiki.txt"
    src.write_text(text, encoding="utf-8")
    assert _load_script(PREPROCESS).main(["--dataset_type", "wiki", "--input_glob", str(src), "--model_file", model_file,
                                          "--seq_length", "15", "--output_file", str(tmp_path / "w")]) == 0
    ds = datasets.load_from_disk(str(tmp_path / "w"))
    assert ds.column_names == ["input_ids"] and all(len(r) == 16 for r in ds["input_ids"])
    para = tok.encode("The capital of France is Paris. It is big", add_bos=True, add_eos=True)
    assert ds[0]["input_ids"][:len(para)] == para  # cleaned (" ." -> "."), headings dropped, <s>/</s> per paragraph
    assert f"Transformed {len(ds)} records." in capsys.readouterr().out
    batch = next(TrainData(str(tmp_path / "w"), micro_batch_size=2, shuffle=False).epoch(0))[0]
    assert torch.equal(batch["labels"], batch["input_ids"])  # no labels column: labels = input_ids


@pytest.fixture(scope="module")
def index_dir(work) -> str:
    return index_dataset(str(work / "index_ds"))


def _order(data: TrainData, epoch: int, start_step: int = 0) -> list[list[list[int]]]:
    """Per step, per micro-step, the record indices seen."""
    return [[mb["input_ids"][:, 0].tolist() for mb in step] for step in data.epoch(epoch, start_step)]


def test_loader_order_per_seed_and_epoch(index_dir):
    kw = dict(micro_batch_size=2, grad_accum=2)
    a, b = TrainData(index_dir, seed=7, **kw), TrainData(index_dir, seed=7, **kw)
    assert _order(a, 0) == _order(b, 0)
    assert _order(a, 0) != _order(TrainData(index_dir, seed=8, **kw), 0)
    assert _order(a, 0) != _order(a, 1)  # reshuffled per epoch
    assert sorted(sum(sum(_order(a, 1), []), [])) == list(range(20))  # a permutation
    flat = sum(sum(_order(a, 3), []), [])
    assert flat == torch.randperm(20, generator=torch.Generator().manual_seed(7 + 3)).tolist()
    assert sum(sum(_order(TrainData(index_dir, shuffle=False, **kw), 5), []), []) == list(range(20))


def test_loader_start_step_equals_slicing(index_dir):
    d = TrainData(index_dir, micro_batch_size=2, grad_accum=2, seed=3)
    assert d.steps_per_epoch == 5
    for s in range(6):
        assert _order(d, 2, start_step=s) == _order(d, 2)[s:]


@pytest.mark.parametrize("dp,mb,ga", [(2, 2, 1), (2, 1, 3), (4, 1, 2)])
def test_loader_dp_equivalence(index_dir, dp, mb, ga):
    """(dp_size=D, micro_batch_size=m) consumes per micro-step exactly (dp_size=1, micro_batch_size=m*D)."""
    single = _order(TrainData(index_dir, micro_batch_size=mb * dp, grad_accum=ga, seed=11), 1)
    ranks = [_order(TrainData(index_dir, micro_batch_size=mb, grad_accum=ga, dp_size=dp, dp_rank=r, seed=11), 1)
             for r in range(dp)]
    assert all(len(r) == len(single) for r in ranks)
    for s, step in enumerate(single):
        for k, micro in enumerate(step):
            assert micro == sum((ranks[r][s][k] for r in range(dp)), [])


def test_loader_drop_remainder_and_num_samples(index_dir):
    kw = dict(micro_batch_size=3, grad_accum=2, shuffle=False)  # G = 6, 20 records
    assert TrainData(index_dir, **kw).steps_per_epoch == 3
    d = TrainData(index_dir, drop_remainder=False, **kw)
    assert d.steps_per_epoch == 4
    assert _order(d, 0)[-1] == [[18, 19, 0], [1, 2, 3]]  # last step completed from the epoch's start
    n = TrainData(index_dir, num_samples=12, micro_batch_size=2, seed=5)
    assert n.num_records == 12 and n.steps_per_epoch == 6
    assert sorted(sum(sum(_order(n, 0), []), [])) == list(range(12))
    assert TrainData(index_dir, num_samples=1000, micro_batch_size=2).num_records == 20


def test_loader_errors(tmp_path, index_dir):
    with pytest.raises(ValueError, match="does not exist"):
        TrainData(str(tmp_path / "missing"), micro_batch_size=1)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not a dataset saved with datasets"):
        TrainData(str(tmp_path / "plain"), micro_batch_size=1)
    with pytest.raises(ValueError, match="no column 'attention_mask'"):
        TrainData(index_dir, micro_batch_size=1, columns=("input_ids", "attention_mask"))
    with pytest.raises(ValueError, match=r"has 20 records .*fewer than one global batch of 24"):
        TrainData(index_dir, micro_batch_size=4, dp_size=2, grad_accum=3)
    ragged = str(tmp_path / "ragged")
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [1, 2]]}).save_to_disk(ragged)
    with pytest.raises(ValueError, match=r"different lengths \[2, 3\]"):
        TrainData(ragged, micro_batch_size=1)
    with pytest.raises(ValueError, match="dp_rank=2"):
        TrainData(index_dir, micro_batch_size=1, dp_size=2, dp_rank=2)
    far = str(tmp_path / "far")  # a packed record whose positions run past its length
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3]],
                                "position_ids": [[0, 1, 3]]}).save_to_disk(far)
    with pytest.raises(ValueError, match=r"position_ids in \[0, 3\].*below the record length 3"):
        TrainData(far, micro_batch_size=1)


def test_loader_repeat_is_passes_batched_one_by_one(index_dir):
    """train_dataset.repeat: MindSpore batches, then repeats, so each pass drops its own remainder and
    is shuffled on its own: pass p of epoch e is the order of epoch e*repeat + p without repeat."""
    kw = dict(micro_batch_size=3, grad_accum=2, seed=4)  # G = 6, 20 records: 3 steps per pass
    once, twice = TrainData(index_dir, **kw), TrainData(index_dir, repeat=2, **kw)
    assert (once.steps_per_epoch, twice.steps_per_epoch) == (3, 6)
    assert _order(twice, 1) == _order(once, 2) + _order(once, 3)
    assert _order(twice, 1, start_step=4) == _order(twice, 1)[4:]  # resume inside the second pass
    with pytest.raises(ValueError, match="repeat=0 is invalid"):
        TrainData(index_dir, repeat=0, **kw)
