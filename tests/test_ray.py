"""extract_ray on a real local Ray cluster: equal to the single-process extract, survives a killed
actor, records unreadable images, resumes; and the one reader over both folder formats."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _deps import need

ray = need("ray")
pq = need("pyarrow.parquet")
Image = need("PIL.Image")
need("safetensors")
need("tqdm")

from dynamic_s2 import TilePlan  # noqa: E402
from dynamic_s2.cli import main  # noqa: E402
from dynamic_s2.extract import ExtractWarning, extract  # noqa: E402
from dynamic_s2.ray import extract_ray  # noqa: E402
from dynamic_s2.store import open_features  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"
SCALES = (32, 64)
BROKEN = ("broken.png", "empty.jpg")


class DiesOnce(torch.nn.Module):
    """A small conv that kills its process (the Ray actor) on its ``n``-th call, once per marker."""

    def __init__(self, conv: torch.nn.Module, marker: Path, n: int) -> None:
        super().__init__()
        self.conv, self.marker, self.n, self.calls = conv, str(marker), n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n and not os.path.exists(self.marker):
            Path(self.marker).write_text("killed")
            os._exit(1)
        return self.conv(x)


def _conv() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 5, kernel_size=8, stride=8).eval()


def _mixed_images(root: Path, count: int = 100) -> Path:
    """``count`` small images of mixed sizes, shapes, modes and formats, plus broken files."""
    root.mkdir()
    rng = np.random.default_rng(0)
    modes = ("RGB", "L", "RGBA", "P")
    for i in range(count):
        h, w = (int(v) for v in rng.integers(16, 160, size=2))
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(modes[i % len(modes)])
        if i % 3 == 0:
            image.convert("RGB").save(root / f"img{i:03d}.jpg", quality=90)
        else:
            image.save(root / f"img{i:03d}.png")
    (root / BROKEN[0]).write_bytes(b"not a png at all")
    (root / BROKEN[1]).write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """One local Ray cluster (2 CPUs) for the whole module."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # DiesOnce, in the actors
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def killed_run(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """extract_ray over the example photos and 100 generated images (2 broken) whose actor dies on
    its second batch, and the single-process extract of the same inputs."""
    tmp = tmp_path_factory.mktemp("ray")
    generated = _mixed_images(tmp / "generated")
    inputs = [generated, EXAMPLES]
    marker = tmp / "killed"
    result = extract_ray(
        inputs,
        tmp / "ray",
        backbone=DiesOnce(_conv(), marker, n=2),
        scales=SCALES,
        batch_images=8,
        progress=False,
    )
    with pytest.warns(ExtractWarning):  # the broken files
        local = extract(inputs, tmp / "local", backbone=_conv(), scales=SCALES, workers=0,
                        progress=False)  # fmt: skip
    return SimpleNamespace(
        result=result, local=local, out=tmp / "ray", ref=tmp / "local", generated=generated,
        marker=marker,
    )  # fmt: skip


def _assert_same_items(out: Path, ref: Path, under: Path) -> int:
    ours, theirs = open_features(out), open_features(ref)
    assert (ours.format, theirs.format) == ("parquet", "safetensors")
    keys = [k for k in theirs.keys if Path(k).parent == under]
    assert keys and [k for k in ours.keys if Path(k).parent == under] == keys
    for key in keys:
        a, b = ours[key], theirs[key]
        assert a.features.shape == b.features.shape and a.features.dtype == b.features.dtype
        torch.testing.assert_close(a.features, b.features, rtol=0, atol=1e-6)
        assert a.prefix is None and b.prefix is None
        assert a.plan == b.plan and a.image_size == b.image_size == b.plan.image_size
    return len(keys)


def test_ray_equals_local_on_the_example_photos(killed_run: SimpleNamespace) -> None:
    assert _assert_same_items(killed_run.out, killed_run.ref, EXAMPLES) == 7


def test_ray_equals_local_on_100_generated_images(killed_run: SimpleNamespace) -> None:
    assert _assert_same_items(killed_run.out, killed_run.ref, killed_run.generated) == 100


def test_killed_actor_is_retried_and_every_image_is_written_once(
    killed_run: SimpleNamespace,
) -> None:
    assert killed_run.marker.read_text() == "killed"  # the actor did die mid-run
    table = pq.read_table(killed_run.out / "parquet")  # plain pyarrow, the whole folder
    keys = table.column("key").to_pylist()
    expected = {str(p) for p in killed_run.generated.iterdir()} | {
        str(p) for p in EXAMPLES.iterdir() if p.suffix in (".jpg", ".png")
    }
    assert len(keys) == len(set(keys)) == len(expected) == 109
    assert set(keys) == expected
    r = killed_run.result
    assert (r.extracted, r.failed, r.skipped) == (107, 2, 0)
    assert r.shards and all(p.suffix == ".parquet" for p in r.shards)


def test_unreadable_images_become_error_rows_and_the_errors_file(
    killed_run: SimpleNamespace,
) -> None:
    table = pq.read_table(killed_run.out / "parquet", columns=["key", "error", "features"])
    failed = {
        Path(k).name: e
        for k, e, f in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)
        if e is not None or f is None
    }
    assert set(failed) == set(BROKEN) and all(failed.values())

    def errors(out: Path) -> set[tuple[str, str]]:
        lines = (out / "errors.jsonl").read_text().splitlines()
        return {(e["path"], e["error"]) for e in map(json.loads, lines)}

    assert errors(killed_run.out) == errors(killed_run.ref)  # same file as the local engine's
    assert len(errors(killed_run.out)) == 2 and killed_run.result.errors is not None


