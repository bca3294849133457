"""experiments/bench_all.py end to end at toy sizes (slow: it runs real benchmarks): one JSON with
the machine, each benchmark's result, and a failing benchmark as one line that does not stop the
others."""

import json
import os
import sys

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


@pytest.mark.slow
def test_bench_all_quick_writes_one_json(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(EXPERIMENTS)
    import bench_all

    broken = ("bench_memory", ["--model", "no_such_unet"], [])       # fails: its entry is one line
    monkeypatch.setitem(bench_all.BENCHES, "memory", broken)
    out = tmp_path / "all.json"
    assert bench_all.main(["--quick", "--only", "attention,memory,conv", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    env = report["environment"]
    assert env["backend"] == "cpu" and env["device_count"] >= 1 and env["jax"] and len(report["load_start"]) == 3
    benches = report["benchmarks"]
    assert list(benches) == ["attention", "memory", "conv"]
    assert benches["memory"]["error"].startswith("ValueError: unknown --model 'no_such_unet'")
    assert "\n" not in benches["memory"]["error"] and "result" not in benches["memory"]
    rows = benches["attention"]["result"]["rows"]
    assert {r["impl"] for r in rows} == {"xla", "blocked"} and all(r["fwd_s"] > 0 for r in rows)
    assert benches["conv"]["result"]["rows"][0]["ms"]["xla"] > 0
    assert all(b["seconds"] > 0 and b["argv"] for b in benches.values())
    sys.modules.pop("bench_all", None)
