"""MindRecord sets against MindSpore itself (skipped without a MindSpore interpreter, tests/mindspore_ref.py).

MindSpore 2.7.0's FileWriter writes the sets as MindFormers' llama_preprocess.py does (one
write_raw_data call per record; int32 input_ids and labels of seq_length + 1, or input_ids only for
wiki data), in one shard and in three, plus a set of every field type over several pages. Expected
values: the records MindSpore's ``MindDataset(..., shuffle=False)`` returns, read through the paths MindFormers gives it (a file: the
header's whole set; a directory: its shard files sorted). A training run on a MindRecord set must give the
losses of the same run on a dataset directory holding the records MindSpore read.
"""
import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import yaml

from mindrecord_files import QA_SCHEMA, WIKI_SCHEMA, write_mindrecord
from mindspore_ref import run_mindspore
from mftune.data.mindrecord import open_mindrecord

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ, VOCAB = 32, 256
MIXED = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int64", "shape": [-1]},
         "f": {"type": "float32", "shape": [2, -1]}, "n": {"type": "int32"}, "s": {"type": "string"},
         "x": {"type": "float64"}, "b": {"type": "bytes"}}

MINDSPORE_SCRIPT = r"""
import json, sys
import numpy as np
import mindspore.dataset as ds
from mindspore.mindrecord import FileWriter
spec = json.load(open(sys.argv[1]))
for name, s in spec["write"].items():
    writer = FileWriter(file_name=s["file"], shard_num=s["shards"], overwrite=True)
    writer.add_schema(s["schema"], name)
    for record in s["records"]:  # one record per call, as llama_preprocess.py
        writer.write_raw_data([{k: np.array(v, dtype=np.int32) for k, v in record.items()}])
    writer.commit()
if "mixed" in spec:  # every field type, several pages (MindSpore's smallest page), an index of scalars
    writer = FileWriter(file_name=spec["mixed"], shard_num=2, overwrite=True)
    writer.set_page_size(1 << 15)
    writer.add_schema(spec["mixed_schema"], "mixed")
    rng = np.random.default_rng(0)
    for i in range(30):
        ids = rng.integers(-2**31, 2**31 - 1, 1000)
        ids[:500] = rng.integers(-200, 200, 500)
        writer.write_raw_data([{"input_ids": ids.astype(np.int32), "labels": rng.integers(-2**40, 2**40, 9),
                                "f": np.arange(6, dtype=np.float32).reshape(2, 3) * i, "n": -1000 * i,
                                "s": f"rec{i}", "x": i / 3, "b": bytes([i, 1, 2])}])
    writer.commit()

def plain(v):
    if v.dtype.kind == "S":
        return v.tobytes().hex()
    return str(v) if v.dtype.kind == "U" else {"dtype": str(v.dtype), "shape": list(v.shape), "values": v.tolist()}

out = {}
for key, files in spec["read"].items():
    rows = ds.MindDataset(files, shuffle=False).create_dict_iterator(output_numpy=True, num_epochs=1)
    out[key] = [{k: plain(v) for k, v in row.items()} for row in rows]
json.dump(out, open(sys.argv[2], "w"))
"""