def test_rows_decode_without_the_library(killed_run: SimpleNamespace) -> None:
    ds = ray.data.read_parquet(str(killed_run.out / "parquet"))
    assert ds.count() == 109 and "features" in ds.schema().names
    reader = open_features(killed_run.out)
    every = pq.read_table(killed_run.out / "parquet").to_pylist()
    rows = [r for r in every if r["error"] is None][::10]
    assert len(rows) == 11
    for row in rows:
        shape = [int(s) for s in row["shape"]]
        values = np.frombuffer(row["features"], dtype=np.dtype(row["dtype"])).reshape(shape)
        item = reader[row["key"]]
        assert np.array_equal(values, item.features.numpy())
        assert TilePlan.from_dict(json.loads(row["plan"])) == item.plan
        assert [row["height"], row["width"]] == list(item.image_size)


def test_reader_indexing(killed_run: SimpleNamespace) -> None:
    data = open_features(killed_run.out)
    assert len(data) == 107 and data.keys == sorted(data.keys)
    assert data[-1].key == data.keys[-1] and data[3].key == data.keys[3]
    assert torch.equal(data[data.keys[5]].features, data[5].features)
    assert data.index(data.keys[7]) == 7
    with pytest.raises(KeyError, match=r"broken\.png"):
        data[str(killed_run.generated / "broken.png")]
    with pytest.raises(IndexError):
        data[107]
    with pytest.raises(TypeError, match="index"):
        data[1.5]  # type: ignore[index]


