"""Work that every rank would repeat on the same bytes is done by one of them (issue 14, checksum cost):

- a tensor several ranks hold whole (tensor parallel's ``Replicate``: the vocab_emb_dp embedding, lm_head,
  norms) is checked against its checksums by one of the ranks that read it (chosen by its name); a
  damaged byte is still named (by that rank). Before, all of them hashed the same bytes.
- a base without checksums (a Hugging Face download) is fingerprinted by a hash of its bytes on one rank per
  machine; the others take its result (``share_hashing``), and get the identity they would have computed.

Two gloo processes (torch.multiprocessing, a FileStore), no trainer: the in-process functions the trainer calls.
"""
from __future__ import annotations

import json
import os
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mftune.checkpoint.safetensors_io import save_safetensors, safetensors_header

WORLD = 2
NAMES = ("a", "d", "h")  # checked by rank crc32(name) % 2: 1, 0, 1


def flip(path: str, name: str) -> None:
    start, header, _ = safetensors_header(path)
    lo, hi = header[name]["data_offsets"]
    with open(path, "r+b") as f:
        f.seek(start + (lo + hi) // 2)
        byte = f.read(1)[0]
        f.seek(start + (lo + hi) // 2)
        f.write(bytes([byte ^ 0x10]))


def _init(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)


def _replicated_worker(rank: int, store: str, path: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from mftune.checkpoint.formats import open_checkpoint
    from mftune.checkpoint.load import load_entries

    _init(rank, store)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    model = nn.Module()
    for name in NAMES:
        model.register_parameter(name, nn.Parameter(distribute_tensor(torch.zeros(300, 1000), mesh, [Replicate()])))
    damaged = []
    for name in NAMES:  # one damaged tensor at a time: which rank names it
        try:
            load_entries(model, open_checkpoint(path[name]), path[name])
        except Exception as exc:  # noqa: BLE001 - the message is the result
            damaged.append(str(exc))
        else:
            damaged.append("")
    with open(os.path.join(out, f"rank_{rank}.json"), "w") as f:
        json.dump(damaged, f)
    dist.destroy_process_group()


def test_a_tensor_every_rank_holds_is_checked_by_one_of_them(tmp_path):
    tensors = {n: torch.randn(300, 1000) for n in NAMES}  # 1.2 MB each: two checksum chunks
    paths = {}
    for name in NAMES:
        paths[name] = str(tmp_path / f"damaged_{name}.safetensors")
        save_safetensors(tensors, paths[name], {"format": "pt"})
        flip(paths[name], name)
    mp.spawn(_replicated_worker, args=(str(tmp_path / "store"), paths, str(tmp_path)), nprocs=WORLD)
    seen = [json.load(open(tmp_path / f"rank_{r}.json")) for r in range(WORLD)]
    for i, name in enumerate(NAMES):
        named = [r for r in range(WORLD) if seen[r][i]]
        assert named == [zlib.crc32(name.encode()) % WORLD], (name, seen)  # exactly one rank checks it
        msg = seen[named[0]][i]
        assert f"checkpoint {paths[name]}: tensor {name} bytes [" in msg and "do not match" in msg, msg


def _hashing_worker(rank: int, store: str, directory: str, out: str) -> None:
    from mftune.checkpoint import load
    from mftune.trainer.weights import share_hashing

    _init(rank, store)
    hashed = []
    original = load.content_hash
    load.content_hash = lambda file: hashed.append(os.path.basename(file)) or original(file)
    share_hashing([directory])
    shared = load.fingerprint(directory)  # from the shared identities: no hashing here
    load.content_hash = original
    load._IDENTITIES.clear()
    own = load.fingerprint(directory)
    with open(os.path.join(out, f"hash_{rank}.json"), "w") as f:
        json.dump({"hashed": hashed, "shared": shared, "own": own}, f)
    dist.destroy_process_group()


def test_a_foreign_base_is_hashed_once_per_machine(tmp_path):
    from safetensors.torch import save_file

    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file({"model.embed_tokens.weight": torch.randn(64, 32)}, str(directory / "model.safetensors"))
    mp.spawn(_hashing_worker, args=(str(tmp_path / "store"), str(directory), str(tmp_path)), nprocs=WORLD)
    runs = [json.load(open(tmp_path / f"hash_{r}.json")) for r in range(WORLD)]
    assert sorted(runs[0]["hashed"]) == ["config.json", "model.safetensors"], runs
    assert runs[1]["hashed"] == [], runs  # rank 1 took rank 0's result
    assert runs[0]["shared"] == runs[1]["shared"] == runs[0]["own"] == runs[1]["own"]


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
