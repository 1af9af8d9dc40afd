"""The chain in two halves (prepare / run) and the one options object (S2Options)."""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle
from pathlib import Path

import pytest
import torch
from _deps import need
from hypothesis import given, settings
from hypothesis import strategies as st

import dynamic_s2
from dynamic_s2 import DynamicS2, S2Options, forward, prepare, run
from dynamic_s2 import api as api_module
from dynamic_s2 import options as options_module
from dynamic_s2.cli import build_parser, main

SCALES = (16, 32, 48)


class Recorder(torch.nn.Module):
    """A patch-embedding backbone that records the batch size of every call."""

    def __init__(self, tokens: bool, prefix: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, kernel_size=4, stride=4)
        self.tokens = tokens
        self.prefix = prefix
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        maps = self.conv(x)
        if not self.tokens:
            return maps
        tokens = maps.flatten(2).transpose(1, 2)
        if self.prefix:
            cls = tokens.mean(dim=1, keepdim=True).expand(-1, self.prefix, -1)
            tokens = torch.cat([cls, tokens], dim=1)
        return tokens


def images(sizes: list[tuple[int, int]], dtype: torch.dtype = torch.uint8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(len(sizes))
    out = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes]
    return out if dtype == torch.uint8 else [x.to(dtype) / 255 for x in out]


SIZES = st.lists(st.tuples(st.integers(8, 120), st.integers(8, 120)), min_size=1, max_size=4)


@settings(max_examples=25, deadline=None)
@given(
    sizes=SIZES,
    tokens=st.booleans(),
    chunk=st.sampled_from([None, 1, 3, 8]),
    pad=st.sampled_from([None, 1, 2]),
)
def test_run_of_prepare_is_forward(
    sizes: list[tuple[int, int]], tokens: bool, chunk: int | None, pad: int | None
) -> None:
    if chunk is not None and pad is not None and pad > chunk:
        pad = None
    imgs = images(sizes)
    extra = {"max_batch_tiles": chunk, "pad_to_multiple": pad, "mean": 0.5, "std": 0.25}
    prefix = 1 if tokens else 0
    a, b = Recorder(tokens, prefix), Recorder(tokens, prefix)
    with torch.no_grad():
        whole = forward(a, imgs, scales=SCALES, num_prefix_tokens=prefix or None, **extra)
        batch = prepare(imgs, scales=SCALES, mean=0.5, std=0.25)
        halves = run(
            b,
            batch,
            max_batch_tiles=chunk,
            pad_to_multiple=pad,
            num_prefix_tokens=prefix or None,
        )
    assert a.calls == b.calls  # the same backbone calls
    assert torch.equal(whole.tokens, halves.tokens)
    assert whole.sizes == halves.sizes
    assert (whole.prefix is None) == (halves.prefix is None)
    if whole.prefix is not None:
        assert halves.prefix is not None and torch.equal(whole.prefix, halves.prefix)


