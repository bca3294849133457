"""Two real processes x 4 CPU devices (`jax.distributed`, gloo collectives): training equals one
process, the checkpoint they write restores in one process under `fsdp` and under `dp` and the
run continues there, and `jaxdiff sample` / `jaxdiff generate` give the 1-device images.

One 2-process run (train, then sample and generate through the command line) and one 1-process
run (the reference training, the elastic restores, the continuation) serve every test here; each
is done once per session, also when xdist spreads these tests over several workers. The network
is a one-level U-Net of 16 channels: process 1 of a multi-process run neither finds nor writes
entries in XLA's persistent compilation cache (JAX writes from process 0 only, and the cache key
hashes each process's own view of the devices), so it compiles every program cold, and compile
time grows with the network."""

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import traceback

import jax
import numpy as np
import pytest
from PIL import Image

import jaxdiff
from jaxdiff import images as images_lib
from jaxdiff import sharding

pytest.importorskip("diffusers")
from test_pipeline_sd import PROMPT, _components, _pipeline, diffusers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2                 # steps of the 2-process run; the 1-process run continues to 2 * STEPS

# Both runs build their config here (exec'd), so they train the same network on the same data.
_CONFIG = """
import ml_collections
from jaxdiff import config as config_lib

def make_config(steps):
    c = config_lib.get_config()
    c.data.image_size = 16; c.data.batch_size = 16
    c.train.steps = steps; c.train.log_every = 1; c.train.checkpoint_every = steps
    c.optim.warmup_steps = 1
    # one level, no attention: the smallest U-Net whose weights FSDP still splits 8 ways
    c.model.unet = ml_collections.ConfigDict(dict(base_channels=16, channel_mult=(1,), attention_levels=(),
                                                  num_groups=4))
    c.mesh.rules = "fsdp"; c.mesh.data = 1; c.mesh.fsdp = -1
    return c
"""

# The pixel model's sampling call (guided DDIM over labels) and the Stable Diffusion one (guided),
# as keyword arguments and as command lines. 5 images on 8 devices: padded, and rows 0-3 are on
# process 0's devices, row 4 on process 1's, so each process's share of the noise shows.
SAMPLE = {"num": 5, "sampler": "ddim", "num_steps": 3, "seed": 1, "labels": [0, 1, 2, 3, 4], "guidance_scale": 2.0}
GENERATE = {"num_images": 5, "num_steps": 2, "seed": 4, "guidance_scale": 7.5}

_WORKER = """
import json, sys
args = json.loads(sys.argv[1])
i = args["process"]
from jaxdiff import sharding
sharding.init_distributed("127.0.0.1:%d" % args["port"], 2, i)
import jax, numpy as np
from jaxdiff import cli, images
from jaxdiff.train import loop
exec(args["config"])
assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
loop.train(make_config(args["steps"]), args["workdir"], progress=False, write_samples=None)

# The command line samples through jaxdiff.images.to_output: keep the float images it quantises.
floats = []
to_output = images.to_output
def keep(x, output_type):
    floats.append(np.asarray(x, np.float32).copy())
    return to_output(x, output_type)
images.to_output = keep
out = args["out"]
rc = [cli.main(["sample", "--checkpoint", args["workdir"], *args["sample"], "--rules", "fsdp", "--no-progress",
                "--out", "%s/sample%d.png" % (out, i)]),
      cli.main(["generate", "--model", args["sd"], *args["generate"], "--rules", "fsdp", "--no-progress",
                "--out", "%s/generate%d.png" % (out, i)])]
assert len(floats) == 2, len(floats)
np.savez("%s/floats%d.npz" % (out, i), sample=floats[0], generate=floats[1])
print(json.dumps({"rc": rc}))
"""

