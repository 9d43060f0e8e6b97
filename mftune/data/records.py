"""Instruction records: reading them, validating them, and the text they become.

MindFormers' ``alpaca_converter.py`` step: alpaca records ``{instruction, input, output}`` ->
``{"id", "conversations": [{"from": "human", "value": <alpaca prompt>}, {"from": "gpt", "value":
output}]}``; a conversation's validated turns -> its Vicuna v1.1 text. Malformed records are
``RecordError`` (file, record index, field); ``on_error="skip"`` drops and counts them,
``on_error="fail"`` raises the first. ``Summary`` is the report every data tool prints;
``check_skipped`` stops a tool or a run whose skipped records are more than ``max_skipped_ratio`` of those
read (one rule for the scripts' ``--max_skipped_ratio`` and a run's ``*_dataset.max_skipped_ratio``).
Raw text is read as UTF-8 (``utf8_text``): anything else is a DataError naming the byte offset.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any, Literal

from mftune.data.conversation import alpaca_prompt, get_default_conv_template
from mftune.errors import DataError, RecordError

OnError = Literal["skip", "fail"]
DEFAULT_MAX_SKIPPED_RATIO = 0.01  # the tools' --max_skipped_ratio and the schema's *_dataset.max_skipped_ratio
NAMED_SKIPS = 5  # skipped records named in a log line or an error
_ROLES = {"human": 0, "gpt": 1}  # "from" value -> index into the template's roles (USER, ASSISTANT)


@dataclasses.dataclass
class Summary:
    """Counts printed after a run (the first line is MindFormers' "Transformed N records.")."""

    records: int = 0          # records written
    read: int = 0             # records read from the input files (valid or not)
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
    # plain-text paths (wiki, wikipedia): what was read and what of it no record holds
    files: int = 0            # input files read
    unit: str = "samples"     # what ``samples`` counts there ("paragraphs", "lines")
    text_tokens: int = 0      # tokens the text gave (one pass over the files)
    dropped_tokens: int = 0   # of those, tokens in no record (a tail shorter than a record, cut ids)
    notes: list[str] = dataclasses.field(default_factory=list)  # what the tool also says (files unused...)

    def line(self, qa: bool = True) -> str:
        speed = f" Took {self.seconds:.1f} s, {self.tokens / self.seconds:,.0f} tokens/s." if self.seconds else ""
        if not qa:
            read = (f" Read {self.samples} {self.unit} from {self.files} file(s), {self.text_tokens} tokens of "
                    f"text; {self.dropped_tokens} of them are in no record." if self.files else "")
            return f"Transformed {self.records} records. {self.tokens} tokens.{read}{speed}"
        frac = self.ignored_labels / self.positions if self.positions else 0.0
        fill = self.tokens / self.positions if self.positions else 0.0
        packed = f"Packed {self.samples} samples into them; skipped" if self.packed else "Skipped"
        return (f"Transformed {self.records} records. {packed} {self.skipped} malformed of {self.read} read, "
                f"truncated {self.truncated}, fully masked {self.fully_masked}; {self.tokens} tokens in "
                f"{self.positions} positions ({fill:.1%} filled); {frac:.1%} of labels are -100.{speed}")


def read_json_records(path: str) -> list:
    """The JSON list in `path`; DataError naming the file when missing, unreadable, not UTF-8, not a list
    or empty."""
    text = utf8_text(_read_bytes(path), path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}).") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}.")
    return require_records(data, path, "an empty JSON list")


def read_jsonl_records(path: str) -> list:
    """The records of a JSON Lines file (blank lines ignored), read line by line; DataError naming the file
    and the line or byte offset of a line that is not UTF-8 JSON, or when there is no record."""
    records, offset = [], 0
    try:
        with open(_existing(path), "rb") as f:
            for n, raw in enumerate(f, start=1):
                line = utf8_text(raw, path, offset, n)
                offset += len(raw)
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {n} is not valid JSON ({e.msg}).") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e}).") from None
    return require_records(records, path, "no JSON line")


