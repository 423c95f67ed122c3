"""Steering through the U-Net's attention, against diffusers on a tiny random model (f32, CPU):
captured attention maps against diffusers' attention processors, and Self-Attention Guidance,
Perturbed-Attention Guidance, Attend-and-Excite and Pix2Pix-Zero (its inversion included) against
their diffusers pipelines: same weights, same start latents, DDIM, final latents compared."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol import guidance as G
from jaxcontrol.convert import load_model
from jaxcontrol.errors import ConfigError
from jaxcontrol.models.attention import AttentionControl
from jaxcontrol.models.forward import model_forward
from jaxcontrol.models.unet import attention_layers
from jaxcontrol.sampler import ddim_invert, initial_latents, sample
from jaxcontrol.schedulers import make_plan
from jaxcontrol.testing.reference import randomize_
from jaxcontrol.testing.solver_parity import SD_BETAS

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Two cross-attention levels (16x16 and 8x8 latents' maps) and a mid block with attention; weights
# large enough that attention is far from uniform (SAG thresholds the summed map at 1).
UNET = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            norm_num_groups=4, attention_head_dim=2)
SCHEDULER = {**SD_BETAS, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
             "_class_name": "DDIMScheduler"}
SEQ, DIM, LAT = 9, 32, 16


def _nhwc(t):
    return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def _rel(ours, ref_nchw):
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    return float(np.abs(ours - ref_nchw).max() / np.abs(ref_nchw).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("attn")
    torch.manual_seed(0)
    unet = randomize_(diffusers.UNet2DConditionModel(**UNET), 0, scale=0.3)
    unet.save_pretrained(root / "unet")
    vae = diffusers.AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                                  norm_num_groups=2, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2)
    ours = load_model(root / "unet")
    return unet, vae, ours


def _inputs(seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    pe, ne = torch.randn(batch, SEQ, DIM, generator=g), torch.randn(batch, SEQ, DIM, generator=g)
    lat = torch.randn(batch, 4, LAT, LAT, generator=g)
    return pe, ne, lat


def _cond(pe, ne):
    return {"cond": {"text": jnp.asarray(pe.numpy())}, "uncond": {"text": jnp.asarray(ne.numpy())}}


def _moved(out, x, cond, gs, plan, base):
    """How far a technique moved the final latents from plain CFG (relative)."""
    plain = sample(G.classifier_free(base, gs), plan, initial_latents(plan, x), cond)
    return _rel(out, np.asarray(plain).transpose(0, 3, 1, 2))


def _pipe(cls, tiny, **extra):
    unet, vae, _ = tiny
    pipe = cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
               scheduler=diffusers.DDIMScheduler.from_config(SCHEDULER), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Store:
    """A diffusers attention processor that records each layer's probabilities."""

    def __init__(self, name, store):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k, v = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)
        self.store[self.name] = probs
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))


def test_attention_maps_match_diffusers_processors(tiny):
    unet_t, _, (unet, params) = tiny
    store = {}
    saved = unet_t.attn_processors
    unet_t.set_attn_processor({n: _Store(n.removesuffix(".processor"), store) for n in saved})
    try:
        pe, _, lat = _inputs(0, batch=2)
        with torch.no_grad():
            ref = unet_t(lat, 500, encoder_hidden_states=pe).sample
    finally:
        unet_t.set_attn_processor(saved)
    names = [layer.name for layer in attention_layers(unet.config)]
    assert sorted(names) == sorted(store)
    out, maps = model_forward(unet, params, _nhwc(lat), jnp.full((2,), 500.0), jnp.asarray(pe.numpy()),
                              attention=AttentionControl(capture=names))
    assert _rel(out, ref.numpy()) < 1e-5
    for n in names:
        r = store[n].numpy()
        r = r.reshape(2, -1, *r.shape[1:])  # diffusers' (batch * heads) rows, batch-major
        assert np.abs(np.asarray(maps[n]) - r).max() <= 1e-5, n
    # no control: the same program as before, bit for bit
    plain = model_forward(unet, params, _nhwc(lat), jnp.full((2,), 500.0), jnp.asarray(pe.numpy()))
    captured_none, maps_none = model_forward(unet, params, _nhwc(lat), jnp.full((2,), 500.0),
                                             jnp.asarray(pe.numpy()), attention=AttentionControl())
    assert maps_none == {} and np.array_equal(np.asarray(plain), np.asarray(captured_none))


