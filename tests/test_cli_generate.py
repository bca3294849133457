"""`jaxdiff generate` on a tiny Stable Diffusion folder: the per-step progress bar reaches the
user, and a picture too large for memory is one line, not a crash."""

import pytest
from conftest import run_cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny SD folder saved by diffusers from random components (the skip lives here: only
    building the folder needs the PyTorch reference)."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sd = pytest.importorskip("test_pipeline_sd")       # its tiny random diffusers components
    tmp = tmp_path_factory.mktemp("sd")
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref = sd._pipeline(diffusers.StableDiffusionPipeline, sd._components(tmp, 4, scheduler))
    ref.save_pretrained(str(tmp / "model"), safe_serialization=True)
    return tmp / "model"


def test_progress_bar_and_aliases(folder, tmp_path):
    proc = run_cli("generate", "--model", str(folder), "--prompt", "a cat", "--num_inference_steps", "2",
                   "--num_images_per_prompt", "1", "--guidance_scale", "1", "--out", str(tmp_path / "c.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sample: 100%" in proc.stderr and "2/2" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "c.png").is_file()


def test_picture_too_large_for_memory_is_one_line(folder):
    proc = run_cli("generate", "--model", str(folder), "--prompt", "a cat", "--height", "100000", "--width", "100000",
                   "--no-progress")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
    assert lines[0].startswith("jaxdiff generate: error: ") and "memory" in lines[0], lines[0]
