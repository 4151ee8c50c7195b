"""Sequence-level distillation data: a source model writes continuations of corpus records.

A cache holds a source's top-k guesses at the positions of the *corpus* text. A source's knowledge also
shows in the text it writes itself (Kim & Rush 2016, sequence-level knowledge distillation). This job
runs ONE source model over the prompts cut from a corpus split and writes each continuation as a new
corpus record, in the corpus format, with split "generated" by default. The records then go through
cache-build like any others, so every source scores the generated text too, and fuse-train takes them
with `--train-splits train,generated` while the SFT baseline keeps training on `train` alone.

    prompt       = the record's first `prompt_chars` characters, cut after a line end when possible
    continuation ~ source(. | prompt), sampled with temperature and top-p, at most `max_new_tokens`
    new record   = {"context": prompt, "text": continuation, "domain": ..., "split": "generated", "generator": {...}}

The prompt is context only: it conditions the continuation but is not trained on (it is gold train text,
already in the train split), so the generated split adds nothing but source-written text.

The job is resumable: records are appended to OUT.partial one batch at a time, a rerun continues after
the last complete batch, and OUT appears (by rename) only when every prompt is done. Each batch is
sampled from its own seed, so a resumed job writes the same records as an uninterrupted one wherever
sampling is bitwise deterministic (the same machine, thread count and dtype on CPU; not guaranteed for
bf16 on CUDA).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cache_builder.corpus import Record, window_bounds
from cache_builder.format import write_text_atomic

GENERATOR_VERSION = 1


class GenerateError(Exception):
    """A generation job that cannot start or continue; the message names the fix."""


@dataclass(frozen=True)
class GenerateSettings:
    """Everything that decides the generated records; stored in each record's "generator" field."""

    model: str
    split: str = "train"  # records of this split give the prompts
    domains: tuple[str, ...] = ()  # empty: every domain
    samples: int = 1  # continuations per prompt
    prompt_chars: int = 400
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 16
    dtype: str = "bf16"
    out_split: str = "generated"


@dataclass(frozen=True)
class Prompt:
    record_id: str  # the corpus record the prompt was cut from
    sample: int  # 0 .. samples - 1
    domain: str | None
    text: str


def cut_prompt(text: str, max_chars: int) -> str:
    """The first `max_chars` characters of `text`, ending after its last line end in the second half if any
    (the first window of `corpus.window_bounds`)."""
    return text[: window_bounds(text, max_chars)[0][1]] if text else text


def make_prompts(records: list[Record], settings: GenerateSettings) -> list[Prompt]:
    """One prompt per (selected record, sample), in corpus order; records of at most `prompt_chars`
    characters are skipped (the prompt would be the whole record, leaving nothing to continue from)."""
    prompts = []
    for record in records:
        if record.split != settings.split or (settings.domains and record.domain not in settings.domains):
            continue
        text = cut_prompt(record.text, settings.prompt_chars)
        if len(text) == len(record.text):
            continue
        prompts.extend(Prompt(record.record_id, s, record.domain, text) for s in range(settings.samples))
    return prompts


def batches(prompts: list[Prompt], batch_size: int) -> list[list[Prompt]]:
    return [prompts[i: i + batch_size] for i in range(0, len(prompts), batch_size)]


