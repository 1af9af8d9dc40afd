"""The dynamic-s2 command: plan, draw, extract (resume, errors, overwrite) and --help."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from _deps import need

import dynamic_s2
from dynamic_s2.backbones import load_backbone
from dynamic_s2.cli import build_parser, main
from dynamic_s2.extract import find_images, load_features, read_image, read_manifest

Image = need("PIL.Image")
need("safetensors")
need("tqdm")

SCALES = (224, 448)
SCALES_ARG = "224,448"


@pytest.fixture(scope="module")
def backbone() -> object:
    return load_backbone("efficientnet-lite0", device="cpu")


@pytest.fixture
def folder(tmp_path: Path, photos: dict[str, Path]) -> Path:
    """Three small images: two real photos (one in a sub-folder) and a rotated JPEG whose EXIF
    orientation swaps its height and width."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    shutil.copy(photos["page"], root / "page.png")
    shutil.copy(photos["chelsea"], root / "sub" / "chelsea.jpg")
    with Image.open(photos["coffee"]) as im:
        small = im.convert("RGB").resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display: stored 80×120, shown 120×80 (h×w)
    small.save(root / "rotated.jpg", exif=exif, quality=90)
    (root / "notes.txt").write_text("not an image, ignored in folders")
    return root


def _extract(inputs: list[Path], out: Path, *extra: str, scales: str = "224") -> int:
    """One cheap extraction (a single 224-px scale: one tile per image) in this process."""
    argv = ["extract", *map(str, inputs), "--out", str(out), "--scales", scales]
    return main([*argv, "--no-progress", "--workers", "0", *extra])


# ---------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("command", [[], ["plan"], ["draw"], ["extract"], ["demo"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dynamic-s2")
    for sub in command:
        assert sub in out


def test_python_m_entry_point_uses_main() -> None:
    text = (Path(dynamic_s2.__file__).parent / "__main__.py").read_text()
    assert "from .cli import main" in text


# ---------------------------------------------------------------------------------------------
# plan


def test_plan_table(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = folder / "page.png"
    assert main(["plan", str(image), "--scales", SCALES_ARG, "--tokens-per-side", "7"]) == 0
    out = capsys.readouterr().out
    with Image.open(image) as im:
        w, h = im.size
    plan = dynamic_s2.plan_tiles(h, w, SCALES)
    assert f"{image}: {h}×{w} (h×w)" in out
    lines = out.splitlines()
    for i, sp in enumerate(plan.scales):
        row = next(line for line in lines if line.split() and line.split()[0] == str(sp.scale))
        cells = row.split()
        assert cells[1] == "{}×{}".format(*sp.grid)
        assert cells[4] == str(sp.num_tiles)
        assert cells[5] == "{}×{}".format(*plan.feature_size(i, 7))
    total = next(line for line in lines if line.split() and line.split()[0] == "total")
    assert total.split()[1] == str(plan.num_tiles)


def test_plan_json_round_trips_and_respects_exif(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [folder / "page.png", folder / "rotated.jpg"]
    argv = ["plan", *map(str, images), "--scales", SCALES_ARG, "--fit", "pad", "--policy", "nvila"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["image"] for d in data] == [str(p) for p in images]
    for d, path in zip(data, images, strict=True):
        h, w = read_image(path).shape[1:]
        expected = dynamic_s2.plan_tiles(h, w, SCALES, fit="pad", policy="nvila")
        assert dynamic_s2.TilePlan.from_dict(d["plan"]) == expected
    assert tuple(data[1]["plan"]["image_size"]) == (120, 80)  # EXIF-rotated


def test_plan_accepts_literal_size(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "1080x1920", "--scales", "448,896,1344", "--max-tiles", "12", "--json"]
    assert main(argv) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    plan = dynamic_s2.TilePlan.from_dict(entry["plan"])
    assert plan == dynamic_s2.plan_tiles(1080, 1920, (448, 896, 1344), max_tiles=12)


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "1080x1920"],  # no scales
        ["plan", "1080x1920", "--scales", "448,abc"],
        ["plan", "1080x1920", "--scales", "0,448"],
        ["plan", "1080x1920", "--scales", "896,448"],  # not ascending
        ["plan", "no-such-file.png", "--scales", "448"],
        ["plan", "1080x1920", "--scales", "448", "--policy", "square"],
        ["extract", "x.png"],  # no --out
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# draw


@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_draw_writes_png(folder: Path, tmp_path: Path, fit: str) -> None:
    output = tmp_path / "pictures" / "plan.png"
    image = folder / "page.png"
    status = main(["draw", str(image), "--scales", "224,448,672", "--fit", fit, "-o", str(output)])
    assert status == 0
    with Image.open(output) as picture:
        assert picture.format == "PNG"
        w, h = picture.size
    assert w > h > 50  # three panels side by side


# ---------------------------------------------------------------------------------------------
# extract


def test_extract_matches_forward(folder: Path, tmp_path: Path, backbone: object) -> None:
    out = tmp_path / "features"
    status = main(
        [
            "extract",
            str(folder),
            "--out",
            str(out),
            "--scales",
            SCALES_ARG,
            "--workers",
            "1",  # the DataLoader worker path
            "--batch-images",
            "2",
            "--shard-size",
            "2",
            "--no-progress",
        ]
    )
    assert status == 0
    entries = read_manifest(out)
    paths = find_images(folder)
    assert sorted(e["path"] for e in entries) == [str(p) for p in paths]
    assert len(paths) == 3
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert not (out / "errors.jsonl").exists()
    for entry in entries:
        image = read_image(entry["path"])
        assert entry["size"] == list(image.shape[1:])
        assert entry["bytes"] == os.stat(entry["path"]).st_size
        plan = dynamic_s2.TilePlan.from_dict(entry["plan"])
        assert plan == dynamic_s2.plan_tiles(*image.shape[1:], SCALES, tile_size=224)
        assert entry["grids"] == [list(sp.grid) for sp in plan.scales]
        stored = load_features(out, entry)
        assert list(stored.shape) == entry["shape"]
        assert entry["dtype"] == "float32" and stored.dtype == torch.float32
        with torch.inference_mode():
            expected = dynamic_s2.forward(
                backbone,
                [image],
                scales=SCALES,
                mean=backbone.mean,  # type: ignore[attr-defined]
                std=backbone.std,  # type: ignore[attr-defined]
            ).unpad()[0]
        torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-4)
    rotated = next(e for e in entries if e["path"].endswith("rotated.jpg"))
    assert rotated["size"] == [120, 80]


