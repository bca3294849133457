"""LoRA adapters on a Stable Diffusion pipeline: load, scale, fuse, save.

    pipe.load_lora("pixel-art.safetensors", scale=0.7)              # diffusers/PEFT or kohya
    pipe.load_lora("lora-folder/", scale=0.5, adapter_name="ink")   # several at once
    pipe.set_lora_scales({"default_0": 0.3, "ink": 1.0})            # traced: no recompilation
    images = pipe("a cat", lora_scale=0.5)                          # per call, times every scale
    pipe.fuse_lora(); ...; pipe.unfuse_lora()                       # fold in / restore exactly
    pipe.save_lora("out/", adapter_name="ink")                      # what diffusers loads back

A LoRA is a transform of the parameter tree (`jaxdiff.models.lora`), never a module change: the
pipeline keeps its base parameters and the adapters ({name: {part: {kernel path: Lora}}}, parts
"unet" and "text_encoder"), and each network call gets `lora.Adapted(base, adapters, scales)`,
merged inside the jitted function (`with_lora`); the merge does not depend on the step, and XLA
moves it out of the sampling scan (seen in the compiled CPU program), so it runs once per call
and the merged kernels live only during that call. The scales (the adapter's scale times the call's
`lora_scale`, which is diffusers' `cross_attention_kwargs={"scale": s}`) are traced leaves, so a
new scale reuses the compiled program; loading or unloading an adapter changes the tree and
compiles once. `fuse_lora` folds the adapters at their current scales into the stored weights
(calls then cost what the base model costs) and keeps the original kernels it replaced, so
`unfuse_lora` restores them bit for bit.

Files: see `jaxdiff/convert/lora.py` (formats, key names, errors).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from jaxdiff import compiler
from jaxdiff import sharding as sharding_lib
from jaxdiff.convert import clip as clip_convert
from jaxdiff.convert import lora as lora_convert
from jaxdiff.convert import tensors
from jaxdiff.convert import unet as unet_convert
from jaxdiff.models import lora as lora_lib
from jaxdiff.pipelines import core


def with_lora(fn):
    """`fn(params, *args)` taking `lora.Adapted` params too (merged inside the call). The wrapper
    carries `fn`'s name (through partials), so traces and compiles are reported under it; make
    it once per pipeline, like `fn` (it is part of jit's cache key)."""
    def network(params, *args, **kwargs):
        return fn(lora_lib.resolve(params), *args, **kwargs)

    inner = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    network.__name__ = network.__qualname__ = getattr(inner, "__name__", "network")
    return network


@compiler.jit
def _merge(params, adapters, scales):
    return lora_lib.merge(params, adapters, scales)


def take_lora_scale(kwargs: dict) -> dict:
    """diffusers' `cross_attention_kwargs={"scale": s}` -> `lora_scale=s` (other keys refused)."""
    extra = kwargs.pop("cross_attention_kwargs", None)
    if extra is None:
        return kwargs
    if not isinstance(extra, dict) or set(extra) - {"scale"}:
        raise ValueError(f"cross_attention_kwargs={extra!r}: jaxdiff reads only {{'scale': s}} from it (the LoRA "
                         "scale); pass lora_scale=s")
    if "scale" in extra:
        if kwargs.get("lora_scale") is not None:
            raise ValueError("give the LoRA scale once: lora_scale or cross_attention_kwargs['scale'], not both")
        kwargs["lora_scale"] = extra["scale"]
    return kwargs


def tables(unet, text_encoder=None, text_encoder_2=None) -> dict:
    """{part: {torch module name: entry}} of the LoRA targets of the given networks."""
    out = {"unet": lora_convert.unet_names(unet_convert.table(unet, unet.in_channels or 4), unet)}
    for part, module in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if module is not None:
            out[part] = lora_convert.kernel_names(clip_convert.table(module, prefix=""))
    return out


def save_lora(path: str | os.PathLike, adapters: dict, *, unet, text_encoder=None, text_encoder_2=None) -> str:
    """Write adapters {part: {kernel path: Lora}} of these networks as a diffusers / PEFT LoRA
    (`pytorch_lora_weights.safetensors` in the folder `path`, or the `.safetensors` file `path`)
    that diffusers' `load_lora_weights` reads. Returns the file written."""
    return lora_convert.write(path, jax.device_get(adapters), tables(unet, text_encoder, text_encoder_2))


class LoraMixin:
    """The LoRA methods of a pipeline with `unet`, `text_encoder` (and maybe `text_encoder_2`),
    `params` {part: tree}, `mesh` (see the module docstring)."""

    _lora: dict
    _lora_scales: dict
    _lora_fused: dict | None

    def _lora_state(self):
        if "_lora" not in self.__dict__:
            self._lora, self._lora_scales, self._lora_fused = {}, {}, None
        return self._lora

    @functools.cached_property
    def _lora_tables(self) -> dict:
        return tables(self.unet, self.text_encoder, getattr(self, "text_encoder_2", None))

    @property
    def lora_scales(self) -> dict[str, float]:
        """{adapter name: scale} of the loaded adapters."""
        self._lora_state()
        return dict(self._lora_scales)

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0, adapter_name: str | None = None, *,
                  weight_name: str | None = None) -> str:
        """Load a LoRA file or folder (diffusers/PEFT or kohya safetensors) as adapter
        `adapter_name` (default "default_<k>", as diffusers) at `scale`. Returns the name.
        weight_name: the file inside the folder `path` (diffusers' name), when it holds several.
        Raises CheckpointError for a file that does not fit this pipeline (see `convert.lora`)."""
        loaded = self._lora_state()
        scale = core.check_scale("scale", scale)
        name = f"default_{len(loaded)}" if adapter_name is None else adapter_name
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
        if name in loaded:
            raise ValueError(f"an adapter named {name!r} is already loaded; pass another adapter_name or "
                             f"unload_lora({name!r}) first")
        if self._lora_fused is not None:
            raise ValueError("the loaded LoRAs are fused into the weights; unfuse_lora() before loading another")
        if weight_name is not None:
            path = tensors.inside(os.fspath(path), weight_name)
        adapters = lora_convert.read(path, self._lora_tables)
        for part, adapter in adapters.items():
            lora_lib.check(self.params[part], adapter, what=f"{path} ({part})")
        replicated = sharding_lib.replicated(self.mesh)
        loaded[name] = jax.tree.map(lambda x: sharding_lib.put(np.asarray(x, np.float32), replicated), adapters)
        self._lora_scales[name] = scale
        return name

    def unload_lora(self, adapter_name: str | None = None) -> None:
        """Remove one adapter (default: all of them)."""
        loaded = self._lora_state()
        if self._lora_fused is not None:
            raise ValueError("the loaded LoRAs are fused into the weights; unfuse_lora() before unloading")
        for name in list(loaded) if adapter_name is None else [self._lora_name(adapter_name)]:
            del loaded[name], self._lora_scales[name]

    def set_lora_scales(self, scales: dict | float) -> None:
        """New scales: {adapter name: scale}, or one number for every adapter. Traced: the next
        call reuses the compiled program."""
        loaded = self._lora_state()
        if self._lora_fused is not None:
            raise ValueError("the loaded LoRAs are fused at their scales; unfuse_lora() before changing them")
        if not isinstance(scales, dict):
            scales = {name: scales for name in loaded}
        checked = {self._lora_name(n): core.check_scale(f"the scale of LoRA {n!r}", s) for n, s in scales.items()}
        self._lora_scales.update(checked)

    def _lora_name(self, name) -> str:
        loaded = self._lora_state()
        if name not in loaded:
            have = ", ".join(map(repr, loaded)) or "none is loaded"
            raise ValueError(f"no LoRA adapter named {name!r}; loaded: {have}")
        return name

    def _lora_params(self, part: str, lora_scale=None):
        """The parameters a `with_lora` network call of `part` gets: the stored tree, or an
        `Adapted` with the adapters on `part` and their scales times `lora_scale`."""
        loaded = self._lora_state()
        scale = core.check_scale("lora_scale", lora_scale, optional=True)
        if self._lora_fused is not None:
            if scale is not None:
                raise ValueError("lora_scale has no effect on fused LoRAs; unfuse_lora() to scale them per call")
            return self.params[part]
        adapters = {n: a[part] for n, a in loaded.items() if part in a}
        if not adapters:
            return self.params[part]
        factor = 1.0 if scale is None else scale
        scales = {n: np.float32(self._lora_scales[n] * factor) for n in adapters}
        return lora_lib.Adapted(self.params[part], adapters, scales)

    def fuse_lora(self) -> None:
        """Fold every loaded adapter, at its current scale, into the stored weights; the kernels
        it replaces are kept for `unfuse_lora`."""
        loaded = self._lora_state()
        if not loaded:
            raise ValueError("no LoRA is loaded; load_lora(...) first")
        if self._lora_fused is not None:
            raise ValueError("the loaded LoRAs are already fused; unfuse_lora() first")
        fused = {}
        for part in {p for a in loaded.values() for p in a}:
            adapted = self._lora_params(part)
            touched = {path for a in adapted.adapters.values() for path in a}
            flat = lora_lib.flat(self.params[part])
            fused[part] = {path: flat[path] for path in touched}
            merged = _merge(adapted.base, adapted.adapters, adapted.scales)
            self.params[part] = sharding_lib.place(merged, jax.tree.map(lambda x: x.sharding, self.params[part]))
        self._lora_fused = fused

    def unfuse_lora(self) -> None:
        """Put back the exact kernels `fuse_lora` replaced; the adapters apply per call again."""
        self._lora_state()
        if self._lora_fused is None:
            raise ValueError("no LoRA is fused; fuse_lora() first")
        for part, originals in self._lora_fused.items():
            flat = lora_lib.flat(self.params[part])
            flat.update(originals)
            self.params[part] = lora_lib.unflat(flat)
        self._lora_fused = None

    def save_lora(self, path: str | os.PathLike, adapter_name: str | None = None) -> str:
        """Write one loaded adapter (default: the only one) as a diffusers / PEFT LoRA file that
        diffusers' `load_lora_weights` reads; see `save_lora`. Returns the file written."""
        loaded = self._lora_state()
        if adapter_name is None:
            if len(loaded) != 1:
                raise ValueError(f"{len(loaded)} LoRA adapters are loaded; name the one to save (adapter_name=one "
                                 f"of {', '.join(map(repr, loaded)) or 'none'})")
            adapter_name = next(iter(loaded))
        adapters = loaded[self._lora_name(adapter_name)]
        return lora_convert.write(path, jax.device_get(adapters), self._lora_tables)
