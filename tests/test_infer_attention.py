"""infer.py's attention flags (--sag-scale, --pag-scale / --pag-layers, --attend-and-excite-tokens,
--edit-source / --edit-target) end to end on a tiny random pipeline folder, with a ControlNet,
recorded in the sidecar; and their usage errors, which come before any weights load."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxcontrol.commands import infer
from jaxcontrol.testing.pipeline_parity import save_tiny_pipeline

pytest.importorskip("torch")
pytest.importorskip("diffusers")

SIZE = ["--height", "16", "--width", "16"]  # latents 8x8; the tiny U-Net's cross-attention maps are 4x4
FAST = ["--steps", "2", "--no-progress", *SIZE]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("attn_cli")
    save_tiny_pipeline(root / "cn", kind="controlnet")
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(root / "init.png")
    (root / "source.txt").write_text("a circle\na round disc\n")
    (root / "target.txt").write_text("a square\n\na box\n")
    (root / "empty.txt").write_text("\n \n")
    return root


def _run(capsys, *argv):
    code = infer.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_pag_with_a_controlnet(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, "--model", tiny / "cn" / "pipeline", "--prompt", "a red circle", "--control-image",
                     tiny / "init.png", "--pag-scale", "2", "--pag-layers", "mid", "up_blocks.0", *FAST,
                     "--output", out)
    assert code == 0, err
    side = json.loads((out / "image_00000.json").read_text())
    assert side["pag"]["scale"] == 2.0 and side["pag"]["applied_layers"] == ["mid", "up_blocks.0"]
    assert side["sag_scale"] is None and side["attend_and_excite"] is None and len(side["controlnets"]) == 1


@pytest.mark.slow
def test_pag_and_attend_and_excite_without_refinement(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, "--model", tiny / "cn" / "pipeline", "--prompt", "a red circle", "--control-image",
                     tiny / "init.png", "--pag-scale", "2", "--attend-and-excite-tokens", "2,3", "--attn-res", "4,4",
                     "--max-iter-to-alter", "1", "--excite-thresholds", "", *FAST, "--output", out)
    assert code == 0, err
    side = json.loads((out / "image_00000.json").read_text())
    assert side["attend_and_excite"] == {"token_indices": [2, 3], "max_iter_to_alter": 1, "thresholds": {},
                                         "scale_factor": 20.0, "attn_res": [4, 4]}


@pytest.mark.slow
def test_sag_with_attend_and_excite_refinement(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, "--model", tiny / "cn" / "pipeline", "--prompt", "a red circle", "--control-image",
                     tiny / "init.png", "--sag-scale", "0.75", "--attend-and-excite-tokens", "2,3", "--attn-res",
                     "4,4", *FAST, "--output", out)
    assert code == 0, err
    side = json.loads((out / "image_00000.json").read_text())
    assert side["sag_scale"] == 0.75
    assert side["attend_and_excite"]["thresholds"] == {"0": 0.05, "10": 0.5, "20": 0.8}


@pytest.mark.slow
def test_pix2pix_zero_inverts_the_init_image(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, "--model", tiny / "cn" / "pipeline", "--prompt", "a circle", "--control-image",
                     tiny / "init.png", "--init-image", tiny / "init.png", "--edit-source", tiny / "source.txt",
                     "--edit-target", tiny / "target.txt", *FAST, "--output", out)
    assert code == 0, err
    side = json.loads((out / "image_00000.json").read_text())
    assert side["mode"] == "pix2pix_zero"
    assert side["pix2pix_zero"] == {"start": "invert", "edit_source": ["a circle", "a round disc"],
                                    "edit_target": ["a square", "a box"], "cross_attention_guidance_amount": 0.1}
    assert side["inputs"]["edit_source"] == str(tiny / "source.txt")


@pytest.mark.parametrize("args,message", [
    (["--sag-scale", "-1"], "--sag-scale -1.0: must be at least 0"),
    (["--pag-layers", "mid"], "--pag-layers only applies with --pag-scale"),
    (["--attn-res", "8,8"], "--attn-res only applies with --attend-and-excite-tokens"),
    (["--attend-and-excite-tokens", "2,x"], "expected comma-separated token positions"),
    (["--attend-and-excite-tokens", "0"], "positions start at 1"),
    (["--attend-and-excite-tokens", "2", "--attn-res", "4"], "--attn-res '4': expected two positive integers"),
    (["--attend-and-excite-tokens", "2", "--excite-thresholds", "0:2"], "thresholds in [0, 1]"),
    (["--edit-source", "source.txt"], "needs both --edit-source and --edit-target"),
    (["--edit-source", "source.txt", "--edit-target", "empty.txt"], "--edit-target empty.txt: the file has no"),
    (["--edit-source", "missing.txt", "--edit-target", "target.txt"], "--edit-source missing.txt: cannot read"),
    (["--edit-source", "source.txt", "--edit-target", "target.txt", "--sag-scale", "1"], "do not combine"),
    (["--edit-source", "source.txt", "--edit-target", "target.txt", "--attend-and-excite-tokens", "2"],
     "use one of them"),
    (["--cross-attention-guidance-amount", "0.3"], "only applies with --edit-source"),
    (["--edit-source", "source.txt", "--edit-target", "target.txt", "--guidance-scale", "1"], "above 1"),
    (["--edit-source", "source.txt", "--edit-target", "target.txt", "--guidance-rescale", "0.5"],
     "--guidance-rescale does not apply"),
    (["--attend-and-excite-tokens", "80"], "positions go up to 75"),
    (["--pag-scale", "1", "--pag-layers", "mid("], "not a valid regular expression"),
    (["--attend-and-excite-tokens", "2", "--attn-res", "1,1"], "two integers >= 2"),
])
def test_attention_flag_errors_before_loading(tiny, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tiny)

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the usage error")

    monkeypatch.setattr(infer, "open_pipeline", refuse)
    code, err = _run(capsys, "--model", tiny / "cn" / "pipeline", "--prompt", "a", "--control-image", "init.png",
                     *args, *FAST, "--output", tmp_path / "out")
    assert code == 2, err
    assert message in err.strip().splitlines()[-1], err


def test_a_layer_the_unet_lacks_is_named_before_compiling(tiny, tmp_path, capsys):
    code, err = _run(capsys, "--model", tiny / "cn" / "pipeline", "--prompt", "a", "--control-image",
                     tiny / "init.png", "--pag-scale", "2", "--pag-layers", "down_blocks.0", *FAST,
                     "--output", tmp_path / "out")
    assert code != 0 and "'down_blocks.0' matches no self-attention layer" in err, err
    assert not (tmp_path / "out").exists()
