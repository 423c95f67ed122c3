"""The networks a run needs, their parameters, and which of them train.

    nets, trainable, frozen = build_networks(config, workdir)

`nets` holds the modules, the tokenizer and the noise schedule; `trainable` and `frozen` are
`{component: params}` dicts. What trains, by `config.task`:

| task | trainable | frozen |
| --- | --- | --- |
| controlnet | `controlnet` (+ the U-Net decoder with `controlnet.unlock_unet`) | U-Net, VAE, text encoder |
| adapter | `adapter` | U-Net, VAE, text encoder |
| unet | `unet` | VAE, text encoder |
| vae | `vae` | (the text encoder and U-Net are built but unused) |
| instruct_pix2pix | `unet`, its input widened by the latent channels (new ones zero) | VAE, text encoder |
| lora | `lora`: {"unet": factors, "text_encoder": factors with `lora.text_encoder`} | U-Net, VAE, text encoder (+ `lora_multipliers`) |
| textual_inversion | `token_embeddings` (num_vectors, dim): the new words' rows | U-Net, VAE, text encoder with the rows added (+ `placeholder_ids`) |
| dreambooth | `unet` (+ `text_encoder` with `dreambooth.train_text_encoder`), or `lora` with `dreambooth.use_lora` | VAE (+ the rest) |

A LoRA run (task lora, or dreambooth with use_lora) that names `textual_inversion.placeholder_token`
trains the new word's `token_embeddings` with its factors ("pivotal tuning").

"Unlocking" follows the ControlNet paper's `sd_locked=False`: the U-Net's up blocks and output
layers (`up_blocks_*`, `conv_norm_out`, `conv_out`) train with the ControlNet, the encoder stays
frozen. `unet_params(trainable, frozen)` and `text_encoder_params(trainable, frozen)` put the
U-Net and the text encoder back together: trained parts, LoRA deltas and new embedding rows
included, as pure functions that the step differentiates through.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..convert import load_model
from ..convert.pipeline_folder import load_pipeline
from ..platform import to_dtype
from ..errors import ConfigError
from ..models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    CLIPTextModel,
    ControlNetModel,
    T2IAdapter,
    T2IAdapterConfig,
    UNet2DConditionConfig,
    UNet2DConditionModel,
    controlnet_from_unet,
    init_params,
)
from ..models.clip import CLIPTextConfig
from ..models.lora import init_lora, lora_targets, with_loras
from ..models.params import flatten, unflatten
from ..schedulers import NoiseSchedule, SchedulerConfig
from ..tokenizer import load_tokenizer, tokenize
from .config import SD_SCHEDULER, to_plain, trains_new_word, uses_lora

# the U-Net's decoder, in the ControlNet paper's "unlocked" mode
UNET_DECODER = ("up_blocks_", "conv_norm_out", "conv_out")


@dataclasses.dataclass
class Networks:
    """Modules and everything around them that is not a parameter."""

    task: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Any
    scheduler_config: dict  # diffusers scheduler_config.json (with _class_name)
    schedule: NoiseSchedule
    prediction_type: str
    controlnet: ControlNetModel | None = None
    adapter: T2IAdapter | None = None
    empty_ids: np.ndarray | None = None  # (1, L) token ids of the empty prompt
    lora_config: dict | None = None  # LoRA runs: {"rank", "alpha", "targets": {network: [modules]}}
    placeholder: tuple[str, tuple[str, ...]] | None = None  # textual inversion: (word, the tokens it spans)
    # SDXL (a U-Net with addition_embed_type="text_time"): the second text encoder (OpenCLIP bigG,
    # with projection) and its tokenizer, the micro-conditioning every training example gets
    # (original size, crop top-left, target size: (6,) float32), and the pipeline's rule for the
    # empty negative prompt at validation
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    empty_ids_2: np.ndarray | None = None  # (1, L) the empty prompt by tokenizer_2
    time_ids: np.ndarray | None = None
    force_zeros_for_empty_prompt: bool = True

    @property
    def xl(self) -> bool:
        """Whether the U-Net is SDXL's (two text encoders, pooled text and micro-conditioning)."""
        from ..pipeline import is_xl

        return is_xl(self.unet)

    def token_ids(self, captions) -> np.ndarray:
        """Token ids (B, L) int32 of captions, multi-vector words written out (`vocabulary.expand_prompt`)."""
        return caption_ids(self.tokenizer, list(captions))

    def prompt_ids(self, captions) -> dict[str, np.ndarray]:
        """{"input_ids": (B, L)} and, for SDXL, {"input_ids_2": (B, L)} by the second tokenizer."""
        out = {"input_ids": self.token_ids(captions)}
        if self.tokenizer_2 is not None:
            out["input_ids_2"] = caption_ids(self.tokenizer_2, list(captions))
        return out

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side: 2 ** (len(vae block_out_channels) - 1), 8 for SD."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def trainable_modules(self) -> dict[str, Any]:
        """{component: module} of what `trainable` holds (the U-Net appears for unet / unlocked runs)."""
        out: dict[str, Any] = {}
        if self.controlnet is not None:
            out["controlnet"] = self.controlnet
        if self.adapter is not None:
            out["adapter"] = self.adapter
        return out


