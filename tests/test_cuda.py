"""The CUDA backend where a GPU exists: host sources, staging, CUDA graphs, streams,
and reloads of a model on the device. (Dtype pairs, alignments, layouts and 100k
tensors run on CUDA in test_ops.py, over testing.DEVICES.)"""

import pytest
import torch
from torch import nn

import fastreload
from fastreload import ops
from testing import DEVICES, assert_same_copy

pytestmark = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA build")


def expected_copies(dsts, srcs):
    return [torch.empty_like(d).copy_(s) for d, s in zip(dsts, srcs)]


def assert_copied(dsts, expected):
    torch.cuda.synchronize()
    for d, e in zip(dsts, expected):
        assert_same_copy(d, e, converted=True)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.float8_e4m3fn)])
def test_device_pageable_and_pinned_sources_in_one_call(dtypes):
    src_dtype, dst_dtype = dtypes
    shapes = [(i % 13 + 1, 37) for i in range(3000)]
    srcs = []
    for i, shape in enumerate(shapes):
        s = torch.randn(shape).to(src_dtype)
        srcs.append([s.cuda(), s, s.pin_memory()][i % 3])
    dsts = [torch.zeros(shape, dtype=dst_dtype, device="cuda") for shape in shapes]
    expected = expected_copies(dsts, srcs)
    ops.batched_copy_(dsts, srcs)
    assert_copied(dsts, expected)


def test_bound_copy_from_device_pageable_and_pinned_sources():
    shapes = [(i % 7 + 1, 29) for i in range(2000)]
    dsts = [torch.zeros(shape, dtype=torch.bfloat16, device="cuda") for shape in shapes]
    pointers = [d.data_ptr() for d in dsts]
    bound = ops.BoundCopy(dsts, [700, 2000])
    for round_ in range(3):
        srcs = []
        for i, shape in enumerate(shapes):
            s = torch.randn(shape) + round_
            srcs.append([s.cuda(), s, s.pin_memory()][(i + round_) % 3])
        expected = expected_copies(dsts, srcs)
        assert bound(tuple(srcs)) is None
        assert_copied(dsts, expected)
    assert [d.data_ptr() for d in dsts] == pointers


def test_pageable_sources_larger_than_one_staging_bucket():
    # 80 MiB of pageable sources: more than one 64 MiB pinned bucket, and one source
    # larger than a bucket by itself.
    srcs = [torch.randn(1 << 20) for _ in range(4)] + [torch.randn(17 << 20), torch.randn(3)]
    dsts = [torch.empty_like(s, device="cuda") for s in srcs]
    ops.batched_copy_(dsts, srcs)
    assert_copied(dsts, srcs)


def test_many_buckets_take_turns_in_two_pinned_buffers():
    # Twelve buckets of one 40 MiB source each: every pinned buffer is packed again
    # while the copies of earlier buckets are queued, so a bucket packed over one
    # still being sent would show here as another source's values.
    srcs = [torch.full((10 << 20,), float(i)) for i in range(12)]
    dsts = [torch.empty_like(s, device="cuda") for s in srcs]
    ops.batched_copy_(dsts, srcs)
    assert_copied(dsts, srcs)


def test_running_out_of_memory_before_the_first_launch_writes_nothing():
    direct = (torch.zeros(1 << 10, device="cuda"), torch.ones(1 << 10, device="cuda"))
    pageable = (torch.zeros(8 << 20, device="cuda"), torch.ones(8 << 20))  # 32 MiB to stage
    strided = (torch.zeros(64, 48, device="cuda"), torch.ones(48, 64).t())
    dsts, srcs = zip(direct, pageable, strided)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    # Room for the tables, not for the staging buffer.
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (4 << 20)) / total)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            ops.batched_copy_(list(dsts), list(srcs))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.synchronize()
    assert not any(d.any() for d in dsts)
    ops.batched_copy_(list(dsts), list(srcs))  # with the memory back, the same batch copies
    assert_copied(list(dsts), expected_copies(dsts, srcs))


def test_strided_pairs_fall_back_beside_fused_ones():
    base = torch.randn(64, 48, device="cuda")
    dsts = [torch.zeros(48, 64, device="cuda"), torch.zeros(300, device="cuda", dtype=torch.bfloat16)]
    srcs = [base.t(), torch.randn(600)[::2]]
    expected = expected_copies(dsts, srcs)
    ops.batched_copy_(dsts, srcs)
    assert_copied(dsts, expected)


def test_copy_runs_on_the_current_stream():
    side = torch.cuda.Stream()
    dsts = [torch.zeros(1 << 16, device="cuda") for _ in range(8)]
    with torch.cuda.stream(side):
        srcs = [torch.full((1 << 16,), float(i), device="cuda") for i in range(8)]
        ops.batched_copy_(dsts, srcs)
        done = torch.cuda.Event()
        done.record(side)
    done.synchronize()
    for i, d in enumerate(dsts):
        assert torch.equal(d, torch.full_like(d, float(i)))


