"""Kill a training run at random moments, resume it each time, and compare with a run never killed.

    python benchmarks/kill_campaign.py --kills=20 [--recipe=configs/text_classification.py:ci]

Each attempt starts `transformer.main` on the same workdir and SIGKILLs it after a random delay,
every other one 0-50 ms after a checkpoint save has begun, until `--kills` kills have landed or
the run reaches its end under fire; then one last start runs to the end. Reported: kills,
starts that failed by themselves, kills that landed during a checkpoint save (an orbax
temporary directory present), kills before any metrics line existed, whether the final
parameters and data position are bit-identical, whether metrics.jsonl equals the uninterrupted
run's (timing fields aside) with one line per logged step, and whether `best/` (fine-tuning
recipes) holds the same step and parameters. Exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # This process only reads the checkpoints back.

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import tqdm  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING = ("time", "_per_s", "mfu", "compile")  # Fields that differ between any two runs.


def command(recipe: str, workdir: pathlib.Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "transformer.main", f"--config={recipe}", f"--workdir={workdir}",
            f"--config.num_train_steps={steps}", "--config.checkpoint_every=5",
            "--config.eval_every=10", "--config.log_every=1", "--config.samples.prompts=()"]


def environment() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}


def metric_rows(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [{k: v for k, v in json.loads(x).items() if not any(t in k for t in TIMING)}
            for x in lines]


def arrays(directory: pathlib.Path) -> dict[str, np.ndarray]:
    tree = ocp.StandardCheckpointer().restore(directory)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def same_arrays(a: pathlib.Path, b: pathlib.Path) -> bool:
    x, y = arrays(a), arrays(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def data_position(workdir: pathlib.Path, step: int) -> list[str]:
    folder = workdir / "checkpoints" / str(step) / "data"
    return [p.read_text() for p in sorted(folder.glob("*.json"))]


def saving(workdir: pathlib.Path) -> bool:
    """Whether a checkpoint save is under way (orbax writes into a temporary directory)."""
    checkpoints = workdir / "checkpoints"
    return checkpoints.exists() and any("tmp" in p.name for p in checkpoints.iterdir())


def best_record(workdir: pathlib.Path) -> dict | None:
    path = workdir / "best" / "best.json"
    return json.loads(path.read_text()) if path.exists() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="configs/demo.py:ci")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--max_delay", type=float, default=12.0,
                        help="kill after a uniform random 0..max_delay seconds from the start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="kill_campaign_"))
    root.mkdir(parents=True, exist_ok=True)
    straight, killed = root / "straight", root / "killed"
    rng = random.Random(args.seed)

    begin = time.time()
    done = subprocess.run(command(args.recipe, straight, args.steps), cwd=REPO, env=environment(),
                          capture_output=True, text=True)
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    straight_s = time.time() - begin

    kills = during_save = before_first_step = starts = failed_starts = 0
    with tqdm.tqdm(total=args.kills, unit="kill", desc="kills") as bar:
        while kills < args.kills:
            starts += 1
            process = subprocess.Popen(command(args.recipe, killed, args.steps), cwd=REPO,
                                       env=environment(), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            try:
                if kills % 2:  # Every other kill aims at a save: saves are short and rare.
                    deadline = time.time() + args.max_delay * 4
                    while not saving(killed) and process.poll() is None and time.time() < deadline:
                        time.sleep(0.002)
                    process.wait(timeout=rng.uniform(0.0, 0.05))
                else:  # Within the run's length, so that most attempts are killed.
                    process.wait(timeout=rng.uniform(0.0, min(args.max_delay, straight_s)))
            except subprocess.TimeoutExpired:
                during = saving(killed)
                rows_before = len(metric_rows(killed))
                process.kill()
                process.wait()
                kills += 1
                during_save += during
                before_first_step += rows_before == 0
                bar.update(1)
                continue
            if process.returncode != 0:  # It ended by itself, and not well.
                failed_starts += 1
            else:  # It reached the end before its kill: the campaign is over.
                break
    final = subprocess.run(command(args.recipe, killed, args.steps), cwd=REPO, env=environment(),
                           capture_output=True, text=True)
    if final.returncode:
        print(final.stderr[-3000:], file=sys.stderr)
        return 1

    ckpt = f"checkpoints/{args.steps}/state"
    logged = [(r["step"], any(k.startswith("eval_") for k in r)) for r in metric_rows(killed)]
    report = {
        "recipe": args.recipe, "steps": args.steps, "starts": starts + 1, "kills": kills,
        "kills_during_a_save": during_save, "kills_before_the_first_step": before_first_step,
        "failed_starts": failed_starts,
        "params_identical": same_arrays(straight / ckpt, killed / ckpt),
        "data_position_identical": data_position(straight, args.steps) == data_position(
            killed, args.steps),
        "metrics_identical": metric_rows(straight) == metric_rows(killed),
        "duplicate_metric_lines": len(logged) - len(set(logged)),
        "best_identical": best_record(straight) == best_record(killed) and (
            best_record(straight) is None or same_arrays(straight / "best" / "params",
                                                         killed / "best" / "params")),
        "uninterrupted_run_s": round(straight_s, 1),
        "workdir": str(root),
    }
    print(json.dumps(report, indent=1))
    good = (not failed_starts and report["params_identical"] and report["data_position_identical"]
            and report["metrics_identical"] and not report["duplicate_metric_lines"]
            and report["best_identical"])
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