def _records(n: int, seed: int, labels: bool) -> list[dict]:
    """Token ids below VOCAB with pad (0) tails; labels -100 on a prompt prefix and the pad tail."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(SEQ // 2, SEQ + 2))
        ids = np.zeros(SEQ + 1, np.int32)
        ids[:length] = rng.integers(1, VOCAB, length)
        record = {"input_ids": ids.tolist()}
        if labels:
            lab = ids.copy()
            lab[:int(rng.integers(1, length))] = -100
            lab[length:] = -100
            record["labels"] = lab.tolist()
        out.append(record)
    return out


def _mixed(n: int) -> list[dict]:
    return [{"input_ids": np.arange(i, i + 7, dtype=np.int32) * 100003, "labels": np.array([2**40, -5, i]),
             "f": np.arange(6, dtype=np.float32).reshape(2, 3) * i, "n": -1000 * i, "s": f"rec{i}", "x": i / 3,
             "b": bytes([i, 1, 2])} for i in range(n)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Sets written by MindSpore (qa in 1 and 3 shards, wiki in 3) and by tests/mindrecord_files.py, and
    what MindDataset reads from each, through each way MindFormers names them."""
    d = tmp_path_factory.mktemp("mindrecord")
    qa, wiki = _records(24, 0, True), _records(8, 1, False)
    os.makedirs(d / "qa3")
    os.makedirs(d / "wiki3")
    write = {"qa1": {"file": str(d / "qa1.mindrecord"), "shards": 1, "schema": QA_SCHEMA, "records": qa},
             "qa3": {"file": str(d / "qa3" / "qa.mindrecord"), "shards": 3, "schema": QA_SCHEMA, "records": qa},
             "wiki3": {"file": str(d / "wiki3" / "wiki.mindrecord"), "shards": 3, "schema": WIKI_SCHEMA,
                       "records": wiki}}
    ours = {"ours_qa": write_mindrecord(str(d / "ours_qa.mindrecord"), [{k: np.array(v, np.int32) for k, v in
                                                                          r.items()} for r in qa], QA_SCHEMA, 3),
            "ours_mixed": write_mindrecord(str(d / "ours_mixed.mindrecord"), _mixed(12), MIXED, 2, page_size=1 << 15)}
    mixed = str(d / "mixed.mindrecord")
    read = {"qa1": str(d / "qa1.mindrecord"), "mindspore_mixed": mixed + "1", "qa3_shard0": str(d / "qa3" / "qa.mindrecord0"),
            "qa3_shard2": str(d / "qa3" / "qa.mindrecord2"), "wiki3_shard1": str(d / "wiki3" / "wiki.mindrecord1"),
            "ours_qa": ours["ours_qa"][1], "ours_mixed": ours["ours_mixed"][0]}
    with open(d / "spec.json", "w") as f:
        json.dump({"write": write, "read": read, "mixed": mixed, "mixed_schema": MIXED}, f)
    run_mindspore(MINDSPORE_SCRIPT, str(d / "spec.json"), str(d / "read.json"))
    for name in ("qa3", "wiki3"):  # MindFormers' directory rule: every *mindrecord<digits>, sorted
        read[f"{name}_dir"] = str(d / name)
    with open(d / "read.json") as f:
        return d, read, json.load(f), {"qa": qa, "wiki": wiki, "mixed": _mixed(12)}


def _ours(path):
    return [r.fields for r in open_mindrecord(path).rows()]


def _same(mine, theirs) -> bool:
    if isinstance(theirs, dict):
        a = np.asarray(mine)
        return str(a.dtype) == theirs["dtype"] and list(a.shape) == theirs["shape"] and a.tolist() == theirs["values"]
    return (mine.hex() if isinstance(mine, bytes) else mine) == theirs


@pytest.mark.parametrize("key", ["qa1", "qa3_shard0", "qa3_shard2", "wiki3_shard1", "mindspore_mixed", "ours_qa",
                                 "ours_mixed"])
def test_mftune_reads_what_mindspore_reads(reference, key):
    _, read, theirs, _ = reference
    mine = _ours(read[key])
    assert len(mine) == len(theirs[key]) > 0
    for i, (m, t) in enumerate(zip(mine, theirs[key])):
        assert m.keys() == t.keys(), key
        assert all(_same(m[k], t[k]) for k in t), (key, i, m, t)


def test_the_mindspore_mixed_set_exercises_pages_and_indexes(reference):
    """What makes "mindspore_mixed" a test of more than one page: several blob pages, a raw page of
    scalars shared by row groups, integer widths up to int64, and scalar index columns in the .db."""
    _, read, _, _ = reference
    shards = open_mindrecord(read["mindspore_mixed"]).shards  # how MindSpore spreads rows over shards varies
    header = shards[1].header
    assert sum(p["page_type"] == "BLOB_DATA" for shard in shards for p in shard.header["page"]) > 2
    assert [f["index_field"] for f in header["index_fields"]] == ["n", "s", "x"]


def test_directories_read_like_mindformers(reference):
    """A directory's sorted shard list gives the records MindDataset gives for the whole set (the shard
    names sort in shard order below ten)."""
    _, read, theirs, _ = reference
    for name, whole in (("qa3", "qa3_shard0"), ("wiki3", "wiki3_shard1")):
        mine = _ours(read[f"{name}_dir"])
        assert [m["input_ids"].tolist() for m in mine] == [t["input_ids"]["values"] for t in theirs[whole]]