def test_attention_layers_and_bad_names(tiny):
    _, _, (unet, params) = tiny
    layers = attention_layers(unet.config)
    mid = [layer for layer in layers if layer.place == "mid"]
    assert [layer.name for layer in mid] == ["mid_block.attentions.0.transformer_blocks.0.attn1",
                                             "mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert mid[0].size(16, 16) == (8, 8) and mid[0].size(15, 9) == (8, 5) and not mid[0].cross
    x, t, text = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 32))
    with pytest.raises(ValueError, match="down_blocks.7.*does not have"):
        model_forward(unet, params, x, t, text, attention=AttentionControl(capture=("down_blocks.7.x",)))
    with pytest.raises(ValueError, match="cross-attention layers"):
        model_forward(unet, params, x, t, text,
                      attention=AttentionControl(identity=("mid_block.attentions.0.transformer_blocks.0.attn2",)))
    # a ControlNet carries the same control over its (shared-name) encoder layers
    from jaxcontrol.models.controlnet import controlnet_from_unet
    from jaxcontrol.models.forward import collect_attention_maps

    cn, cp = controlnet_from_unet(unet, params, 0, conditioning_embedding_out_channels=(16, 32))
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    _, state = cn.clone(attention_control=AttentionControl(capture=(name,))).apply(
        {"params": cp}, x, t, text, jnp.zeros((1, 16, 16, 3)), mutable=["attention_maps"])
    maps = collect_attention_maps(state)
    assert list(maps) == [name] and maps[name].shape == (1, 2, 16, 3)
    np.testing.assert_allclose(np.asarray(maps[name]).sum(-1), 1.0, rtol=1e-5)
    assert G.pag_layers(unet.config, ["mid"]) == ("mid_block.attentions.0.transformer_blocks.0.attn1",)
    assert len(G.pag_layers(unet.config, ["up_blocks.1"])) == 2
    with pytest.raises(ConfigError, match="'down_blocks.5' matches no self-attention"):
        G.pag_layers(unet.config, ["down_blocks.5"])


# the pipeline-level SAG parity (test_pipeline_attention.py) stays in the fast set
@pytest.mark.slow
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_sag_matches_diffusers(tiny, guidance_scale):
    _, _, (unet, params) = tiny
    pe, ne, lat = _inputs(1)
    steps, sag_scale = 4, 0.75
    pipe = _pipe(diffusers.StableDiffusionSAGPipeline, tiny, safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    with torch.no_grad():
        ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=lat, num_inference_steps=steps,
                   guidance_scale=guidance_scale, sag_scale=sag_scale, output_type="latent").images.numpy()
    plan = make_plan(SCHEDULER, steps, "ddim")
    base = G.unet_prediction(unet, params)
    rule = G.self_attention_guidance(base, sag_scale, plan, guidance_scale=guidance_scale)
    out = jax.jit(lambda x: sample(rule, plan, initial_latents(plan, x), _cond(pe, ne)))(_nhwc(lat))
    assert _rel(out, ref) < 1e-4
    assert _moved(out, _nhwc(lat), _cond(pe, ne), guidance_scale, plan, base) > 1e-3


def test_sag_is_finite_at_a_zero_snr_step_of_a_v_prediction_model(tiny):
    """alpha_bar = 0 at the first step of a zero-terminal-SNR schedule: x0 and eps come straight from
    v (diffusers' SAG does the same), never through a division by sqrt(alpha_bar)."""
    _, _, (unet, params) = tiny
    config = {**SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
              "timestep_spacing": "trailing"}
    plan = make_plan(config, 4, "ddim")
    assert float(plan.schedule.alpha_bar_at(plan.timesteps[0])) == 0.0
    pe, ne, lat = _inputs(7)
    rule = G.self_attention_guidance(G.unet_prediction(unet, params), 0.75, plan, guidance_scale=5.0)
    out = jax.jit(rule)(_nhwc(lat), jnp.float32(plan.timesteps[0]), _cond(pe, ne))
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("layers,guidance_scale,adaptive", [
    (["mid"], 5.0, 0.0),
    pytest.param(["down_blocks.1", "up"], 4.0, 0.0, marks=pytest.mark.slow),
    pytest.param(["mid"], 1.0, 0.002, marks=pytest.mark.slow)])
