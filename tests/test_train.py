"""The training recipe: configs, a short run (CSV + checkpoint), exact resume, DDP on 2 CPU processes."""
from __future__ import annotations

import csv
import hashlib
import math
import os
import pathlib
import signal
import subprocess
import sys
from typing import List, Optional

import pytest
import torch
import yaml
from torch import Tensor, nn

from binarize.matting import train as train_mod
from binarize.matting.train_config import CONFIG_DIR, DEFAULTS, load_config, validate_config
from binarize.matting.train_state import ResumableLoader, get_rng_state, load_checkpoint_file, set_rng_state

ROOT = pathlib.Path(__file__).resolve().parents[1]


class TinyMatting(nn.Module):
    """A minimal model following the matting contract, with the official part names.

    ``fgr, pha, *rec = model(src, *rec, downsample_ratio=..., return_aux=...)``; a BatchNorm makes
    the buffers matter for resume and DDP.
    """

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.aspp = nn.Conv2d(width, width, 1)
        self.decoder = nn.ModuleDict({"decode1": nn.Conv2d(width, width, 3, padding=1)})
        self.project_mat = nn.Conv2d(width, 4, 1)
        self.project_seg = nn.Conv2d(width, 1, 1)
        self.refiner = nn.Conv2d(4, 4, 1)

    def forward(self, src: Tensor, *rec: Optional[Tensor], downsample_ratio: float = 1.0,
                segmentation_pass: bool = False, return_aux: bool = False) -> List[Tensor]:
        b, t = src.shape[:2]
        x = src.flatten(0, 1)
        hid = self.decoder["decode1"](self.aspp(self.backbone(x)))
        if segmentation_pass:
            return [self.project_seg(hid).unflatten(0, (b, t)), None, None, None, None]
        out = self.project_mat(hid)
        if downsample_ratio != 1.0:
            out = self.refiner(out)
        fgr = (out[:, :3] + x).clamp(0, 1).unflatten(0, (b, t))
        pha = out[:, 3:].clamp(0, 1).unflatten(0, (b, t))
        outs = [fgr, pha]
        if return_aux:
            small = nn.functional.avg_pool2d(out, 4)
            outs += [small[:, :3].clamp(0, 1).unflatten(0, (b, t)), small[:, 3:].clamp(0, 1).unflatten(0, (b, t))]
        return outs + [None] * 4


TINY = "tests.test_train:TinyMatting"


def tiny_config(tmp_path: pathlib.Path, **run) -> dict:
    cfg = {
        "model": {"name": TINY},
        "data": {
            "dataset": "synthetic",
            "synthetic": {"clips": 4, "frames": 2, "size": [64, 64], "seed": 3},
            "num_workers": 0,
            "random_crop": False,
        },
        "optim": {"lr": {"backbone": 1e-3, "aspp": 2e-3, "decoder": 2e-3, "refiner": 0.0}, "scheduler": "cosine"},
        "schedule": {"epoch_end": 2, "steps_per_epoch": 2},
        "run": {"output_dir": str(tmp_path / "run"), "log_interval": 1, "checkpoint_interval": 100,
                "progress": False, **run},
    }
    return validate_config(cfg)


