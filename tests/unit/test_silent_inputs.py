"""Inputs that used to go through silently or end in a traceback (issue 14, items 2, 4 and 6): malformed
records are counted truly, named and limited by max_skipped_ratio; empty and non-UTF-8 data are DataErrors
naming the file (and the byte offset); a resume point with nothing left to train is an error; a damaged
newest checkpoint is skipped for the last intact one, or refused when named. The commands themselves:
tests/e2e/test_silent_runs.py.

Expected values come from the inputs: the skipped record and field are the ones written malformed, the
byte offsets are ``bytes.index`` of the undecodable byte in the file written.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mftune.config.schema import DatasetConfig
from mftune.data.loader import TrainData
from mftune.data.preprocess import preprocess_conversations, preprocess_wiki
from mftune.data.raw import cached_dataset, read_raw_records
from mftune.data.records import (DEFAULT_MAX_SKIPPED_RATIO, Summary, check_skipped, convert_alpaca,
                                 read_json_records)
from mftune.data.sample import load_sample_records, train_sample_tokenizer
from mftune.data.tokenizer_kinds import build_tokenizer
from mftune.errors import CheckpointError, ConfigError, DataError
from mftune.trainer.checkpointing import CheckpointMonitor
from mftune.trainer.resume import ResumePoint, check_steps_left, damage, find_resume_point

from tiny_checkpoints import tiny_model

REPO = Path(__file__).resolve().parents[2]
SEQ = 96


def _script(name: str):
    path = REPO / "scripts" / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    return train_sample_tokenizer(str(tmp_path_factory.mktemp("tok") / "tok"), 1000)


def _alpaca(tmp_path: Path, n: int = 20, bad: dict | None = None, name: str = "a.json") -> tuple[str, list]:
    """``n`` sample alpaca records; ``bad`` {index: record} replaces some."""
    records = load_sample_records()[:n]
    for i, record in (bad or {}).items():
        records[i] = record
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path), records


# ---------------------------------------------------------------------------------------------
# every record accounted for
# ---------------------------------------------------------------------------------------------

def test_schema_default_is_the_tools_default():
    assert DatasetConfig().max_skipped_ratio == DEFAULT_MAX_SKIPPED_RATIO == 0.01


def test_raw_file_with_a_record_missing_output_is_refused_by_default(tmp_path, tok):
    """Before: trained on the rest, and the log said "Skipped 0 malformed" (the converter's count was dropped)."""
    path, _ = _alpaca(tmp_path, bad={7: {"instruction": "x", "input": ""}})
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        cached_dataset(path, tok, SEQ, str(cache))
    message = str(err.value)
    assert path in message and "1 of 20 records are malformed" in message
    assert "record 7: field 'output' is missing" in message and "train_dataset.max_skipped_ratio=0.01" in message
    assert not cache.exists() or not os.listdir(cache)  # nothing cached to be reused silently


def test_skipped_records_are_counted_named_and_rechecked_on_reuse(tmp_path, tok, caplog):
    path, _ = _alpaca(tmp_path, bad={3: {"instruction": "x", "input": ""}, 11: {"input": "y", "output": "z"}})
    cache = str(tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="mftune"):
        out = cached_dataset(path, tok, SEQ, cache, max_skipped_ratio=0.5)
    assert len(datasets.load_from_disk(out)) == 18
    log = caplog.text
    assert "Transformed 18 records. Skipped 2 malformed of 20 read" in log
    assert "record 3: field 'output' is missing" in log and "record 11: field 'instruction' is missing" in log
    # the cache keeps its counts: a run that allows fewer malformed records is refused on reuse too
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mftune"):
        assert cached_dataset(path, tok, SEQ, cache, max_skipped_ratio=0.5) == out
    assert "using the tokenized cache" in caplog.text and "20 records read, 18 written" in caplog.text
    with pytest.raises(DataError, match="2 of 20 records are malformed"):
        cached_dataset(path, tok, SEQ, cache, max_skipped_ratio=0.01, setting="eval_dataset.max_skipped_ratio")


def test_first_record_missing_instruction_is_still_alpaca(tmp_path, tok):
    """The first record decided the kind by its 'instruction' key: without it, every record was reported
    as a conversation record without 'conversations'."""
    path, _ = _alpaca(tmp_path, bad={0: {"input": "", "output": "o"}})
    with pytest.raises(DataError, match=r"record 0: field 'instruction' is missing") as err:
        cached_dataset(path, tok, SEQ, str(tmp_path / "cache"))
    assert "1 of 20" in str(err.value)


def test_threshold_is_a_fraction_of_the_records_read():
    def summary(read: int, skipped: int) -> Summary:
        return Summary(read=read, skipped=skipped, errors=[f"record {i}: field 'output' is missing"
                                                           for i in range(skipped)])

    check_skipped(summary(100, 1), 0.01, "--max_skipped_ratio", "f.json")  # 1% is allowed
    with pytest.raises(DataError, match=r"f.json: 2 of 100 records are malformed \(2.0%\), more than "
                                        r"--max_skipped_ratio=0.01 allows. First: record 0"):
        check_skipped(summary(100, 2), 0.01, "--max_skipped_ratio", "f.json")
    # the first five are named
    with pytest.raises(DataError, match=r"record 0.*record 4: field .output. is missing; \.\.\. 2 more\."):
        check_skipped(summary(10, 7), 0.5, "--max_skipped_ratio", "f.json")
    with pytest.raises(DataError):
        check_skipped(summary(1000, 1), 0.0, "--max_skipped_ratio", "f.json")
    check_skipped(summary(3, 3), 1.0, "--max_skipped_ratio", "f.json")


def test_convert_alpaca_counts_read_and_skipped():
    _, summary = convert_alpaca([{"instruction": "a", "output": "b"}, {"instruction": "a"}, 3])
    assert (summary.read, summary.records, summary.skipped) == (3, 1, 2)


def test_alpaca_converter_fails_above_the_ratio_and_writes_nothing(tmp_path, capsys):
    main = _script("alpaca_converter.py").main
    path, _ = _alpaca(tmp_path, bad={5: {"instruction": "x"}})
    out = tmp_path / "conv.json"
    assert main(["--data_path", path, "--output_path", str(out)]) == 2
    err = capsys.readouterr().err
    assert "record 5: field 'output' is missing" in err and "--max_skipped_ratio=0.01" in err and not out.exists()
    assert main(["--data_path", path, "--output_path", str(out), "--max_skipped_ratio", "0.1"]) == 0
    assert "Skipped 1 malformed of 20 read" in capsys.readouterr().out
    assert len(json.loads(out.read_text())) == 19
    assert main(["--data_path", path, "--output_path", str(out), "--max_skipped_ratio", "1.5"]) == 2
    assert "--max_skipped_ratio=1.5 is invalid" in capsys.readouterr().err


def test_llama_preprocess_fails_above_the_ratio_and_writes_nothing(tmp_path, tok, capsys):
    records = convert_alpaca(load_sample_records()[:20])[0]
    records[4] = {"conversations": [{"from": "human", "value": "q"}]}
    src = tmp_path / "conv.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "out"
    args = ["--dataset_type", "qa", "--input_glob", str(src), "--model_file", tok, "--seq_length", str(SEQ),
            "--output_file", str(out)]
    assert _script("llama_preprocess.py").main(args) == 2
    err = capsys.readouterr().err
    assert "1 of 20 records are malformed" in err and "record 4: field 'conversations'" in err
    assert not out.exists()
    assert _script("llama_preprocess.py").main(args + ["--max_skipped_ratio", "0.05"]) == 0
    assert "Skipped 1 malformed of 20 read" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# empty data
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, what", [
    ("empty.json", b"[]", "an empty JSON list"),
    ("empty.jsonl", b"", "no JSON line"),
    ("blank.jsonl", b"\n  \n\n", "no JSON line"),
])
def test_empty_raw_file_is_a_data_error_naming_it(tmp_path, tok, name, content, what):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{path} holds no records \\({what}\\)"):
        read_raw_records(str(path))
    with pytest.raises(DataError, match=f"{path} holds no records"):
        cached_dataset(str(path), tok, SEQ, str(tmp_path / "cache"))