def test_pag_matches_diffusers(tiny, layers, guidance_scale, adaptive):
    _, _, (unet, params) = tiny
    pe, ne, lat = _inputs(2)
    steps, pag_scale = 4, 3.0
    pipe = _pipe(diffusers.StableDiffusionPAGPipeline, tiny, safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False, pag_applied_layers=layers)
    with torch.no_grad():
        ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=lat, num_inference_steps=steps,
                   guidance_scale=guidance_scale, pag_scale=pag_scale, pag_adaptive_scale=adaptive,
                   output_type="latent").images.numpy()
    plan = make_plan(SCHEDULER, steps, "ddim")
    base = G.unet_prediction(unet, params)
    rule = G.perturbed_attention_guidance(base, pag_scale, layers=layers, guidance_scale=guidance_scale,
                                          adaptive_scale=adaptive)
    out = jax.jit(lambda x: sample(rule, plan, initial_latents(plan, x), _cond(pe, ne)))(_nhwc(lat))
    assert _rel(out, ref) < 1e-4
    assert _moved(out, _nhwc(lat), _cond(pe, ne), guidance_scale, plan, base) > 1e-3


def _ae_pipe(tiny):
    return _pipe(diffusers.StableDiffusionAttendAndExcitePipeline, tiny, safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)


@pytest.mark.slow
@pytest.mark.parametrize("thresholds,max_iter", [({0: 0.05, 10: 0.5, 20: 0.8}, 3), ({0: 0.9, 2: 0.95}, 2)])
def test_attend_and_excite_matches_diffusers(tiny, thresholds, max_iter):
    """The second case refines at steps 0 and 2 (its thresholds are above the tiny model's peaks),
    and step 2 is past max_iter_to_alter: refinement alone moves the latents there."""
    _, _, (unet, params) = tiny
    pe, ne, lat = _inputs(3, batch=2)
    steps, gs, scale_factor, tokens = 4, 5.0, 20.0, [[2, 5], [3]]
    pipe = _ae_pipe(tiny)
    seen = []
    original = pipe._perform_iterative_refinement_step

    def spy(*a, **k):
        seen.append(k["threshold"])
        return original(*a, **k)

    pipe._perform_iterative_refinement_step = spy
    ref = pipe(None, prompt_embeds=pe, negative_prompt_embeds=ne, latents=lat, num_inference_steps=steps,
               guidance_scale=gs, token_indices=tokens, attn_res=(8, 8), max_iter_to_alter=max_iter,
               thresholds=thresholds, scale_factor=scale_factor, output_type="latent").images.detach().numpy()
    if max_iter == 2:
        assert len(seen) >= 3  # both samples refined at step 0, at least one at step 2
    plan = make_plan(SCHEDULER, steps, "ddim")
    base = G.unet_prediction(unet, params)
    rule = G.attend_and_excite(base, G.classifier_free(base, gs), max_iter_to_alter=max_iter, thresholds=thresholds,
                               scale_factor=scale_factor, attn_res=(8, 8))
    cond = {**_cond(pe, ne), "excite": jnp.asarray(G.token_mask(tokens, 2, SEQ))}
    out = jax.jit(lambda x: sample(rule, plan, initial_latents(plan, x), cond))(_nhwc(lat))
    assert _rel(out, ref) < 1e-4
    assert _moved(out, _nhwc(lat), _cond(pe, ne), gs, plan, base) > 1e-3


def test_attend_and_excite_inputs_are_checked(tiny):
    _, _, (unet, params) = tiny
    with pytest.raises(ConfigError, match="token index 0 is outside 1..7"):
        G.token_mask([0, 2], 1, SEQ)
    with pytest.raises(ConfigError, match="2 lists of token indices for 3 samples"):
        G.token_mask([[1], [2]], 3, SEQ)
    base = G.unet_prediction(unet, params)
    plan = make_plan(SCHEDULER, 2, "ddim")
    pe, _, lat = _inputs(0)
    cond = {"cond": {"text": jnp.asarray(pe.numpy())}, "excite": jnp.asarray(G.token_mask([1], 1, SEQ))}
    with pytest.raises(ConfigError, match=r"attn_res=\(4, 4\).*maps are \[\(4, 2\), \(8, 4\)\]"):
        sample(G.attend_and_excite(base, attn_res=(4, 4)), plan, jnp.zeros((1, 8, 4, 4)), cond)
    with pytest.raises(ConfigError, match="guidance.unet_prediction"):
        G.attend_and_excite(lambda x, t, c: x)
    for bad in ([2.0], [[2], 3], [True]):
        with pytest.raises(ConfigError, match="token"):
            G.token_mask(bad, 1, SEQ)


