"""The embedded default model (jaxcontrol/assets/): five runs of train.py on a CPU, in this order.

    python train.py --config configs/embedded.py:vae        --workdir runs/embedded/vae
    python train.py --config configs/embedded.py:unet       --workdir runs/embedded/unet
    python train.py --config configs/embedded.py:controlnet --workdir runs/embedded/controlnet
    python train.py --config configs/embedded.py:adapter    --workdir runs/embedded/adapter
    python train.py --config configs/embedded.py:edit       --workdir runs/embedded/edit

`make embedded-model` runs them and copies the exports into jaxcontrol/assets/ (see
docs/RESULTS.md for what they reach and how long they take). Each later stage reads the earlier
exports from `runs/embedded` (`--config.model.vae_path=...` / `--config.model.pretrained_path=...`
point elsewhere); the ControlNet and the T2I-Adapter both sit on the frozen U-Net and do not
depend on each other.

The data is fill50k at 64x64 px with the ten-colour "basic" palette. The networks are Stable
Diffusion's architecture, shrunk: an AutoencoderKL with a factor-4 latent space (16x16x4 latents),
a 2-layer CLIP text encoder over a BPE tokenizer trained by `tokenizers` on the captions (frozen,
at its random initialisation: the U-Net learns to read it), and a three-level U-Net with cross-
attention at 16x16 (one head, down path only), 8x8 and in the mid block. Its first down block is a
CrossAttnDownBlock2D so that a T2I-Adapter's first feature is added at full latent resolution
(diffusers adds adapter features inside cross-attention down blocks, but after a plain
DownBlock2D's downsampler). The U-Net predicts v on a zero-terminal-SNR schedule: at the last
timestep its input is pure noise, so the flat colours must come from the prompt rather than from
the low frequencies that SD's schedule leaves in the noise (on 16x16 latents those decide the
colours: an epsilon model on SD's schedule scored near chance on background colour). The
ControlNet is a trainable copy of the U-Net's encoder with zero convolutions; the T2I-Adapter is
a full adapter at the U-Net's widths. The instruction editor (`edit`) is the U-Net fine-tuned as an
InstructPix2Pix model: its first convolution widened to 8 input channels (the new ones zero, so
it starts as the text-to-image model), trained on fill50k edit triples ("make the circle red")
with the paper's text and image conditioning dropout.
"""

from jaxcontrol.training.config import default_config

RUNS = "runs/embedded"
RESOLUTION = 64

VAE = dict(
    block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=8,
    sample_size=RESOLUTION,
)
TEXT_ENCODER = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
    vocab_size=512, hidden_act="quick_gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
)
UNET = dict(
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, cross_attention_dim=64,
    attention_head_dim=(1, 4, 4), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), sample_size=RESOLUTION // 4,
)
# v-prediction on a zero-terminal-SNR schedule (Lin et al. 2023): at the last timestep the input is
# pure noise, so the flat colours must come from the prompt, not from the noise's low frequencies
SCHEDULER = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
EDIT_STEPS = 4000
STAGES = ("vae", "unet", "controlnet", "adapter", "edit")


def _common(c):
    c.model.vae = dict(VAE)
    c.model.text_encoder = dict(TEXT_ENCODER)
    c.model.unet = dict(UNET)
    c.model.scheduler.update(SCHEDULER)
    c.data.dataset = "fill50k"
    c.data.data_dir = f"{RUNS}/tfds"  # shared by the runs
    c.data.resolution = RESOLUTION
    c.data.fill50k_palette = "basic"
    c.data.fill50k_num_train = 12_000
    c.data.fill50k_num_validation = 200
    c.data.read_threads = 2
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"
    c.optim.min_lr_ratio = 0.1
    c.log.every = 50
    c.log.progress_bar = False
    c.checkpoint.keep = 2
    c.validation.num_images = 8
    c.validation.num_inference_steps = 20
    c.validation.guidance_scale = 4.0
    c.export.diffusers = False
    c.export.jaxcontrol = True
    return c


def get_config(stage: str = "unet"):
    if stage not in STAGES:
        raise ValueError(f"configs/embedded.py:<stage>: stage must be one of {STAGES}, got {stage!r}")
    c = _common(default_config())
    c.task = stage
    if stage == "vae":
        c.model.init = "scratch"
        c.data.resolution = RESOLUTION // 2  # convolutional: trained on 32 px images, used at 64
        c.data.fill50k_num_train = 8_000
        c.steps = 600
        c.batch_size = 16
        c.optim.learning_rate = 1e-3
        c.optim.weight_decay = 0.0
        c.vae.kl_weight = 1e-6
        c.checkpoint.every = 200
        c.validation.every = 0
        return c
    c.data.precompute = True  # latents and text embeddings encoded once, shared by the three stages
    c.data.precomputed_dir = f"{RUNS}/precomputed"
    if stage == "unet":
        c.model.init = "scratch"
        c.model.vae_path = f"{RUNS}/vae/export/jaxcontrol/vae"
        c.steps = 3000
        c.batch_size = 32
        c.optim.learning_rate = 1e-3
        c.optim.ema_decay = 0.995
        c.loss.proportion_empty_prompts = 0.1  # for classifier-free guidance
        c.checkpoint.every = 500
        c.validation.every = 500
        c.export.scheduler_class = "DDIMScheduler"
        return c
    c.model.init = "pretrained"
    c.model.pretrained_path = f"{RUNS}/unet/export/jaxcontrol/pipeline"
    if stage == "edit":  # the instruction editor: the U-Net widened to 8 input channels, on edit triples
        c.task = "instruct_pix2pix"
        c.data.fill50k_edits = True
        c.data.precomputed_dir = f"{RUNS}/precomputed_edits"
        c.instruct_pix2pix.conditioning_dropout_prob = 0.05
        c.steps = EDIT_STEPS
        c.batch_size = 32
        c.optim.learning_rate = 1e-3
        c.optim.ema_decay = 0.995
        c.checkpoint.every = 250
        c.validation.every = 500
        c.validation.guidance_scale = 3.0
        c.validation.image_guidance_scale = 1.5
        c.export.scheduler_class = "DDIMScheduler"
        return c
    c.loss.proportion_empty_prompts = 0.5  # as in the ControlNet paper's fill50k tutorial
    c.batch_size = 32
    c.checkpoint.every = 250
    c.validation.every = 500
    if stage == "controlnet":
        c.controlnet.conditioning_embedding_out_channels = (16, 32, 64)  # three entries: factor-4 latents
        c.steps = 1000
        c.optim.learning_rate = 1e-3
        c.export.every = 100  # snapshots for the fidelity-vs-training-step plot
    else:
        c.adapter.channels = UNET["block_out_channels"]
        c.adapter.num_res_blocks = 1
        c.adapter.downscale_factor = 4
        c.steps = 600
        c.optim.learning_rate = 5e-4
    return c
