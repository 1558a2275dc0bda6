"""Datasets in the official layouts (written to tmp dirs) and the RVM-style augmentation."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from binarize.matting.data import (
    BackgroundImageDataset,
    BackgroundVideoDataset,
    CocoPanopticDataset,
    ImageMatteDataset,
    MotionAugmentation,
    SegmentationAugmentation,
    SuperviselyPersonDataset,
    TrainFrameSampler,
    ValidFrameSampler,
    VideoMatteDataset,
    VideoMatteTrainAugmentation,
    YouTubeVISDataset,
    build_segmentation_datasets,
    build_train_dataset,
    write_synthetic,
)
from binarize.matting.data import augment as A
from binarize.matting.data.segmentation import decode_rle
from binarize.matting.data.synthetic import SyntheticMatting

H, W = 12, 16


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _frame(value: int, channels: int = 3) -> np.ndarray:
    shape = (H, W, channels) if channels == 3 else (H, W)
    return np.full(shape, value, np.uint8)


@pytest.fixture
def layout(tmp_path):
    """VideoMatte (2 clips x 5 frames), ImageMatte (2 roots), background images and a background video."""
    for c in range(2):
        for t in range(5):
            _save(tmp_path / "vm" / "fgr" / f"{c:04d}" / f"{t:05d}.png", _frame(10 * t + c))
            _save(tmp_path / "vm" / "pha" / f"{c:04d}" / f"{t:05d}.png", _frame(20 * t + 100 * c, 1))
    for root, names in (("d646", ["a.png", "b.png"]), ("aim", ["c.png"])):
        for i, name in enumerate(names):
            _save(tmp_path / root / "fgr" / name, _frame(50 + i))
            _save(tmp_path / root / "pha" / name, _frame(200 + i, 1))
    for i in range(4):
        _save(tmp_path / "bgi" / f"{i}.png", _frame(7))
    for t in range(6):
        _save(tmp_path / "bgv" / "clip" / f"{t:04d}.png", _frame(9))
    (tmp_path / "bgi" / ".DS_Store").write_text("ignored")
    return tmp_path


def test_videomatte_exact_frames(layout):
    ds = VideoMatteDataset(layout / "vm", layout / "bgi", layout / "bgv", size=(H, W), seq_length=3)
    assert len(ds) == 4  # starts 0 and 3 in each clip (RVM indexing)
    fgr, pha, bgr = ds[1]  # clip 0 from frame 3: frames 3, 4, 0 (wraps around)
    assert fgr.shape == (3, 3, H, W) and pha.shape == (3, 1, H, W) and bgr.shape == (3, 3, H, W)
    np.testing.assert_allclose(fgr[:, 0, 0, 0].numpy(), np.array([30, 40, 0]) / 255, atol=1e-6)
    np.testing.assert_allclose(pha[:, 0, 0, 0].numpy(), np.array([60, 80, 0]) / 255, atol=1e-6)
    assert set(np.unique(np.round(bgr.numpy() * 255))) <= {7.0, 9.0}
    fgr, pha, _ = ds[2]  # clip 1 from frame 0
    np.testing.assert_allclose(pha[:, 0, 0, 0].numpy(), np.array([100, 120, 140]) / 255, atol=1e-6)


def test_videomatte_train_augmentation_shapes_and_range(layout):
    random.seed(1)
    torch.manual_seed(1)
    ds = VideoMatteDataset(layout / "vm", layout / "bgi", None, size=(8, 10), seq_length=4,
                           seq_sampler=TrainFrameSampler(), transform=VideoMatteTrainAugmentation((8, 10)))
    for i in range(len(ds)):
        for tensor, channels in zip(ds[i], (3, 1, 3)):
            assert tensor.shape == (4, channels, 8, 10)
            assert tensor.min() >= 0 and tensor.max() <= 1


def test_videomatte_errors(layout):
    _save(layout / "only_fgr" / "fgr" / "0000" / "0000.png", _frame(1))
    with pytest.raises(FileNotFoundError, match="no pha/"):
        VideoMatteDataset(layout / "only_fgr", layout / "bgi")
    (layout / "vm" / "pha" / "0001" / "00004.png").unlink()
    with pytest.raises(ValueError, match="no alpha for"):
        VideoMatteDataset(layout / "vm", layout / "bgi")
    _save(layout / "vm" / "pha" / "0001" / "00004.png", _frame(0, 1))
    with pytest.raises(ValueError, match="background_image_dir or background_video_dir"):
        VideoMatteDataset(layout / "vm", None, None)


def test_imagematte_two_roots(layout):
    ds = ImageMatteDataset([layout / "d646", layout / "aim"], layout / "bgi", layout / "bgv", size=(H, W),
                           seq_length=2, transform=MotionAugmentation.valid((H, W)))
    assert len(ds) == max(3, 4 + 1)
    fgr, pha, bgr = ds[2]  # the AIM image
    assert torch.equal(fgr[0], fgr[1])
    np.testing.assert_allclose(float(fgr[0, 0, 0, 0]), 50 / 255, atol=1e-6)
    np.testing.assert_allclose(float(pha[1, 0, 5, 5]), 200 / 255, atol=1e-6)
    assert ds[3][1].shape == (2, 1, H, W)  # wraps around the mattes


def test_background_datasets(layout, tmp_path):
    _save(tmp_path / "big" / "x.png", np.zeros((40, 80, 3)))
    big = BackgroundImageDataset(tmp_path / "big", short_side=20)
    assert big[0].shape == (3, 20, 40)
    videos = BackgroundVideoDataset(layout / "bgv", seq_length=4)
    assert len(videos) == 1 and videos[0].shape == (4, 3, H, W)
    assert videos.frames(0, [0, 5, 6]).shape == (3, 3, H, W)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no background images"):
        BackgroundImageDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        BackgroundVideoDataset(tmp_path / "missing")


def test_synthetic_written_layout_reads_back(tmp_path):
    out = write_synthetic(tmp_path / "syn", clips=2, frames=4, size=(24, 16), seed=2, eval_clips=0, progress=False)
    ds = VideoMatteDataset(out / "train", out / "backgrounds" / "images", out / "backgrounds" / "videos",
                           size=(16, 24), seq_length=4)
    _, pha, _ = ds[1]
    _, true_pha, _ = SyntheticMatting(2, 4, (24, 16), 2).generate(1)
    assert np.abs(pha.numpy() - true_pha).max() <= 0.5 / 255 + 1e-6


# ----------------------------------------------------------------------------- segmentation


def _encode_rle_string(counts):
    """COCO's compressed RLE string (the inverse of pycocotools' rleFrString), for tests."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _rle_counts(mask: np.ndarray):
    flat = mask.T.ravel()  # column-major
    counts, value, run = [], False, 0
    for v in flat:
        if bool(v) != value:
            counts.append(run)
            value, run = not value, 0
        run += 1
    counts.append(run)
    return counts


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.data())
def test_rle_round_trip(h, w, data):
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))).reshape(h, w)
    counts = _rle_counts(mask)
    assert np.array_equal(decode_rle({"size": [h, w], "counts": counts}), mask)
    assert np.array_equal(decode_rle({"size": [h, w], "counts": _encode_rle_string(counts)}), mask)


