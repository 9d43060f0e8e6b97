"""MindSpore's parallel strategy files: which block of each tensor every rank of a distributed
checkpoint holds (read without MindSpore).

A strategy file is a ``ParallelStrategyMap`` protobuf (``node_strategy.proto``; MindSpore writes
one per rank, ``ckpt_strategy_rank_{r}.ckpt``, and ``merge_pipeline_strategys`` merges a run's
pipeline stages into one file whose parameter names get a ``"<stage>-"`` prefix) or the same
content as JSON (a ``.json`` name). Per parameter, ``ParallelLayouts`` holds:

- ``dev_matrix``: the device grid of its pipeline stage (its product: the stage's device count);
  a rank's coordinates in it are the digits of its rank within the stage, row-major;
- ``tensor_map``: per tensor dimension, the grid axes that split it, counted from the right (-1:
  none). One ``TensorMap`` holds one int per dimension; several ``TensorMap`` messages hold one
  list each ("layout" mode: a dimension split over several axes, the first most significant);
- ``opt_weight_shard_step`` / ``opt_weight_shard_size`` (both non-zero: optimizer parallel, size -1
  meaning every repeated axis): dimension 0 of each model-parallel slice is split further over the
  grid axes the tensor map leaves unused (size > 1), taken from the fastest-varying one leftwards,
  the last one taken only in its fast part; the most significant taken first (and MindSpore's
  shortcut for a grid whose only repeated axis is the leftmost, ``Layout._shortcut``);
- ``field`` and ``param_split_shape`` (wide-and-deep embeddings, uneven splits): not supported.

These are the rules of MindSpore 2.7's ``mindspore/parallel/_tensor.py`` (``_get_tensor_strategy``,
``_get_tensor_slice_index``, ``_expand_layout``, ``_construct_tensor_layout_for_opt_shard`` and its
helper) and ``_parallel_serialization.py`` (``_convert_to_list``, ``_merge_protobuf_strategy``): a
rank's piece is always one block (a range per dimension) of the global tensor, which is what
``Layout.block`` returns. The global shape is a rank's local shape times the pieces per dimension.
Optimizer moments (``adam_m.<p>``, ``adam_v.<p>``) without a layout of their own take ``p``'s.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field as dc_field

from mftune.checkpoint.keys import parameter_of
from mftune.checkpoint.mindspore.wire import LEN, WireError, fields, packed_varints, signed
from mftune.errors import CheckpointError

BlockRanges = tuple[tuple[int, int], ...]
Holders = tuple[tuple[int, ...], list[tuple[int, BlockRanges]]]  # (global shape, [(rank, block)])
STAGED = re.compile(r"(\d+)-(.+)")


@dataclass(frozen=True)
class Layout:
    dev_matrix: tuple[int, ...]
    tensor_map: tuple[tuple[int, ...], ...]  # per tensor dim, the grid axes (from the right) that split it
    opt_shard_step: int = 0
    opt_shard_size: int = 0
    field: int = 0
    split_shape: tuple[int, ...] = ()

    @property
    def devices(self) -> int:
        return math.prod(self.dev_matrix)

    def unsupported(self) -> str | None:
        """Why mftune cannot read tensors of this layout (None: it can)."""
        if self.field:
            return f"field={self.field} (a wide-and-deep embedding layout)"
        if any(self.split_shape):
            return f"param_split_shape={list(self.split_shape)} (an uneven split)"
        n = len(self.dev_matrix)
        if any(not -1 <= a < n for axes in self.tensor_map for a in axes):
            return (f"tensor_map {[list(a) for a in self.tensor_map]} names an axis outside dev_matrix "
                    f"{list(self.dev_matrix)}")
        return None

    def _axis(self, a: int) -> int:
        """The left index in dev_matrix of axis ``a`` counted from the right."""
        return len(self.dev_matrix) - 1 - a

    def _repeated(self) -> list[int]:
        """dev_matrix indices (size > 1) that no tensor dimension is split over."""
        used = {self._axis(a) for axes in self.tensor_map for a in axes if a >= 0}
        return [i for i, d in enumerate(self.dev_matrix) if i not in used and d > 1]

    def opt_axes(self) -> tuple[tuple[int, int], ...]:
        """``(dev_matrix index, factor)`` of the axes the optimizer shard splits dimension 0 over,
        most significant first; the factor is the axis' fast part it uses (its size but for the last one)."""
        if not self.opt_shard_step or not self.opt_shard_size:
            return ()
        repeated = self._repeated()
        left = self.opt_shard_size if self.opt_shard_size > 0 else math.prod(self.dev_matrix[i] for i in repeated)
        taken: list[tuple[int, int]] = []
        for i in reversed(repeated):
            if left == 1:
                break
            factor = min(self.dev_matrix[i], left)
            if self.dev_matrix[i] % factor or left % factor:
                raise ValueError(f"opt_weight_shard_size {self.opt_shard_size} does not divide the repeated "
                                 f"axes of dev_matrix {list(self.dev_matrix)}")
            taken.insert(0, (i, factor))
            left //= factor
        if left != 1:
            raise ValueError(f"opt_weight_shard_size {self.opt_shard_size} exceeds the repeated axes of "
                             f"dev_matrix {list(self.dev_matrix)}")
        return tuple(taken)

    def _shortcut(self) -> bool:
        """MindSpore's shortcut for an optimizer shard (``_construct_tensor_layout_for_opt_shard`` without a
        nested tensor map): when the only repeated axis is the leftmost one, or every axis is repeated,
        the grid is read as ``[repeat, opt, *pieces of each dimension]``, the pieces row-major. It is
        the same as the general rule when the tensor map names its axes in order (all of MindFormers'
        layouts); MindSpore's transform follows it, and so does mftune."""
        if not self.opt_axes() or any(len(axes) > 1 for axes in self.tensor_map):
            return False
        repeated = self._repeated()
        return not (1 < len(repeated) < len(self.dev_matrix) or repeated[0] > 0)

    def _mp_parts(self) -> list[int]:
        return [math.prod(self.dev_matrix[self._axis(a)] for a in axes if a >= 0) for axes in self.tensor_map]

    def parts(self, ndim: int) -> list[int]:
        """Pieces per tensor dimension (dimension 0 counting the optimizer shard)."""
        out = self._mp_parts()
        if len(out) != ndim:
            raise ValueError(f"tensor_map {[list(a) for a in self.tensor_map]} is for {len(out)} dimensions, "
                             f"the tensor has {ndim}")
        if out:
            out[0] *= math.prod(f for _, f in self.opt_axes())
        return out

    def global_shape(self, local: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(n * p for n, p in zip(local, self.parts(len(local))))

    def _indices(self, rank: int) -> list[int]:
        """The index of ``rank``'s piece along each tensor dimension (among ``parts``)."""
        opt = math.prod(f for _, f in self.opt_axes())
        if not self.tensor_map:  # a scalar
            return []
        if self._shortcut():
            mp = self._mp_parts()
            flat, out = rank % math.prod(mp), [0] * len(mp)
            for d in reversed(range(len(mp))):
                out[d], flat = flat % mp[d], flat // mp[d]
            out[0] = out[0] * opt + (rank // math.prod(mp)) % opt
            return out
        coords, rest = [0] * len(self.dev_matrix), rank
        for i in reversed(range(len(self.dev_matrix))):
            coords[i], rest = rest % self.dev_matrix[i], rest // self.dev_matrix[i]
        out = []
        for axes in self.tensor_map:
            index = 0
            for a in (a for a in axes if a >= 0):
                index = index * self.dev_matrix[self._axis(a)] + coords[self._axis(a)]
            out.append(index)
        if out:
            for i, factor in self.opt_axes():
                out[0] = out[0] * factor + coords[i] % factor
        return out

    def block(self, rank: int, shape: tuple[int, ...]) -> BlockRanges:
        """The block of a tensor of global ``shape`` that ``rank`` (within its stage) holds."""
        sizes = [n // p for n, p in zip(shape, self.parts(len(shape)))]
        return tuple((i * size, (i + 1) * size) for i, size in zip(self._indices(rank), sizes))


@dataclass
class MindSporeStrategy:
    """The layouts of a run: ``layouts[name][stage]``; ranks ``stage * stage_devices + i`` hold stage's tensors."""

    source: str
    layouts: dict[str, dict[int, Layout]] = dc_field(default_factory=dict)
    stage_devices: int = 1
    stages: int = 1

    @property
    def world_size(self) -> int:
        return self.stage_devices * self.stages

    def layout(self, name: str) -> tuple[int, Layout] | None:
        """(stage, layout) of a tensor (the lowest stage's, for a parameter several stages share)."""
        by_stage = self.layouts.get(name) or self.layouts.get(parameter_of(name))
        if not by_stage:
            return None
        stage = min(by_stage)
        return stage, by_stage[stage]

    def holders(self, name: str, local: tuple[int, ...]) -> Holders | None:
        """(global shape, [(rank, block)]) of a tensor whose rank files hold pieces of shape ``local``;
        None when the strategy has no layout for it (each rank file holds it whole)."""
        found = self.layout(name)
        if found is None:
            return None
        stage, layout = found
        why = layout.unsupported()
        try:
            if why:
                raise ValueError(why)
            shape = layout.global_shape(local)
            return shape, [(stage * self.stage_devices + i, layout.block(i, shape)) for i in range(layout.devices)]
        except ValueError as exc:
            raise CheckpointError(f"strategy {self.source}: the layout of {name} cannot be read by mftune ({exc}). "
                                  f"Merge the checkpoint with MindSpore (transform_checkpoints) first.") from None

    def records(self, shapes: dict[str, tuple[int, ...]]) -> dict[int, dict]:
        """Per destination rank, mftune's strategy record (``{"rank", "world_size", "tensors": {name:
        {"global_shape", "block"}}}``) of this layout for tensors of these global ``shapes``."""
        if self.stages > 1:
            raise CheckpointError(f"strategy {self.source} has {self.stages} pipeline stages; mftune writes "
                                  f"distributed .ckpt checkpoints of one stage only. Write a complete .ckpt (no "
                                  f"--dst_strategy) and let MindFormers' auto_trans_ckpt slice it.")
        out = {r: {"rank": r, "world_size": self.world_size, "tensors": {}} for r in range(self.world_size)}
        for name, shape in shapes.items():
            if name not in self.layouts:
                continue
            layout = self.layouts[name][0]
            try:
                why = layout.unsupported() or next((f"{layout.parts(len(shape))} pieces per dimension" for n, p in
                                                    zip(shape, layout.parts(len(shape))) if n % p), None)
            except ValueError as exc:
                why = str(exc)
            if why:
                raise CheckpointError(f"strategy {self.source}: tensor {name} of shape {list(shape)} cannot take its "
                                      f"layout ({why}). Pass the strategy of a run of this model.")
            for r in range(self.world_size):
                out[r]["tensors"][name] = {"global_shape": list(shape),
                                           "block": [list(b) for b in layout.block(r, shape)]}
        return out


# ----------------------------------------------------------------------------------------------
# reading strategy files
# ----------------------------------------------------------------------------------------------

def is_mindspore_strategy(path: str) -> bool:
    """A MindSpore strategy file (protobuf, or JSON with ``parallel_layout_item``) or a directory of them."""
    if os.path.isdir(path):
        return bool(glob.glob(os.path.join(glob.escape(path), "*.ckpt"))) or any(
            _is_json_strategy(f) for f in glob.glob(os.path.join(glob.escape(path), "*.json")))
    return os.path.isfile(path) and (not path.endswith(".json") or _is_json_strategy(path))


def _is_json_strategy(path: str) -> bool:
    try:
        with open(path) as f:
            return "parallel_layout_item" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def load_strategy(path: str) -> MindSporeStrategy:
    """A strategy file (merged or one rank's) or a directory of one run's per-rank files (merged by stage,
    as ``mindspore.merge_pipeline_strategys`` does)."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), "*.ckpt"))) or sorted(
            f for f in glob.glob(os.path.join(glob.escape(path), "*.json")) if _is_json_strategy(f))
        if not files:
            raise CheckpointError(f"src_strategy_path_or_dir={path} holds no MindSpore strategy file "
                                  f"(ckpt_strategy_rank_*.ckpt). Give the strategy/ folder of the MindFormers run "
                                  f"that saved the checkpoint, or its merged strategy file.")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise CheckpointError(f"src_strategy_path_or_dir={path} does not exist. Give the strategy/ folder of the "
                              f"MindFormers run that saved the checkpoint, or its merged strategy file.")
    strategy = MindSporeStrategy(path)
    for file in files:
        for name, stage, layout in _read_file(file):
            strategy.layouts.setdefault(name, {}).setdefault(stage, layout)
    return _checked(strategy)


def _checked(strategy: MindSporeStrategy) -> MindSporeStrategy:
    all_layouts = [(n, s, lay) for n, by in strategy.layouts.items() for s, lay in by.items()]
    if not all_layouts:
        raise CheckpointError(f"strategy {strategy.source} records no parameter layouts (parallel_layout_item). "
                              f"Give the strategy of the run that saved the checkpoint.")
    devices = {lay.devices for _, _, lay in all_layouts}
    stages = sorted({s for _, s, _ in all_layouts})
    if len(devices) != 1 or stages != list(range(len(stages))):  # MindSpore's transform refuses them too
        raise CheckpointError(f"strategy {strategy.source} mixes layouts: device grids of {sorted(devices)} "
                              f"devices, pipeline stages {stages}. Give the strategy files of one run, with "
                              f"every stage.")
    strategy.stage_devices, strategy.stages = devices.pop(), len(stages)
    return strategy


def _read_file(path: str) -> list[tuple[str, int, Layout]]:
    """``(parameter name, pipeline stage, layout)`` of every layout item of one strategy file."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                stage, items = _json_items(json.load(f))
        else:
            with open(path, "rb") as f:
                stage, items = _protobuf_items(f.read())
    except (OSError, ValueError, WireError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"strategy file {path} cannot be read ({type(exc).__name__}: {exc}). It must be a "
                              f"MindSpore strategy file (ckpt_strategy_rank_*.ckpt, or its .json form).") from None
    out = []
    for name, layout in items:
        staged = STAGED.fullmatch(name)  # a merged file: "<stage>-<name>"
        out.append((staged[2], int(staged[1]), layout) if staged else (name, stage, layout))
    return out


def _protobuf_items(buf: bytes) -> tuple[int, list[tuple[str, Layout]]]:
    """(the file's pipeline stage, its layout items) of a ``ParallelStrategyMap``."""
    stages, items = [], []
    for number, kind, value in fields(buf):
        if number == 2 and kind == LEN:  # ParallelStrategyItem -> parallel_strategys -> stage
            stages += [next((v for n, k, v in fields(s) if n == 1 and isinstance(v, int)), 0)
                       for n, k, s in fields(value) if n == 2 and k == LEN]
        elif number == 3 and kind == LEN:  # ParallelLayoutItem
            name, layout = None, None
            for n, k, v in fields(value):
                if n == 1 and k == LEN:
                    name = v.decode()
                elif n == 2 and k == LEN:
                    layout = _protobuf_layout(v)
            if name is None or layout is None:
                raise ValueError("a parallel_layout_item lacks its param_name or parallel_layouts")
            items.append((name, layout))
    return (stages[0] if stages else 0), items


def _dims(message: bytes) -> list[int]:
    return [signed(d) for n, k, v in fields(message) if n == 1 for d in packed_varints(v)]


def _protobuf_layout(buf: bytes) -> Layout:
    lists: dict[int, list[list[int]]] = {}
    scalars: dict[int, int] = {}
    for n, k, v in fields(buf):
        if k == LEN and n in (1, 2, 3, 4):
            lists.setdefault(n, []).append(_dims(v))
        elif isinstance(v, int):
            scalars[n] = signed(v)
    maps = lists.get(2) or [[]]
    # _convert_to_list: several TensorMap messages -> one list per dimension (empty ones dropped)
    tensor_map = [m for m in maps if m] if len(maps) > 1 else [[a] for a in maps[0]]
    if not lists.get(1):
        raise ValueError("a layout has no dev_matrix")
    return Layout(tuple(lists[1][0]), tuple(tuple(m) for m in tensor_map), scalars.get(6, 0), scalars.get(7, 0),
                  scalars.get(5, 0), tuple((lists.get(3) or [[]])[0]))


def _json_items(content: dict) -> tuple[int, list[tuple[str, Layout]]]:
    items = content.get("parallel_strategy_item") or {}
    stage = int(next(iter(items.values())).get("stage", 0)) if items else 0
    out = []
    for name, item in (content.get("parallel_layout_item") or {}).items():
        tensor_map = [tuple(a) if isinstance(a, list) else (a,) for a in item["tensor_map"]]
        out.append((name, Layout(tuple(item["dev_matrix"]), tuple(tensor_map),
                                 int(item.get("opt_weight_shard_step", 0)), int(item.get("opt_weight_shard_size", 0)),
                                 int(item.get("field", 0)), tuple(item.get("param_split_shape") or ()))))
    return stage, out
