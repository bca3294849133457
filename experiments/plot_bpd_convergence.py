"""Likelihood bounds of a diffusion model against the true NLL, as the number of steps grows.

    python experiments/plot_bpd_convergence.py [--out docs/bpd_convergence.png]

On Gaussian data x0 ~ N(mu, diag(sd^2)) the exact denoiser is known (`jaxdiff.analytic`), and so
is the data's negative log-likelihood. A diffusion model with that denoiser is as good as a
diffusion model can be, so what separates its variational bound (`jaxdiff.metrics.likelihood`)
from the NLL is the discretisation of the reverse process alone:

* DDPM bound (Ho et al. 2020) on K timesteps of the 1000-step linear schedule, with the reverse
  variance fixed to beta ("large") or to the posterior's beta~ ("small");
* VDM discrete-time bound (Kingma et al. 2021, eq. 13) on T' equal steps of u = t / 999 (T' may
  exceed 1000: the log-SNR is interpolated between training timesteps);
* VDM continuous-time bound (eq. 17), estimated on 1024 stratified u per example: the limit.

The y-axis is the mean bound minus the mean NLL in bits/dim over the same draws (symmetric log
scale: the continuous bound sits at ~0, within its Monte-Carlo error, drawn as a band of 2
standard errors). Writes the figure and a JSON file with every point, and prints the table;
takes about a minute on a CPU (one compile per point).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from jaxdiff import analytic, schedules
from jaxdiff.metrics import likelihood as lk

D, B = 4, 4096
SCHEDULE = schedules.discrete("linear")
DDPM_STEPS = (10, 20, 50, 100, 200, 500, 1000)
VDM_STEPS = (10, 20, 50, 100, 200, 500, 1000, 3000, 10000)
CONTINUOUS_SAMPLES = 1024


def data(seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.uniform(-0.3, 0.3, D).astype(np.float32)
    sd = rng.uniform(0.2, 0.5, D).astype(np.float32)
    x = (mu + sd * rng.normal(size=(B, D))).astype(np.float32)
    nll = (0.5 * np.log(2 * np.pi * sd ** 2) + 0.5 * ((x - mu) / sd) ** 2).sum(1) / (D * np.log(2))   # [B] bits/dim
    return mu, sd, x, nll


def measure():
    mu, sd, x, nll = data()
    m, s = jnp.asarray(mu), jnp.asarray(sd)

    def model_fn(z, t):
        return analytic.exact_prediction(m, s, lk.alpha_bar_at(SCHEDULE, t)[:, None], z)

    key = jax.random.PRNGKey(1)

    def gap(bound):
        diff = np.asarray(bound.total, np.float64) - nll
        return float(diff.mean()), float(diff.std() / np.sqrt(B))

    rows = {"nll_bits_per_dim": float(nll.mean())}
    for variance in ("large", "small"):
        rows[f"ddpm_{variance}"] = [dict(steps=k, **dict(zip(("gap", "stderr"), gap(lk.ddpm_bound(
            model_fn, SCHEDULE, x, key, num_steps=k, variance=variance, decoder="gaussian")))))
            for k in DDPM_STEPS]
    rows["vdm_discrete"] = [dict(steps=k, **dict(zip(("gap", "stderr"), gap(lk.vdm_bound(
        model_fn, SCHEDULE, x, key, num_steps=k, decoder="gaussian"))))) for k in VDM_STEPS]
    g, e = gap(lk.vdm_bound(model_fn, SCHEDULE, x, key, num_samples=CONTINUOUS_SAMPLES, decoder="gaussian"))
    rows["vdm_continuous"] = {"samples": CONTINUOUS_SAMPLES, "gap": g, "stderr": e}
    return rows


STYLES = {"ddpm_large": ("DDPM bound, variance beta (large)", {"color": "tab:blue", "marker": "o"}),
          "ddpm_small": ("DDPM bound, variance beta~ (small)", {"color": "tab:orange", "marker": "s"}),
          "vdm_discrete": ("VDM discrete-time bound", {"color": "tab:green", "marker": "^", "ls": "--"})}


def plot(rows, path):
    fig, ax = plt.subplots(figsize=(9, 5.8))
    for name, (label, style) in STYLES.items():
        pts = rows[name]
        ax.errorbar([p["steps"] for p in pts], [p["gap"] for p in pts], yerr=[2 * p["stderr"] for p in pts],
                    label=label, lw=1.6, capsize=2, **style)
    c = rows["vdm_continuous"]
    ax.axhspan(c["gap"] - 2 * c["stderr"], c["gap"] + 2 * c["stderr"], color="tab:red", alpha=0.2)
    ax.axhline(c["gap"], color="tab:red", lw=1.4,
               label=f"VDM continuous-time bound ({c['samples']} u per example): {c['gap']:+.3f} bits/dim")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_ylim(-0.05, 3 * max(p["gap"] for name in STYLES for p in rows[name]))
    ax.set_xlabel("steps (DDPM: timesteps K of the 1000; VDM: equal steps T' of u)")
    ax.set_ylabel("bound - NLL  (bits/dim, mean over draws)")
    ax.set_title("Variational bounds with the exact denoiser of Gaussian data approach the true NLL\n"
                 f"(NLL = {rows['nll_bits_per_dim']:.3f} bits/dim; error bars and band: 2 standard errors)",
                 fontsize=10.5)
    ax.grid(True, which="major", alpha=0.4)
    ax.legend(fontsize=9, loc="upper right")
    fig.text(0.01, 0.01, f"x0 ~ N(mu, diag(sd^2)), D = {D}, {B} draws, linear 1000-step schedule, Gaussian decoder, "
             "float32.\nVDM's discrete bound uses the posterior variance, like DDPM 'small' (the curves coincide).",
             fontsize=8, color="0.35")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("docs", "bpd_convergence.png"))
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    start = time.perf_counter()
    rows = measure()
    plot(rows, args.out)
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump({"description": "mean variational bound minus mean NLL (bits/dim) of Gaussian data under the "
                                   "exact denoiser, vs steps", "dim": D, "draws": B, "schedule": "linear (1000 steps)",
                       "jax_version": jax.__version__, "backend": jax.default_backend(), "results": rows}, f, indent=1)
    print(f"NLL {rows['nll_bits_per_dim']:.4f} bits/dim")
    for name in STYLES:
        print(f"{name:<14}" + "  ".join(f"{p['steps']}: {p['gap']:+.4f}" for p in rows[name]))
    c = rows["vdm_continuous"]
    print(f"vdm_continuous {c['gap']:+.4f} +- {c['stderr']:.4f}")
    print(f"wrote {args.out} and {json_path} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