def test_mindspore_reads_the_test_writer_as_written(reference):
    """tests/mindrecord_files.py (the unit tests' fixtures) writes files MindSpore reads as written."""
    _, _, theirs, written = reference
    assert [t["input_ids"]["values"] for t in theirs["ours_qa"]] == [r["input_ids"] for r in written["qa"]]
    assert [t["labels"]["values"] for t in theirs["ours_qa"]] == [r["labels"] for r in written["qa"]]
    for t, r in zip(theirs["ours_mixed"], written["mixed"]):
        assert t["labels"]["values"] == r["labels"].tolist() and t["f"]["values"] == r["f"].tolist()
        assert (t["n"]["values"], t["s"], t["x"]["values"], t["b"]) == (r["n"], r["s"], r["x"], r["b"].hex())


def test_mindspore_spreads_records_over_shards(reference):
    """The 3-shard qa set is not the 1-shard set's order (so reading shards in the wrong order would show)."""
    _, _, theirs, _ = reference
    assert [t["input_ids"]["values"] for t in theirs["qa3_shard0"]] != [t["input_ids"]["values"]
                                                                         for t in theirs["qa1"]]


def _twin(path, rows) -> str:
    """A dataset directory with the records MindSpore read."""
    columns = list(rows[0])
    datasets.Dataset.from_dict({c: [r[c]["values"] for r in rows] for c in columns}).save_to_disk(path)
    return path


def _train(d, name, train_dir, eval_dir):
    with open(os.path.join(ROOT, "configs/llama2/lora_llama2_7b.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"]["model_config"].update({"seq_length": SEQ, "max_position_embedding": SEQ, "hidden_size": 32,
                                         "num_layers": 2, "num_heads": 4, "vocab_size": VOCAB, "multiple_of": 16,
                                         "compute_dtype": "float32", "param_init_type": "float32"})
    cfg["train_dataset"]["data_loader"]["dataset_dir"] = train_dir
    cfg["eval_dataset"]["data_loader"]["dataset_dir"] = eval_dir
    cfg["eval_dataset"]["batch_size"] = 4
    cfg["runner_config"].update({"epochs": 1, "batch_size": 4})
    cfg["optimizer"]["learning_rate"] = cfg["lr_schedule"]["learning_rate"] = 1e-3
    cfg.update({"do_eval": True, "eval_step_interval": -1, "eval_epoch_interval": 1})
    config = d / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = d / f"out_{name}"
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    r = subprocess.run([sys.executable, "run_finetune.py", "--config", str(config), "--run_mode", "train",
                        "--use_parallel", "False", "--output_dir", str(out)], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evaluation = [json.loads(line) for line in open(out / "eval_metrics.jsonl")]
    return metrics, evaluation, r.stdout + r.stderr


def test_training_on_mindrecord_equals_its_dataset_twin(reference):
    """qa (3 shards, given by one shard file) as train_dataset, wiki (3 shards, given as a directory) as
    eval_dataset; the twin run reads dataset directories of MindSpore's records."""
    d, read, theirs, _ = reference
    mr_metrics, mr_eval, log = _train(d, "mindrecord", read["qa3_shard2"], read["wiki3_dir"])
    twin_metrics, twin_eval, _ = _train(d, "twin", _twin(str(d / "qa_twin"), theirs["qa3_shard0"]),
                                        _twin(str(d / "wiki_twin"), theirs["wiki3_shard1"]))
    assert f"MindRecord {read['qa3_shard2']}: 24 records read, 24 used" in log
    assert f"MindRecord {read['wiki3_dir']}: 8 records read, 8 used" in log
    assert len(mr_metrics) == len(twin_metrics) == 6  # 24 records / batch 4
    assert [m["loss"] for m in mr_metrics] == [m["loss"] for m in twin_metrics]
    assert mr_metrics[0]["loss"] != mr_metrics[-1]["loss"]
    assert [(e["loss"], e["records"]) for e in mr_eval] == [(e["loss"], e["records"]) for e in twin_eval]
    assert mr_eval[0]["records"] == 8
