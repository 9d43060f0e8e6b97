"""Reshard a checkpoint to another parallel layout (MindFormers' tools/ckpt_transform/transform_checkpoint.py).

    # complete / HF / distributed -> the layout of a run (its strategy/ folder, e.g. from --only_save_strategy True)
    python scripts/transform_checkpoint.py --src_checkpoint output/checkpoint \\
        --dst_checkpoint_dir transformed --dst_strategy output_4x2/strategy
    # distributed -> complete
    python scripts/transform_checkpoint.py --src_checkpoint output/checkpoint --dst_checkpoint_dir merged
    # the work split over 2 processes (as transform_checkpoint.sh does): rank_id 0 and 4 of 8 destination ranks
    python scripts/transform_checkpoint.py ... --transform_process_num 2 --rank_id 0 &
    python scripts/transform_checkpoint.py ... --transform_process_num 2 --rank_id 4

    # -> MindSpore: a complete .ckpt, or the rank files of a MindFormers layout (its strategy/ folder of .ckpt files)
    python scripts/transform_checkpoint.py --src_checkpoint output/checkpoint --dst_checkpoint_dir ms \
        --output_format ckpt [--dst_strategy mindformers_output/strategy]

Output: <dst_checkpoint_dir>/<name>/rank_{r}/<prefix><r>.safetensors (+ meta.json) for every destination rank
this process handles, and transform_succeed_rank_<rank_id>.txt; <name> is the source file's name without
extension or the source directory's name. Without --dst_strategy: one complete file, rank_0/<prefix>0.safetensors.
--output_format ckpt writes MindSpore .ckpt files instead (rank_{r}/<prefix><r>.ckpt, MindFormers' names and
counters); a distributed .ckpt output needs a MindSpore --dst_strategy (ckpt_strategy_rank_*.ckpt files or a
merged strategy file), which is also accepted for .safetensors outputs.
--src_checkpoint: anything --load_checkpoint takes (complete file, directory of complete files, Hugging Face
directory, PEFT adapter directory, rank_*/ directory, MindSpore .ckpt file, directory or rank_*/ set).
--src_strategy is needed for a MindSpore rank_*/ set (the strategy of the run that saved it); for mftune's rank
files it is optional (they record their own blocks) and checked against them. --world_size (the destination's)
defaults to the strategy's; --transform_by_rank is accepted and ignored (every transform is by rank). The source
is never modified. Errors: one line on stderr, exit status 2.
"""
import argparse
import os
import shutil
import sys

try:
    import mftune  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm

from mftune.errors import CheckpointError, UserError, report
from mftune.checkpoint.formats.distributed import rank_dirs, rank_files
from mftune.checkpoint.formats import distributed, mindspore_ranks, recognise
from mftune.checkpoint.mindspore.strategy import is_mindspore_strategy, load_strategy
from mftune.checkpoint.transform import (DEFAULT_PREFIX, OUTPUT_FORMATS, check_destination, check_source_strategy,
                                         checkpoint_name, read_strategy, refuse_overlap, transform, worker_ranks,
                                         write_marker)


def _none(value: str | None) -> str | None:
    return None if value in (None, "", "None", "none") else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src_checkpoint", required=True, help="checkpoint file or directory to transform")
    p.add_argument("--dst_checkpoint_dir", default=os.path.join(os.getcwd(), "transformed_checkpoint"),
                   help="where <name>/rank_*/ is written (default: ./transformed_checkpoint)")
    p.add_argument("--src_strategy", default=None,
                   help="strategy of a distributed source: needed for MindSpore rank files, optional (checked) "
                        "for mftune's")
    p.add_argument("--dst_strategy", default=None,
                   help="strategy directory (or one rank's file) of the destination layout, mftune's or MindSpore's; "
                        "None: complete")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="file name prefix (default checkpoint_)")
    p.add_argument("--rank_id", type=int, default=0, help="first destination rank of this process")
    p.add_argument("--world_size", type=int, default=None, help="destination world size (default: the strategy's)")
    p.add_argument("--transform_process_num", type=int, default=1, help="processes sharing the work")
    p.add_argument("--transform_by_rank", default=None, help="accepted for MindFormers compatibility, ignored")
    p.add_argument("--output_format", default="mftune", choices=sorted(OUTPUT_FORMATS),
                   help="mftune (.safetensors, default) or ckpt / mindspore (MindSpore .ckpt files)")
    return p


