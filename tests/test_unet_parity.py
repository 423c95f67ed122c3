"""U-Net, ControlNet, U-Net+ControlNet and U-Net+T2I features against diffusers (see jaxcontrol.testing.parity)."""

import pytest

from jaxcontrol.testing.parity import CASES, QUICK_CASES, format_table, run_case


# covered in the fast suite by tiny-unet-test, the ControlNet pipelines' parity and test_controlnet.py
SLOWER = ("tiny-controlnet-test", "sd2-style", "sd2-style-odd-size")


def _check(name, tmp_path):
    rows = run_case(CASES[name], workdir=tmp_path)
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n" + format_table(rows)
    components = {r.component.split(" ")[0] for r in rows}
    assert {"unet", "unet+t2i-features"} <= components
    if CASES[name].controlnet is not None:
        assert {"controlnet-down", "controlnet-mid", "unet+controlnet"} <= components


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOWER else [])
                                  for n in QUICK_CASES])
def test_parity(name, tmp_path):
    _check(name, tmp_path)


@pytest.mark.slow
def test_parity_full_sd15(tmp_path):
    """The full SD-1.5 U-Net (859.5M) and ControlNet (361M), random weights, 16x16 latents, 77x768 context."""
    _check("sd15-full", tmp_path)


@pytest.mark.slow
def test_parity_full_sdxl(tmp_path):
    """The full SDXL U-Net (2.57B) and ControlNet-XL, random weights, 16x16 latents, 77x2048 context and
    the text_time inputs; staged so that one network is in memory at a time (peak 13.2 GB measured)."""
    _check("sdxl-full", tmp_path)
