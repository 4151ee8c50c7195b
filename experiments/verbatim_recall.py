"""How much of a corpus split can a model recite? Greedy continuation of each record's prompt vs the record itself.

A source that scores far better than the pivot on some text may *know the text* (it was in its pretraining
data) rather than know how to write such text. Distillation transfers the second, not the first. This measures
the first: for every record of --split (and --domain), the prompt is its first --prompt-chars characters
(cut as corpus-generate cuts them), the model continues greedily for --new-tokens tokens, and we count how
many characters of the continuation equal the record's own next characters.

    python -m experiments.verbatim_recall --data out/repro-code/corpus.jsonl --split validation \
        --domain code --model qwen --model smollm2 --model gemma3

Prints per model: the mean matched characters, and the share of records whose continuation matches the record
for at least 50 and at least 100 characters. Never uses the held-out split unless told to.
"""
from __future__ import annotations

import argparse
import os

import torch

from cache_builder.corpus import load_corpus
from cache_builder.generate import GenerateSettings, make_prompts
from cache_builder.models import load_model, load_tokenizer


def matched_chars(continuation: str, truth: str) -> int:
    """Length of the common prefix of two strings."""
    n = 0
    for a, b in zip(continuation, truth):
        if a != b:
            break
        n += 1
    return n


BATCH = 16  # prompts continued together


def greedy_continuations(model_name: str, prompts: list[str], new_tokens: int) -> list[str]:
    model, tokenizer = load_model(model_name, dtype=torch.bfloat16), load_tokenizer(model_name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    continuations = []
    for i in range(0, len(prompts), BATCH):
        encoded = tokenizer(prompts[i: i + BATCH], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**encoded, do_sample=False, max_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        continuations += tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return continuations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--domain", action="append", default=[])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--prompt-chars", type=int, default=400)
    ap.add_argument("--new-tokens", type=int, default=48)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    records = {r.record_id: r for r in load_corpus(a.data).records}
    selection = GenerateSettings(model="", split=a.split, domains=tuple(a.domain), prompt_chars=a.prompt_chars)
    cut = make_prompts(list(records.values()), selection)  # the records corpus-generate would continue
    if not cut:
        raise SystemExit(f"no record of split {a.split!r} and domains {a.domain or 'all'} is longer than "
                         f"--prompt-chars {a.prompt_chars}")
    prompts = [p.text for p in cut]
    truths = [records[p.record_id].text[len(p.text):] for p in cut]
    print(f"{len(cut)} records of split {a.split!r}, domains {a.domain or 'all'}; greedy {a.new_tokens} tokens")
    print(f"{'model':10s} {'mean matched chars':>19s} {'>= 50 chars':>12s} {'>= 100 chars':>13s}")
    for name in a.model:
        matched = [matched_chars(c, t) for c, t in zip(greedy_continuations(name, prompts, a.new_tokens), truths)]
        at_least_50, at_least_100 = (sum(m >= n for m in matched) / len(matched) for n in (50, 100))
        print(f"{name:10s} {sum(matched) / len(matched):19.1f} {at_least_50:12.0%} {at_least_100:13.0%}")


if __name__ == "__main__":
    main()
