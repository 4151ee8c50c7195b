"""The training configuration: every fuse-train setting, from a recipe file and the command line.

A recipe is a YAML file of settings (recipes/*.yaml, or any file, such as a run's saved config.yaml). fuse-train
resolves a run's settings as: TrainConfig's base values < recipes/recommended.yaml < the recipe named by
--recipe < the flags typed on the command line. So `fuse-train` with no recipe trains the recommended one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from cache_builder.corpus import EVALUATION_SPLITS

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEFAULT_RECIPE = "recommended"
MODES = ("unified", "pairwise", "sft")
GATES = ("none", "token", "chunk", "record", "candidate")  # join with "+": "candidate+token" needs both
LIKELIHOOD_GATES = ("token", "chunk", "record")  # the source beats the pivot on the gold text (by gate_margin)
LAMBDA_SCOPES = ("all", "distilled")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("fp32", "bf16")
# Settings renamed when one name had two meanings; a file or flag with the old name is refused with the new ones.
RENAMED_SETTINGS = {
    "top_k": "uld_top_k (ULD's K; the cache's K is cache-build --top-k)",
    "temperature": "fusion_temperature (ULD and FuseLLM's softmax) or alm_temperature (ALM's binarization)",
}
JOINS = ("exact", "intersect")


def valid_gates(gates: tuple[str, ...]) -> bool:
    """GATES names, each once, "none" only alone."""
    return set(gates) <= set(GATES) and len(set(gates)) == len(gates) and (gates == ("none",) or "none" not in gates)


@dataclass
class TrainConfig:
    """Resolved settings of one fuse-train command; saved with the run and inside every checkpoint."""

    shards: str = "cache"  # a cache root, a source folder or a URL; several joined by ','
    pivot: str = "smollm2"
    mode: str = "unified"  # unified: one run, all sources; pairwise: one run per source + merge; sft: no fusion
    sources: list[str] | None = None  # default: every source aligned to the pivot
    train_splits: list[str] = field(default_factory=lambda: ["train"])  # e.g. train + generated (corpus-generate)
    # splits learned from the sources alone, no SFT term: text the pivot wrote itself (on-policy distillation)
    distill_only_splits: list[str] = field(default_factory=list)
    # source -> the corpus domains it teaches, e.g. {qwen: [code]}; a source not named teaches every domain
    source_domains: dict[str, list[str]] = field(default_factory=dict)
    # domain -> the epochs it is trained in, the first N (e.g. {prose: 1}); a domain not named: every epoch
    domain_epochs: dict[str, int] = field(default_factory=dict)
    loss: str = "topk-kl"  # a key of fuse_trainer.losses.FUSION_LOSSES
    lam: float = 0.5  # total = (1 - lam) * SFT + lam * fusion
    lambda_start: float | None = None  # λ moves linearly from lambda_start (first step) to lam (last step); None: lam
    lambda_scope: str = "all"  # all: every response position; distilled: only where a source is distilled
    fusion_temperature: float = 1.0  # softmax temperature of ULD and FuseLLM's soft CE
    alm_temperature: float = 1.0  # ALM: binarization temperature of the chunk likelihoods
    uld_top_k: int = 10  # InfiFusion's K
    standardize: bool = True  # InfiFusion: z-score the logits before the softmax
    normalize: str = "topk"  # InfiFusion: "topk" or "full" vocabulary normalisation
    alm_distance: str = "kl"
    graph_weight: float = 0.0  # weight of InfiGFusion's graph-on-logits term (fuse_trainer/graph_loss.py); 0: off
    weighting: str = "uniform"  # unified mode: uniform | mince | avgce | entropy
    weighting_temperature: float = 1.0
    gate: str = "none"  # where a source teaches: a GATES name, or several joined by "+" (all must let it in)
    # source -> its own gate, written as `gate` is (e.g. {sft: none}: a teacher trusted on its domain, ungated); a
    # source not named takes `gate`
    source_gates: dict[str, str] = field(default_factory=dict)
    gate_margin: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_tokens: int = 2048
    shuffle_window: int = 8  # shard groups whose micro-batches are shuffled together (and held in memory at once)
    grad_accum: int = 1
    dtype: str = "fp32"  # bf16: autocast matmuls to bfloat16, weights and optimizer state stay float32
    activation_checkpointing: bool = False  # recompute each layer's activations in the backward: less memory, same model
    fsdp: bool = False  # shard weights, gradients and AdamW state across the torchrun ranks (fuse_trainer.sharding)
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    threads: int | None = None  # torch CPU threads (default: torch's choice, all cores)
    out: str = "runs/fuse"
    resume: bool = False
    save_every: int = 50
    eval_split: str = "validation"  # the split evaluated during training: bits per byte per domain, never trained on
    eval_every: int = 0  # steps between evaluations of eval_split (0: none); the last step is always evaluated
    keep_best: str | None = None  # "all" (pooled) or a domain: final/ holds the evaluated step best on it
    merge: str = "task-arithmetic"  # pairwise mode: a key of fuse_trainer.merge.MERGE_METHODS
    merge_weights: list[float] | None = None  # default: 1 / number of sources each
    ties_density: float = 0.2
    join: str = "exact"  # exact: every source holds the same records; intersect: train on the records all share
    cache_dir: str | None = None  # local store of remote caches (default: the user cache folder, logit-cache-fusion)
    max_local_gb: float | None = None  # bound of the store's shard files (least recently used evicted); None: no bound
    allow_insecure: bool = False  # allow plain-http locations and S3 endpoints
    extra: dict = field(default_factory=dict)  # free-form notes kept with the run (e.g. experiment name)
    recipe: str | None = None  # the recipe the run started from (a name under recipes/ or a file)

    def loss_kwargs(self) -> dict:
        """Keyword arguments of the chosen fusion loss, from the settings its registry entry names."""
        from fuse_trainer.losses import LOSS_SETTINGS

        return {argument: getattr(self, setting) for argument, setting in LOSS_SETTINGS[self.loss].items()}

    def needed_statistics(self) -> dict[str, str]:
        """{cached statistic: the setting that reads it}: an imported cache that lacks one cannot train this run."""
        needed: dict[str, str] = {}
        if self.mode == "sft":
            return needed
        if self.loss == "topk-kl":
            needed["logsumexp"] = "--loss topk-kl (the tail mass)"
        if self.loss == "infifusion" and self.standardize:
            needed.update(logit_mean="--loss infifusion with --standardize", logit_std="--loss infifusion with --standardize")
        if self.loss == "infifusion" and self.normalize == "full":
            needed["z_logsumexp" if self.standardize else "logsumexp"] = "--loss infifusion --normalize full"
        if self.loss == "alm":
            needed["chunk_logprob"] = "--loss alm"
        if self.weighting == "entropy":
            needed["logsumexp"] = "--weighting entropy"
        if self.graph_weight:
            needed["logsumexp"] = "--graph-weight (the sources' probabilities)"
        if self.weighting in ("mince", "avgce"):
            needed["chunk_logprob"] = f"--weighting {self.weighting}"
        for gate in self.all_gates:
            if gate == "token":
                needed["gold_logprob"] = "--gate token"
            if gate in ("chunk", "record"):
                needed["chunk_logprob"] = f"--gate {gate}"
        return needed

    @property
    def gates(self) -> tuple[str, ...]:
        """The gates `gate` combines: "candidate+token" -> ("candidate", "token")."""
        return tuple(self.gate.split("+"))

    def gates_of(self, source: str) -> tuple[str, ...]:
        """The gates a source's targets pass: its own (`source_gates`), else `gate`'s."""
        return tuple(self.source_gates[source].split("+")) if source in self.source_gates else self.gates

    @property
    def all_gates(self) -> tuple[str, ...]:
        """Every gate some source passes, once each, in order: `gate`'s, then those of `source_gates`."""
        return tuple(dict.fromkeys(self.gates + tuple(g for source in self.source_gates for g in self.gates_of(source))))

    def validate(self) -> "TrainConfig":
        from fuse_trainer.losses import FUSION_LOSSES
        from fuse_trainer.merge import MERGE_METHODS
        from fuse_trainer.weighting import SOURCE_WEIGHTINGS

        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}"),
            (self.loss in FUSION_LOSSES, f"loss must be one of {sorted(FUSION_LOSSES)}"),
            (self.weighting in SOURCE_WEIGHTINGS, f"weighting must be one of {sorted(SOURCE_WEIGHTINGS)}"),
            (valid_gates(self.gates),
             f"gate must be one of {GATES}, or several of them other than none joined by '+' (e.g. candidate+token)"),
            (isinstance(self.source_gates, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                          and valid_gates(tuple(v.split("+")))
                                                          for k, v in self.source_gates.items()),
             f"source_gates must map source names to a gate as --gate takes it ({', '.join(GATES)}, or several "
             "joined by '+'), e.g. {sft: none}"),
            (self.lambda_scope in LAMBDA_SCOPES, f"lambda_scope must be one of {LAMBDA_SCOPES}"),
            (self.merge in MERGE_METHODS, f"merge must be one of {sorted(MERGE_METHODS)}"),
            (0.0 <= self.lam <= 1.0, "lambda must be in [0, 1]"),
            (self.lambda_start is None or 0.0 <= self.lambda_start <= 1.0, "lambda_start must be in [0, 1]"),
            (self.mode != "sft" or self.lambda_start is None,
             "mode sft learns the gold text only: drop lambda_start (it schedules the fusion term's weight)"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}"),
            (self.grad_accum >= 1 and self.batch_tokens >= 1, "grad_accum and batch_tokens must be positive"),
            (self.shuffle_window >= 1, "shuffle_window must be at least 1 shard group"),
            (self.join in JOINS, f"join must be one of {JOINS}"),
            (self.max_local_gb is None or self.max_local_gb > 0, "max_local_gb must be positive"),
            (isinstance(self.train_splits, list) and self.train_splits
             and all(isinstance(s, str) for s in self.train_splits),
             "train_splits must be a list of one or more split names, e.g. [train, generated]"),
            (not set(self.train_splits) & set(EVALUATION_SPLITS),
             "train_splits must not name validation or heldout: those records are for evaluation"),
            (isinstance(self.distill_only_splits, list) and set(self.distill_only_splits) <= set(self.train_splits),
             "distill_only_splits must be a list of splits that train_splits also names"),
            (self.gate_margin == 0.0 or set(self.all_gates) & set(LIKELIHOOD_GATES),
             f"gate_margin compares likelihoods; only the {'/'.join(LIKELIHOOD_GATES)} gates do: drop gate_margin"),
            (self.eval_every >= 0, "eval_every must be 0 (no evaluation during training) or a number of steps"),
            (not (self.fsdp and self.eval_every), "eval_every scores the pivot on rank 0 alone, which a sharded pivot "
             "cannot do: leave out eval_every with fsdp and score the final model with fuse-eval"),
            (self.eval_split not in self.train_splits,
             f"eval_split {self.eval_split!r} is trained on (train_splits): evaluate on a split the run does not learn"),
            (self.keep_best is None or self.eval_every > 0,
             "keep_best picks among the evaluated steps: give eval_every too (e.g. --eval-every 10)"),
            (self.graph_weight >= 0.0, "graph_weight must be 0 (off) or positive"),
            (self.mode != "sft" or not self.graph_weight,
             "mode sft learns the gold text only: drop graph_weight (the graph term distils the sources)"),
            (isinstance(self.source_domains, dict)
             and all(isinstance(k, str) and isinstance(v, list) and v and all(isinstance(d, str) for d in v)
                     for k, v in self.source_domains.items()),
             "source_domains must map source names to lists of one or more domains, e.g. {qwen: [code]}"),
            (isinstance(self.domain_epochs, dict)
             and all(isinstance(k, str) and isinstance(v, int) and v >= 1 for k, v in self.domain_epochs.items()),
             "domain_epochs must map domains to a number of epochs of at least 1, e.g. {prose: 1}"),
            (self.mode != "sft" or not self.source_gates,
             "mode sft learns the gold text only: drop source_gates (it says where the sources teach)"),
            (self.mode != "sft" or not self.source_domains,
             "mode sft learns the gold text only: drop source_domains (it says where the sources teach)"),
            (self.mode != "sft" or not self.distill_only_splits,
             "mode sft learns the gold text only: drop distill_only_splits (and those splits from train_splits)"),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ValueError("invalid training configuration: " + "; ".join(errors))
        if self.mode == "sft":
            self.lam = 0.0  # the SFT baseline: the whole loss is the SFT term
        return self