def weights_digest(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ configs


def test_shipped_configs_validate():
    names = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml"))
    for stage in range(1, 5):
        assert f"bimatting/stage{stage}.yaml" in names
        assert f"rvm/stage{stage}.yaml" in names
    assert "synthetic/bimatting.yaml" in names
    for name in names:
        cfg = load_config(name)
        assert cfg["model"]["name"]


def test_official_recipe_values():
    s1, s2, s3, s4 = (load_config(f"configs/bimatting/stage{i}.yaml") for i in range(1, 5))
    assert s1["optim"]["lr"] == {"backbone": 1e-4, "aspp": 2e-4, "decoder": 2e-4, "refiner": 0.0}
    assert (s1["data"]["seq_length_lr"], s1["schedule"]["epoch_start"], s1["schedule"]["epoch_end"]) == (15, 0, 20)
    assert s2["optim"]["lr"]["backbone"] == pytest.approx(s1["optim"]["lr"]["backbone"] / 2)
    assert s3["data"]["train_hr"] and s3["data"]["seq_length_hr"] == 6 and s3["data"]["downsample_ratio_hr"] == 0.25
    assert s4["data"]["dataset"] == "imagematte" and s4["optim"]["lr"]["refiner"] == 2e-4
    assert all(s["segmentation"]["enabled"] for s in (s1, s2, s3, s4))
    r2 = load_config("rvm/stage2.yaml")
    assert r2["data"]["seq_length_lr"] == 50 and r2["model"]["name"] == "rvm_mobilenetv3"


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda c: c["data"].update(dataset="imagenet"), "unknown dataset 'imagenet'"),
        (lambda c: c.pop("model"), "missing key model.name"),
        (lambda c: c["optim"]["lr"].pop("aspp"), "missing key optim.lr.aspp"),
        (lambda c: c["schedule"].pop("epoch_end"), "missing key schedule.epoch_end"),
        (lambda c: c["run"].update(bogus=1), "unknown key run.'bogus'"),
        (lambda c: c["run"].update(amp="fp8"), "run.amp must be one of"),
        (lambda c: c["schedule"].update(epoch_end=0), "epoch_end must be an integer greater"),
        (lambda c: c.setdefault("loss", {}).update(edge_weight=-0.5), "loss.edge_weight must be a number >= 0"),
        (lambda c: c.setdefault("loss", {}).update(edge_radius=1.5), "loss.edge_radius must be an integer >= 0"),
        (lambda c: c.setdefault("loss", {}).update(laplacian_weight=-1), "loss.laplacian_weight must be a number >= 0"),
        (lambda c: c.setdefault("loss", {}).update(coherence_weight="5"), "loss.coherence_weight must be a number >= 0"),
        (lambda c: c["optim"].update(freeze_batchnorm="yes"), "optim.freeze_batchnorm must be true or false"),
        (lambda c: c["optim"].update(freeze_binary_weights=1),
         "optim.freeze_binary_weights must be true, false or a list of top-level module names"),
        (lambda c: c["optim"].update(freeze_binary_weights=[]),
         "optim.freeze_binary_weights must be true, false or a list of top-level module names"),
        (lambda c: c["optim"].update(binary_lr_scale=0), "optim.binary_lr_scale must be a number > 0"),
        (lambda c: c["optim"].update(binary_lr_scale=True), "optim.binary_lr_scale must be a number > 0"),
        (lambda c: c.setdefault("distill", {}).update(teacher_precision="fp16"),
         "distill.teacher_precision must be one of"),
    ],
)
def test_config_errors_are_one_line(tmp_path, mutate, message):
    cfg = yaml.safe_load((CONFIG_DIR / "bimatting" / "stage1.yaml").read_text())
    cfg.pop("base", None)
    cfg = {**cfg, "data": dict(cfg.get("data", {}), dataset="videomatte")}
    cfg.setdefault("model", {"name": "bimatting"})
    cfg.setdefault("optim", {}).setdefault("lr", {"backbone": 1, "aspp": 1, "decoder": 1, "refiner": 1})
    cfg.setdefault("schedule", {}).setdefault("epoch_end", 1)
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_cli_reports_config_errors(tmp_path, capsys):
    from binarize.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: bimatting}\ndata: {dataset: kinetics}\nschedule: {epoch_end: 1}\n"
                   "optim: {lr: {backbone: 1, aspp: 1, decoder: 1, refiner: 1}}\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("binarize train: error: ")
    assert "unknown dataset 'kinetics'" in err[0]
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_defaults_cover_every_section():
    assert set(DEFAULTS) == {"model", "data", "segmentation", "optim", "loss", "distill", "schedule", "run"}


# ------------------------------------------------------------------ pieces


def test_param_groups_follow_the_official_split():
    model = TinyMatting()
    groups = train_mod.param_groups(model, {"backbone": 1.0, "aspp": 2.0, "decoder": 3.0, "refiner": 4.0},
                                    DEFAULTS["optim"]["groups"])
    by_name = {g["name"]: g for g in groups}
    assert by_name["decoder"]["lr"] == 3.0
    n_decoder = sum(p.numel() for p in by_name["decoder"]["params"])
    expected = sum(p.numel() for m in (model.decoder, model.project_mat, model.project_seg) for p in m.parameters())
    assert n_decoder == expected
    with pytest.raises(ValueError, match="in no optimizer group"):
        train_mod.param_groups(model, {"backbone": 1.0}, {"backbone": ["backbone"]})


def test_random_crop_is_multiple_of_16_between_half_and_full():
    import random

    random.seed(0)
    clip = torch.rand(1, 2, 3, 96, 160)
    for _ in range(10):
        (out,) = train_mod.random_crop(clip)
        h, w = out.shape[-2:]
        assert h % 16 == 0 and w % 16 == 0 and 48 - 16 < h <= 96 and 80 - 16 < w <= 160


