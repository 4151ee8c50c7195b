"""Recipe search for logit-cache fusion on the VALIDATION split.

For every named configuration below: run `fuse-train` with a common base (same records, same steps),
evaluate the final (or merged) checkpoint with `fuse-eval --split validation`, and print one table row
of bits per byte per domain. Results are cached in <out>/<name>/eval.json, so a rerun skips finished
configurations (resumable). The held-out split is never touched.

    python -m experiments.recipe_search --cache out/demo/cache --data data/ --out out/search [--configs a,b]
    python -m experiments.recipe_search --suite repro --cache out/repro/cache --data out/repro/corpus.jsonl \
        --out out/search-repro

Five suites: `demo` (the shipped 57-record corpus, 12 steps), `repro` (the 4x corpus of
examples/reproduce.sh, 2 epochs, the reproduction's training flags), `repro-code` (that corpus with 5x the
code training records, 1 epoch), `repro-gen` (repro-code plus source-written code records, corpus-generate)
and `repro-onpolicy` (repro-code plus pivot-written code records, learned from Qwen's targets alone).

Reference rows (untrained pivot, the sources alone) are evaluated with the model name instead of a run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from fuse_trainer.config import TrainConfig

# Every run starts from the trainer's base values, not the recommended recipe these searches led to: the rows keep
# the meaning they had when they were run (BASE_RECIPE, written into --out and passed as --recipe).
BASE_RECIPE = {k: v for k, v in asdict(TrainConfig()).items() if k not in ("shards", "out", "recipe")}
# Common base for every training run (flags given later in a config override these: click keeps the last).
BASE = "--max-steps 12 --batch-tokens 1536 --dtype bf16 --save-every 0 --seed 0"

# name -> fuse-train flags (appended to BASE). Every configuration ever run stays in this list.
CONFIGS: dict[str, str] = {
    # --- SFT-only baselines, lr tuned -------------------------------------------------------------
    "sft-lr5e-5": "--mode sft --lr 5e-5",
    "sft-lr1e-4": "--mode sft --lr 1e-4",
    "sft-lr2e-4": "--mode sft --lr 2e-4",
    "sft-lr4e-4": "--mode sft --lr 4e-4",
    "sft-lr2e-4-seed1": "--mode sft --lr 2e-4 --seed 1",  # seed noise of the baseline (data order)
    # --- the demo's recipe, for reference ---------------------------------------------------------
    "demo-kl-l0.5-lr5e-5": "--mode unified --loss topk-kl --lambda 0.5 --gate token --lr 5e-5",
    # --- unified fusion candidates (lr filled in from the best SFT lr, see LR below) ---------------
    "kl-l0.1-gtok": "--mode unified --loss topk-kl --lambda 0.1 --gate token --lr {LR}",
    "kl-l0.3-gtok": "--mode unified --loss topk-kl --lambda 0.3 --gate token --lr {LR}",
    "fusellm-l0.3-gtok": "--mode unified --loss fusellm --lambda 0.3 --gate token --lr {LR}",
    "infi-raw-l0.3": "--mode unified --loss infifusion --raw --lambda 0.3 --lr {LR}",
    "infi-z-t0.1-l0.3": "--mode unified --loss infifusion --standardize --fusion-temperature 0.1 --normalize topk "
                        "--lambda 0.3 --lr {LR}",
    "alm-t1-l0.3": "--mode unified --loss alm --alm-temperature 1 --lambda 0.3 --lr {LR}",
    "alm-t0.1-l0.3": "--mode unified --loss alm --alm-temperature 0.1 --lambda 0.3 --lr {LR}",
    # follow-up: the best unified recipe above with its lr scaled by 1/(1-λ) (same SFT step size as SFT 2e-4)
    "infi-raw-l0.3-lr3e-4": "--mode unified --loss infifusion --raw --lambda 0.3 --lr 3e-4",
    "infi-raw-l0.3-seed1": "--mode unified --loss infifusion --raw --lambda 0.3 --lr 2e-4 --seed 1",
    "infi-raw-l0.5": "--mode unified --loss infifusion --raw --lambda 0.5 --lr 2e-4",
    "pw-infi-raw-l0.3": "--mode pairwise --loss infifusion --raw --lambda 0.3 --lr 2e-4",
    "kl-l0.3-gtok-qwen": "--mode unified --sources qwen --loss topk-kl --lambda 0.3 --gate token --lr {LR}",
    # 2026-11-28, after the search: the chunk gate (source and pivot compared on the same text span)
    "kl-l0.3-gchunk": "--mode unified --loss topk-kl --lambda 0.3 --gate chunk --lr {LR}",
    "infi-raw-l0.3-gchunk": "--mode unified --loss infifusion --raw --lambda 0.3 --gate chunk --lr {LR}",
    "alm-t1-l0.3-gchunk": "--mode unified --loss alm --alm-temperature 1 --lambda 0.3 --gate chunk --lr {LR}",
    # 2026-11-28: four times the steps (48, about 3.4 epochs of the train split), where SFT starts to overfit
    "sft-48-lr1e-4": "--mode sft --lr 1e-4 --max-steps 48",
    "sft-48-lr2e-4": "--mode sft --lr 2e-4 --max-steps 48",
    "kl-48-qwen-l0.7-gtok": "--mode unified --sources qwen --loss topk-kl --lambda 0.7 --gate token --lr 2e-4 "
                            "--max-steps 48",
    "infi-raw-48-l0.5": "--mode unified --loss infifusion --raw --lambda 0.5 --lr 2e-4 --max-steps 48",
    # the distillation term regularises (48 steps: 0.98 vs SFT's 1.10): more of it, and fewer steps
    "kl-36-qwen-l0.9-gtok": "--mode unified --sources qwen --loss topk-kl --lambda 0.9 --gate token --lr 2e-4 "
                            "--max-steps 36",
    "kl-24-qwen-l0.7-gtok": "--mode unified --sources qwen --loss topk-kl --lambda 0.7 --gate token --lr 2e-4 "
                            "--max-steps 24",
    "sft-24-lr2e-4": "--mode sft --lr 2e-4 --max-steps 24",
    "kl-24-l0.7-gtok": "--mode unified --loss topk-kl --lambda 0.7 --gate token --lr 2e-4 --max-steps 24",
}

# The 4x corpus of examples/reproduce.sh: its training flags, 2 epochs (about 90 steps), ~52 validation records.
# --shuffle-window 1: these suites were run before the option existed, shard group after shard group.
REPRO_BASE = "--epochs 2 --lr 2e-4 --batch-tokens 1536 --dtype bf16 --save-every 0 --seed 0 --shuffle-window 1"
# 2026-11-28 and 2026-11-29: top-k KL from Qwen alone, λ only where it is distilled, every shard group shuffled together;
# the rows differ in the gate.
QWEN_KL_SCOPED_W8 = ("--mode unified --sources qwen --loss topk-kl --lambda 0.7 --lambda-scope distilled "
                     "--shuffle-window 8")
REPRO_CONFIGS: dict[str, str] = {
    "sft": "--mode sft",
    # Qwen's code strength needs token identity: top-k KL (ULD only matches sorted probabilities)
    "kl-l0.7-mince-gtok": "--mode unified --loss topk-kl --lambda 0.7 --gate token --weighting mince",
    "kl-l0.7-qwen-gtok": "--mode unified --sources qwen --loss topk-kl --lambda 0.7 --gate token",
    "infi-raw-l0.3": "--mode unified --loss infifusion --raw --lambda 0.3",  # the demo's and reproduction's recipe
    # 2026-11-28, in the shipped order (every shard group shuffled together): distil only the targets that name
    # the pivot's gold token (experiments/target_ceiling.py: the others cost more than all the rest gain)
    "sft-w8": "--mode sft --shuffle-window 8",
    "kl-l0.7-qwen-gcand-w8": f"{QWEN_KL_SCOPED_W8} --gate candidate",
    # 2026-11-29: the candidate gate cost math a little; also require the source to be surer of the gold text than
    # the pivot, per next token or per shared-boundary chunk (the same event for both tokenizers)
    "kl-l0.7-qwen-gcandtok-w8": f"{QWEN_KL_SCOPED_W8} --gate candidate+token",
    "kl-l0.7-qwen-gcandchunk-w8": f"{QWEN_KL_SCOPED_W8} --gate candidate+chunk",
    # both fix math and lose most of the code gain (the pivot soon beats Qwen on the text it trains on); let the
    # source in unless it is worse than the pivot on the chunk by more than a margin
    "kl-l0.7-qwen-gcandchunk-m-0.5-w8": f"{QWEN_KL_SCOPED_W8} --gate candidate+chunk --gate-margin -0.5",
    "kl-l0.7-qwen-gcandchunk-m-2-w8": f"{QWEN_KL_SCOPED_W8} --gate candidate+chunk --gate-margin -2",
}

# The same corpus with 5x the code training records (`make_corpus.py --code-train-scale 5`; validation and
# held-out unchanged): a larger distillation set where Qwen2.5-Coder is far stronger. One epoch (about 100 steps):
# on the 4x corpus SFT was already past its best after one.
REPRO_CODE_BASE = "--epochs 1 --lr 2e-4 --batch-tokens 1536 --dtype bf16 --save-every 0 --seed 0 --shuffle-window 1"
REPRO_CODE_CONFIGS: dict[str, str] = {
    "sft": "--mode sft",
    "infi-raw-l0.3": "--mode unified --loss infifusion --raw --lambda 0.3",
    "kl-l0.7-mince-gtok": "--mode unified --loss topk-kl --lambda 0.7 --gate token --weighting mince",
    "kl-l0.9-mince-gtok": "--mode unified --loss topk-kl --lambda 0.9 --gate token --weighting mince",
    # the two rows above lose to SFT everywhere: λ also scales down the SFT term where the gate lets nothing in
    # (about half the positions); with --lambda-scope distilled those positions keep the full SFT weight
    "kl-l0.7-mince-gtok-scoped": "--mode unified --loss topk-kl --lambda 0.7 --gate token --weighting mince "
                                 "--lambda-scope distilled",
    "kl-l1.0-mince-gtok-scoped": "--mode unified --loss topk-kl --lambda 1.0 --gate token --weighting mince "
                                 "--lambda-scope distilled",
    # every row gets worse as λ grows, on every domain. Hypothesis: the KL gradient q - p_src is smaller than the
    # CE gradient q - onehot where the teacher is unsure, so the fused arm takes smaller steps (unlikely under
    # Adam with clipping active at nearly every step, and refuted by these rows). A larger lr for both arms:
    "sft-lr4e-4": "--mode sft --lr 4e-4",
    "kl-l0.7-mince-gtok-scoped-lr4e-4": "--mode unified --loss topk-kl --lambda 0.7 --gate token --weighting mince "
                                        "--lambda-scope distilled --lr 4e-4",
    # worse for both arms, fusion more so. Last: does the distillation term pay off only past one epoch, where
    # it held SFT's overfitting back on the small corpus (the 48-step rows)?
    "sft-2ep": "--mode sft --epochs 2",
    "kl-l0.7-mince-gtok-scoped-2ep": "--mode unified --loss topk-kl --lambda 0.7 --gate token --weighting mince "
                                     "--lambda-scope distilled --epochs 2",
    # the teacher only where it is much better (by 1 nat on the gold text), gold text at full weight elsewhere;
    # and the seed noise of the baseline
    "kl-l0.5-mince-gtok-m1-scoped": "--mode unified --loss topk-kl --lambda 0.5 --gate token --gate-margin 1.0 "
                                    "--weighting mince --lambda-scope distilled",
    "sft-seed1": "--mode sft --seed 1",
}

# Sequence-level distillation (2026-11-28): the repro-code corpus plus Qwen2.5-Coder's own continuations of its
# code train records (`corpus-generate --model qwen --domain code --samples 2`, split "generated"), cached by both
# sources. "sft" trains on the gold records alone, as every baseline before; "-gen" rows add the generated ones.
REPRO_GEN_CONFIGS: dict[str, str] = {
    "sft": "--mode sft",
    "sft-gen": "--mode sft --train-splits train,generated",
    "infi-raw-l0.3-gen": "--mode unified --loss infifusion --raw --lambda 0.3 --train-splits train,generated",
}

# On-policy distillation (2026-11-28): the repro-code corpus plus the PIVOT's own continuations of its code train
# records (`corpus-generate --model smollm2 --domain code --samples 2 --temperature 1 --top-p 1`, split
# "onpolicy"), cached by Qwen. Gold records are learned by SFT alone (λ 0); the pivot's own text has no gold to
# learn, only Qwen's targets on it (`--distill-only-splits`), so the only thing the fused arm adds to SFT is
# Qwen's view of where the pivot goes when it writes code itself.
REPRO_ONPOLICY_CONFIGS: dict[str, str] = {
    "sft": "--mode sft",
    "kl-qwen-onpolicy": "--mode unified --sources qwen --loss topk-kl --lambda 0 --train-splits train,onpolicy "
                        "--distill-only-splits onpolicy",
    # the row above met its pivot-written records in two blocks, one of them last (shard-block order): both
    # arms again with the micro-batches of every shard group shuffled together
    "sft-w8": "--mode sft --shuffle-window 8",
    "kl-qwen-onpolicy-w8": "--mode unified --sources qwen --loss topk-kl --lambda 0 --train-splits train,onpolicy "
                           "--distill-only-splits onpolicy --shuffle-window 8",
}

SUITES: dict[str, tuple[str, dict[str, str]]] = {
    "demo": (BASE, CONFIGS),
    "repro": (REPRO_BASE, REPRO_CONFIGS),
    "repro-code": (REPRO_CODE_BASE, REPRO_CODE_CONFIGS),
    "repro-gen": (REPRO_CODE_BASE, REPRO_GEN_CONFIGS),
    "repro-onpolicy": (REPRO_CODE_BASE, REPRO_ONPOLICY_CONFIGS),
}

# Reference models evaluated as they are (no training).
REFERENCES: dict[str, str] = {"ref-pivot": "smollm2", "ref-qwen": "qwen", "ref-gemma3": "gemma3"}

LR = os.environ.get("SEARCH_LR", "2e-4")  # the best SFT lr; fills {LR} in the configs above
DOMAINS = ["code", "instruct", "math", "prose"]


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def config_flags(name: str, suite: str) -> list[str]:
    base, configs = SUITES[suite]
    return shlex.split(base) + shlex.split(configs[name].replace("{LR}", LR))


def checkpoint_of(run_dir: Path, flags: list[str]) -> Path:
    return run_dir / ("merged" if "pairwise" in flags else "final")


def run_config(name: str, suite: str, cache: str, data: str, out: Path, eval_dtype: str) -> dict:
    d = out / name
    result_path = d / "eval.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    d.mkdir(parents=True, exist_ok=True)
    info: dict = {"name": name}
    if name in REFERENCES:
        model, flags, train_s = REFERENCES[name], [], 0.0
    else:
        flags = config_flags(name, suite)
        run_dir = d / "run"
        ckpt = checkpoint_of(run_dir, flags)
        t0 = time.time()
        if not (ckpt / "model.safetensors").exists():
            recipe = out / "base_recipe.yaml"
            recipe.write_text(yaml.safe_dump(BASE_RECIPE, sort_keys=True))
            cmd = [_bin("fuse-train"), "--shards", cache, "--recipe", str(recipe), *flags, "--out", str(run_dir)]
            print("+", shlex.join(cmd), flush=True)
            with open(d / "train.log", "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                tail = (d / "train.log").read_text()[-2000:]
                raise SystemExit(f"{name}: fuse-train failed (rc={rc})\n{tail}")
        train_s = time.time() - t0
        model = str(ckpt)
    t0 = time.time()
    ej = d / "fuse_eval.json"
    cmd = [_bin("fuse-eval"), "--model", f"{name}={model}", "--data", data, "--split", "validation",
           "--dtype", eval_dtype, "--json-out", str(ej)]
    print("+", shlex.join(cmd), flush=True)
    with open(d / "eval.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{name}: fuse-eval failed (rc={rc})\n{(d / 'eval.log').read_text()[-2000:]}")
    rows = json.loads(ej.read_text())
    bpb = {r["domain"]: r["bits_per_byte"] for r in rows}
    info.update({
        "flags": shlex.join(flags) if flags else f"(reference model {model}, untrained)",
        "bpb": bpb,
        "macro": sum(bpb[k] for k in DOMAINS if k in bpb) / len([k for k in DOMAINS if k in bpb]),
        "train_s": round(train_s, 1),
        "eval_s": round(time.time() - t0, 1),
    })
    result_path.write_text(json.dumps(info, indent=2))
    return info


def table(results: list[dict], baseline: dict | None) -> str:
    w = max([24, *(len(r["name"]) + 1 for r in results)])  # the config column fits the longest name
    head = f"{'config':{w}s}" + "".join(f"{k:>9s}" for k in DOMAINS) + f"{'all':>9s}{'macro':>9s}"
    if baseline:
        head += f"{'Δmacro':>9s}  doms<SFT"
    lines = [head]
    for r in results:
        b = r["bpb"]
        s = f"{r['name']:{w}s}" + "".join(f"{b.get(k, float('nan')):9.4f}" for k in DOMAINS)
        s += f"{b['all']:9.4f}{r['macro']:9.4f}"
        if baseline:
            wins = sum(b[k] < baseline["bpb"][k] for k in DOMAINS)
            s += f"{r['macro'] - baseline['macro']:+9.4f}  {wins}/4"
        lines.append(s)
    return "\n".join(lines)


def markdown(results: list[dict], baseline: dict | None, suite: str) -> str:
    """The same table in Markdown, with each configuration's fuse-train flags (the suite's base left out)."""
    base = SUITES[suite][0] + " "
    lines = ["| config | fuse-train flags (besides the common base) | " + " | ".join(DOMAINS)
             + " | all | macro | Δmacro vs SFT | domains better than SFT |",
             "|---" * (len(DOMAINS) + 6) + "|"]
    for r in results:
        b = r["bpb"]
        flags = r["flags"][len(base):] if r["flags"].startswith(base) else r["flags"]
        row = [r["name"], f"`{flags}`", *(f"{b[k]:.4f}" for k in DOMAINS), f"{b['all']:.4f}", f"{r['macro']:.4f}"]
        if baseline:
            row += [f"{r['macro'] - baseline['macro']:+.4f}", f"{sum(b[k] < baseline['bpb'][k] for k in DOMAINS)}/4"]
        else:
            row += ["", ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="demo", choices=sorted(SUITES), help="which base flags and configs")
    ap.add_argument("--cache", default="out/demo/cache")
    ap.add_argument("--data", default="data/")
    ap.add_argument("--out", default="out/search")
    ap.add_argument("--configs", default="", help="comma-separated names (default: all, references first)")
    ap.add_argument("--baseline", default="", help="config to compare against (default: best SFT row)")
    ap.add_argument("--eval-dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP/torch threads for the child runs (0: leave the environment as it is); 1 avoids "
                         "oversubscription when the 2 cores are shared with other jobs")
    ap.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    ap.add_argument("--report-only", action="store_true", help="print the table of finished configs only")
    a = ap.parse_args()
    configs = SUITES[a.suite][1]
    names = [n for n in a.configs.split(",") if n] or [*REFERENCES, *configs]
    for n in names:
        if n not in configs and n not in REFERENCES:
            raise SystemExit(f"unknown config {n!r} in suite {a.suite}; known: {', '.join([*REFERENCES, *configs])}")
    if a.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(a.threads)
    out = Path(a.out)
    results = []
    for n in names:
        if a.report_only:
            p = out / n / "eval.json"
            if p.exists():
                results.append(json.loads(p.read_text()))
            continue
        r = run_config(n, a.suite, a.cache, a.data, out, a.eval_dtype)
        print(f"== {n}: all {r['bpb']['all']:.4f} macro {r['macro']:.4f} "
              f"(train {r['train_s']} s, eval {r['eval_s']} s)", flush=True)
        results.append(r)
    # baseline: the named one, else the best (macro) SFT row among every finished run
    done = [json.loads(p.read_text()) for p in sorted(out.glob("*/eval.json"))]
    if a.baseline:
        base = next((r for r in done if r["name"] == a.baseline), None)
    else:
        sfts = [r for r in done if r["name"] == "sft" or r["name"].startswith("sft-")]
        base = min(sfts, key=lambda r: r["macro"]) if sfts else None
    if base:
        print(f"baseline: {base['name']} (macro {base['macro']:.4f}, all {base['bpb']['all']:.4f})")
    print(table(results, base))
    if a.markdown:
        print(markdown(results, base, a.suite))
    print(json.dumps({"split": "validation", "baseline": base["name"] if base else None,
                      "results": [{k: r[k] for k in ("name", "flags", "bpb", "macro")} for r in results]}))


if __name__ == "__main__":
    main()
