"""Training configs as code (ml_collections), as JAX projects write them.

    from jaxcontrol.training.config import default_config
    config = default_config()            # every key, with its default
    config.task = "controlnet"
    config.model.pretrained_path = "stable-diffusion-v1-5"

An experiment is a Python file with `get_config()` returning such a ConfigDict (see `configs/`);
`train.py --config configs/controlnet_fill50k.py --config.steps=100` overrides any key from the
command line. `check_config` validates a config and names the offending key. docs/TRAINING.md
describes every key.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from ..errors import ConfigError

TASKS = ("controlnet", "adapter", "unet", "vae", "instruct_pix2pix", "lora", "textual_inversion", "dreambooth")
# text-to-image tasks: their batches carry no condition image
TEXT_TO_IMAGE_TASKS = ("unet", "lora", "textual_inversion", "dreambooth")
INITS = ("pretrained", "scratch")
SCHEDULES = ("constant", "cosine")
TIMESTEP_SAMPLING = ("uniform", "cubic")
PREDICTION_TYPES = ("", "epsilon", "v_prediction")
DTYPES = ("float32", "bfloat16")
REMAT_MODES = ("none", "blocks", "layers")
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "convs_and_dense_saveable")
DATASETS = ("fill50k", "folder", "tfds")
DISTRIBUTED_INITIALIZE = ("auto", "true", "false")
RECONSTRUCTION_LOSSES = ("mse", "l1")

# --- tiny architectures, for from-scratch runs and tests on a CPU ---------------------------------
# (diffusers / transformers config.json field names)
TINY_UNET = dict(
    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16,
)
TINY_VAE = dict(
    block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
    sample_size=32,
)
TINY_TEXT_ENCODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
    vocab_size=1000, hidden_act="quick_gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
)
# diffusers' DDPMScheduler with Stable Diffusion's betas
SD_SCHEDULER = dict(
    _class_name="DDPMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
    steps_offset=1,
)


def default_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with its default. Experiment files start from this."""
    c = ml_collections.ConfigDict()
    # what is trained: "controlnet", "adapter", "unet", "vae", "instruct_pix2pix", "lora", "textual_inversion"
    # or "dreambooth"
    c.task = "controlnet"
    c.seed = 0
    c.steps = 1000  # optimizer steps
    c.batch_size = 8  # global batch per optimizer step: all hosts, all accumulated micro-batches
    c.grad_accum_steps = 1  # micro-batches per optimizer step (a lax.scan inside the step)

    # --- the base model -----------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.init = "pretrained"  # "pretrained": load pretrained_path; "scratch": build from the configs below
    c.model.pretrained_path = ""  # diffusers pipeline folder, jaxcontrol checkpoint or single file
    c.model.unet = ml_collections.ConfigDict(dict(TINY_UNET))  # scratch: U-Net config.json fields
    c.model.vae = ml_collections.ConfigDict(dict(TINY_VAE))  # scratch: AutoencoderKL fields
    c.model.text_encoder = ml_collections.ConfigDict(dict(TINY_TEXT_ENCODER))  # scratch: CLIPTextConfig fields
    c.model.vae_path = ""  # a VAE folder to use instead of building one (scratch) or the pipeline's (e.g. SDXL's fp16-fix VAE)
    c.model.text_encoder_path = ""  # scratch: load the text encoder from this folder
    c.model.tokenizer_path = ""  # scratch: tokenizer folder; "" writes a word-level CLIP tokenizer
    c.model.scheduler = ml_collections.ConfigDict({k: v for k, v in SD_SCHEDULER.items() if k != "_class_name"})
    c.model.attention_impl = "auto"  # per platform (models.attention.select_impl); or plain/chunked/dot_product/cudnn/tpu_flash

    # --- what is trained ----------------------------------------------------------------------
    c.controlnet = ml_collections.ConfigDict()
    c.controlnet.init_from = ""  # an existing ControlNet folder to continue from; "" copies the U-Net encoder
    c.controlnet.conditioning_channels = 3
    c.controlnet.conditioning_embedding_out_channels = (16, 32, 96, 256)
    c.controlnet.conditioning_scale = 1.0
    c.controlnet.small_scale = False  # the paper's small-scale mode: only the mid-block residual is used
    c.controlnet.unlock_unet = False  # the paper's "unlocked" mode: the U-Net decoder trains too

    c.adapter = ml_collections.ConfigDict()
    c.adapter.init_from = ""  # an existing T2I-Adapter folder; "" builds a new one from the fields below
    c.adapter.in_channels = 3
    c.adapter.channels = (320, 640, 1280, 1280)
    c.adapter.num_res_blocks = 2
    c.adapter.downscale_factor = 8
    c.adapter.adapter_type = "full_adapter"
    c.adapter.conditioning_scale = 1.0

    # SDXL (a pretrained pipeline whose U-Net has addition_embed_type="text_time"; tasks controlnet,
    # adapter and vae): the micro-conditioning every training example gets, as diffusers' SDXL
    # ControlNet and adapter scripts build add_time_ids. (0, 0) sizes mean data.resolution square.
    c.sdxl = ml_collections.ConfigDict()
    c.sdxl.original_size = (0, 0)  # (height, width)
    c.sdxl.crops_coords_top_left = (0, 0)  # (top, left)
    c.sdxl.target_size = (0, 0)  # (height, width)

    c.vae = ml_collections.ConfigDict()  # task="vae": the autoencoder itself (model.vae / model.vae_path)
    c.vae.reconstruction_loss = "mse"  # "mse" or "l1", per pixel in [-1, 1]
    c.vae.kl_weight = 1e-6  # weight of the posterior's KL to N(0, I) (summed per sample), as diffusers' VAE scripts
    c.vae.scaling_factor = 0.0  # exported scaling_factor; 0 = 1 / std of the latents of training images (as SD's)
    c.vae.scaling_examples = 256  # training examples that estimate it

    # task="instruct_pix2pix": the U-Net, widened to take the input image's latents (Brooks et al. 2023).
    # Records' "conditioning_image" is the image to edit, "text" the instruction, "image" the result.
    c.instruct_pix2pix = ml_collections.ConfigDict()
    # per example, one uniform draw u: u < p drops the text alone, p <= u < 2p both, 2p <= u < 3p
    # the image alone (the paper's 5% / 5% / 5% for p = 0.05, as diffusers' training script)
    c.instruct_pix2pix.conditioning_dropout_prob = 0.05

    # task="lora" (and dreambooth with dreambooth.use_lora): low-rank factors on the frozen networks,
    # exported as diffusers' pytorch_lora_weights.safetensors
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 4
    c.lora.alpha = 0.0  # 0 = rank (multiplier 1); the delta is (alpha / rank) * down @ up
    c.lora.unet_target_modules = ("to_q", "to_k", "to_v", "to_out.0")  # PEFT's rule: names ending so
    c.lora.text_encoder = False  # also adapt the text encoder
    c.lora.text_encoder_target_modules = ("q_proj", "k_proj", "v_proj", "out_proj")
    c.lora.init_from = ""  # a LoRA file to continue from ("" = a fresh one: up factors zero)

    # task="textual_inversion": new words whose embedding rows alone train (Gal et al. 2022). In a
    # LoRA run (task="lora", or dreambooth with use_lora) a placeholder_token adds the word too and its
    # rows train with the factors ("pivotal tuning", as diffusers' advanced DreamBooth LoRA script's
    # --train_text_encoder_ti): the run exports both the LoRA and learned_embeds.safetensors
    c.textual_inversion = ml_collections.ConfigDict()
    c.textual_inversion.placeholder_token = ""  # e.g. "<teal>"; captions use it
    c.textual_inversion.initializer_token = ""  # a word of one token whose embedding starts every vector
    c.textual_inversion.num_vectors = 1  # > 1: the word spans tokens tok, tok_1, ... (written out in captions)

    # task="dreambooth" (Ruiz et al. 2022, as diffusers' train_dreambooth.py): the U-Net (or LoRA
    # factors) on a few instance images, optionally with prior preservation on class images that the
    # base model generates first (cached in class_data_dir)
    c.dreambooth = ml_collections.ConfigDict()
    c.dreambooth.instance_prompt = ""  # "" keeps each instance image's own caption
    c.dreambooth.use_lora = False  # train LoRA factors (config.lora) instead of the whole U-Net
    c.dreambooth.train_text_encoder = False  # the text encoder trains too (its LoRA with use_lora)
    c.dreambooth.with_prior_preservation = False
    c.dreambooth.prior_loss_weight = 1.0
    c.dreambooth.class_prompt = ""  # what the class images show; or several, one per line
    c.dreambooth.num_class_images = 100
    c.dreambooth.class_data_dir = ""  # "" = WORKDIR/class_images
    c.dreambooth.class_num_inference_steps = 25
    c.dreambooth.class_guidance_scale = 7.5

    # --- the objective ------------------------------------------------------------------------
    c.loss = ml_collections.ConfigDict()
    c.loss.prediction_type = ""  # "" = the scheduler's; "epsilon" or "v_prediction"
    c.loss.snr_gamma = 0.0  # > 0: min-SNR-gamma weighting (Hang et al. 2023); 5.0 is the paper's value
    c.loss.noise_offset = 0.0  # > 0: add noise_offset * N(0, 1) per sample and channel to the noise
    c.loss.proportion_empty_prompts = 0.0  # fraction of captions replaced by "" (for classifier-free guidance)
    c.loss.timestep_sampling = ""  # "" = "cubic" for adapters, "uniform" otherwise

    # --- optimisation -------------------------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-5
    c.optim.schedule = "constant"  # "constant" or "cosine" (to min_lr_ratio * learning_rate)
    c.optim.warmup_steps = 0  # linear warmup from 0
    c.optim.min_lr_ratio = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-2
    c.optim.max_grad_norm = 1.0  # global-norm clipping; 0 disables it
    c.optim.ema_decay = 0.0  # > 0 keeps an EMA of the trainable params (diffusers' EMAModel decay rule)

    c.precision = ml_collections.ConfigDict()
    # "auto": bfloat16 on GPU/TPU, float32 on the CPU (jaxcontrol.platform); "bfloat16": bf16
    # activations with float32 master weights and optimizer state; "float32"
    c.precision.compute_dtype = "auto"
    c.precision.frozen_param_dtype = "float32"  # "bfloat16" halves the frozen networks' memory

    # XLA options for the compiled step and sampler (jax.jit(compiler_options=...)), e.g.
    # {"xla_backend_optimization_level": 0} to compile faster on a CPU
    c.compiler_options = ml_collections.ConfigDict()
    # CPU-only JAX: train() adds --xla_cpu_enable_concurrency_optimized_scheduler=false to XLA_FLAGS before
    # JAX starts, so that XLA:CPU keeps few buffers alive (sharding.use_cpu_memory_scheduler)
    c.xla_cpu_memory_scheduler = True

    c.remat = ml_collections.ConfigDict()
    c.remat.unet = "none"  # "none", "blocks" (down/mid/up blocks) or "layers" (resnets and transformer blocks)
    c.remat.controlnet = "none"  # the same, for the ControlNet's encoder blocks
    # what a rematerialised block keeps: convolution and dense-layer outputs (a jax.checkpoint_policies name also works)
    c.remat.policy = "convs_and_dense_saveable"
    # every attention layer under jax.checkpoint: its (heads, Lq, Lk) scores are recomputed, never kept for the backward
    c.remat.attention = True

    # --- devices ------------------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.num_devices = -1  # use the first N devices (single host only); -1 = all of them
    c.mesh.data = -1  # data-parallel axis size; -1 = the devices left over
    c.mesh.fsdp = 1  # parameter-sharding axis size; -1 = the devices left over
    c.mesh.batch_axes = ("data", "fsdp")  # mesh axes the batch is split over
    c.mesh.shard_trainable = True  # trainable params, optimizer state and EMA sharded on fsdp
    c.mesh.shard_frozen = False  # frozen networks sharded on fsdp too (else replicated)
    c.mesh.min_shard_size = 2**12  # parameters with fewer elements stay replicated

    c.distributed = ml_collections.ConfigDict()
    # "auto": call jax.distributed.initialize() when the environment is a multi-process launch (TPU pod,
    # SLURM srun, Open MPI, JAX_COORDINATOR_ADDRESS; sharding.detect_cluster); "true": always; "false": never
    c.distributed.initialize = "auto"
    c.distributed.coordinator_address = ""  # "" lets JAX discover it (TPU pods, SLURM, ...)
    c.distributed.num_processes = -1  # -1: discovered
    c.distributed.process_id = -1  # -1: discovered

    # --- data ---------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.dataset = "fill50k"  # "fill50k" (generated here), "folder" (JSONL manifests) or "tfds" (a built folder)
    c.data.data_dir = ""  # where TFDS datasets are written; "" = WORKDIR/tfds
    c.data.resolution = 512  # image side in pixels
    c.data.fill50k_num_train = 50_000
    c.data.fill50k_num_validation = 100
    c.data.fill50k_seed = 0
    c.data.fill50k_palette = "default"  # colour vocabulary: "default" (28 named colours) or "basic" (10)
    c.data.fill50k_edits = False  # instruction-edit triples ("make the circle red") instead of outlines
    c.data.train_manifest = ""  # "folder": JSONL manifest of the training triples
    c.data.validation_manifest = ""  # "folder": optional JSONL manifest for validation prompts/conditions
    c.data.tfds_path = ""  # "tfds": a built dataset folder (<data_dir>/<name>/<config>/<version>)
    c.data.split = "train"
    c.data.validation_split = "validation"
    c.data.num_workers = 0  # grain worker processes
    c.data.read_threads = 4
    c.data.prefetch = 16
    c.data.precompute = False  # encode VAE latents and text embeddings once, before training
    c.data.precomputed_dir = ""  # where they go; "" = WORKDIR/precomputed

    # --- outputs ------------------------------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500  # optimizer steps between checkpoints (and always at the end)
    c.checkpoint.keep = 3  # keep the last N
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every = 10  # console / TensorBoard interval in steps
    c.log.tensorboard = True
    c.log.progress_bar = True

    c.validation = ml_collections.ConfigDict()
    c.validation.every = 0  # steps between validation images; 0 = never (the end of training excepted if at_end)
    c.validation.at_end = True
    c.validation.num_images = 4
    c.validation.num_inference_steps = 20
    c.validation.solver = "ddim"
    c.validation.guidance_scale = 7.5
    c.validation.image_guidance_scale = 1.5  # task="instruct_pix2pix"
    c.validation.seed = 0

    c.export = ml_collections.ConfigDict()
    c.export.at_end = True
    c.export.diffusers = True  # WORKDIR/export/diffusers (diffusers' from_pretrained reads it)
    c.export.jaxcontrol = True  # WORKDIR/export/jaxcontrol (jaxcontrol.load_model / load_pipeline read it)
    c.export.use_ema = True  # export the EMA weights when there are any
    c.export.dtype = "float32"
    c.export.every = 0  # > 0: also export every N steps, to WORKDIR/export/steps/<step>/<format>/<name>
    c.export.scheduler_class = ""  # task="unet" / "instruct_pix2pix": the exported pipeline's scheduler ("" = DDPMScheduler, as trained)
    return c