def sample_batch(model, tokenizer, prompts: list[Prompt], settings: GenerateSettings, seed: int,
                 device: torch.device) -> tuple[list[str], int]:
    """One continuation per prompt, sampled with `seed`, and the number of tokens sampled (padding after an
    end of sequence not counted). Special tokens and NUL characters (which the corpus reader refuses) are
    dropped from the text."""
    tokenizer.padding_side = "left"  # decoder-only: every prompt ends at the same column
    if tokenizer.pad_token is None:  # GPT-2 and Llama-style tokenizers have none; padding needs one
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    encoded = tokenizer([p.text for p in prompts], return_tensors="pt", padding=True).to(device)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            **encoded, do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
            max_new_tokens=settings.max_new_tokens, pad_token_id=pad_id,
        )  # (B, prompt_len + new)
    new = out[:, encoded["input_ids"].shape[1]:]  # (B, <= max_new_tokens)
    texts = [text.replace("\x00", "") for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return texts, int((new != pad_id).sum())


def generated_record(prompt: Prompt, continuation: str, settings: GenerateSettings, model_defaults: dict) -> dict:
    """A corpus record of the continuation, with everything that made it: the settings, the prompt's record,
    and the model's own generation defaults (`generation_config.json`, e.g. its end-of-sequence tokens)."""
    return {
        "context": prompt.text,
        "text": continuation,
        "domain": prompt.domain,
        "split": settings.out_split,
        "generator": {**asdict(settings), "domains": list(settings.domains), "version": GENERATOR_VERSION,
                      "prompt_record": prompt.record_id, "sample": prompt.sample,
                      "prompt_chars_used": len(prompt.text), "model_generation_config": model_defaults},
    }


def read_records(path: Path) -> list[dict]:
    """The complete JSONL records of `path`, up to the first torn line (a job killed mid-write can leave
    half a line, cut anywhere, even inside a multi-byte character)."""
    if not path.exists():
        return []
    done = []
    for line in path.read_bytes().split(b"\n"):
        try:
            done.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            break  # the line being written when the job stopped (or the empty string after the last newline)
    return done


def check_settings(path: Path, records: list[dict], settings: GenerateSettings) -> None:
    """Refuse records written with other settings than `settings`."""
    expected = {**asdict(settings), "domains": list(settings.domains), "version": GENERATOR_VERSION}
    for record in records[:1]:
        stored = {k: record["generator"].get(k) for k in expected}
        if stored != expected:
            raise GenerateError(
                f"{path} was written with other settings ({stored}); delete it, or rerun with the same settings"
            )


def generate_corpus(records: list[Record], settings: GenerateSettings, out: Path, device: torch.device) -> dict:
    """Write the continuations of `records` to `out` (JSONL); returns counts and timings."""
    from cache_builder.models import load_model, load_tokenizer

    out = Path(out)
    if out.exists():
        finished = read_records(out)
        check_settings(out, finished, settings)
        return {"records": len(finished), "generated": 0, "seconds": 0.0, "already_done": True}
    prompts = make_prompts(records, settings)
    if not prompts:
        raise GenerateError(
            f"no prompts: no record of split {settings.split!r}"
            + (f" and domains {list(settings.domains)}" if settings.domains else "")
            + f" is longer than --prompt-chars {settings.prompt_chars}"
        )
    partial = out.with_name(out.name + ".partial")
    todo = batches(prompts, settings.batch_size)
    done = read_records(partial)
    check_settings(partial, done, settings)
    if len(done) % settings.batch_size and len(done) != len(prompts):
        done = done[: len(done) - len(done) % settings.batch_size]  # keep whole batches only
    continued = [(r["generator"]["prompt_record"], r["generator"]["sample"]) for r in done]
    if continued != [(p.record_id, p.sample) for p in prompts[: len(done)]]:
        raise GenerateError(f"{partial} continues other prompts (another corpus?); delete it or pass the same corpus")
    start = -(-len(done) // settings.batch_size)  # batches done; the last one may be short
    partial.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(partial, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done))  # torn tail goes

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[settings.dtype]
    model = load_model(settings.model, dtype=dtype, device=device)
    tokenizer = load_tokenizer(settings.model)
    model_defaults = model.generation_config.to_diff_dict()
    t0, new_tokens = time.perf_counter(), 0
    with partial.open("a", encoding="utf-8") as f, tqdm(total=len(prompts), initial=len(done),
                                                       desc=f"generate {settings.model}", unit="prompt") as bar:
        for index in range(start, len(todo)):
            batch = todo[index]
            texts, sampled = sample_batch(model, tokenizer, batch, settings, settings.seed * 1_000_003 + index,
                                          device)
            for prompt, text in zip(batch, texts):
                f.write(json.dumps(generated_record(prompt, text, settings, model_defaults), ensure_ascii=False) + "\n")
            f.flush()
            new_tokens += sampled
            bar.update(len(batch))
            bar.set_postfix(tok_per_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
    partial.replace(out)
    seconds = time.perf_counter() - t0
    return {"records": len(prompts), "generated": len(prompts) - len(done), "new_tokens": new_tokens,
            "seconds": seconds, "already_done": False}

