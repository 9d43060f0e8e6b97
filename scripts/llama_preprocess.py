"""Conversation JSON (or plain text) -> tokenized dataset directory (MindFormers' llama_preprocess.py).

    python scripts/llama_preprocess.py --dataset_type qa --input_glob alpaca-data-conversation.json \
        --model_file tokenizer.model --seq_length 4096 --output_file alpaca-fastchat4096.mindrecord

--output_file names a directory written with datasets' save_to_disk (a ".mindrecord" suffix is just
part of the name); pass it to run_finetune.py --train_dataset_dir. Records are seq_length+1 tokens.
The tokenizer kind comes from --model_file: a SentencePiece model (Llama 2, MindFormers'
mindformers/tools/dataset_preprocess/llama/llama_preprocess.py) or a tiktoken file (Llama 3,
MindFormers' research/llama3/llama_preprocess.py); --tokenizer llama|llama3 (the two tools' values)
must agree with it when given; --model_file may also be a Hugging Face tokenizer.json or model directory
(--tokenizer hf). qa conversations use MindFormers' Vicuna v1.1 template for all;
--template llama3 writes Llama 3 Instruct's header format instead (Llama 3 tokenizer only), --template
llama2 / chatml / hf a Jinja chat template (Llama 2 chat, ChatML, the directory's own), trained on the
assistant's answers only; their input may also be {"messages": [{role, content}]} records with system turns.
--dataset_type wikipedia reads parquet text into exactly --samples_num records (default 10000), as
MindFormers' Llama 2 tool; --samples_num has no effect on wiki and qa, as in MindFormers (to train
on fewer records, set data_loader.num_samples / --num_samples).
--packing (qa) puts several conversations into each record (best-fit decreasing) and adds a
position_ids column restarting at 0 for each; training then attends within each conversation, so
no compute goes to padding. Prints a summary (records, tokens, truncated, masked labels, tokens/s).
Differences from MindFormers: --file_partition sets the number of Arrow shards; --repeat applies to
wiki; --input_glob of qa and wiki may match several files; added --template, --on_error, --max_skipped_ratio,
--num_proc and --packing; the output is written atomically. Malformed qa records are skipped and named
(--on_error skip, the default) up to --max_skipped_ratio of the records read (default 0.01); above it, or
with --on_error fail at the first one, nothing is written and the exit status is 2. An empty input, or
one that is not UTF-8 (the byte offset is named), is an error too.
"""
import argparse
import os
import sys

try:
    import mftune  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mftune.data.preprocess import expand_input_glob, load_tokenizer, preprocess_qa, preprocess_wiki
from mftune.data.records import DEFAULT_MAX_SKIPPED_RATIO
from mftune.data.templates import TEMPLATE_NAMES
from mftune.data.tokenizer_kinds import TOOL_NAMES
from mftune.data.wikipedia import DEFAULT_SAMPLES_NUM, preprocess_wikipedia
from mftune.errors import DataError, UserError, report

