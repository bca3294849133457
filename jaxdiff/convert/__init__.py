"""Checkpoint conversion: diffusers-format folders and single-file Stable Diffusion checkpoints
(safetensors only) <-> jaxdiff parameter trees.

`tensors` holds the layout rules every mapping shares (PyTorch OIHW convolutions and [out, in]
linears to Flax HWIO / [in, out]), reading and writing safetensors, and key checks that name
what is missing or unexpected. Each network's table lives in its own module.
"""
