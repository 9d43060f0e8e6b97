"""Alpaca -> conversation JSON -> tokenized dataset directory (MindFormers' llama data tools).

Two steps, as in MindFormers' `mindformers/tools/dataset_preprocess/llama/`:

1. `convert_alpaca`: alpaca records `{instruction, input, output}` -> `{"id", "conversations":
   [{"from": "human", "value": <alpaca prompt>}, {"from": "gpt", "value": output}]}`.
2. `preprocess_qa` (`--dataset_type qa`): each conversation in the Vicuna v1.1 template, tokenized
   and labelled exactly as `llama_preprocess.py` does (`tokenize_prompt`), written with datasets'
   `save_to_disk` instead of MindRecord. `preprocess_wiki` (`--dataset_type wiki`): plain text cut
   into seq_length+1 token chunks.

Records are `seq_length + 1` tokens (the model shifts by one). Malformed records are reported as
`RecordError` (file, record index, field); `on_error="skip"` drops them and counts them,
`on_error="fail"` raises the first. Output is written to a temporary directory next to the target
and renamed into place, so a failure never leaves a half-written dataset.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal

import datasets

from mftune.data.conversation import alpaca_prompt, get_default_conv_template
from mftune.data.tokenizer import LlamaTokenizer

IGNORE_TOKEN_ID = -100
OnError = Literal["skip", "fail"]
_ROLES = {"human": 0, "gpt": 1}  # "from" value -> index into the template's roles (USER, ASSISTANT)
_INT_LIST = getattr(datasets, "List", datasets.Sequence)(datasets.Value("int32"))


class DataError(ValueError):
    """A mistake in the user's input (file, arguments): the CLIs print it in one line, exit 2."""


class RecordError(DataError):
    """Record `index` (0-based, in `file`) is malformed at `field`."""

    def __init__(self, index: int, field: str, why: str, file: str | None = None):
        self.index, self.field, self.why, self.file = index, field, why, file
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}record {self.index}: field '{self.field}' {self.why}"


@dataclasses.dataclass
class Summary:
    """Counts printed after a run (the first line is MindFormers' "Transformed N records.")."""

    records: int = 0          # records written
    skipped: int = 0          # malformed records dropped (on_error="skip")
    truncated: int = 0        # samples longer than seq_length + 1 tokens, cut
    fully_masked: int = 0     # samples whose labels are all -100 (template length mismatch, or cut before the answer)
    tokens: int = 0           # non-pad tokens written
    positions: int = 0        # all positions written (records * (seq_length + 1))
    ignored_labels: int = 0   # label positions equal to -100 (qa only)
    errors: list[RecordError] = dataclasses.field(default_factory=list)

    def line(self, qa: bool = True) -> str:
        if not qa:
            return f"Transformed {self.records} records. {self.tokens} tokens."
        frac = self.ignored_labels / self.positions if self.positions else 0.0
        return (f"Transformed {self.records} records. Skipped {self.skipped} malformed, truncated {self.truncated}, "
                f"fully masked {self.fully_masked}; {self.tokens} tokens in {self.positions} positions; "
                f"{frac:.1%} of labels are -100.")


# ---------------------------------------------------------------------------------------------
# Reading and validating records
# ---------------------------------------------------------------------------------------------

def read_json_records(path: str) -> list:
    """The JSON list in `path`; DataError naming the file when missing, unreadable or not a list."""
    if not os.path.isfile(path):
        raise DataError(f"input file {path!r} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}).") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e}).") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}.")
    return data