def get_config() -> ml_collections.ConfigDict:
    """So that this module itself is a valid `--config` file."""
    return default_config()


def resolve_initialize(value: Any) -> str:
    """config.distributed.initialize as "auto", "true" or "false" (also from bools and any letter case).
    Raises `ConfigError` naming the key for anything else."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text not in DISTRIBUTED_INITIALIZE:
        _fail("distributed.initialize", f"{value!r} is not one of {list(DISTRIBUTED_INITIALIZE)}")
    return text


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"config.{key}: {message}")


def _choice(config, key: str, choices: tuple) -> None:
    value = _get(config, key)
    if value not in choices:
        _fail(key, f"{value!r} is not one of {list(choices)}")


def _get(config, key: str) -> Any:
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError):
            _fail(key, "missing (start from jaxcontrol.training.config.default_config())")
    return node


def check_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validate `config` (every key the trainer reads), raising `ConfigError` naming the key."""
    defaults = default_config()
    unknown = _unknown_keys(config, defaults)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; see docs/TRAINING.md for the keys")
    _choice(config, "task", TASKS)
    _choice(config, "model.init", INITS)
    _choice(config, "optim.schedule", SCHEDULES)
    _choice(config, "loss.prediction_type", PREDICTION_TYPES)
    _choice(config, "loss.timestep_sampling", ("",) + TIMESTEP_SAMPLING)
    _choice(config, "precision.compute_dtype", ("auto",) + DTYPES)
    _choice(config, "precision.frozen_param_dtype", DTYPES)
    from ..models.attention import ATTENTION_IMPLS

    _choice(config, "model.attention_impl", ATTENTION_IMPLS)
    _choice(config, "remat.unet", REMAT_MODES)
    _choice(config, "remat.controlnet", REMAT_MODES)
    _choice(config, "remat.policy", REMAT_POLICIES)
    _choice(config, "data.dataset", DATASETS)
    resolve_initialize(config.distributed.initialize)
    _choice(config, "vae.reconstruction_loss", RECONSTRUCTION_LOSSES)
    from ..data.fill50k import PALETTES

    _choice(config, "data.fill50k_palette", tuple(PALETTES))
    if config.vae.kl_weight < 0 or config.vae.scaling_factor < 0:
        _fail("vae", "kl_weight and scaling_factor must be >= 0")
    _choice(config, "export.dtype", DTYPES + ("float16",))
    if config.model.init == "pretrained" and not config.model.pretrained_path:
        _fail("model.pretrained_path", 'is empty but model.init is "pretrained"; give a pipeline folder, '
              'or set model.init="scratch"')
    for key in ("steps", "batch_size", "grad_accum_steps", "checkpoint.keep"):
        if _get(config, key) < 1:
            _fail(key, f"must be >= 1, got {_get(config, key)}")
    for key in ("log.every", "checkpoint.every", "validation.every", "optim.warmup_steps", "export.every"):
        if _get(config, key) < 0:
            _fail(key, f"must be >= 0, got {_get(config, key)}")
    if config.batch_size % config.grad_accum_steps:
        _fail("batch_size", f"{config.batch_size} is not a multiple of grad_accum_steps={config.grad_accum_steps}")
    if config.optim.learning_rate <= 0:
        _fail("optim.learning_rate", f"must be > 0, got {config.optim.learning_rate}")
    if not 0.0 <= config.optim.ema_decay < 1.0:
        _fail("optim.ema_decay", f"must be in [0, 1), got {config.optim.ema_decay}")
    if not 0.0 <= config.optim.min_lr_ratio <= 1.0:
        _fail("optim.min_lr_ratio", f"must be in [0, 1], got {config.optim.min_lr_ratio}")
    if config.optim.max_grad_norm < 0:
        _fail("optim.max_grad_norm", f"must be >= 0, got {config.optim.max_grad_norm}")
    if not 0.0 <= config.loss.proportion_empty_prompts <= 1.0:
        _fail("loss.proportion_empty_prompts", f"must be in [0, 1], got {config.loss.proportion_empty_prompts}")
    if config.loss.snr_gamma < 0 or config.loss.noise_offset < 0:
        _fail("loss", "snr_gamma and noise_offset must be >= 0")
    for key in ("mesh.data", "mesh.fsdp"):
        v = _get(config, key)
        if v == 0 or v < -1:
            _fail(key, f"must be a positive size or -1 (the devices left over), got {v}")
    if config.mesh.num_devices == 0 or config.mesh.num_devices < -1:
        _fail("mesh.num_devices", f"must be a positive count or -1 (all devices), got {config.mesh.num_devices}")
    if config.mesh.data == -1 and config.mesh.fsdp == -1:
        _fail("mesh", "only one of mesh.data and mesh.fsdp may be -1")
    axes = tuple(config.mesh.batch_axes)
    if not axes or any(a not in ("data", "fsdp") for a in axes) or len(set(axes)) != len(axes):
        _fail("mesh.batch_axes", f"must be a non-empty subset of ('data', 'fsdp'), got {axes}")
    if config.data.dataset == "folder" and not config.data.train_manifest:
        _fail("data.train_manifest", 'is empty but data.dataset is "folder"')
    if config.data.dataset == "tfds" and not config.data.tfds_path:
        _fail("data.tfds_path", 'is empty but data.dataset is "tfds"')
    if config.data.resolution < 8:
        _fail("data.resolution", f"must be >= 8, got {config.data.resolution}")
    if config.task != "controlnet" and (config.controlnet.small_scale or config.controlnet.unlock_unet):
        _fail("controlnet", f"small_scale / unlock_unet apply to task='controlnet', not {config.task!r}")
    if config.task == "vae" and config.data.precompute:
        _fail("data.precompute", "a VAE run trains the encoder: it cannot use precomputed latents")
    if config.task != "controlnet" and config.remat.controlnet != "none":
        _fail("remat.controlnet", f"applies to task='controlnet', not {config.task!r}")
    p = config.instruct_pix2pix.conditioning_dropout_prob
    if not 0.0 <= p <= 1.0 / 3.0:
        _fail("instruct_pix2pix.conditioning_dropout_prob", f"must be in [0, 1/3] (three disjoint bands), got {p}")
    if config.task == "instruct_pix2pix" and config.loss.proportion_empty_prompts:
        _fail("loss.proportion_empty_prompts", "task='instruct_pix2pix' drops prompts with "
              "instruct_pix2pix.conditioning_dropout_prob; set proportion_empty_prompts to 0")
    for key in ("validation.guidance_scale", "validation.image_guidance_scale"):
        v = _get(config, key)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            _fail(key, f"must be a finite number >= 0, got {v!r}")
    for key in ("sdxl.original_size", "sdxl.crops_coords_top_left", "sdxl.target_size"):
        v = _get(config, key)
        if isinstance(v, str) or len(tuple(v)) != 2 or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
            _fail(key, f"must be two integers >= 0, got {v!r}")
        if key.endswith("size") and (0 in tuple(v)) and any(v):
            _fail(key, f"must be (0, 0) (data.resolution square) or two sizes > 0, got {tuple(v)}")
    _check_personalization(config)
    if config.data.fill50k_edits and config.task in ("controlnet", "adapter"):
        _fail("data.fill50k_edits", f"edit triples have no outline condition for task={config.task!r}")
    return config


