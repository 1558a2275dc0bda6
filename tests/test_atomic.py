"""The package's one way to write an output: whole or not at all, unique temporary names, and the
permissions ``open`` would give (every writer, from checkpoints to evaluation tables, uses it)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from binarize._atomic import atomic_output, file_mode, make_temp, write_text_atomic
from binarize.matting.train_state import save_atomic


def visible_and_hidden(folder):
    return sorted(p.name for p in folder.iterdir())


def test_text_is_written_whole_and_leaves_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a.csv", "x,y\r\n1,2\n")
    assert path.read_bytes() == b"x,y\r\n1,2\n"  # newlines as given, not translated
    assert visible_and_hidden(tmp_path) == ["a.csv"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert visible_and_hidden(tmp_path) == ["result.json"]


def test_temporaries_are_unique_hidden_and_keep_the_extension(tmp_path):
    first, second = make_temp(tmp_path / "frame.png"), make_temp(tmp_path / "frame.png")
    assert first != second and first.parent == tmp_path
    assert first.name.startswith(".frame.") and first.suffix == ".png"
    with atomic_output(tmp_path / "frame.png") as tmp:  # PIL picks the format from the name
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp)
    assert Image.open(tmp_path / "frame.png").format == "PNG"


def test_parents_are_created_only_when_asked(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_text_atomic(tmp_path / "new" / "a.txt", "x")
    assert write_text_atomic(tmp_path / "new" / "a.txt", "x", parents=True).read_text() == "x"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_get_the_permissions_open_would_give(tmp_path, umask):
    # mkstemp creates 0600 files; a training checkpoint or an evaluation table used to keep that
    old = os.umask(umask)
    try:
        expected = file_mode()
        text = write_text_atomic(tmp_path / "t.md", "x")
        checkpoint = save_atomic({"format": "test", "w": torch.ones(2)}, tmp_path / "runs" / "last.pt")
    finally:
        os.umask(old)
    assert expected == 0o666 & ~umask
    assert text.stat().st_mode & 0o777 == expected
    assert checkpoint.stat().st_mode & 0o777 == expected
    assert torch.equal(torch.load(checkpoint, weights_only=True)["w"], torch.ones(2))



def test_atomic_folder_replaces_the_old_folder_only_when_the_block_finishes(tmp_path):
    from binarize._atomic import atomic_folder

    target = tmp_path / "frames"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("a frame failed")
    assert [p.name for p in tmp_path.iterdir()] == ["frames"] and [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_folder(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["frames"] and [p.name for p in target.iterdir()] == ["new.txt"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask  # as mkdir makes it, not mkdtemp's 0700
