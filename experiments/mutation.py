"""Mutation testing of the core, module by module, with a score per module.

    python experiments/mutation.py                      # every 10th mutant (1 in 20 for checkpoint/)
    python experiments/mutation.py --every 1            # every mutant (hours on 2 cores)
    python experiments/mutation.py --modules schedules,sampling --minutes 10
    python experiments/mutation.py --survivors          # rerun only the last run's survivors

mutmut (configured in pyproject.toml's [tool.mutmut]) copies jaxdiff/ into mutants/, runs the
selected tests once to learn which tests reach which function, then runs only those tests against
each mutant, one child at a time. This runner starts from a fresh mutants/ (so edits to the code,
the tests or the config are all seen), runs one `mutmut run` per module under `nice -n 15`, stops a
module that passes its time box (what it finished counts), and prints killed / total per module.

Mutants are sampled systematically by their number (`--every 10` takes the mutants numbered 10,
20, ... of every function: the glob `jaxdiff.schedules.*0`), so a run fits in about an hour on a
shared 2-core machine; the glob for each module is printed, to rerun one by hand with
`mutmut run --max-children 1 "GLOB"`, inspect one with `mutmut show NAME`.

`--keep` finishes an interrupted run (or one module's time box) without starting afresh.
`--survivors` reruns the survivors of the previous run (read from mutants/mutation-scores.json)
after tests were added. Adding tests kills and never revives a mutant, so the killed ones of the
previous run stay killed and the new score is theirs plus the survivors killed now. (When the
test selection in pyproject.toml changed, mutmut forgets every verdict, hence this bookkeeping.)
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

# module name -> (mutant-name prefix, sampling step multiplier relative to --every)
MODULES = {
    "parameterization": ("jaxdiff.parameterization.", 1),
    "schedules": ("jaxdiff.schedules.", 1),
    "train/step": ("jaxdiff.train.step.", 1),
    "samplers/base": ("jaxdiff.samplers.base.", 1),
    "sampling": ("jaxdiff.sampling.", 1),
    "checkpoint/": ("jaxdiff.checkpoint.", 2),
}
SCORES = os.path.join("mutants", "mutation-scores.json")
KILLED = {"killed", "timeout", "segfault"}  # a mutant that crashes or hangs the tests is caught


def glob_for(prefix: str, every: int) -> str:
    """The mutmut name glob selecting every `every`-th mutant of each function under `prefix`
    (a glob on the last digits of the mutant number)."""
    endings = {1: "*", 2: "*[02468]", 5: "*[05]", 10: "*0", 20: "*[02468]0"}
    if every not in endings:
        raise SystemExit(f"--every must be one of {sorted(endings)}, got {every}")
    return prefix + endings[every]


def results() -> dict[str, str]:
    """{mutant name: status} of every mutant mutmut knows (`mutmut results --all true`)."""
    out = subprocess.run(["mutmut", "results", "--all", "true"], check=False, capture_output=True,
                         text=True).stdout
    pairs = (line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)
    return {name: status for name, status in pairs}


def run_mutmut(patterns: list[str], minutes: float) -> float:
    """`nice -n 15 mutmut run --max-children 1 PATTERNS`; the time box starts once mutmut begins
    the mutants (after its stats and clean-test passes) and ends with SIGINT, which mutmut handles
    by stopping its worker and keeping the finished verdicts. Returns the seconds spent."""
    start = time.time()
    proc = subprocess.Popen(["nice", "-n", "15", "mutmut", "run", "--max-children", "1", *patterns],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    begun, tail = threading.Event(), []

    def read():
        seen = b""
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            seen = (seen + chunk)[-4096:]
            tail[:] = [seen]
            if b"Running mutation testing" in seen:
                begun.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None and not begun.wait(1.0):
        pass
    try:
        proc.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        print(f"    time box of {minutes:g} min reached; stopping (finished mutants count)")
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(5)
    if not begun.is_set() and tail:
        sys.stdout.write(tail[0].decode(errors="replace").replace("\r", "\n")[-2000:] + "\n")
    return time.time() - start


def score(statuses: dict[str, str], names: list[str]) -> tuple[int, int, list[str]]:
    """(killed, tested, survivors) over `names`; mutants no selected test reaches count as
    survivors (nothing would notice them), unchecked ones are left out."""
    checked = [n for n in names if statuses.get(n) not in (None, "not checked")]
    killed = [n for n in checked if statuses[n] in KILLED]
    return len(killed), len(checked), sorted(n for n in checked if statuses[n] not in KILLED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default=",".join(MODULES), help=f"comma-separated, from: {', '.join(MODULES)}")
    parser.add_argument("--every", type=int, default=10, help="sample every N-th mutant: 1, 2, 5, 10 or 20")
    parser.add_argument("--minutes", type=float, default=9.0, help="time box per module")
    parser.add_argument("--survivors", action="store_true", help="rerun only the previous run's survivors")
    parser.add_argument("--keep", action="store_true",
                        help="keep mutants/ and its verdicts: finish an interrupted run instead of starting afresh")
    args = parser.parse_args()
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env_path = os.environ.get("PYTHONPATH")
    if env_path:  # the tests must import the mutated copy under mutants/, never this checkout
        print("note: PYTHONPATH is ignored for the run")
        os.environ.pop("PYTHONPATH")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        raise SystemExit(f"unknown module(s) {unknown}; valid: {', '.join(MODULES)}")

    previous = {}
    if args.survivors:
        if not os.path.exists(SCORES):
            raise SystemExit(f"--survivors needs {SCORES} from an earlier run of this script")
        with open(SCORES) as f:
            previous = json.load(f)
    elif os.path.isdir("mutants") and not args.keep:
        shutil.rmtree("mutants")
    if args.keep and os.path.exists(SCORES):
        with open(SCORES) as f:
            previous = json.load(f)

    report = {}
    if args.survivors:  # one mutmut run for all of them: its stats and clean-test passes are paid once
        targets = [n for m in modules for n in previous["modules"][m]["survivors"]]
        print(f"rerunning {len(targets)} survivor(s) of {', '.join(modules)}")
        seconds = run_mutmut(targets, args.minutes * len(modules)) if targets else 0.0
        statuses = results()
    for module in modules:
        prefix, factor = MODULES[module]
        if args.survivors:
            before = previous["modules"][module]
            now_killed = [n for n in before["survivors"] if statuses.get(n) in KILLED]
            survivors = [n for n in before["survivors"] if n not in now_killed]
            report[module] = {"glob": before["glob"], "killed": before["killed"] + len(now_killed),
                              "tested": before["tested"], "survivors": survivors,
                              "before": f"{before['killed']} / {before['tested']}", "seconds": round(seconds)}
        else:
            pattern = glob_for(prefix, args.every * factor if args.every in (5, 10) else args.every)
            print(f"{module}: mutmut run --max-children 1 \"{pattern}\"")
            known = {n: st for n, st in (results() if args.keep else {}).items() if fnmatch.fnmatchcase(n, pattern)}
            # mutmut reruns every mutant a pattern names; on --keep name only the unfinished ones
            todo = [n for n, status in known.items() if status == "not checked"] if known else [pattern]
            seconds = run_mutmut(todo, args.minutes) if todo else 0.0
            statuses = results()
            names = sorted(n for n in statuses if fnmatch.fnmatchcase(n, pattern))
            killed, tested, survivors = score(statuses, names)
            report[module] = {"glob": pattern, "killed": killed, "tested": tested, "sampled": len(names),
                              "survivors": survivors, "seconds": round(seconds)}
        r = report[module]
        pct = 100.0 * r["killed"] / r["tested"] if r["tested"] else float("nan")
        print(f"    {r['killed']} / {r['tested']} killed ({pct:.0f}%) in {r['seconds']} s; "
              f"survivors: {' '.join(n.split('.', 1)[1] for n in r['survivors']) or 'none'}")

    if previous:
        previous["modules"].update(report)
        report = previous["modules"]
    os.makedirs("mutants", exist_ok=True)
    with open(SCORES, "w") as f:
        json.dump({"every": args.every, "modules": report}, f, indent=1)
    print("\nmodule              killed / tested")
    for module, r in report.items():
        print(f"{module:<20}{r['killed']:>6} / {r['tested']}")
    total_k = sum(r["killed"] for r in report.values())
    total_t = sum(r["tested"] for r in report.values())
    print(f"{'all':<20}{total_k:>6} / {total_t}")


if __name__ == "__main__":
    main()