def test_replayable_copy_is_captured_and_replayed():
    dsts = [torch.zeros(1000 + i, device="cuda", dtype=torch.bfloat16) for i in range(500)]
    staging = [torch.zeros(1000 + i, device="cuda") for i in range(500)]
    pinned = torch.zeros(777).pin_memory()
    dsts.append(torch.zeros(777, device="cuda"))
    staging.append(pinned)
    pointers = [d.data_ptr() for d in dsts]

    copy = ops.ReplayableCopy(dsts, staging)
    copy()  # warm up outside the capture, as torch.cuda.graph expects
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        copy()
    for step in range(3):
        for s in staging:
            s.fill_(step + 0.5)
        graph.replay()
        torch.cuda.synchronize()
        for d in dsts:
            assert torch.equal(d.float(), torch.full_like(d.float(), step + 0.5))
    assert [d.data_ptr() for d in dsts] == pointers


def test_plain_batched_copy_refuses_capture_with_a_clear_error():
    dst, src = torch.zeros(8, device="cuda"), torch.ones(8, device="cuda")
    ops.batched_copy_([dst], [src])
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="batched_copy_table"):
        with torch.cuda.graph(graph):
            ops.batched_copy_([dst], [src])


def test_table_for_other_tensors_is_refused():
    dst, src = torch.zeros(8, device="cuda"), torch.ones(8, device="cuda")
    host, device = ops.batched_copy_table([dst], [src])
    other = torch.ones(8, device="cuda")
    with pytest.raises(RuntimeError, match="built for other tensors"):
        ops.batched_copy_with_table_([dst], [other], host, device)
    assert torch.equal(dst, torch.zeros(8, device="cuda"))


def test_table_refuses_pageable_sources():
    with pytest.raises(RuntimeError, match="pinned"):
        ops.batched_copy_table([torch.zeros(8, device="cuda")], [torch.ones(8)])


def test_refused_batch_writes_nothing_on_the_device():
    dsts = [torch.zeros(16, device="cuda"), torch.zeros(4, device="cuda")]
    with pytest.raises(RuntimeError, match="pair 1"):
        ops.batched_copy_(dsts, [torch.ones(16, device="cuda"), torch.ones(5)])
    torch.cuda.synchronize()
    assert not dsts[0].any()


@pytest.mark.parametrize("source_device", ["cuda", "cpu", "pinned"])
def test_reload_a_model_on_the_device(source_device):
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).cuda().bfloat16()
    model[0].register_buffer("w_view", model[0].weight.view(-1), persistent=False)
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    source = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    if source_device == "cuda":
        source = {k: v.cuda() for k, v in source.items()}
    elif source_device == "pinned":
        source = {k: v.pin_memory() for k, v in source.items()}
    report = fastreload.reload_layerwise(model, source)
    torch.cuda.synchronize()
    for k, v in model.state_dict().items():
        assert v.data_ptr() == pointers[k]
        assert torch.equal(v.cpu(), source[k].cpu().to(v.dtype)), k
    assert torch.equal(model[0].w_view, model[0].weight.view(-1))
    assert report.skipped["alias"] == ("0.w_view",)


def test_opcheck_batched_copy_on_the_device():
    dsts = [torch.zeros(5, 3, device="cuda", dtype=torch.bfloat16), torch.zeros(7, device="cuda")]
    srcs = [torch.randn(5, 3, device="cuda"), torch.randn(7)]
    torch.library.opcheck(torch.ops.fastreload.batched_copy_.default, (dsts, srcs))


class Fp8Linear(nn.Linear):
    def process_weights_after_loading(self):
        w = self.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-6) / 448
        self.weight = nn.Parameter((w / scale[:, None]).to(torch.float8_e4m3fn), requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)


def _fp8_model(source):
    model = nn.Sequential(*(Fp8Linear(64, 64) for _ in range(3)), nn.LayerNorm(64)).cuda().bfloat16()
    fastreload.record(model)
    model.load_state_dict(source)
    for m in model[:3]:
        m.process_weights_after_loading()
    return model


@pytest.mark.parametrize("source_device", ["cuda", "cpu"])
def test_replay_on_the_device(source_device):
    first = {k: torch.randn(v.shape) for k, v in nn.Sequential(*(nn.Linear(64, 64) for _ in range(3)),
                                                               nn.LayerNorm(64)).state_dict().items()}
    new = {k: torch.randn_like(v).to(source_device) for k, v in first.items()}
    model = _fp8_model(first)
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    report = fastreload.reload_layerwise(model, new)
    torch.cuda.synchronize()
    assert sorted(report.replayed) == ["0", "1", "2"]
    expected = _fp8_model({k: v.cuda() for k, v in new.items()}).state_dict()
    for k, v in model.state_dict().items():
        assert v.data_ptr() == pointers[k], k
        assert torch.equal(v.float(), expected[k].float()), k
