"""rvm_mobilenetv3: parity with the official RVM outputs, the torchvision -> timm key map, and the
call contract (layouts, sizes, errors)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from official_weights import make_state_dict

from binarize.models import create_model
from binarize.models.checkpoint import check_state_dict, load_official
from binarize.models.rvm import RobustVideoMatting

OUTPUTS = ["fgr", "pha", "r1", "r2", "r3", "r4"]


@pytest.fixture(scope="module")
def manifest(request):
    path = request.config.rootpath / "tests" / "fixtures" / "rvm_mobilenetv3_state_dict.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def official_model(manifest):
    model = RobustVideoMatting().eval()
    load_official(model, make_state_dict(manifest, seed=1))
    return model


def test_parity_with_official_outputs(official_model, fixtures_dir):
    data = np.load(fixtures_dir / "rvm_parity_seed1.npz")
    src, src2 = torch.from_numpy(data["src"]), torch.from_numpy(data["src2"])
    with torch.no_grad():
        full = official_model(src, downsample_ratio=1.0)
        following = official_model(src2, *full[2:], downsample_ratio=1.0)
        refined = official_model(src, downsample_ratio=float(data["downsample_ratio"]))
    for prefix, outputs in (("full", full), ("next", following), ("refined", refined)):
        assert len(outputs) == 6
        for name, value in zip(OUTPUTS, outputs):
            expected = torch.from_numpy(data[f"{prefix}_{name}"])
            assert value.shape == expected.shape, f"{prefix}_{name}"
            assert (value - expected).abs().max().item() <= 1e-4, f"{prefix}_{name}"


def test_key_map_consumes_every_official_key_and_fills_every_entry(manifest):
    model = RobustVideoMatting()
    official = make_state_dict(manifest, seed=3)
    mapped = model.map_official_state_dict(official)
    assert len(mapped) == len(official)  # the map is one to one
    assert set(mapped) == set(model.state_dict())
    check_state_dict(model, mapped, "seed 3")  # shapes agree too
    # values land where the structure says: stem, an SE block, the last 1x1 conv
    pairs = {
        "backbone.features.0.0.weight": "backbone.body.conv_stem.weight",
        "backbone.features.4.block.2.fc1.weight": "backbone.body.blocks.2.0.se.conv_reduce.weight",
        "backbone.features.13.block.1.0.weight": "backbone.body.blocks.5.0.conv_dw.weight",
        "backbone.features.16.1.running_var": "backbone.body.blocks.6.0.bn1.running_var",
        "decoder.decode0.conv.3.weight": "decoder.decode0.conv.3.weight",
    }
    for theirs, ours in pairs.items():
        assert torch.equal(mapped[ours], official[theirs])


def _torchvision_rvm_backbone():
    """The official RVM encoder layout built from torchvision (an independent reference)."""
    tv = pytest.importorskip("torchvision.models.mobilenetv3")
    cfg = tv.InvertedResidualConfig
    settings = [
        cfg(16, 3, 16, 16, False, "RE", 1, 1, 1), cfg(16, 3, 64, 24, False, "RE", 2, 1, 1),
        cfg(24, 3, 72, 24, False, "RE", 1, 1, 1), cfg(24, 5, 72, 40, True, "RE", 2, 1, 1),
        cfg(40, 5, 120, 40, True, "RE", 1, 1, 1), cfg(40, 5, 120, 40, True, "RE", 1, 1, 1),
        cfg(40, 3, 240, 80, False, "HS", 2, 1, 1), cfg(80, 3, 200, 80, False, "HS", 1, 1, 1),
        cfg(80, 3, 184, 80, False, "HS", 1, 1, 1), cfg(80, 3, 184, 80, False, "HS", 1, 1, 1),
        cfg(80, 3, 480, 112, True, "HS", 1, 1, 1), cfg(112, 3, 672, 112, True, "HS", 1, 1, 1),
        cfg(112, 5, 672, 160, True, "HS", 2, 2, 1), cfg(160, 5, 960, 160, True, "HS", 1, 2, 1),
        cfg(160, 5, 960, 160, True, "HS", 1, 2, 1),
    ]
    return tv.MobileNetV3(settings, last_channel=1280).features.eval()


@pytest.mark.parametrize("size", [(37, 53), (64, 48)])
def test_backbone_matches_torchvision_for_other_seeds_and_odd_sizes(manifest, size):
    features = _torchvision_rvm_backbone()
    official = make_state_dict(manifest, seed=7)
    features.load_state_dict({k[len("backbone.features."):]: v for k, v in official.items()
                              if k.startswith("backbone.features.")})
    model = RobustVideoMatting().eval()
    load_official(model, official)
    x = torch.rand(2, 3, *size)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = model.backbone(x)
        h, taps = (x - mean) / std, []
        for index, layer in enumerate(features):
            h = layer(h)
            if index in (1, 3, 6, 16):
                taps.append(h)
    for a, b in zip(ours, taps):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-4


def test_single_frame_layout_equals_one_step_sequence():
    model = create_model("rvm_mobilenetv3").eval()
    frame = torch.rand(2, 3, 45, 61)
    with torch.no_grad():
        single = model(frame, *[None] * 4)
        sequence = model(frame.unsqueeze(1))
    assert single[0].shape == (2, 3, 45, 61) and single[1].shape == (2, 1, 45, 61)
    for a, b in zip(single[:2], sequence[:2]):
        assert torch.equal(a, b.squeeze(1))
    for a, b in zip(single[2:], sequence[2:]):
        assert torch.equal(a, b)
    assert [r.shape[-2:] for r in single[2:]] == [(23, 31), (12, 16), (6, 8), (3, 4)]


def test_recurrence_is_equivalent_to_one_long_sequence():
    model = create_model("rvm_mobilenetv3").eval()
    clip = torch.rand(1, 4, 3, 32, 32)
    with torch.no_grad():
        whole = model(clip)
        first = model(clip[:, :2])
        second = model(clip[:, 2:], *first[2:])
    assert torch.allclose(whole[1][:, 2:], second[1], atol=1e-6)
    assert torch.allclose(whole[5], second[5], atol=1e-6)


def test_outputs_in_unit_range_and_segmentation_pass():
    model = create_model("rvm_mobilenetv3").eval()
    src = torch.rand(1, 2, 3, 40, 56)
    with torch.no_grad():
        fgr, pha, *rec = model(src, downsample_ratio=0.5)
        seg, *_ = model(src, segmentation_pass=True)
    assert fgr.shape == src.shape and pha.shape == (1, 2, 1, 40, 56)
    assert 0 <= fgr.min() and fgr.max() <= 1 and 0 <= pha.min() and pha.max() <= 1
    assert rec[0].shape == (1, 16, 10, 14)  # the network ran at half resolution
    assert seg.shape == (1, 2, 1, 40, 56)


@pytest.mark.parametrize(
    ("src", "ratio", "message"),
    [(torch.rand(1, 4, 8, 8), 1.0, "src must be"), (torch.rand(3, 8, 8), 1.0, "src must be"),
     (torch.rand(1, 3, 8, 8), 0.0, "downsample_ratio")],
)
def test_bad_input_is_a_clear_error(src, ratio, message):
    model = create_model("rvm_mobilenetv3")
    with pytest.raises(ValueError, match=message):
        model(src, downsample_ratio=ratio)
