"""Helpers of the sampler tests: the devices to run on, the EOS id, sampling states for a batch's rows."""

import torch

from server.engine.sampler_state import SamplingState
from server.engine.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EOS = 3


def _states(*params: SamplingParams, device: str = "cpu") -> list[SamplingState]:
    return [SamplingState(p, device=device) for p in params]