def caption_ids(tokenizer, captions: list[str]) -> np.ndarray:
    """`tokenize` after writing out multi-vector textual-inversion words (a no-op without them).
    Module-level, so that `functools.partial(caption_ids, tokenizer)` pickles for grain workers."""
    from ..vocabulary import expand_prompt

    if any("_1" in t for t in getattr(tokenizer, "added_tokens_encoder", {})):
        captions = [expand_prompt(c, tokenizer) for c in captions]
    return tokenize(tokenizer, captions)


def lora_layers(trainable: dict, frozen: dict, network: str) -> dict | None:
    """The trained LoRA factors of `network` with their fixed multipliers, or None."""
    factors = trainable.get("lora", {}).get(network)
    if not factors:
        return None
    mult = frozen["lora_multipliers"][network]
    return {m: {**dict(f), "multiplier": mult[m]} for m, f in factors.items()}


def unet_params(trainable: dict, frozen: dict) -> dict:
    """The U-Net's full parameter tree from its frozen and trainable parts (and trained LoRA factors)."""
    params = {**frozen.get("unet", {}), **trainable.get("unet", {})}
    layers = lora_layers(trainable, frozen, "unet")
    return params if layers is None else with_loras(params, [layers], jnp.ones((1,), jnp.float32))


def text_encoder_params(trainable: dict, frozen: dict) -> dict:
    """The text encoder's parameters: trained or frozen, with trained LoRA factors added and the
    trained rows of new words (`token_embeddings` at `placeholder_ids`) written into its table."""
    params = trainable["text_encoder"] if "text_encoder" in trainable else frozen["text_encoder"]
    if "token_embeddings" in trainable:
        from ..vocabulary import TOKEN_TABLE

        flat = dict(flatten(params))
        table = flat[TOKEN_TABLE]
        flat[TOKEN_TABLE] = table.at[frozen["placeholder_ids"]].set(trainable["token_embeddings"].astype(table.dtype))
        params = unflatten(flat)
    layers = lora_layers(trainable, frozen, "text_encoder")
    return params if layers is None else with_loras(params, [layers], jnp.ones((1,), jnp.float32))


def _cast(tree: Any, dtype) -> Any:
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype else a, tree)


def _host(tree: Any) -> Any:
    """Parameters as numpy arrays (so that placing them on the mesh copies once, from the host)."""
    return jax.tree_util.tree_map(np.asarray, tree)


# the networks a run reads of a pretrained pipeline (SDXL's second text encoder where it has one),
# and what else of a diffusers folder (a jaxcontrol checkpoint brings its tokenizers and scheduler)
PRETRAINED_NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")
PRETRAINED_EXTRAS = ("tokenizer", "tokenizer_2", "scheduler")


def _pretrained_components(path: str) -> tuple[str, ...] | None:
    """What to load of `path`: the networks (and, for a diffusers folder, tokenizers and
    scheduler) that it lists; None for a single file, which holds its networks only."""
    from ..convert.jax_format import is_jaxcontrol_checkpoint, read_manifest
    from ..convert.pipeline_index import index_components, read_model_index

    folder = Path(path)
    if folder.is_file():
        return None
    if is_jaxcontrol_checkpoint(folder):
        names = set(read_manifest(folder)["components"])
        return tuple(n for n in PRETRAINED_NETWORKS if n in names)
    names = {name for name, _, _ in index_components(folder, read_model_index(folder))}
    return tuple(n for n in PRETRAINED_NETWORKS + PRETRAINED_EXTRAS if n in names)