def test_empty_parquet_and_converter_input(tmp_path, capsys):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"instruction": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match=f"{path} holds no records \\(a parquet table of 0 rows\\)"):
        read_raw_records(str(path))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = tmp_path / "out.json"
    assert _script("alpaca_converter.py").main(["--data_path", str(empty), "--output_path", str(out)]) == 2
    assert f"{empty} holds no records" in capsys.readouterr().err and not out.exists()


def _int_lists() -> datasets.Features:
    ints = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({"input_ids": ints, "labels": ints})


@pytest.mark.parametrize("shards", [0, 1])
def test_dataset_directory_of_0_rows(tmp_path, shards):
    """0 rows saved in 0 files made datasets' load_from_disk fail with an IndexError; in one file, the
    loader said "records of 0 tokens"."""
    path = str(tmp_path / "ds")
    ds = datasets.Dataset.from_dict({"input_ids": [], "labels": []}, features=_int_lists())
    if shards:
        ds.save_to_disk(path, num_shards=1)
    else:
        ds.save_to_disk(path)
    with pytest.raises(ValueError, match="holds no records \\(a dataset of 0 rows\\)") as err:
        TrainData(path, micro_batch_size=1)
    assert path in str(err.value)


# ---------------------------------------------------------------------------------------------
# non-UTF-8 text
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["latin1.json", "latin1.jsonl"])
def test_non_utf8_raw_file_names_file_and_byte_offset(tmp_path, name):
    first = json.dumps({"instruction": "a", "input": "", "output": "b"}).encode()
    second = '{"instruction": "café", "input": "", "output": "b"}'.encode("latin-1")
    data = b"[" + first + b",\n" + second + b"]" if name.endswith(".json") else first + b"\n" + second + b"\n"
    path = tmp_path / name
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(DataError) as err:
        read_raw_records(str(path))
    assert str(err.value).startswith(f"{path} is not UTF-8 text: byte 0xe9 at byte offset {offset} (line 2)")


