"""GraphCache: replayed CUDA graphs give what the function gives, call after call."""

import pytest
import torch

from stm_live.engines.cuda_graphs import GraphCache


def scaled_sums(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (x * w).sum(1), torch.where(x > 0, x, torch.nan)


def test_off_cuda_the_function_simply_runs():
    cache = GraphCache(scaled_sums)
    x, w = torch.randn(3, 5), torch.randn(5)
    got = cache(x, w)
    assert torch.equal(got[0], scaled_sums(x, w)[0]) and len(cache) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_replays_follow_new_inputs_and_hand_out_copies():
    cache = GraphCache(scaled_sums)
    w = torch.randn(5, device="cuda")
    first_x = torch.randn(3, 5, device="cuda")
    first = cache(first_x, w)
    for _ in range(3):
        x = torch.randn(3, 5, device="cuda")
        got, want = cache(x, w), scaled_sums(x, w)
        assert torch.allclose(got[0], want[0]) and torch.equal(got[1].isnan(), want[1].isnan())
    assert torch.allclose(first[0], scaled_sums(first_x, w)[0]), "an earlier result is not overwritten by replays"
    assert len(cache) == 1, "one capture per input signature"
    cache(torch.randn(4, 5, device="cuda"), w)
    assert len(cache) == 2
