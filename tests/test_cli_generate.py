"""`jaxdiff generate` on a tiny Stable Diffusion folder: the per-step progress bar reaches the
user, and a picture too large for memory is one line, not a crash."""

import pytest
from conftest import run_cli, write_clip_tokenizer

# SD 1.5's DDIM scheduler config
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
             "prediction_type": "epsilon"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Stable Diffusion folder written by jaxdiff alone (no PyTorch needed): U-Net, VAE and
    CLIP text encoder at toy widths with their initial weights, a byte-level tokenizer, DDIM."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.convert import clip, unet, vae
    from jaxdiff.convert.folder import save_pretrained

    tmp = tmp_path_factory.mktemp("sd")
    vocab = write_clip_tokenizer(tmp / "tokenizer", max_length=77)
    um = unet.module_from_config(dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4))
    vm = vae.module_from_config(dict(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8))
    tm = clip.module_from_config(dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=2, pad_token_id=vocab - 1))

    def init(module, *args, **kwargs):
        return jax.jit(lambda: module.init(jax.random.key(0), *args, **kwargs))()["params"]

    components = {"unet": (um, init(um, **um.example_inputs())),
                  "vae": (vm, init(vm, jnp.zeros((1, 16, 16, 3)))),
                  "text_encoder": (tm, init(tm, jnp.zeros((1, 77), jnp.int32))), "scheduler": SCHEDULER}
    assert save_pretrained(tmp / "model", components, tokenizer_dir=tmp / "tokenizer") == []
    return tmp / "model"


def test_progress_bar_and_aliases(folder, tmp_path):
    proc = run_cli("generate", "--model", str(folder), "--prompt", "a cat", "--num_inference_steps", "2",
                   "--num_images_per_prompt", "1", "--guidance_scale", "1", "--out", str(tmp_path / "c.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sample: 100%" in proc.stderr and "2/2" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "c.png").is_file() and "wrote 1 image(s)" in proc.stdout, proc.stdout


def test_picture_too_large_for_memory_is_one_line(folder):
    proc = run_cli("generate", "--model", str(folder), "--prompt", "a cat", "--height", "100000", "--width", "100000",
                   "--no-progress")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
    assert lines[0].startswith("jaxdiff generate: error: ") and "memory" in lines[0], lines[0]
