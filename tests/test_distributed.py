"""`torchrun --nproc_per_node 2 -m dynamic_s2 extract` on CPU (gloo over loopback)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _deps import need

from dynamic_s2.cli import main
from dynamic_s2.extract import find_images, load_features, read_manifest

Image = need("PIL.Image")
need("safetensors")
need("tqdm")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

NUM_IMAGES = 5  # odd: the ranks get 3 and 2 images
EXTRACT_ARGS = ["--scales", "224,448", "--workers", "0", "--shard-size", "2", "--no-progress"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(inputs: Path, out: Path) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "dynamic_s2",
        "extract",
        str(inputs),
        "--out",
        str(out),
        *EXTRACT_ARGS,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _images(root: Path) -> Path:
    root.mkdir()
    gen = torch.Generator().manual_seed(1)
    sizes = [(60, 90), (90, 60), (64, 64), (40, 160), (100, 70)]
    for i, (h, w) in enumerate(sizes[:NUM_IMAGES]):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i}.png")
    return root


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    inputs = _images(tmp_path / "images")
    out = tmp_path / "ranks"
    run = _torchrun(inputs, out)
    assert run.returncode == 0, run.stdout + run.stderr

    # Every rank wrote its own shards; rank 0 merged the manifest parts and removed them.
    names = sorted(p.name for p in out.iterdir())
    assert "manifest.jsonl" in names
    assert not [n for n in names if n.startswith(("manifest-r", "errors")) or n.endswith(".tmp")]
    r0 = [n for n in names if n.startswith("shard-r0-")]
    r1 = [n for n in names if n.startswith("shard-r1-")]
    assert len(r0) == 2 and len(r1) == 1  # 3 images in shards of 2, and 2 images
    assert len(r0) + len(r1) == len([n for n in names if n.startswith("shard-")])

    single = tmp_path / "single"
    assert main(["extract", str(inputs), "--out", str(single), *EXTRACT_ARGS]) == 0

    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    paths = [e["path"] for e in lines]
    assert len(paths) == len(set(paths)) == NUM_IMAGES  # nothing missing or doubled
    assert sorted(paths) == [str(p) for p in find_images(inputs)]
    by_path = {e["path"]: e for e in read_manifest(single)}
    for entry in lines:
        ref = by_path[entry["path"]]
        index = int(entry["key"].removeprefix("img-"))
        assert entry["shard"].startswith(f"shard-r{index % 2}-")  # image i went to rank i % 2
        assert entry["key"] == ref["key"] and entry["plan"] == ref["plan"]
        torch.testing.assert_close(
            load_features(out, entry), load_features(single, ref), rtol=1e-4, atol=1e-4
        )

    # Resume per rank: a second launch with one more (corrupt) file only tries that file.
    (inputs / "zz-corrupt.png").write_bytes(b"\x89PNG but not really")
    again = _torchrun(inputs, out)
    assert again.returncode != 0  # some image failed
    assert "extracted 0 images (3 already done, 0 failed)" in again.stdout
    assert "extracted 0 images (2 already done, 1 failed)" in again.stdout
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [Path(e["path"]).name for e in errors] == ["zz-corrupt.png"]
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["path"] for e in lines) == sorted(paths)
