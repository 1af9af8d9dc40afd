"""``benchmarks/gpu.py --smoke``: the GPU benchmark's code runs end to end (on the CPU, tiny sizes).

Only what the run computes is checked (its fused tokens equal VILA's path, every section is
there); no timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _deps import need

ROOT = Path(__file__).resolve().parent.parent

need("transformers")
need("PIL")


def test_gpu_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gpu_smoke.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["config"]["smoke"] is True
    assert [r["layout"] for r in data["features_to_tokens"]] == ["contiguous", "channel-major"]
    assert all(r["equal_to_vila"] for r in data["features_to_tokens"])
    assert set(data["end_to_end"]) >= {"plain", "chunked", "compiled"}
    plain = data["end_to_end"]["plain"]["paths"]
    assert set(plain) == {"dynamic_s2", "NVILA as shipped"}
    assert "features → tokens" in proc.stdout