def test_rescale_needs_cfg_and_sizes_follow_the_downsampling(tiny, tmp_path):
    """guidance_rescale acts only under CFG (as diffusers' PAG pipeline); attention map sizes round
    down when downsample_padding is 0."""
    _, _, (unet, params) = tiny
    base = G.unet_prediction(unet, params)
    pe, ne, lat = _inputs(8)
    run = lambda r: np.asarray(jax.jit(G.attention_guided(base, 1.0, [G.PAG(3.0)], guidance_rescale=r))(  # noqa: E731
        _nhwc(lat), jnp.float32(500.0), _cond(pe, ne)))
    assert np.array_equal(run(0.7), run(0.0))
    config = {**UNET, "downsample_padding": 0}
    torch.manual_seed(1)
    diffusers.UNet2DConditionModel(**config).save_pretrained(tmp_path / "pad0")
    unet0, params0 = load_model(tmp_path / "pad0")
    names = [layer.name for layer in attention_layers(unet0.config)]
    x = jnp.zeros((1, 7, 5, 4))
    _, maps = model_forward(unet0, params0, x, jnp.zeros((1,)), jnp.zeros((1, 3, DIM)),
                            attention=AttentionControl(capture=names))
    for layer in attention_layers(unet0.config):
        h, w = layer.size(7, 5)
        assert maps[layer.name].shape[2] == h * w, layer.name


@pytest.mark.slow
def test_pix2pix_zero_with_inversion_matches_diffusers(tiny):
    """Pix2Pix-Zero's `invert` (DDIM inversion with the auto-correlation and KL regularisers; the
    roll amounts diffusers draws are recorded and replayed) and then its two-pass edit, given the
    caption and sentence embeddings (no captioner)."""
    unet_t, vae, (unet, params) = tiny
    pe, ne, lat = _inputs(4)
    g = torch.Generator().manual_seed(5)
    src, tgt = torch.randn(3, SEQ, DIM, generator=g), torch.randn(2, SEQ, DIM, generator=g)
    steps, gs, amount = 3, 5.0, 0.15
    pipe = _pipe(diffusers.StableDiffusionPix2PixZeroPipeline, tiny, safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False, caption_generator=None, caption_processor=None,
                 inverse_scheduler=diffusers.DDIMInverseScheduler.from_config(SCHEDULER))
    rolls, randint = [], torch.randint

    def recording_randint(high, size, generator=None, **k):
        out = randint(high, size, generator=generator, **k)
        rolls.append(int(out.item()))
        return out

    torch.randint = recording_randint
    try:
        inv = pipe.invert(prompt_embeds=pe, image=lat, num_inference_steps=steps, guidance_scale=1.0,
                          num_reg_steps=2, num_auto_corr_rolls=2, generator=torch.Generator().manual_seed(0),
                          output_type="latent").latents
    finally:
        torch.randint = randint
    with torch.no_grad():
        ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, source_embeds=src, target_embeds=tgt,
                   latents=inv, num_inference_steps=steps, guidance_scale=gs,
                   cross_attention_guidance_amount=amount, output_type="latent").images.numpy()
    base = G.unet_prediction(unet, params)
    inv_plan = make_plan({**SCHEDULER, "_class_name": "DDIMInverseScheduler"}, steps, "ddim_inverse")
    levels = len(G.noise_pyramid_levels(LAT))
    roll_table = jnp.asarray(np.asarray(rolls).reshape(steps, 2, 2, 1, 4, levels))
    invert_rule = G.regularized_inversion(base, inv_plan, num_reg_steps=2, num_auto_corr_rolls=2)
    ours_inv = ddim_invert(invert_rule, inv_plan, _nhwc(lat), {"text": jnp.asarray(pe.numpy()), "rolls": roll_table})
    assert _rel(ours_inv, inv.detach().numpy()) < 1e-4
    plan = make_plan(SCHEDULER, steps, "ddim")
    rule = G.pix2pix_zero(base, gs, cross_attention_guidance_amount=amount)
    cond = {**_cond(pe, ne), "edit_direction": G.edit_direction(src.numpy(), tgt.numpy())}
    x = jnp.concatenate([ours_inv, ours_inv])
    out = jax.jit(lambda x: sample(rule, plan, initial_latents(plan, x), cond))(x)
    assert _rel(out[1:], ref) < 1e-4
    # the reference rows are the source prompt's plain CFG sample; the edit moved away from it
    plain = sample(G.classifier_free(base, gs), plan, initial_latents(plan, ours_inv), _cond(pe, ne))
    assert _rel(out[:1], np.asarray(plain).transpose(0, 3, 1, 2)) < 1e-5
    assert _rel(out[1:], np.asarray(plain).transpose(0, 3, 1, 2)) > 1e-2


