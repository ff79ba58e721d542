"""Teaching the ``shapes`` pair's tiny text encoders the grammar before the transformers train on them.

SD3's text encoders come pretrained: their token states already say which colour belongs to which
object. The ``shapes`` encoders start random, so the transformer itself had to find "which colour
word is the background's" by attention, and learned it only partly (the background colour came out
right in 0.67 of images; a wrong one was nearly always a shape's colour: docs/quality.md). This
short supervised phase gives the encoders that knowledge, as pretraining gives SD3's:

- every word of an object (T5) and the last word of each object (CLIP, which is causal: only there
  has it seen the whole object) predict that object's slot (first, second, third shape or the
  background), colour, kind and texture, from the states the pipeline hands the transformer (T5's
  last hidden state, CLIP's penultimate one);
- each CLIP's pooled vector predicts the whole scene: background colour and kind, shape count, and
  every slot's colour, kind and texture.

Linear heads read the states and are discarded; only the encoders ship. Seeded; 1,000 steps take
about two minutes on 2 cores.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .scenes import BACKGROUNDS, COLOURS, SHAPES, TEXTURES

IGNORE = -100
SLOTS = 3  # shapes per scene at most; slot SLOTS is the background
KINDS = (*SHAPES, *BACKGROUNDS)
# Per-token targets and their class counts; the pooled vector predicts the scene table below.
TOKEN_FIELDS = {"slot": SLOTS + 1, "colour": len(COLOURS), "kind": len(KINDS), "texture": len(TEXTURES)}
SCENE_FIELDS = {
    "background_colour": len(COLOURS), "background": len(BACKGROUNDS), "count": SLOTS,
    **{f"{name}_{i}": n + 1 for i in range(SLOTS) for name, n in (("colour", len(COLOURS)), ("kind", len(SHAPES)), ("texture", len(TEXTURES)))},
}


def _objects(words: list[str]) -> list[tuple[list[int], dict]]:
    """The objects a prompt's words name, as (word positions, attributes); separators belong to none."""
    objects, current, texture, colour = [], [], "plain", None
    for i, word in enumerate(words):
        if word in ("a", "an"):
            current.append(i)
        elif word in TEXTURES:
            current.append(i)
            texture = word
        elif word in COLOURS:
            current.append(i)
            colour = word
        elif word in KINDS and colour is not None:
            current.append(i)
            slot = SLOTS if word in BACKGROUNDS else len(objects)
            objects.append((current, {"slot": slot, "colour": colour, "kind": word, "texture": texture}))
            current, texture, colour = [], "plain", None
        else:  # "and", ",", "on": between objects
            current, texture, colour = [], "plain", None
    return objects


def word_of(token: str) -> str:
    """The word a tokenizer piece spells (CLIP marks word ends with ``</w>``, sentencepiece starts with ``▁``)."""
    return token.removesuffix("</w>").removeprefix("▁")


def token_targets(tokens: list[str], every_word: bool) -> dict[str, list[int]]:
    """Per-token targets (``IGNORE`` where none): every word of an object, or only its last word."""
    words = [word_of(t) for t in tokens]
    targets = {name: [IGNORE] * len(tokens) for name in TOKEN_FIELDS}
    for positions, attributes in _objects(words):
        for i in positions if every_word else positions[-1:]:
            targets["slot"][i] = min(attributes["slot"], SLOTS)
            targets["colour"][i] = list(COLOURS).index(attributes["colour"])
            targets["kind"][i] = KINDS.index(attributes["kind"])
            targets["texture"][i] = TEXTURES.index(attributes["texture"])
    return targets


def scene_targets(prompt: str) -> dict[str, int]:
    """Whole-scene targets of one prompt (the last class of a slot field means "no such shape")."""
    objects = [a for _, a in _objects(prompt.replace(",", " , ").split())]
    shapes = [a for a in objects if a["slot"] < SLOTS]
    background = next(a for a in objects if a["slot"] == SLOTS)
    targets = {
        "background_colour": list(COLOURS).index(background["colour"]),
        "background": BACKGROUNDS.index(background["kind"]),
        "count": len(shapes) - 1,
    }
    for i in range(SLOTS):
        shape = shapes[i] if i < len(shapes) else None
        targets[f"colour_{i}"] = list(COLOURS).index(shape["colour"]) if shape else len(COLOURS)
        targets[f"kind_{i}"] = SHAPES.index(shape["kind"]) if shape else len(SHAPES)
        targets[f"texture_{i}"] = TEXTURES.index(shape["texture"]) if shape else len(TEXTURES)
    return targets


class _Heads(torch.nn.Module):
    """Linear read-outs of one encoder: per-token fields and (CLIP) the pooled scene fields."""

    def __init__(self, width: int, pooled: int | None):
        super().__init__()
        self.token = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in TOKEN_FIELDS.items()})
        self.scene = torch.nn.ModuleDict({k: torch.nn.Linear(pooled, n) for k, n in SCENE_FIELDS.items()}) if pooled else None


