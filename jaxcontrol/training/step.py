"""The training step and the validation sampler, as pure functions of (params, batch).

    loss_fn = make_loss_fn(nets, config)            # (trainable, frozen, micro_batch, key) -> (loss, aux)
    step = make_train_step(nets, config, tx, schedule)
    state, metrics = step(state, frozen, batch)     # batch leaves: (grad_accum_steps, micro_batch, ...)

One call is one optimizer update: the micro-batches are scanned (`lax.scan`), their gradients
averaged, clipped and applied once, so the learning-rate schedule and the EMA count optimizer
steps and nothing but the state needs checkpointing. `jit_train_step` compiles it with explicit
in/out shardings and the state donated.

A micro-batch holds either pixels (`pixel_values` in [-1, 1], encoded by the frozen VAE in the
step) or precomputed `latents` (posterior moments, sampled in the step as diffusers does), and
either `input_ids` (encoded by the frozen text encoder) or precomputed `encoder_hidden_states`;
plus `conditioning_pixel_values` in [0, 1] for ControlNets and adapters, and for InstructPix2Pix
the image to edit (its VAE mode, unscaled, is concatenated to the noisy latents).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ..guidance import ControlNetUnit, adapter_features, classifier_free, instruct_pix2pix, unet_prediction
from ..models.forward import ControlNetCall, model_forward
from ..models.vae import sample_posterior, scale_latents, split_moments, unscale_latents
from ..pipeline import encode_prompt_xl
from ..sampler import initial_latents, sample
from . import losses
from .config import timestep_sampling, trains_text_encoder
from .networks import Networks, text_encoder_params, unet_params
from .remat import remat_scope
from .state import TrainState, update_ema

DEVICE_KEYS = ("pixel_values", "latents", "input_ids", "input_ids_2", "encoder_hidden_states", "text_embeds",
               "conditioning_pixel_values", "class_pixel_values", "class_input_ids")


def encode_prompts(nets: Networks, frozen: dict, ids: jax.Array, trainable: dict | None = None) -> jax.Array:
    """The text encoder's last hidden state (B, 77, D) float32 for token ids (B, 77): frozen, or
    with what the run trains in it (`trainable`: weights, LoRA factors, new words' rows)."""
    params = text_encoder_params(trainable or {}, frozen)
    out = nets.text_encoder.apply({"params": params}, ids)
    return out.last_hidden_state.astype(jnp.float32)


def encode_prompts_xl(nets: Networks, frozen: dict, ids: jax.Array, ids_2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SDXL's text conditioning of token ids by its two frozen encoders, as its pipeline encodes a
    prompt (`pipeline.encode_prompt_xl`): (penultimate states concatenated (B, 77, D1 + D2), pooled
    projection of the second (B, P)), float32."""
    modules = {"text_encoder": nets.text_encoder, "text_encoder_2": nets.text_encoder_2}
    text, pooled = encode_prompt_xl(modules, frozen, {"text_encoder": ids, "text_encoder_2": ids_2}, None)
    return text.astype(jnp.float32), pooled.astype(jnp.float32)


def xl_added(nets: Networks, pooled: jax.Array) -> dict:
    """SDXL's `added_cond_kwargs` for a batch: the pooled text and the run's micro-conditioning."""
    time_ids = jnp.broadcast_to(jnp.asarray(nets.time_ids, jnp.float32), (pooled.shape[0], len(nets.time_ids)))
    return {"text_embeds": pooled, "time_ids": time_ids}


def model_prediction(nets: Networks, config, trainable: dict, frozen: dict, noisy: jax.Array, t: jax.Array,
                     context: jax.Array, cond: jax.Array | None, concat: jax.Array | None = None,
                     added: dict | None = None) -> jax.Array:
    """The trained model's prediction for `noisy` latents: U-Net plus ControlNet / adapter, per the
    task, through the one `model_forward` that sampling uses too (`added`: SDXL's pooled text and
    micro-conditioning). The blocks `config.remat` names are rematerialised, and with
    `config.remat.attention` every attention layer."""
    calls = []
    if nets.controlnet is not None:  # small_scale: the paper's small-scale training, the mid block only
        calls.append(ControlNetCall(nets.controlnet, trainable["controlnet"], cond,
                                    scale=float(config.controlnet.conditioning_scale),
                                    mid_block_only=bool(config.controlnet.small_scale)))
    feats = None
    if nets.adapter is not None:
        feats = adapter_features(nets.adapter, trainable["adapter"], cond, float(config.adapter.conditioning_scale))

    def scope(name: str):
        return remat_scope(getattr(config.remat, name), config.remat.policy, attention=bool(getattr(config.remat, "attention", False)))

    return model_forward(nets.unet, unet_params(trainable, frozen), noisy, t, context, controlnets=calls,
                         adapter_features=feats, scope=scope, concat=concat, added=added)


def image_latents(nets: Networks, frozen: dict, images: jax.Array) -> jax.Array:
    """InstructPix2Pix's image condition: the frozen VAE's posterior mode (unscaled, as diffusers'
    pipeline and training script use it) of `images` (B, H, W, 3) in [0, 1]; float32."""
    moments = nets.vae.apply({"params": frozen["vae"]}, images * 2.0 - 1.0, method=nets.vae.encode)
    return split_moments(moments.astype(jnp.float32))[0]


def make_vae_loss_fn(nets: Networks, config) -> Callable:
    """task="vae": reconstruction of a posterior sample plus `kl_weight` x KL(posterior || N(0, I)).

    The KL is summed over latent elements and averaged over the batch, the reconstruction error
    averaged over pixels, as in diffusers' VAE fine-tuning scripts.
    """
    vae = nets.vae
    l1 = config.vae.reconstruction_loss == "l1"
    kl_weight = float(config.vae.kl_weight)

    def loss_fn(trainable, frozen, batch, key):
        del frozen
        x = batch["pixel_values"].astype(jnp.float32)
        moments = vae.apply({"params": trainable["vae"]}, x, method=vae.encode)
        z = sample_posterior(moments, key)
        rec = vae.apply({"params": trainable["vae"]}, z, method=vae.decode)
        err = jnp.abs(rec - x) if l1 else jnp.square(rec - x)
        reconstruction = jnp.mean(err)
        mean, logvar = split_moments(moments)
        kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
        kl = jnp.mean(kl)
        return reconstruction + kl_weight * kl, {"reconstruction": reconstruction, "kl": kl}

    return loss_fn


def make_loss_fn(nets: Networks, config) -> Callable:
    """(trainable, frozen, micro_batch, key) -> (loss, aux): the whole objective of one micro-batch;
    aux holds the draws ({"timesteps", "noise"}), so that a test can recompute the loss elsewhere."""
    if nets.task == "vae":
        return make_vae_loss_fn(nets, config)
    schedule = nets.schedule
    sampling = timestep_sampling(config)
    snr_gamma = float(config.loss.snr_gamma)
    noise_offset = float(config.loss.noise_offset)
    p_empty = float(config.loss.proportion_empty_prompts)
    pred_type = nets.prediction_type
    needs_cond = nets.controlnet is not None or nets.adapter is not None
    instruct = nets.task == "instruct_pix2pix"
    p_instruct = float(config.instruct_pix2pix.conditioning_dropout_prob)
    text_trains = trains_text_encoder(config)
    xl = nets.xl
    prior_weight = float(config.dreambooth.prior_loss_weight)

    def loss_fn(trainable, frozen, batch, key):
        n_instance = None
        if "class_pixel_values" in batch:  # DreamBooth's prior preservation: instance rows, then class rows
            n_instance = batch["pixel_values"].shape[0]
            batch = {**batch, "pixel_values": jnp.concatenate([batch["pixel_values"], batch["class_pixel_values"]]),
                     "input_ids": jnp.concatenate([batch["input_ids"], batch["class_input_ids"]])}
        k_lat, k_noise, k_off, k_t, k_drop = jax.random.split(key, 5)
        drop_text = drop_image = None
        if instruct:
            drop_text, drop_image = losses.instruct_dropout(k_drop, batch["conditioning_pixel_values"].shape[0],
                                                            p_instruct)
        if "latents" in batch:
            moments = batch["latents"].astype(jnp.float32)
        else:
            moments = nets.vae.apply({"params": frozen["vae"]}, batch["pixel_values"], method=nets.vae.encode)
        latents = scale_latents(sample_posterior(moments, k_lat), nets.vae.config)
        pooled = None
        if "encoder_hidden_states" in batch:
            context = batch["encoder_hidden_states"].astype(jnp.float32)
            pooled = batch["text_embeds"].astype(jnp.float32) if xl else None
            if instruct:
                context = losses.replace_rows(drop_text, context, frozen["empty_prompt"])
            elif p_empty:  # the same rows of both (k_drop draws one uniform per row)
                context = losses.drop_prompts(k_drop, context, frozen.get("empty_prompt"), p_empty)
                if xl:
                    pooled = losses.drop_prompts(k_drop, pooled, frozen.get("empty_pooled"), p_empty)
        elif xl:  # as diffusers' SDXL scripts: a dropped caption is "" for both tokenizers
            ids = losses.drop_prompts(k_drop, batch["input_ids"], jnp.asarray(nets.empty_ids), p_empty)
            ids_2 = losses.drop_prompts(k_drop, batch["input_ids_2"], jnp.asarray(nets.empty_ids_2), p_empty)
            context, pooled = encode_prompts_xl(nets, frozen, ids, ids_2)
        else:
            empty = jnp.asarray(nets.empty_ids)
            ids = losses.replace_rows(drop_text, batch["input_ids"], empty) if instruct else \
                losses.drop_prompts(k_drop, batch["input_ids"], empty, p_empty)
            context = encode_prompts(nets, frozen, ids, trainable)
        concat = None
        if instruct:
            concat = losses.replace_rows(drop_image, image_latents(nets, frozen, batch["conditioning_pixel_values"]),
                                         jnp.zeros((), jnp.float32))
            concat = jax.lax.stop_gradient(concat)
        latents = jax.lax.stop_gradient(latents)
        if not text_trains:  # the gradient reaches the text encoder only when it (or a word of it) trains
            context = jax.lax.stop_gradient(context)
        b = latents.shape[0]
        noise = losses.offset_noise(k_off, jax.random.normal(k_noise, latents.shape, jnp.float32), noise_offset)
        t = losses.sample_timesteps(k_t, b, schedule.num_train_timesteps, sampling)
        noisy = schedule.add_noise(latents, noise, t)
        target = losses.prediction_target(schedule, latents, noise, t, pred_type)
        cond = batch["conditioning_pixel_values"] if needs_cond else None
        added = None if pooled is None else xl_added(nets, jax.lax.stop_gradient(pooled))
        pred = model_prediction(nets, config, trainable, frozen, noisy, t, context, cond, concat, added)
        weights = losses.min_snr_weights(schedule, t, snr_gamma, pred_type) if snr_gamma > 0 else None
        if n_instance is not None:  # mean over instance rows + prior_loss_weight x mean over class rows
            rows = losses.prior_preservation_weights(n_instance, b - n_instance, prior_weight)
            weights = rows if weights is None else weights * rows
        return losses.diffusion_loss(pred, target, weights), {"timesteps": t, "noise": noise}

    return loss_fn


def make_train_step(nets: Networks, config, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    loss_fn: Callable | None = None) -> Callable:
    """(state, frozen, batch) -> (state, metrics). Pure; see `jit_train_step` for the compiled form."""
    loss_fn = loss_fn or make_loss_fn(nets, config)
    accum = int(config.grad_accum_steps)
    ema_decay = float(config.optim.ema_decay)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, frozen: dict, batch: dict):
        key, step_key = jax.random.split(state.key)
        if accum == 1:
            (loss, _), grads = grad_fn(state.params, frozen, jax.tree_util.tree_map(lambda a: a[0], batch), step_key)
        else:
            def micro(carry, xs):
                g_acc, l_acc = carry
                mb, i = xs
                (loss, _), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(step_key, i))
                return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + loss), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            (grads, loss), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)),
                                            (batch, jnp.arange(accum, dtype=jnp.int32)))
            grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
            loss = loss / accum
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema = update_ema(state.ema, params, step, ema_decay) if ema_decay > 0 else state.ema
        new = state.replace(step=step, params=params, opt_state=opt_state, ema=ema,
                            rng=jax.random.key_data(key))
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr_schedule(state.step)}
        return new, metrics

    return train_step


def jit_train_step(train_step: Callable, state_sharding: Any, frozen_sharding: Any, batch_sharding: Any,
                   metrics_sharding: Any, compiler_options: dict | None = None) -> Callable:
    """`jax.jit` with explicit shardings; the state (argument 0) is donated."""
    return jax.jit(train_step, in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                   out_shardings=(state_sharding, metrics_sharding), donate_argnums=(0,),
                   compiler_options=compiler_options or None)


# ------------------------------------------------------------------------------------------------
# validation images
# ------------------------------------------------------------------------------------------------


def make_sample_fn(nets: Networks, config, plan) -> Callable:
    """(trainable, frozen, ids, negative_ids, cond_images, noise, key) -> images (B, H, W, 3) in [-1, 1].

    `ids` / `negative_ids`: token ids (B, 77), or for SDXL `Networks.prompt_ids`' dict of both
    tokenizers'. SDXL's negative branch is zero, as its pipeline makes an empty negative prompt
    with `force_zeros_for_empty_prompt` (the validation's negative prompt is empty)."""
    guidance = float(config.validation.guidance_scale)
    image_guidance = float(config.validation.image_guidance_scale)

    def branch(frozen, trainable, ids, zero=False):
        if not nets.xl:
            return {"text": encode_prompts(nets, frozen, ids, trainable)}
        text, pooled = encode_prompts_xl(nets, frozen, ids["input_ids"], ids["input_ids_2"])
        if zero:
            text, pooled = jnp.zeros_like(text), jnp.zeros_like(pooled)
        return {"text": text, "added": xl_added(nets, pooled)}

    def sample_fn(trainable, frozen, ids, neg_ids, cond_images, noise, key):
        branch_c = branch(frozen, trainable, ids)
        branch_u = branch(frozen, trainable, neg_ids, zero=nets.force_zeros_for_empty_prompt)
        params = unet_params(trainable, frozen)
        units = []
        if nets.controlnet is not None:
            units = [ControlNetUnit(nets.controlnet, trainable["controlnet"],
                                    scale=float(config.controlnet.conditioning_scale))]
        model = unet_prediction(nets.unet, params, controlnets=units)
        if units:
            branch_c["control"] = branch_u["control"] = (cond_images,)
        if nets.adapter is not None:
            feats = adapter_features(nets.adapter, trainable["adapter"], cond_images,
                                     float(config.adapter.conditioning_scale))
            branch_c["adapter"] = branch_u["adapter"] = feats
        if nets.task == "instruct_pix2pix":  # cond_images: the images to edit; diffusers' branch order
            image = image_latents(nets, frozen, cond_images)
            branches = {"cond": {**branch_c, "concat": image}, "image_cond": {**branch_u, "concat": image},
                        "uncond": {**branch_u, "concat": jnp.zeros_like(image)}}
            model = instruct_pix2pix(model, guidance, image_guidance)
        else:
            branches = {"cond": branch_c, "uncond": branch_u}
            model = classifier_free(model, guidance)
        latents = sample(model, plan, initial_latents(plan, noise), branches, key=key)
        images = nets.vae.apply({"params": frozen["vae"]}, unscale_latents(latents, nets.vae.config),
                                method=nets.vae.decode)
        return jnp.clip(images, -1.0, 1.0)

    return sample_fn