def _load_pretrained(path: str, kw: dict):
    """(modules, params, tokenizers, scheduler config, model_index options) of a pretrained pipeline."""
    bundle = load_pipeline(path, components=_pretrained_components(path), **kw)
    missing = [n for n in ("unet", "vae") if n not in bundle.modules]
    if "text_encoder" not in bundle.modules:
        if "text_encoder_2" in bundle.modules:
            raise ConfigError(f"config.model.pretrained_path={path!r} has text_encoder_2 alone (an SDXL refiner); "
                              "training reads both of SDXL's text encoders, as diffusers' SDXL training scripts "
                              "do: give the base model's pipeline")
        missing.append("text_encoder")
    if missing:
        raise ConfigError(f"config.model.pretrained_path={path!r}: no {missing} in that pipeline")
    if bundle.tokenizer is None:
        raise ConfigError(f"config.model.pretrained_path={path!r}: the pipeline has no tokenizer")
    scheduler = bundle.scheduler_config or dict(SD_SCHEDULER)
    return bundle.modules, bundle.params, dict(bundle.tokenizers), scheduler, dict(bundle.options)


def _scratch_words(config) -> list[str]:
    from .tokenizer import caption_words

    if config.data.dataset == "fill50k":
        from ..data.fill50k import check_colors

        palette = check_colors(str(config.data.fill50k_palette))
        return caption_words([name for name, _ in palette] + ["circle with background"])
    if config.data.dataset == "folder":
        from ..data.manifest import read_manifest

        texts = [e.text for e in read_manifest(config.data.train_manifest, check_files=False)]
        if config.data.validation_manifest:
            texts += [e.text for e in read_manifest(config.data.validation_manifest, check_files=False)]
        return caption_words(texts)
    raise ConfigError('config.model.tokenizer_path is empty: with model.init="scratch" and data.dataset="tfds" '
                      "give a tokenizer folder (a word-level one is written only for fill50k and folder datasets)")


def scratch_tokenizer(config, workdir: str | os.PathLike):
    """The tokenizer of a from-scratch run: `model.tokenizer_path`, or a word-level one in WORKDIR/tokenizer
    (written by process 0 from the dataset's captions). Raises `ConfigError` when neither is possible
    (a "tfds" dataset without `tokenizer_path`) or the tokenizer has more tokens than the text
    encoder's `vocab_size`; `CheckpointError` when the folder cannot be loaded."""
    if config.model.tokenizer_path:
        return load_tokenizer(config.model.tokenizer_path)
    from .tokenizer import write_word_tokenizer

    folder = Path(workdir) / "tokenizer"
    if jax.process_index() == 0 and not (folder / "vocab.json").is_file():
        write_word_tokenizer(folder, _scratch_words(config))
    _barrier("tokenizer")  # every host, whether or not the folder existed, so that none waits alone
    tok = load_tokenizer(folder)
    vocab = int(config.model.text_encoder.get("vocab_size", 49408))
    if len(tok) > vocab:
        raise ConfigError(f"config.model.text_encoder.vocab_size={vocab} is smaller than the tokenizer's "
                          f"{len(tok)} tokens ({folder})")
    return tok


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxcontrol_{name}")


# from-scratch components: (name, config class, module class, config.model key of a folder to load
# instead); component i is initialised with seed + i + 1
SCRATCH = (
    ("unet", UNet2DConditionConfig, UNet2DConditionModel, None),
    ("vae", AutoencoderKLConfig, AutoencoderKL, "vae_path"),
    ("text_encoder", CLIPTextConfig, CLIPTextModel, "text_encoder_path"),
)


def _scratch(config, workdir, compute, attention_impl):
    """Modules and params of a from-scratch run. A VAE run initialises only the VAE's params (the
    U-Net and text encoder modules are still built, for `Networks`, but never run)."""
    seed = int(config.seed)
    kw = dict(dtype=compute, attention_impl=attention_impl)
    modules, params = {}, {}
    for i, (name, config_cls, module_cls, path_key) in enumerate(SCRATCH):
        path = config.model[path_key] if path_key else ""
        if path:
            modules[name], params[name] = load_model(path, **kw)
            continue
        cfg = config_cls.from_dict(to_plain(config.model[name]), source=f"config.model.{name}")
        modules[name] = module_cls(cfg, **kw)
        if config.task != "vae" or name == "vae":
            params[name] = init_params(modules[name], seed + i + 1)
    scheduler = {"_class_name": "DDPMScheduler", **to_plain(config.model.scheduler)}
    if modules["unet"].config.addition_embed_type is not None:
        raise ConfigError(f"config.model.unet.addition_embed_type={modules['unet'].config.addition_embed_type!r}: "
                          'a from-scratch run builds an SD-1/2-style model; SDXL trains from a pretrained '
                          'pipeline (model.init="pretrained")')
    return modules, params, {"tokenizer": scratch_tokenizer(config, workdir)}, scheduler, {}


