import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from hs_runtime.schedule import euler_step, flow_match_sigmas, guide


@pytest.mark.parametrize("steps", [1, 8, 28])
def test_sigmas_match_diffusers(steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    sigmas, timesteps = flow_match_sigmas(steps, 3.0)
    assert torch.equal(sigmas, scheduler.sigmas)
    assert torch.equal(timesteps, scheduler.timesteps)


def test_euler_step_matches_diffusers():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    x, v = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    expected = scheduler.step(v, scheduler.timesteps[0], x, return_dict=False)[0]
    sigmas = scheduler.sigmas.tolist()
    assert torch.equal(euler_step(x, v, sigmas[0], sigmas[1]), expected)


def test_guidance_mixes_halves():
    pred = torch.cat([torch.zeros(1, 2), torch.ones(1, 2)])
    assert torch.equal(guide(pred, 7.0, cfg=True), torch.full((1, 2), 7.0))
    assert guide(pred, 7.0, cfg=False) is pred
