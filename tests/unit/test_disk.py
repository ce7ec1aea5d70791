"""The disk tier: round trips (O_DIRECT and through the page cache), I/O order on its thread,
write errors, slot reuse and freeing, refused directories, ChunkStore and saved tensors on disk."""

import errno
import gc
import os

import pytest
import torch

from fpdt_ext.memory import disk
from fpdt_ext.memory.disk import MAX_QUEUED_WRITES, PAGE, DiskTier, check_offload_dir
from fpdt_ext.memory.offload import ChunkStore, MemoryTiers, Residency
from fpdt_ext.memory.saved import SavedTensorsToHost
from tests.disk_dir import disk_scratch_dir


@pytest.fixture(params=["direct", "page-cache"])
def tier(request):
    direct = request.param == "direct"
    try:
        return DiskTier(disk_scratch_dir(), direct=direct)
    except ValueError as e:
        if direct and "O_DIRECT" in str(e):
            pytest.skip(f"the scratch directory's filesystem refuses O_DIRECT: {e}")
        raise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool])
def test_round_trip_is_exact(tier, dtype):
    src = (torch.randn(3, 5, 7) * 100).to(dtype)
    slot = tier.write(src)
    got = tier.read(slot)
    assert got.dtype == dtype and got.shape == src.shape and torch.equal(got, src)
    assert got.data_ptr() != src.data_ptr()


def test_non_contiguous_input_and_slot_overwrite(tier):
    src = torch.randn(6, 4).t()  # non-contiguous
    slot = tier.write(src)
    assert torch.equal(tier.read(slot), src)
    again = tier.write(src * 2, slot)
    assert again is slot and torch.equal(tier.read(slot), src * 2)
    with pytest.raises(ValueError, match="cannot take"):
        tier.write(torch.randn(5, 4), slot)


def test_io_runs_in_the_order_asked_and_the_caller_may_reuse_its_tensor(tier):
    first = torch.randn(4096)
    slot = tier.write(first)
    expected = first.clone()
    first.fill_(7.0)  # write() staged its own copy: changing the tensor now changes nothing stored
    pending = tier.read_async(slot)  # queued before the overwrite below: sees the first contents
    tier.write(torch.full((4096,), 3.0), slot)
    assert torch.equal(pending.wait(), expected)
    assert torch.equal(tier.read(slot), torch.full((4096,), 3.0))


def test_many_queued_writes_round_trip_and_the_queue_is_bounded(tier):
    tensors = [torch.randn(257 * i + 1) for i in range(40)]
    slots = []
    for t in tensors:
        slots.append(tier.write(t))
        assert len(tier._writes) <= MAX_QUEUED_WRITES
    readings = [tier.read_async(s) for s in slots]
    assert all(torch.equal(r.wait(), t) for r, t in zip(readings, tensors))


def test_a_failed_write_is_raised_with_what_to_do(tier, monkeypatch):
    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    slot = tier.write(torch.randn(100))
    tier.flush()
    monkeypatch.setattr(disk.os, "pwrite", full_disk)
    with pytest.raises(OSError, match="free space there or give another --offload-dir"):
        tier.write(torch.randn(100), slot)  # queued; fails on the I/O thread
        tier.flush()
    with pytest.raises(OSError, match="No space left"):
        tier.write(torch.randn(100), slot)
        tier.read(slot)  # the next call after a failed write raises it (the write's own check, or this read)


def test_slots_are_page_aligned_recycled_and_freed_when_collected(tier):
    a = tier.write(torch.randn(1000))  # 4000 bytes -> one page
    b = tier.write(torch.randn(3000))  # 12000 bytes -> three pages
    assert a.offset % PAGE == 0 and b.offset % PAGE == 0
    assert tier.bytes_in_use == 4 * PAGE and tier.file_bytes() == 4 * PAGE
    offset = b.offset
    b.free()
    b.free()  # idempotent
    assert tier.bytes_in_use == PAGE
    c = tier.write(torch.randn(2900))  # same capacity: the freed slot again, the file does not grow
    assert c.offset == offset and tier.file_bytes() == 4 * PAGE
    del a, c
    gc.collect()
    assert tier.bytes_in_use == 0, "a slot that is no longer referenced gives its bytes back"
    assert tier.peak_bytes_in_use == 4 * PAGE
    assert tier.bytes_written == 4000 + 12000 + 11600


def test_the_file_is_unnamed(tier):
    tier.write(torch.randn(100))
    assert not any(name.startswith("fpdt-offload") for name in os.listdir(tier.directory)), \
        "the offload file must not outlive the process"


def test_refuses_directories_that_cannot_hold_it(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_offload_dir(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="does not exist"):
        check_offload_dir(str(tmp_path / "file"))
    if os.path.isdir("/dev/shm"):
        with pytest.raises(ValueError, match="is RAM"):
            check_offload_dir("/dev/shm")


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_store_on_disk_round_trips_overwrites_and_poisons(device):
    tiers = MemoryTiers(disk_scratch_dir())
    tier = tiers.disk
    before = tier.bytes_in_use
    store = ChunkStore("kv", torch.device(device), offload=True, residency=Residency(), tiers=tiers)
    chunks = {i: (torch.randn(4, 5, device=device), torch.randn(3, device=device).to(torch.bfloat16))
              for i in range(3)}
    for i, tensors in chunks.items():
        store.put(i, tensors)
        store.release(i)
    assert store.stored_tensors() == [], "disk slots stay in the store, not in autograd's saved tensors"
    assert tier.bytes_in_use - before == 6 * PAGE
    for i, tensors in chunks.items():
        got = store.get(i)
        assert all(g.device.type == device and torch.equal(g, t) for g, t in zip(got, tensors))
        store.release(i)
    acc = store.get(0)[0]
    store.put(0, (acc + 1, chunks[0][1]))  # an accumulator written back: same slots
    store.release(0)
    assert tier.bytes_in_use - before == 6 * PAGE
    assert torch.equal(store.get(0)[0], chunks[0][0] + 1)
    fetched = store.get(0)[0]
    store.release(0)
    if device == "cpu":
        assert torch.isnan(fetched).all(), "a use after release must not silently see valid data"
    assert store.residency.current["kv"] == 0
    store.prefetch(1)  # a read in flight, never used: released and popped cleanly
    store.release(1)
    store.prefetch(2)
    store.pop(2)
    assert store.residency.current["kv"] == 0
    store.close()
    assert tier.bytes_in_use == before


@pytest.mark.parametrize("device", DEVICES)
def test_saved_tensors_go_to_disk_and_come_back_exactly(device):
    tiers = MemoryTiers(disk_scratch_dir())
    tier = tiers.disk
    before = tier.bytes_in_use
    x = torch.randn(256, 128, device=device, requires_grad=True)  # 128 KiB: over the 64 KiB threshold
    w = torch.nn.Parameter(torch.randn(128, 128, device=device))
    with SavedTensorsToHost(tiers):
        y = torch.tanh(x) @ w  # tanh saves its output, matmul its input; w is a parameter: not moved
    assert tier.bytes_in_use - before == 2 * 128 * PAGE // 4, "tanh's output and matmul's input on disk"
    y.sum().backward()
    reference_x = x.detach().clone().requires_grad_()
    (torch.tanh(reference_x) @ w).sum().backward()
    assert torch.equal(x.grad, reference_x.grad)
    del y
    gc.collect()
    assert tier.bytes_in_use == before, "the slots are freed with the graph"