def build_networks(config, workdir: str | os.PathLike) -> tuple[Networks, dict, dict]:
    """Load or build every network of the run; returns (networks, trainable params, frozen params).

    Parameters come back as host (numpy) arrays: the trainer places them on the mesh; trainable
    ones in float32, frozen ones in `precision.frozen_param_dtype`. Raises `ConfigError` for a
    prediction type other than epsilon / v_prediction, a resolution the networks cannot take, a
    ControlNet or adapter that does not fit the U-Net, or an incomplete pretrained pipeline;
    `CheckpointError` when a model folder cannot be loaded.
    """
    compute = to_dtype(config.precision.compute_dtype)
    frozen_dtype = to_dtype(config.precision.frozen_param_dtype)
    attention_impl = config.model.attention_impl
    if config.model.init == "pretrained":
        kw = dict(dtype=compute, param_dtype=jnp.float32, attention_impl=attention_impl)
        modules, params, tokenizers, scheduler, options = _load_pretrained(config.model.pretrained_path, kw)
        if config.model.vae_path:  # e.g. SDXL's fp16-fix VAE, as diffusers' --pretrained_vae_model_name_or_path
            modules["vae"], params["vae"] = _replacement_vae(config.model.vae_path, modules["vae"], kw)
    else:
        modules, params, tokenizers, scheduler, options = _scratch(config, workdir, compute, attention_impl)

    sched_cfg = SchedulerConfig.from_dict(scheduler)
    _, resolved = sched_cfg.resolve("ddpm")
    prediction_type = config.loss.prediction_type or resolved.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(f"the scheduler's prediction_type is {prediction_type!r}; training supports 'epsilon' and "
                          "'v_prediction' (set config.loss.prediction_type)")
    scheduler = {**scheduler, "prediction_type": prediction_type}
    nets = Networks(
        task=config.task, unet=modules["unet"], vae=modules["vae"], text_encoder=modules["text_encoder"],
        tokenizer=tokenizers["tokenizer"], scheduler_config=scheduler, schedule=NoiseSchedule.from_config(resolved),
        prediction_type=prediction_type,
    )
    nets.empty_ids = tokenize(nets.tokenizer, [""])
    if nets.xl:
        _setup_xl(config, nets, modules, tokenizers, options)
    _check_sizes(config, nets)

    trainable: dict[str, Any] = {}
    if config.task == "vae":  # the autoencoder alone: nothing else is needed on the devices
        trainable["vae"] = params["vae"]
        return nets, _cast(_host(trainable), jnp.float32), {}
    unet_p = params["unet"]
    frozen = {"vae": _cast(params["vae"], frozen_dtype), "text_encoder": _cast(params["text_encoder"], frozen_dtype)}
    if nets.xl:
        frozen["text_encoder_2"] = _cast(params["text_encoder_2"], frozen_dtype)
    te_params = params["text_encoder"]
    if trains_new_word(config):  # textual inversion, or pivotal tuning beside LoRA factors
        te_params, trainable["token_embeddings"], ids = _textual_inversion(config, nets, te_params)
        frozen["text_encoder"] = _cast(te_params, frozen_dtype)
        frozen["placeholder_ids"] = np.asarray(ids, np.int32)
    if config.task == "controlnet":
        nets.controlnet, trainable["controlnet"] = _controlnet(config, nets.unet, unet_p, compute, attention_impl)
        if config.controlnet.unlock_unet:
            trainable["unet"] = {k: v for k, v in unet_p.items() if k.startswith(UNET_DECODER)}
            frozen["unet"] = _cast({k: v for k, v in unet_p.items() if not k.startswith(UNET_DECODER)}, frozen_dtype)
        else:
            frozen["unet"] = _cast(unet_p, frozen_dtype)
    elif config.task == "adapter":
        nets.adapter, trainable["adapter"] = _adapter(config, nets.unet, compute)
        _check_adapter_fits(config, nets)
        frozen["unet"] = _cast(unet_p, frozen_dtype)
    elif config.task == "instruct_pix2pix":
        from ..models.kinds import widen_unet_input

        nets.unet, trainable["unet"] = widen_unet_input(nets.unet, unet_p, "instruct_pix2pix",
                                                        int(nets.vae.config.latent_channels))
    elif config.task == "textual_inversion":
        frozen["unet"] = _cast(unet_p, frozen_dtype)
    elif uses_lora(config):
        frozen["unet"] = _cast(unet_p, frozen_dtype)
        with_text = bool(config.lora.text_encoder) or (config.task == "dreambooth" and
                                                       bool(config.dreambooth.train_text_encoder))
        trainable["lora"], frozen["lora_multipliers"] = _lora(config, nets, unet_p, te_params, with_text)
    elif config.task == "dreambooth":
        trainable["unet"] = unet_p
        if config.dreambooth.train_text_encoder:
            trainable["text_encoder"] = frozen.pop("text_encoder")
    else:
        trainable["unet"] = unet_p
    trainable = _cast(_host(trainable), jnp.float32)  # float32 master weights
    return nets, trainable, _host(frozen)