def plan(args) -> tuple[dict | None, list[int], int]:
    """(destination strategy, ranks this process writes, destination world size)."""
    dst = _none(args.dst_strategy)
    if dst is None:
        if args.world_size not in (None, 1) or args.transform_process_num != 1:
            raise CheckpointError(f"--world_size {args.world_size} / --transform_process_num "
                                  f"{args.transform_process_num} need --dst_strategy (the layout of those ranks); "
                                  f"without it the result is one complete checkpoint, written by one process.")
        return None, [0], 1
    if is_mindspore_strategy(dst):  # a MindFormers run's layout (any rank's file describes every rank)
        strategy = load_strategy(dst)
        return strategy, _ranks_of(args, strategy.world_size), strategy.world_size
    strategy = read_strategy(dst)
    world = int(next(iter(strategy.values()))["world_size"])
    if os.path.isfile(dst):  # one rank's strategy: that rank only
        _check_world(args, world)
        return strategy, list(strategy), world
    return strategy, _ranks_of(args, world), world


def _ranks_of(args, world: int) -> list[int]:
    """The destination ranks this process writes (--rank_id, --transform_process_num)."""
    _check_world(args, world)
    workers = worker_ranks(world, args.transform_process_num)
    if args.rank_id not in workers:
        raise CheckpointError(f"--rank_id {args.rank_id} is not a transform rank for --transform_process_num "
                              f"{args.transform_process_num} of {world} ranks: use one of {sorted(workers)}.")
    return workers[args.rank_id]


def _check_world(args, world: int) -> None:
    if args.world_size is not None and args.world_size != world:
        raise CheckpointError(f"--world_size {args.world_size} but the strategy {args.dst_strategy} is of a "
                              f"{world}-rank layout. Drop --world_size or pass the matching strategy.")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        strategy, ranks, world = plan(args)
        src = args.src_checkpoint
        if not os.path.exists(src):
            raise CheckpointError(f"--src_checkpoint {src} does not exist.")
        src_strategy = _none(args.src_strategy) or ""
        if src_strategy and recognise(src) is not mindspore_ranks:
            if recognise(src) is distributed:
                check_source_strategy(args.src_strategy, rank_files(src))
            else:
                print(f"Note: --src_strategy is ignored: {src} is a complete checkpoint.", file=sys.stderr)
        out_root = os.path.join(args.dst_checkpoint_dir, checkpoint_name(src))
        refuse_overlap(src, out_root)
        check_destination(out_root)  # only an earlier transform's output may be overwritten
        if 0 in ranks:  # another layout's extra rank folders would be loaded with this one's
            for stale in (d for d in rank_dirs(out_root) if int(os.path.basename(d)[5:]) >= world):
                print(f"Removing {stale}: not a rank of the {world}-rank destination", file=sys.stderr)
                shutil.rmtree(stale)
        progress = lambda it, total: tqdm(it, total=total, unit="tensor", desc="transform", disable=None)  # noqa: E731
        try:
            written = transform(src, args.dst_checkpoint_dir, strategy, ranks, prefix=args.prefix, progress=progress,
                                src_strategy=src_strategy, output_format=args.output_format)
        except Exception as exc:
            os.makedirs(out_root, exist_ok=True)
            write_marker(out_root, args.rank_id, f"{type(exc).__name__}: {exc}")
            raise
        write_marker(out_root, args.rank_id, None)
    except (UserError, OSError) as e:  # OSError: an output path that cannot be written
        return report(parser.prog, e, fold=True)
    for path in written:
        print(f"Wrote {path}")
    print("......Transform finished!......")
    return 0


if __name__ == "__main__":
    sys.exit(main())