def test_non_utf8_wiki_text_and_bom(tmp_path, tok):
    path = tmp_path / "wiki.txt"
    data = "first paragraph\n\nsecond caf".encode() + b"\xe9 paragraph"
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(DataError, match=f"byte offset {offset} \\(line 3\\)"):
        preprocess_wiki([str(path)], build_tokenizer(tok), SEQ, str(tmp_path / "out"))
    bom = tmp_path / "bom.json"  # a UTF-8 byte-order mark (Windows editors) is UTF-8: read, not refused
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "a", "output": "b"}]).encode())
    assert read_json_records(str(bom)) == [{"instruction": "a", "output": "b"}]
    # 3 + 2 + 20: offsets count the mark
    bom.write_bytes(b"\xef\xbb\xbf[\n" + '{"instruction": "café"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"byte 0xe9 at byte offset 25 \(line 2\)"):
        read_json_records(str(bom))


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------

def _point(epoch: int, step: int, global_step: int) -> ResumePoint:
    return ResumePoint(["ck-1_6.safetensors"], {}, epoch, step, global_step, global_step, 1.0, 0, 8, {}, None)


def test_resume_point_at_or_past_the_end_is_an_error():
    """Before: the run exited 0 after 0 steps."""
    check_steps_left(_point(1, 5, 5), epochs=1, steps_per_epoch=6)  # one step left
    check_steps_left(_point(1, 6, 6), epochs=2, steps_per_epoch=6)  # the second epoch left
    with pytest.raises(ConfigError) as err:
        check_steps_left(_point(1, 6, 6), epochs=1, steps_per_epoch=6)
    message = str(err.value)
    assert "runner_config.epochs=1 is invalid" in message and "ck-1_6.safetensors" in message
    assert "epoch 1, step 6 (global step 6)" in message and "1 epoch(s) x 6 steps = 6 steps" in message
    assert "Raise --epochs (e.g. --epochs 2)" in message
    with pytest.raises(ConfigError, match="--epochs 3"):  # epoch 3 has 4 steps left
        check_steps_left(_point(3, 2, 14), epochs=2, steps_per_epoch=6)


def _saved(root: Path, ranks: int = 2, steps=(2, 4, 6)) -> dict[tuple[int, int], str]:
    """Training checkpoints of ``steps`` saved by CheckpointMonitor in ``ranks`` rank folders; {(rank, step): file}."""
    model = tiny_model(lora=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    files = {}
    for rank in range(ranks):
        saver = CheckpointMonitor(str(root), "llama", rank=rank)
        for step in steps:
            files[rank, step] = saver.save(model, optimizer, epoch=1, step_in_epoch=step, global_step=step,
                                           loss_scale=1.0, global_batch_size=8, model_config={}, extra_metadata={})
    return files


def _truncate(path: str, keep: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def test_truncated_newest_checkpoint_is_skipped_for_the_last_intact_one(tmp_path, caplog):
    files = _saved(tmp_path)
    _truncate(files[1, 6])  # rank 1's newest: meta.json recorded its size
    with open(files[0, 4], "r+b") as f:  # rank 0's step 4: no recorded size, but a damaged header
        f.write(b"\xff" * 16)
    assert damage(files[1, 6]).startswith("it has 1000 bytes but meta.json recorded")
    assert "not a complete safetensors file" in damage(files[0, 4])
    assert damage(files[0, 6]) is None
    with caplog.at_level(logging.WARNING, logger="mftune"):
        point = find_resume_point(str(tmp_path / "checkpoint"), True)
    assert point.files == [files[0, 2], files[1, 2]] and point.global_step == 2
    assert files[1, 6] in caplog.text and files[0, 4] in caplog.text and "resuming from " + files[0, 2] in caplog.text


def test_named_damaged_checkpoint_is_an_error_naming_the_file(tmp_path):
    files = _saved(tmp_path, ranks=1, steps=(2, 4))
    _truncate(files[0, 4])
    with pytest.raises(CheckpointError, match=f"resume_training=llama_rank_0-1_4.safetensors: checkpoint "
                                              f"{files[0, 4]} cannot be resumed from: it has 1000 bytes"):
        find_resume_point(str(tmp_path / "checkpoint"), "llama_rank_0-1_4")
    with pytest.raises(CheckpointError, match=f"load_checkpoint: checkpoint {files[0, 4]} cannot be resumed"):
        find_resume_point(files[0, 4], True)
    assert find_resume_point(files[0, 2], True).global_step == 2
    for step in (2, 4):
        _truncate(files[0, step])
    with pytest.raises(CheckpointError, match="every saved step has a damaged file"):
        find_resume_point(str(tmp_path / "checkpoint"), True)


# ---------------------------------------------------------------------------------------------
# plain-text paths: what was read and what no record holds
# ---------------------------------------------------------------------------------------------

def _fake_tokenizer(words: list[str]):
    return type("T", (), {"bos_token_id": 100, "eos_token_id": 101,
                          "encode_batch": lambda self, texts: [[words.index(w) for w in t.split()] for t in texts]})()


def test_wikipedia_counts_lines_tokens_dropped_and_names_a_file_without_records(tmp_path):
    from mftune.data.wikipedia import wikipedia_records
    words = "a b c d e f g h".split()
    full, short = tmp_path / "1.parquet", tmp_path / "2.parquet"
    pq.write_table(pa.table({"text": ["a b\nc d e f g h"]}), full)  # 8 ids: chunks [0..2], [3..5]; 2 left
    pq.write_table(pa.table({"text": ["a b"]}), short)  # 2 ids < n: no chunk
    counts = Summary()
    records = wikipedia_records([str(full), str(short)], _fake_tokenizer(words), 3, 3, counts)
    assert records.tolist() == [[100, 0, 101], [100, 3, 101], [100, 0, 101]]  # a second pass for the third
    assert (counts.files, counts.samples, counts.text_tokens) == (2, 3, 10)  # each file counted once
    assert counts.dropped_tokens == 10 - 2 * 1  # each of the 2 distinct records keeps n - 2 = 1 id of its chunk
    assert str(short) in counts.notes[0] and "gives no record" in counts.notes[0]
    assert "1.5 passes" in counts.notes[1]
    fewer = Summary()
    wikipedia_records([str(full)], _fake_tokenizer(words), 3, 1, fewer)
    assert fewer.dropped_tokens == 8 - 1 and "keeps the first 1" in fewer.notes[-1]


def test_wiki_summary_counts_paragraphs_tokens_and_the_dropped_tail(tmp_path, tok):
    text, empty = tmp_path / "wiki.txt", tmp_path / "headings.txt"
    text.write_text("\n\n".join(f"paragraph number {i} with a few words of text." for i in range(30)))
    empty.write_text(" = Heading = \n\n")
    tokenizer = build_tokenizer(tok)
    summary = preprocess_wiki([str(text), str(empty)], tokenizer, SEQ, str(tmp_path / "out"))
    ids = [len(tokenizer.encode(f"paragraph number {i} with a few words of text.", add_bos=True, add_eos=True))
           for i in range(30)]
    assert (summary.files, summary.samples, summary.text_tokens) == (2, 30, sum(ids))
    assert summary.dropped_tokens == sum(ids) % (SEQ + 1) and summary.records == sum(ids) // (SEQ + 1)
    assert any(str(empty) in note for note in summary.notes)
    assert f"Read 30 paragraphs from 2 file(s), {sum(ids)} tokens of text; {summary.dropped_tokens} of them" \
        in summary.line(qa=False)


def test_a_caches_counts_are_written_before_the_cache_is_in_place(tmp_path, tok):
    """A kill between the rename and the counts file left a cache reused without its skip check."""
    out, seen = tmp_path / "cache", []

    def keep(directory: str, summary: Summary) -> None:
        seen.append((os.path.exists(out), summary.records))
        Path(directory, "extra.json").write_text("{}")

    records = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}] * 3
    summary = preprocess_conversations([("a.json", records)], build_tokenizer(tok), SEQ, str(out), keep=keep)
    assert seen == [(False, summary.records)] and (out / "extra.json").is_file()