def test_prepare_takes_the_models_defaults() -> None:
    bb = dynamic_s2.Backbone(Recorder(False), input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    imgs = images([(30, 50)])
    batch = prepare(imgs, model=bb)
    assert [sp.scale for sp in batch.plans[0].scales] == [16, 32, 48]
    with torch.no_grad():
        assert torch.equal(run(bb, batch).tokens, forward(bb, imgs).tokens)


def test_prepare_pickles_and_runs_in_a_two_worker_dataloader() -> None:
    imgs = images([(20, 30), (40, 24), (17, 17), (64, 20)])
    batch = prepare(imgs, scales=SCALES)
    back = pickle.loads(pickle.dumps(batch))
    assert torch.equal(back.tiles, batch.tiles) and back.plans == batch.plans
    loader = torch.utils.data.DataLoader(
        imgs, batch_size=2, num_workers=2, collate_fn=functools.partial(prepare, scales=SCALES)
    )
    model = Recorder(False)
    parts = []
    with torch.no_grad():
        for prepared in loader:
            parts.append(run(model, prepared))
    joined = dynamic_s2.MultiScaleFeatures.cat(parts)
    with torch.no_grad():
        direct = forward(model, imgs, scales=SCALES)
    assert torch.equal(joined.tokens, direct.tokens)


def test_each_check_runs_once_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {"check_images": 0, "as_backbone": 0}

    def counting(name, real):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            counts[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        api_module, "check_images", counting("check_images", api_module.check_images)
    )
    monkeypatch.setattr(api_module, "as_backbone", counting("as_backbone", api_module.as_backbone))
    with torch.no_grad():
        forward(Recorder(False), images([(30, 40)] * 5), scales=SCALES, max_batch_tiles=4)
    assert counts == {"check_images": 1, "as_backbone": 1}


def test_run_refuses_planning_options() -> None:
    batch = prepare(images([(20, 20)]), scales=SCALES)
    with pytest.raises(TypeError, match="policy"):
        run(Recorder(False), batch, policy="nvila")
    with pytest.raises(TypeError, match="no_such_option"):
        forward(Recorder(False), images([(20, 20)]), scales=SCALES, no_such_option=1)


def test_every_field_is_an_option_of_every_front_end() -> None:
    names = [f.name for f in dataclasses.fields(S2Options)]
    defaults = {f.name: f.default for f in dataclasses.fields(S2Options)}
    defaults["scales"] = SCALES
    layer = DynamicS2(Recorder(False), **defaults)
    assert {f.name: getattr(layer.options, f.name) for f in dataclasses.fields(S2Options)} == {
        **defaults
    }
    parsed = vars(build_parser().parse_args(["extract", "x", "--out", "y"]))
    assert {name: parsed[name] for name in names} == {
        f.name: f.default for f in dataclasses.fields(S2Options)
    }
    assert set(S2Options().to_config()) <= set(names)


def test_a_new_field_reaches_the_cli_and_the_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A field added to the options object shows up as a flag and in extract.json, unasked."""

    @dataclasses.dataclass(frozen=True)
    class WithColour(S2Options):
        colour: str = options_module._option(
            "blue", "merge", "a made-up option for this test", parse=str, metavar="NAME"
        )

    monkeypatch.setattr(options_module, "S2Options", WithColour)
    args = build_parser().parse_args(["extract", "x", "--out", "y", "--colour", "red"])
    assert args.colour == "red"
    need("PIL")
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (40, 30), "teal").save(folder / "a.png")
    out = tmp_path / "out"
    argv = ["extract", str(folder), "--out", str(out), "--scales", "16,32", "--colour", "red"]
    argv += ["--workers", "0", "--no-progress", "--backbone", "efficientnet-lite0"]
    monkeypatch.setattr(
        "dynamic_s2.extract.load_backbone", lambda *a, **k: dynamic_s2.as_backbone(Recorder(False))
    )
    assert main(argv) == 0
    config = json.loads((out / "extract.json").read_text())
    assert config["colour"] == "red"


def test_options_are_validated_once_at_construction() -> None:
    with pytest.raises(ValueError, match="output_scale"):
        S2Options(scales=(16, 32), output_scale=2)
    with pytest.raises(ValueError, match="pad_to_multiple"):
        S2Options(max_batch_tiles=2, pad_to_multiple=4)
    with pytest.raises(TypeError, match="mean"):
        S2Options(mean="grey")
    with pytest.raises(ValueError, match="tile_size"):
        S2Options(scales=(16, 32), tile_size=20)
    opts = S2Options(scales=[16, 32], max_tiles=[2, 8], mean=[0.5, 0.5, 0.5])
    assert opts.scales == (16, 32) and opts.max_tiles == (2, 8) and opts.mean == (0.5,) * 3


def test_stages_and_subpackages_are_attributes() -> None:
    assert callable(dynamic_s2.s2wrapper.forward) and callable(dynamic_s2.nvila.preprocess)
    assert dynamic_s2.prepare is prepare and dynamic_s2.run is run


def test_prepare_checks_plans_against_the_options_it_was_given() -> None:
    imgs = images([(30, 40)])
    plans = [dynamic_s2.plan_tiles(30, 40, (16, 32))]
    with pytest.raises(ValueError, match="scales"):
        prepare(imgs, scales=(16, 48), plans=plans)
    with pytest.raises(ValueError, match="policy"):
        prepare(imgs, plans=plans, policy="nvila")
    assert prepare(imgs, scales=(16, 32), plans=plans).plans == tuple(plans)
