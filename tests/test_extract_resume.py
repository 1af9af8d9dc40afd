"""Kill `dynamic-s2 extract` with SIGKILL mid-run, run it again: nothing lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _deps import need

from dynamic_s2.extract import find_images, load_features, read_manifest

Image = need("PIL.Image")
need("safetensors")
need("tqdm")

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

NUM_IMAGES = 6


def _images(root: Path) -> Path:
    root.mkdir()
    gen = torch.Generator().manual_seed(0)
    sizes = [(60, 90), (90, 60), (64, 64), (40, 160), (100, 70), (50, 50)]
    for i, (h, w) in enumerate(sizes[:NUM_IMAGES]):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i}.png")
    return root


def _command(inputs: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dynamic_s2",
        "extract",
        str(inputs),
        "--out",
        str(out),
        "--scales",
        "224,448",
        "--batch-images",
        "1",
        "--shard-size",
        "1",
        "--workers",
        "0",
        "--no-progress",
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DYNAMIC_S2_EXTRACT_DELAY"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _manifest_lines(out: Path) -> int:
    path = out / "manifest.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    inputs = _images(tmp_path / "images")
    out = tmp_path / "killed"

    # A slow run (it sleeps 2 s after every image) killed once two images are durable.
    proc = subprocess.Popen(
        _command(inputs, out),
        env=_env(DYNAMIC_S2_EXTRACT_DELAY="2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while _manifest_lines(out) < 2:
            if proc.poll() is not None:
                raise AssertionError(f"extract ended early: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise AssertionError("extract wrote no manifest lines in 240 s")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = _manifest_lines(out)
    assert 2 <= done_before < NUM_IMAGES  # really killed mid-run

    # What a crash can also leave behind: a torn manifest line, a half-written shard and a shard
    # whose manifest lines never made it. The resumed run must cope with all three.
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"path": "/torn/line", "sha')
    (out / "shard-00098.safetensors.tmp").write_bytes(b"half a shard")
    orphan = out / "shard-00099.safetensors"
    orphan.write_bytes((out / "shard-00000.safetensors").read_bytes())

    resumed = subprocess.run(
        _command(inputs, out), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"extracted {NUM_IMAGES - done_before} images ({done_before} already done" in (
        resumed.stdout
    )
    assert not (out / "shard-00098.safetensors.tmp").exists()
    assert not orphan.exists()
    assert not list(out.glob("*.tmp"))

    reference = tmp_path / "uninterrupted"
    clean = subprocess.run(
        _command(inputs, reference), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert clean.returncode == 0, clean.stderr

    # Every input exactly once in the manifest file, every tensor loads, features equal.
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    paths = [entry["path"] for entry in lines]
    assert sorted(paths) == [str(p) for p in find_images(inputs)]
    assert len(set(paths)) == len(paths) == NUM_IMAGES
    shards = {entry["shard"] for entry in lines}
    assert shards == {p.name for p in out.glob("shard-*.safetensors")}
    expected = {e["path"]: e for e in read_manifest(reference)}
    for entry in lines:
        features = load_features(out, entry)
        ref = expected[entry["path"]]
        assert entry["key"] == ref["key"] and entry["plan"] == ref["plan"]
        assert torch.isfinite(features).all()
        torch.testing.assert_close(features, load_features(reference, ref), rtol=1e-5, atol=1e-5)


def test_rerun_of_a_finished_run_does_nothing(tmp_path: Path) -> None:
    inputs = _images(tmp_path / "images")
    out = tmp_path / "features"
    first = subprocess.run(_command(inputs, out), env=_env(), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = subprocess.run(_command(inputs, out), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"extracted 0 images ({NUM_IMAGES} already done" in again.stdout
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    shards = {k: v for k, v in before.items() if k.startswith("shard-")}
    assert {k: after[k] for k in shards} == shards  # no shard rewritten
    assert before["manifest.jsonl"] == after["manifest.jsonl"]
