"""Issue 20: what two outside campaigns still found, class by class.

The bad-argument cases (``Backbone(fn=None)``, a huge ``tile_size`` in a plan dict, NVILA's tile
rule, a conv backbone with a wrong ``mean`` or ``num_prefix_tokens``, ambiguous token counts,
channels-last and PIL images, ``draw_plan`` of another size, non-square maps to
``merge_and_pack``, ``open_features`` on a file, a Parquet folder without ``extract.json``) are in
``tests/test_validation.py``'s catalog. This file checks the behaviour around them: what is still
accepted, the default pixel cap, names on the terminal, checksums on read, and the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dynamic_s2
from dynamic_s2 import Backbone, as_backbone, forward, plan_tiles
from dynamic_s2.cli import build_parser, main
from dynamic_s2.extract import DEFAULT_MAX_PIXELS, ExtractWarning, extract, read_manifest

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("safetensors")
pytest.importorskip("tqdm")

SCALES = (32, 64)
POOL = nn.AvgPool2d(8)  # [T, 3, 32, 32] -> [T, 3, 4, 4] maps
IMAGES = [torch.rand(3, 40, 60), torch.rand(3, 50, 30)]


def _png(path: Path, h: int = 40, w: int = 48, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _extract(inputs: Path, out: Path, **options: object) -> object:
    options.setdefault("backbone", POOL)
    options.setdefault("scales", SCALES)
    return extract(inputs, out, workers=0, progress=False, **options)  # type: ignore[arg-type]


# ---- class 1: checks at construction -----------------------------------------------------------


def test_conv_stacks_declare_maps_and_their_channels() -> None:
    stack = as_backbone(nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.AvgPool2d(2)))
    assert stack.maps and dynamic_s2.backbones.input_channels(stack) == 4
    head = as_backbone(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4)))
    assert not head.maps  # a stack that ends in tokens or vectors is not declared
    assert not as_backbone(lambda x: x).maps
    # a 4-channel conv takes a 4-value mean; a 3-value one is refused when built
    dynamic_s2.DynamicS2(nn.Conv2d(4, 8, 8, stride=8), scales=SCALES, mean=(0.5,) * 4)
    with pytest.raises(ValueError, match=r"mean.*4 values"):
        dynamic_s2.DynamicS2(nn.Conv2d(4, 8, 8, stride=8), scales=SCALES, mean=(0.5,) * 3)


def test_plans_at_the_tile_bound_are_still_accepted() -> None:
    top = dynamic_s2.plan.MAX_TILE_SIZE
    plan = plan_tiles(10, 10, (top,))
    assert plan.tile_size == top and dynamic_s2.TilePlan.from_dict(plan.to_dict()) == plan
    nvila = plan_tiles(40, 60, (32, 64), policy="nvila")
    assert nvila.tile_size == 32 and dynamic_s2.TilePlan.from_dict(nvila.to_dict()) == nvila


# ---- class 2: ambiguous token splits -------------------------------------------------------------


def test_unambiguous_token_splits_are_still_read_without_a_word() -> None:
    """CLS + 4×4 and registers within one grid row are read; a declared count is always used."""
    for count, prefix in ((16, 0), (17, 1), (20, 4)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = forward(lambda x, n=count: torch.rand(x.shape[0], n, 4), IMAGES, SCALES)
        assert out.prefix is None if prefix == 0 else out.prefix.shape[1] == prefix
    out = forward(lambda x: torch.rand(x.shape[0], 15, 4), IMAGES, SCALES, num_prefix_tokens=6)
    assert out.prefix is not None and out.prefix.shape[1] == 6


def test_layer_refuses_the_split_on_its_first_call() -> None:
    layer = dynamic_s2.DynamicS2(lambda x: torch.rand(x.shape[0], 3, 4), scales=SCALES)
    with pytest.raises(ValueError, match=r"num_prefix_tokens.*3 tokens"):
        layer(IMAGES)


# ---- class 8: the library names the tile size it knows ----------------------------------------


def test_a_tile_size_the_backbone_cannot_take_is_named_with_its_cause() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32,
    )  # fmt: skip
    vit = transformers.ViTModel(config, add_pooling_layer=False)
    with pytest.raises(ValueError, match=r"tile_size.*48-px.*32") as info:
        forward(vit, IMAGES, (48, 96))
    assert info.value.__cause__ is not None  # the backbone's own message stays attached
    assert forward(vit, IMAGES, (32, 64)).channels == 32  # its own size works


def test_a_failing_backbone_at_its_own_size_keeps_its_error() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        forward(Backbone(broken, input_size=32), IMAGES, SCALES)


# ---- class 4: a pixel cap by default -------------------------------------------------------------


def _declares(path: Path, side: int) -> Path:
    """A PNG whose header declares ``side`` × ``side`` pixels, its data cut short (a few hundred
    bytes on disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (side, side)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    return path


def test_extract_caps_pixels_by_default(tmp_path: Path) -> None:
    assert 9000 * 9000 > DEFAULT_MAX_PIXELS >= 8192 * 5464  # refuses the bomb, takes 45-MP photos
    _png(tmp_path / "in" / "a.png")
    _declares(tmp_path / "in" / "huge.png", 9000)
    with pytest.warns(ExtractWarning, match="max_pixels"):
        result = _extract(tmp_path / "in", tmp_path / "out")
    assert (result.extracted, result.failed) == (1, 1)  # type: ignore[attr-defined]
    line = json.loads((tmp_path / "out" / "errors.jsonl").read_text().splitlines()[0])
    assert line["path"].endswith("huge.png") and "max_pixels" in line["message"]


def test_the_cap_can_be_lifted(tmp_path: Path) -> None:
    _declares(tmp_path / "in" / "huge.png", 9000)
    with pytest.warns(ExtractWarning) as caught:
        _extract(tmp_path / "in", tmp_path / "out", max_pixels=None)
    assert not any("max_pixels" in str(w.message) for w in caught)  # decoded (and found cut)
    parser = build_parser()
    assert parser.parse_args(["extract", "x", "--out", "y"]).max_pixels == DEFAULT_MAX_PIXELS
    assert parser.parse_args(["extract", "x", "--out", "y", "--max-pixels", "0"]).max_pixels == 0


# ---- class 5: names from the disk never reach the terminal raw ---------------------------------


HOSTILE = "bad\x1b[2J\x1b]0;owned\x07\r.png"


def test_hostile_names_are_escaped_in_warnings(tmp_path: Path) -> None:
    _png(tmp_path / "in" / "a.png")
    (tmp_path / "in" / HOSTILE).write_bytes(b"not an image")
    with pytest.warns(ExtractWarning) as caught:
        _extract(tmp_path / "in", tmp_path / "out")
    text = " ".join(str(w.message) for w in caught)
    assert "bad\\x1b[2J" in text
    assert not any(c in text for c in "\x1b\x07\r")
    # errors.jsonl keeps the true name (JSON escapes it)
    line = json.loads((tmp_path / "out" / "errors.jsonl").read_text().splitlines()[0])
    assert line["path"].endswith(HOSTILE)


def test_hostile_names_are_escaped_by_the_command(tmp_path: Path) -> None:
    _png(tmp_path / "in" / "a.png", 64, 64)
    (tmp_path / "in" / HOSTILE).write_bytes(b"not an image")
    run = subprocess.run(
        [sys.executable, "-m", "dynamic_s2", "extract", str(tmp_path / "in"), "--out",
         str(tmp_path / "out"), "--scales", "224", "--workers", "0", "--no-progress"],
        capture_output=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "default"},
    )  # fmt: skip
    assert run.returncode == 3, run.stderr.decode(errors="replace")
    assert b"bad\\x1b[2J" in run.stderr
    assert not any(c in run.stderr for c in b"\x1b\x07\r")


