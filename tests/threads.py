"""One intra-op torch thread for a test's own computations while workers (Ray actors, engine threads)
keep the machine's cores busy: two intra-op threads on two busy cores run many times slower."""
import contextlib


@contextlib.contextmanager
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