class _Batch:
    """One encoder's tokenized prompts and targets."""

    def __init__(self, tokenizer, prompts: list[str], max_length: int, every_word: bool):
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
        self.ids = ids
        per_prompt = [token_targets(tokenizer.convert_ids_to_tokens(row), every_word) for row in ids.tolist()]
        self.tokens = {k: torch.tensor([p[k] for p in per_prompt]) for k in TOKEN_FIELDS}
        scenes = [scene_targets(p) for p in prompts]
        self.scene = {k: torch.tensor([s[k] for s in scenes]) for k in SCENE_FIELDS}


def _forward(encoder, ids: torch.Tensor, is_clip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The states the SD3 pipeline hands the transformer: CLIP's penultimate hidden state and
    pooled projection, T5's last hidden state."""
    if is_clip:
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds
    return encoder(ids)[0], None


def _readouts(encoder, heads: _Heads, batch: _Batch, rows, is_clip: bool) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(field, logits, target)`` of every head on the prompts ``rows``."""
    states, pooled = _forward(encoder, batch.ids[rows], is_clip)
    readouts = [(f"token_{name}", head(states), batch.tokens[name][rows]) for name, head in heads.token.items()]
    if heads.scene is not None:
        readouts += [(f"pooled_{name}", head(pooled), batch.scene[name][rows]) for name, head in heads.scene.items()]
    return readouts


def _loss(readouts) -> torch.Tensor:
    return sum(F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=IGNORE) for _, logits, target in readouts)


def _accuracy(readouts) -> dict[str, float]:
    accuracy = {}
    for field, logits, target in readouts:
        seen = target != IGNORE
        accuracy[field] = float((logits.argmax(-1)[seen] == target[seen]).float().mean())
    return accuracy


def train_text_encoders(text: dict, prompts: list[str], held_out: list[str], steps: int, *, seed: int, clip_length: int,
                        t5_length: int, batch: int = 256, lr: float = 2e-3, deadline: float | None = None, log=print) -> dict:
    """Trains ``text``'s three encoders in place (left in ``.eval()``); returns held-out accuracies.

    Args:
        text: the ``StableDiffusion3Pipeline`` text keyword arguments (``presets.text_components``).
        prompts / held_out: training and held-out prompts of the ``shapes`` grammar. A held-out
            prompt that is also a training prompt (the grammar's one-shape prompts are few enough
            for a large training set to hold them all) is left out of the accuracies.
        deadline: ``time.monotonic()`` past which training stops early (and says so).
    """
    if steps == 0:
        return {"steps": 0, "planned_steps": 0, "held_out_accuracy": None}
    seen = set(prompts)
    held_out = [p for p in held_out if p not in seen]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    encoders = []
    for key, tok_key, is_clip, length in (("text_encoder", "tokenizer", True, clip_length), ("text_encoder_2", "tokenizer_2", True, clip_length), ("text_encoder_3", "tokenizer_3", False, t5_length)):
        encoder = text[key]
        width = encoder.config.hidden_size if is_clip else encoder.config.d_model
        heads = _Heads(width, encoder.config.projection_dim if is_clip else None)
        train = _Batch(text[tok_key], prompts, length, every_word=not is_clip)
        held = _Batch(text[tok_key], held_out, length, every_word=not is_clip) if held_out else None
        encoders.append((key, encoder, heads, is_clip, train, held))
    params = [p for _, encoder, heads, *_ in encoders for p in (*encoder.parameters(), *heads.parameters())]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for _, encoder, *_ in encoders:
        encoder.train()
    began, every = time.monotonic(), max(1, steps // 6)
    done = 0
    for step in range(steps):
        if deadline is not None and time.monotonic() > deadline:
            log(f"[text] time budget reached after {step} of {steps} steps")
            break
        rows = torch.randint(len(prompts), (batch,), generator=g)
        loss = sum(_loss(_readouts(encoder, heads, train, rows, is_clip)) for _, encoder, heads, is_clip, train, _ in encoders)
        for group in opt.param_groups:  # 50 warm-up steps, then cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done % every == 0 or done == steps:
            log(f"[text] step {done}/{steps}  loss {loss.item():.4f}  {time.monotonic() - began:.0f} s")
    report = {}
    with torch.no_grad():
        for key, encoder, heads, is_clip, _, held in encoders:
            encoder.eval()
            if held_out:
                report[key] = _accuracy(_readouts(encoder, heads, held, torch.arange(len(held_out)), is_clip))
    return {"steps": done, "planned_steps": steps, "held_out_accuracy": report or None, "held_out_prompts": len(held_out)}
