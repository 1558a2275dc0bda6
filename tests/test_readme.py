"""The README's Python example runs as written (at a smaller input size, to keep the suite fast)."""
from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0]
    assert "torch.randn(1, 3, 224, 224)" in code
    monkeypatch.chdir(tmp_path)  # the example writes a checkpoint into the working directory
    namespace: dict = {}
    exec(compile(code.replace("224, 224", "64, 64"), str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "computation saving" in printed and "storage saving" in printed
    assert (tmp_path / "resnet18_reactnet.safetensors").is_file()
    x = namespace["x"]
    binary, restored, fast = namespace["binary"].eval(), namespace["restored"].eval(), namespace["fast"]
    import torch

    with torch.no_grad():
        expected = binary(x)
        assert torch.equal(restored(x), expected)  # the compact checkpoint reloads exactly
        # the packed engine agrees up to float rounding of its fused epilogue (sign flips are rare)
        assert (fast(x) - expected).abs().mean() < 1e-2 * expected.abs().mean()
