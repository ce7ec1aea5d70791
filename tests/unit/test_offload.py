"""Host offload: round trips, separate host copies, use-after-release, residency, pool reuse.

The same tests run on CUDA (pinned pool, side stream, events) when a GPU is present.
"""

import pytest
import torch

from fpdt_ext.memory.offload import ChunkStore, HostBufferPool, MemoryTiers, Residency

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def _store(device, offload=True, tiers=None):
    return ChunkStore("kv", torch.device(device), offload=offload, residency=Residency(), tiers=tiers)


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_through_host(device):
    store = _store(device)
    chunks = {i: (torch.randn(4, 5, device=device), torch.randn(3, device=device, dtype=torch.bfloat16))
              for i in range(3)}
    for i, tensors in chunks.items():
        store.put(i, tensors)
        store.release(i)
    for host in store.stored_tensors():
        assert host.device.type == "cpu"
        assert host.is_pinned() == (device == "cuda")
    store.prefetch(0)
    for i, tensors in chunks.items():
        got = store.get(i)
        if i + 1 < len(chunks):
            store.prefetch(i + 1)
        assert all(g.device.type == torch.device(device).type for g in got)
        assert all(torch.equal(g, t) for g, t in zip(got, tensors))
        store.release(i)
    assert store.residency.current["kv"] == 0
    assert store.residency.peak["kv"] <= 2


@pytest.mark.parametrize("device", DEVICES)
def test_host_copy_is_separate_and_put_again_overwrites(device):
    store = _store(device)
    acc = torch.zeros(6, device=device)
    store.put(0, (acc,))
    store.release(0)
    del acc  # the caller may drop what it put: the copy to host holds on to it (record_stream on CUDA)
    fetched = store.get(0)[0]
    assert torch.equal(fetched, torch.zeros(6, device=device))
    fetched += 2  # the fetched copy is the caller's to change ...
    store.put(0, (fetched,))  # ... and put again
    store.release(0)
    assert torch.equal(store.get(0)[0], torch.full((6,), 2.0, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_writing_a_tensor_after_put_is_refused(device):
    """put hands the tensor over: on CUDA its copy to host may still be in flight, so a write
    after put is a race; it is caught at release on every device."""
    store = _store(device)
    acc = torch.zeros(6, device=device)
    store.put(0, (acc,))
    acc += 1
    with pytest.raises(RuntimeError, match="written after it was put"):
        store.release(0)


def test_released_fetch_is_poisoned_on_cpu():
    store = _store("cpu")
    store.put(0, (torch.ones(4),))
    store.release(0)
    fetched = store.get(0)[0]
    store.release(0)
    assert torch.isnan(fetched).all(), "a use after release must not silently see valid data"


def test_without_offload_chunks_stay_resident_and_are_not_copied():
    store = _store("cpu", offload=False)
    x = torch.randn(3)
    store.put(0, (x,))
    store.release(0)
    assert store.get(0)[0] is x
    assert store.residency.current["kv"] == 1
    store.pop(0)
    assert store.residency.current["kv"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_pool_reuses_buffers_across_calls(device):
    tiers = MemoryTiers()  # one model's: shared by its stores, across layers and iterations
    pool = tiers.pool(torch.device(device))
    before = pool.num_allocated
    for _ in range(3):  # three "iterations" of the same shapes
        store = _store(device, tiers=tiers)
        for i in range(4):
            store.put(i, (torch.randn(8, 2, device=device),))
            store.release(i)
        store.close()
    assert pool.num_allocated - before == 4, "buffers must be recycled, not allocated per chunk"
    assert pool.num_free() >= 4


def test_pool_acquire_release_exact_size():
    pool = HostBufferPool(pin=False)
    a = pool.acquire((4, 4), torch.float32)
    ptr = a.data_ptr()
    pool.release(a)
    assert pool.acquire((2, 8), torch.float32).data_ptr() == ptr  # same numel and dtype
    assert pool.acquire((4, 4), torch.float32).data_ptr() != ptr  # in use now
    assert pool.num_allocated == 2


def test_restore_swaps_in_autograd_tensors():
    store = _store("cpu")
    store.put(0, (torch.ones(2), torch.zeros(2)))
    store.release(0)
    stored = store.stored_tensors()
    store.restore([t.clone() + 5 for t in stored])
    assert torch.equal(store.get(0)[0], torch.full((2,), 6.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetch_overlaps_compute_and_stays_correct():
    """Fetches run on the side stream while the compute stream is busy; results stay exact."""
    store = _store("cuda")
    chunks = [torch.randn(1 << 20, device="cuda") for _ in range(4)]
    for i, c in enumerate(chunks):
        store.put(i, (c,))
        store.release(i)
    big = torch.randn(4096, 4096, device="cuda")
    store.prefetch(0)
    for i, c in enumerate(chunks):
        (got,) = store.get(i)
        if i + 1 < len(chunks):
            store.prefetch(i + 1)
        big = big @ big / 64  # keep the compute stream busy
        assert torch.equal(got, c)
        store.release(i)
    torch.cuda.synchronize()  # test only
