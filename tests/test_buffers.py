"""The runtime's buffer cache (``runtime/buffers.py``): a kept buffer is handed out again only
when no tensor holds it (directly, through a view, or saved for backward), within its byte
bound; release works; concurrent callers never share a buffer; a training step computes the
same bits with and without reuse."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fqt_compiler as fqt
from fqt_compiler import zoo
from fqt_compiler.runtime import buffers

SIZE = (64, 64)   # 16 KiB of float32


@pytest.fixture(autouse=True)
def small_buffers():
    """Cache every size from 1 KiB on (so small test tensors go through it), from an empty
    cache, and restore the defaults afterwards."""
    min_bytes, max_bytes = buffers._min_bytes, buffers._max_bytes
    buffers.release_buffers()
    buffers.configure(min_bytes=1024, max_bytes=1 << 30)
    yield
    buffers.release_buffers()
    buffers.configure(min_bytes=min_bytes, max_bytes=max_bytes)


def test_a_free_buffer_is_reused_and_a_held_one_never():
    a = buffers.empty(SIZE)
    ptr = a.data_ptr()
    b = buffers.empty(SIZE)
    assert b.data_ptr() != ptr                       # a still holds its buffer
    view = a[1:].view(-1)
    del a
    c = buffers.empty(SIZE)
    assert ptr not in (b.data_ptr(), c.data_ptr())   # the view keeps it
    del view
    d = buffers.empty((SIZE[0] * SIZE[1],))          # same bytes, another shape
    assert d.data_ptr() == ptr and d.shape == (SIZE[0] * SIZE[1],) and d.is_contiguous()
    assert buffers.cache_info().kept_bytes == 3 * 64 * 64 * 4
    # another dtype of the same byte size takes it too, once d lets go
    del d
    e = buffers.empty((SIZE[0], SIZE[1] * 2), torch.int16)
    assert e.data_ptr() == ptr and e.dtype == torch.int16


def test_a_buffer_saved_for_backward_is_not_handed_out_until_backward_frees_it():
    w = torch.randn(SIZE, requires_grad=True)
    x = buffers.empty(SIZE).copy_(torch.randn(SIZE))
    ptr, want = x.data_ptr(), x.clone()
    loss = (w * x).sum()                             # autograd saves x for dL/dw
    del x
    taken = [buffers.empty(SIZE) for _ in range(3)]
    assert ptr not in [t.data_ptr() for t in taken]
    for t in taken:
        t.fill_(7)
    loss.backward()
    assert torch.equal(w.grad, want)                 # the saved x was not overwritten
    del taken
    assert buffers.empty(SIZE).data_ptr() == ptr     # the first kept, free again


def test_zeros_are_zero_in_a_reused_buffer():
    a = buffers.empty(SIZE).fill_(3)
    ptr = a.data_ptr()
    del a
    z = buffers.zeros(SIZE, torch.int32)
    assert z.data_ptr() == ptr and z.dtype == torch.int32 and not z.any()


def test_small_sizes_and_a_full_cache_allocate_plainly():
    small = buffers.empty((8,))
    assert buffers.cache_info().kept_bytes == 0 and small.shape == (8,)
    buffers.configure(max_bytes=2 * 64 * 64 * 4)
    held = [buffers.empty(SIZE) for _ in range(3)]   # the third does not fit
    assert buffers.cache_info().kept_bytes == 2 * 64 * 64 * 4
    assert len({t.data_ptr() for t in held}) == 3
    # a free buffer of another size is evicted to make room
    del held[0]
    other = buffers.empty((32, 32))
    assert buffers.cache_info().kept_bytes == 64 * 64 * 4 + 32 * 32 * 4 and other.numel() == 1024
    buffers.configure(max_bytes=0)                   # off: frees what is free, caches nothing
    assert buffers.cache_info().kept_bytes == 64 * 64 * 4 + 32 * 32 * 4   # both still in use
    del held, other
    buffers.empty(SIZE)
    assert buffers.cache_info().kept_bytes == 0


def test_release_forgets_the_buffers_and_one_in_use_stays_valid():
    a = buffers.empty(SIZE).fill_(1.5)
    ptr = a.data_ptr()
    free = buffers.empty((32, 32))
    del free
    assert buffers.release_buffers() == 64 * 64 * 4 + 32 * 32 * 4
    assert buffers.cache_info().kept_bytes == 0
    b = buffers.empty(SIZE)
    assert b.data_ptr() != ptr and torch.all(a == 1.5)
    del a                                            # freed: the cache no longer has it
    c = buffers.empty(SIZE)
    assert buffers.cache_info().kept_bytes == 2 * 64 * 64 * 4 and c.data_ptr() != b.data_ptr()


def test_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="max_bytes=-1"):
        buffers.configure(max_bytes=-1)
    with pytest.raises(ValueError, match="min_bytes='1M'"):
        buffers.configure(min_bytes="1M")


def test_concurrent_callers_never_share_a_buffer():
    threads, rounds = 4, 50
    barrier = threading.Barrier(threads)
    errors = []

    def work(i):
        for r in range(rounds):
            t = buffers.empty(SIZE).fill_(i)
            barrier.wait()                           # every thread holds one buffer now
            if not torch.all(t == i):
                errors.append((i, r))
            barrier.wait()
            del t

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors
    assert buffers.cache_info().kept_bytes <= threads * 64 * 64 * 4 * 2


def _net():
    torch.manual_seed(0)
    r = zoo.resnet_small(width=0.5)
    return nn.Sequential(r.stem, r.layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.25),
                         nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10))


def _train(steps):
    model = _net()
    compiled = fqt.compile(model, fqt.Config(seed=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out, info = [], []
    for s in range(steps):
        gen = torch.Generator().manual_seed(s)   # another batch each step: stale data would show
        x, y = torch.randn(3, 1, 15, 15, generator=gen), torch.randint(0, 10, (3,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        out.append([loss.detach().clone()] + [p.grad.clone() for p in model.parameters()])
        opt.step()
        info.append(buffers.cache_info())
    return out, info


def test_a_training_step_is_bit_identical_with_and_without_reuse():
    with_cache, info = _train(3)
    assert info[0].kept_bytes > 0 and info[2].hits - info[1].hits > info[2].misses - info[1].misses
    buffers.configure(max_bytes=0)
    before = buffers.cache_info()
    without, info = _train(3)
    assert info[-1].hits == before.hits and info[-1].kept_bytes <= before.kept_bytes   # no reuse
    for step_a, step_b in zip(with_cache, without):
        for a, b in zip(step_a, step_b):
            assert torch.equal(a, b)


def test_contiguous_copies_into_a_reused_buffer():
    t = torch.randn(16, 8, 32).permute(2, 0, 1)
    c = buffers.contiguous(t)
    assert c.is_contiguous() and torch.equal(c, t) and buffers.cache_info().kept_bytes == t.numel() * 4
    assert buffers.contiguous(c) is c