def load_yaml(path: str | Path) -> dict:
    """Settings from a YAML file; unknown keys are an error (a typo must not be silently ignored)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of setting: value")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    if "lambda" in data:
        data["lam"] = data.pop("lambda")
    renamed = sorted(set(data) & set(RENAMED_SETTINGS))
    if renamed:
        raise ValueError(f"{path}: " + "; ".join(f"{k} is now {RENAMED_SETTINGS[k]}" for k in renamed))
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; valid settings are {sorted(known)}")
    return data


def recipe_names() -> list[str]:
    """The recipes shipped under recipes/."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(recipe: str) -> Path:
    """A recipe's file: `recipe` itself if it is a file, else recipes/<recipe>.yaml."""
    if Path(recipe).is_file():
        return Path(recipe)
    shipped = RECIPES / f"{recipe}.yaml"
    if not shipped.is_file():
        raise ValueError(f"no recipe {recipe!r}: give a YAML file or one of {', '.join(recipe_names())}")
    return shipped


def resolve_config(cli_values: dict, recipe: str | None = None) -> TrainConfig:
    """Base values < the recommended recipe < `recipe` < command-line flags (only the flags the user typed)."""
    values = load_yaml(recipe_path(DEFAULT_RECIPE))
    if recipe:
        values |= load_yaml(recipe_path(recipe))
    return TrainConfig(**{**values, **cli_values, "recipe": recipe or DEFAULT_RECIPE}).validate()


def dump_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(asdict(config), sort_keys=True)
