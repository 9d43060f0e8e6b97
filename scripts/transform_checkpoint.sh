#!/bin/bash
# MindFormers' transform_checkpoint.sh (mindformers/tools/ckpt_transform/, r1.3.0), same positional arguments:
#   bash scripts/transform_checkpoint.sh SRC_CKPT SRC_STRATEGY|None DST_CKPT_DIR DST_STRATEGY|None WORLD_SIZE \
#        PROCESS_NUM [PREFIX]
# Starts PROCESS_NUM scripts/transform_checkpoint.py processes (process i writes the ranks from
# i * WORLD_SIZE / PROCESS_NUM on) in the background, waits for them, and exits non-zero if any failed.
# Each process logs to ./log/transform_i.log. Deliberate differences from MindFormers' script: ./log is
# created if missing but never emptied (MindFormers runs `rm -rf ./log`), a failed process makes the
# script fail (MindFormers prints "transform finished" whatever happened), and DST_STRATEGY may be None
# (a complete checkpoint, as transform_checkpoint.py allows).
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$#" -lt 6 ]; then
    echo "Usage: $0 <src_ckpt> <src_strategy> <dst_ckpt_dir> <dst_strategy> <world_size> <process_num> [<prefix>]"
    exit 2
fi
abs() { if [ "$1" == "None" ] || [ "${1:0:1}" == "/" ]; then echo "$1"; else realpath -m "$PWD/$1"; fi; }
SRC_CKPT=$(abs "$1"); SRC_STRATEGY=$(abs "$2"); DST_CKPT_DIR=$(abs "$3"); DST_STRATEGY=$(abs "$4")
WORLD_SIZE=$5; PROCESS_NUM=$6; PREFIX=${7:-checkpoint_}
if ! [[ "$WORLD_SIZE" =~ ^[1-9][0-9]*$ && "$PROCESS_NUM" =~ ^[1-9][0-9]*$ ]] || (( WORLD_SIZE % PROCESS_NUM )); then
    echo "error: WORLD_SIZE=$WORLD_SIZE and PROCESS_NUM=$PROCESS_NUM must be positive integers, PROCESS_NUM dividing WORLD_SIZE" >&2
    exit 2
fi
[ "$SRC_STRATEGY" == "None" ] && SRC_STRATEGY=""
[ "$DST_STRATEGY" == "None" ] && DST_STRATEGY=""
mkdir -p ./log
pids=()
for ((i = 0; i < PROCESS_NUM; i++)); do
    rank_id=$((i * (WORLD_SIZE / PROCESS_NUM)))
    echo "start device_$i with rank_id $rank_id"
    RANK_ID=$rank_id python "$ROOT_DIR/scripts/transform_checkpoint.py" \
        --src_checkpoint="$SRC_CKPT" --dst_checkpoint_dir="$DST_CKPT_DIR" \
        ${SRC_STRATEGY:+--src_strategy="$SRC_STRATEGY"} ${DST_STRATEGY:+--dst_strategy="$DST_STRATEGY"} \
        --prefix="$PREFIX" --rank_id=$rank_id --world_size="$WORLD_SIZE" --transform_process_num="$PROCESS_NUM" \
        --transform_by_rank=True > "./log/transform_$i.log" 2>&1 &
    pids+=($!)
    echo "transform log saved in $(realpath "$PWD")/log/transform_$i.log"
done
status=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "error: transform process $i failed; see ./log/transform_$i.log" >&2
        status=1
    fi
done
[ $status -eq 0 ] && echo "transform finished"
exit $status
