"""The smallest run that exercises everything: one-block networks, 8x8 images, a few steps.

    python train.py --config configs/smoke.py --workdir runs/smoke
    python train.py --config configs/smoke.py --workdir runs/smoke-adapter --config.task=adapter

Used by the tests (tests/test_training.py) and as a check that an installation trains, saves,
resumes and exports. The numbers it produces mean nothing.
"""

from jaxcontrol.training.config import default_config

UNET = dict(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, cross_attention_dim=16,
            attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
VAE = dict(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
           layers_per_block=1, norm_num_groups=4, latent_channels=4)
TEXT_ENCODER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=77, vocab_size=400, hidden_act="quick_gelu", bos_token_id=0,
                    eos_token_id=2, pad_token_id=1)


def get_config():
    c = default_config()
    c.task = "controlnet"
    c.model.init = "scratch"
    c.model.unet = UNET
    c.model.vae = VAE
    c.model.text_encoder = TEXT_ENCODER
    c.controlnet.conditioning_embedding_out_channels = (8,)  # 1x: the one-block VAE keeps the image size
    c.adapter.channels = UNET["block_out_channels"]
    c.adapter.downscale_factor = 1
    c.adapter.num_res_blocks = 1
    c.data.dataset = "fill50k"
    c.data.resolution = 8
    c.data.fill50k_num_train = 64
    c.data.fill50k_num_validation = 4
    c.data.read_threads = 1
    c.data.prefetch = 2
    c.steps = 8
    c.batch_size = 8
    c.optim.learning_rate = 1e-3
    c.loss.proportion_empty_prompts = 0.25
    c.log.every = 2
    c.log.progress_bar = False
    c.checkpoint.every = 2
    c.checkpoint.keep = 2
    c.validation.every = 0
    c.validation.at_end = False
    c.validation.num_images = 2
    c.validation.num_inference_steps = 2
    c.export.at_end = False
    # a CPU compiles the step about twice as fast at XLA's lowest optimisation level; speed is no concern here
    c.compiler_options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return c
