"""``python -m mftune.cli --config FILE [flags]``: validate a configuration and print it resolved.

The command line itself is ``mftune.config.cli``; this module is its documented entry point.
"""
import sys

from mftune.config.cli import check_main

if __name__ == "__main__":
    sys.exit(check_main())