def trains_text_encoder(config) -> bool:
    """Whether a run changes what the text encoder computes (its weights, LoRA or new embeddings)."""
    return (trains_new_word(config) or (config.task == "lora" and bool(config.lora.text_encoder))
            or (config.task == "dreambooth" and bool(config.dreambooth.train_text_encoder)))


def trains_new_word(config) -> bool:
    """Whether the run adds textual_inversion.placeholder_token and trains its embedding rows: task
    textual_inversion, or a LoRA run that names one (pivotal tuning)."""
    named = bool(str(config.textual_inversion.placeholder_token))
    return config.task == "textual_inversion" or (uses_lora(config) and named)


def uses_lora(config) -> bool:
    """Whether the run trains LoRA factors (task="lora", or dreambooth with use_lora)."""
    return config.task == "lora" or (config.task == "dreambooth" and bool(config.dreambooth.use_lora))


def _check_personalization(config) -> None:
    """The keys of the lora / textual_inversion / dreambooth tasks."""
    lo, ti, db = config.lora, config.textual_inversion, config.dreambooth
    if uses_lora(config):
        if isinstance(lo.rank, bool) or not isinstance(lo.rank, int) or lo.rank < 1:
            _fail("lora.rank", f"must be a positive integer, got {lo.rank!r}")
        if not (isinstance(lo.alpha, (int, float)) and math.isfinite(lo.alpha) and lo.alpha >= 0):
            _fail("lora.alpha", f"must be a finite number >= 0 (0 = rank), got {lo.alpha!r}")
        for key in ("unet_target_modules", "text_encoder_target_modules"):
            v = lo[key]
            if isinstance(v, str) or not v or not all(isinstance(t, str) and t for t in v):
                _fail(f"lora.{key}", f"must be a non-empty list of module names, got {v!r}")
    if config.task == "lora" and config.model.init != "pretrained":
        _fail("model.init", 'task="lora" adapts a pretrained model: set model.init="pretrained"')
    if str(ti.placeholder_token) and not trains_new_word(config):
        _fail("textual_inversion.placeholder_token", f"adds a word to task='textual_inversion' or to a LoRA run "
              f"(task='lora', or 'dreambooth' with use_lora), not to task={config.task!r}")
    if trains_new_word(config):
        if not str(ti.placeholder_token).strip() or str(ti.placeholder_token) != str(ti.placeholder_token).strip():
            _fail("textual_inversion.placeholder_token", f"must be a word without spaces around it, got "
                  f"{ti.placeholder_token!r}")
        if not str(ti.initializer_token).strip():
            _fail("textual_inversion.initializer_token", "is empty: give a word whose embedding starts the new one")
        if isinstance(ti.num_vectors, bool) or not isinstance(ti.num_vectors, int) or ti.num_vectors < 1:
            _fail("textual_inversion.num_vectors", f"must be a positive integer, got {ti.num_vectors!r}")
    if config.task == "dreambooth":
        if db.with_prior_preservation:
            if not str(db.class_prompt).strip():
                _fail("dreambooth.class_prompt", "is empty but with_prior_preservation is on")
            if config.model.init != "pretrained":
                _fail("model.init", "prior preservation generates class images with the pretrained model: "
                      'set model.init="pretrained"')
            if isinstance(db.num_class_images, bool) or not isinstance(db.num_class_images, int) or \
                    db.num_class_images < 1:
                _fail("dreambooth.num_class_images", f"must be a positive integer, got {db.num_class_images!r}")
            if not (math.isfinite(db.prior_loss_weight) and db.prior_loss_weight >= 0):
                _fail("dreambooth.prior_loss_weight", f"must be a finite number >= 0, got {db.prior_loss_weight!r}")
            if db.class_num_inference_steps < 1 or not math.isfinite(db.class_guidance_scale):
                _fail("dreambooth", "class_num_inference_steps must be >= 1 and class_guidance_scale finite")
    elif config.dreambooth.with_prior_preservation or config.dreambooth.use_lora or \
            config.dreambooth.train_text_encoder:
        _fail("dreambooth", f"with_prior_preservation / use_lora / train_text_encoder apply to task='dreambooth', "
              f"not {config.task!r}")
    if config.task != "lora" and config.lora.text_encoder and not uses_lora(config):
        _fail("lora.text_encoder", f"applies to LoRA training, not task={config.task!r}")
    if config.data.precompute and (trains_text_encoder(config) or (
            config.task == "dreambooth" and config.dreambooth.with_prior_preservation)):
        _fail("data.precompute", f"task={config.task!r} with these settings trains the text encoder or its inputs "
              "(or reads class images): captions must be encoded in the step; set data.precompute=False")


def _unknown_keys(config, defaults, prefix: str = "") -> list[str]:
    out = []
    for key in config.keys():
        if key not in defaults:
            out.append(prefix + key)
            continue
        # model.unet / vae / text_encoder / scheduler are free-form architecture dicts
        if prefix + key in ("model.unet", "model.vae", "model.text_encoder", "model.scheduler", "compiler_options"):
            continue
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(defaults[key], ml_collections.ConfigDict):
            out.extend(_unknown_keys(config[key], defaults[key], prefix + key + "."))
    return out


def timestep_sampling(config) -> str:
    """The effective timestep sampling: the config's, or "cubic" for adapters and "uniform" otherwise."""
    if config.loss.timestep_sampling:
        return config.loss.timestep_sampling
    return "cubic" if config.task == "adapter" else "uniform"


def to_plain(value: Any) -> Any:
    """A ConfigDict (or nested values) as plain dicts, lists and scalars (JSON-ready)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
