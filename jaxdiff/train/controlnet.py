"""ControlNet training (Zhang, Rao & Agrawala 2023) on a frozen Stable Diffusion base: only the
ControlNet learns, from control images derived from each training image.

    jaxdiff train --config experiments/digits_controlnet.py --workdir runs/digits_controlnet
    python experiments/digits_controlnet.py runs/digits_sd runs/digits_controlnet --out docs/

`jaxdiff train` takes this path when the config has a `controlnet` section
(`build.frozen_base_module`). The base (`controlnet.base`, a Stable Diffusion folder) is read and
held as for LoRA training (`train/frozen_base.py`): cached latents and caption states from its
autoencoder and text encoder, its U-Net a traced, sharded, non-donated argument of the step.
The TrainState, its EMA, the optimizer state and the checkpoint hold the ControlNet only.

The ControlNet (`models.controlnet.ControlNet.from_unet`) copies the base U-Net's encoder fields;
with `controlnet.init="unet"` its shared weights (conv_in, time embedding, down levels, middle
block) start as the U-Net's, as diffusers' `ControlNetModel.from_unet` does, and the zero
convolutions (and the control embedding's conv_out) start at zero, so at step 0 the controlled
U-Net is exactly the base. The loss is the ordinary denoising loss of

    eps_hat = unet(base, x_t, t, context, down_residuals=d, mid_residual=m),
    (d, m) = controlnet(params, x_t, t, control, context)

with the caption dropped to "" with probability `text.dropout` (the control is kept), so
classifier-free guidance works with the ControlNet attached.

Controls (`controlnet.control`), from each image [H, W, 1] in [-1, 1], as RGB [H, W, 3] in [0, 1]:
"edges" the Sobel gradient magnitude divided by its largest value in the image; "skeleton" the
digit's strokes (pixels above mid-grey) thinned to one pixel (Zhang & Suen 1984).
`controlnet.holdout` examples, spread over the set, are kept out of training (for the
experiment's grid).
"""

from __future__ import annotations

import itertools
import json
import os

import jax
import ml_collections
import numpy as np

from jaxdiff import data as data_lib
from jaxdiff import sharding as sharding_lib
from jaxdiff.config import CONTROLNET_CONTROLS
from jaxdiff.errors import ConfigError
from jaxdiff.models.controlnet import ControlNet
from jaxdiff.train import frozen_base, latent
from jaxdiff.train import state as state_lib
from jaxdiff.train import task as task_lib
from jaxdiff.train.step import context_condition, make_loss_fn

OWN = ("cond_embed", "zero_down", "zero_mid")      # the ControlNet's own subtrees (not the U-Net's)


# --------------------------------------------------------------------------------------------
# Controls.
# --------------------------------------------------------------------------------------------

def _neighbours(p: np.ndarray) -> list[np.ndarray]:
    """The 8 neighbours P2..P9 (clockwise from north) of every pixel of the padded p [N, H+2, W+2]."""
    c = slice(1, -1)
    return [p[:, :-2, c], p[:, :-2, 2:], p[:, c, 2:], p[:, 2:, 2:], p[:, 2:, c], p[:, 2:, :-2], p[:, c, :-2],
            p[:, :-2, :-2]]


def sobel_edges(images: np.ndarray) -> np.ndarray:
    """Edge maps of images [N, H, W, 1] in [-1, 1]: the Sobel gradient magnitude of the [0, 1]
    image over its largest value per image (0 for a flat image), float32 [N, H, W] in [0, 1]."""
    x = np.pad((np.asarray(images, np.float32)[..., 0] + 1.0) / 2.0, ((0, 0), (1, 1), (1, 1)), mode="edge")
    n, ne, e, se, s, sw, w, nw = _neighbours(x)
    gx = (ne + 2 * e + se) - (nw + 2 * w + sw)                                  # [N, H, W]
    gy = (sw + 2 * s + se) - (nw + 2 * n + ne)
    mag = np.sqrt(gx * gx + gy * gy)
    peak = mag.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, mag / np.maximum(peak, 1e-12), 0.0).astype(np.float32)


