"""pytorch-fid's Inception-v3 weights (safetensors) <-> the Flax `models.inception.InceptionV3`.

    params = load_inception("pt_inception-2015-12-05-6726825d.safetensors")
    pool3, logits = InceptionV3().apply({"params": params}, images)

jaxdiff never downloads these weights and never unpickles: the FID weights are published as
the pickle `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's FID_WEIGHTS_URL). Convert it
once, where you trust it, with torch's tensors-only loader:

    python -c "import torch, safetensors.torch as st; st.save_file(torch.load('pt_inception-2015-12-05-6726825d.pth', weights_only=True), 'pt_inception-2015-12-05-6726825d.safetensors')"

Names: the state dict of pytorch-fid's `fid_inception_v3()` module, one Flax module per torch
module with the dots turned into slashes:

    Mixed_5b.branch1x1.conv.weight   [O, I, kh, kw]  ->  Mixed_5b/branch1x1/conv/kernel [kh, kw, I, O]
    Mixed_5b.branch1x1.bn.weight / .bias             ->  .../bn/scale / bias
    Mixed_5b.branch1x1.bn.running_mean / running_var ->  .../bn/mean / var
    fc.weight [1008, 2048] / fc.bias                 ->  fc/kernel [2048, 1008] / fc/bias

`bn.num_batches_tracked` (a training counter) is read past. Any other missing or unexpected key,
or a shape that does not fit, is one CheckpointError line.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import names
from jaxdiff.convert.tensors import read_safetensors, refuse_pickle
from jaxdiff.models.inception import INPUT_SIZE, InceptionV3

WHAT = "Inception-v3 (pytorch-fid) weights"
_IGNORED_SUFFIX = ".num_batches_tracked"
_BN_STATS = {"mean": "running_mean", "var": "running_var"}


@functools.lru_cache(maxsize=1)
def table() -> names.Table:
    """One Entry per leaf of `InceptionV3`'s parameter tree (shapes from `jax.eval_shape`)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: InceptionV3(resize=False).init(jax.random.key(0), x), x)["params"]
    flat = names.flatten(shapes)
    stats = {p: s for p, s in flat.items() if p[-1] in _BN_STATS}
    entries = list(names.from_tree({p: s for p, s in flat.items() if p not in stats},
                                   lambda module: module.replace("/", ".")))
    for path, s in stats.items():
        torch_key = ".".join(path[:-1]) + "." + _BN_STATS[path[-1]]
        entries.append(names.Entry(path, torch_key, tuple(s.shape), names.SAME))
    return tuple(entries)


def to_flax(state_dict) -> dict:
    """{pytorch-fid state-dict key: array} -> the InceptionV3 parameter tree (float32 numpy)."""
    kept = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
    return names.to_flax(kept, table(), what=WHAT)


def to_torch(params) -> dict[str, np.ndarray]:
    """The inverse of `to_flax` (without `num_batches_tracked`): for tests and round trips."""
    return names.to_torch(params, table(), what=WHAT)


def load_inception(path: str) -> dict:
    """Read pytorch-fid's Inception weights from a `.safetensors` file -> parameter tree.

    A pickle (`.pth`, ...) is refused before it is opened, with the conversion command; a
    missing, truncated or foreign file is one CheckpointError line naming it.
    """
    refuse_pickle(path)
    state_dict = read_safetensors(path)
    return to_flax(state_dict)
