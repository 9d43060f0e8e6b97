"""The dataset a run reads (``train_dataset`` / ``eval_dataset``), checked against the model before
the model is built: a tokenized directory as written, a raw data file tokenized on first use
(``mftune.data.raw``), or a MindRecord set converted on first use (``mftune.data.mindrecord_cache``).
Rank 0 builds a cache, every rank reads it."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from mftune.config.schema import MFConfig
from mftune.data.loader import TrainData
from mftune.data.mindrecord import is_mindrecord_dir
from mftune.data.mindrecord_cache import Converted, cached_mindrecord
from mftune.data.raw import cached_dataset, is_raw
from mftune.errors import DataError
from mftune.models.config import LlamaConfig

logger = logging.getLogger("mftune")
T = TypeVar("T")


def open_dataset(cfg: MFConfig, model_config: LlamaConfig, *, dp_rank: int, dp_size: int,
                 which: str = "train_dataset") -> TrainData:
    """This data-parallel rank's part of every global batch (batch_size x data_parallel x
    gradient_accumulation_steps sequences), checked against the model's seq_length and vocab_size.
    ``eval_dataset``: in order, ``eval_dataset.batch_size`` records per rank and step, every record once
    (``mftune.trainer.evaluate.eval_batches``). A mistake is a DataError naming the key and the fix."""
    runner, dataset = cfg.runner_config, getattr(cfg, which)
    loader_cfg, train = dataset.data_loader, which == "train_dataset"
    if not loader_cfg.dataset_dir:
        raise DataError(f"{which}.data_loader.dataset_dir is empty. Pass --{which}_dir DIR "
                        f"(a directory written by scripts/llama_preprocess.py, a MindRecord file or directory, "
                        f"or a raw .json / .jsonl / .parquet file with processor.tokenizer.vocab_file or "
                        f"pretrained_model_dir set).")
    dataset_dir, read = loader_cfg.dataset_dir, None
    if is_raw(dataset_dir):  # tokenized on first use (rank 0), cached in output_dir, reused afterwards
        dataset_dir = _raw_dataset(cfg, model_config, dataset_dir, which)
    elif loader_cfg.packing:
        raise DataError(f"{which}.data_loader.packing=True packs raw data files, but dataset_dir={dataset_dir} "
                        f"is tokenized data (a directory or MindRecord), read as written. Pack it with "
                        f"scripts/llama_preprocess.py --packing, or set packing to False.")
    elif os.path.isfile(dataset_dir) or is_mindrecord_dir(dataset_dir):  # a file that is not MindRecord says so
        converted = _mindrecord_dataset(cfg, dataset_dir, which)
        dataset_dir, read = converted.path, converted.records
    try:
        data = TrainData(dataset_dir, micro_batch_size=runner.batch_size if train else dataset.batch_size,
                         grad_accum=runner.gradient_accumulation_steps if train else 1,
                         dp_rank=dp_rank, dp_size=dp_size, shuffle=loader_cfg.shuffle if train else False,
                         seed=cfg.seed, drop_remainder=dataset.drop_remainder if train else False,
                         num_samples=loader_cfg.num_samples, repeat=dataset.repeat if train else 1)
    except ValueError as exc:
        raise DataError(f"{which}: {exc}") from None
    check_against_model(data, model_config, loader_cfg.dataset_dir)
    if read is not None:
        logger.info("MindRecord %s: %d records read, %d used (num_samples=%s)", loader_cfg.dataset_dir, read,
                    data.num_records, loader_cfg.num_samples)
    if train:
        logger.info("Dataset %s: %d records, global batch %d, %d steps per epoch%s, %d epochs",
                    loader_cfg.dataset_dir, data.num_records, data.global_batch_size, data.steps_per_epoch,
                    f" ({data.repeat} passes: train_dataset.repeat)" if data.repeat > 1 else "", runner.epochs)
    else:
        logger.info("Eval dataset %s: %d records%s", loader_cfg.dataset_dir, data.num_records,
                    f" (each once: eval_dataset.repeat={dataset.repeat} would repeat the same mean loss)"
                    if dataset.repeat != 1 else "")
    return data


def check_against_model(data: TrainData, model_config: LlamaConfig, dataset_dir: str) -> None:
    """Records of seq_length + 1 tokens, token ids and labels within the vocabulary."""
    if data.record_length != model_config.seq_length + 1:
        raise DataError(
            f"model.model_config.seq_length={model_config.seq_length} but the records in "
            f"{dataset_dir} hold {data.record_length} tokens (seq_length "
            f"{data.record_length - 1} + 1). Set seq_length to {data.record_length - 1} or "
            f"re-run scripts/llama_preprocess.py with --seq_length {model_config.seq_length}.")
    vocab, ignore = model_config.vocab_size, model_config.ignore_token_id
    for column, exclude in (("input_ids", None), ("labels", ignore)):
        found = data.value_range(column, exclude)
        if found and (found[0] < 0 or found[1] >= vocab):
            raise DataError(
                f"model.model_config.vocab_size={vocab} but the {column} in {dataset_dir} "
                f"hold values in [{found[0]}, {found[1]}]"
                + (f" besides ignore_token_id={ignore}" if exclude is not None else "") +
                f". Set vocab_size to the tokenizer's vocabulary size (at least {found[1] + 1}), "
                f"ignore_token_id to the label of masked positions, or re-tokenize.")


def _raw_dataset(cfg: MFConfig, model_config: LlamaConfig, path: str, which: str) -> str:
    """The tokenized cache of a raw data file (mftune.data.raw): built by rank 0, read by all."""
    dataset = getattr(cfg, which)
    args = (path, cfg.processor.tokenizer.vocab_file, model_config.seq_length,
            os.path.join(os.path.abspath(cfg.output_dir), "dataset_cache"), dataset.data_loader.packing,
            dataset.num_parallel_workers)

    def build() -> str:
        try:
            return cached_dataset(*args, tokenizer_type=cfg.processor.tokenizer.type,
                                  template=cfg.processor.tokenizer.chat_template,
                                  max_skipped_ratio=dataset.max_skipped_ratio, setting=f"{which}.max_skipped_ratio")
        except (DataError, OSError) as exc:  # the same error on every rank
            raise DataError(f"{which}.data_loader.dataset_dir={path}: {exc}".replace(f"{path}: {path}", path)) \
                from None

    return _built_by_rank0(build)


def _mindrecord_dataset(cfg: MFConfig, path: str, which: str) -> Converted:
    """The converted cache of a MindRecord set (mftune.data.mindrecord_cache): built by rank 0, read by all."""
    cache_root = os.path.join(os.path.abspath(cfg.output_dir), "dataset_cache")

    def build() -> Converted:
        try:
            return cached_mindrecord(path, cache_root)
        except (DataError, OSError) as exc:  # the same error on every rank
            raise DataError(f"{which}.data_loader.dataset_dir={path}: {exc}") from None

    return _built_by_rank0(build)


def _built_by_rank0(build: Callable[[], T]) -> T:
    """``build()`` on rank 0 first (it writes a cache), then on the other ranks (they find it)."""
    if not dist.is_initialized():
        return build()
    if dist.get_rank() == 0:
        try:
            return build()
        finally:
            dist.barrier()  # the others read what rank 0 wrote (or fail as it did)
    dist.barrier()
    return build()
