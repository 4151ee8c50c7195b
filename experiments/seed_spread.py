"""How much of a fusion-vs-SFT result is the data order? The reproduction's three arms, retrained per seed.

The recorded reproduction (examples/reproduce.sh) trains SFT-only, unified and pairwise+merge once, with
seed 0, and its held-out table is one draw of the data order. This script trains the same three arms with
the same flags on the same cache for other seeds, evaluates each seed's arms on the held-out split (the
recipe is fixed: nothing is selected here), and reports per domain the mean and spread over seeds, the
per-seed difference fused - SFT, and the share of the code gap to a source model that each fused arm closes.

    python -m experiments.seed_spread --cache out/repro/cache --data out/repro/corpus.jsonl \
        --out out/seeds --seeds 1,2 --recorded out/repro/results.json --jobs 2

--recorded adds an existing fuse-eval JSON (the reproduction's results.json, seed 0) as one more seed and
supplies the reference rows (the source models). Every training and evaluation is resumable: a seed whose
held-out JSON exists is read, a finished checkpoint is not retrained.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments.recipe_search import DOMAINS, _bin

# The reproduction's recipes and epochs (examples/reproduce.sh), except checkpoints: only the final one is needed.
TRAIN_FLAGS = "--epochs 2 --save-every 0"
FUSION_FLAGS = "--recipe recommended"
ARMS = {"sft": "--recipe sft", "unified": "--mode unified {FUSION}", "pairwise+merge": "--mode pairwise {FUSION}"}
CHECKPOINT = {"sft": "final", "unified": "final", "pairwise+merge": "merged"}


def train(arm: str, seed: int, cache: str, out: Path, train_flags: str, fusion_flags: str, threads: int) -> Path:
    """Train one arm with one seed (resumes an unfinished run; threads 0: fuse-train's default); returns its
    checkpoint folder."""
    run = out / f"seed{seed}" / arm.replace("+", "-")
    ckpt = run / CHECKPOINT[arm]
    if (ckpt / "model.safetensors").exists():
        return ckpt
    flags = shlex.split(train_flags) + shlex.split(ARMS[arm].format(FUSION=fusion_flags))
    if threads:
        flags += ["--threads", str(threads)]
    cmd = [_bin("fuse-train"), "--shards", cache, *flags, "--seed", str(seed), "--out", str(run), "--resume"]
    print("+", shlex.join(cmd), flush=True)
    run.mkdir(parents=True, exist_ok=True)
    with open(run.parent / f"{run.name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{arm} seed {seed}: fuse-train failed (rc={rc}); see {run.parent / (run.name + '.log')}")
    return ckpt


def evaluate(ckpts: dict[str, Path], data: str, path: Path) -> None:
    """One fuse-eval over the held-out split with every arm of a seed side by side, written to `path`."""
    cmd = [_bin("fuse-eval"), "--data", data, "--split", "heldout", "--json-out", str(path)]
    for arm, ckpt in ckpts.items():
        cmd += ["--model", f"{arm}={ckpt}"]
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def bpb_table(rows: list[dict]) -> dict[str, dict[str, float]]:
    """fuse-eval JSON rows -> {model: {domain: bits per byte}} (domains plus 'all')."""
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        table.setdefault(r["model"], {})[r["domain"]] = r["bits_per_byte"]
    return table


def gap_closed(fused: float, sft: float, source: float) -> float:
    """Share of the gap from SFT to the source that the fused arm closes (negative: it widened)."""
    return (sft - fused) / (sft - source)


def report(per_seed: dict[int, dict[str, dict[str, float]]], source: str | None, source_bpb: dict | None) -> str:
    cols = [*DOMAINS, "all"]
    tables = [t for _, t in sorted(per_seed.items())]  # in seed order
    fused = [arm for arm in ARMS if arm != "sft"]
    lines = ["per seed, held-out bits per byte:",
             f"{'seed':>4s}  {'arm':16s}" + "".join(f"{c:>9s}" for c in cols)]
    for seed, t in sorted(per_seed.items()):
        for arm in ARMS:
            lines.append(f"{seed:4d}  {arm:16s}" + "".join(f"{t[arm][c]:9.4f}" for c in cols))
    n = len(per_seed)
    lines += ["", f"mean ± sd over {n} seeds:", f"{'arm':22s}" + "".join(f"{c:>17s}" for c in cols)]
    for arm in ARMS:
        cells = []
        for c in cols:
            xs = [t[arm][c] for t in tables]
            sd = statistics.stdev(xs) if n > 1 else float("nan")
            cells.append(f"{statistics.mean(xs):.4f} ± {sd:.4f}")
        lines.append(f"{arm:22s}" + "".join(f"{s:>17s}" for s in cells))
    lines += ["", "fused - SFT per seed (negative: fused better); wins = seeds where fused is better:",
              f"{'arm':22s}" + "".join(f"{c:>17s}" for c in cols)]
    for arm in fused:
        deltas = {c: [t[arm][c] - t["sft"][c] for t in tables] for c in cols}
        lines.append(f"{arm:22s}" + "".join(
            f"{f'{statistics.mean(ds):+.4f} {sum(d < 0 for d in ds)}/{n}':>17s}" for ds in deltas.values()))
        lines.append(f"{'':22s}" + "".join(f"{' '.join(f'{d:+.3f}' for d in ds):>17s}" for ds in deltas.values()))
    if source_bpb:
        lines += ["", f"share of the code gap from SFT to {source} ({source_bpb['code']:.4f}) closed, per seed:"]
        for arm in fused:
            shares = [gap_closed(t[arm]["code"], t["sft"]["code"], source_bpb["code"]) for t in tables]
            lines.append(f"  {arm:20s} " + "  ".join(f"{s:+.1%}" for s in shares)
                         + f"   mean {statistics.mean(shares):+.1%}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--data", required=True, help="the corpus the cache was built from (for the held-out split)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="1,2", help="comma-separated fuse-train seeds to train")
    ap.add_argument("--recorded", default="", help="an existing fuse-eval JSON with the three arms (seed 0)")
    ap.add_argument("--recorded-seed", type=int, default=0)
    ap.add_argument("--source", default="qwen", help="reference row of --recorded whose code gap is measured")
    ap.add_argument("--train-flags", default=TRAIN_FLAGS)
    ap.add_argument("--fusion-flags", default=FUSION_FLAGS)
    ap.add_argument("--jobs", type=int, default=1, help="trainings run side by side, each with 1 thread if > 1")
    a = ap.parse_args()
    out = Path(a.out)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    threads = 1 if a.jobs > 1 else 0
    longest_first = ["pairwise+merge", "sft", "unified"]  # pairwise trains once per source
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    source_bpb = None
    if a.recorded:
        recorded = bpb_table(json.loads(Path(a.recorded).read_text()))
        missing = [arm for arm in ARMS if arm not in recorded]
        if missing:
            raise SystemExit(f"{a.recorded} has no rows for {', '.join(missing)}; it must hold the arms {list(ARMS)}")
        per_seed[a.recorded_seed] = recorded
        source_bpb = recorded.get(a.source)
    for seed in seeds:
        path = out / f"seed{seed}" / "heldout.json"
        if not path.exists():
            with ThreadPoolExecutor(max_workers=a.jobs) as pool:
                futures = {arm: pool.submit(train, arm, seed, a.cache, out, a.train_flags, a.fusion_flags, threads)
                           for arm in longest_first}
                ckpts = {arm: futures[arm].result() for arm in ARMS}
            evaluate(ckpts, a.data, path)
        per_seed[seed] = bpb_table(json.loads(path.read_text()))
    print(report(per_seed, a.source, source_bpb))


if __name__ == "__main__":
    main()
