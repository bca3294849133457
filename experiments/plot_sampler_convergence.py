"""Convergence of the deterministic samplers to the exact probability-flow ODE solution.

    python experiments/plot_sampler_convergence.py [--out docs/sampler_convergence.png]

On Gaussian data x0 ~ N(mu, diag(sd^2)) the ideal denoiser and the exact probability-flow solution
are known in closed form (`jaxdiff.analytic`), so each sampler's error can be measured against the
truth rather than against a many-step run of another sampler. The measurement is the one of
`tests/test_sampling_gaussian.py` (same data, schedule, noise, step counts and fits):

* each sampler runs with "trailing" spacing from t = 999, driven by the exact eps-prediction;
* the error is the rms distance to the exact flow at an *intermediate* level, t = 499 (t = 99 for
  PNDM, which is already at ~2e-5 at t = 499 with its fewest steps). Measuring at t = 0 would mix
  in the last step onto sigma = 0, which is first order in every sampler and unbounded in
  log-SNR, and hide the solvers' orders;
* the x-axis counts the model calls spent to reach that level (Heun: 2 per step; PNDM: 4 per
  step for its three Runge-Kutta warm-up steps, then 1), so solvers are compared at equal cost;
* the slope is a least-squares fit of log(error) against log(model calls) over those points.

Writes the figure and, next to it, a JSON file with every measured point and the fitted slopes,
and prints the table. Runs on the CPU in about a minute (one compile per run).

A second figure (`<out>_flow.png`, JSON beside it) does the same for the flow-matching samplers
(flow_euler, flow_heun, DPM-Solver++ and UniPC on flow sigmas) on the flow path
x_sigma = (1 - sigma) x0 + sigma eps of the same Gaussian data, driven by the exact velocity
E[eps - x0 | x_sigma] (`analytic.flow_velocity`), against the exact affine flow map, at the first
level <= 0.5 each run reaches (`analytic.flow_ode_error`), on `schedules.flow(2^22, shift=3.0)`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxdiff import analytic, schedules  # noqa: E402

# The data and schedule of tests/test_sampling_gaussian.py.
D = 6
MU = np.linspace(-1.0, 1.5, D)
SD = np.linspace(0.2, 0.9, D)
SCHEDULE = schedules.discrete("linear")

# Step counts of the tests: 8..64 steps land on t = 499 for the single/multistep solvers; LMS
# reaches its asymptotic regime late (its first step spans sigma 157 -> 20), so 32..128; UniPC-3
# reaches float32 rounding (~4e-7) at 64 steps, so 8..32; PNDM and DDIM step by T // num_steps, so
# their step counts divide T = 1000 (PNDM 10..100 as in the tests; DDIM 10..100, which also land on
# t = 499).
STEPS = (8, 16, 32, 64)

# (label, sampler name, options, step counts, target level, expected order, plot style)
CASES = [
    ("DDIM (eta=0)", "ddim", dict(clip_sample=False), (10, 20, 40, 100), 499, 1,
     dict(color="0.3", marker="o", ms=9, mfc="none")),
    ("Euler", "euler", {}, STEPS, 499, 1, dict(color="tab:blue", marker="s")),
    ("Heun", "heun", {}, STEPS, 499, 2, dict(color="tab:orange", marker="D")),
    ("DPM-Solver++ (order 1)", "dpmpp_2m", dict(solver_order=1), STEPS, 499, 1,
     dict(color="tab:green", marker="x", ms=7)),
    ("DPM-Solver++(2M)", "dpmpp_2m", dict(solver_order=2), STEPS, 499, 2, dict(color="tab:green", marker="^")),
    ("DPM-Solver++(3M)", "dpmpp_2m", dict(solver_order=3), STEPS, 499, 2.35, dict(color="tab:green", marker="v",
                                                                              ls="--")),
    ("UniPC-1", "unipc", dict(solver_order=1), STEPS, 499, 2, dict(color="tab:red", marker="<")),
    ("UniPC-2 (bh2)", "unipc", dict(solver_order=2), STEPS, 499, 3, dict(color="tab:red", marker=">", ls="--")),
    ("UniPC-3 (bh2)", "unipc", dict(solver_order=3), STEPS[:3], 499, 4, dict(color="tab:red", marker="P", ls=":")),
    ("LMS (order 4)", "lms", dict(order=4), (32, 64, 128), 499, 4, dict(color="tab:purple", marker="*", ms=9)),
    ("PNDM (to t=99)", "pndm", {}, (10, 20, 50, 100), 99, 2, dict(color="tab:brown", marker="h", ls="-.")),
]


# Flow matching: T = 2^22 so that t / T is exact in float32 and floor(sigma T) (the multistep
# solvers' timesteps) is within 2.4e-7 of sigma T / T; shift 3 as SD3.
FLOW_SCHEDULE = schedules.flow(2 ** 22, shift=3.0)
FLOW_STEPS = (8, 16, 32, 64)
_FP = {"prediction_type": "flow_prediction"}
# (label, sampler name, options, step counts, expected order, plot style)
FLOW_CASES = [
    ("flow_euler", "flow_euler", {}, FLOW_STEPS, 1, {"color": "tab:blue", "marker": "s"}),
    ("flow_heun", "flow_heun", {}, FLOW_STEPS, 2, {"color": "tab:orange", "marker": "D"}),
    ("DPM-Solver++ (order 1), flow", "dpmpp_2m", {"solver_order": 1, **_FP}, FLOW_STEPS, 1,
     {"color": "tab:green", "marker": "x", "ms": 7}),
    ("DPM-Solver++(2M), flow", "dpmpp_2m", {"solver_order": 2, **_FP}, FLOW_STEPS, 2,
     {"color": "tab:green", "marker": "^"}),
    ("DPM-Solver++(3M), flow", "dpmpp_2m", {"solver_order": 3, **_FP}, FLOW_STEPS, 2.35,
     {"color": "tab:green", "marker": "v", "ls": "--"}),
    ("UniPC-1, flow", "unipc", {"solver_order": 1, **_FP}, FLOW_STEPS, 2, {"color": "tab:red", "marker": "<"}),
    ("UniPC-2 (bh2), flow", "unipc", {"solver_order": 2, **_FP}, FLOW_STEPS, 3,
     {"color": "tab:red", "marker": ">", "ls": "--"}),
    ("UniPC-3 (bh2), flow", "unipc", {"solver_order": 3, **_FP}, FLOW_STEPS, 4,
     {"color": "tab:red", "marker": "P", "ls": ":"}),
]


def measure_flow():
    rows = []
    for label, name, options, steps, order, _ in FLOW_CASES:
        out = [analytic.flow_ode_error(name, FLOW_SCHEDULE, n, MU, SD, max_steps=max(steps), **options)
               for n in steps]
        errs, nfes = np.array([o[0] for o in out]), np.array([o[1] for o in out])
        rows.append({
            "label": label, "sampler": name, "options": options, "expected_order": order, "steps": list(steps),
            "nfe": nfes.tolist(), "rms_error": errs.tolist(), "sigma_reached": [o[2] for o in out],
            "slope_vs_nfe": float(np.polyfit(np.log(nfes), np.log(errs), 1)[0]),
            "slope_vs_steps": float(np.polyfit(np.log(steps), np.log(errs), 1)[0]),
            "nfe_max": int(nfes[-1]), "error_at_nfe_max": float(errs[-1]),
        })
    return rows


def plot_flow(rows, path):
    fig, ax = plt.subplots(figsize=(11, 6.5))
    for row, (*_, style) in zip(rows, FLOW_CASES):
        ax.loglog(row["nfe"], row["rms_error"], label=f"{row['label']}: {row['slope_vs_steps']:.2f}", lw=1.6,
                  **style)
    lo = min(min(r["nfe"]) for r in rows)
    hi = max(max(r["nfe"]) for r in rows)
    x = np.geomspace(lo, hi, 50)
    y0 = 0.25 * min(r["rms_error"][0] for r in rows if r["nfe"][0] == lo)
    floor = 0.5 * min(min(r["rms_error"]) for r in rows)
    for order in (1, 2, 3, 4):
        y = y0 * (x / lo) ** -order
        keep = y >= floor
        ax.loglog(x[keep], y[keep], color="0.6", lw=1.0, ls=(0, (4, 3)), zorder=0)
        i = np.flatnonzero(keep)[-1]
        ax.annotate(f"order {order}", (x[i], y[i]), textcoords="offset points", xytext=(4, 2),
                    color="0.4", fontsize=9)
    ax.set_xlabel("model calls (function evaluations) to reach the measured level")
    ax.set_ylabel("rms error vs exact flow-ODE solution")
    ax.set_title("Flow-matching samplers on Gaussian data: error vs the exact flow map\n"
                 "x = (1 - sigma) x0 + sigma eps, exact velocity E[eps - x0 | x], shift 3,\n"
                 "measured at the first level <= 0.5 each run reaches (not at sigma = 0)", fontsize=10.5)
    ticks = [t for t in (6, 8, 12, 16, 24, 32, 48, 64, 96) if lo <= t <= 1.05 * hi]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False,
              title="sampler: fitted log-log slope\n(vs steps, as in the tests)", title_fontsize=9)
    fig.text(0.01, 0.01, "x0 ~ N(mu, diag(sd^2)), D = 6, schedules.flow(2^22, shift=3.0), 64 draws, float32 "
             "sampling; flow_heun spends 2 calls per step. Grey dashed: slopes -1 to -4.\n"
             "The level reached moves with the step count where a plan does not land on 0.5 (flow_euler / "
             "flow_heun: 0.33 at 8 steps to 0.48 at 64; UniPC: 0.30 to 0.48),\nwhich steepens their "
             "fitted slopes a little; DPM-Solver++'s plan lands on 0.5 for even step counts.",
             fontsize=8, color="0.35")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def measure():
    rows = []
    for label, name, options, steps, target, order, style in CASES:
        errs, nfes = [], []
        for n in steps:
            err, nfe = analytic.pf_ode_error(name, SCHEDULE, n, MU, SD, target, **options)
            errs.append(err)
            nfes.append(nfe)
        errs, nfes = np.array(errs), np.array(nfes)
        rows.append(dict(
            label=label, sampler=name, options=options, target_t=target, expected_order=order,
            steps=list(steps), nfe=nfes.tolist(), rms_error=errs.tolist(),
            slope_vs_nfe=float(np.polyfit(np.log(nfes), np.log(errs), 1)[0]),
            slope_vs_steps=float(np.polyfit(np.log(steps), np.log(errs), 1)[0]),
            nfe_max=int(nfes[-1]), error_at_nfe_max=float(errs[-1]),
        ))
    return rows


def plot(rows, path):
    fig, ax = plt.subplots(figsize=(11, 6.5))
    for row, (*_, style) in zip(rows, CASES):
        style = dict(style)
        label = f"{row['label']}: {row['slope_vs_steps']:.2f}"
        if abs(row["slope_vs_nfe"] - row["slope_vs_steps"]) > 0.05:      # PNDM: fixed warm-up cost
            label += f"\n    ({row['slope_vs_nfe']:.2f} vs calls: 12-call warm-up)"
        ax.loglog(row["nfe"], row["rms_error"], label=label, lw=1.6, **style)

    # Reference slopes, anchored at the left edge below the Euler line.
    lo = min(min(r["nfe"]) for r in rows)
    hi = max(max(r["nfe"]) for r in rows)
    x = np.geomspace(lo, hi, 50)
    y0 = 0.25 * min(r["rms_error"][0] for r in rows if r["nfe"][0] == lo)   # below the curves, at the left
    floor = 0.5 * min(min(r["rms_error"]) for r in rows)
    for order in (1, 2, 3):
        y = y0 * (x / lo) ** -order
        keep = y >= floor
        ax.loglog(x[keep], y[keep], color="0.6", lw=1.0, ls=(0, (4, 3)), zorder=0)
        i = np.flatnonzero(keep)[-1]
        ax.annotate(f"order {order}", (x[i], y[i]), textcoords="offset points", xytext=(4, 2),
                    color="0.4", fontsize=9)

    ax.set_xlabel("model calls (function evaluations) to reach the measured level")
    ax.set_ylabel("rms error vs exact probability-flow solution")
    ax.set_title("Deterministic samplers on Gaussian data: error vs exact probability-flow solution\n"
                 "measured at the intermediate level t = 499 (PNDM: t = 99), not at t = 0:\n"
                 "the last step onto sigma = 0 is first order in every sampler and would mask the orders",
                 fontsize=10.5)
    ticks = [t for t in (4, 5, 8, 10, 16, 20, 32, 50, 64, 100) if lo <= t <= 1.05 * hi]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False,
              title="sampler: fitted log-log slope\n(vs steps, as in the tests)", title_fontsize=9)
    fig.text(0.01, 0.01, "x0 ~ N(mu, diag(sd^2)), D = 6, linear 1000-step schedule, trailing spacing from t = 999, "
             "exact eps-prediction, 64 draws, float32 sampling.\n"
             "Grey dashed: slopes -1, -2, -3. DDIM, Euler and first-order DPM-Solver++ are the same method "
             "(their curves coincide).",
             fontsize=8, color="0.35")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("docs", "sampler_convergence.png"))
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    start = time.perf_counter()
    rows = measure()
    plot(rows, args.out)
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(dict(
            description="rms error of deterministic samplers against the exact probability-flow ODE solution "
                        "on Gaussian data, measured at an intermediate level (target_t), vs model calls spent",
            data=dict(dim=D, mu=np.round(MU, 6).tolist(), sd=np.round(SD, 6).tolist(),
                      schedule="linear (1000 steps)", batch=64, timestep_spacing="trailing"),
            jax_version=jax.__version__, backend=jax.default_backend(),
            results=rows), f, indent=1)

    print(f"{'sampler':<30} {'t':>4} {'steps':>9} {'NFE':>9} {'slope/NFE':>10} {'slope/steps':>12} "
          f"{'err @ max NFE':>14}")
    for r in rows:
        print(f"{r['label']:<30} {r['target_t']:>4} {r['steps'][0]:>4}-{r['steps'][-1]:<4} "
              f"{r['nfe'][0]:>4}-{r['nfe'][-1]:<4} {r['slope_vs_nfe']:>10.2f} {r['slope_vs_steps']:>12.2f} "
              f"{r['error_at_nfe_max']:>14.2e}")
    print(f"wrote {args.out} and {json_path} in {time.perf_counter() - start:.0f} s")

    start = time.perf_counter()
    flow_rows = measure_flow()
    flow_out = os.path.splitext(args.out)[0] + "_flow.png"
    plot_flow(flow_rows, flow_out)
    flow_json = os.path.splitext(flow_out)[0] + ".json"
    with open(flow_json, "w") as f:
        json.dump({
            "description": "rms error of flow-matching samplers against the exact flow-ODE solution on Gaussian "
                           "data, at the first level <= 0.5 each run reaches (sigma_reached), vs model calls spent",
            "data": {"dim": D, "mu": np.round(MU, 6).tolist(), "sd": np.round(SD, 6).tolist(),
                     "schedule": "flow (2^22 training levels, shift 3.0)", "batch": 64},
            "jax_version": jax.__version__, "backend": jax.default_backend(), "results": flow_rows}, f, indent=1)
    print(f"{'flow sampler':<30} {'steps':>9} {'NFE':>9} {'slope/NFE':>10} {'slope/steps':>12} {'err @ max NFE':>14}")
    for r in flow_rows:
        print(f"{r['label']:<30} {r['steps'][0]:>4}-{r['steps'][-1]:<4} {r['nfe'][0]:>4}-{r['nfe'][-1]:<4} "
              f"{r['slope_vs_nfe']:>10.2f} {r['slope_vs_steps']:>12.2f} {r['error_at_nfe_max']:>14.2e}")
    print(f"wrote {flow_out} and {flow_json} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
