"""Issue 11, class 3: inputs read rightly.

16-bit greyscale images are scaled to 8 bits (not clipped to white), symbolic link loops in an
input folder end and list every image once, FIFOs never hang a run, and ``max_pixels`` refuses an
image from its header, before anything is decoded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _deps import need
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dynamic_s2.extract import extract, find_images, read_image

Image = need("PIL.Image")
need("safetensors")
need("tqdm")

POOL = torch.nn.AvgPool2d(8)
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")


def _png(path: Path, h: int = 40, w: int = 48, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# ---- 16-bit greyscale --------------------------------------------------------------------------


@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=arrays(np.uint16, st.tuples(st.integers(1, 9), st.integers(1, 9))))
def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path: Path, values: np.ndarray) -> None:
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    got = read_image(path)
    # An independent reference: the 16-bit range [0, 65535] mapped linearly onto [0, 255].
    expected = np.floor(values.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)
    assert got.shape == (3, *values.shape)
    for channel in got:
        np.testing.assert_array_equal(channel.numpy(), expected)


def test_16_bit_mid_grey_is_mid_grey(tmp_path: Path) -> None:
    path = tmp_path / "mid.png"
    Image.fromarray(np.full((4, 5), 32896, dtype=np.uint16)).save(path)  # 128 * 257
    assert read_image(path).unique().tolist() == [128]


def test_8_bit_images_are_read_as_before(tmp_path: Path) -> None:
    path = _png(tmp_path / "rgb.png")
    with Image.open(path) as im:
        expected = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(read_image(path), expected)


# ---- symbolic link loops -------------------------------------------------------------------------


def test_a_symlink_loop_lists_every_image_once(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _png(root / "a.png")
    _png(root / "sub" / "b.png", seed=1)
    (root / "sub" / "back").symlink_to(root, target_is_directory=True)  # sub/back -> root
    (root / "self").symlink_to(root / "sub", target_is_directory=True)  # self -> sub
    found = find_images(root)
    assert [p.name for p in found] == ["a.png", "b.png"]
    assert len({os.path.realpath(p) for p in found}) == len(found)


def test_a_folder_reached_twice_through_inputs_is_listed_once(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _png(root / "a.png")
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    assert [p.name for p in find_images([root, tmp_path / "alias"])] == ["a.png"]


# ---- FIFOs and other non-regular files -----------------------------------------------------------


@needs_fifo
def test_a_fifo_in_a_folder_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _png(root / "a.png")
    os.mkfifo(root / "x.jpg")
    assert [p.name for p in find_images(root)] == ["a.png"]


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=180
    )


@needs_fifo
def test_extract_of_a_named_fifo_reports_it_and_goes_on(tmp_path: Path) -> None:
    good = _png(tmp_path / "in" / "a.png")
    fifo = tmp_path / "in" / "x.jpg"
    os.mkfifo(fifo)
    code = (
        "import sys, torch, warnings\n"
        "from dynamic_s2.extract import extract\n"
        "warnings.simplefilter('ignore')\n"
        "r = extract(sys.argv[1:3], sys.argv[3], backbone=torch.nn.AvgPool2d(8), scales=(32,),\n"
        "            workers=0, progress=False)\n"
        "print(r.extracted, r.failed)\n"
    )
    done = _run_python(code, str(good), str(fifo), str(tmp_path / "out"))
    assert done.stdout.split() == ["1", "1"], done.stderr
    errors = [
        json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()
    ]
    assert errors[0]["path"] == str(fifo) and "regular file" in errors[0]["message"]


@needs_fifo
def test_plan_of_a_fifo_exits_with_a_usage_error(tmp_path: Path) -> None:
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    code = "import sys; from dynamic_s2.cli import main; sys.exit(main(sys.argv[1:]))"
    done = _run_python(code, "plan", str(fifo), "--scales", "32")
    assert done.returncode == 2
    assert "not a regular file" in done.stderr


# ---- max_pixels ---------------------------------------------------------------------------------


def _declares_huge(path: Path, side: int) -> Path:
    """A PNG whose header declares ``side`` x ``side`` pixels but whose data is cut short, so that
    decoding it would fail: only a check made from the header can name max_pixels."""
    Image.new("L", (side, side)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    return path


def test_max_pixels_is_checked_from_the_header_before_decoding(tmp_path: Path) -> None:
    path = _declares_huge(tmp_path / "bomb.png", 3000)
    with pytest.raises(ValueError, match=r"max_pixels.*3000x3000 = 9000000.*max_pixels=1000000"):
        read_image(path, max_pixels=1_000_000)


def test_extract_lists_too_large_images_and_goes_on(tmp_path: Path) -> None:
    _png(tmp_path / "in" / "a.png")
    _declares_huge(tmp_path / "in" / "bomb.png", 3000)
    _png(tmp_path / "in" / "c.png", 64, 64, seed=2)
    with pytest.warns(UserWarning, match="max_pixels"):
        result = extract(
            tmp_path / "in",
            tmp_path / "out",
            backbone=POOL,
            scales=(32,),
            workers=0,
            progress=False,
            max_pixels=5000,
        )
    assert (result.extracted, result.failed) == (2, 1)
    errors = (tmp_path / "out" / "errors.jsonl").read_text()
    assert "bomb.png" in errors and "max_pixels" in errors


@pytest.mark.parametrize("bad", [0, -1, 2.5, "9"])
def test_extract_max_pixels_is_validated(tmp_path: Path, bad: object) -> None:
    _png(tmp_path / "in" / "a.png")
    with pytest.raises((ValueError, TypeError), match="max_pixels"):
        extract(tmp_path / "in", tmp_path / "out", backbone=POOL, max_pixels=bad)  # type: ignore[arg-type]