# what an SDXL run can train (as diffusers' train_controlnet_sdxl.py and train_t2i_adapter_sdxl.py)
XL_TASKS = ("controlnet", "adapter", "vae")


def _setup_xl(config, nets: Networks, modules: dict, tokenizers: dict, options: dict) -> None:
    """SDXL's second text encoder and tokenizer, and the run's micro-conditioning, into `nets`.
    Raises `ConfigError` for a task SDXL training does not cover, or a pipeline without them."""
    if config.task not in XL_TASKS:
        raise ConfigError(f"config.task={config.task!r} is not supported on an SDXL model "
                          f"(U-Net addition_embed_type='text_time'); SDXL runs train {list(XL_TASKS)}")
    if config.task == "vae":
        return
    missing = [n for n, v in (("text_encoder_2", modules.get("text_encoder_2")),
                              ("tokenizer_2", tokenizers.get("tokenizer_2"))) if v is None]
    if missing:
        raise ConfigError(f"config.model.pretrained_path={config.model.pretrained_path!r}: an SDXL U-Net, but the "
                          f"pipeline has no {missing}")
    nets.text_encoder_2, nets.tokenizer_2 = modules["text_encoder_2"], tokenizers["tokenizer_2"]
    nets.empty_ids_2 = tokenize(nets.tokenizer_2, [""])
    nets.force_zeros_for_empty_prompt = bool(options.get("force_zeros_for_empty_prompt", True))
    nets.time_ids = xl_time_ids(config)
    _check_xl_widths(config, nets)


def xl_time_ids(config) -> np.ndarray:
    """SDXL's micro-conditioning for every training example, (6,) float32: `sdxl.original_size`,
    `sdxl.crops_coords_top_left`, `sdxl.target_size` (a size of (0, 0) is data.resolution square),
    as diffusers' SDXL ControlNet / adapter scripts build `add_time_ids`."""
    res = (int(config.data.resolution),) * 2
    original = tuple(int(v) for v in config.sdxl.original_size)
    target = tuple(int(v) for v in config.sdxl.target_size)
    crop = tuple(int(v) for v in config.sdxl.crops_coords_top_left)
    return np.asarray((original if any(original) else res) + crop + (target if any(target) else res), np.float32)


def _check_xl_widths(config, nets: Networks) -> None:
    """The two encoders' widths and the projection must add up to what the U-Net takes."""
    u = nets.unet.config
    widths = (int(nets.text_encoder.config.hidden_size), int(nets.text_encoder_2.config.hidden_size))
    if sum(widths) != int(u.cross_attention_dims[0]):
        raise ConfigError(f"SDXL: the text encoders' widths {widths} add up to {sum(widths)}, but the U-Net's "
                          f"cross_attention_dim is {u.cross_attention_dim}")
    if not getattr(nets.text_encoder_2, "with_projection", False):
        raise ConfigError("SDXL: text_encoder_2 has no projection (a CLIPTextModelWithProjection gives the pooled "
                          "text embedding)")
    pooled = int(nets.text_encoder_2.config.projection_dim)
    expect = int(u.projection_class_embeddings_input_dim)
    got = pooled + len(nets.time_ids) * int(u.addition_time_embed_dim)
    if got != expect:
        raise ConfigError(f"SDXL: pooled text ({pooled}) plus {len(nets.time_ids)} micro-conditioning values x "
                          f"addition_time_embed_dim {u.addition_time_embed_dim} = {got}, but the U-Net's "
                          f"projection_class_embeddings_input_dim is {expect} (a refiner's U-Net takes the "
                          "aesthetic score instead: train on the base model)")


