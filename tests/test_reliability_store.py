"""Issue 11, class 2: the extraction folder does not trust itself.

Damaged shards are redone on resume, one process writes a folder at a time, ``extract.json`` is
required beside shards, unusable manifest lines are skipped with a warning, planted symbolic links
are never followed, and ``shard`` names stay inside the folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _deps import need
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamic_s2 import store
from dynamic_s2.extract import extract, load_features, read_manifest

Image = need("PIL.Image")
need("safetensors")
need("tqdm")

SCALES = (32, 64)
POOL = torch.nn.AvgPool2d(8)  # [T, 3, 32, 32] -> [T, 3, 4, 4] maps


def _images(root: Path, count: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(count)
    for i in range(count):
        pixels = torch.randint(0, 256, (40 + 8 * i, 56, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / f"img{i}.png")
    return root


def _run(inputs: Path, out: Path, **options: object) -> object:
    options.setdefault("shard_size", 1)
    return extract(inputs, out, backbone=POOL, scales=SCALES, workers=0, progress=False, **options)


def _features(out: Path) -> dict[str, torch.Tensor]:
    return {Path(e["path"]).name: load_features(out, e) for e in read_manifest(out)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("reference")
    inputs = _images(root / "images")
    _run(inputs, root / "out")
    return inputs, _features(root / "out")


def _fresh(tmp_path: Path, inputs: Path) -> Path:
    out = tmp_path / "out"
    _run(inputs, out)
    return out


# ---- damaged shards are redone -------------------------------------------------------------------


def _damage(path: Path, how: str, position: float) -> None:
    data = bytearray(path.read_bytes())
    at = min(int(position * len(data)), len(data) - 1)
    if how == "truncate":
        data = data[:at]
    elif how == "zero":
        data[at:] = bytes(len(data) - at)
    else:  # flip one bit
        data[at] ^= 1 << (at % 8)
    path.write_bytes(bytes(data))


@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    how=st.sampled_from(["truncate", "zero", "flip"]),
    position=st.floats(0.0, 1.0),
    victim=st.integers(0, 3),
)
def test_a_damaged_shard_is_redone_on_resume(
    tmp_path_factory: pytest.TempPathFactory,
    reference: tuple[Path, dict[str, torch.Tensor]],
    how: str,
    position: float,
    victim: int,
) -> None:
    inputs, expected = reference
    out = _fresh(tmp_path_factory.mktemp("damaged"), inputs)
    shard = out / f"shard-{victim:05d}.safetensors"
    _damage(shard, how, position)
    result = _run(inputs, out)
    assert (result.extracted, result.skipped) == (1, 3)  # type: ignore[attr-defined]
    got = _features(out)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)
    assert not shard.exists()  # the damaged shard was removed, its image written anew


def test_a_shard_replaced_by_a_link_is_redone(
    tmp_path: Path, reference: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    inputs, expected = reference
    out = _fresh(tmp_path, inputs)
    shard = out / "shard-00002.safetensors"
    outside = tmp_path / "copy.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    result = _run(inputs, out)
    assert result.extracted == 1  # type: ignore[attr-defined]
    assert not shard.exists() and outside.exists()
    assert _features(out).keys() == expected.keys()


def test_every_manifest_line_carries_its_shard_checksum(
    tmp_path: Path, reference: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    import hashlib

    out = _fresh(tmp_path, reference[0])
    for entry in read_manifest(out):
        data = (out / entry["shard"]).read_bytes()
        assert entry["shard_bytes"] == len(data)
        assert entry["shard_sha256"] == hashlib.sha256(data).hexdigest()
        assert store.verify_shard(out, entry)


# ---- one writer per folder -----------------------------------------------------------------------

_HOLDER = """
import pathlib, sys, time
from dynamic_s2 import store
fd = store.acquire_lock(pathlib.Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_busy_folder_is_refused_naming_the_holder(
    tmp_path: Path, reference: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(store.FolderBusyError, match=rf"out_dir.*pid {holder.pid} on host"):
            _run(reference[0], out)
        assert not any(out.glob("shard-*"))  # nothing of the refused run was written
    finally:
        holder.kill()
        holder.wait()
    # The system released the killed holder's lock: the folder is free again.
    assert _run(reference[0], out).extracted == 4  # type: ignore[attr-defined]


def test_the_lock_is_released_after_a_run_and_after_a_failed_run(
    tmp_path: Path, reference: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    out = _fresh(tmp_path, reference[0])
    with pytest.raises(ValueError, match="other settings"):
        _run(reference[0], out, dtype="float16")
    store.release_lock(store.acquire_lock(out))  # free after both runs


# ---- extract.json is required beside shards ------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "garbage", "not-an-object", "link"])
def test_shards_without_a_readable_config_are_refused(
    tmp_path: Path, reference: tuple[Path, dict[str, torch.Tensor]], damage: str
) -> None:
    inputs, expected = reference
    out = _fresh(tmp_path, inputs)
    config = out / "extract.json"
    saved = config.read_bytes()
    config.unlink()
    if damage == "garbage":
        config.write_bytes(b"\xff{not json")
    elif damage == "not-an-object":
        config.write_text("[1, 2]")
    elif damage == "link":
        (tmp_path / "elsewhere.json").write_bytes(saved)
        config.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ValueError, match=r"out_dir.*extract\.json.*overwrite"):
        _run(inputs, out, output_scale=0)  # other settings, which must not be mixed in
    assert _features(out).keys() == expected.keys()  # nothing lost
    assert _run(inputs, out, overwrite=True).extracted == 4  # type: ignore[attr-defined]


# ---- unusable manifest lines are skipped with a warning ------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"\xff\xfe not utf-8",
        b"{not json",
        b"[1, 2, 3]",
        json.dumps({"path": ["x"], "bytes": "7", "mtime_ns": None, "shard": 3}).encode(),
        json.dumps(
            {"path": "/a.png", "bytes": 1, "mtime_ns": 1, "key": "k", "shard": "../x"}
        ).encode(),
    ],
    ids=["utf8", "json", "array", "types", "shard-outside"],
)
def test_an_unusable_manifest_line_is_skipped_with_a_warning(
    tmp_path: Path, reference: tuple[Path, dict[str, torch.Tensor]], bad: bytes
) -> None:
    inputs, expected = reference
    out = _fresh(tmp_path, inputs)
    manifest = out / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines(keepends=True)
    lines[1] = bad + b"\n"  # the entry of image 1 is replaced by a bad line
    manifest.write_bytes(b"".join(lines))
    with pytest.warns(store.ManifestWarning, match="line 2"):
        result = _run(inputs, out)
    assert (result.extracted, result.skipped) == (1, 3)  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the merged manifest is clean again
        got = _features(out)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)