# ------------------------------------------------------------------------------------------------
# composition: with CFG and a ControlNet in one scan; weight 0; gradients through the sampler
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_controlnet(tiny):
    from jaxcontrol.models.controlnet import controlnet_from_unet

    _, _, (unet, params) = tiny
    cn, cp = controlnet_from_unet(unet, params, 0, conditioning_embedding_out_channels=(16, 32))
    leaves, tree = jax.tree_util.tree_flatten(cp)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    cp = jax.tree_util.tree_unflatten(tree, [v + 0.05 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])
    image = jax.random.uniform(jax.random.key(2), (1, 2 * LAT, 2 * LAT, 3))
    base = G.unet_prediction(unet, params, controlnets=[G.ControlNetUnit(cn, cp, scale=0.7)])
    pe, ne, lat = _inputs(6)
    cond = {"cond": {"text": jnp.asarray(pe.numpy()), "control": (image,)},
            "uncond": {"text": jnp.asarray(ne.numpy()), "control": (image,)}}
    return base, cond, _nhwc(lat), unet, params, (cn, cp)


def _by_hand(step_fn, plan, x):
    """Our solver's updates, one evaluation at a time, around `step_fn(i, x_in, t) -> (pred, moved x_in)`."""
    update = plan.update_fn()
    state = plan.init_state(x)
    for i in range(plan.num_evals):
        row = {k: jnp.asarray(v[i]) for k, v in plan.rows.items()}
        x_in = state["x"] / row["in_div"]
        pred, moved = step_fn(i, x_in, row["t"])
        state = {**state, "x": state["x"] + (moved - x_in) * row["in_div"]}
        state = update(state, pred, row, jnp.zeros((), jnp.float32))
    return plan.output(state)