def require_records(records: list, path: str, what: str) -> list:
    """``records``, or a DataError naming ``path`` when it holds none (``what`` it holds instead)."""
    if not records:
        raise DataError(f"{path} holds no records ({what}): there is nothing to train on. Pass a file with "
                        f"records, or check that it was written completely.")
    return records


def _existing(path: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"input file {path!r} does not exist.")
    return path


def _read_bytes(path: str) -> bytes:
    try:
        with open(_existing(path), "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e}).") from None


def utf8_text(data: bytes, path: str, offset: int = 0, line: int = 1) -> str:
    """``data`` (the bytes of ``path`` from byte ``offset``, line ``line``) as text: UTF-8, a leading
    byte-order mark dropped. Anything else is a DataError naming the file, the byte offset and its line."""
    bom = 3 if offset == 0 and data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        start = bom + e.start  # in data
        at = offset + start
        line += data.count(b"\n", 0, start)
        raise DataError(f"{path} is not UTF-8 text: byte 0x{data[start]:02x} at byte offset {at} (line {line}) "
                        f"cannot be decoded ({e.reason}). Re-encode the file as UTF-8, e.g. iconv -f latin1 "
                        f"-t utf-8 (name the encoding it has).") from None


def _type(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def alpaca_to_conversation(example: Any, index: int, plain: bool = False) -> dict:
    """One alpaca record -> MindFormers' conversation record (id is the 1-based source position): the
    human turn is the Alpaca prompt (MindFormers' alpaca_converter), or with ``plain`` the instruction and
    its input alone (for chat templates, which frame the turn themselves)."""
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
            "conversations": [{"from": "human", "value": plain_prompt(example["instruction"], inp) if plain else
                               alpaca_prompt(example["instruction"], inp)},
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


def collect(items, file: str, on_error: OnError, summary: Summary, fn: Callable[[Any, int], Any]) -> list:
    """``fn(item, index)`` of every item; a RecordError is raised (on_error "fail") or counted in ``summary``
    and the item dropped. Counts ``summary.read``."""
    out = []
    for i, item in enumerate(items):
        summary.read += 1
        try:
            out.append(fn(item, i))
        except RecordError as e:
            e.file = file
            if on_error == "fail":
                raise
            summary.skipped += 1
            summary.errors.append(e)
    return out


def first_skipped(errors: list, named: str = "", n: int = NAMED_SKIPS) -> str:
    """The first ``n`` skipped records, by file, index and field, on one line (``; ``-separated); the
    file is left out where it is ``named`` already."""
    more = f"; ... {len(errors) - n} more" if len(errors) > n else ""
    return "; ".join(str(e).removeprefix(f"{named}: ") for e in errors[:n]) + more


def check_skipped(summary: Summary, max_ratio: float, setting: str, files: str) -> None:
    """DataError when more than ``max_ratio`` of the records read were skipped as malformed; ``setting``
    names the key or flag that allows more (``--max_skipped_ratio``, ``train_dataset.max_skipped_ratio``)."""
    if summary.skipped and summary.skipped > max_ratio * summary.read:
        raise DataError(f"{files}: {summary.skipped} of {summary.read} records are malformed "
                        f"({summary.skipped / summary.read:.1%}), more than {setting}={max_ratio:g} allows. "
                        f"First: {first_skipped(summary.errors, files)}. Fix or remove those records, or raise "
                        f"{setting} (1 keeps every valid record).")


def plain_prompt(instruction: str, inp: str) -> str:
    """An alpaca instruction and its input as one user message, joined by a newline (LLaMA-Factory's
    ``convert_alpaca``), without the Alpaca preamble."""
    return f"{instruction}\n{inp}" if inp else instruction


def convert_alpaca(data: list, *, on_error: OnError = "skip", file: str | None = None,
                   plain: bool = False) -> tuple[list[dict], Summary]:
    """Alpaca records -> conversation records (step 1); malformed records skipped or raised. ``plain``: the
    human turns without the Alpaca preamble (``alpaca_to_conversation``)."""
    summary = Summary()  # its read and skipped counts go on to preprocess_conversations(prior=...)
    out = collect(data, file, on_error, summary, functools.partial(alpaca_to_conversation, plain=plain))
    summary.records = len(out)
    return out, summary
