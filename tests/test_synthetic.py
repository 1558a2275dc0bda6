"""SyntheticMatting and `binarize data synth`: shapes, ranges, determinism, edges, written layout."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from binarize.cli.main import main
from binarize.matting import SyntheticMatting
from binarize.matting.data import composite, parse_size, write_synthetic
from binarize.matting.data.imageio import list_images, read_gray, read_rgb


@pytest.fixture(scope="module")
def clip():
    return SyntheticMatting(clips=3, frames=6, size=(80, 48), seed=5)[1]


def test_sample_format(clip):
    fgr, pha, bgr = clip
    assert fgr.shape == (6, 3, 48, 80) and bgr.shape == (6, 3, 48, 80) and pha.shape == (6, 1, 48, 80)
    for t in clip:
        assert t.dtype == torch.float32
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0


def test_alpha_has_soft_thin_and_opaque_regions(clip):
    _, pha, _ = clip
    assert (pha == 1).float().mean() > 0.05  # an opaque body
    assert (pha == 0).float().mean() > 0.2  # and background
    partial = ((pha > 0.02) & (pha < 0.98)).float().mean()
    assert partial > 0.01  # soft edges, hair and veil are fractional


def test_foreground_moves(clip):
    _, pha, _ = clip
    assert (pha[0] - pha[-1]).abs().mean() > 1e-3


def test_deterministic_by_seed_and_index():
    a = SyntheticMatting(clips=2, frames=3, size="40x24", seed=1)
    b = SyntheticMatting(clips=2, frames=3, size=(40, 24), seed=1)
    for x, y in zip(a[1], b[1]):
        assert torch.equal(x, y)
    assert not torch.equal(a[0][1], a[1][1])
    c = SyntheticMatting(clips=2, frames=3, size=(40, 24), seed=2)
    assert not torch.equal(a[0][1], c[0][1])
    evaluation = SyntheticMatting(clips=2, frames=3, size=(40, 24), seed=1, split="eval")
    assert not torch.equal(a[0][1], evaluation[0][1])
    assert torch.equal(a[-1][1], a[1][1])


def test_background_modes():
    still = SyntheticMatting(clips=2, frames=4, size=(40, 24), seed=0, background="static")
    moving = SyntheticMatting(clips=2, frames=4, size=(40, 24), seed=0, background="moving")
    for i in range(2):
        bgr = still[i][2]
        assert torch.equal(bgr[0], bgr[-1])
        assert moving.is_moving(i) and not still.is_moving(i)
        assert not torch.equal(moving[i][2][0], moving[i][2][-1])


def test_composite_formula(clip):
    fgr, pha, bgr = clip
    com = SyntheticMatting.composite(fgr, pha, bgr)
    assert torch.allclose(com, fgr * pha + bgr * (1 - pha))
    assert torch.equal(composite(fgr, pha, bgr), com)
    opaque = pha.expand_as(fgr) == 1
    assert torch.equal(com[opaque], fgr[opaque])


def test_parse_size_and_errors():
    assert parse_size("512x288") == (512, 288)
    assert parse_size(64) == (64, 64)
    assert parse_size((30, 20)) == (30, 20)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("512by288")
    with pytest.raises(ValueError, match="clips"):
        SyntheticMatting(clips=0)
    with pytest.raises(ValueError, match="background"):
        SyntheticMatting(background="sky")
    with pytest.raises(IndexError):
        SyntheticMatting(clips=1, frames=1, size=16)[3]


def test_write_layout_and_values(tmp_path):
    out = write_synthetic(tmp_path / "syn", clips=2, frames=3, size=(40, 24), seed=7, eval_clips=1,
                          motion_clips=1, progress=False)
    assert list_images(out / "train" / "fgr" / "0001") == ["0000.png", "0001.png", "0002.png"]
    assert list_images(out / "train" / "pha" / "0000") == ["0000.png", "0001.png", "0002.png"]
    assert list_images(out / "backgrounds" / "images") == ["0000.png", "0001.png"]
    assert len(list_images(out / "backgrounds" / "videos" / "0001")) == 3
    for dataset in ("videomatte_static", "videomatte_motion"):
        for kind in ("com", "fgr", "pha", "bgr"):
            assert len(list_images(out / "videomatte_40x24" / dataset / "0000" / kind)) == 3
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["size"] == [40, 24] and meta["clips"] == 2 and meta["seed"] == 7

    # the written frames are the generator's frames, 8-bit quantised
    fgr, pha, bgr = SyntheticMatting(2, 3, (40, 24), 7, split="train").generate(1)
    assert np.abs(read_gray(out / "train" / "pha" / "0001" / "0002.png") - pha[2, 0]).max() <= 0.5 / 255 + 1e-6
    assert np.abs(read_rgb(out / "train" / "fgr" / "0001" / "0000.png") - fgr[0].transpose(1, 2, 0)).max() \
        <= 0.5 / 255 + 1e-6
    sf, sp, sb = SyntheticMatting(1, 3, (40, 24), 7, background="static", split="eval").generate(0)
    com = read_rgb(out / "videomatte_40x24" / "videomatte_static" / "0000" / "com" / "0001.png")
    expected = (sf[1] * sp[1] + sb[1] * (1 - sp[1])).transpose(1, 2, 0)
    assert np.abs(com - expected).max() <= 0.5 / 255 + 1e-6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left over


def test_write_refuses_existing_output(tmp_path):
    (tmp_path / "syn").mkdir()
    (tmp_path / "syn" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        write_synthetic(tmp_path / "syn", clips=1, frames=1, size=16, progress=False)
    assert (tmp_path / "syn" / "keep.txt").exists()
    write_synthetic(tmp_path / "syn", clips=1, frames=1, size=16, overwrite=True, progress=False)
    assert not (tmp_path / "syn" / "keep.txt").exists()
    assert (tmp_path / "syn" / "synthetic.json").exists()


def test_cli_synth(tmp_path, capsys):
    code = main(["data", "synth", str(tmp_path / "d"), "--clips", "1", "--frames", "2", "--size", "32x16",
                 "--seed", "3", "--format", "jpg", "--no-progress"])
    assert code == 0
    assert list_images(tmp_path / "d" / "train" / "pha" / "0000") == ["0000.jpg", "0001.jpg"]
    assert len(list_images(tmp_path / "d" / "videomatte_32x16" / "videomatte_static" / "0000" / "pha")) == 2
    assert "videomatte_32x16" in capsys.readouterr().out
    assert main(["data", "synth", str(tmp_path / "e"), "--size", "big"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_transform_applies_to_items():
    from binarize.matting.data import MotionAugmentation

    ds = SyntheticMatting(clips=1, frames=3, size=(40, 24), seed=0, transform=MotionAugmentation.valid((12, 12)))
    fgr, pha, bgr = ds[0]
    assert fgr.shape == (3, 3, 12, 12) and pha.shape == (3, 1, 12, 12) and bgr.shape == (3, 3, 12, 12)
    assert ds.generate(0)[1].shape == (3, 1, 24, 40)


def test_subject_looks_unlike_its_background():
    """A person-like subject in focus before a defocused backdrop: inside the opaque body the
    foreground has much more fine detail (mean |Laplacian|) than the background."""
    from scipy import ndimage

    data = SyntheticMatting(clips=8, frames=1, size=(128, 72), seed=3)
    ratios = []
    for i in range(len(data)):
        fgr, pha, bgr = data.generate(i)
        inside = ndimage.binary_erosion(pha[0, 0] == 1, iterations=2)
        detail = [np.abs(ndimage.laplace(x.mean(0))) for x in (fgr[0], bgr[0])]
        ratios.append(detail[0][inside].mean() / detail[1].mean())
    assert np.median(ratios) > 3, ratios