def _type(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def alpaca_to_conversation(example: Any, index: int) -> dict:
    """One alpaca record -> MindFormers' conversation record (id is the 1-based source position)."""
    if not isinstance(example, dict):
        raise RecordError(index, "<record>", f"must be an object with instruction/input/output, got {_type(example)}")
    for key in ("instruction", "output"):
        if key not in example:
            raise RecordError(index, key, "is missing")
        if not isinstance(example[key], str):
            raise RecordError(index, key, f"must be a string, got {_type(example[key])}")
    inp = example.get("input", "")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise RecordError(index, "input", f"must be a string, got {_type(inp)}")
    return {"id": str(index + 1),
            "conversations": [{"from": "human", "value": alpaca_prompt(example["instruction"], inp)},
                              {"from": "gpt", "value": example["output"]}]}


def conversation_turns(record: Any, index: int) -> list[tuple[int, str]]:
    """Validated `(role index, text)` turns of a conversation record.

    As MindFormers: a leading "gpt" turn is dropped; then turns must alternate human, gpt, ...
    Stricter than MindFormers (which would emit a fully masked sample): empty texts and
    conversations without a gpt answer are malformed.
    """
    if not isinstance(record, dict):
        raise RecordError(index, "<record>", f"must be an object with 'conversations', got {_type(record)}")
    if "conversations" not in record:
        raise RecordError(index, "conversations", "is missing")
    convs = record["conversations"]
    if not isinstance(convs, list):
        raise RecordError(index, "conversations", f"must be a list of turns, got {_type(convs)}")
    if not convs:
        raise RecordError(index, "conversations", "is empty")
    turns = []
    for j, turn in enumerate(convs):
        field = f"conversations[{j}]"
        if not isinstance(turn, dict):
            raise RecordError(index, field, f"must be an object with 'from' and 'value', got {_type(turn)}")
        for key in ("from", "value"):
            if key not in turn:
                raise RecordError(index, f"{field}.{key}", "is missing")
        if turn["from"] not in _ROLES:
            raise RecordError(index, f"{field}.from", f"is {turn['from']!r}; expected 'human' or 'gpt'")
        if not isinstance(turn["value"], str):
            raise RecordError(index, f"{field}.value", f"must be a string, got {_type(turn['value'])}")
        if turn["value"] == "":
            raise RecordError(index, f"{field}.value", "is empty")
        turns.append((j, _ROLES[turn["from"]], turn["value"]))
    if turns[0][1] != 0:
        turns = turns[1:]  # MindFormers: "Skip the first one if it is not from human"
    for k, (j, role, _) in enumerate(turns):
        if role != k % 2:
            want, got = ("human", "gpt") if k % 2 == 0 else ("gpt", "human")
            raise RecordError(index, f"conversations[{j}].from",
                              f"is {got!r}; turns must alternate and {want!r} comes here")
    if not any(role == 1 for _, role, _ in turns):
        raise RecordError(index, "conversations", "has no 'human' turn followed by a 'gpt' answer")
    return [(role, text) for _, role, text in turns]


def conversation_prompt(turns: list[tuple[int, str]]) -> str:
    """The Vicuna v1.1 text of validated turns: `system USER: q ASSISTANT: a</s>USER: ...`."""
    conv = get_default_conv_template("vicuna")
    for role, text in turns:
        conv.append_message(conv.roles[role], text)
    return conv.get_prompt()


# ---------------------------------------------------------------------------------------------
# Tokenization and labels (llama_preprocess.py `preprocess`)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Tokenized:
    input_ids: list[int]   # record_length ids, pad-filled
    labels: list[int]      # record_length labels, -100 where not trained on
    truncated: bool
    num_tokens: int        # non-pad ids kept


def tokenize_prompt(prompt: str, tokenizer: LlamaTokenizer, record_length: int) -> Tokenized:
    """Tokenize one Vicuna prompt and mask its labels the way MindFormers does.

    ids = [<s>] + per round (split on "</s>") its tokens + [</s>]; pad with pad id (0) to
    `record_length` (= seq_length + 1) or cut to it. Labels copy ids, with -100 on <s>, on each
    round's instruction part (`len(encode(instruction + " ASSISTANT: ", bos, eos)) - 3` tokens:
    minus <s>, </s> and the trailing "▁"), and on everything after the last round. If the length
    so computed differs from the count of non-pad ids (an <unk>=pad token inside the text, or a
    round that does not split into exactly one instruction and answer), every label is -100.
    Checked against a transcription of MindFormers' code on the sample data and edge cases; the
    one difference: a sample that is both too long and fully masked keeps MindFormers' labels
    uncut there (longer than its input_ids), here both are record_length long.
    """
    conv = get_default_conv_template("vicuna")
    sep = conv.sep + conv.roles[1] + ": "
    rounds = []
    for rou in prompt.split(conv.sep2):
        if rou == "":
            break
        rounds.append((rou, tokenizer.encode(rou, add_bos=True, add_eos=True)))
    ids = [tokenizer.bos_token_id]
    for _, round_ids in rounds:
        ids.extend(round_ids[1:])
    full = ids + [tokenizer.pad_token_id] * max(0, record_length - len(ids))
    total_len = sum(1 for i in full if i != tokenizer.pad_token_id)

    target = list(full)
    cur_len = 1
    target[:cur_len] = [IGNORE_TOKEN_ID] * cur_len
    for rou, round_ids in rounds:
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        instruction_len = len(tokenizer.encode(parts[0] + sep, add_bos=True, add_eos=True)) - 3
        end = min(cur_len + instruction_len, len(target))
        target[cur_len:end] = [IGNORE_TOKEN_ID] * (end - cur_len)
        cur_len += len(round_ids) - 1
    target[cur_len:] = [IGNORE_TOKEN_ID] * max(0, len(target) - cur_len)
    if cur_len < record_length and cur_len != total_len:
        target = [IGNORE_TOKEN_ID] * len(target)
    input_ids = full[:record_length]
    return Tokenized(input_ids=input_ids, labels=target[:record_length], truncated=len(ids) > record_length,
                     num_tokens=sum(1 for i in input_ids if i != tokenizer.pad_token_id))


def _tokenize_batch(batch: dict, tokenizer: LlamaTokenizer, record_length: int) -> dict:
    out: dict[str, list] = {"input_ids": [], "labels": [], "_truncated": [], "_tokens": [], "_ignored": []}
    for prompt in batch["text"]:
        t = tokenize_prompt(prompt, tokenizer, record_length)
        out["input_ids"].append(t.input_ids)
        out["labels"].append(t.labels)
        out["_truncated"].append(t.truncated)
        out["_tokens"].append(t.num_tokens)
        out["_ignored"].append(sum(1 for x in t.labels if x == IGNORE_TOKEN_ID))
    return out


# ---------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------

def expand_input_glob(pattern: str) -> list[str]:
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
    if not files:
        raise DataError(f"--input_glob {pattern!r} matches no file.")
    return files


def load_tokenizer(model_file: str) -> LlamaTokenizer:
    try:
        return LlamaTokenizer(model_file)
    except ValueError as e:
        raise DataError(str(e)) from None


def _collect(items, file: str, on_error: OnError, summary: Summary, fn: Callable[[Any, int], Any]) -> list:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(fn(item, i))
        except RecordError as e:
            e.file = file
            if on_error == "fail":
                raise
            summary.skipped += 1
            summary.errors.append(e)
    return out


def convert_alpaca(data: list, *, on_error: OnError = "skip", file: str | None = None) -> tuple[list[dict], Summary]:
    """Alpaca records -> conversation records (step 1); malformed records skipped or raised."""
    summary = Summary()
    out = _collect(data, file, on_error, summary, alpaca_to_conversation)
    summary.records = len(out)
    return out, summary


def preprocess_qa(input_files: list[str], tokenizer: LlamaTokenizer, seq_length: int, output_dir: str, *,
                  on_error: OnError = "skip", num_proc: int = 1, num_shards: int = 1,
                  samples_num: int | None = None) -> Summary:
    """Conversation JSON files -> dataset directory with `input_ids`, `labels` (int32, seq_length+1)."""
    check_output_dir(output_dir)
    summary = Summary()
    prompts: list[str] = []
    for path in input_files:
        prompts += _collect(read_json_records(path), path, on_error, summary,
                            lambda rec, i: conversation_prompt(conversation_turns(rec, i)))
    if samples_num is not None:
        prompts = prompts[:samples_num]
    if not prompts:
        first = f" (first: {summary.errors[0]})" if summary.errors else ""
        raise DataError(f"no valid record in {', '.join(input_files)}: {summary.skipped} malformed{first}.")
    features = datasets.Features({"input_ids": _INT_LIST, "labels": _INT_LIST, "_truncated": datasets.Value("bool"),
                                  "_tokens": datasets.Value("int64"), "_ignored": datasets.Value("int64")})
    with _atomic_output(output_dir) as (work, final):
        ds = datasets.Dataset.from_dict({"text": prompts},
                                        features=datasets.Features({"text": datasets.Value("string")}))
        ds = ds.map(_tokenize_batch, batched=True, batch_size=256, remove_columns=["text"], features=features,
                    fn_kwargs={"tokenizer": tokenizer, "record_length": seq_length + 1},
                    num_proc=num_proc if num_proc > 1 and len(ds) > 1 else None,
                    cache_file_name=os.path.join(work, "cache", "tokenized.arrow"),
                    new_fingerprint=uuid.uuid4().hex, desc="Tokenizing")
        table = ds.data
        summary.records = len(ds)
        summary.truncated = sum(table.column("_truncated").to_pylist())
        summary.tokens = sum(table.column("_tokens").to_pylist())
        summary.ignored_labels = sum(table.column("_ignored").to_pylist())
        summary.positions = len(ds) * (seq_length + 1)
        summary.fully_masked = sum(1 for n in table.column("_ignored").to_pylist() if n == seq_length + 1)
        ds = ds.remove_columns(["_truncated", "_tokens", "_ignored"])
        ds.save_to_disk(final, num_shards=min(num_shards, max(1, len(ds))))
    return summary


def clean_wikitext(s: str) -> str:
    """Undo WikiText's tokenisation artefacts (MindFormers `clean_wikitext`, trimmed to the common cases)."""
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", "), (" \n", "\n"), ("\n ", "\n"), (" 's", "'s")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    return re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)