def test_extract_dtype_bfloat16(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    assert _extract([folder / "page.png"], out, "--dtype", "bfloat16", scales=SCALES_ARG) == 0
    (entry,) = read_manifest(out)
    assert entry["dtype"] == "bfloat16"
    assert load_features(out, entry).dtype == torch.bfloat16


def test_extract_corrupt_files_listed_and_exit_3(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "corrupt.jpg").write_bytes(b"this is not a JPEG")
    good = (folder / "sub" / "chelsea.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    out = tmp_path / "features"
    with pytest.warns(UserWarning, match="skipping"):
        status = _extract([folder], out)
    assert status == 3
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(Path(e["path"]).name for e in errors) == ["corrupt.jpg", "truncated.jpg"]
    assert all(e["error"] and e["message"] for e in errors)
    names = sorted(Path(e["path"]).name for e in read_manifest(out))
    assert names == ["chelsea.jpg", "page.png", "rotated.jpg"]
    assert "could not be read" in capsys.readouterr().out

    # The failures are retried on the next run; once fixed, errors.jsonl goes away.
    (folder / "corrupt.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(good)
    assert _extract([folder], out) == 0
    assert not (out / "errors.jsonl").exists()
    assert len(read_manifest(out)) == 4


def test_extract_resume_skips_and_redoes_changed_files(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "features"
    assert _extract([folder], out) == 0
    first = {e["path"]: e for e in read_manifest(out)}
    capsys.readouterr()

    assert _extract([folder], out) == 0
    assert "extracted 0 images (3 already done" in capsys.readouterr().out
    assert (out / "manifest.jsonl").read_text().count("\n") == 3

    changed = folder / "page.png"
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _extract([folder], out) == 0
    assert "extracted 1 images (2 already done" in capsys.readouterr().out
    second = {e["path"]: e for e in read_manifest(out)}
    assert second.keys() == first.keys()
    assert (out / "manifest.jsonl").read_text().count("\n") == 3  # compacted: once per image
    assert second[str(changed)]["shard"] != first[str(changed)]["shard"]
    torch.testing.assert_close(
        load_features(out, second[str(changed)]), load_features(out, first[str(changed)])
    )


def test_extract_overwrite_and_settings_check(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "features"
    assert _extract([folder], out, "--shard-size", "1") == 0
    assert len(list(out.glob("shard-*.safetensors"))) == 3

    # Other settings into the same folder: refused, nothing touched.
    with pytest.raises(SystemExit) as exc:
        main(["extract", str(folder), "--out", str(out), "--scales", SCALES_ARG, "--no-progress"])
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert len(read_manifest(out)) == 3

    status = main(
        [
            "extract",
            str(folder / "page.png"),
            "--out",
            str(out),
            "--scales",
            SCALES_ARG,
            "--workers",
            "0",
            "--no-progress",
            "--overwrite",
        ]
    )
    assert status == 0
    assert [Path(e["path"]).name for e in read_manifest(out)] == ["page.png"]
    assert [p.name for p in out.glob("shard-*")] == ["shard-00000.safetensors"]
    assert json.loads((out / "extract.json").read_text())["scales"] == list(SCALES)


def test_extract_no_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        _extract([tmp_path / "empty"], tmp_path / "out")
    assert exc.value.code == 2
    assert "no image files" in capsys.readouterr().err


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["extract", "a", "--out", "b"])
    assert args.backbone == "efficientnet-lite0"
    assert args.dtype == "float32" and args.scales is None and not args.overwrite


# ---------------------------------------------------------------------------------------------
# demo


def test_demo_on_one_photo(
    tmp_path: Path, photos: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "mine"
    images.mkdir()
    shutil.copy(photos["page"], images / "page.png")
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--images", str(images), "--workers", "0", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for sub in ("features", "plans", "pca"):
        assert str(out / sub) in printed
    (entry,) = read_manifest(out / "features")
    assert [s["scale"] for s in entry["plan"]["scales"]] == [224, 448, 672]
    assert entry["shape"][2] == 3 * 1280  # EfficientNet-Lite0: 1280 channels per scale
    for picture in (out / "plans" / "page.png", out / "pca" / "page.png"):
        with Image.open(picture) as im:
            assert im.format == "PNG" and min(im.size) > 100


def test_demo_without_example_photos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("dynamic_s2.cli.find_example_images", lambda: None)
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "examples/images" in err and "--images" in err
    assert not (tmp_path / "demo").exists()