def test_random_window_cuts_the_same_full_scale_window():
    import random

    random.seed(1)
    fgr = torch.arange(2 * 3 * 16 * 20, dtype=torch.float32).reshape(1, 2, 3, 16, 20)
    pha = fgr[:, :, :1] * 2
    out_fgr, out_pha = train_mod.random_window([8, 4], fgr, pha)
    assert out_fgr.shape == (1, 2, 3, 4, 8) and out_pha.shape == (1, 2, 1, 4, 8)
    torch.testing.assert_close(out_pha, out_fgr[:, :, :1] * 2)  # same window in both
    # a full-scale window: neighbouring pixels differ by exactly 1 as in the source
    assert torch.all(out_fgr[..., 1:] - out_fgr[..., :-1] == 1)
    with pytest.raises(ValueError, match="data.crop must be"):
        validate_config({"model": {"name": "x"}, "data": {"dataset": "synthetic", "crop": [64]},
                         "optim": {"lr": {}, "groups": {}}, "schedule": {"epoch_end": 1}})


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = get_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_resumable_loader_continues_where_it_stopped():
    data = torch.utils.data.TensorDataset(torch.arange(10).float())
    straight = ResumableLoader(data, 2, seed=1)
    seq = [straight.next()[0].tolist() for _ in range(8)]  # crosses an epoch boundary (5 batches/epoch)
    first = ResumableLoader(data, 2, seed=1)
    part = [first.next()[0].tolist() for _ in range(3)]
    second = ResumableLoader(data, 2, seed=1)
    second.load_state_dict(first.state_dict())
    part += [second.next()[0].tolist() for _ in range(5)]
    assert part == seq
    assert sorted(sum(seq[:5], [])) == list(range(10))  # one epoch sees every sample once
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableLoader(data, 4, world_size=3)


# ------------------------------------------------------------------ runs


def test_two_step_run_writes_csv_and_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=2)
    out = train_mod.train(cfg)
    rows = list(csv.DictReader(open(out / "scalars.csv")))
    assert {r["step"] for r in rows} == {"0", "1"}
    names = {r["name"] for r in rows}
    assert {"train_lr/total", "train_lr/pha_l1", "train_lr/aux_total"} <= names
    ckpt = load_checkpoint_file(out / "last.pt")  # weights_only=True inside
    assert ckpt["step"] == 2 and ckpt["epoch"] == 1
    assert (out / "epoch-0.pt").exists()
    model = TinyMatting()
    model.load_state_dict(ckpt["model"])
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    # losses are finite and the learning rate of the first group follows the cosine schedule
    assert all(torch.isfinite(torch.tensor(float(r["value"]))) for r in rows)


def test_resume_is_bitwise_exact(tmp_path):
    straight = train_mod.Trainer(tiny_config(tmp_path / "a"))
    straight.fit()
    expected = weights_digest(straight.model.state_dict())
    optim_expected = straight.optimizer.state_dict()

    half = train_mod.Trainer(tiny_config(tmp_path / "b", max_steps=2))
    half.fit()
    assert weights_digest(half.model.state_dict()) != expected
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    resumed = train_mod.Trainer(tiny_config(tmp_path / "b"), resume=str(tmp_path / "b" / "run"))
    assert resumed.step == 2
    resumed.fit()
    assert weights_digest(resumed.model.state_dict()) == expected
    got = resumed.optimizer.state_dict()
    for idx, st in optim_expected["state"].items():
        assert torch.equal(st["exp_avg"], got["state"][idx]["exp_avg"])
    assert resumed.scheduler.state_dict()["last_epoch"] == 4
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "b" / "run" / "scalars.csv"))]
    assert sorted(set(steps)) == [0, 1, 2, 3]


