"""Latent text-to-image on the embedded digits: "a handwritten seven" -> a picture of a 7.

    jaxdiff train --config experiments/digits_text.py --workdir runs/digits_text

One command does the whole latent diffusion recipe (Rombach et al. 2022) at toy scale, offline:

1. fits a tiny AutoencoderKL on the 16x16 digits (16x16x1 -> 8x8x4 latents; reconstruction + a
   small KL term) and saves it as a diffusers folder in WORKDIR/vae (skipped when present);
2. learns a CLIP-format BPE tokenizer from the captions (WORKDIR/tokenizer) and creates a tiny,
   random, frozen CLIP text encoder (WORKDIR/text_encoder);
3. caches the posterior-mean latents of all 5,000 digits and the text states of the 40 distinct
   captions and of "" (WORKDIR/cache);
4. trains a small cross-attention U-Net on the latents, with 10% of captions dropped to "" for
   classifier-free guidance (checkpoints and resume as for pixel runs);
5. samples one column per digit at guidance 4 (samples.png) and 1 (samples_guidance_1.png),
   decodes them, and scores them with a logistic-regression digit classifier fitted on the real
   digits: WORKDIR/text_eval.json holds the accuracy per guidance scale.
"""

import ml_collections

from jaxdiff.config import get_config as base_config


def get_config():
    c = base_config()
    c.data.dataset = "captioned_digits"
    c.data.image_size = 16

    # The denoiser: 8x8x4 latents, two levels (8, 4) with cross-attention at both.
    c.model.class_conditional = False
    c.model.unet = ml_collections.ConfigDict(dict(
        base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
        num_heads=4, num_groups=8, use_linear_projection=True))

    # First stage: fitted once per work dir (or read from `path`, a diffusers AutoencoderKL folder).
    c.vae = ml_collections.ConfigDict()
    c.vae.path = ""                    # "" = WORKDIR/vae, fitted there when missing
    c.vae.latent_channels = 4
    c.vae.block_out_channels = (16, 32)
    c.vae.layers_per_block = 1
    c.vae.norm_num_groups = 8
    c.vae.steps = 600
    c.vae.batch_size = 32
    c.vae.learning_rate = 2e-3
    c.vae.kl_weight = 1e-2             # on KL / num_pixels, next to the per-pixel squared error;
    # 1e-4 leaves latents off-centre (channel means ~1.2, spread 0.4) and samples fail to decode

    # Text: a CLIP tokenizer learnt from the captions and a tiny random, frozen CLIP encoder.
    c.text = ml_collections.ConfigDict()
    c.text.max_length = 8              # BOS + up to 6 tokens + EOS; captions need at most 5
    c.text.num_merges = 64
    c.text.hidden_size = 32
    c.text.intermediate_size = 64
    c.text.num_layers = 2
    c.text.num_heads = 4
    c.text.dropout = 0.1               # P(caption -> "") in training, for guidance

    c.data.batch_size = 32
    c.train.steps = 2000
    c.train.log_every = 50
    c.train.checkpoint_every = 500

    c.sample.num = 80                  # 8 rows x one column per digit
    c.sample.steps = 25                # DDIM (the base config's), x0 clipping off for latents
    c.sample.guidance_scale = 4.0      # samples.png
    c.sample.eval_guidance_scales = (1.0, 4.0)
    return c