def test_load_features_keeps_shard_names_inside_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"")
    (tmp_path / "out").mkdir()
    for shard in ("../secret.safetensors", str(outside), "sub/shard-00000.safetensors"):
        with pytest.raises(ValueError, match=r"entry.*shard"):
            load_features(tmp_path / "out", {"shard": shard, "key": "img-000000"})


# ---- planted symbolic links are never followed ---------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["extract.json.tmp", "shard-00000.safetensors.tmp", "manifest.jsonl", "errors.jsonl.tmp"],
)
def test_a_planted_link_is_never_written_through(
    tmp_path: Path, reference: tuple[Path, dict[str, torch.Tensor]], name: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / name).symlink_to(victim)
    try:
        result = _run(reference[0], out)
    except ValueError as err:  # refused with a clear error: a link where a file of ours must be
        assert "symbolic link" in str(err) and name in str(err)
    else:  # or removed (and replaced by a file of our own), or left alone, never followed
        assert result.extracted == 4  # type: ignore[attr-defined]
    assert victim.read_text() == "precious\n"


def test_a_fifo_in_the_folder_never_blocks(
    tmp_path: Path, reference: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs mkfifo")
    out = _fresh(tmp_path, reference[0])
    (out / "manifest.jsonl").unlink()
    os.mkfifo(out / "manifest.jsonl")
    code = (
        "import sys; from dynamic_s2.extract import read_manifest\n"
        "try:\n    read_manifest(sys.argv[1])\nexcept ValueError as e:\n    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert "not a regular file" in done.stdout