def _replacement_vae(path: str, vae, kw: dict):
    """config.model.vae_path for a pretrained run: a VAE folder in place of the pipeline's."""
    module, params = load_model(path, **kw)
    if not isinstance(module, AutoencoderKL):
        raise ConfigError(f"config.model.vae_path={path!r} is a {type(module).__name__}, not an AutoencoderKL")
    if module.config.latent_channels != vae.config.latent_channels:
        raise ConfigError(f"config.model.vae_path={path!r} has {module.config.latent_channels} latent channels, "
                          f"the pipeline's VAE {vae.config.latent_channels}")
    return module, params


def _lora(config, nets: Networks, unet_p: dict, te_p: dict, with_text: bool) -> tuple[dict, dict]:
    """Fresh LoRA factors on the U-Net (and the text encoder), or those of `lora.init_from`;
    returns (factors, multipliers) per network and records `nets.lora_config`."""
    from ..models.lora import trainable_factors

    c = config.lora
    targets = {"unet": lora_targets(unet_p, tuple(c.unet_target_modules))}
    if with_text:
        targets["text_encoder"] = lora_targets(te_p, tuple(c.text_encoder_target_modules))
    nets_params = {"unet": unet_p, "text_encoder": te_p}
    if c.init_from:
        from ..convert.lora_file import read_lora

        lora = read_lora(c.init_from, {k: nets_params[k] for k in targets}, name="init_from")
        layers = {comp: {m: {k: np.asarray(v) for k, v in layer.items()} for m, layer in lw.items()}
                  for comp, lw in lora.weights.items()}
        missing = sorted(set(targets) - set(layers))
        if missing:
            raise ConfigError(f"config.lora.init_from={c.init_from!r} has no LoRA for {missing}")
    else:
        alpha = float(c.alpha) or None
        layers = {comp: init_lora(nets_params[comp], mods, int(c.rank), alpha, seed=int(config.seed) + 7 + k)
                  for k, (comp, mods) in enumerate(targets.items())}
    nets.lora_config = {"rank": int(c.rank), "alpha": float(c.alpha) or float(c.rank),
                        "targets": {comp: sorted(layer) for comp, layer in layers.items()}}
    factors = {comp: trainable_factors(layer) for comp, layer in layers.items()}
    multipliers = {comp: {m: np.float32(np.asarray(layer[m]["multiplier"])) for m in layer}
                   for comp, layer in layers.items()}
    return factors, multipliers


def _textual_inversion(config, nets: Networks, te_params: dict) -> tuple[dict, np.ndarray, list[int]]:
    """The new word's tokens added to the tokenizer and the table (each row the initializer word's
    embedding); returns (text encoder params, the trainable rows, their token ids) and updates
    `nets.tokenizer`, `nets.text_encoder` and `nets.placeholder`."""
    from ..vocabulary import add_embeddings, token_table

    c = config.textual_inversion
    word, n = str(c.placeholder_token), int(c.num_vectors)
    init_ids = nets.tokenizer(str(c.initializer_token), add_special_tokens=False)["input_ids"]
    if len(init_ids) != 1:
        raise ConfigError(f"config.textual_inversion.initializer_token={c.initializer_token!r} is "
                          f"{len(init_ids)} tokens; it must be a single token (diffusers' rule)")
    row = np.asarray(token_table(te_params)[init_ids[0]], np.float32)
    rows = np.repeat(row[None], n, axis=0)
    try:
        tokenizer, text_encoder, te_params, added = add_embeddings(nets.tokenizer, nets.text_encoder, te_params,
                                                                   [(word, rows)])
    except ConfigError as e:
        raise ConfigError(f"config.textual_inversion.placeholder_token: {e}") from None
    nets.tokenizer, nets.text_encoder = tokenizer, text_encoder
    nets.placeholder = (word, tuple(added[word]))
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in added[word]]
    return te_params, rows, ids


