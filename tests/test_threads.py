"""deluceva.threads: small work between network runs is single-threaded, and the thread count comes back."""

import pytest
import torch

from deluceva.threads import single_threaded


def test_single_threaded_restores_the_thread_count_also_after_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), single_threaded():
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