# ---- classes 6 and 7: the reader checks what the folder recorded -------------------------------


def _flip_inside(path: Path, raw: bytes) -> None:
    """Flip one byte in the middle of ``raw`` where the file stores it."""
    data = bytearray(path.read_bytes())
    middle = len(raw) // 2
    at = bytes(data).find(raw[middle : middle + 32])
    assert at >= 0, "the stored bytes were not found in the file"
    data[at + 3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_open_features_verifies_shard_checksums(tmp_path: Path) -> None:
    for i in range(2):
        _png(tmp_path / "in" / f"img{i}.png", seed=i)
    _extract(tmp_path / "in", tmp_path / "out", shard_size=1)
    entries = sorted(read_manifest(tmp_path / "out"), key=lambda e: e["path"])
    good = dynamic_s2.store.open_features(tmp_path / "out")
    expected = good[0].features.clone()
    shard = tmp_path / "out" / entries[0]["shard"]
    _flip_inside(shard, expected.numpy().tobytes())

    data = dynamic_s2.store.open_features(tmp_path / "out")
    with pytest.raises(ValueError, match=rf"shard {entries[0]['shard']!r}.*SHA-256"):
        data[0]
    assert torch.equal(data[1].features, good[1].features)  # the other shard is intact
    assert shard.exists()  # nothing deleted
    unchecked = dynamic_s2.store.open_features(tmp_path / "out", verify=False)[0].features
    assert not torch.equal(unchecked, expected)  # what verify=False would have handed back


def test_parquet_pages_are_checked(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from dynamic_s2 import parquet

    plan = plan_tiles(64, 64, SCALES)
    features = torch.randn(8, 8, 6, generator=torch.Generator().manual_seed(0))
    row = parquet.feature_row("/a.png", 1, 1, 0, plan, features, None)
    folder = tmp_path / "out" / parquet.PARQUET_DIR
    folder.mkdir(parents=True)
    path = folder / "0.parquet"
    table = pa.Table.from_pylist([row], schema=parquet.schema())
    pq.write_table(table, path, **parquet.WRITE_OPTIONS)
    assert torch.equal(dynamic_s2.store.open_features(tmp_path / "out")[0].features, features)
    _flip_inside(path, features.numpy().tobytes())
    with pytest.raises(ValueError, match=r"0\.parquet.*damaged"):
        dynamic_s2.store.open_features(tmp_path / "out")[0]
    read = dynamic_s2.store.open_features(tmp_path / "out", verify=False)[0].features
    assert not torch.equal(read, features)  # unchecked, the flip comes back as a wrong value


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_parquet_folder_without_its_settings_is_not_resumed(tmp_path: Path, damage: str) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from dynamic_s2 import parquet, store

    out = tmp_path / "out"
    out.mkdir()
    store.prepare(out, {"scales": [32, 64]}, overwrite=False)
    (out / parquet.PARQUET_DIR).mkdir()
    table = pa.Table.from_pylist([parquet.error_row("/x.png", 1, 1, 0, "E", "m")], parquet.schema())
    pq.write_table(table, out / parquet.PARQUET_DIR / "0.parquet", **parquet.WRITE_OPTIONS)
    if damage == "missing":
        (out / store.CONFIG).unlink()
    else:
        (out / store.CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match=r"extract\.json.*overwrite"):
        store.check_config(out, {"scales": [32, 64, 96]})
    assert (out / parquet.PARQUET_DIR / "0.parquet").exists()  # nothing deleted


# ---- class 9: the command line -------------------------------------------------------------------


def test_extract_does_not_offer_tile_budget(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["extract", "--help"])
    assert "--tile-budget" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["extract", "x", "--out", "y", "--tile-budget", "4"])
    assert info.value.code == 2
    plan_args = build_parser().parse_args(["plan", "100x100", "--tile-budget", "4"])
    assert plan_args.tile_budget == 4  # plan, which plans a batch, still offers it


def test_a_resume_with_other_scales_names_only_what_changed(tmp_path: Path) -> None:
    _png(tmp_path / "in" / "a.png")
    model = Backbone(POOL, input_size=32, module=POOL)  # default scales (32, 64, 96), tile 32
    _extract(tmp_path / "in", tmp_path / "out", backbone=model, scales=None)
    with pytest.raises(ValueError, match="scales") as info:
        _extract(tmp_path / "in", tmp_path / "out", backbone=model, scales=(32, 64))
    assert "tile_size" not in str(info.value)  # the tile is 32 either way
    # the same scales given explicitly resume the folder written with the backbone's defaults
    again = _extract(tmp_path / "in", tmp_path / "out", backbone=model, scales=(32, 64, 96))
    assert again.skipped == 1  # type: ignore[attr-defined]


def test_nvila_settings_are_refused_before_any_image_is_read(tmp_path: Path) -> None:
    _png(tmp_path / "in" / "a.png")
    argv = ["extract", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--policy",
            "nvila", "--scales", "32,64,96", "--max-tiles", "3", "--workers", "2"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert not (tmp_path / "out").exists()


def test_copies_keep_their_checksums(tmp_path: Path) -> None:
    """A folder copied elsewhere (the checksums are of content, not paths) still verifies."""
    _png(tmp_path / "in" / "a.png")
    _extract(tmp_path / "in", tmp_path / "out")
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    assert dynamic_s2.store.open_features(tmp_path / "copy")[0].features.shape[-1] == 6
