"""``binarize profile`` CLI: tables, JSON, model specs, inputs and errors."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from binarize.cli.main import main
from binarize.cli.profile import parse_resolution, synthetic_frame, synthetic_person
from binarize.convert import convert
from binarize.profile import profile


def run_cli(capsys, *argv: str):
    code = main(["profile", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_timm_json_matches_library(capsys) -> None:
    code, out, _ = run_cli(capsys, "timm:resnet18", "--method", "bnn", "--resolution", "48x32", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["baseline"] == "timm:resnet18"
    float_row, binary_row = data["models"]
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    x = torch.randn(1, 3, 32, 48)
    expected_float = profile(model, x)
    expected_binary = profile(convert(model, "bnn"), x)
    assert float_row["flops"] == expected_float.flops and float_row["input_shapes"] == [[1, 3, 32, 48]]
    assert binary_row["model"] == "timm:resnet18 [bnn]"
    assert binary_row["bops"] == expected_binary.bops and binary_row["flops"] == expected_binary.flops
    assert binary_row["binary_params"] == expected_binary.binary_params
    savings = binary_row["savings_vs_baseline"]
    assert savings["computation"] == pytest.approx(expected_float.ops / expected_binary.ops)
    assert savings["storage"] == pytest.approx(expected_float.storage_bytes / expected_binary.storage_bytes)
    assert "layers" not in binary_row


def test_text_table_and_savings(capsys) -> None:
    code, out, _ = run_cli(capsys, "torchvision:resnet18", "--resolution", "32x32")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["model", "params", "bin", "params"]
    assert set(lines[1]) == {"-"}
    assert lines[2].startswith("torchvision:resnet18 ") and lines[3].startswith("torchvision:resnet18 [reactnet]")
    assert "computation saving" in out and "storage saving" in out
    assert len({len(line) for line in lines[:4]}) == 1  # aligned


def test_layers_flag_prints_per_layer_rows(capsys) -> None:
    code, out, _ = run_cli(capsys, "timm:regnetx_002", "--resolution", "32x32", "--layers", "--no-keep-first")
    assert code == 0
    assert "== timm:regnetx_002 [reactnet]" in out and "stem.conv" in out and "BinaryConv2d" in out


def test_vit_built_for_resolution(capsys) -> None:
    code, out, _ = run_cli(capsys, "timm:vit_tiny_patch16_224", "--resolution", "64x32", "--json")
    assert code == 0
    assert json.loads(out)["models"][1]["bops"] > 0


def test_measure_adds_latency(capsys) -> None:
    code, out, _ = run_cli(capsys, "timm:regnetx_002", "--resolution", "32x32", "--measure", "--runs", "1")
    assert code == 0 and "latency ms" in out.splitlines()[0]


@pytest.mark.parametrize("argv,needle", [
    (["timm:not_a_model"], "unknown timm model"),
    (["torchvision:not_a_model"], "unknown torchvision model"),
    (["timm:resnet18", "--method", "nope", "--resolution", "32x32"], "available methods"),
    ([], "give a MODEL"),
    (["timm:resnet18", "--density", "2"], "--density"),
])
def test_user_errors_exit_2_with_one_line(capsys, argv, needle) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and needle in err and err.count("\n") == 1 and err.startswith("binarize profile: error:")


def test_bad_resolution_is_rejected(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["profile", "timm:resnet18", "--resolution", "224"])
    assert info.value.code == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert parse_resolution("512x288") == (512, 288)


def test_synthetic_frame_is_deterministic_and_person_like() -> None:
    frame, person = synthetic_person(64, 36)
    assert frame.shape == (1, 3, 36, 64) and torch.equal(frame, synthetic_frame(64, 36))
    assert 0.0 <= frame.min() and frame.max() <= 1.0
    assert 0.15 < person.mean() < 0.5  # a figure covering part of the frame
    assert person[..., :8].sum() == 0 and person[..., -8:].sum() == 0 and person[..., 0, :].sum() == 0
    assert person[..., -1, 24:40].all()  # the torso reaches the bottom edge in the middle
    fg = frame[0, :, person[0, 0] > 0].mean(1)
    bg = frame[0, :, person[0, 0] == 0].mean(1)
    assert (fg - bg).abs().max() > 0.15  # the figure stands out from the background
