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

import bisect
import contextlib
import dataclasses
import glob
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    samples: int = 0          # samples (conversations or paragraphs) in them
    skipped: int = 0          # malformed records dropped (on_error="skip")
    truncated: int = 0        # samples longer than seq_length + 1 tokens, cut
    fully_masked: int = 0     # samples whose labels are all -100 (template length mismatch, or cut before the answer)
    tokens: int = 0           # non-pad tokens written
    positions: int = 0        # all positions written (records * (seq_length + 1))
    ignored_labels: int = 0   # label positions equal to -100 (qa only)
    packed: bool = False      # several samples per record (--packing)
    seconds: float = 0.0      # tokenizing (and packing) time
    errors: list[RecordError] = dataclasses.field(default_factory=list)

    def line(self, qa: bool = True) -> str:
        speed = f" Took {self.seconds:.1f} s, {self.tokens / self.seconds:,.0f} tokens/s." if self.seconds else ""
        if not qa:
            return f"Transformed {self.records} records. {self.tokens} tokens.{speed}"
        frac = self.ignored_labels / self.positions if self.positions else 0.0
        fill = self.tokens / self.positions if self.positions else 0.0
        packed = f"Packed {self.samples} samples into them; skipped" if self.packed else "Skipped"
        return (f"Transformed {self.records} records. {packed} {self.skipped} malformed, "
                f"truncated {self.truncated}, fully masked {self.fully_masked}; {self.tokens} tokens in "
                f"{self.positions} positions ({fill:.1%} filled); {frac:.1%} of labels are -100.{speed}")


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
    length: int            # ids before padding (<= record_length)


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
    return tokenize_prompts([prompt], tokenizer, record_length)[0]


def tokenize_prompts(prompts: list[str], tokenizer: LlamaTokenizer, record_length: int) -> list[Tokenized]:
    """``tokenize_prompt`` of each prompt; the texts of all of them are encoded in two batched
    sentencepiece calls (rounds, instruction parts), which is several times faster than one call each."""
    conv = get_default_conv_template("vicuna")
    sep = conv.sep + conv.roles[1] + ": "
    rounds: list[list[str]] = []
    for prompt in prompts:
        rs = []
        for rou in prompt.split(conv.sep2):
            if rou == "":
                break
            rs.append(rou)
        rounds.append(rs)
    instructions = [[parts[0] + sep if len(parts) == 2 else None for parts in (rou.split(sep) for rou in rs)]
                    for rs in rounds]
    round_ids = iter(tokenizer.sp.encode([r for rs in rounds for r in rs]))
    instruction_ids = iter(tokenizer.sp.encode([i for ins in instructions for i in ins if i is not None]))
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    out = []
    for rs, ins in zip(rounds, instructions):
        pieces = [next(round_ids) for _ in rs]  # each round without <s>, </s>
        ids = [bos]
        for piece in pieces:
            ids.extend(piece)
            ids.append(eos)
        full = ids + [pad] * max(0, record_length - len(ids))
        total_len = len(ids) - ids.count(pad)  # list.count: C speed on long records

        target = list(full)
        cur_len = 1
        target[:cur_len] = [IGNORE_TOKEN_ID] * cur_len
        instruction_lens = [None if i is None else len(next(instruction_ids)) - 1 for i in ins]
        for piece, instruction_len in zip(pieces, instruction_lens):
            if instruction_len is None:  # not exactly one instruction and one answer
                break
            end = min(cur_len + instruction_len, len(target))
            target[cur_len:end] = [IGNORE_TOKEN_ID] * (end - cur_len)
            cur_len += len(piece) + 1
        target[cur_len:] = [IGNORE_TOKEN_ID] * max(0, len(target) - cur_len)
        if cur_len < record_length and cur_len != total_len:
            target = [IGNORE_TOKEN_ID] * len(target)
        out.append(Tokenized(input_ids=full[:record_length], labels=target[:record_length],
                             truncated=len(ids) > record_length,
                             num_tokens=min(len(ids), record_length) - ids[:record_length].count(pad),
                             length=min(len(ids), record_length)))
    return out


