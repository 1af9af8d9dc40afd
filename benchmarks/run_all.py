"""Run every benchmark in ``benchmarks/`` and regenerate the tables in ``docs/performance.md``.

A benchmark is a script in ``benchmarks/`` (not starting with ``_``) that writes
``benchmarks/results/<name>.json``. Each runs in its own process, from the repository root; with
``--quick`` it gets ``--quick`` too when it accepts that flag. Its standard output is kept in
``benchmarks/results/<name>.md``.

``docs/performance.md`` holds one block per benchmark between ``<!-- results:NAME -->`` and
``<!-- /results:NAME -->``; everything between the markers is replaced by, in order of preference:

1. the JSON's ``"table"`` (a markdown string);
2. the script's ``markdown(results) -> str`` function applied to the JSON;
3. the script's saved standard output (``results/<name>.md``, without ``wrote ...`` lines);
4. a note that there are no results yet.

followed by a line naming the machine from the JSON's ``"machine"`` when the table has none. The
``summary`` block lists the targets of the issue and whether the latest results meet them.

Run: ``python benchmarks/run_all.py [--quick] [--only overhead,merge_speed] [--docs-only]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOC = ROOT / "docs" / "performance.md"

#: Benchmarks in the order they run; any other script that writes results runs after them.
ORDER = (
    "overhead",
    "merge_speed",
    "memory",
    "plan_speed",
    "plan_batch_speed",
    "tiling_quality",
    "nvila_preprocess",
    "tokens_speed",
    "tokens_e2e",
)


def discover() -> list[str]:
    """Names of the benchmark scripts: known ones first, then any other that writes results."""
    names = []
    for path in sorted(HERE.glob("*.py")):
        if path.name.startswith("_") or path.stem == "run_all":
            continue
        source = path.read_text(encoding="utf-8")
        if path.stem in ORDER or "write_result(" in source or "results/" in source:
            names.append(path.stem)
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def run_one(name: str, *, quick: bool, timeout: float) -> dict[str, Any]:
    """Run ``benchmarks/<name>.py`` and keep its standard output."""
    script = HERE / f"{name}.py"
    cmd = [sys.executable, str(script)]
    if quick and '"--quick"' in script.read_text(encoding="utf-8"):
        cmd.append("--quick")
    print(f"==> {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        print(f"    {name}: timed out after {timeout:.0f} s", file=sys.stderr)
        return {"name": name, "ok": False, "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    if proc.returncode == 0:
        (RESULTS / f"{name}.md").write_text(proc.stdout, encoding="utf-8")
    else:
        sys.stderr.write(proc.stderr[-4000:])
    print(f"    {name}: exit {proc.returncode} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return {"name": name, "ok": proc.returncode == 0, "seconds": seconds}


def _load_json(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _module_markdown(name: str, data: dict[str, Any]) -> str | None:
    script = HERE / f"{name}.py"
    if not script.exists() or "def markdown(" not in script.read_text(encoding="utf-8"):
        return None
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", script)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return str(module.markdown(data))
    except Exception as err:  # a broken renderer must not stop the others
        print(f"    {name}: markdown() failed: {err!r}", file=sys.stderr)
        return None


def _machine_line(machine: Any) -> str:
    if not isinstance(machine, dict):
        return ""
    parts = [f"{k} {v}" for k, v in machine.items() if isinstance(v, str | int | float)]
    return "Machine: " + ", ".join(parts) + "."


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def generic_markdown(data: dict[str, Any], max_rows: int = 30) -> str:
    """Tables from any results JSON: lists of flat records, then the other scalar fields."""
    parts = []
    pairs = []
    for key, value in data.items():
        if key in ("machine", "table"):
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns = [k for k, v in value[0].items() if _scalar(v)]
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += [
                "| " + " | ".join(_cell(row.get(c)) for c in columns) + " |"
                for row in value[:max_rows]
            ]
            parts.append(f"`{key}`:\n\n" + "\n".join(lines))
        elif _scalar(value):
            pairs.append((key, value))
        elif isinstance(value, dict):
            pairs += [(f"{key}.{k}", v) for k, v in value.items() if _scalar(v)]
    if pairs:
        lines = ["| field | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in pairs[: 3 * max_rows]]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def render(name: str) -> str:
    """The markdown that goes between the markers of ``name``."""
    data = _load_json(name)
    text = None
    if data is not None:
        table = data.get("table")
        text = table if isinstance(table, str) else _module_markdown(name, data)
    if text is None:
        saved = RESULTS / f"{name}.md"
        if data is not None and saved.exists():
            lines = saved.read_text(encoding="utf-8").splitlines()
            text = "\n".join(line for line in lines if not line.startswith("wrote ")).strip()
    if not text and data is not None:
        text = generic_markdown(data)
    if not text:
        return f"*No results yet: run `python benchmarks/{name}.py`.*"
    if data is not None and "Machine:" not in text and "machine" in data:
        text += "\n\n" + _machine_line(data["machine"])
    return text.strip()


def _status(met: Any) -> str:
    return "—" if met is None else ("**met**" if met else "**not met**")


def summary() -> str:
    """Targets of the issue and the latest figures, from the JSON files present."""
    rows = []
    over = _load_json("overhead")
    if over:
        for r in over.get("results", []):
            if r.get("backbone") == "vit-s":
                targets = over.get("targets", {})
                paired = r.get("ratio_paired_median")
                latest = f"{r['ratio_from_split']:.3f} (from the split)"
                if paired is not None:
                    latest = f"{paired:.3f} (paired), " + latest
                status = (
                    "**borderline**" if targets.get("borderline") else _status(targets.get("met"))
                )
                rows.append(
                    ["overhead, ViT-S/16 width", "forward / backbone ≤ 1.05", latest, status]
                )
            elif r.get("backbone") == "tiny":
                rows.append(
                    [
                        "overhead, tiny conv backbone",
                        "report (true cost of tiling + merging)",
                        f"{r['ratio_paired_median'] or r['ratio_from_split']:.2f}",
                        "—",
                    ]
                )
    merge = _load_json("merge_speed")
    if merge:
        rows.append(
            [
                "merge `.pack()` vs loop + concatenation (SigLIP-so400m width, worst case)",
                f"≥ {merge.get('target_speedup', 5):g}x",
                f"{merge.get('speedup_packed', float('nan')):.2f}x",
                _status(merge.get("speedup_packed", 0) >= merge.get("target_speedup", 5)),
            ]
        )
        if "speedup_padded" in merge:
            target = merge.get("target_speedup_padded", 3)
            rows.append(
                [
                    "merge `.features` + mask vs loop + padding (worst case)",
                    f"≥ {target:g}x",
                    f"{merge['speedup_padded']:.2f}x",
                    _status(merge["speedup_padded"] >= target),
                ]
            )
        fractions = [f for c in merge.get("cases", []) for f in c["fraction_of_bound"].values()]
        if fractions:
            rows.append(
                [
                    "merge `.features` / `.pack()`, fraction of the fresh-output memory bound",
                    "≥ 0.6",
                    f"{min(fractions):.2f} (worst case)",
                    _status(min(fractions) >= 0.6),
                ]
            )
    tokens = _load_json("tokens_speed")
    for case in (tokens or {}).get("cases", []):
        for key, label in (("fresh", "fresh"), ("out", "`out=`")):
            target = tokens["targets"].get(f"{case['layout']} {case['dtype']} {key}")
            if target is not None:
                speed = case["speedup"][key]
                rows.append(
                    [
                        f"features → tokens vs VILA, {case['layout']} {case['dtype']}, {label}",
                        f"≥ {target:g}x",
                        f"{speed:.2f}x",
                        _status(speed >= target),
                    ]
                )
        for key, goal in (("fresh", 0.6), ("out", 0.7)):
            frac = case.get("fraction_of_bound", {}).get(key)
            if frac is not None:
                rows.append(
                    [
                        f"features → tokens, {case['layout']} {case['dtype']}, {key}: "
                        "fraction of the memory bound",
                        f"≥ {goal:g}",
                        f"{frac:.2f}",
                        _status(frac >= goal),
                    ]
                )
    tile = _load_json("tile_speed")
    if tile:
        rows.append(
            [
                "tile stage (uint8 → normalised tiles), fraction of the memory bound",
                "report",
                f"{tile['fraction_of_bound']:.2f} (resize {tile['resize_share']:.0%} of the time)",
                "—",
            ]
        )
    mem = _load_json("memory")
    if mem:
        rows.append(
            [
                "memory, 8 vs 64 images",
                "peak grows with the output only",
                f"Δpeak / Δoutput = {mem['growth']['peak_over_output']:.1f}",
                _status(mem.get("grows_with_output_only")),
            ]
        )
    big = _load_json("memory_big")
    if big:
        now, before = big["rows"]["256"], big["rows"]["none"]
        rows.append(
            [
                f"memory, one {big['side']}² uint8 image",
                "no full-size float copy (peak < 4x the uint8 image)",
                f"{now['peak_over_image']:.1f}x the image bytes ({before['peak_over_image']:.1f}x "
                "before)",
                _status(now["peak_over_image"] < 4 and now["checksum"] == before["checksum"]),
            ]
        )
    if not rows:
        return "*No results yet.*"
    header = "| benchmark | target | latest | status |\n|---|---|---|---|\n"
    return header + "\n".join("| " + " | ".join(r) + " |" for r in rows)


def update_doc(names: list[str], doc: Path = DOC) -> list[str]:
    """Replace every ``results:NAME`` block of ``doc``; returns the names updated."""
    text = doc.read_text(encoding="utf-8")
    found = re.findall(r"^<!-- results:([\w-]+) -->$", text, flags=re.MULTILINE)
    updated = []
    for name in dict.fromkeys([*found, *names]):
        pattern = re.compile(
            rf"^(<!-- results:{re.escape(name)} -->)$(.*?)^(<!-- /results:{re.escape(name)} -->)$",
            re.DOTALL | re.MULTILINE,
        )
        if not pattern.search(text):
            print(f"    {name}: no markers in {doc.name}, skipped", file=sys.stderr)
            continue
        body = summary() if name == "summary" else render(name)
        text = pattern.sub(lambda m, body=body: f"{m.group(1)}\n{body}\n{m.group(3)}", text)
        updated.append(name)
    doc.write_text(text, encoding="utf-8")
    return updated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick where accepted")
    parser.add_argument("--only", default=None, help="comma list of benchmark names")
    parser.add_argument("--docs-only", action="store_true", help="only regenerate the docs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    args = parser.parse_args(argv)
    names = discover()
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - set(names)
        if unknown:
            parser.error(f"unknown benchmarks {sorted(unknown)}; known: {names}")
        names = [n for n in names if n in wanted]
    failed = []
    if not args.docs_only:
        for name in names:
            if not run_one(name, quick=args.quick, timeout=args.timeout)["ok"]:
                failed.append(name)
    updated = update_doc(discover())
    print(f"updated {DOC.relative_to(ROOT)}: {', '.join(updated)}", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
