"""Where does `hybrid` lose image quality? Measurements behind docs/quality.md ("Why").

Runs the trained `shapes` pair in PyTorch with a reference sampler loop that has switches the
product does not (oracles), and prints PSNR to the `large` image for each variant:

* localization: the share of ‖v_large − v_small‖² held by the top 30% of tokens, per step;
* oracle K/V: every hybrid step gets a fresh dense large pass as context (no stale cache);
* oracle mask: every hybrid step refines the true top-r tokens of that step's disagreement;
* carry: tokens outside the mask get v_small plus the capture step's large − small offset.

    python3 scripts/diagnose_hybrid.py [--prompts 8] [--seeds 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from hs_export.presets import ensure_preset
from hs_export.quality.prompts import builtin_prompts
from hs_runtime.contract import VELOCITY, context_names, kv_names, text_context_names
from hs_runtime.graphs import build_graphs
from hs_runtime.mask import compute_mask
from hs_runtime.models import load_transformer
from hs_runtime.pipeline import TextAndVae, initial_latents
from hs_runtime.plans import MaskConfig
from hs_runtime.presets import get_preset
from hs_runtime.schedule import euler_step, flow_match_sigmas, guide
from hs_runtime.tokens import gather_tokens, patchify, position_ids, scatter_tokens, unpatchify


class _Graphs:
    """The two contract graphs called the way this diagnosis needs: dense (velocity as a latent
    and the image K/V per module) and on a token subset with cached context."""

    def __init__(self, small, large, latent):
        self.graphs, self.latent = build_graphs(small, large), latent
        # each model's own table (their sizes may differ: SD3.5-medium 384, SD3.5-large 192)
        self.positions = {role: position_ids(latent, latent, 2, model.config.pos_embed_max_size) for role, model in (("small", small), ("large", large))}

    def _run(self, role, patches, pos, embeds, pooled, t, context=None):
        graph = self.graphs[role]
        dims = graph.dims
        empty = torch.zeros(patches.shape[0], 0, dims.hidden)
        feeds = {"patches": patches, "token_pos": pos, "encoder_hidden_states": embeds, "pooled_projections": pooled, "timestep": t}
        for i in range(dims.kv_entries):
            feeds.update(zip(context_names(i), (empty, empty) if context is None else context[i]))
        for j in range(dims.text_entries):
            feeds.update(zip(text_context_names(j), (empty, empty)))
        return dict(zip(graph.spec.output_names, graph(*[feeds[n] for n in graph.spec.input_names])))

    def full(self, role, xin, embeds, pooled, t):
        pos = self.positions[role][None].expand(xin.shape[0], -1)
        out = self._run(role, patchify(xin, 2), pos, embeds, pooled, t)
        kv = [tuple(out[n] for n in kv_names(i)) for i in range(self.graphs[role].dims.kv_entries)]
        return unpatchify(out[VELOCITY], xin.shape[1], self.latent, self.latent, 2), kv

    def tokens(self, patches, pos, context, embeds, pooled, t):
        return self._run("large", patches, pos, embeds, pooled, t, context)[VELOCITY]


class Diagnosis:
    def __init__(self, prompts: int, seeds: int):
        spec = get_preset("shapes")
        paths = ensure_preset("shapes")
        self.graphs = _Graphs(load_transformer(paths.small), load_transformer(paths.large), spec.height // 8)
        self.tv = TextAndVae.from_pretrained(paths.pipeline)
        self.prompts = builtin_prompts(prompts, "shapes")
        c = self.tv.encode(self.prompts, None, True, spec.max_sequence_length)
        self.embeds = torch.cat([c.negative_prompt_embeds, c.prompt_embeds])
        self.pooled = torch.cat([c.negative_pooled_prompt_embeds, c.pooled_prompt_embeds])
        self.steps, self.scale, self.size = spec.steps, spec.guidance_scale, spec.height
        self.sigmas, self.timesteps = flow_match_sigmas(self.steps)
        self.latent = self.size // 8
        self.positions = self.graphs.positions["large"]  # the token calls run the large model
        self.seeds = list(range(seeds))
        self.reference = {s: self.decode(self.sample(self.steps, self.steps, seed=s)) for s in self.seeds}

    def velocities(self, x, i, large=True):
        """Guided v_large (+ its K/V) and v_small at step i."""
        xin, t = torch.cat([x, x]), self.timesteps[i].expand(2 * x.shape[0])
        v_small = guide(self.graphs.full("small", xin, self.embeds, self.pooled, t)[0], self.scale, True)
        if not large:
            return None, None, v_small
        v_large, kv = self.graphs.full("large", xin, self.embeds, self.pooled, t)
        return guide(v_large, self.scale, True), kv, v_small

    @torch.inference_mode()
    def sample(self, a, b, seed, ratio=0.3, carry=False, oracle_kv=False, oracle_mask=False):
        """large × a (last one captures), hybrid until b, small to the end."""
        x = initial_latents(1, self.size, self.size, seed).expand(len(self.prompts), -1, -1, -1).clone()
        mask = kv = offset = None
        for i in range(self.steps):
            sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
            if i < a:
                v, kv, v_small = self.velocities(x, i, large=True)
                if i == a - 1 and b > a:
                    mask = compute_mask(MaskConfig(ratio=ratio), x, v, v_small, sigma, 2)
                    offset = v - v_small
            elif i < b:
                if oracle_mask:
                    v_large, _, v_small = self.velocities(x, i)
                    base = v_small + offset if carry else v_small
                    v = _replace_top_tokens(base, v_large, ratio)
                else:
                    xin, t = torch.cat([x, x]), self.timesteps[i].expand(2 * x.shape[0])
                    if oracle_kv:
                        _, kv = self.graphs.full("large", xin, self.embeds, self.pooled, t)
                    _, _, v_small = self.velocities(x, i, large=False)
                    base = v_small + offset if carry else v_small
                    batch_mask = mask.for_batch(True)
                    patches = gather_tokens(patchify(x, 2), mask.complex_idx)
                    context = [tuple(gather_tokens(t, batch_mask.context_idx) for t in entry) for entry in kv]
                    v_tokens = self.graphs.tokens(torch.cat([patches, patches]), self.positions[batch_mask.complex_idx], context, self.embeds, self.pooled, t)
                    merged = scatter_tokens(patchify(base, 2), mask.complex_idx, guide(v_tokens, self.scale, True))
                    v = unpatchify(merged, x.shape[1], self.latent, self.latent, 2)
            else:
                _, _, v = self.velocities(x, i, large=False)
            x = euler_step(x, v, sigma, sigma_next)
        return x

    @torch.inference_mode()
    def localization(self, seed=0):
        """Per step along the large trajectory: top-30% share of the disagreement energy."""
        x = initial_latents(1, self.size, self.size, seed).expand(len(self.prompts), -1, -1, -1).clone()
        rows = []
        for i in range(self.steps):
            v_large, _, v_small = self.velocities(x, i)
            energy = patchify(v_large - v_small, 2).pow(2).sum(-1).sort(dim=1, descending=True).values
            k = int(0.3 * energy.shape[1])
            rows.append((i, float(self.sigmas[i]), (energy[:, :k].sum(1) / energy.sum(1)).mean().item()))
            x = euler_step(x, v_large, float(self.sigmas[i]), float(self.sigmas[i + 1]))
        return rows

    def decode(self, latents):
        from hs_export.quality.metrics import to_tensor

        return to_tensor(self.tv.decode(latents))

    def psnr(self, **kwargs) -> float:
        values = []
        for s in self.seeds:
            mse = (self.decode(self.sample(seed=s, **kwargs)) - self.reference[s]).pow(2).flatten(1).mean(1)
            values.append((10 * torch.log10(1 / mse)).mean().item())
        return sum(values) / len(values)


def _replace_top_tokens(base, v_large, ratio):
    """``base`` with its top-``ratio`` tokens by ‖v_large − base‖ taken from ``v_large``."""
    b, c, h, w = base.shape
    pb, pl = patchify(base, 2), patchify(v_large, 2)
    k = max(1, int(ratio * pb.shape[1]))
    idx = (pl - pb).norm(dim=-1).topk(k, dim=1).indices[..., None].expand(-1, -1, pb.shape[-1])
    return unpatchify(pb.scatter(1, idx, pl.gather(1, idx)), c, h, w, 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    d = Diagnosis(args.prompts, args.seeds)
    print("step  sigma  top-30% share of |v_large - v_small|^2")
    for i, sigma, share in d.localization():
        print(f"{i:4d}  {sigma:.3f}  {share:.2f}")
    a, b = round(0.25 * d.steps), round(0.5 * d.steps)
    print(f"\nPSNR to large (dB), {len(d.prompts)} prompts x {len(d.seeds)} seeds, large x{a}, hybrid until {b}, ratio 0.3")
    rows = [
        ("small only", dict(a=0, b=0)),
        (f"srdiff, large x{a}", dict(a=a, b=a)),
        (f"srdiff, large x{b}", dict(a=b, b=b)),
        ("hybrid", dict(a=a, b=b)),
        ("hybrid + oracle K/V", dict(a=a, b=b, oracle_kv=True)),
        ("hybrid + oracle mask", dict(a=a, b=b, oracle_mask=True)),
        ("hybrid + carry", dict(a=a, b=b, carry=True)),
        ("hybrid + carry + oracle K/V", dict(a=a, b=b, carry=True, oracle_kv=True)),
        ("hybrid + carry + oracle mask", dict(a=a, b=b, carry=True, oracle_mask=True)),
    ]
    for name, kwargs in rows:
        began = time.monotonic()
        print(f"{name:32s} {d.psnr(**kwargs):6.2f}   ({time.monotonic() - began:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
