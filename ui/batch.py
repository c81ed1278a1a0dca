"""Batches from the Generate form: N variations of one prompt (seeds s, s+1, …) and a prompt list (one per line),
each becoming a job of its own. Pure: no Gradio, no store."""

from __future__ import annotations

import dataclasses
import random

from ui.generate_form import FormValues, parse_seed
from wan_local.engine.request import MAX_SEED
from wan_local.errors import InputError

#: The most jobs one click may queue (a typo such as 1000 variations should not flood the queue).
MAX_BATCH = 100


def batch_prompts(text: str | None) -> list[str]:
    """The non-empty lines of a prompt list, stripped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def batch_forms(form: FormValues, variations: object = 1, prompt_list: str | None = None) -> list[FormValues]:
    """The forms of the jobs one click queues: for each prompt (the list's lines, else the form's prompt) the
    variations with seeds s, s+1, … s+N-1. One seed s serves the whole batch, so each prompt of a list is tried
    with the same seeds; a random seed draws s once. A single job keeps the form as it is (a random seed stays
    random: the store draws it)."""
    try:
        count = int(float(variations if variations not in (None, "") else 1))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"variations {variations!r} is not a whole number") from None
    if count < 1:
        raise InputError(f"variations {count} must be at least 1")
    prompts = batch_prompts(prompt_list) or [form.prompt]
    total = count * len(prompts)
    if total > MAX_BATCH:
        raise InputError(f"{len(prompts)} prompt(s) × {count} variation(s) = {total} jobs; at most {MAX_BATCH} at once")
    if total == 1:
        return [dataclasses.replace(form, prompt=prompts[0])]
    seed = parse_seed(form.seed)
    if seed < 0:
        seed = random.randint(0, MAX_SEED - count + 1)
    if seed + count - 1 > MAX_SEED:
        raise InputError(f"seed {seed} + {count - 1} is past the largest seed {MAX_SEED}; pick a smaller seed")
    return [dataclasses.replace(form, prompt=p, seed=str(seed + i)) for p in prompts for i in range(count)]