@pytest.mark.parametrize("folder", ["out", "ref"])  # Parquet, safetensors
def test_reader_keys_as_the_user_passed_them(
    killed_run: SimpleNamespace, folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key is the path the user gave: absolute, relative to the current directory, with ``./``
    or ``..``, a ``Path``; all find the one stored (absolute) key, in both formats."""
    data = open_features(getattr(killed_run, folder))
    generated = killed_run.generated
    stored = next(k for k in data.keys if Path(k).parent == generated)
    position, name = data.keys.index(stored), Path(stored).name
    monkeypatch.chdir(generated.parent)
    relative = Path(generated.name) / name
    given = [str(generated / name), str(relative), relative, f"./{relative}",
             f"{generated.name}/../{generated.name}/{name}"]  # fmt: skip
    for key in given:
        assert key in data and data.index(key) == position, key
        assert data[key].key == stored
    assert "missing.png" not in data and 3 not in data
    with pytest.raises(KeyError, match=r"'generated/missing\.png' is not in"):
        data[f"{generated.name}/missing.png"]


def test_ray_logs_are_quiet_unless_verbose() -> None:
    """Records of Ray Data's loggers reach a console at WARNING and above only, without the
    false "no available CPUs ... will hang" alarm; verbose lets INFO through; afterwards the
    handlers are as they were."""
    from dynamic_s2.ray import _ray_logs

    stream = io.StringIO()
    console = logging.StreamHandler(stream)
    parent, child = logging.getLogger("ray.data"), logging.getLogger("ray.data.dataset")
    parent.addHandler(console)
    level = parent.level
    parent.setLevel(logging.DEBUG)
    alarm = "Warning: The Ray cluster currently does not have any available CPUs. It will hang"
    try:
        with _ray_logs(verbose=False):
            child.info("execution started")
            child.warning(alarm)
            child.warning("a real warning")
        quiet = stream.getvalue()
        with _ray_logs(verbose=True):
            child.info("execution started")
        loud = stream.getvalue()[len(quiet) :]
        child.info("after the job")
        after = stream.getvalue()[len(quiet) + len(loud) :]
    finally:
        parent.removeHandler(console)
        parent.setLevel(level)
    assert quiet == "a real warning\n"
    assert loud == "execution started\n" and after == "after the job\n"


def test_cli_summary_names_the_parquet_folder(
    cluster: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A good run prints our summary, naming the Parquet folder, and no alarm."""
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(("red", "teal")):
        Image.new("RGB", (40 + 10 * i, 60), colour).save(images / f"{colour}.png")
    out = tmp_path / "out"
    args = ["extract", str(images), "--out", str(out), "--engine", "ray", "--scales", "32",
            "--backbone", "efficientnet-lite0", "--no-progress"]  # fmt: skip
    capfd.readouterr()
    assert main(args) == 0
    printed = capfd.readouterr()
    assert f"Parquet folder: {out / 'parquet'}" in printed.out and "manifest" not in printed.out
    assert "available CPUs" not in printed.out + printed.err


def test_rerun_resumes_new_changed_and_failed_images(cluster: None, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    colours = ("red", "green", "blue")
    for i, colour in enumerate(colours):
        Image.new("RGB", (40 + 10 * i, 60), colour).save(images / f"{colour}.png")
    (images / "bad.png").write_bytes(b"broken")
    out = tmp_path / "out"
    args = ["extract", str(images), "--out", str(out), "--engine", "ray", "--scales", "224",
            "--no-progress"]  # fmt: skip
    assert main(args) == 3  # some images could not be read
    first = set((out / "parquet").iterdir())
    assert [json.loads(x)["path"] for x in (out / "errors.jsonl").read_text().splitlines()] == [
        str(images / "bad.png")
    ]

    # Same settings: resume. One image changes, one is new, the broken one is fixed.
    Image.new("RGB", (90, 30), "white").save(images / "red.png")
    Image.new("RGB", (30, 30), "black").save(images / "new.png")
    Image.new("RGB", (50, 50), "grey").save(images / "bad.png")
    assert main(args) == 0
    assert not (out / "errors.jsonl").exists()  # the errors of the latest run only
    assert set((out / "parquet").iterdir()) > first  # old files kept, new ones added
    runs = pq.read_table(out / "parquet", columns=["key", "run"]).to_pylist()
    assert sorted(Path(r["key"]).name for r in runs if r["run"] == 1) == [
        "bad.png", "new.png", "red.png"
    ]  # fmt: skip

    ref = tmp_path / "ref"
    extract(images, ref, scales=(224,), workers=0, progress=False)
    ours, theirs = open_features(out), open_features(ref)
    assert ours.keys == theirs.keys and len(ours) == 5
    for key in theirs.keys:
        torch.testing.assert_close(ours[key].features, theirs[key].features, rtol=0, atol=1e-6)
        assert ours[key].image_size == theirs[key].image_size

    # Nothing left to do: no job, nothing written.
    result = extract_ray(images, out, scales=(224,), progress=False)
    assert (result.extracted, result.skipped, result.shards) == (0, 5, ())

    # Other settings: refused before anything runs, the folder untouched.
    files = set((out / "parquet").iterdir())
    with pytest.raises(ValueError, match="other settings"):
        extract_ray(images, out, scales=(224, 448), progress=False)
    assert set((out / "parquet").iterdir()) == files


def test_flipped_bytes_in_a_ray_file_are_caught_on_read(
    killed_run: SimpleNamespace, tmp_path: Path
) -> None:
    """The Parquet files carry page checksums (issue 20): a flipped byte inside stored features
    raises on read instead of coming back as a wrong value."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(killed_run.out, copy)
    item = open_features(copy)[0]
    raw = item.features.numpy().tobytes()
    chunk = raw[len(raw) // 2 : len(raw) // 2 + 32]
    files = sorted((copy / "parquet").glob("*.parquet"))
    holder = next(p for p in files if chunk in p.read_bytes())
    data = bytearray(holder.read_bytes())
    data[data.find(chunk) + 3] ^= 0xFF
    holder.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        open_features(copy)[item.key]
    unchecked = open_features(copy, verify=False)[item.key].features
    assert not torch.equal(unchecked, item.features)
