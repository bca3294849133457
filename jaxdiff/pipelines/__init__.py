"""Ready-made ways to sample: one core (`core.py`) and thin front ends.

    pixel             jaxdiff.load(run).sample(...): class-conditional pixel models
    stable_diffusion  StableDiffusion.from_pretrained(folder): text-to-image, img2img, inpainting
    latent_text       the samples and score of a latent text-to-image training run

`write_run_samples` is the sample writer the command line hands the trainer.
"""

from __future__ import annotations


def write_run_samples(run, params, name: str, final: bool = True):
    """Write a training run's sample grid with `params` (see `jaxdiff.train.loop.train`), by the
    writer of its task's kind: a pixel run's class grid, or a latent text run's caption grid and
    score."""
    from jaxdiff.train import task

    if run.task.kind == task.LATENT_TEXT:
        from jaxdiff.pipelines import latent_text
        return latent_text.write_run_samples(run, params, name, final)
    from jaxdiff.pipelines import pixel
    return pixel.write_run_samples(run, params, name, final)