_ONE_PROCESS = """
import json, os, shutil, sys
import jax, numpy as np
from jaxdiff import data as data_lib, sharding
from jaxdiff.checkpoint import Checkpointer, checkpoint_dir
from jaxdiff.train import build, loop
args = json.loads(sys.argv[1])
exec(args["config"])
STEPS = args["steps"]
assert jax.process_count() == 1 and len(jax.devices()) == 4
c = make_config(STEPS)

def trainer(rules):
    c.mesh.rules = rules
    c.mesh.data, c.mesh.fsdp = (1, -1) if rules == "fsdp" else (-1, 1)
    mesh = sharding.mesh_from_config(c.mesh)
    task = build.build_task(c, mesh)
    model = build.build_model(c, task.image_shape, task.num_classes)
    return build.build_trainer(c, mesh, model, build.build_schedule(c), build.build_optimizer(c),
                               task.image_shape), task, mesh

def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]

def compare(a, b, base):
    a, b, base = leaves(a), leaves(b), leaves(base)
    norm = lambda xs: float(np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in xs)))
    moved = norm([x - y for x, y in zip(a, base)])
    return {"moved": moved, "rel": norm([x - y for x, y in zip(a, b)]) / moved,
            "max_abs": max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))}

def layout(state):
    params = jax.tree.leaves(state.params)
    return {"devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(state)}),
            "split": sum(x.size for x in params if not x.sharding.is_fully_replicated) / sum(x.size for x in params),
            "replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))}

out = {}
tr, task, mesh = trainer("fsdp")
# The reference: one process trains on the 2-process run's global batches (process 0's rows, then
# process 1's).
its = [data_lib.build("digits", batch_size=8, seed=c.seed, image_size=16, process_index=p,
                      process_count=2).iterator() for p in range(2)]
state = tr.init()
init = jax.tree.map(np.array, state.params)        # copies: each step donates the state it is given
for _ in range(STEPS):
    parts = [next(it) for it in its]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, _ = tr.step(state, sharding.shard_batch(batch, mesh))
reference = jax.tree.map(np.array, state.params)

# Elastic restore of the 2-process fsdp checkpoint: 1 process, 4 devices, fsdp and dp.
ck = Checkpointer(checkpoint_dir(args["workdir"]), read_only=True)
restored, out["step"] = ck.restore(tr.abstract)
replicated, _ = ck.restore(trainer("dp")[0].abstract)
ck.close()
out["two_vs_one"] = compare(restored.params, reference, init)
out["dp_equals_fsdp"] = all(np.array_equal(x, y) for x, y in zip(leaves(replicated), leaves(restored)))
out["layout"] = {"fsdp": layout(restored), "dp": layout(replicated)}
data = checkpoint_dir(args["workdir"]) + "/%d/data" % STEPS
out["data_files"] = sorted(f for f in os.listdir(data) if f.startswith("process_"))

# The run continues here: 1 process, 4 devices, fsdp, from the 2-process checkpoint (a copy).
shutil.copytree(args["workdir"], args["continued"])
final = loop.train(make_config(2 * STEPS), args["continued"], progress=False, write_samples=None)
out["final_step"] = int(final.step)
out["rows"] = [json.loads(line)["step"] for line in open(args["continued"] + "/metrics.jsonl")]
# ... as the reference state continued on this process's data from the same batch position.
it = task.iterator()
for _ in range(STEPS):
    next(it)
for _ in range(STEPS):
    state, _ = tr.step(state, sharding.shard_batch(next(it), mesh))
out["continued"] = compare(final.params, state.params, reference)
print(json.dumps(out))
"""


# ---------------------------------------------------------------------------------------------
# The two runs, once per session


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _once(tmp_path_factory, name, compute):
    """compute(folder) -> JSON-able result, run once per session: xdist workers share the base
    temporary folder's parent, and the first to take the lock computes while the others wait
    and read its result (or its error)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done, failed = folder / "result.json", folder / "error.txt"
        if not done.exists() and not failed.exists():
            folder.mkdir(exist_ok=True)
            try:
                (folder / "result.json.tmp").write_text(json.dumps(compute(folder)))
                os.replace(folder / "result.json.tmp", done)
            except BaseException:
                failed.write_text(traceback.format_exc()[-3000:])
                raise
        if failed.exists():
            pytest.fail(f"{name} failed:\n{failed.read_text()}")
        return folder, json.loads(done.read_text())


def _two_processes(folder):
    """Train STEPS steps as 2 processes x 4 devices under fsdp, then sample and generate there."""
    sd = folder / "sd"
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    _pipeline(diffusers.StableDiffusionPipeline, _components(sd, 4, scheduler)).save_pretrained(
        str(sd / "model"), safe_serialization=True)
    sample = ["--num", str(SAMPLE["num"]), "--sampler", SAMPLE["sampler"], "--steps", str(SAMPLE["num_steps"]),
              "--seed", str(SAMPLE["seed"]), "--labels", ",".join(map(str, SAMPLE["labels"])),
              "--guidance_scale", str(SAMPLE["guidance_scale"])]
    generate = ["--prompt", PROMPT, "--num", str(GENERATE["num_images"]), "--steps", str(GENERATE["num_steps"]),
                "--seed", str(GENERATE["seed"]), "--guidance_scale", str(GENERATE["guidance_scale"])]
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env.pop("JAXDIFF_DEBUG", None)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(
        [sys.executable, "-c", _WORKER, json.dumps({
            "process": i, "port": port, "config": _CONFIG, "steps": STEPS, "workdir": str(folder / "run"),
            "out": str(folder), "sd": str(sd / "model"), "sample": sample, "generate": generate})],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=900))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
    return {"stdout": [out for out, _ in outs], "seconds": time.perf_counter() - t0,
            "rc": [json.loads(out.strip().splitlines()[-1])["rc"] for out, _ in outs]}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """(folder, result) of the 2-process run: folder/run the work dir, folder/sd/model the Stable
    Diffusion folder, folder/floats<i>.npz the float images process i got, folder/<cmd><i>.png
    what process i wrote."""
    return _once(tmp_path_factory, "two_processes", _two_processes)


@pytest.fixture(scope="module")
def one(two, tmp_path_factory):
    """The 1-process run's figures (see _ONE_PROCESS)."""
    folder, _ = two

    def compute(here):
        t0 = time.perf_counter()
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
                   XLA_FLAGS="--xla_force_host_platform_device_count=4")
        proc = subprocess.run([sys.executable, "-c", _ONE_PROCESS, json.dumps({
            "config": _CONFIG, "steps": STEPS, "workdir": str(folder / "run"),
            "continued": str(here / "continued")})],
            check=False, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]), seconds=time.perf_counter() - t0)

    return _once(tmp_path_factory, "one_process", compute)[1]


