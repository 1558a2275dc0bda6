"""``binarize demo`` end to end at a tiny size, and the bundled checkpoint it relies on."""
from __future__ import annotations

import json

import av
import numpy as np
import pytest
from PIL import Image

from binarize.cli import demo
from binarize.cli.main import main


def count_frames(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_bundled_checkpoint_is_compact_bimatting():
    path = demo.bundled_checkpoint()
    assert path.is_file(), "the bundled demo checkpoint is missing"
    assert path.stat().st_size < 1_000_000
    from binarize.models.checkpoint import read_config

    assert read_config(path)["model"] == "bimatting"


def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--frames", "3", "--size", "64x48", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "fps" in printed and "MAD" in printed and "storage" in printed
    assert count_frames(out / "composite.mp4") == 3
    assert count_frames(out / "alpha.mp4") == 3
    assert Image.open(out / "side_by_side.png").size == (3 * 64, 48)
    assert sorted(p.name for p in (out / "input").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 3 and summary["fps"] > 0
    # the reported MAD is the one recomputed from the model's alpha on the same clip
    model, _ = demo.load_model(None)
    clip = demo.make_clip(3, (64, 48), demo.DEMO_SEED)
    pred = demo.predict_alpha(model, clip["src"], "cpu", 1.0)
    assert summary["pha_mad"] == pytest.approx(demo.score(pred, clip["pha"])["pha_mad"], rel=1e-6)
    assert summary["pha_mad"] == pytest.approx(np.abs(pred - clip["pha"]).mean() * 1e3, rel=1e-4)
    # a binarized model is cheaper than 32-bit RVM in computation and storage
    assert summary["ops_saving"] > 1 and summary["storage_saving"] > 1


def test_bundled_weights_are_trained_not_random():
    """The bundled weights come from ``binarize train`` (docs/matting.md records how well they do:
    on held-out clips they are no better than an all-background matte), so they must at least beat
    freshly initialised BiMatting weights on a held-out clip."""
    import torch

    from binarize.models import create_model

    model, _ = demo.load_model(None)
    torch.manual_seed(0)
    untrained = create_model("bimatting")
    clip = demo.make_clip(3, (128, 72), seed=777)  # a clip the training never saw
    ours = demo.score(demo.predict_alpha(model, clip["src"], "cpu", 1.0), clip["pha"])["pha_mad"]
    fresh = demo.score(demo.predict_alpha(untrained, clip["src"], "cpu", 1.0), clip["pha"])["pha_mad"]
    assert ours < fresh


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--size", "big"], "--size must look like WIDTHxHEIGHT"),
        (["--frames", "0"], "--frames must be >= 1"),
        (["--checkpoint", "nope.safetensors"], "checkpoint not found"),
    ],
)
def test_demo_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main(["demo", "--output", str(tmp_path / "o"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
