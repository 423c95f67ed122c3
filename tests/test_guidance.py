"""Guidance rules on a 2-D Gaussian mixture whose scores are exact, and the sampler's editing modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol import guidance as G
from jaxcontrol.sampler import Inpaint, ddim_invert, initial_latents, inpaint, repaint, sample
from jaxcontrol.schedulers import NoiseSchedule, make_betas, make_plan
from jaxcontrol.testing.solver_parity import SD_BETAS

MU = np.array([[-2.0, 0.0], [2.0, 0.0]], np.float32)  # component means
SIGMA_D = 0.3  # component std
DDIM = {**SD_BETAS, "_class_name": "DDIMScheduler", "clip_sample": False, "set_alpha_to_one": True}
SCHEDULE = NoiseSchedule(make_betas(**{k: v for k, v in SD_BETAS.items()}))


def _mixture_terms(x, t):
    """Per-component log N(x; sqrt(abar) mu_k, s^2 I) and the component scores, at timestep t."""
    ab = SCHEDULE.alpha_bar_at(t)
    ab = ab.reshape(ab.shape + (1,) * 3) if ab.ndim else ab  # (B, 1, 1, 1) for per-sample t
    var = ab * SIGMA_D**2 + 1 - ab
    centred = x[..., None, :] - jnp.sqrt(ab)[..., None] * MU  # (B, H, W, K, 2)
    logn = -0.5 * jnp.sum(centred**2, -1) / var - jnp.log(2 * jnp.pi * var)
    return logn, -centred / var[..., None], ab


def eps_mixture(x, t, cond):
    """Exact epsilon of the equal-weight mixture: -sqrt(1 - abar) grad log p_t(x)."""
    logn, scores, ab = _mixture_terms(x, t)
    r = jax.nn.softmax(logn, axis=-1)
    return -jnp.sqrt(1 - ab) * jnp.sum(r[..., None] * scores, axis=-2)


def eps_component(x, t, cond):
    """Exact epsilon of component cond['label'] alone; a branch model for CFG."""
    _, scores, ab = _mixture_terms(x, t)
    onehot = jax.nn.one_hot(cond["label"], 2)[:, None, None, :, None]
    return -jnp.sqrt(1 - ab) * jnp.sum(onehot * scores, axis=-2)


def eps_branch(x, t, cond):
    """Unconditional where label < 0, else the component: one model for both CFG branches."""
    label = cond["label"][:, None, None, None]
    return jnp.where(label < 0, eps_mixture(x, t, cond), eps_component(x, t, {"label": jnp.maximum(cond["label"], 0)}))


def log_prob_component(x, t, cond):
    """Exact log p(y | x_t) of the mixture (the Bayes classifier)."""
    logn, _, _ = _mixture_terms(x, t)
    logp = jax.nn.log_softmax(logn, axis=-1)
    return jnp.take_along_axis(logp, cond["label"][:, None, None, None], axis=-1).sum(axis=(1, 2, 3))


N = 2000


def _noise(seed=0):
    return jax.random.normal(jax.random.key(seed), (N, 1, 1, 2))


def _run(model, cond, steps=40, solver="ddim", seed=0):
    plan = make_plan(DDIM, steps, solver)
    return np.asarray(jax.jit(lambda z: sample(model, plan, initial_latents(plan, z), cond))(_noise(seed)))[:, 0, 0]


def _stats(x):
    left = x[:, 0] < 0
    comp = x[left] if left.mean() > 0.5 else x[~left]
    return left.mean(), comp.mean(0), comp.std(0)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "euler", "unipc"])
def test_sampler_recovers_the_mixture(solver):
    x = _run(eps_mixture, {}, steps=30, solver=solver)
    left = x[:, 0] < 0
    assert abs(left.mean() - 0.5) < 0.05
    for side, mu in ((left, MU[0]), (~left, MU[1])):
        np.testing.assert_allclose(x[side].mean(0), mu, atol=0.06)
        np.testing.assert_allclose(x[side].std(0), SIGMA_D, rtol=0.15)


def test_classifier_guidance_with_weight_one_is_the_conditional():
    """grad log p(x) + grad log p(y|x) = grad log p(x|y): w = 1 samples component y exactly."""
    cond = {"label": jnp.zeros((N,), jnp.int32)}
    fractions = []
    for w in (0.0, 0.5, 1.0, 3.0):
        x = _run(G.classifier_guidance(eps_mixture, log_prob_component, w, SCHEDULE, prediction_type="epsilon"), cond)
        fractions.append((x[:, 0] < 0).mean())
        if w == 1.0:
            frac, mean, std = _stats(x)
            assert frac > 0.99
            np.testing.assert_allclose(mean, MU[0], atol=0.06)
            np.testing.assert_allclose(std, SIGMA_D, rtol=0.15)
    assert abs(fractions[0] - 0.5) < 0.05
    assert fractions == sorted(fractions) and fractions[-1] > 0.99


def test_cfg_moves_samples_to_the_chosen_component():
    cond = {"cond": {"label": jnp.ones((N,), jnp.int32)}, "uncond": {"label": -jnp.ones((N,), jnp.int32)}}
    means = {}
    for scale in (1.0, 3.0):
        x = _run(G.classifier_free(eps_branch, jnp.float32(scale)), cond)
        assert (x[:, 0] > 0).mean() > 0.99
        means[scale] = x[x[:, 0] > 0].mean(0)
    # s = 1 is the conditional; s > 1 also pushes away from the unconditional, past the mode
    np.testing.assert_allclose(means[1.0], MU[1], atol=0.06)
    assert means[3.0][0] > means[1.0][0] + 0.1
    # scale 1 (static) is the conditional model itself
    plain = _run(eps_component, {"label": jnp.ones((N,), jnp.int32)})
    np.testing.assert_array_equal(_run(G.classifier_free(eps_branch, 1.0), cond), plain)


def test_zero_weight_reproduces_the_unguided_sample_bit_for_bit():
    cond = {"label": jnp.zeros((N,), jnp.int32)}
    base = _run(eps_mixture, cond)
    zero = jnp.float32(0.0)  # traced, so the guidance really runs
    np.testing.assert_array_equal(_run(G.classifier_guidance(eps_mixture, log_prob_component, zero, SCHEDULE,
                                                         prediction_type="epsilon"), cond),
                                  base)
    cfg_cond = {"cond": {"label": jnp.ones((N,), jnp.int32)}, "uncond": {"label": -jnp.ones((N,), jnp.int32)}}
    cfg = _run(G.classifier_free(eps_branch, 2.0), cfg_cond)
    sega_cond = {**cfg_cond, "concepts": [{"label": jnp.zeros((N,), jnp.int32)}]}
    off = G.sega(eps_branch, 2.0, [G.SegaConcept(edit_guidance_scale=0.0, edit_warmup_steps=2)])
    np.testing.assert_array_equal(_run(off, sega_cond), cfg)


def test_composition_equals_applying_rules_by_hand():
    x = jax.random.normal(jax.random.key(1), (8, 1, 1, 2))
    t = jnp.float32(600.0)
    cond = {"cond": {"label": jnp.ones((8,), jnp.int32)}, "uncond": {"label": -jnp.ones((8,), jnp.int32)}}
    stacked = G.classifier_guidance(G.classifier_free(eps_branch, 4.0), lambda z, t, c: log_prob_component(
        z, t, {"label": jnp.zeros((8,), jnp.int32)}), 2.0, SCHEDULE, prediction_type="epsilon")
    ab = SCHEDULE.alpha_bar_at(t)
    eps_u = eps_mixture(x, t, {})
    eps_c = eps_component(x, t, {"label": jnp.ones((8,), jnp.int32)})
    grad = jax.grad(lambda z: log_prob_component(z, t, {"label": jnp.zeros((8,), jnp.int32)}).sum())(x)
    by_hand = eps_u + 4.0 * (eps_c - eps_u) - 2.0 * jnp.sqrt(1 - ab) * grad
    np.testing.assert_allclose(stacked(x, t, cond), by_hand, rtol=1e-6, atol=1e-6)
    # Composable Diffusion with one concept is CFG
    comp = G.composable(eps_branch, [4.0])(x, t, {"uncond": cond["uncond"], "concepts": [cond["cond"]]})
    np.testing.assert_array_equal(comp, G.classifier_free(eps_branch, 4.0)(x, t, cond))
    # AND / NOT: weights +w and -w on the two components cancel their pulls where they are symmetric
    both = G.composable(eps_branch, [1.0, -1.0])(x, t, {"uncond": cond["uncond"], "concepts": [
        {"label": jnp.ones((8,), jnp.int32)}, {"label": jnp.zeros((8,), jnp.int32)}]})
    np.testing.assert_allclose(both, eps_u + (eps_c - eps_component(x, t, {"label": jnp.zeros((8,), jnp.int32)})),
                               rtol=1e-5, atol=1e-6)


def test_guidance_rules_work_under_vmap_and_in_v_parameterisation():
    x = jax.random.normal(jax.random.key(2), (4, 1, 1, 2))
    t = jnp.array([900.0, 500.0, 100.0, 10.0])
    rule = G.classifier_guidance(eps_mixture, log_prob_component, 1.5, SCHEDULE, prediction_type="epsilon")
    cond = {"label": jnp.array([0, 1, 0, 1])}
    batched = rule(x, t, cond)
    one_by_one = jax.vmap(lambda xi, ti, li: rule(xi[None], ti, {"label": li[None]})[0])(x, t, cond["label"])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-6, atol=1e-7)
    # the same guidance through a v-prediction model: convert, guide, convert back agree
    ab = SCHEDULE.alpha_bar_at(t)[:, None, None, None]

    def v_model(x, t, c):
        return G.from_epsilon(eps_mixture(x, t, c), x, SCHEDULE.alpha_bar_at(t), "v_prediction")

    v_rule = G.classifier_guidance(v_model, log_prob_component, 1.5, SCHEDULE, prediction_type="v_prediction")
    np.testing.assert_allclose(G.to_epsilon(v_rule(x, t, cond), x, ab, "v_prediction"), batched, rtol=1e-4, atol=1e-5)


def test_grad_through_a_whole_sampling_run():
    """d(sample)/d(guidance scale) and d(sample)/d(x_T) by jax.grad match finite differences."""
    cond = {"cond": {"label": jnp.ones((16,), jnp.int32)}, "uncond": {"label": -jnp.ones((16,), jnp.int32)}}
    plan = make_plan({**SD_BETAS, "_class_name": "EulerDiscreteScheduler"}, 8)
    z = jax.random.normal(jax.random.key(3), (16, 1, 1, 2))

    def loss(scale, z):
        x = sample(G.classifier_free(eps_branch, scale), plan, initial_latents(plan, z), cond)
        return jnp.sum(x[..., 0] * jnp.arange(16.0)[:, None, None])

    g_scale, g_z = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.float32(2.0), z)
    h = 1e-2
    fd = (loss(2.0 + h, z) - loss(2.0 - h, z)) / (2 * h)
    np.testing.assert_allclose(g_scale, fd, rtol=2e-2)
    dz = jnp.zeros_like(z).at[3, 0, 0, 0].set(h)
    fd_z = (loss(2.0, z + dz) - loss(2.0, z - dz)) / (2 * h)
    np.testing.assert_allclose(g_z[3, 0, 0, 0], fd_z, rtol=2e-2)


def test_vmap_over_seeds_equals_separate_runs():
    plan = make_plan({**SD_BETAS, "_class_name": "EulerAncestralDiscreteScheduler"}, 6)
    z = jax.random.normal(jax.random.key(4), (3, 2, 1, 1, 2))
    keys = jax.random.split(jax.random.key(5), 3)
    run = jax.jit(lambda z, k: sample(eps_mixture, plan, initial_latents(plan, z), {}, key=k))
    batched = jax.vmap(run)(z, keys)
    for i in range(3):
        np.testing.assert_allclose(batched[i], run(z[i], keys[i]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver", ["ddim", "euler", "dpmpp_2m"])
def test_inpainting_keeps_the_known_region(solver):
    shape = (2, 6, 6, 2)
    known = jax.random.normal(jax.random.key(6), shape)
    noise = jax.random.normal(jax.random.key(7), shape)
    mask = jnp.zeros(shape[:3] + (1,)).at[:, :, 3:].set(1.0)  # regenerate the right half
    plan = make_plan(DDIM, 10, solver)
    out = jax.jit(lambda k, n: inpaint(eps_mixture, plan, k, mask, n, {}))(known, noise)
    np.testing.assert_allclose(np.asarray(out)[:, :, :3], np.asarray(known)[:, :, :3], rtol=0, atol=1e-6)
    assert np.abs(np.asarray(out)[:, :, 3:] - np.asarray(known)[:, :, 3:]).max() > 0.1
    # img2img-strength inpainting starts from the noised original
    plan = make_plan(DDIM, 10, solver, strength=0.5)
    out = inpaint(eps_mixture, plan, known, mask, noise, {})
    np.testing.assert_allclose(np.asarray(out)[:, :, :3], np.asarray(known)[:, :, :3], atol=1e-6)


def test_repaint_keeps_the_known_region_and_resamples():
    shape = (2, 4, 4, 2)
    known = jax.random.normal(jax.random.key(8), shape)
    mask = jnp.zeros(shape[:3] + (1,)).at[:, 2:].set(1.0)
    out = jax.jit(lambda k: repaint(eps_mixture, SCHEDULE, k, mask, jax.random.key(9), {}, prediction_type="epsilon",
                                    num_inference_steps=10, jump_length=2, jump_n_sample=2))(known)
    np.testing.assert_allclose(np.asarray(out)[:, :2], np.asarray(known)[:, :2], atol=1e-6)
    assert np.isfinite(np.asarray(out)).all()


def test_ddim_inversion_round_trip():
    """Inverting with DDIM then sampling with DDIM returns the start (the ODE is reversible)."""
    x0 = jnp.asarray(np.random.default_rng(0).normal(size=(64, 1, 1, 2)).astype(np.float32) * 0.3 + MU[1])
    inv = make_plan({**DDIM, "_class_name": "DDIMInverseScheduler"}, 50, "ddim_inverse")
    fwd = make_plan(DDIM, 50, "ddim")
    xT = ddim_invert(eps_mixture, inv, x0, {})
    back = sample(eps_mixture, fwd, xT, {})
    assert np.abs(np.asarray(back) - np.asarray(x0)).max() < 0.1  # first-order error of DDIM inversion
    assert np.abs(np.asarray(xT)).std() > 0.5  # it really went to noise


def test_inpaint_tuple_is_exported():
    assert Inpaint._fields == ("known", "mask", "noise")


def test_sega_edit_pulls_toward_the_concept_after_warmup():
    """A SEGA edit toward component 0 moves CFG samples of component 1 left; warm-up past the end disables it."""
    n = 512
    cond = {"cond": {"label": jnp.ones((n,), jnp.int32)}, "uncond": {"label": -jnp.ones((n,), jnp.int32)},
            "concepts": [{"label": jnp.zeros((n,), jnp.int32)}]}
    plan = make_plan(DDIM, 20)
    z = _noise(1)[:n]

    def run(rule):
        return np.asarray(jax.jit(lambda z: sample(rule, plan, initial_latents(plan, z), cond))(z))[:, 0, 0]

    base = run(G.sega(eps_branch, 2.0, [G.SegaConcept(edit_guidance_scale=0.0)]))
    edited = run(G.sega(eps_branch, 2.0, [G.SegaConcept(edit_guidance_scale=3.0, edit_warmup_steps=2,
                                                          edit_threshold=0.0)]))
    late = run(G.sega(eps_branch, 2.0, [G.SegaConcept(edit_guidance_scale=3.0, edit_warmup_steps=50)]))
    assert edited[:, 0].mean() < base[:, 0].mean() - 0.2
    np.testing.assert_array_equal(late, base)
