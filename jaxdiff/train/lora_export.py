"""A LoRA run's adapters written as diffusers' `pytorch_lora_weights.safetensors`.

    jaxdiff export-lora runs/digits_lora --out digits_bold.safetensors     # the command line
    export_lora("runs/digits_lora", "digits_bold.safetensors")             # the same from Python
    pipe = jaxdiff.StableDiffusion.from_pretrained("runs/digits_sd")        # the run's lora.base
    pipe.load_lora("digits_bold.safetensors")                               # or diffusers' load_lora_weights

The checkpoint of a LoRA run (`train/lora.py`) holds only the adapters, as {kernel path: {"down",
"up"}}; with the base U-Net's name table (`convert/unet.py`) they become PEFT keys
(`unet.<module>.lora_A.weight` / `lora_B.weight`, alpha in the header) through `convert/lora.py`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import sharding as sharding_lib
from jaxdiff.train.lora import as_loras, init_state_fn


def export_lora(path: str | os.PathLike, out: str | os.PathLike, step: int | None = None, *,
                ema: bool = True) -> str:
    """Write the adapters of the LoRA run at `path` (a work dir, its checkpoints/ or one step
    folder) as diffusers' `pytorch_lora_weights.safetensors` (in the folder `out`, or the file
    `out` when it ends in .safetensors), which `load_lora_weights` and `StableDiffusion.load_lora`
    read. step: None = the latest readable step; ema: the EMA adapters (else the raw ones).
    Returns the file written. Raises CheckpointError for a run that is not a LoRA run or whose
    base folder is gone."""
    import json

    from jaxdiff import config as config_lib
    from jaxdiff.checkpoint import Checkpointer, resolve
    from jaxdiff.convert import lora as lora_convert
    from jaxdiff.convert import unet as unet_convert
    from jaxdiff.errors import CheckpointError
    from jaxdiff.train.build import build_optimizer, is_lora

    directory, found = resolve(os.fspath(path))
    step = found if step is None else step
    ckpt = Checkpointer(directory, read_only=True)
    try:
        cfg = config_lib.from_json(json.dumps(ckpt.read_config(step)))
        if not is_lora(cfg):
            raise CheckpointError(f"{path} is not a LoRA run (its config has no lora section); export a "
                                  "latent text run with `jaxdiff export` instead")
        folder = os.path.join(cfg.lora.base, "unet")
        if not os.path.isdir(folder):
            raise CheckpointError(f"{path}: the run's base U-Net folder {folder} is missing (the adapters "
                                  "are saved against it; restore the base folder or point lora.base at it)")
        unet, base = unet_convert.load(folder)
        base_abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32), base)
        abstract = jax.eval_shape(init_state_fn(base_abstract, build_optimizer(cfg), cfg))
        mesh = sharding_lib.inference_mesh("dp", jax.local_devices())
        state, _ = ckpt.restore(sharding_lib.with_shardings(abstract, sharding_lib.tree_shardings(abstract, mesh, "dp")),
                                step)
    finally:
        ckpt.close()
    adapters = as_loras(sharding_lib.gather(state.ema_params if ema else state.params), cfg.lora.alpha)
    table = lora_convert.unet_names(unet_convert.table(unet, unet.in_channels or 4), unet)
    return lora_convert.write(out, {"unet": jax.device_get(adapters)}, {"unet": table})
