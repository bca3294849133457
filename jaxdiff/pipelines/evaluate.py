"""Evaluate a trained model the way papers report it: `jaxdiff eval`.

    from jaxdiff.pipelines import evaluate
    report = evaluate.evaluate(jaxdiff.load("runs/digits"), metrics=("fid", "kid", "pr"),
                               num=1000, seeds=3)
    report["fid"]["min"], report["fid"]["per_seed"]

Protocol (Karras et al. 2022, "EDM", sec. 5 and their released evaluation): for each of `seeds`
seeds draw `num` images (class-conditional models get the classes in equal shares, 0, 1, ..., K-1,
0, ...), compute the features of every image, compare with the reference, and report every seed's
value, the minimum (what EDM quotes) and the mean and standard deviation over seeds (the spread a
reader needs to judge a difference).

Feature networks and references:

* Digit-sized models ([16, 16, 1], the embedded digits): the shipped digit feature network
  (`metrics.features.digit_features`), "FID-digits". Without `ref` the reference is the 1,000
  held-out digits the feature network never saw (`features.digit_split`); KID and precision /
  recall compare against their features too.
* Any other image size: the FID Inception-v3 from a weights file you supply (`inception`) and a
  reference statistics file (`ref`, `.npz`, see `metrics.reference`; made once from the real data
  with `stats` + `reference.save_reference`). A statistics file holds (mu, sigma) only, so KID and
  precision / recall, which need the real features themselves, are available with the digit
  reference only; asking for them otherwise is a one-line error.

Bits/dim ("bpd", DDPM-objective pixel runs): the DDPM variational bound with the discretised
Gaussian decoder (`metrics.likelihood.ddpm_bound`, Ho et al. 2020 eq. 5 and 13, reverse variance
beta) of the unconditional model (the null class) on test images: the embedded digits' 1,000
held-out ones for the digits (held out from the feature network; the demo diffusion model trains
on all 5,000, so for it this is a training-set figure), the dataset's "test" split otherwise.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from jaxdiff.metrics import distribution, features, reference, stats

METRICS = ("fid", "kid", "pr", "bpd")


def parse_metrics(text: str | Sequence[str]) -> tuple[str, ...]:
    """"fid,kid" or ["fid", "kid"] -> ("fid", "kid"); one-line ValueError for an unknown name."""
    names = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))


def digits_heldout_features() -> np.ndarray:
    """float32 [1000, 128]: digit-net features of the 1,000 held-out embedded digits at 16x16."""
    from jaxdiff.data import digits

    source = digits.digits_source(16, 1, None)
    images, _ = source.load(np.sort(features.digit_split(source.num_examples)[1]))   # [1000, 16, 16, 1]
    return features.digit_features(images)


class _Features:
    """The feature network for images of `image_shape`, its identity, and the reference."""

    def __init__(self, image_shape, ref: str | None, inception: str | None, metrics: tuple[str, ...]):
        self.real = None
        if tuple(image_shape) == features.DIGIT_IMAGE_SHAPE and inception is None:
            self.name, self.dim, self.fn = features.DIGIT_FEATURE_NET, features.DIGIT_FEATURE_DIM, features.digit_features
            if ref is None:
                self.real = digits_heldout_features()
                self.ref = stats.from_features(self.real)
                return
        elif inception is not None:
            self.name, self.dim = features.inception_feature_net(inception), 2048
            self.fn = lambda images: features.inception_features(images, inception)
        else:
            raise ValueError(f"images of shape {tuple(image_shape)} need the FID Inception weights "
                             "(inception=PATH.safetensors) and a reference statistics file (ref=STATS.npz)")
        if ref is None:
            raise ValueError("give a reference statistics file (ref=STATS.npz) made with the same feature network")
        needs_real = [m for m in metrics if m in ("kid", "pr")]
        if needs_real:
            raise ValueError(f"{' and '.join(needs_real)} need the real features, not only a statistics file; "
                             "they are available against the held-out digits (no ref, digit-sized models)")
        self.ref = reference.load_reference(ref, feature_net=self.name, dim=self.dim)


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values, np.float64)
    return {"per_seed": [float(v) for v in arr], "min": float(arr.min()), "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def evaluate(model, *, metrics: Sequence[str] | str = ("fid",), num: int = 1000, seeds: int | Sequence[int] = 3,
             ref: str | None = None, inception: str | None = None, sampler: str | None = None,
             num_steps: int = 50, guidance_scale: float | None = None, batch_size: int | None = 500,
             progress: bool = False, bpd_steps: int = 1000, **sampler_options) -> dict:
    """Draw `num` images per seed from `model` (a `DiffusionModel`, e.g. `jaxdiff.load(run)`),
    and score them (see the module docstring). seeds: a count (seeds 0..n-1) or the seeds.

    bpd_steps: timesteps of the bits/dim bound (1000: the full chain).
    Returns {"fid": {"per_seed", "min", "mean", "std"}, "kid": {... of the KID mean}, "bpd": {...},
    "precision": {...}, "recall": {...}, "num", "seeds", "feature_net", "sampler", "num_steps",
    "guidance_scale"}, for the metrics asked for.
    """
    metrics = parse_metrics(metrics)
    seeds = list(range(int(seeds))) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must be a positive count or a non-empty list of seeds")
    if int(num) != num or num < 2:
        raise ValueError(f"num must be an integer >= 2 (images per seed), got {num}")
    values: dict[str, list[float]] = {k: [] for k in ("fid", "kid", "precision", "recall", "bpd")}
    if "bpd" in metrics:
        images = test_images(model)[:int(num)]
        for seed in seeds:
            values["bpd"].append(float(bits_per_dim(model, images, seed=seed, num_steps=bpd_steps).mean()))
        metrics = tuple(m for m in metrics if m != "bpd")
    feats = _Features(model.image_shape, ref, inception, metrics) if metrics else None
    labels = model.grid_labels(int(num))
    for seed in (seeds if metrics else []):
        images = model.sample(int(num), sampler=sampler, num_steps=num_steps, seed=seed, labels=labels,
                              guidance_scale=guidance_scale, batch_size=batch_size, progress=progress,
                              output_type="np", **sampler_options)                      # [N, H, W, C] in [0, 1]
        fake = feats.fn(np.asarray(images, np.float32) * 2.0 - 1.0)                    # [N, D]
        if "fid" in metrics:
            values["fid"].append(distribution.fid(feats.ref, stats.from_features(fake)))
        if "kid" in metrics:
            size = min(1000, len(fake), len(feats.real))
            values["kid"].append(distribution.kid(feats.real, fake, subset_size=size, seed=seed)[0])
        if "pr" in metrics:
            p, r = distribution.precision_recall(feats.real, fake)
            values["precision"].append(p)
            values["recall"].append(r)
    report = {k: _summary(v) for k, v in values.items() if v}
    report.update(bpd_steps=int(bpd_steps), num=int(num), seeds=seeds, feature_net=feats.name if feats else None,
                  sampler=sampler or "default",
                  num_steps=int(num_steps), guidance_scale=guidance_scale)
    return report


def format_report(report: dict) -> str:
    """The report as lines a person reads: metric, min, mean +- std over the seeds."""
    rows = []
    if report["feature_net"]:
        rows.append(f"{report['num']} images x {len(report['seeds'])} seeds, {report['sampler']} sampler, "
                    f"{report['num_steps']} steps, features {report['feature_net'].split(':')[0]}")
    if "bpd" in report:
        rows.append(f"bits/dim: {report['num']} test images x {len(report['seeds'])} seeds, DDPM bound over "
                    f"{report['bpd_steps']} timesteps")
    for key in ("fid", "kid", "precision", "recall", "bpd"):
        if key in report:
            r = report[key]
            digits = 5 if key == "kid" else 3
            rows.append(f"{key:<10} min {r['min']:.{digits}f}   mean {r['mean']:.{digits}f} +- {r['std']:.{digits}f}")
    return "\n".join(rows)


def is_finite_report(report: dict) -> bool:
    return all(math.isfinite(v) for k in ("fid", "kid", "precision", "recall", "bpd") if k in report
               for v in report[k]["per_seed"])


def evaluate_run(run, params) -> dict[str, float]:
    """The trainer's evaluation (`jaxdiff.train.loop.train(..., evaluate=evaluate_run)`): FID-digits
    of `run.cfg.eval.num` images drawn with `params` (the EMA weights) as the sample grid is drawn
    (its sampler, steps, guidance and the run's seed) -> {"fid_digits": value}. Runs whose images
    the shipped feature network cannot read (not digit-sized, or not a pixel run) get {}."""
    from jaxdiff.pipelines import pixel
    from jaxdiff.train import task as task_lib

    cfg = run.cfg
    num = int(cfg.get("eval", {}).get("num", 0))
    if (num < 2 or run.task.kind == task_lib.LATENT_TEXT
            or tuple(run.task.image_shape) != features.DIGIT_IMAGE_SHAPE):
        return {}
    model = pixel.DiffusionModel(config=cfg, module=run.model, schedule=run.schedule, params=params,
                                 ema_params=params, image_shape=run.task.image_shape)
    guidance = cfg.sample.guidance_scale if model.num_classes else None
    report = evaluate(model, metrics=("fid",), num=num, seeds=[int(cfg.seed)], sampler=cfg.sample.sampler,
                      num_steps=cfg.sample.steps, guidance_scale=guidance)
    return {"fid_digits": report["fid"]["min"]}


PROMPT_METRICS = ("clip_score", "fid")


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file (at most 100,000); one-line errors."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the prompts file {path} as UTF-8 text ({type(e).__name__})") from None
    if not prompts:
        raise ValueError(f"{path} holds no prompt (one per line)")
    if len(prompts) > 100_000:
        raise ValueError(f"{path} holds {len(prompts)} prompts; at most 100,000 per evaluation")
    return prompts


def evaluate_prompts(pipe, prompts: Sequence[str], *, metrics: Sequence[str] | str = ("clip_score",),
                     seeds: int | Sequence[int] = 1, clip: str | None = None, inception: str | None = None,
                     ref: str | None = None, batch_size: int = 8, progress: bool = False, **call_options) -> dict:
    """Score a text-to-image pipeline (`jaxdiff.from_pretrained(folder)`) on a prompt set: one
    image per prompt and seed (`pipe(prompts[i:i+batch_size], seed=...)`, `call_options` such
    as num_steps / guidance_scale passed through).

    clip_score: 100 * max(cos(image, caption), 0) averaged over the pairs (Hessel et al. 2021, as
        torchmetrics defines it), with the CLIP model of the local transformers folder `clip`.
    fid: against `ref` (statistics of real images made with the same Inception weights).
    Returns {"clip_score": {"per_seed", "min", "mean", "std"}, "fid": {...}, "num", "seeds"}.
    """
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = [m for m in names if m not in PROMPT_METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'} for a prompt set; "
                         f"valid: {', '.join(PROMPT_METRICS)}")
    if "clip_score" in names and clip is None:
        raise ValueError("clip_score needs a local CLIP model folder (clip=PATH, e.g. clip-vit-large-patch14)")
    if "fid" in names and (inception is None or ref is None):
        raise ValueError("fid of a prompt set needs the Inception weights (inception=) and reference statistics (ref=)")
    seeds = list(range(int(seeds))) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must be a positive count or a non-empty list of seeds")
    scorer = None
    if "clip_score" in names:
        from jaxdiff.metrics.clip_score import ClipScore
        scorer = ClipScore.from_pretrained(clip)
    fid_ref = None
    if "fid" in names:
        fid_ref = reference.load_reference(ref, feature_net=features.inception_feature_net(inception), dim=2048)
    values: dict[str, list[float]] = {k: [] for k in names}
    for seed in seeds:
        if scorer is not None:
            scorer.reset()
        s = stats.init(2048) if fid_ref is not None else None
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            images = np.asarray(pipe(chunk, seed=seed * 1_000_003 + start, output_type="uint8", progress=progress,
                                     **call_options))                                 # [n, H, W, 3] uint8
            if scorer is not None:
                scorer.update(images, chunk)
            if s is not None:
                s = stats.update(s, features.inception_features(images.astype(np.float32) / 127.5 - 1.0, inception))
        if scorer is not None:
            values["clip_score"].append(scorer.compute())
        if s is not None:
            values["fid"].append(distribution.fid(fid_ref, s))
    report = {k: _summary(v) for k, v in values.items()}
    report.update(num=len(prompts), seeds=seeds)
    return report


def test_images(model) -> np.ndarray:
    """float32 [N, H, W, C] in [-1, 1]: the held-out digits for a digits run, else the run's
    dataset's "test" split at the run's image size."""
    from jaxdiff.data import catalog, digits

    cfg = model.config
    if cfg.data.dataset == "digits":
        source = digits.digits_source(model.image_shape[0], model.image_shape[2], None)
        images, _ = source.load(np.sort(features.digit_split(source.num_examples)[1]))
        return images
    name = cfg.data.dataset.split(":")
    dataset = ":".join(name[:2]) + ":test" if name[0] == "tfds" else cfg.data.dataset
    source = catalog.open_source(dataset, image_size=model.image_shape[0], channels=model.image_shape[2],
                                 split=None if name[0] == "tfds" else "test", data_dir=cfg.data.data_dir or None,
                                 image_key="image", label_key=None)
    return source.load(np.arange(min(source.num_examples, 10_000)))[0]


def bits_per_dim(model, images, *, num_steps: int = 1000, batch_size: int = 250, seed: int = 0) -> np.ndarray:
    """float64 [N] DDPM bounds (bits/dim, reverse variance beta, discretised decoder) of images
    [N, H, W, C] in [-1, 1] under the unconditional model (null class) with the EMA weights."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.metrics import likelihood

    if model.is_flow or model.decode is not None:
        raise ValueError("bits/dim is computed for DDPM-objective pixel runs (this one is "
                         + ("a flow-matching run)" if model.is_flow else "a latent run)"))
    params, network, null = model.ema_params, model._network, model.num_classes

    def model_fn(x, t):                                               # one object: one compile for every batch
        labels = None if null is None else jnp.full((x.shape[0],), null, jnp.int32)
        return network(params, x, t, labels)

    out = []
    for start in range(0, len(images), batch_size):
        x0 = np.asarray(images[start:start + batch_size], np.float32)                # [b, H, W, C]
        key = jax.random.fold_in(jax.random.PRNGKey(seed), start)
        bound = likelihood.ddpm_bound(model_fn, model.schedule, x0, key, num_steps=num_steps, variance="large",
                                      prediction_type=model.prediction_type)
        out.append(np.asarray(bound.total, np.float64))
    return np.concatenate(out)