MAX_REPORTED = 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset_type", type=str, default="wiki", choices=["wiki", "qa", "wikipedia"],
                   help="qa: conversation JSON (alpaca_converter output); wiki: plain text (default, as "
                        "MindFormers); wikipedia: parquet text (a file or a directory of them)")
    p.add_argument("--input_glob", type=str, required=True, help="input file (or glob of files)")
    p.add_argument("--output_file", type=str, default="./dataset/wiki2048/wiki2048", help="output dataset directory")
    p.add_argument("--tokenizer", type=str, default=None, choices=list(TOOL_NAMES),
                   help="llama (SentencePiece, Llama 2), llama3 (tiktoken, Llama 3) or hf (tokenizer.json); "
                        "default: what --model_file is")
    p.add_argument("--model_file", type=str, required=True,
                   help="tokenizer.model (SentencePiece or tiktoken), tokenizer.json, or a Hugging Face model directory")
    p.add_argument("--template", type=str, default=None, choices=list(TEMPLATE_NAMES),
                   help="qa: conversation template (default vicuna, MindFormers' for Llama 2 and 3; llama3: "
                        "Llama 3 Instruct's header format; llama2: [INST] with <<SYS>>; chatml: <|im_start|>; "
                        "hf: the tokenizer directory's own Jinja chat_template)")
    p.add_argument("--file_partition", type=int, default=1, help="number of Arrow shards in the output")
    p.add_argument("--repeat", type=int, default=1, help="wiki: repeat the token stream this many times")
    p.add_argument("--samples_num", type=int, default=None,
                   help=f"wikipedia: write exactly this many records (default {DEFAULT_SAMPLES_NUM}, reading the "
                        "files again if they run out); no effect on wiki and qa, as in MindFormers")
    p.add_argument("--seq_length", type=int, default=2048, help="records are seq_length + 1 tokens")
    p.add_argument("--on_error", choices=["skip", "fail"], default="skip",
                   help="malformed record: skip it and count it (default), or stop with exit status 2")
    p.add_argument("--max_skipped_ratio", type=float, default=DEFAULT_MAX_SKIPPED_RATIO,
                   help="qa, with --on_error skip: the largest fraction of the records read that may be skipped "
                        "(default %(default)s); above it nothing is written and the exit status is 2")
    p.add_argument("--num_proc", type=int, default=1, help="tokenizer processes (datasets num_proc)")
    p.add_argument("--packing", action="store_true",
                   help="qa: pack several conversations per record, each attending only to itself")
    return p


def _check_args(args) -> None:
    for name in ("seq_length", "file_partition", "repeat", "num_proc", "samples_num"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DataError(f"--{name}={value} is invalid: it must be >= 1.")
    if not 0 <= args.max_skipped_ratio <= 1:
        raise DataError(f"--max_skipped_ratio={args.max_skipped_ratio} is invalid: it must be in [0, 1] (a fraction "
                        f"of the records read).")
    if args.template is not None and args.dataset_type != "qa":
        raise DataError(f"--template applies to --dataset_type qa (conversations), not {args.dataset_type}. "
                        "Drop --template.")
    if args.packing and args.dataset_type != "qa":
        raise DataError("--packing applies to --dataset_type qa: wiki records are already full "
                        "seq_length + 1 token chunks of the text. Drop --packing.")


def run(args) -> int:
    _check_args(args)
    tokenizer = load_tokenizer(args.model_file, args.tokenizer and TOOL_NAMES[args.tokenizer])
    if args.samples_num is not None and args.dataset_type != "wikipedia":
        print(f"note: --samples_num applies to --dataset_type wikipedia, as in MindFormers; {args.dataset_type} "
              f"writes every record (train on fewer with --num_samples)", file=sys.stderr)
    if args.dataset_type == "wikipedia":
        summary = preprocess_wikipedia(args.input_glob, tokenizer, args.seq_length, args.output_file,
                                       samples_num=args.samples_num or DEFAULT_SAMPLES_NUM,
                                       num_shards=args.file_partition)
    elif args.dataset_type == "qa":
        summary = preprocess_qa(expand_input_glob(args.input_glob), tokenizer, args.seq_length, args.output_file,
                                on_error=args.on_error, num_proc=args.num_proc, num_shards=args.file_partition,
                                packing=args.packing, template=args.template,
                                max_skipped_ratio=args.max_skipped_ratio)
    else:
        files = expand_input_glob(args.input_glob)
        with open(files[0], encoding="utf-8", errors="replace") as f:
            if f.read(64).lstrip().startswith(("[", "{")):
                print("warning: the input looks like JSON; for conversations pass --dataset_type qa", file=sys.stderr)
        summary = preprocess_wiki(files, tokenizer, args.seq_length, args.output_file, repeat=args.repeat,
                                  num_shards=args.file_partition, num_proc=args.num_proc)
    for e in summary.errors[:MAX_REPORTED]:
        print(f"skipped {e}", file=sys.stderr)
    if len(summary.errors) > MAX_REPORTED:
        print(f"... and {len(summary.errors) - MAX_REPORTED} more skipped", file=sys.stderr)
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    print(summary.line(qa=args.dataset_type == "qa"))
    print(f"Transform finished, output files refer: {args.output_file}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (UserError, OSError) as e:  # OSError: an output path that cannot be written
        return report(parser.prog, e)


if __name__ == "__main__":
    sys.exit(main())