def test_resume_rejects_foreign_files(tmp_path):
    bogus = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError, match="not a binarize training checkpoint"):
        train_mod.Trainer(tiny_config(tmp_path), resume=str(bogus))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        train_mod.Trainer(tiny_config(tmp_path), resume=str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_two_process_gloo_ddp_run(tmp_path):
    cfg = {
        "model": {"name": TINY},
        "data": {"dataset": "synthetic", "synthetic": {"clips": 4, "frames": 2, "size": [64, 64]},
                 "num_workers": 0, "random_crop": False},
        "optim": {"lr": {"backbone": 1e-3, "aspp": 1e-3, "decoder": 1e-3, "refiner": 1e-3}},
        "schedule": {"epoch_end": 2},
        "run": {"output_dir": str(tmp_path / "ddp"), "log_interval": 1, "progress": False},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "binarize", "train", "--config", str(tmp_path / "tiny.yaml"), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    out = tmp_path / "ddp"
    ckpt = load_checkpoint_file(out / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # 4 clips over 2 processes, batch 1: 2 steps per epoch, 2 epochs
    assert ckpt["step"] == 4 and ckpt["steps_per_epoch"] == 2
    digests = ckpt["param_digests"]  # each rank hashes its own parameters at the checkpoint
    assert len(digests) == 2 and digests[0] == digests[1], "ranks ended with different weights"
    model = TinyMatting()
    model.load_state_dict(ckpt["model"])  # the saved weights are the ones both ranks hashed
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        h.update(name.encode())
        h.update(param.detach().contiguous().view(torch.uint8).numpy().tobytes())
    assert h.hexdigest() == digests[0]
    assert (out / "scalars.csv").exists()


def test_videomatte_layout_with_high_resolution_passes(tmp_path):
    from binarize.matting.data import write_synthetic

    root = write_synthetic(tmp_path / "vm", clips=2, frames=4, size=(96, 64), seed=1, eval_clips=0,
                           progress=False)
    cfg = validate_config({
        "model": {"name": TINY},
        "data": {"dataset": "videomatte",
                 "paths": {"videomatte": str(root / "train"), "background_images": str(root / "backgrounds/images"),
                           "background_videos": str(root / "backgrounds/videos")},
                 "resolution_lr": 64, "seq_length_lr": 3, "train_hr": True, "resolution_hr": 64,
                 "seq_length_hr": 2, "downsample_ratio_hr": 0.5, "num_workers": 0, "random_crop": False},
        "optim": {"lr": {"backbone": 1e-3, "aspp": 1e-3, "decoder": 1e-3, "refiner": 1e-2}},
        "schedule": {"epoch_end": 1},
        "run": {"output_dir": str(tmp_path / "run"), "log_interval": 1, "progress": False},
    })
    trainer = train_mod.Trainer(cfg)
    refiner_before = trainer.model.refiner.weight.detach().clone()
    trainer.fit()
    names = {r["name"] for r in csv.DictReader(open(tmp_path / "run" / "scalars.csv"))}
    assert {"train_lr/total", "train_hr/total"} <= names
    # only the high-resolution pass (downsample_ratio < 1) uses the refiner
    assert not torch.equal(trainer.model.refiner.weight, refiner_before)


def test_missing_dataset_folder_is_a_clear_error(tmp_path):
    cfg = validate_config({
        "model": {"name": TINY},
        "data": {"dataset": "videomatte", "paths": {"videomatte": str(tmp_path / "nope"),
                                                    "background_images": str(tmp_path),
                                                    "background_videos": str(tmp_path)}},
        "optim": {"lr": {"backbone": 1, "aspp": 1, "decoder": 1, "refiner": 1}},
        "schedule": {"epoch_end": 1},
    })
    with pytest.raises(FileNotFoundError, match="data.paths.videomatte is not a folder"):
        train_mod.Trainer(cfg)
    cfg["data"]["paths"].pop("background_videos")
    with pytest.raises(ValueError, match="needs data.paths.background_videos"):
        train_mod.Trainer(cfg)


def test_segmentation_pass_trains_the_segmentation_head(tmp_path):
    trainer = train_mod.Trainer(tiny_config(tmp_path))
    head_before = trainer.model.project_seg.weight.detach().clone()
    mat_before = trainer.model.project_mat.weight.detach().clone()
    img = torch.rand(2, 3, 64, 64)  # a batch of images (T = 1 clips after unsqueeze)
    seg = (torch.rand(2, 1, 64, 64) > 0.5).float()
    scalars = trainer.train_segmentation((img, seg), "seg_image")
    assert torch.isfinite(torch.tensor(scalars["seg_image/loss"]))
    assert not torch.equal(trainer.model.project_seg.weight, head_before)
    assert torch.equal(trainer.model.project_mat.weight, mat_before)


def test_edge_weight_adds_the_band_term_to_the_trained_loss(tmp_path):
    """loss.edge_weight reaches the trainer: the logged total carries losses.matting_loss's
    ``pha_edge_l1`` term, computed on the clip's ground truth."""
    from binarize.matting.data import SyntheticMatting

    cfg = tiny_config(tmp_path)
    cfg["loss"].update(edge_weight=2.0, edge_radius=1)
    trainer = train_mod.Trainer(cfg)
    batch = [torch.stack(t) for t in zip(*SyntheticMatting(clips=1, frames=2, size=(64, 64), seed=5))]
    scalars = trainer.train_matting(batch, 1.0, "lr")
    assert scalars["train_lr/pha_edge_l1"] > 0
    parts = [v for k, v in scalars.items() if k.startswith("train_lr/") and k not in ("train_lr/total",
                                                                                       "train_lr/aux_total")]
    assert scalars["train_lr/total"] == pytest.approx(sum(parts) + scalars.get("train_lr/aux_total", 0.0), rel=1e-5)


class TinyBinaryMatting(TinyMatting):
    """TinyMatting whose decoder conv is a binary layer (weights and activations 1-bit)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__(width)
        from binarize.nn import BinaryConv2d

        self.decoder["decode1"] = BinaryConv2d(width, width, 3, padding=1, method="reactnet")


def test_loss_weights_reach_the_trained_loss(tmp_path):
    """loss.laplacian_weight / loss.coherence_weight are what the trainer's logged terms use."""
    from binarize.matting.data import SyntheticMatting

    batch = [torch.stack(t) for t in zip(*SyntheticMatting(clips=1, frames=3, size=(64, 64), seed=5))]
    logged = {}
    for lap, coh in ((1.0, 5.0), (0.5, 1.0)):
        cfg = tiny_config(tmp_path)
        cfg["loss"].update(laplacian_weight=lap, coherence_weight=coh)
        torch.manual_seed(0)
        logged[lap] = train_mod.Trainer(cfg).train_matting(batch, 1.0, "lr")
    official, light = logged[1.0], logged[0.5]
    assert light["train_lr/pha_laplacian"] == pytest.approx(0.5 * official["train_lr/pha_laplacian"], rel=1e-5)
    assert light["train_lr/pha_coherence"] == pytest.approx(official["train_lr/pha_coherence"] / 5, rel=1e-5)
    assert light["train_lr/pha_l1"] == pytest.approx(official["train_lr/pha_l1"], rel=1e-6)


def test_frozen_binary_weights_and_batchnorm_train_only_what_inference_keeps(tmp_path):
    """optim.freeze_binary_weights keeps the binary layers' weights bit for bit while the
    full-precision ones learn; optim.freeze_batchnorm normalises with the running statistics in
    training (the training forward pass is the eval one) and never updates them."""
    from binarize.matting.data import SyntheticMatting

    cfg = tiny_config(tmp_path)
    cfg["optim"].update(freeze_binary_weights=True, freeze_batchnorm=True)
    torch.manual_seed(0)
    model = TinyBinaryMatting()
    trainer = train_mod.Trainer(cfg, model=model)
    binary = model.decoder["decode1"].weight.detach().clone()
    bn = model.backbone[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    float_before = [p.detach().clone() for p in (model.aspp.weight, model.project_mat.weight, bn.weight)]
    assert model.training and not bn.training
    assert not model.decoder["decode1"].weight.requires_grad
    src = torch.rand(1, 2, 3, 64, 64)
    with torch.no_grad():
        in_training = model(src)[1]
        model.eval()
        in_eval = model(src)[1]
        model.train()
        train_mod.freeze_batchnorm(model)
    torch.testing.assert_close(in_training, in_eval, rtol=0, atol=0)
    batch = [torch.stack(t) for t in zip(*SyntheticMatting(clips=2, frames=2, size=(64, 64), seed=5))]
    for _ in range(3):
        trainer.train_matting(batch, 1.0, "lr")
    assert torch.equal(model.decoder["decode1"].weight, binary)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2] and not bn.training
    assert all(not torch.equal(p, q) for p, q in zip((model.aspp.weight, model.project_mat.weight, bn.weight),
                                                      float_before))
    # without the options, both move
    torch.manual_seed(0)
    plain = TinyBinaryMatting()
    trainer = train_mod.Trainer(tiny_config(tmp_path / "plain"), model=plain)
    before = plain.decoder["decode1"].weight.detach().clone()
    trainer.train_matting(batch, 1.0, "lr")
    assert not torch.equal(plain.decoder["decode1"].weight, before)
    assert plain.backbone[1].training and int(plain.backbone[1].num_batches_tracked) == 1


def test_binary_weights_frozen_by_module_and_learning_at_a_scaled_rate(tmp_path):
    """optim.freeze_binary_weights: [aspp] keeps only the aspp's binary weights; binary_lr_scale
    gives the other binary weights a group of their own at the scaled rate, and they move by
    about that rate a step (Adam's first step is lr * sign(grad))."""
    from binarize.matting.data import SyntheticMatting
    from binarize.nn import BinaryConv2d

    cfg = tiny_config(tmp_path)
    cfg["optim"].update(freeze_binary_weights=["aspp"], binary_lr_scale=10.0, freeze_batchnorm=True)
    torch.manual_seed(0)
    model = TinyBinaryMatting()
    model.aspp = BinaryConv2d(4, 4, 1, method="reactnet")
    trainer = train_mod.Trainer(cfg, model=model)
    by_name = {g["name"]: g for g in trainer.optimizer.param_groups}
    lr = cfg["optim"]["lr"]["decoder"]
    assert by_name["decoder/binary"]["lr"] == pytest.approx(10 * lr)
    assert by_name["decoder"]["lr"] == pytest.approx(lr)
    assert [id(p) for p in by_name["decoder/binary"]["params"]] == [id(model.decoder["decode1"].weight)]
    assert not model.aspp.weight.requires_grad and "aspp/binary" not in by_name
    aspp, binary = model.aspp.weight.detach().clone(), model.decoder["decode1"].weight.detach().clone()
    batch = [torch.stack(t) for t in zip(*SyntheticMatting(clips=2, frames=2, size=(64, 64), seed=5))]
    trainer.train_matting(batch, 1.0, "lr")
    assert torch.equal(model.aspp.weight, aspp)
    step = (model.decoder["decode1"].weight - binary).abs()
    assert step.max() <= 10 * lr * 1.001 and step.max() > 5 * lr
    with pytest.raises(ValueError, match="has no top-level module 'neck'"):
        train_mod.freeze_binary_weights(TinyBinaryMatting(), ["neck"])
    # the default scale keeps one group per name (resumable optimizer state of older runs)
    names = [g["name"] for g in train_mod.param_groups(TinyBinaryMatting(), cfg["optim"]["lr"], cfg["optim"]["groups"])]
    assert len(names) == len(set(names)) and not any(n.endswith("/binary") for n in names)


@pytest.mark.parametrize("ste", [False, True])
def test_alpha_straight_through_keeps_outputs_and_revives_dead_alpha(tmp_path, ste):
    cfg = tiny_config(tmp_path)
    cfg["loss"]["alpha_ste"] = ste
    trainer = train_mod.Trainer(cfg)
    model = trainer.model
    with torch.no_grad():
        model.project_mat.bias[3] = -5.0  # every pixel's alpha clamps to 0: a dead start
    src = torch.rand(1, 2, 3, 64, 64)
    true_pha = torch.ones(1, 2, 1, 64, 64)
    reference = [o.detach().clone() for o in model(src)[:2]]
    trainer._alpha_ste = True  # as during a low-resolution pass
    fgr, pha = model(src)[:2]
    pha = trainer._straight_through(pha)
    trainer._alpha_ste = False
    # the forward pass is exactly inference's (BiMatting's incoherent mask reads alpha > 0 of it)
    torch.testing.assert_close(fgr, reference[0], rtol=0, atol=0)
    torch.testing.assert_close(pha, reference[1], rtol=0, atol=0)
    assert float(pha.detach().max()) == 0.0
    (pha - true_pha).abs().mean().backward()
    grad = model.project_mat.bias.grad[3]
    assert (grad != 0) if ste else (grad == 0)


def test_alpha_straight_through_keeps_bimatting_sparse_mask_as_in_inference(tmp_path):
    """With loss.alpha_ste the training forward of BiMatting equals its inference forward, so the
    incoherent mask of its coarse alpha is the same (a hook that clamped alpha into the open
    interval (0, 1) made every coarse pixel > 0 and the mask empty), and the aux alpha gets the
    identity gradient of the 1/16 head, the main alpha that of the full-size head."""
    from binarize.matting.data import SyntheticMatting

    cfg = tiny_config(tmp_path)
    cfg["model"] = {"name": "bimatting"}
    cfg["loss"] = {**cfg["loss"], "aux": True, "alpha_ste": True}
    trainer = train_mod.Trainer(validate_config(cfg))
    model = trainer.model.eval()
    fgr, pha, bgr = (t[None] for t in SyntheticMatting(clips=1, frames=2, size=(72, 40), seed=1)[0])
    src = fgr * pha + bgr * (1 - pha)
    with torch.no_grad():
        reference = model(src, return_aux=True)
    trainer._alpha_ste = True
    out = model(src, return_aux=True)
    sizes = [tuple(r.shape[-2:]) for r in trainer._raw_outputs]
    assert len(sizes) == 2 and sizes[0] == tuple(out[3].shape[-2:])  # the 1/16 head, then the full-size one
    assert sizes[1][0] >= 40 and sizes[1][1] >= 72  # (BiMatting pads a small input before its decoder)
    main, aux = trainer._straight_through(out[1]), trainer._straight_through(out[3])
    trainer._alpha_ste = False
    for got, want in zip(out[:4], reference[:4]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(main, out[1]) and torch.equal(aux, out[3])
    main.sum().backward(retain_graph=True)
    assert model.project_mat.conv.bias.grad[3] == pytest.approx(main.numel())  # d(raw)/d(bias) = 1 per pixel
    model.zero_grad()
    aux.sum().backward()
    assert model.project_mat.conv.bias.grad[3] == pytest.approx(aux.numel())


@pytest.mark.parametrize("localized", [False, True])
def test_distillation_from_a_full_precision_teacher(tmp_path, localized):
    """BiMatting student, RVM teacher (a compact checkpoint): the mimicking loss at the matched
    decoder stages is computed, logged, finite and positive."""
    import binarize
    from binarize.models import create_model

    teacher = create_model("rvm_mobilenetv3")
    teacher_path = binarize.save(teacher, tmp_path / "teacher.safetensors")
    cfg = tiny_config(tmp_path, max_steps=1)
    cfg["model"] = {**cfg["model"], "name": "bimatting"}
    cfg["loss"] = {**cfg["loss"], "aux": True}
    cfg["distill"] = {**cfg["distill"], "teacher": "rvm_mobilenetv3", "teacher_checkpoint": str(teacher_path),
                      "localized": localized, "weight": 1.0}
    out = train_mod.train(validate_config(cfg))
    rows = [r for r in csv.DictReader(open(out / "scalars.csv")) if r["name"].endswith("/distill")]
    assert rows and all(0 < float(r["value"]) < float("inf") for r in rows)


def test_full_precision_teacher_of_the_students_own_architecture(tmp_path):
    """``distill.teacher_precision: float``: a BiMatting trained with ``model.precision: float``
    teaches the binary BiMatting; the teacher runs as the float network it was trained as."""
    from binarize.matting.train_state import save_atomic
    from binarize.models import create_model
    from binarize.ops.binarizers import Identity

    float_net = create_model("bimatting")
    assert train_mod.set_precision(float_net, "float") > 0
    with torch.no_grad():
        for p in float_net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path = save_atomic({"format": train_mod.CHECKPOINT_FORMAT, "model": float_net.state_dict()}, tmp_path / "t.pt")
    cfg = tiny_config(tmp_path, max_steps=1)
    cfg["model"] = {**cfg["model"], "name": "bimatting"}
    cfg["distill"] = {**cfg["distill"], "teacher": "bimatting", "teacher_checkpoint": str(path),
                      "teacher_precision": "float"}
    trainer = train_mod.Trainer(validate_config(cfg))
    layers = [m for m in trainer.teacher.modules() if hasattr(m, "input_binarizer")]
    assert layers and all(isinstance(m.input_binarizer, Identity) and isinstance(m.weight_binarizer, Identity)
                          for m in layers)
    src = torch.rand(1, 2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(trainer.teacher(src)[1], float_net.eval()(src)[1])
    trainer.fit()
    rows = [r for r in csv.DictReader(open(trainer.output_dir / "scalars.csv")) if r["name"].endswith("/distill")]
    assert rows and all(0 < float(r["value"]) < float("inf") for r in rows)


def test_distillation_needs_a_teacher_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=1)
    cfg["distill"] = {**cfg["distill"], "teacher": "rvm_mobilenetv3", "teacher_checkpoint": None}
    with pytest.raises(ValueError, match="distillation needs a trained teacher"):
        train_mod.train(validate_config(cfg))


# ------------------------------------------------------------------ recipe options (issue 18)


def test_warmup_scales_the_learning_rate_linearly(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["optim"] = {**cfg["optim"], "scheduler": "constant", "warmup_steps": 4}
    trainer = train_mod.Trainer(validate_config(cfg))
    assert [trainer._lr_factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)  # step 0 already warms up
    cfg["optim"]["scheduler"] = "cosine"  # warm-up times the cosine decay over the 4-step stage
    trainer = train_mod.Trainer(validate_config(cfg))
    assert trainer._lr_factor(1) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="optim.warmup_steps must be an integer >= 0"):
        validate_config({**cfg, "optim": {**cfg["optim"], "warmup_steps": -1}})


@pytest.mark.parametrize("precision", ["float", "latent_weights"])
def test_precision_turns_binarizers_into_identities_and_keeps_names(precision):
    from binarize.nn import BinaryConv2d

    torch.manual_seed(0)
    layer = nn.Sequential(BinaryConv2d(4, 3, 3, padding=1, method="bimatting"))
    names = set(layer.state_dict())
    x = torch.randn(2, 4, 8, 8)
    assert train_mod.set_precision(layer, precision) == 1
    assert set(layer.state_dict()) == names  # so these weights initialise the binary model
    conv = layer[0]
    xb = x if precision == "float" else torch.sign(x)
    expected = nn.functional.conv2d(xb, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(layer(x), expected)
    assert train_mod.set_precision(layer, "binary") == 0
    with pytest.raises(ValueError, match="precision must be binary, latent_weights or float"):
        train_mod.set_precision(layer, "half")
    with pytest.raises(ValueError, match="model.precision must be one of"):
        validate_config({"model": {"name": "x", "precision": "fp"}, "data": {"dataset": "synthetic"},
                         "optim": {"lr": {"backbone": 1, "aspp": 1, "decoder": 1, "refiner": 0}},
                         "schedule": {"epoch_end": 1}})


def test_short_bimatting_run_learns_beyond_the_all_background_answer(tmp_path):
    """Seconds of training of BiMatting from scratch on two synthetic clips: the matting loss falls
    clearly, and the alpha becomes better than the all-zero (all-background) matte, which is where
    the bundled weights of the first recipe got stuck (docs/matting.md)."""
    from binarize.matting import losses
    from binarize.matting.data import SyntheticMatting

    cfg = tiny_config(tmp_path)
    cfg["model"] = {"name": "bimatting"}
    cfg["data"]["synthetic"] = {"clips": 2, "frames": 2, "size": [64, 64], "seed": 0}
    cfg["optim"] = {"lr": {"backbone": 2e-3, "aspp": 2e-3, "decoder": 2e-3, "refiner": 0.0}, "scheduler": "constant"}
    cfg["loss"] = {"aux": True, "alpha_ste": True}
    cfg["data"]["batch_size_per_gpu"] = 2  # both clips every step
    cfg["schedule"] = {"epoch_end": 1, "steps_per_epoch": 30}
    trainer = train_mod.Trainer(validate_config(cfg))
    clips = [torch.stack(t) for t in zip(*SyntheticMatting(clips=2, frames=2, size=(64, 64), seed=0))]
    fgr, pha, bgr = clips
    src = fgr * pha + bgr * (1 - pha)

    def alpha_l1() -> float:
        with torch.no_grad():
            pred = trainer.model(src)[1]
        return float((pred - pha).abs().mean())

    def matting_total() -> float:
        with torch.no_grad():
            out = trainer.model(src)
        return float(losses.matting_loss(out[0], out[1], fgr, pha)["total"])

    before, before_l1 = matting_total(), alpha_l1()
    trainer.fit()
    after, after_l1 = matting_total(), alpha_l1()
    zero_l1 = float(pha.mean())  # L1 of the all-zero alpha
    assert after < 0.5 * before, (before, after)
    assert after_l1 < 0.5 * zero_l1 < before_l1, (before_l1, after_l1, zero_l1)


def test_a_latent_weights_checkpoint_initialises_a_binary_model_with_stateful_binarizers():
    """Step 1 (``latent_weights``) drops the weight binarizers' own state (ReCU: ``alpha``, ``tau``);
    step 2's binary model still loads it (those start at their initial values), and any other
    missing key is still an error."""
    from binarize.models import create_model

    step1 = create_model("rvm_recu")
    assert train_mod.set_precision(step1, "latent_weights") > 0
    state = step1.state_dict()
    step2 = create_model("rvm_recu")
    assert any("weight_binarizer." in key for key in step2.state_dict()) and not any(
        "weight_binarizer." in key for key in state)
    train_mod._load_across_precisions(step2, state)
    for name, tensor in state.items():
        assert torch.equal(step2.state_dict()[name], tensor), name
    del state["project_mat.conv.weight"]
    with pytest.raises(RuntimeError, match="project_mat.conv.weight"):
        train_mod._load_across_precisions(step2, state)
