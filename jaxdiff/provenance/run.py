"""What produced a training run: `provenance.json` beside its config, `MODEL_CARD.md` at its end,
and the recipe of its sample grids.

    record_run(workdir, cfg, task, start_step)       # at every start and resume (process 0)
    write_model_card(workdir, cfg, task, step)        # after the final samples (process 0)
    grid_recipe(run, params, name, ...)               # the recipe a sample grid PNG carries

`provenance.json` is a JSON list, one entry per start or resume, appended (an earlier entry is
never rewritten): the event and step, the time (UTC), the full config, the versions of jaxdiff,
jax, jaxlib, flax, optax, orbax, grain and numpy, the devices (platform, kind, count, process
count) and a fingerprint of the data: its one-line summary, its number of examples and the sha256
of its first and last examples as the trainer reads them (after any resize), so a changed or
re-ordered source shows up without hashing a whole dataset.

The model card says what was trained on what, for how many steps, to what final loss, links the
sample grid, and states the intended use and limits of a model trained this way.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from typing import Any

import numpy as np

from jaxdiff import files

PROVENANCE = "provenance.json"
MODEL_CARD = "MODEL_CARD.md"
LIMITS = (
    ("- For research, teaching and tests of the training code: the model reproduces the distribution of its "
     "training data and nothing beyond it."),
    ("- It has not been evaluated for bias, safety or fitness for any application; do not use its outputs to "
     "represent real people or events."),
    ("- Its samples can be mistaken for real data of the same kind; keep the recipe in the files you share (do "
     "not pass --no-recipe) so their origin stays visible."),
)
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def versions() -> dict[str, str]:
    """{package: version} of jaxdiff and the libraries a run's numbers depend on."""
    from importlib import metadata

    from jaxdiff import __version__

    found = {"jaxdiff": __version__}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def devices() -> dict[str, Any]:
    """The devices of this run: platform, device kind, counts."""
    import jax

    devs = jax.devices()
    return {"platform": devs[0].platform, "kind": devs[0].device_kind, "count": len(devs),
            "local_count": jax.local_device_count(), "process_count": jax.process_count()}


def _examples(task) -> tuple[Any, int | None]:
    """(a `load(indices) -> (images, labels)` over the task's examples, their number), or
    (None, None) when the task exposes neither."""
    dataset = getattr(task, "dataset", None)
    source = getattr(dataset, "_source", None)
    if source is not None:
        return source.load, int(source.num_examples)
    images = getattr(task, "images", None)                 # latent text tasks keep the pixels
    if images is not None:
        labels = getattr(task, "labels", None)
        return (lambda idx: (images[idx], None if labels is None else labels[idx])), len(images)
    return None, getattr(dataset, "total_examples", None)


def data_fingerprint(task) -> dict[str, Any]:
    """{"summary", "num_examples", "first_last_sha256"} of the task's data (see the module
    docstring); the hash is "unavailable" for a task that does not expose its examples."""
    load, n = _examples(task)
    digest = "unavailable"
    if load is not None and n:
        h = hashlib.sha256()
        for i in sorted({0, n - 1}):
            for part in load(np.array([i])):
                if part is not None:
                    a = np.ascontiguousarray(np.asarray(part))
                    h.update(f"{a.dtype}{a.shape}".encode())
                    h.update(a.tobytes())
        digest = h.hexdigest()
    return {"summary": getattr(task, "summary", None), "num_examples": n, "first_last_sha256": digest}


def record_run(workdir: str, cfg, task, start_step: int) -> dict:
    """Append this start (step 0) or resume to `workdir/provenance.json`; returns the entry. An
    unreadable earlier file is kept aside as provenance.json.unreadable, not overwritten."""
    path = os.path.join(workdir, PROVENANCE)
    entries: list = []
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                entries = json.load(f)
        except (OSError, ValueError):
            entries = None
        if not isinstance(entries, list):
            os.replace(path, path + ".unreadable")
            entries = []
    entry = {"event": "start" if start_step == 0 else "resume", "step": int(start_step),
             "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "versions": versions(), "devices": devices(), "data": data_fingerprint(task),
             "config": json.loads(json.dumps(cfg.to_dict(), default=str))}
    entries.append(entry)
    files.write_text(path, json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return entry


def _final_loss(workdir: str) -> float | None:
    """The loss of the last row of metrics.jsonl (None when there is none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    last = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    last = float(json.loads(line)["loss"])
                except (ValueError, KeyError, TypeError):
                    continue
    return last


def write_model_card(workdir: str, cfg, task, step: int) -> str:
    """Write `workdir/MODEL_CARD.md`; returns its path."""
    data = data_fingerprint(task)
    loss = _final_loss(workdir)
    samples = [n for n in ("samples.png",) if os.path.exists(os.path.join(workdir, n))]
    model = cfg.get("model", {})
    kind = getattr(task, "kind", "pixel")
    lines = [
        f"# Model card: {os.path.basename(os.path.normpath(workdir))}", "",
        f"A {kind.replace('_', ' ')} diffusion model trained with jaxdiff {versions()['jaxdiff']}.", "",
        "## Training", "",
        (f"- data: {data['summary']} ({data['num_examples']} examples; first/last example sha256 "
         f"{data['first_last_sha256'][:16]})"),
        f"- model: {model.get('name', '?')} U-Net, prediction type {cfg.diffusion.prediction_type}",
        (f"- steps: {int(step)} of {int(cfg.train.steps)}, batch size {cfg.data.batch_size}, "
         f"learning rate {cfg.optim.learning_rate:g}, seed {cfg.seed}"),
        f"- final training loss: {'n/a' if loss is None else f'{loss:.5f}'}",
        f"- full config, versions, devices and data fingerprint: [{PROVENANCE}]({PROVENANCE}) and config.json",
        "",
        "## Samples", "",
        *(f"![samples]({n})" for n in samples), *([] if samples else ["(no sample grid was written)"]), "",
        "Every sample PNG carries its recipe (`jaxdiff info samples.png`).", "",
        "## Intended use and limits", "",
        *LIMITS,
        "",
    ]
    path = os.path.join(workdir, MODEL_CARD)
    files.write_text(path, "\n".join(lines))
    return path


def grid_recipe(run, params, name: str, final: bool, *, sampler: str, steps: int, guidance_scale,
                num: int, height: int, width: int, labels: str | None = None,
                captions: list[str] | None = None) -> dict:
    """The recipe of a training sample grid `name` drawn with `params` (seed: the run's)."""
    from jaxdiff.provenance.recipe import make_recipe, params_fingerprint

    found = re.fullmatch(r"samples_(\d+)\.png", os.path.basename(name))   # the loop's periodic grids
    step = int(found.group(1)) if found else (int(run.cfg.train.steps) if final else None)
    return make_recipe("train_samples", model=os.path.basename(os.path.normpath(run.workdir)),
                       weights=params_fingerprint(params), seed=int(run.cfg.seed), num_images=int(num),
                       sampler=sampler, steps=int(steps), guidance_scale=guidance_scale, height=int(height),
                       width=int(width), options={"step": step, "labels": labels, "grid": name,
                                                  "captions": None if captions is None else list(captions)})