def _write_coco(tmp_path):
    ids = np.zeros((H, W), np.int64)
    ids[:4] = 5  # person
    ids[4:6] = 300  # tie (id needs the G channel)
    ids[6:8] = 7  # car
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1)
    _save(tmp_path / "ann" / "img1.png", rgb)
    _save(tmp_path / "img" / "img1.jpg", _frame(128))
    anns = {"annotations": [
        {"file_name": "img1.png", "segments_info": [{"id": 5, "category_id": 1}, {"id": 300, "category_id": 32},
                                                    {"id": 7, "category_id": 3}]},
        {"file_name": "img2.png", "segments_info": [{"id": 7, "category_id": 3}]},
    ]}
    (tmp_path / "ann.json").write_text(json.dumps(anns))


def test_coco_panoptic(tmp_path):
    _write_coco(tmp_path)
    ds = CocoPanopticDataset(tmp_path / "img", tmp_path / "ann", tmp_path / "ann.json", size=(H, W))
    assert len(ds) == 1  # the image without a person is skipped
    img, seg = ds[0]
    assert img.shape == (1, 3, H, W) and seg.shape == (1, 1, H, W)
    assert torch.equal(seg[0, 0, :, 0], torch.tensor([1.0] * 6 + [0.0] * 6))
    random.seed(0)
    img, seg = CocoPanopticDataset(tmp_path / "img", tmp_path / "ann", tmp_path / "ann.json",
                                   transform=SegmentationAugmentation.coco_train((8, 8)))[0]
    assert img.shape == (1, 3, 8, 8) and set(seg.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoPanopticDataset(tmp_path / "img", tmp_path / "ann", tmp_path / "nope.json")


def test_supervisely_person(tmp_path):
    mask = np.zeros((H, W), np.uint8)
    mask[:, :5] = 255
    _save(tmp_path / "img" / "a.png", _frame(3))
    _save(tmp_path / "seg" / "a.png", mask)
    img, seg = SuperviselyPersonDataset(tmp_path / "img", tmp_path / "seg", size=(H, W))[0]
    assert img.shape == (1, 3, H, W)
    assert torch.equal(seg[0, 0], torch.from_numpy(mask > 0).float())
    _save(tmp_path / "img" / "b.png", _frame(3))
    with pytest.raises(ValueError, match="2 images .* but 1 masks"):
        SuperviselyPersonDataset(tmp_path / "img", tmp_path / "seg")


def _write_youtubevis(tmp_path):
    masks = []
    for t in range(3):
        m = np.zeros((H, W), bool)
        m[t:t + 4, 2:6] = True
        masks.append(m)
        _save(tmp_path / "videos" / "v1" / f"{t:05d}.jpg", _frame(40 * t))
    ann = {
        "videos": [{"id": 1, "file_names": [f"v1/{t:05d}.jpg" for t in range(3)], "height": H, "width": W},
                   {"id": 2, "file_names": ["v2/00000.jpg"], "height": H, "width": W}],
        "annotations": [
            {"video_id": 1, "category_id": 26,
             "segmentations": [{"size": [H, W], "counts": _rle_counts(m)} for m in masks]},
            {"video_id": 1, "category_id": 26, "segmentations": [None, None,
                                                                  {"size": [H, W], "counts": _encode_rle_string(
                                                                      _rle_counts(np.eye(H, W, dtype=bool)))}]},
            {"video_id": 2, "category_id": 3, "segmentations": [None]},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return masks


def test_youtubevis(tmp_path):
    masks = _write_youtubevis(tmp_path)
    ds = YouTubeVISDataset(tmp_path / "videos", tmp_path / "ann.json", size=(H, W), seq_length=2)
    assert len(ds) == 3  # video 2 has no person
    img, seg = ds[1]  # frames 1, 2
    assert img.shape == (2, 3, H, W) and seg.shape == (2, 1, H, W)
    assert torch.equal(seg[0, 0].bool(), torch.from_numpy(masks[1]))
    assert torch.equal(seg[1, 0].bool(), torch.from_numpy(masks[2] | np.eye(H, W, dtype=bool)))
    random.seed(3)
    img, seg = YouTubeVISDataset(tmp_path / "videos", tmp_path / "ann.json", seq_length=3,
                                 seq_sampler=TrainFrameSampler(),
                                 transform=SegmentationAugmentation.youtubevis_train((8, 8)))[0]
    assert img.shape == (3, 3, 8, 8) and seg.shape == (3, 1, 8, 8)


# ----------------------------------------------------------------------------- augmentation primitives


def test_affine_identity_translation_rotation():
    x = torch.rand(2, 3, 9, 11)
    assert torch.allclose(A.affine(x, [(0.0, (0.0, 0.0), 1.0, (0.0, 0.0))] * 2), x, atol=1e-5)
    dot = torch.zeros(1, 1, 9, 11)
    dot[0, 0, 4, 3] = 1
    moved = A.affine(dot, [(0.0, (3.0, -2.0), 1.0, (0.0, 0.0))])
    assert moved[0, 0, 2, 6] == pytest.approx(1.0, abs=1e-5)  # x + 3, y - 2
    square = torch.zeros(1, 1, 9, 9)
    square[0, 0, 4, 6] = 1  # right of the centre
    turned = A.affine(square, [(90.0, (0.0, 0.0), 1.0, (0.0, 0.0))])
    assert turned[0, 0, 6, 4] == pytest.approx(1.0, abs=1e-5)  # clockwise on screen: now below the centre


@pytest.mark.parametrize("params", [(12.0, (3.0, -2.0), 1.1, (4.0, 0.0)), (-7.0, (0.0, 5.0), 0.9, (-3.0, 2.0))])
def test_affine_matches_torchvision(params):
    """RVM calls torchvision's F.affine; ours must mean the same transform for the same parameters."""
    TF = pytest.importorskip("torchvision.transforms.functional")
    x = torch.rand(2, 3, 16, 20)
    angle, translate, scale, shear = params
    expected = TF.affine(x, angle=angle, translate=list(translate), scale=scale, shear=list(shear),
                         interpolation=TF.InterpolationMode.BILINEAR)
    assert torch.allclose(A.affine(x, [params] * 2), expected, atol=1e-5)


def test_colour_ops_match_torchvision():
    TF = pytest.importorskip("torchvision.transforms.functional")
    x = torch.rand(2, 3, 10, 12)
    for f in (-0.3, 0.1, 0.45):
        assert torch.allclose(A.adjust_hue(x, f), TF.adjust_hue(x, f), atol=1e-5)
    for f in (0.5, 1.7):
        assert torch.allclose(A.adjust_sharpness(x, f), TF.adjust_sharpness(x, f), atol=1e-6)
        assert torch.allclose(A.adjust_saturation(x, f), TF.adjust_saturation(x, f), atol=1e-3)
        assert torch.allclose(A.adjust_contrast(x, f), TF.adjust_contrast(x, f), atol=1e-3)
    assert torch.allclose(A.gaussian_blur(x, 7, 2.0), TF.gaussian_blur(x, 7, 2.0), atol=1e-6)


@pytest.mark.parametrize("name", sorted(A.EASINGS))
def test_easing_endpoints(name):
    fn = A.EASINGS[name]
    assert fn(0.0) == pytest.approx(0.0, abs=1e-9) and fn(1.0) == pytest.approx(1.0, abs=1e-9)
    assert all(np.isfinite(fn(t)) for t in np.linspace(0, 1, 11))


def test_colour_ops():
    x = torch.rand(2, 3, 5, 6)
    assert torch.allclose(A.adjust_hue(x, 0.0), x, atol=1e-5)
    assert torch.allclose(A.adjust_hue(A.adjust_hue(x, 0.25), -0.25), x, atol=1e-4)
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 1
    green = A.adjust_hue(red, 1 / 3)
    assert torch.allclose(green.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)
    assert torch.allclose(A.adjust_sharpness(x, 1.0), x)
    assert torch.allclose(A.adjust_saturation(x, 1.0), x)
    gray = A.rgb_to_grayscale(x)
    assert torch.allclose(A.rgb_to_grayscale(gray), gray, atol=1e-6)
    assert torch.allclose(A.gaussian_blur(torch.full((1, 3, 8, 8), 0.4), 5, 1.3), torch.full((1, 3, 8, 8), 0.4))
    assert torch.allclose(A.adjust_contrast(x, 0.0), A.rgb_to_grayscale(x)[:, :1].mean((1, 2, 3), keepdim=True)
                          .expand_as(x), atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.integers(4, 60), st.integers(4, 60), st.floats(0.3, 1.0), st.integers(0, 1000))
def test_resized_crop_params_inside(h, w, scale, seed):
    top, left, ch, cw = A.random_resized_crop_params(random.Random(seed), h, w, (scale, 1.0), (0.75, 1.33))
    assert 0 <= top and 0 <= left and top + ch <= h and left + cw <= w and ch > 0 and cw > 0


def test_frame_samplers():
    rng = random.Random(0)
    sampler = TrainFrameSampler(rng=rng)
    for _ in range(20):
        frames = sampler(5)
        ordered = sorted(frames)
        steps = {b - a for a, b in zip(ordered, ordered[1:])}
        assert len(frames) == 5 and len(steps) <= 2 and min(frames) < 5  # speed x, shift < length
    assert ValidFrameSampler()(4) == [0, 1, 2, 3]


def test_motion_augmentation_deterministic_and_bounded():
    fgr, pha, bgr = torch.rand(6, 3, 20, 30), torch.rand(6, 1, 20, 30), torch.rand(6, 3, 24, 24)
    everything = dict(prob_fgr_affine=1, prob_bgr_affine=1, prob_noise=1, prob_color_jitter=1, prob_grayscale=0.5,
                      prob_sharpness=1, prob_blur=1, prob_hflip=0.5, prob_pause=1)
    a = MotionAugmentation((10, 12), **everything, rng=random.Random(4))(fgr, pha, bgr)
    b = MotionAugmentation((10, 12), **everything, rng=random.Random(4))(fgr, pha, bgr)
    for x, y, c in zip(a, b, (3, 1, 3)):
        assert torch.equal(x, y) and x.shape == (6, c, 10, 12)
        assert x.min() >= 0 and x.max() <= 1


def test_valid_augmentation_is_a_centre_crop():
    fgr = torch.rand(2, 3, 10, 20)
    out, _, _ = MotionAugmentation.valid((10, 10))(fgr, fgr[:, :1], fgr)
    assert torch.equal(out, fgr[..., 5:15])


def test_pause_freezes_frames():
    aug = MotionAugmentation(4, rng=random.Random(0))
    clip = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()
    for _ in range(10):
        (out,) = aug._pause(clip)
        values = out[:, 0, 0, 0].tolist()
        assert values == sorted(values) and set(values) <= set(range(8)) and values[0] == 0


def test_builders(layout):
    random.seed(0)
    paths = {"videomatte": layout / "vm", "imagematte": [layout / "d646", layout / "aim"],
             "background_images": layout / "bgi", "background_videos": layout / "bgv"}
    for name in ("videomatte", "imagematte"):
        fgr, pha, bgr = build_train_dataset(name, paths, size=8, seq_length=3)[0]
        assert fgr.shape == (3, 3, 8, 8) and pha.shape == (3, 1, 8, 8) and bgr.shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match="needs paths.videomatte"):
        build_train_dataset("videomatte", {"background_images": layout / "bgi"}, size=8, seq_length=3)
    _write_coco(layout / "coco")
    _write_youtubevis(layout / "vis")
    seg_paths = {"youtubevis": {"videodir": layout / "vis" / "videos", "annfile": layout / "vis" / "ann.json"},
                 "coco_panoptic": {"imgdir": layout / "coco" / "img", "anndir": layout / "coco" / "ann",
                                   "annfile": layout / "coco" / "ann.json"}}
    video_set, image_set = build_segmentation_datasets(seg_paths, size=8, seq_length=2)
    img, seg = video_set[0]
    assert img.shape == (2, 3, 8, 8) and seg.shape == (2, 1, 8, 8)
    img, seg = image_set[0]
    assert img.shape == (1, 3, 8, 8) and seg.shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="coco_panoptic or paths.spd"):
        build_segmentation_datasets({"youtubevis": seg_paths["youtubevis"]}, size=8, seq_length=2)


def test_datasets_pickle_for_spawned_workers(layout):
    import pickle

    ds = VideoMatteDataset(layout / "vm", layout / "bgi", layout / "bgv", size=8, seq_length=2,
                           seq_sampler=TrainFrameSampler(), transform=VideoMatteTrainAugmentation(8))
    clone = pickle.loads(pickle.dumps(ds))
    random.seed(5)
    a = clone[0]
    random.seed(5)
    b = ds[0]
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    pickle.dumps(SegmentationAugmentation.coco_train(8))


def _write_video(path, values, size=(32, 24)):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for v in values:
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), v, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_background_video_files(layout):
    _write_video(layout / "bgv" / "movie.mp4", [40, 80, 120, 160, 200])
    (layout / "bgv" / "notes.txt").write_text("not a video")
    videos = BackgroundVideoDataset(layout / "bgv", seq_length=3, short_side=12)
    assert videos.clips == ["clip", "movie.mp4"]
    assert videos.frame_count(1) == 5
    frames = videos.frames(1, [0, 1, 2], start=3)  # frames 3, 4, 0 (wraps around)
    assert frames.shape == (3, 3, 12, 16)
    np.testing.assert_allclose(frames.mean(dim=(1, 2, 3)).numpy(), np.array([160, 200, 40]) / 255, atol=6 / 255)
    (layout / "bgv" / "broken.mp4").write_bytes(b"\x00" * 64)
    broken = BackgroundVideoDataset(layout / "bgv")
    with pytest.raises(ValueError, match="cannot read background video .*broken.mp4"):
        broken.frames(broken.clips.index("broken.mp4"), [0])
