"""The command line end to end, and one-line errors for every bad input a user can make."""

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

SMALL = ["--config.data.image_size=16", "--config.data.batch_size=16", "--config.train.steps=4",
         "--config.train.checkpoint_every=2", "--config.train.log_every=1", "--config.optim.warmup_steps=1",
         "--config.sample.num=20", "--config.sample.steps=3", "--no-progress"]


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.startswith("jaxdiff ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    proc = run_cli("train", "--workdir", str(work), *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def test_train_writes_checkpoints_logs_and_pictures(trained):
    assert sorted(p.name for p in (trained / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert len((trained / "metrics.jsonl").read_text().splitlines()) == 4
    assert any((trained / "tb").iterdir())
    grid = np.asarray(Image.open(trained / "samples.png"))
    # 20 samples in 10 columns (one class per column) of 16x16 digits, 2px gaps, upscaled x4.
    assert grid.shape == ((2 * 18 + 2) * 4, (10 * 18 + 2) * 4)
    assert Image.open(trained / "loss.png").size[0] > 100


def test_sample_command(trained, tmp_path):
    out = tmp_path / "g.png"
    proc = run_cli("sample", "--checkpoint", str(trained), "--num", "4", "--steps", "3", "--seed", "1",
                   "--labels", "3", "--guidance_scale", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.asarray(Image.open(out)).shape == ((2 * 18 + 2) * 4, (2 * 18 + 2) * 4)


def test_unknown_config_key():
    _one_line_error(run_cli("train", "--config.train.stepz=3"), "unknown config key 'train.stepz'", "train.steps")


def test_unknown_command_prints_usage():
    proc = run_cli("fly")
    assert proc.returncode == 2 and "jaxdiff train" in proc.stderr


def test_missing_checkpoint(tmp_path):
    _one_line_error(run_cli("sample", "--checkpoint", str(tmp_path / "nothing")), "no checkpoint", "nothing")
    _one_line_error(run_cli("sample", "--checkpoint", str(tmp_path)), "no checkpoint")


def test_corrupt_checkpoint(trained, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    for f in (bad / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    _one_line_error(run_cli("sample", "--checkpoint", str(bad / "checkpoints" / "4"), "--steps", "2"),
                    "could not restore checkpoint", "corrupt")


def _write_images(folder, n, size, mode="L"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(folder / f"{i}.png")


def test_image_size_the_unet_cannot_halve(tmp_path):
    _write_images(tmp_path / "imgs", 16, 30)
    proc = run_cli("train", "--workdir", str(tmp_path / "w"), *SMALL,
                   f"--config.data.dataset=folder:{tmp_path / 'imgs'}", "--config.data.image_size=0",
                   "--config.model.class_conditional=false")
    _one_line_error(proc, "30")


def test_bad_channel_count(tmp_path):
    _one_line_error(run_cli("train", "--workdir", str(tmp_path / "w"), *SMALL, "--config.data.channels=2"),
                    "channels")


def test_unreadable_image_in_folder(tmp_path):
    _write_images(tmp_path / "imgs", 4, 16)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png at all")
    proc = run_cli("train", "--workdir", str(tmp_path / "w"), *SMALL,
                   f"--config.data.dataset=folder:{tmp_path / 'imgs'}")
    _one_line_error(proc, "broken.png")