# ---------------------------------------------------------------------------------------------
# Training


def test_two_processes_train_as_one(two, one):
    r = one["two_vs_one"]
    print("2 processes x 4 devices against 1 process:", r, "seconds:", two[1]["seconds"], one["seconds"])
    assert r["moved"] > 1e-2, r                 # training really moved the parameters
    # The same global batches; only the reductions differ (gloo across processes, 8 devices
    # against 4), so the sums differ in rounding.
    assert r["rel"] < 1e-4 and r["max_abs"] < 1e-5, r
    # Each process wrote its data-iterator position into the checkpoint.
    assert one["data_files"] == ["process_0-of-2.json", "process_1-of-2.json"]


def test_the_two_process_fsdp_checkpoint_restores_in_one_process_under_fsdp_and_dp(one):
    assert one["step"] == STEPS
    assert one["dp_equals_fsdp"] is True
    fsdp, dp = one["layout"]["fsdp"], one["layout"]["dp"]
    assert fsdp["devices"] == [4] and fsdp["split"] > 0.85 and not fsdp["replicated"], fsdp
    assert dp["devices"] == [4] and dp["split"] == 0 and dp["replicated"], dp


def test_the_two_process_run_continues_in_one_process(one):
    r = one["continued"]
    print("continued in 1 process against the reference continued:", r)
    assert one["final_step"] == 2 * STEPS and one["rows"] == list(range(1, 2 * STEPS + 1)), one
    assert r["moved"] > 1e-2, r
    # From the restored state and optimizer moments, on this process's data at the saved batch
    # position: the reference state continued alike, up to the rounding the two runs differed by.
    assert r["rel"] < 1e-4 and r["max_abs"] < 1e-5, r


# ---------------------------------------------------------------------------------------------
# Sampling: both processes get all images, process 0 writes them; the 1-device images to 1e-5


def _check_written(folder, command, stdout, got):
    assert "batch over 8 devices" in stdout[0], stdout[0]
    assert f"wrote {len(got[0])}" in stdout[0] and "wrote" not in stdout[1], stdout
    assert not (folder / f"{command}1.png").exists()
    # The grid process 0 wrote is its float images, quantised (written as the command writes it).
    images_lib.save_grid(images_lib.to_uint8(got[0]), str(folder / f"{command}_check.png"),
                         upscale=1 if command == "generate" else None)
    np.testing.assert_array_equal(np.asarray(Image.open(folder / f"{command}0.png")),
                                  np.asarray(Image.open(folder / f"{command}_check.png")))


def _floats(folder, name):
    return [np.load(folder / f"floats{i}.npz")[name] for i in range(2)]


def test_two_processes_sample_the_images_of_one_device(two):
    folder, result = two
    assert result["rc"] == [[0, 0], [0, 0]]
    got = _floats(folder, "sample")
    model = jaxdiff.load(str(folder / "run"), mesh=sharding.make_mesh(jax.devices()[:1]))
    want = model.sample(**SAMPLE, output_type="np")
    assert got[0].shape == got[1].shape == want.shape == (5, 16, 16, 1)
    errs = [float(np.abs(g - want).max()) for g in got]
    print("pixel sampling, max |2 processes - 1 device| per process:", errs)
    assert max(errs) < 1e-5, errs
    assert want.std() > 0.1 and not np.allclose(want[0], want[1])    # images, not a constant
    _check_written(folder, "sample", result["stdout"], got)


def test_two_processes_generate_the_images_of_one_device(two):
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    folder, result = two
    got = _floats(folder, "generate")
    pipe = StableDiffusion.from_pretrained(str(folder / "sd" / "model"), mesh=sharding.make_mesh(jax.devices()[:1]))
    want = pipe(PROMPT, **GENERATE, output_type="np")
    assert got[0].shape == got[1].shape == want.shape == (5, 16, 16, 3)
    errs = [float(np.abs(g - want).max()) for g in got]
    print("Stable Diffusion, max |2 processes - 1 device| per process:", errs)
    assert max(errs) < 1e-5, errs
    assert want.std() > 0.05 and not np.allclose(want[0], want[1])
    _check_written(folder, "generate", result["stdout"], got)
