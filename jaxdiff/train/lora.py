"""LoRA training (Hu et al. 2021) on a frozen Stable Diffusion base: only the adapters learn.

    jaxdiff train --config experiments/digits_lora.py --workdir runs/digits_lora
    jaxdiff export-lora runs/digits_lora --out digits_bold.safetensors    # train/lora_export.py

`jaxdiff train` takes this path when the config has a `lora` section (`build.is_lora`). The base
is a diffusers Stable Diffusion folder (`lora.base`, e.g. what `jaxdiff export` writes from a
digits_text run), read once with `convert.folder.load_pretrained`: its autoencoder and text
encoder make the cached latents and caption states exactly as a latent text run does
(`train/latent.py`), its U-Net is the frozen network the adapters change.

What the trainer holds (`build_trainer`):

    TrainState.params / ema_params / opt_state   the adapters only: {kernel path: {"down", "up"}}
                                                 (nested like the U-Net tree), their EMA and Adam
                                                 moments; so the checkpoint holds only these
    base (Trainer.frozen)                        the U-Net's parameters, laid out on the mesh by
                                                 the same rule table as full training, handed to
                                                 the jitted step as an argument: traced, sharded,
                                                 never donated, never a constant of the program

The step is the ordinary one (`step.make_train_step`) over
`loss(adapters, batch, key, base) = denoising_loss(merge(base, adapters), batch, key)`, where
`merge` is `models.lora.merge` with scale 1: W' = W + (alpha / r) down @ up (eq. 3 of the paper).
Resume, checkpoints, preemption and logging are the outer loop's (`train/loop.py`), unchanged.

Targets (`lora.targets`) use diffusers' module names: to_q, to_k, to_v, to_out (self- and
cross-attention), ff (both feed-forward projections), proj (the transformers' proj_in /
proj_out). Styles (`lora.style`) say what the adapter learns from the base's captioned images:
"bold" thickens every digit (a 3x3 cross-shaped dilation) under the caption "a bold <digit>";
`lora.keep` is the fraction of the original examples kept with their own captions, so the old
captions stay as they were.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import data as data_lib
from jaxdiff.config import LORA_STYLES, LORA_TARGETS
from jaxdiff.models import lora as lora_lib
from jaxdiff.train import frozen_base, latent
from jaxdiff.train import state as state_lib
from jaxdiff.train import task as task_lib
from jaxdiff.train.step import context_condition, make_loss_fn

# diffusers module name -> the jaxdiff kernel paths it means (regular expressions, matched at the end).
TARGETS = {
    "to_q": r"_attn/query/kernel", "to_k": r"_attn/key/kernel", "to_v": r"_attn/value/kernel",
    "to_out": r"_attn/proj_out/kernel", "ff": r"/ff/proj_(?:in|out)/kernel",
    "proj": r"attn_\d+/proj_(?:in|out)/kernel",
}
assert set(TARGETS) == set(LORA_TARGETS) and LORA_STYLES == ("", "bold")
ADAPTER = "lora"            # the adapter's name in `models.lora.merge`


def target_paths(base: dict, targets) -> list[str]:
    """The "/"-joined kernel paths of `base` that the diffusers module names `targets` select."""
    pattern = re.compile("(?:" + "|".join(TARGETS[t] for t in targets) + ")$")
    return sorted(p for p in lora_lib.flat(base) if pattern.search(p))


def as_loras(adapters: dict, alpha: float) -> dict[str, lora_lib.Lora]:
    """{kernel path: Lora} of a trained tree {..., kernel: {"down": [..., in, r], "up": [r, out]}}."""
    leaves = lora_lib.flat(adapters)
    paths = sorted({p.rsplit(lora_lib.SEP, 1)[0] for p in leaves})
    return {p: lora_lib.Lora(leaves[f"{p}/down"], leaves[f"{p}/up"], jnp.float32(alpha)) for p in paths}


def init_adapters(base: dict, cfg: ml_collections.ConfigDict, key: jax.Array) -> dict:
    """Fresh adapters (down random, up zero: the adapted network starts as the base) on the
    kernels `cfg.lora.targets` selects, as the nested tree the TrainState holds."""
    paths = target_paths(base, cfg.lora.targets)
    fresh = lora_lib.init(base, paths, cfg.lora.rank, key, alpha=cfg.lora.alpha)
    return lora_lib.unflat({f"{p}/{k}": getattr(w, k) for p, w in fresh.items() for k in ("down", "up")})


def adapted_loss(loss_fn, alpha: float):
    """`loss(adapters, batch, key, base)` of a full-network `loss_fn(params, batch, key)`."""
    def loss(adapters, batch, key, base):
        params = lora_lib.merge(base, {ADAPTER: as_loras(adapters, alpha)}, {ADAPTER: jnp.float32(1.0)})
        return loss_fn(params, batch, key)
    return loss


def thicken(images: np.ndarray) -> np.ndarray:
    """The "bold" style: each image [N, H, W, C] in [-1, 1] dilated by a 3x3 cross (a pixel takes
    the brightest of itself and its four neighbours), so strokes gain about one pixel a side."""
    p = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    return np.max(np.stack([p[:, 1:-1, 1:-1], p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]), axis=0)


def styled_examples(cfg, images, labels, caption_ids, captions):
    """(images, labels, caption ids, captions) to train on: every image in `cfg.lora.style`
    under its new caption, plus the first `cfg.lora.keep` of the originals as they were."""
    from jaxdiff.data.digits import DIGIT_WORDS

    if not cfg.lora.style:
        return images, labels, caption_ids, tuple(captions)
    new = tuple(f"a {cfg.lora.style} {w}" for w in DIGIT_WORDS)
    keep = round(cfg.lora.keep * len(images))
    all_captions = tuple(captions) + new
    return (np.concatenate([thicken(images), images[:keep]]), np.concatenate([labels, labels[:keep]]),
            np.concatenate([len(captions) + labels, caption_ids[:keep]]).astype(np.int32), all_captions)


class LoraTask(frozen_base.FrozenBaseTask):
    """A latent text task over the base's own parts, plus the frozen U-Net: `model` (the `UNet`
    module) and `base_params` (its tree, numpy)."""

    kind = task_lib.LORA


def build_task(cfg: ml_collections.ConfigDict, workdir: str, *, batch_size: int, process_index: int,
               process_count: int) -> LoraTask:
    """Read the base folder, cache latents and caption states in `workdir` and build the batches
    (see the module docstring); `batch_size` is the per-process batch."""
    unet, unet_params, fparts = frozen_base.read_base(cfg, cfg.lora.base)
    examples, captions = latent.captioned_examples(cfg, "LoRA training")
    images, labels, caption_ids, captions = styled_examples(
        cfg, examples["image"], examples["label"], examples["caption"], captions)
    lat, states, null = frozen_base.cache_latents_and_texts(workdir, fparts, images, captions)  # [N, h, w, c], [K, S, D], [S, D]
    ds = data_lib.from_arrays(
        lat, labels, batch_size=batch_size, seed=cfg.seed,
        extras={"caption": caption_ids, "context": states[caption_ids]}, captions=captions,
        description=f"latents of {cfg.data.dataset} ({cfg.lora.style or 'as is'})",
        process_index=process_index, process_count=process_count)
    return LoraTask(ds, model=unet, base_params=unet_params, null_context=null, captions=captions,
                    caption_states=states, parts=fparts, images=images, labels=labels)


def init_state_fn(base, tx, cfg):
    """`() -> TrainState` over fresh adapters on `base` (traced under jit or eval_shape)."""
    def init():
        k_init, k_run = jax.random.split(jax.random.PRNGKey(cfg.seed))
        return state_lib.create(init_adapters(base, cfg, k_init), tx, k_run)
    return init


def build_trainer(cfg: ml_collections.ConfigDict, mesh, task: LoraTask, schedule, tx):
    """The `build.Trainer` of a LoRA run: state = adapters, `frozen` = (the base on the mesh,)."""
    full_loss = make_loss_fn(task.model.apply, schedule.alphas_cumprod, prediction_type=cfg.diffusion.prediction_type,
                             min_snr_gamma=cfg.diffusion.min_snr_gamma,
                             condition=context_condition(cfg.text.dropout, task.null_context))
    return frozen_base.build_trainer(cfg, mesh, task.base_params, lambda base: init_state_fn(base, tx, cfg),
                                     adapted_loss(full_loss, cfg.lora.alpha), tx)


