"""The tutorial's figures: their data (computed through the package) against the formulas and
the article's numbers; the command writes the PNGs where matplotlib is installed."""

import os

import pytest
import torch

from softmax_ce import figures


def test_bce_cost_is_minus_log_phi():
    d = figures.bce_cost_data()
    assert d["z"].shape == (50,)  # np.arange(-5, 5, 0.2)
    torch.testing.assert_close(d["z"][[0, -1]], torch.tensor([-5.0, 4.8], dtype=torch.float64))
    torch.testing.assert_close(d["j_y1"], -torch.log(d["phi"]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d["j_y0"], -torch.log(1 - d["phi"]), rtol=1e-12, atol=1e-12)


def test_softmax_example_matches_the_article():
    torch.testing.assert_close(figures.softmax_example_data(),
                               torch.tensor(figures.SOFTMAX_EXAMPLE_VALUES, dtype=torch.float64),
                               rtol=0, atol=5e-9)


def test_ce_gradient_stays_where_mse_vanishes():
    g = figures.ce_vs_mse_gradient_data()
    p = torch.sigmoid(g["z"])
    torch.testing.assert_close(g["grad_ce"], p - 1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g["grad_mse"], 2 * (p - 1) * p * (1 - p), rtol=1e-10, atol=1e-12)
    wrong = g["z"] < -8  # confidently wrong
    assert (g["grad_ce"][wrong] < -0.999).all() and (g["grad_mse"][wrong].abs() < 1e-3).all()


def test_figures_without_matplotlib_say_how_to_install_it(tmp_path, hide_package):
    from softmax_ce.__main__ import main

    hide_package("matplotlib")
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        main(["figures", "--out", str(tmp_path)])
    assert os.listdir(tmp_path) == []


def test_figures_command_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional [plot] extra")
    from softmax_ce.__main__ import main

    assert main(["figures", "--out", str(tmp_path)]) == 0
    names = sorted(os.listdir(tmp_path))
    assert names == ["bce_cost.png", "ce_vs_mse_gradient.png", "softmax_example.png"]
    for name in names:
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
