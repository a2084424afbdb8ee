"""`gendistill convert IN OUT [--sh-degree N]`: any readable scene format to any writable one."""

from pathlib import Path

import torch

from gendistill.cli import main
from gendistill.core.formats import read_scene
from gendistill.core.scene import GaussianScene

SOURCE = Path(__file__).parent / "data" / "formats" / "source_sh3.ply"  # SH degree 3, 2,000 Gaussians


def test_convert_between_formats_and_sh_degrees(tmp_path, capsys):
    src = GaussianScene.load(SOURCE)
    assert main(["convert", str(SOURCE), str(tmp_path / "a.spz"), "--sh-degree", "1"]) == 0
    assert "a.spz (spz, 2,000 Gaussians, SH degree 1)" in capsys.readouterr().out
    spz, notes = read_scene(tmp_path / "a.spz")
    assert spz.sh_degree == 1 and notes and "SPZ" in notes[0]
    torch.testing.assert_close(spz.means, src.means, atol=2 ** -12, rtol=0)
    assert main(["convert", str(tmp_path / "a.spz"), str(tmp_path / "b.ply"), "--sh-degree", "2"]) == 0
    ply = GaussianScene.load(tmp_path / "b.ply")
    assert ply.sh_degree == 2 and torch.equal(ply.sh[:, 4:], torch.zeros(2000, 5, 3))  # padded with zeros
    torch.testing.assert_close(ply.sh[:, :4], spz.sh)  # PLY is exact
    assert main(["convert", str(SOURCE), str(tmp_path / "c.compressed.ply")]) == 0
    assert GaussianScene.load(tmp_path / "c.compressed.ply").sh_degree == 3


def test_an_unwritable_output_is_refused_before_reading(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.ply"), str(tmp_path / "out.obj")]) == 2
    err = capsys.readouterr().err
    assert "output " + str(tmp_path / "out.obj") + ": no scene format has this suffix; writable: compressed-ply (.compressed.ply), ply (.ply)" in err and "missing" not in err
    assert main(["convert", str(tmp_path / "missing.ply"), str(tmp_path / "out.pt")]) == 2
    assert "out.pt: the gsplat-ckpt format cannot be written" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.ply"), str(tmp_path / "out.spz")]) == 2
    assert "input " + str(tmp_path / "missing.ply") + ": no such scene file" in capsys.readouterr().err
    assert not (tmp_path / "out.spz").exists()
