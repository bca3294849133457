"""`jaxdiff eval` / `pipelines.evaluate`: the EDM protocol (every seed's value, min, mean, spread)
wired to the right images, features and reference, and one-line refusals."""

import json

import numpy as np
import pytest

import jaxdiff
from conftest import run_cli, train_tiny_run
from jaxdiff.metrics import distribution, features, reference, stats
from jaxdiff.pipelines import evaluate


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("evalrun"), batch_size=16, steps=4)


@pytest.fixture(scope="module")
def model(run_dir):
    return jaxdiff.load(run_dir)


def test_report_is_the_protocol_over_seeds(model):
    report = evaluate.evaluate(model, metrics="fid,kid,pr", num=24, seeds=[3, 4], num_steps=3)
    # Seed 3's FID by hand: the images sample() draws with the class grid, digit features, held-out digits.
    images = model.sample(24, num_steps=3, seed=3, labels=model.grid_labels(24), output_type="np")
    fake = features.digit_features(np.asarray(images) * 2 - 1)
    real = evaluate.digits_heldout_features()
    assert report["fid"]["per_seed"][0] == pytest.approx(
        distribution.fid(stats.from_features(real), stats.from_features(fake)), rel=1e-6)
    assert report["kid"]["per_seed"][0] == pytest.approx(distribution.kid(real, fake, subset_size=24, seed=3)[0],
                                                         rel=1e-6)
    fid = report["fid"]["per_seed"]
    assert len(fid) == 2 and fid[0] != fid[1]
    assert report["fid"]["min"] == min(fid) and report["fid"]["mean"] == pytest.approx(np.mean(fid))
    assert report["fid"]["std"] == pytest.approx(np.std(fid, ddof=1))
    assert 0 <= report["precision"]["min"] <= 1 and 0 <= report["recall"]["min"] <= 1
    assert report["seeds"] == [3, 4] and report["feature_net"] == features.DIGIT_FEATURE_NET
    assert "fid" in evaluate.format_report(report)


def test_a_reference_file_is_used_and_checked(model, tmp_path):
    path = str(tmp_path / "ref.npz")
    reference.save_reference(path, stats.from_features(evaluate.digits_heldout_features()[:500]),
                             feature_net=features.DIGIT_FEATURE_NET)
    with_file = evaluate.evaluate(model, num=16, seeds=1, num_steps=2, ref=path)
    default = evaluate.evaluate(model, num=16, seeds=1, num_steps=2)
    assert with_file["fid"]["min"] != default["fid"]["min"]        # the file's 500 digits, not the 1,000
    with pytest.raises(ValueError, match="need the real features"):
        evaluate.evaluate(model, metrics="fid,kid", num=16, seeds=1, ref=path)
    other = str(tmp_path / "other.npz")
    reference.save_reference(other, stats.from_features(np.random.rand(10, 128)), feature_net="something-else")
    with pytest.raises(jaxdiff.errors.CheckpointError, match="something-else"):
        evaluate.evaluate(model, num=16, seeds=1, ref=other)


