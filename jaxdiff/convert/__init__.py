"""Checkpoint conversion: diffusers-format folders and single-file Stable Diffusion checkpoints
(safetensors only) <-> jaxdiff parameter trees.

    names        the one name-table skeleton: layouts (PyTorch OIHW convolutions and [out, in]
                 linears <-> Flax HWIO / [in, out], ...), tables, to_flax / to_torch with key
                 and shape checks that name what is missing, unexpected or misshapen
    tensors      checkpoint files: safe reading (nothing outside the model folder, malformed
                 files as one-line errors), atomic writing of safetensors and JSON
    unet, vae, clip   each network's table and config translation, and its folder load / save
    single_file  LDM single files: the network tables renamed to LDM keys
    ldm_config   the configs a single file's tensor shapes imply
    folder       whole pipeline folders;  scheduler: scheduler configs -> schedules / samplers
"""
