"""LoRA: files made by diffusers + PEFT load here and give diffusers' images at scales 0.5 and 1.0;
the same weights in kohya's and older diffusers' layouts give the same layers; a LoRA written here
loads in diffusers and matches; merge then unmerge restores the weights bit for bit; bad files are
refused whole, naming the problem."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol.convert.lora_file import read_lora, save_lora
from jaxcontrol.convert.safetensors_file import save_safetensors
from jaxcontrol.errors import CheckpointError, ConfigError
from jaxcontrol.loras import lora_targets
from jaxcontrol.models.lora import Lora, init_lora, lora_delta, merge_loras, unmerge_loras, with_loras
from jaxcontrol.models.params import flatten
from jaxcontrol.pipeline import Pipeline
from jaxcontrol.testing.lora_parity import save_peft_lora, to_kohya, to_legacy_diffusers
from jaxcontrol.testing.pipeline_parity import save_tiny_pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

PROMPTS = ["a red circle with light blue background", "a green square"]
H = W = 16
STEPS = dict(num_inference_steps=3, guidance_scale=6.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    ref = save_tiny_pipeline(root)
    path, tensors = save_peft_lora(ref, root / "lora")
    meta = {"unet": {"lora_alpha": 8, "alpha_pattern": {"proj_in": 3}},
            "text_encoder": {"lora_alpha": 2, "alpha_pattern": {}}}
    return root, path, tensors, meta


@pytest.fixture(scope="module")
def pipe(tiny):
    root, path, _, _ = tiny
    return Pipeline.from_pretrained(root / "pipeline", loras=[path])


def _reference(root):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(root / "pipeline", safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _noise(seed=0):
    return torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(seed))


def _ours(pipe, noise, **kw):
    return pipe(PROMPTS, height=H, width=W, scheduler="ddim", latents=noise.numpy().transpose(0, 2, 3, 1),
                output_type="float", **STEPS, **kw)


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def _deltas(lora: Lora, targets) -> dict:
    out = {}
    for comp, layers in lora.weights.items():
        flat = flatten(targets[comp])
        for module, layer in layers.items():
            out[(comp, module)] = np.asarray(lora_delta(layer, flat[f"{module}/kernel"].shape))
    return out


def test_peft_lora_matches_diffusers_at_two_scales_unmerged_and_fused(tiny, pipe, monkeypatch):
    root, path, _, _ = tiny
    import jaxcontrol.pipeline as pipeline_module

    traces = []
    real = pipeline_module.apply_loras
    monkeypatch.setattr(pipeline_module, "apply_loras", lambda *a: traces.append(1) or real(*a))
    ref = _reference(root)
    noise = _noise()
    kw = dict(height=H, width=W, output_type="np", **STEPS)
    with torch.no_grad():
        plain = ref(PROMPTS, latents=noise, **kw).images
        ref.load_lora_weights(path.parent)
        want = {s: ref(PROMPTS, latents=noise, cross_attention_kwargs={"scale": s}, **kw).images for s in (0.5, 1.0)}
    assert pipe.loras[0]["format"] == "peft" and pipe.loras[0]["layers"] > 50
    for s in (0.5, 1.0):
        ours = _ours(pipe, noise, lora_scale=s)
        assert _rel(ours, want[s]) < 1e-4, s
        assert _rel(want[s], plain) > 1e-2  # the LoRA matters
        assert pipe.last_settings["lora_scale"] == s and pipe.last_settings["loras"][0]["scale"] == 1.0
    assert len(traces) == 1  # a scale is a traced value: one program for both
    pipe.set_lora_scale(pipe.loras[0]["name"], 0.5)
    assert _rel(_ours(pipe, noise), want[0.5]) < 1e-4
    pipe.set_lora_scale(pipe.loras[0]["name"], 1.0)
    before = {k: np.asarray(v) for k, v in flatten({"u": pipe.params["unet"], "t": pipe.params["text_encoder"]}).items()}
    pipe.fuse_loras()
    assert "loras" not in pipe.params and pipe.loras[0]["fused"]
    assert _rel(_ours(pipe, noise), want[1.0]) < 1e-4
    with pytest.raises(ConfigError, match="unfuse_loras"):
        pipe.set_lora_scale(pipe.loras[0]["name"], 0.3)
    pipe.unfuse_loras()
    after = {k: np.asarray(v) for k, v in flatten({"u": pipe.params["unet"], "t": pipe.params["text_encoder"]}).items()}
    assert before.keys() == after.keys()
    for k in before:  # bit for bit
        assert before[k].dtype == after[k].dtype and before[k].tobytes() == after[k].tobytes(), k


def test_kohya_and_legacy_layouts_give_the_same_layers(tiny, pipe, tmp_path):
    _, path, tensors, meta = tiny
    targets = lora_targets(pipe.params)
    peft = read_lora(path, targets)
    want = _deltas(peft, targets)
    assert {c for c, _ in want} == {"unet", "text_encoder"}
    assert any(len(flatten(targets["unet"])[f"{m}/kernel"].shape) == 4 and
               flatten(targets["unet"])[f"{m}/kernel"].shape[0] == 3 for c, m in want if c == "unet")  # conv LoRA
    for name, layout, fmt in (("kohya", to_kohya, "kohya"), ("legacy", to_legacy_diffusers, "diffusers-legacy")):
        file = tmp_path / f"{name}.safetensors"
        save_safetensors(file, layout(tensors, meta))
        other = read_lora(file, targets)
        assert other.format == fmt and other.name == name
        got = _deltas(other, targets)
        assert got.keys() == want.keys(), name
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=f"{name} {k}")


def test_merge_unmerge_is_bit_exact_and_with_loras_is_differentiable(pipe, tiny):
    _, path, _, _ = tiny
    targets = lora_targets(pipe.params)
    lora = read_lora(path, targets)
    unet = targets["unet"]
    merged, originals = merge_loras(unet, [lora.weights["unet"]], [0.7])
    np.testing.assert_allclose(flatten(merged)[next(iter(originals))],
                               flatten(with_loras(unet, [lora.weights["unet"]], [0.7]))[next(iter(originals))])
    back = unmerge_loras(merged, originals)
    for k, v in flatten(unet).items():
        assert np.asarray(v).tobytes() == np.asarray(flatten(back)[k]).tobytes(), k

    def loss(layers, scale):
        p = with_loras(unet, [layers], jnp.asarray([scale]))
        return sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(p))

    g_layers, g_scale = jax.jit(jax.grad(loss, argnums=(0, 1)))(lora.weights["unet"], 0.5)
    assert np.isfinite(float(g_scale)) and float(g_scale) != 0.0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(g_layers))


@pytest.mark.slow
def test_a_lora_written_here_loads_in_diffusers_and_matches(tiny, tmp_path):
    root, _, _, _ = tiny
    ours = Pipeline.from_pretrained(root / "pipeline")
    targets = lora_targets(ours.params)
    from jaxcontrol.models.lora import lora_targets as modules_matching

    weights = {}
    for comp, names, seed in (("unet", ["to_q", "to_v", "conv2", "proj_out"], 1), ("text_encoder", ["q_proj", "fc2"], 2)):
        layers = init_lora(targets[comp], modules_matching(targets[comp], names), rank=3, alpha=5.0, seed=seed)
        rng = np.random.default_rng(seed)
        weights[comp] = {m: {**l, "up": jnp.asarray(rng.normal(0, 0.2, l["up"].shape), jnp.float32)}
                         for m, l in layers.items()}
    lora = Lora("trained", weights)
    file = save_lora(lora, tmp_path / "pytorch_lora_weights.safetensors")
    assert read_lora(file, targets).weights.keys() == weights.keys()
    ours.load_lora(lora, scale=0.8)
    ref = _reference(root)
    ref.load_lora_weights(tmp_path)
    noise = _noise(1)
    with torch.no_grad():
        want = ref(PROMPTS, latents=noise, height=H, width=W, output_type="np", cross_attention_kwargs={"scale": 0.8},
                   **STEPS).images
    assert _rel(_ours(ours, noise), want) < 1e-4
    # and kohya's layout round-trips to the same layers
    kfile = save_lora(lora, tmp_path / "k.safetensors", format="kohya")
    back = read_lora(kfile, targets)
    for k, v in _deltas(lora, targets).items():
        np.testing.assert_allclose(_deltas(back, targets)[k], v, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_two_loras_each_with_its_own_scale_match_diffusers_set_adapters(tiny, tmp_path):
    root, path, _, _ = tiny
    ref = _reference(root)
    second, _ = save_peft_lora(ref, tmp_path / "second", seed=7, unet_rank=2, unet_alpha=1, text_rank=1,
                               text_alpha=4, adapter_name="second")
    ref = _reference(root)
    ref.load_lora_weights(path.parent, adapter_name="first")
    ref.load_lora_weights(second.parent, adapter_name="second")
    ref.set_adapters(["first", "second"], adapter_weights=[0.8, -0.6])
    noise = _noise(2)
    with torch.no_grad():
        want = ref(PROMPTS, latents=noise, height=H, width=W, output_type="np", **STEPS).images
    ours = Pipeline.from_pretrained(root / "pipeline", loras=[(path, 0.8), (second, -0.6)])
    assert [e["name"] for e in ours.loras] == ["lora", "second"]
    assert ours.load_lora(path, 0.0) == "lora_2"  # a default name that is taken gets a suffix
    ours.unload_loras(["lora_2"])
    assert _rel(_ours(ours, noise), want) < 1e-4
    ours.fuse_loras()
    assert _rel(_ours(ours, noise), want) < 1e-4


# ------------------------------------------------------------------------------------ bad files
class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_bad_files_are_refused_whole_naming_the_problem(tiny, pipe, tmp_path):
    _, path, tensors, meta = tiny
    targets = lora_targets(pipe.params)
    params_before = jax.tree_util.tree_map(np.asarray, {k: v for k, v in pipe.params.items() if k != "loras"})
    names_before = [e["name"] for e in pipe.loras]

    def write(name, t):
        f = tmp_path / name
        save_safetensors(f, t)
        return f

    key = next(k for k in tensors if k.startswith("unet.down_blocks.") and k.endswith("attn1.to_q.lora_A.weight"))
    # a LoRA for another base model: a layer this U-Net does not have
    other = dict(tensors)
    other[key.replace("transformer_blocks.0", "transformer_blocks.5")] = other.pop(key)
    other[key.replace("transformer_blocks.0", "transformer_blocks.5").replace("lora_A", "lora_B")] = other.pop(
        key.replace("lora_A", "lora_B"))
    with pytest.raises(CheckpointError, match=r"(?s)match no layer.*transformer_blocks\.5") as e:
        pipe.load_lora(write("other.safetensors", other))
    assert "2 LoRA keys match no layer" in str(e.value)  # only the two foreign keys are listed
    # a wrong width (SD-2 vs SD-1 text width): key and both shapes named
    wrong = dict(tensors)
    a = wrong[key]
    wrong[key] = np.concatenate([a, a], axis=1)
    with pytest.raises(CheckpointError, match=rf"{key}: shape \({a.shape[0]}, {2 * a.shape[1]}\) does not fit .* "
                                              rf"weight shape \(\d+, {a.shape[1]}\)"):
        pipe.load_lora(write("wrong.safetensors", wrong))
    # rank disagreement between the two factors
    rank = dict(tensors)
    b = key.replace("lora_A", "lora_B")
    rank[b] = rank[b][:, :-1]
    with pytest.raises(CheckpointError, match=r"lora_B.weight: shape .* with rank 4"):
        read_lora(write("rank.safetensors", rank), targets)
    # a factor without its partner
    half = {k: v for k, v in tensors.items() if k != b}
    with pytest.raises(CheckpointError, match="no up factor"):
        read_lora(write("half.safetensors", half), targets)
    # not plain LoRA
    with pytest.raises(CheckpointError, match="LoHa"):
        read_lora(write("loha.safetensors", {"lora_unet_conv_in.hada_w1_a": np.zeros((2, 2), np.float32)}), targets)
    with pytest.raises(CheckpointError, match="DoRA"):
        read_lora(write("dora.safetensors", {**to_kohya(tensors, meta),
                                             "lora_unet_conv_in.dora_scale": np.zeros((1,), np.float32)}), targets)
    # keys of no known layout
    with pytest.raises(CheckpointError, match="not LoRA keys"):
        read_lora(write("junk.safetensors", {"model.weight": np.zeros((2,), np.float32)}), targets)
    # NaN factors
    nan = dict(tensors)
    nan[key] = np.full_like(nan[key], np.nan)
    with pytest.raises(CheckpointError, match="NaN"):
        read_lora(write("nan.safetensors", nan), targets)
    # a pickle that would run code is refused, and its code never runs
    evil = tmp_path / "evil.bin"
    with open(evil, "wb") as f:
        pickle.dump({"unet.x.lora_A.weight": _Boom()}, f)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        pipe.load_lora(evil)
    # a scale that is not a number, a duplicate name
    with pytest.raises(ConfigError, match="finite"):
        pipe.load_lora(path, scale=float("nan"))
    with pytest.raises(ConfigError, match="already loaded"):
        pipe.load_lora(path, name=names_before[0])
    # nothing was applied
    assert [e["name"] for e in pipe.loras] == names_before
    after = jax.tree_util.tree_map(np.asarray, {k: v for k, v in pipe.params.items() if k != "loras"})
    before_leaves, after_leaves = jax.tree_util.tree_leaves(params_before), jax.tree_util.tree_leaves(after)
    assert len(before_leaves) == len(after_leaves)
    assert all(v.tobytes() == w.tobytes() for v, w in zip(before_leaves, after_leaves))


@pytest.mark.slow
def test_a_controlnet_lora_matches_peft_on_diffusers_controlnet(tmp_path):
    """A LoRA on the ControlNet ("controlnet." keys): diffusers' ControlNet pipeline with the same
    PEFT adapter injected gives the same images; a pipeline without a ControlNet refuses the file."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = save_tiny_pipeline(tmp_path, kind="controlnet")
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.controlnet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["to_k", "to_v", "conv2",
                                                                               "controlnet_down_blocks.0"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ref.controlnet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    state = {f"controlnet.{k}": v.numpy() for k, v in get_peft_model_state_dict(ref.controlnet).items()}
    meta = {"controlnet.r": 2, "controlnet.lora_alpha": 3}
    import json

    save_safetensors(tmp_path / "cn_lora.safetensors", state, {"lora_adapter_metadata": json.dumps(meta)})
    cond = np.random.default_rng(0).random((1, H, W, 3)).astype(np.float32)
    noise = _noise(4)
    with torch.no_grad():
        want = ref(PROMPTS, image=torch.from_numpy(cond.transpose(0, 3, 1, 2)), latents=noise, height=H, width=W,
                   output_type="np", **STEPS).images
    from jaxcontrol.pipeline import ControlInput

    ours = Pipeline.from_pretrained(tmp_path / "pipeline", loras=[tmp_path / "cn_lora.safetensors"])
    assert set(ours._loras[0]["lora"].weights) == {"controlnet"}
    got = _ours(ours, noise, controls=[ControlInput(cond)])
    assert _rel(got, want) < 1e-4
    plain = Pipeline.from_pretrained(tmp_path / "pipeline")
    assert _rel(_ours(plain, noise, controls=[ControlInput(cond)]), want) > 1e-3
    with pytest.raises(CheckpointError, match="for controlnet; this model has"):
        read_lora(tmp_path / "cn_lora.safetensors", {"unet": plain.params["unet"],
                                                     "text_encoder": plain.params["text_encoder"]})