@pytest.mark.slow
def test_each_technique_with_cfg_and_a_controlnet_equals_the_rule_by_hand(with_controlnet):
    from jaxcontrol.sampler import StepInfo

    base, cond, x, unet, params, _ = with_controlnet
    plan = make_plan(SCHEDULER, 3, "ddim")
    gs, ab = 5.0, lambda t: plan.schedule.alpha_bar_at(t)
    cb, cu = {"text": cond["cond"]["text"], "control": cond["cond"]["control"]}, cond["uncond"]
    f = jax.jit(lambda z, t, c: base(z, t, c))
    sag_layer = "mid_block.attentions.0.transformer_blocks.0.attn1"
    maps_of = jax.jit(lambda z, t, c, names: base.with_attention(AttentionControl(capture=names))(z, t, c),
                      static_argnums=3)
    pag_names = G.pag_layers(unet.config, ["mid", "up_blocks.0"])
    perturbed = jax.jit(lambda z, t, c: base.with_attention(AttentionControl(identity=pag_names))(z, t, c)[0])

    def sag_pag_step(i, z, t):  # CFG + SAG(0.75) + PAG(2.0), every model call separate
        u, m = maps_of(z, t, cu, (sag_layer,))
        c = f(z, t, cb)
        a = ab(t)
        x0 = (z - jnp.sqrt(1 - a) * u) / jnp.sqrt(a)
        deg = G.sag_degrade(x0, m[sag_layer], unet.config)
        out = u + gs * (c - u) + 0.75 * (u - f(jnp.sqrt(a) * deg + jnp.sqrt(1 - a) * u, t, cu))
        return out + 2.0 * (c - perturbed(z, t, cb)), z

    rule = G.attention_guided(base, gs, [G.SAG(0.75, plan), G.PAG(2.0, ("mid", "up_blocks.0"))])
    scan = jax.jit(lambda x: sample(rule, plan, x, cond))(x)
    hand = _by_hand(sag_pag_step, plan, x)
    assert _rel(scan, np.asarray(hand).transpose(0, 3, 1, 2)) < 1e-5
    assert _moved(scan, x, cond, gs, plan, base) > 1e-3

    # Attend-and-Excite without refinement: one gradient step of its loss, then CFG at the moved latents
    mask = jnp.asarray(G.token_mask([2, 4], 1, SEQ))
    names = tuple(n.name for n in attention_layers(unet.config) if n.cross and n.size(LAT, LAT) == (8, 8))

    def ae_loss(z, t):
        _, m = base.with_attention(AttentionControl(capture=names))(z, t, cb)
        return G.attend_and_excite_loss([m[n] for n in names], mask, (8, 8))[0].sum()

    ae_grad = jax.jit(jax.grad(ae_loss))
    sizes = 20.0 * np.sqrt(np.linspace(1.0, 0.5, 3))

    def ae_step(i, z, t):
        z = z - sizes[i] * ae_grad(z, t) if i < 2 else z
        u, c = f(z, t, cu), f(z, t, cb)
        return u + gs * (c - u), z

    rule = G.attend_and_excite(base, G.classifier_free(base, gs), max_iter_to_alter=2, thresholds={}, attn_res=(8, 8))
    scan = jax.jit(lambda x: sample(rule, plan, x, {**cond, "excite": mask}))(x)
    hand = _by_hand(ae_step, plan, x)
    assert _rel(scan, np.asarray(hand).transpose(0, 3, 1, 2)) < 1e-5
    assert _moved(scan, x, cond, gs, plan, base) > 1e-3

    # Pix2Pix-Zero: the reference trajectory alone, then the edited one against its recorded maps
    direction = jnp.asarray(np.random.default_rng(1).standard_normal((1, SEQ, DIM)) * 0.3, jnp.float32)
    ce = {**cb, "text": cb["text"] + direction}
    cross = tuple(n.name for n in attention_layers(unet.config) if n.name.endswith("attn2"))
    recorded = []

    def ref_step(i, z, t):
        u, mu = maps_of(z, t, cu, cross)
        c, mc = maps_of(z, t, cb, cross)
        recorded.append((mu, mc))
        return u + gs * (c - u), z

    def p2p_loss(zu, zc, t, i):
        _, mu = base.with_attention(AttentionControl(capture=cross))(zu, t, cu)
        _, mc = base.with_attention(AttentionControl(capture=cross))(zc, t, ce)
        total = 0.0
        for n in cross:
            for m, r in ((mu[n], recorded[i][0][n]), (mc[n], recorded[i][1][n])):
                total = total + jnp.sum((m - r) ** 2) / (2 * m.shape[1])  # mean over 2 branches x heads
        return total

    p2p_grad = jax.jit(jax.grad(p2p_loss, argnums=(0, 1)), static_argnums=3)

    def edit_step(i, z, t):
        gu, gc = p2p_grad(z, z, t, i)
        zu, zc = z - 0.2 * gu, z - 0.2 * gc
        u, c = f(zu, t, cu), f(zc, t, ce)
        return u + gs * (c - u), zu

    ref = _by_hand(ref_step, plan, x)
    edit = _by_hand(edit_step, plan, x)
    rule = G.pix2pix_zero(base, gs, cross_attention_guidance_amount=0.2)
    scan = jax.jit(lambda x: sample(rule, plan, x, {**cond, "edit_direction": direction}))(jnp.concatenate([x, x]))
    assert _rel(scan[:1], np.asarray(ref).transpose(0, 3, 1, 2)) < 1e-5
    assert _rel(scan[1:], np.asarray(edit).transpose(0, 3, 1, 2)) < 1e-5
    assert _rel(scan[1:], np.asarray(ref).transpose(0, 3, 1, 2)) > 1e-3
    del StepInfo


