"""Stanford-Alpaca JSON -> FastChat conversation JSON (MindFormers' alpaca_converter.py).

    python scripts/alpaca_converter.py --data_path alpaca_data.json --output_path alpaca-data-conversation.json

Each record {instruction, input, output} becomes {"id": "<n>", "conversations": [{"from": "human",
"value": <alpaca prompt>}, {"from": "gpt", "value": output}]}, n the record's 1-based position.
Added to MindFormers: --on_error {skip,fail} for malformed records (skip: each one named on stderr and
counted, up to --max_skipped_ratio of the records read, default 0.01, beyond which nothing is written
and the exit status is 2), and an atomic write. An empty or non-UTF-8 input is an error naming the file.
"""
import argparse
import os
import sys

try:
    import mftune  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mftune.data.preprocess import write_json_atomic
from mftune.data.records import DEFAULT_MAX_SKIPPED_RATIO, check_skipped, convert_alpaca, read_json_records
from mftune.errors import DataError, UserError, report

MAX_REPORTED = 10


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", type=str, default="alpaca-data.json", help="alpaca JSON list")
    parser.add_argument("--output_path", type=str, default="alpaca-data-conversation.json", help="conversation JSON")
    parser.add_argument("--on_error", choices=["skip", "fail"], default="skip",
                        help="malformed record: skip it and count it (default), or stop with exit status 2")
    parser.add_argument("--max_skipped_ratio", type=float, default=DEFAULT_MAX_SKIPPED_RATIO,
                        help="with --on_error skip: the largest fraction of the records read that may be skipped "
                             "(default %(default)s); above it nothing is written and the exit status is 2")
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        data = read_json_records(args.data_path)
        if not 0 <= args.max_skipped_ratio <= 1:
            raise DataError(f"--max_skipped_ratio={args.max_skipped_ratio} is invalid: it must be in [0, 1].")
        records, summary = convert_alpaca(data, on_error=args.on_error, file=args.data_path)
        _report_skipped(prog, summary.errors)
        check_skipped(summary, args.max_skipped_ratio, "--max_skipped_ratio", args.data_path)
        if not records:
            raise DataError(f"{args.data_path}: none of its {summary.read} records is valid (first: "
                            f"{summary.errors[0]}). Fix the records.")
        write_json_atomic(records, args.output_path)
    except (UserError, OSError) as e:  # OSError: an output path that cannot be written
        return report(prog, e)
    print(f"Converted {summary.records} records to {args.output_path}. "
          f"Skipped {summary.skipped} malformed of {summary.read} read.")
    return 0


def _report_skipped(prog: str, errors: list) -> None:
    for e in errors[:MAX_REPORTED]:
        print(f"{prog}: skipped {e}", file=sys.stderr)
    if len(errors) > MAX_REPORTED:
        print(f"{prog}: ... and {len(errors) - MAX_REPORTED} more skipped", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
