"""The README's examples for the demo model, run as written, and judged by a digit classifier.

A module fixture runs the README's first command (`jaxdiff train`) for fewer steps into
`runs/digits` of a temporary folder. Then, from that folder:

* every `model.sample(...)` call in the README's Python blocks that load `runs/digits` is run
  and each image must be read as the digit its `labels=` asked for (>= 90% of them);
* every `jaxdiff sample --checkpoint runs/digits ...` line of the README is run, and the cells
  of the PNG grid it writes must be the digits its `--labels` asked for (>= 90%);
* the training run's own `samples.png` (one class per column) must show its columns' digits.

The classifier (`jaxdiff.metrics.digits`) reads 95% of real held-out digits right, so 90% means
the samples are digits, and the right ones.
"""

import ast
import math
import os
import pathlib
import re
import shlex

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
RUN = "runs/digits"
STEPS = 800          # the README trains 2,000; the examples' digits are right from ~750 on
THRESHOLD = 0.9


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _python_examples() -> list[str]:
    return [b for b in _blocks("python") if f'jaxdiff.load("{RUN}")' in b]


def _cli_examples() -> list[str]:
    lines = [line.split("#")[0].strip() for b in _blocks("bash") for line in b.splitlines()]
    return [line for line in lines if line.startswith(f"jaxdiff sample --checkpoint {RUN} ")]


def test_the_readme_has_examples_to_run():
    assert _python_examples() and _cli_examples()
    calls = [c for b in _python_examples() for c in ast.walk(ast.parse(b))
             if isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "sample"]
    assert len(calls) >= 2 and all(any(k.arg == "labels" for k in c.keywords) for c in calls)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding runs/digits, trained by the README's command with fewer steps."""
    root = tmp_path_factory.mktemp("readme")
    proc = run_cli("train", "--workdir", str(root / RUN), f"--config.train.steps={STEPS}", "--no-progress",
                   cwd=str(root), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def classifier():
    from jaxdiff.metrics import digits
    return digits.reference_classifier(16)


def _accuracy(classifier, pixels_uint8, wanted) -> float:
    from jaxdiff.metrics import digits
    images = np.asarray(pixels_uint8, np.float32)[..., :1] / 127.5 - 1.0               # [N, 16, 16, 1]
    return digits.accuracy(classifier, images, wanted)


def _cells(path, num: int, ncols: int, size: int = 16) -> np.ndarray:
    """The images of a grid PNG written by `images.save_grid` (2-pixel gaps, enlarged x4)."""
    grid = np.asarray(Image.open(path))
    up, pad = max(1, 64 // size), 2
    cells = []
    for i in range(num):
        r, c = divmod(i, ncols)
        y, x = (pad + r * (size + pad)) * up, (pad + c * (size + pad)) * up
        cells.append(grid[y:y + size * up:up, x:x + size * up:up])
    return np.stack(cells)[..., None]                                                  # [N, 16, 16, 1]


def test_the_training_run_writes_the_digits_of_its_columns(workdir, classifier):
    cells = _cells(workdir / RUN / "samples.png", 80, 10)
    assert _accuracy(classifier, cells, np.arange(80) % 10) >= THRESHOLD


@pytest.mark.parametrize("block", range(len(_python_examples())))
def test_python_examples(block, workdir, classifier, monkeypatch):
    """Run the block as written (from the folder holding runs/digits), then every
    `model.sample(...)` call in it once more to judge its images against its labels."""
    code = _python_examples()[block]
    monkeypatch.chdir(workdir)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)                                  # noqa: S102
    calls = [c for c in ast.walk(ast.parse(code)) if isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "sample"]
    for call in calls:
        kwargs = {k.arg: eval(compile(ast.Expression(k.value), "README.md", "eval"), scope) for k in call.keywords}  # noqa: S307
        args = [eval(compile(ast.Expression(a), "README.md", "eval"), scope) for a in call.args]  # noqa: S307
        kwargs["output_type"] = "uint8"
        images = scope["model"].sample(*args, **kwargs)
        wanted = np.asarray(list(kwargs["labels"]))
        acc = _accuracy(classifier, images, wanted)
        assert acc >= THRESHOLD, (ast.unparse(call), acc)


@pytest.mark.parametrize("line", _cli_examples())
def test_cli_examples(line, workdir, classifier):
    args = shlex.split(line)[1:]
    out = args[args.index("--out") + 1]
    proc = run_cli(*args, "--no-progress", cwd=str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    num = int(args[args.index("--num") + 1])
    labels = args[args.index("--labels") + 1]
    if labels == "grid":
        wanted, ncols = np.arange(num) % 10, 10
    else:
        values = [int(v) for v in labels.split(",")]
        wanted, ncols = np.resize(values, num), math.ceil(math.sqrt(num))
    cells = _cells(os.path.join(workdir, out), num, ncols)
    assert _accuracy(classifier, cells, wanted) >= THRESHOLD, line


def test_the_training_run_ends_with_its_fid_digits(workdir):
    """The README's first command closes with an evaluation: FID-digits of the EMA weights at the
    last step, logged beside the losses and said on stderr."""
    import json

    rows = [json.loads(line) for line in (workdir / RUN / "metrics.jsonl").read_text().splitlines()]
    scores = [r for r in rows if "eval_fid_digits" in r]
    assert [r["step"] for r in scores] == [STEPS]
    # A run of 800 steps draws digits (see above), far from noise (FID-digits ~2,500) or one class (~350).
    assert 0 < scores[0]["eval_fid_digits"] < 100
