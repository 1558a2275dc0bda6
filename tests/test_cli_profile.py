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
    (["timm:resnet18", "--downsample-ratio", "0"], "--downsample-ratio"),
    (["timm:regnetx_002", "--resolution", "32x32", "--input", "x.png"], "matting models only"),
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


# --------------------------------------------------------------------------- zoo matting models
@pytest.fixture
def zoo() -> None:
    import binarize.models  # noqa: F401  (registers the zoo)


def _library_report(name: str, width: int, height: int, **kwargs):
    from binarize.models import create_model

    torch.manual_seed(0)
    model = create_model(name)
    return profile(model, (synthetic_frame(width, height), None, None, None, None), downsample_ratio=1.0, **kwargs)


def test_bimatting_vs_rvm_json(capsys, zoo) -> None:
    code, out, _ = run_cli(capsys, "bimatting", "--resolution", "96x64", "--vs", "rvm_mobilenetv3", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["baseline"] == "rvm_mobilenetv3"
    bim, rvm = data["models"]
    assert (bim["model"], rvm["model"]) == ("bimatting", "rvm_mobilenetv3")
    assert (bim["binary_params"], bim["fp_params"], rvm["fp_params"]) == (4_217_584, 38_525, 3_748_633)
    expected = _library_report("bimatting", 96, 64)
    assert bim["bops"] == expected.bops and bim["flops"] == expected.flops
    assert bim["sparse_ops"] == pytest.approx(expected.sparse_ops)  # same seed, same frame, same masks
    assert bim["savings_vs_baseline"]["storage"] == pytest.approx(22.0, abs=0.05)
    assert len(bim["mask_densities"]) == 10


def test_bimatting_text_with_density_and_input_file(capsys, zoo, tmp_path) -> None:
    from PIL import Image

    image = (synthetic_frame(64, 36)[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    path = tmp_path / "frame.png"
    Image.fromarray(image).save(path)
    code, out, _ = run_cli(capsys, "bimatting", "--resolution", "64x64", "--input", str(path), "--density", "0.44")
    assert code == 0
    lines = out.splitlines()
    assert lines[2].split()[:3] == ["bimatting", "4,217,584", "38,525"]
    assert "assumed density 0.44" in out and "masked branches hold" in out
    expected = _library_report("bimatting", 64, 64, assume_density=0.44)
    assert f"{expected.sparse_ops / 1e9:.3f}" in lines[2].split()


def test_missing_input_image(capsys, zoo) -> None:
    code, _, err = run_cli(capsys, "bimatting", "--resolution", "64x64", "--input", "/nonexistent/frame.png")
    assert code == 2 and "input image not found: /nonexistent/frame.png" in err


def test_all_matting_one_row_per_zoo_model(capsys, zoo, monkeypatch) -> None:
    import binarize.cli.profile as cli_profile
    from binarize.cli.profile import matting_model_names

    names = matting_model_names()
    assert names[:2] == ["rvm_mobilenetv3", "bimatting"]
    assert {f"rvm_{m}" for m in ("bnn", "xnor", "dorefa", "bireal", "reactnet", "irnet", "recu")} <= set(names)
    subset = [names[0], names[1], "rvm_bnn"]  # profiling all nine models here would be slow
    monkeypatch.setattr(cli_profile, "matting_model_names", lambda: subset)
    code, out, _ = run_cli(capsys, "--all-matting", "--resolution", "64x64", "--json")
    assert code == 0
    data = json.loads(out)
    assert [m["model"] for m in data["models"]] == subset and data["baseline"] == "rvm_mobilenetv3"
    rvm, bnn = data["models"][0], data["models"][2]
    assert bnn["binary_params"] > 0 and bnn["savings_vs_baseline"]["computation"] > 1
    assert bnn["flops"] + bnn["bops"] == rvm["flops"]  # conversion moves MACs, never adds or drops any
    assert bnn["binary_params"] + bnn["fp_params"] >= rvm["fp_params"]  # plus the methods' extras
    code, out, err = run_cli(capsys, "--all-matting", "bimatting")
    assert code == 2 and "takes no MODEL" in err
    code, out, err = run_cli(capsys, "--all-matting", "--method", "bnn")
    assert code == 2 and "takes no MODEL" in err
