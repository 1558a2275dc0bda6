"""Weight averaging of training checkpoints (``binarize average``): the average against the
formula, BatchNorm re-estimation against the batch statistics, the CLI's outputs and errors."""
from __future__ import annotations

import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import binarize
from binarize.cli.main import main
from binarize.matting import train as train_mod
from binarize.matting.average import average_checkpoints, average_state_dicts, recalibrate_batchnorm
from binarize.matting.train_config import config_to_yaml, validate_config
from binarize.matting.train_state import load_checkpoint_file, save_atomic
from tests.test_train import TINY, TinyMatting, tiny_config


def _checkpoint(path: pathlib.Path, model: nn.Module, cfg: dict, name: str) -> pathlib.Path:
    """A file in the trainer's checkpoint format holding ``model``'s weights."""
    return save_atomic({"format": train_mod.CHECKPOINT_FORMAT, "model": model.state_dict(), "model_name": name,
                        "config": config_to_yaml(cfg)}, path)


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(torch.rand(m.running_mean.shape, generator=gen))
                m.num_batches_tracked.fill_(seed)
    return model


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(0, 2**16))
def test_average_is_the_mean_of_floats_and_keeps_the_first_integers(count, seed):
    gen = torch.Generator().manual_seed(seed)
    states = [{"w": torch.randn(3, 2, generator=gen), "h": torch.randn(4, generator=gen).half(),
               "n": torch.tensor(i + 5)} for i in range(count)]
    avg = average_state_dicts(states)
    expected = torch.stack([s["w"].double() for s in states]).mean(0).float()
    torch.testing.assert_close(avg["w"], expected)
    assert avg["h"].dtype == torch.float16
    torch.testing.assert_close(avg["h"], torch.stack([s["h"].double() for s in states]).mean(0).half())
    assert int(avg["n"]) == 5


def test_averaging_one_state_with_itself_changes_nothing():
    state = TinyMatting().state_dict()
    for key, value in average_state_dicts([state, state]).items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("other, message", [
    ({"a": torch.zeros(2)}, "'b' is missing from state 2"),
    ({"a": torch.zeros(2), "b": torch.zeros(1), "c": torch.zeros(1)}, "'c' is only in state 2"),
    ({"a": torch.zeros(3), "b": torch.zeros(1)}, "differ at 'a': (2,)"),
    ({"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(1)}, "differ at 'a'"),
])
def test_states_that_do_not_match_are_named(other, message):
    with pytest.raises(ValueError) as err:
        average_state_dicts([{"a": torch.zeros(2), "b": torch.zeros(1)}, other])
    assert message in str(err.value)
    with pytest.raises(ValueError, match="at least two"):
        average_state_dicts([other])


def test_batchnorm_statistics_are_the_mean_of_the_batch_statistics():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 2, 5, 5, generator=gen) * (i + 1) for i in range(3)]
    assert recalibrate_batchnorm(model, iter(batches)) == 1
    assert not model.training  # the mode is kept
    with torch.no_grad():
        feats = [model[0](x) for x in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert recalibrate_batchnorm(nn.Linear(2, 2), iter(batches)) == 0


def test_cli_averages_two_runs_and_the_result_initialises_training(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    paths = [_checkpoint(tmp_path / f"{i}.pt", _perturbed(TinyMatting(), i + 1), cfg, TINY)
             for i in range(2)]
    states = [load_checkpoint_file(p)["model"] for p in paths]
    out = tmp_path / "soup"
    assert main(["average", *map(str, paths), "--output-dir", str(out), "--bn-batches", "2", "--no-progress"]) == 0
    assert "averaged 2 checkpoints" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["averaged.pt"]  # no compact file for a model outside the registry
    saved = load_checkpoint_file(out / "averaged.pt")
    assert saved["averaged_from"] == [str(p) for p in paths] and saved["bn_batches"] == 2
    for key in ("backbone.0.weight", "aspp.bias", "backbone.1.weight"):
        torch.testing.assert_close(saved["model"][key], (states[0][key] + states[1][key]) / 2)
    # the statistics were re-estimated, not averaged
    averaged_stats = (states[0]["backbone.1.running_mean"] + states[1]["backbone.1.running_mean"]) / 2
    assert not torch.allclose(saved["model"]["backbone.1.running_mean"], averaged_stats)
    # with --bn-batches 0 they are the average
    assert main(["average", *map(str, paths), "--output-dir", str(tmp_path / "plain"), "--bn-batches", "0",
                 "--no-progress"]) == 0
    plain = load_checkpoint_file(tmp_path / "plain" / "averaged.pt")["model"]
    torch.testing.assert_close(plain["backbone.1.running_mean"], averaged_stats)
    # a next stage starts from it
    trainer = train_mod.Trainer(validate_config({**cfg, "model": {**cfg["model"], "init": str(out / "averaged.pt")}}))
    torch.testing.assert_close(trainer.model.state_dict()["aspp.weight"], saved["model"]["aspp.weight"])


def test_bimatting_average_writes_a_compact_file_that_loads(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["model"]["name"] = "bimatting"
    cfg["data"]["synthetic"].update(clips=2, size=[64, 48])
    cfg["data"]["batch_size_per_gpu"] = 1
    cfg = validate_config(cfg)
    paths = [_checkpoint(tmp_path / f"{i}.pt", _perturbed(binarize.create_model("bimatting"), i), cfg, "bimatting")
             for i in range(2)]
    assert main(["average", *map(str, paths), "--output-dir", str(tmp_path / "soup"), "--bn-batches", "1",
                 "--no-progress"]) == 0
    model, used = average_checkpoints(paths, bn_batches=1)
    assert used["model"]["name"] == "bimatting"
    loaded = binarize.load(tmp_path / "soup" / "model.safetensors").eval()
    src = torch.rand(1, 2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(src)[1], model(src)[1])


@pytest.mark.parametrize("args, message", [
    (["{a}"], "at least two checkpoints"),
    (["{a}", "{missing}"], "checkpoint not found"),
    (["{a}", "{a}"], "listed twice"),
    (["{a}", "{b}", "--bn-batches", "-1"], "--bn-batches must be >= 0"),
    (["{a}", "{b}", "--output-dir", "{a}"], "a.pt exists and is not a folder"),
    (["{a}", "{b}", "--output-dir", "{a}/sub"], "a.pt exists and is not a folder"),
    (["{a}", "{b}", "--config", "no/such.yaml"], "no/such.yaml"),
    (["{a}", "{bogus}"], "not a binarize training checkpoint"),
    (["{a}", "{other}"], "only checkpoints of one model can be averaged"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    cfg = tiny_config(tmp_path)
    files = {
        "a": _checkpoint(tmp_path / "a.pt", TinyMatting(), cfg, TINY),
        "b": _checkpoint(tmp_path / "b.pt", TinyMatting(), cfg, TINY),
        "other": _checkpoint(tmp_path / "other.pt", TinyMatting(), cfg, "rvm_mobilenetv3"),
        "missing": tmp_path / "missing.pt",
        "bogus": tmp_path / "bogus.pt",
    }
    torch.save({"weights": torch.zeros(1)}, files["bogus"])
    argv = [a.format(**files) for a in args]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "out")]
    assert main(["average", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("binarize average: error:") and message in err, err
    assert not (tmp_path / "out").exists()
