"""Helpers shared by the evaluation tests (bound, figures, metrics, `ddpm evaluate`)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: a second intra-op thread only adds contention for these small networks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class InceptionLike(torch.nn.Module):
    """The calling convention of NVIDIA's TorchScript Inception (`return_features`, `no_output_bias`), on the
    mean of each 2x2 quarter of the image: a stand-in whose file can be scripted and saved in a test."""

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        assert x.shape[1] == 3
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)
        if return_features:
            return pooled
        return torch.softmax(pooled * 10.0, dim=1)