def _controlnet(config, unet, unet_p, compute, attention_impl):
    c = config.controlnet
    if c.init_from:
        module, params = load_model(c.init_from, dtype=compute, param_dtype=jnp.float32, attention_impl=attention_impl)
        if not isinstance(module, ControlNetModel):
            raise ConfigError(f"config.controlnet.init_from={c.init_from!r} is a {type(module).__name__}, "
                              "not a ControlNetModel")
        from ..models.controlnet import check_controlnet_fits

        check_controlnet_fits(unet.config, module.config, f"config.controlnet.init_from={c.init_from!r}")
        return module, params
    module, params = controlnet_from_unet(
        unet, unet_p, jax.random.key(int(config.seed) + 4),
        conditioning_channels=int(c.conditioning_channels),
        conditioning_embedding_out_channels=tuple(c.conditioning_embedding_out_channels),
    )
    return module, params


def _adapter(config, unet, compute):
    a = config.adapter
    if a.init_from:
        module, params = load_model(a.init_from, dtype=compute, param_dtype=jnp.float32)
        if not isinstance(module, T2IAdapter):
            raise ConfigError(f"config.adapter.init_from={a.init_from!r} is a {type(module).__name__}, not a T2IAdapter")
    else:
        cfg = T2IAdapterConfig.from_dict(dict(
            in_channels=int(a.in_channels), channels=tuple(a.channels), num_res_blocks=int(a.num_res_blocks),
            downscale_factor=int(a.downscale_factor), adapter_type=a.adapter_type), source="config.adapter")
        module = T2IAdapter(cfg, dtype=compute)
        params = init_params(module, int(config.seed) + 5)
    unet_channels = tuple(unet.config.block_out_channels)
    if tuple(module.config.feature_channels)[: len(unet_channels)] != unet_channels:
        raise ConfigError(f"config.adapter.channels={tuple(module.config.channels)} must match the U-Net's "
                          f"block_out_channels={unet_channels}")
    return module, params


def _check_adapter_fits(config, nets: Networks) -> None:
    """The adapter's features must have the sizes the U-Net's down blocks add them at."""
    from ..models.unet import adapter_feature_shapes

    res = int(config.data.resolution)
    channels = nets.adapter.config.in_channels
    feats = jax.eval_shape(lambda x: nets.adapter.init_with_output(jax.random.key(0), x)[0],
                           jax.ShapeDtypeStruct((1, res, res, channels), jnp.float32))
    got = [tuple(f.shape[1:]) for f in feats]
    f = nets.vae_scale_factor
    want = adapter_feature_shapes(nets.unet.config, res // f, res // f)
    for k, (g, w) in enumerate(zip(got, want)):
        if g != w:
            raise ConfigError(
                f"the T2I-Adapter's features {got} at {res}x{res} px do not fit the U-Net, which adds them at "
                f"{want} (feature {k}: {g} vs {w}); diffusers adds adapter features inside CrossAttnDownBlock2D "
                f"and after DownBlock2D, so config.model.unet's down_block_types decide the sizes")


def _check_sizes(config, nets: Networks) -> None:
    res = int(config.data.resolution)
    f = nets.vae_scale_factor
    down = 1 if config.task == "vae" else 2 ** (len(nets.unet.config.block_out_channels) - 1)
    if res % (f * down):
        raise ConfigError(f"config.data.resolution={res} must be a multiple of {f * down} (VAE factor {f} x "
                          f"U-Net downsampling {down})")
    if config.task == "controlnet" and not config.controlnet.init_from:
        hint = 2 ** (len(config.controlnet.conditioning_embedding_out_channels) - 1)
        if hint != f:
            raise ConfigError(
                f"config.controlnet.conditioning_embedding_out_channels has "
                f"{len(config.controlnet.conditioning_embedding_out_channels)} entries, so the control image is "
                f"embedded at 1/{hint} of its size, but the VAE's latents are 1/{f} of the image; "
                f"give {int(np.log2(f)) + 1} entries")
    if config.task == "adapter" and not config.adapter.init_from:
        xl = config.adapter.adapter_type == "full_adapter_xl"  # its first feature is at half the latents' size
        if int(config.adapter.downscale_factor) != f * (2 if xl else 1):
            where = "half the latent resolution (full_adapter_xl)" if xl else "latent resolution"
            raise ConfigError(f"config.adapter.downscale_factor={config.adapter.downscale_factor} must be "
                              f"{f * (2 if xl else 1)} for the VAE's factor {f} (the adapter's first feature is at "
                              f"{where})")