@pytest.mark.slow
def test_weight_zero_is_bit_identical(with_controlnet):
    base, cond, x, unet, _, _ = with_controlnet
    plan = make_plan(SCHEDULER, 3, "ddim")
    run = lambda rule, c=cond, x=x: np.asarray(jax.jit(lambda x: sample(rule, plan, x, c))(x))  # noqa: E731
    plain = run(G.classifier_free(base, 5.0))
    for rule in (G.self_attention_guidance(base, 0.0, plan, guidance_scale=5.0),
                 G.perturbed_attention_guidance(base, 0.0, guidance_scale=5.0),
                 G.attention_guided(base, 5.0, [G.SAG(0.0, plan), G.PAG(0.0)])):
        assert np.array_equal(run(rule), plain)
    # a traced zero too (no recompilation between scales)
    traced = jax.jit(lambda s, x: sample(G.attention_guided(base, 5.0, [G.PAG(s), G.SAG(s, plan)]), plan, x, cond))
    assert np.array_equal(np.asarray(traced(0.0, x)), plain)
    excite = {**cond, "excite": jnp.asarray(G.token_mask([2], 1, SEQ))}
    assert np.array_equal(run(G.attend_and_excite(base, G.classifier_free(base, 5.0), scale_factor=0.0,
                                                  thresholds={}), excite), plain)
    # Pix2Pix-Zero with no cross-attention guidance: reference rows = the source prompt, edited rows =
    # the prompt moved by the edit direction, each plain CFG
    direction = jnp.asarray(np.random.default_rng(0).standard_normal((1, SEQ, DIM)), jnp.float32)
    p2p = run(G.pix2pix_zero(base, 5.0, cross_attention_guidance_amount=0.0), {**cond, "edit_direction": direction},
              jnp.concatenate([x, x]))
    moved = {**cond, "cond": {**cond["cond"], "text": cond["cond"]["text"] + direction}}
    assert np.array_equal(p2p[:1], plain)
    assert np.array_equal(p2p[1:], run(G.classifier_free(base, 5.0), moved))


@pytest.mark.slow
def test_gradient_of_an_image_loss_through_a_guided_sample(with_controlnet, tiny, tmp_path):
    """d loss(decoded image) / d guidance scale through 3 steps of CFG + SAG + PAG with a ControlNet."""
    base, cond, x, _, _, _ = with_controlnet
    _, vae_t, _ = tiny
    vae_t.save_pretrained(tmp_path / "vae")
    vae, vae_params = load_model(tmp_path / "vae")
    plan = make_plan(SCHEDULER, 3, "ddim")

    def loss(scales):
        gs, sag = scales[0], scales[1]
        rule = G.attention_guided(base, gs, [G.SAG(sag, plan), G.PAG(2.0)])
        latents = sample(rule, plan, x, cond)
        image = vae.apply({"params": vae_params}, latents / 0.18215, method=vae.decode)
        return jnp.mean((image - 0.2) ** 2)

    scales = jnp.asarray([5.0, 0.75])
    value, grad = jax.jit(jax.value_and_grad(loss))(scales)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    f = jax.jit(loss)
    for k in range(2):
        h = np.zeros(2, np.float32)
        h[k] = 1e-2
        fd = (float(f(scales + h)) - float(f(scales - h))) / 2e-2
        assert abs(float(grad[k]) - fd) <= 1e-2 * max(abs(fd), 1e-3), (k, float(grad[k]), fd)


def test_the_guided_program_does_not_grow_with_the_step_count(tiny):
    """The scan keeps a 50-step attention-guided sampler the same program as a 20-step one (only
    the plan's tables grow), which is why its compile time does not grow; the times themselves
    are measured by benchmarks/attention_guidance.py."""
    _, _, (unet, params) = tiny
    base = G.unet_prediction(unet, params)
    pe, ne, lat = _inputs(0)
    cond = {**_cond(pe, ne), "excite": jnp.asarray(G.token_mask([2], 1, SEQ))}
    sizes = []
    for steps in (20, 50):
        plan = make_plan(SCHEDULER, steps, "ddim")
        rule = G.attend_and_excite(base, G.attention_guided(base, 5.0, [G.SAG(0.75, plan), G.PAG(2.0)]),
                                   attn_res=(8, 8), max_iter_to_alter=steps // 2)
        text = jax.jit(lambda x: sample(rule, plan, initial_latents(plan, x), cond)).lower(_nhwc(lat)).as_text()
        sizes.append(len([line for line in text.splitlines() if "=" in line]))
    assert sizes[1] <= 1.02 * sizes[0], sizes