def preprocess_wiki(input_files: list[str], tokenizer: LlamaTokenizer, seq_length: int, output_dir: str, *,
                    repeat: int = 1, num_shards: int = 1, samples_num: int | None = None) -> Summary:
    """Plain text -> `input_ids` chunks of exactly seq_length+1 tokens (the tail shorter than that is dropped).

    As MindFormers: paragraphs (split on blank lines, "= heading =" lines skipped) are tokenized
    with <s> and </s> and concatenated; the stream is repeated `repeat` times, then chunked.
    """
    check_output_dir(output_dir)
    content: list[int] = []
    for path in input_files:
        with open(path, encoding="utf-8") as f:
            for para in clean_wikitext(f.read()).split("\n\n"):
                if para and not para.strip().startswith("="):
                    content += tokenizer.encode(para, add_bos=True, add_eos=True)
    content *= repeat
    n = seq_length + 1
    chunks = [content[i:i + n] for i in range(0, len(content) - n + 1, n)]
    if samples_num is not None:
        chunks = chunks[:samples_num]
    if not chunks:
        raise DataError(f"{', '.join(input_files)} hold {len(content)} tokens, fewer than one record of "
                        f"seq_length + 1 = {n}. Pass more text or a smaller --seq_length.")
    summary = Summary(records=len(chunks), tokens=len(chunks) * n, positions=len(chunks) * n)
    with _atomic_output(output_dir) as (_, final):
        ds = datasets.Dataset.from_dict({"input_ids": chunks}, features=datasets.Features({"input_ids": _INT_LIST}))
        ds.save_to_disk(final, num_shards=min(num_shards, max(1, len(ds))))
    return summary


