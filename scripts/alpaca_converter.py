"""Stanford-Alpaca JSON -> FastChat conversation JSON (MindFormers' alpaca_converter.py).

    python scripts/alpaca_converter.py --data_path alpaca_data.json --output_path alpaca-data-conversation.json

Each record {instruction, input, output} becomes {"id": "<n>", "conversations": [{"from": "human",
"value": <alpaca prompt>}, {"from": "gpt", "value": output}]}, n the record's 1-based position.
Added to MindFormers: --on_error {skip,fail} for malformed records, and an atomic write.
"""
import argparse
import os
import sys

try:
    import mftune  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mftune.data.preprocess import write_json_atomic
from mftune.data.records import convert_alpaca, read_json_records
from mftune.errors import UserError, report

MAX_REPORTED = 10


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", type=str, default="alpaca-data.json", help="alpaca JSON list")
    parser.add_argument("--output_path", type=str, default="alpaca-data-conversation.json", help="conversation JSON")
    parser.add_argument("--on_error", choices=["skip", "fail"], default="skip",
                        help="malformed record: skip it and count it (default), or stop with exit status 2")
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        data = read_json_records(args.data_path)
        records, summary = convert_alpaca(data, on_error=args.on_error, file=args.data_path)
        write_json_atomic(records, args.output_path)
    except (UserError, OSError) as e:  # OSError: an output path that cannot be written
        return report(prog, e)
    for e in summary.errors[:MAX_REPORTED]:
        print(f"{prog}: skipped {e}", file=sys.stderr)
    if len(summary.errors) > MAX_REPORTED:
        print(f"{prog}: ... and {len(summary.errors) - MAX_REPORTED} more skipped", file=sys.stderr)
    print(f"Converted {summary.records} records to {args.output_path}. Skipped {summary.skipped} malformed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