def _tokenize_batch(batch: dict, tokenizer: LlamaTokenizer, record_length: int, pad: bool = True) -> dict:
    """``pad``: records of ``record_length``; False: each sample only as long as its tokens (for packing)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "_truncated": [], "_tokens": [], "_labelled": []}
    for t in tokenize_prompts(batch["text"], tokenizer, record_length):
        n = record_length if pad else t.length
        out["input_ids"].append(t.input_ids[:n])
        out["labels"].append(t.labels[:n])
        out["_truncated"].append(t.truncated)
        out["_tokens"].append(t.num_tokens)
        out["_labelled"].append(len(t.labels) - t.labels.count(IGNORE_TOKEN_ID))
    return out


def pack_samples(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: the sample indices of each record (ascending), with the
    lengths of a record's samples summing to at most ``capacity`` (every length <= capacity).
    Longest samples first, each into the fullest record it still fits in; deterministic."""
    free: list[tuple[int, int]] = []  # (space left, record), sorted
    records: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j == len(free):
            records.append([i])
            space, r = capacity, len(records) - 1
        else:
            space, r = free.pop(j)
            records[r].append(i)
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], r))
    return [sorted(r) for r in records]


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (values, start offsets) numpy arrays."""
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return pc.list_flatten(column).to_numpy(zero_copy_only=False), starts


def _records_column(a: np.ndarray) -> pa.ChunkedArray:
    """Rows of a 2-D int32 array as an Arrow list column, in chunks whose int32 offsets cannot overflow."""
    rows = max(1, (2**31 - 1) // max(1, a.shape[1]))
    chunks = []
    for start in range(0, a.shape[0], rows):
        block = a[start:start + rows]
        offsets = np.arange(0, block.size + 1, a.shape[1], dtype=np.int64).astype(np.int32)
        chunks.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(block.ravel())))
    return pa.chunked_array(chunks, type=pa.list_(pa.int32()))


def pack_dataset(ds: datasets.Dataset, record_length: int, pad_id: int) -> datasets.Dataset:
    """Unpadded samples (``input_ids``, ``labels``) -> records of ``record_length`` holding several
    samples each, plus ``position_ids`` restarting at 0 for every sample (and for the padding tail,
    whose labels are -100). A sample's first label is always -100 (<s>), so no token learns to
    predict across a boundary; the model attends within each sample (``LlamaForCausalLM`` packed path)."""
    ds = ds.flatten_indices() if ds._indices is not None else ds  # read the selected rows only
    ids, starts = _flat(ds.data.column("input_ids"))
    labels, _ = _flat(ds.data.column("labels"))
    lengths = pc.list_value_length(ds.data.column("input_ids")).to_numpy(zero_copy_only=False)
    bins = pack_samples(lengths.tolist(), record_length)
    out_ids = np.full((len(bins), record_length), pad_id, dtype=np.int32)
    out_labels = np.full((len(bins), record_length), IGNORE_TOKEN_ID, dtype=np.int32)
    out_pos = np.zeros((len(bins), record_length), dtype=np.int32)
    arange = np.arange(record_length, dtype=np.int32)
    for r, samples in enumerate(bins):
        at = 0
        for i in samples:
            n, s = int(lengths[i]), int(starts[i])
            out_ids[r, at:at + n] = ids[s:s + n]
            out_labels[r, at:at + n] = labels[s:s + n]
            out_pos[r, at:at + n] = arange[:n]
            at += n
        out_pos[r, at:] = arange[:record_length - at]

    table = pa.table({"input_ids": _records_column(out_ids), "labels": _records_column(out_labels),
                      "position_ids": _records_column(out_pos)})
    return datasets.Dataset(table).cast(datasets.Features({c: _INT_LIST for c in table.column_names}))


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


def preprocess_qa(input_files: list[str], tokenizer: LlamaTokenizer, seq_length: int, output_dir: str,
                  **kwargs: Any) -> Summary:
    """Conversation JSON files -> dataset directory (``preprocess_conversations``, same keywords)."""
    return preprocess_conversations(((path, read_json_records(path)) for path in input_files), tokenizer,
                                    seq_length, output_dir, **kwargs)


def preprocess_conversations(sources: Iterable[tuple[str, list]], tokenizer: LlamaTokenizer, seq_length: int,
                             output_dir: str, *, on_error: OnError = "skip", num_proc: int = 1, num_shards: int = 1,
                             samples_num: int | None = None, packing: bool = False) -> Summary:
    """Conversation records, as ``(file name, records)`` pairs -> dataset directory with `input_ids`,
    `labels` (int32, seq_length+1); with ``packing``, several conversations per record and a
    `position_ids` column (``pack_dataset``)."""
    check_output_dir(output_dir)
    summary = Summary(packed=packing)
    prompts: list[str] = []
    names: list[str] = []
    for name, records in sources:
        names.append(name)
        prompts += _collect(records, name, on_error, summary,
                            lambda rec, i: conversation_prompt(conversation_turns(rec, i)))
    if samples_num is not None:
        prompts = prompts[:samples_num]
    if not prompts:
        first = f" (first: {summary.errors[0]})" if summary.errors else ""
        raise DataError(f"no valid record in {', '.join(names)}: {summary.skipped} malformed{first}.")
    record_length = seq_length + 1
    features = datasets.Features({"input_ids": _INT_LIST, "labels": _INT_LIST, "_truncated": datasets.Value("bool"),
                                  "_tokens": datasets.Value("int64"), "_labelled": datasets.Value("int64")})
    start = time.perf_counter()
    with _atomic_output(output_dir) as (work, final):
        ds = datasets.Dataset.from_dict({"text": prompts},
                                        features=datasets.Features({"text": datasets.Value("string")}))
        ds = ds.map(_tokenize_batch, batched=True, batch_size=256, remove_columns=["text"], features=features,
                    fn_kwargs={"tokenizer": tokenizer, "record_length": record_length, "pad": not packing},
                    num_proc=num_proc if num_proc > 1 and len(ds) > 1 else None,
                    cache_file_name=os.path.join(work, "cache", "tokenized.arrow"),
                    new_fingerprint=uuid.uuid4().hex, desc="Tokenizing")
        table = ds.data
        summary.samples = len(ds)
        summary.truncated = pc.sum(table.column("_truncated").cast(pa.int64())).as_py() or 0
        summary.tokens = pc.sum(table.column("_tokens")).as_py()
        labelled = table.column("_labelled").to_numpy()
        summary.fully_masked = int((labelled == 0).sum())
        ds = ds.remove_columns(["_truncated", "_tokens", "_labelled"])
        if packing:
            ds = pack_dataset(ds, record_length, tokenizer.pad_token_id)
        summary.records = len(ds)
        summary.positions = len(ds) * record_length
        summary.ignored_labels = summary.positions - int(labelled.sum())
        summary.seconds = time.perf_counter() - start
        ds.save_to_disk(final, num_shards=min(num_shards, max(1, len(ds))))
    return summary


def clean_wikitext(s: str) -> str:
    """Undo WikiText's tokenisation artefacts (MindFormers `clean_wikitext`, trimmed to the common cases)."""
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", "), (" \n", "\n"), ("\n ", "\n"), (" 's", "'s")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    return re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)