# ---------------------------------------------------------------------------------------------
# Atomic output
# ---------------------------------------------------------------------------------------------

def is_dataset_dir(path: str) -> bool:
    """True for a directory written by `save_to_disk` (a Dataset or a DatasetDict)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def check_output_dir(path: str) -> None:
    """Refuse to replace anything but a previous dataset directory (or an empty one)."""
    if os.path.isdir(path):
        if os.listdir(path) and not is_dataset_dir(path):
            raise DataError(f"output {path!r} exists and is not a dataset directory; refusing to overwrite it. "
                            "Pass a new --output_file or remove the directory.")
    elif os.path.exists(path):
        raise DataError(f"output {path!r} exists and is a file; refusing to overwrite it. Pass a new --output_file.")


@contextlib.contextmanager
def _atomic_output(target: str) -> Iterator[tuple[str, str]]:
    """`with _atomic_output(target) as (work_dir, staging_dir)`: write the dataset to staging_dir;
    on success it replaces `target` (a rename in the same directory), on failure nothing changes."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield work, os.path.join(work, "dataset")
        check_output_dir(target)
        if os.path.exists(target):
            os.rename(target, os.path.join(work, "previous"))
        os.rename(os.path.join(work, "dataset"), target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_json_atomic(obj: Any, path: str) -> None:
    """json.dump (indent 2, UTF-8 kept, as alpaca_converter) to a temp file, then rename onto `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