def skeleton(images: np.ndarray, max_iter: int = 64) -> np.ndarray:
    """One-pixel-wide strokes of images [N, H, W, 1] in [-1, 1] (pixels > 0 thinned by Zhang &
    Suen's two sub-iterations until nothing changes), float32 [N, H, W] in {0, 1}."""
    b = (np.asarray(images)[..., 0] > 0).astype(np.uint8)                       # [N, H, W]
    for _ in range(max_iter):
        changed = False
        for sub in (0, 1):
            nb = _neighbours(np.pad(b, ((0, 0), (1, 1), (1, 1))))
            count = sum(q.astype(np.int32) for q in nb)                          # B(P1)
            ring = nb + nb[:1]
            transitions = sum(((a == 0) & (c == 1)).astype(np.int32) for a, c in itertools.pairwise(ring))  # A(P1)
            p2, p4, p6, p8 = nb[0], nb[2], nb[4], nb[6]
            if sub == 0:
                cond = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                cond = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            drop = (b == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & cond
            if drop.any():
                b = np.where(drop, 0, b).astype(np.uint8)
                changed = True
        if not changed:
            break
    return b.astype(np.float32)


def control_images(kind: str, images: np.ndarray) -> np.ndarray:
    """The `kind` control ("edges" or "skeleton") of images [N, H, W, 1] in [-1, 1] as the RGB
    control images a ControlNet reads: float32 [N, H, W, 3] in [0, 1]."""
    if kind not in CONTROLNET_CONTROLS:
        raise ValueError(f"control must be one of {', '.join(CONTROLNET_CONTROLS)}, got {kind!r}")
    one = sobel_edges(images) if kind == "edges" else skeleton(images)
    return np.repeat(one[..., None], 3, axis=-1)


# --------------------------------------------------------------------------------------------
# The network and its initialisation.
# --------------------------------------------------------------------------------------------

def make_controlnet(unet, cfg: ml_collections.ConfigDict) -> ControlNet:
    """The ControlNet of the base `unet` for an RGB control image."""
    return ControlNet.from_unet(unet, conditioning_channels=3,
                                embedding_channels=tuple(cfg.controlnet.embedding_channels))


def init_params(net: ControlNet, base: dict, key: jax.Array, *, from_unet: bool = True,
                latent_size: int | None = None) -> dict:
    """Fresh ControlNet parameters; with `from_unet`, every subtree it shares with the U-Net
    (all but `OWN`) is the base's (diffusers' `ControlNetModel.from_unet`)."""
    inputs = net.example_inputs(1, latent_size)
    params = net.init(key, inputs.pop("x"), inputs.pop("t"), inputs.pop("control"), **inputs)["params"]
    if from_unet:
        params = {k: (v if k in OWN else base[k]) for k, v in params.items()}
    return params


def init_state_fn(net, cfg, tx, latent_size: int):
    """`base -> () -> TrainState` over a fresh ControlNet (see `init_params`)."""
    def make_init(base):
        def init():
            k_init, k_run = jax.random.split(jax.random.PRNGKey(cfg.seed))
            params = init_params(net, base, k_init, from_unet=cfg.controlnet.init == "unet", latent_size=latent_size)
            return state_lib.create(params, tx, k_run)
        return init
    return make_init


def controlled_apply(net: ControlNet, unet):
    """`apply(variables, x, t, *, base, control, context, train, rngs)`: the base U-Net's
    prediction with the ControlNet's residuals (variables: {"params": the ControlNet's})."""
    def apply(variables, x, t, *, base, control, context, train=False, rngs=None):
        down, mid = net.apply(variables, x, t, control, context=context, train=train, rngs=rngs)
        return unet.apply({"params": base}, x, t, context=context, down_residuals=down, mid_residual=mid,
                          train=train, rngs=rngs)
    return apply


def controlled_loss(net, unet, schedule, cfg, null_context):
    """`loss(controlnet_params, batch, key, base)`: the denoising loss of the controlled U-Net."""
    drop_caption = context_condition(cfg.text.dropout, null_context)
    apply = controlled_apply(net, unet)

    def loss(params, batch, key, base):
        def condition(b, k):
            return {**drop_caption(b, k), "control": b["control"], "base": base}
        return make_loss_fn(apply, schedule.alphas_cumprod, prediction_type=cfg.diffusion.prediction_type,
                            min_snr_gamma=cfg.diffusion.min_snr_gamma, condition=condition)(params, batch, key)
    return loss


# --------------------------------------------------------------------------------------------
# Task and trainer.
# --------------------------------------------------------------------------------------------

class ControlNetTask(frozen_base.FrozenBaseTask):
    """The frozen-base task plus `controlnet` (the `ControlNet` module) and `controls` (the
    training images' control images, [N, H, W, 3])."""

    kind = task_lib.CONTROLNET

    def __init__(self, dataset, *, controlnet, controls, **kwargs):
        super().__init__(dataset, **kwargs)
        self.controlnet = controlnet
        self.controls = controls


def load_examples(cfg: ml_collections.ConfigDict):
    """(images, labels, caption ids, captions) of the whole captioned set."""
    examples, captions = latent.captioned_examples(cfg, "ControlNet training")
    return examples["image"], examples["label"], examples["caption"], tuple(captions)


def split(cfg: ml_collections.ConfigDict, arrays):
    """(training part, held-out part) of each per-example array: `controlnet.holdout` rows, every
    (N // holdout)-th from the first, are held out (the embedded digits are sorted by class, so a
    stride keeps every class in both parts)."""
    n, k = len(arrays[0]), cfg.controlnet.holdout
    if k >= n:
        raise ConfigError(f"config key controlnet.holdout={k} leaves nothing to train on "
                          f"({n} examples); set --config.controlnet.holdout below {n}")
    held = np.zeros(n, bool)
    if k:
        held[np.arange(k) * (n // k)] = True
    return [a[~held] for a in arrays], [a[held] for a in arrays]


def build_task(cfg: ml_collections.ConfigDict, workdir: str, *, batch_size: int, process_index: int,
               process_count: int) -> ControlNetTask:
    """Read the base folder, cache latents and caption states in `workdir`, derive the controls
    and build the batches {"image": latents, "label", "caption", "context", "control"}."""
    unet, unet_params, fparts = frozen_base.read_base(cfg, cfg.controlnet.base)
    images, labels, caption_ids, captions = load_examples(cfg)
    (images, labels, caption_ids), _ = split(cfg, (images, labels, caption_ids))
    lat, states, null = frozen_base.cache_latents_and_texts(workdir, fparts, images, captions)
    net = make_controlnet(unet, cfg)
    if images.shape[1] != lat.shape[1] * net.control_factor:
        need = images.shape[1] // lat.shape[1]
        raise ConfigError(f"config key controlnet.embedding_channels has {len(net.embedding_channels)} widths, which "
                          f"scale a control image by 1/{net.control_factor}, but the base's autoencoder scales by "
                          f"1/{need}; give it {need.bit_length()} widths (e.g. (16, 32) for 1/2)")
    controls = control_images(cfg.controlnet.control, images)                      # [N, H, W, 3]
    ds = data_lib.from_arrays(
        lat, labels, batch_size=batch_size, seed=cfg.seed,
        extras={"caption": caption_ids, "context": states[caption_ids], "control": controls}, captions=captions,
        description=f"latents of {cfg.data.dataset} with {cfg.controlnet.control} controls",
        process_index=process_index, process_count=process_count)
    return ControlNetTask(ds, controlnet=net, controls=controls, model=unet, base_params=unet_params,
                          null_context=null, captions=captions, caption_states=states, parts=fparts,
                          images=images, labels=labels)


def build_trainer(cfg: ml_collections.ConfigDict, mesh, task: ControlNetTask, schedule, tx):
    """The `build.Trainer` of a ControlNet run: state = the ControlNet, `frozen` = (the base U-Net,)."""
    make_init = init_state_fn(task.controlnet, cfg, tx, task.image_shape[0])
    loss = controlled_loss(task.controlnet, task.model, schedule, cfg, task.null_context)
    return frozen_base.build_trainer(cfg, mesh, task.base_params, make_init, loss, tx, init_reads_base=True)


def export_controlnet(path: str | os.PathLike, out: str | os.PathLike, step: int | None = None, *,
                      ema: bool = True) -> str:
    """Write the ControlNet of the run at `path` (a work dir, its checkpoints/ or one step folder)
    as a diffusers `ControlNetModel` folder `out`, which `ControlNetModel.from_pretrained` and
    `StableDiffusion.from_pretrained(base, controlnet=out)` read. step: None = the latest
    readable step; ema: the EMA weights (else the raw ones). Returns `out`. Raises
    CheckpointError for a run that is not a ControlNet run or whose base folder is gone."""
    from jaxdiff import config as config_lib
    from jaxdiff.checkpoint import Checkpointer, resolve
    from jaxdiff.convert import controlnet as controlnet_convert
    from jaxdiff.convert import unet as unet_convert
    from jaxdiff.errors import CheckpointError

    directory, found = resolve(os.fspath(path))
    step = found if step is None else step
    ckpt = Checkpointer(directory, read_only=True)
    try:
        cfg = config_lib.from_json(json.dumps(ckpt.read_config(step)))
        if "controlnet" not in cfg:
            raise CheckpointError(f"{path} is not a ControlNet run (its config has no controlnet section)")
        folder = os.path.join(cfg.controlnet.base, "unet")
        if not os.path.isdir(folder):
            raise CheckpointError(f"{path}: the run's base U-Net folder {folder} is missing (the ControlNet is "
                                  "trained against it; restore the base folder or point controlnet.base at it)")
        unet, base = unet_convert.load(folder)
        net = make_controlnet(unet, cfg)
        make_init = init_state_fn(net, cfg, state_lib.optimizer_from_config(cfg), None)
        abstract = jax.eval_shape(lambda b: make_init(b)(), frozen_base.abstract_base(base))
        mesh = sharding_lib.inference_mesh("dp", jax.local_devices())
        state, _ = ckpt.restore(sharding_lib.with_shardings(abstract, sharding_lib.tree_shardings(abstract, mesh, "dp")),
                                step)
    finally:
        ckpt.close()
    params = jax.device_get(sharding_lib.gather(state.ema_params if ema else state.params))
    controlnet_convert.save(out, net, jax.tree.map(lambda a: np.asarray(a, np.float32), params))
    return os.fspath(out)