@pytest.mark.parametrize("kwargs, match", [
    ({"metrics": "fid,lpips"}, "unknown metric.*lpips"),
    ({"metrics": ""}, "unknown metric"),
    ({"seeds": []}, "seeds"),
    ({"num": 1}, "num must be an integer >= 2"),
])
def test_bad_arguments_are_one_line(model, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        evaluate.evaluate(model, **kwargs)
    assert "\n" not in str(info.value)


def test_cli_eval_writes_the_report(run_dir, tmp_path):
    out = tmp_path / "report.json"
    proc = run_cli("eval", "--checkpoint", run_dir, "--metric", "fid,pr", "--num", "12", "--seeds", "2",
                   "--steps", "2", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report["fid"]["per_seed"]) == 2 and "precision" in report and "kid" not in report
    assert "fid" in proc.stdout and "min" in proc.stdout
    bad = run_cli("eval", "--checkpoint", run_dir, "--metric", "fdi")
    assert bad.returncode == 2 and "unknown metric" in bad.stderr and len(bad.stderr.strip().splitlines()) <= 2


def test_training_evaluates_the_ema_weights(small_config, tmp_path):
    """train.eval_every: FID-digits rows in metrics.jsonl at those steps and at the end, from the
    EMA weights the trainer hands over (equal to evaluating the saved run afterwards)."""
    from jaxdiff.train import loop

    cfg = small_config
    cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = 4, 2, 4
    cfg.eval.num = 16
    loop.train(cfg, str(tmp_path), progress=False, write_samples=None, evaluate=evaluate.evaluate_run)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_fid_digits" in r]
    assert [r["step"] for r in evals] == [2, 4]
    model = jaxdiff.load(str(tmp_path))
    again = evaluate.evaluate(model, num=16, seeds=[cfg.seed], sampler=cfg.sample.sampler,
                              num_steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance_scale)
    assert evals[-1]["eval_fid_digits"] == pytest.approx(again["fid"]["min"], rel=1e-5)
    assert evals[0]["eval_fid_digits"] != evals[1]["eval_fid_digits"]
    assert (tmp_path / "loss.png").exists()


class _FakePipe:
    """A text-to-image pipeline stand-in: deterministic images from (prompt, seed), and a log of calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, seed=0, output_type="uint8", progress=False, **options):
        self.calls.append((list(prompts), seed, options))
        rows = [np.random.default_rng([seed, sum(map(ord, p))]).integers(0, 256, (32, 32, 3)) for p in prompts]
        return np.stack(rows).astype(np.uint8)


def test_prompt_set_clip_score_over_seeds(tmp_path):
    from test_clip_vision import _clip_model

    from jaxdiff.metrics.clip_score import ClipScore

    _clip_model(tmp_path)
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"size": 32, "crop_size": 32}))
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a cat\n\ntwo dogs\na red car\n")
    prompts = evaluate.read_prompts(str(prompts_file))
    assert prompts == ["a cat", "two dogs", "a red car"]
    pipe = _FakePipe()
    report = evaluate.evaluate_prompts(pipe, prompts, metrics="clip_score", seeds=2, clip=str(tmp_path / "clip"),
                                       batch_size=2, num_steps=3)
    assert [len(p) for p, _, _ in pipe.calls] == [2, 1, 2, 1] and pipe.calls[0][2] == {"num_steps": 3}
    # By hand for seed 1: the same images, scored pair by pair with the same CLIP model.
    scorer = ClipScore.from_pretrained(tmp_path / "clip")
    images = np.concatenate([pipe(prompts[:2], seed=pipe.calls[2][1]), pipe(prompts[2:], seed=pipe.calls[3][1])])
    assert report["clip_score"]["per_seed"][1] == pytest.approx(scorer.scores(images, prompts).mean(), rel=1e-5)
    assert report["clip_score"]["per_seed"][0] != report["clip_score"]["per_seed"][1]
    with pytest.raises(ValueError, match="needs a local CLIP model"):
        evaluate.evaluate_prompts(pipe, prompts, metrics="clip_score")
    with pytest.raises(ValueError, match="unknown metric.*kid"):
        evaluate.evaluate_prompts(pipe, prompts, metrics="kid", clip="x")
    with pytest.raises(ValueError, match="not found"):
        evaluate.read_prompts(str(tmp_path / "none.txt"))


def test_bits_per_dim_of_the_held_out_digits(model):
    """metric bpd: the DDPM bound (beta variance, discretised decoder) of the unconditional model on
    the held-out digits, per seed; the same numbers as the bound computed directly."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.metrics import likelihood

    report = evaluate.evaluate(model, metrics="bpd", num=6, seeds=[0, 1], bpd_steps=8)
    images = evaluate.test_images(model)[:6]
    assert images.shape == (6, 16, 16, 1) and images.min() >= -1 and images.max() <= 1

    def model_fn(x, t):
        return model._network(model.ema_params, x, t, jnp.full((x.shape[0],), 10, jnp.int32))

    direct = likelihood.ddpm_bound(model_fn, model.schedule, images, jax.random.fold_in(jax.random.PRNGKey(1), 0),
                                   num_steps=8, variance="large", prediction_type=model.prediction_type)
    assert report["bpd"]["per_seed"][1] == pytest.approx(float(np.mean(direct.total)), rel=1e-5)
    assert 0 < report["bpd"]["min"] < 100 and report["bpd"]["per_seed"][0] != report["bpd"]["per_seed"][1]
    assert "fid" not in report