def _tokenize_paragraphs(batch: dict, tokenizer: LlamaTokenizer) -> dict:
    return {"ids": [tokenizer.encode(p, add_bos=True, add_eos=True) for p in batch["text"]]}


def preprocess_wiki(input_files: list[str], tokenizer: LlamaTokenizer, seq_length: int, output_dir: str, *,
                    repeat: int = 1, num_shards: int = 1, samples_num: int | None = None,
                    num_proc: int = 1) -> Summary:
    """Plain text -> `input_ids` chunks of exactly seq_length+1 tokens (the tail shorter than that is dropped).

    As MindFormers: paragraphs (split on blank lines, "= heading =" lines skipped) are tokenized
    with <s> and </s> (``num_proc`` processes) and concatenated; the stream is repeated `repeat`
    times, then chunked. Records span paragraph boundaries, as pretraining data does.
    """
    check_output_dir(output_dir)
    paragraphs: list[str] = []
    for path in input_files:
        with open(path, encoding="utf-8") as f:
            paragraphs += [p for p in clean_wikitext(f.read()).split("\n\n") if p and not p.strip().startswith("=")]
    n = seq_length + 1
    if not paragraphs:
        raise DataError(f"{', '.join(input_files)} hold no text paragraphs (only blank or '= heading =' lines), "
                        f"fewer than one record of seq_length + 1 = {n} tokens. Pass files with text.")
    start = time.perf_counter()
    with _atomic_output(output_dir) as (work, final):
        ds = datasets.Dataset.from_dict({"text": paragraphs},
                                        features=datasets.Features({"text": datasets.Value("string")}))
        ds = ds.map(_tokenize_paragraphs, batched=True, batch_size=256, remove_columns=["text"],
                    features=datasets.Features({"ids": _INT_LIST}), fn_kwargs={"tokenizer": tokenizer},
                    num_proc=num_proc if num_proc > 1 and len(ds) > 1 else None,
                    cache_file_name=os.path.join(work, "cache", "tokenized.arrow"),
                    new_fingerprint=uuid.uuid4().hex, desc="Tokenizing")
        content = np.tile(pc.list_flatten(ds.data.column("ids")).to_numpy(zero_copy_only=False), repeat)
        records = len(content) // n
        if samples_num is not None:
            records = min(records, samples_num)
        if records == 0:
            raise DataError(f"{', '.join(input_files)} hold {len(content)} tokens, fewer than one record of "
                            f"seq_length + 1 = {n}. Pass more text or a smaller --seq_length.")
        table = pa.table({"input_ids": _records_column(content[:records * n].astype(np.int32).reshape(records, n))})
        out = datasets.Dataset(table).cast(datasets.Features({"input_ids": _INT_LIST}))
        summary = Summary(records=records, samples=len(paragraphs), tokens=records * n, positions=records * n,
                          seconds=time.perf_counter() - start)
        out.save_to_disk(final, num_shards=min(num_shards, max(1, records)))
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
