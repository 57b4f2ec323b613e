"""The ops of fastreload.ops as users call them: storage addresses and aliasing, and
batched_copy_, which must leave every destination as Tensor.copy_ would, or refuse the
whole batch without writing a byte."""

import itertools
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch.library import opcheck

from fastreload import ops
from fastreload.ops import PairProblem
from testing import DEVICES, DTYPE_PAIRS, DTYPES, FLOAT_DTYPES, assert_same_copy, bits, random_values

ROOT = Path(__file__).resolve().parents[1]
ODD_SIZES = [1, 3, 7, 15, 17, 4095, 262145]
# Byte (or element) offsets: every position in a 16-byte word, the widest the copy uses.
OFFSETS = list(range(16))
# Few enough pairs that one batch of every offset combination stays quick.
ALIGNMENT_SIZES = [1, 3, 7, 15, 17, 4095]
# A representative subset for tests whose subject is layout, not conversion.
LAYOUT_DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float8_e4m3fn),
    (torch.float8_e5m2, torch.float64),
    (torch.int64, torch.int64),
    (torch.bool, torch.bool),
    (torch.complex64, torch.complex64),
]


def pair_id(pair):
    return f"{str(pair[0]).removeprefix('torch.')}->{str(pair[1]).removeprefix('torch.')}"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def check_batched_copy(targets, srcs, copy=ops.batched_copy_):
    """targets[i] = (buffer, view_of): view_of(buffer) is destination i. Runs one
    batched_copy_ (or `copy`, called like it) and checks each buffer ends as per-pair copy_ leaves a clone of it:
    every destination holds its source (converted) and no other byte changed."""
    buffers = {id(b): b for b, _ in targets}
    expected = {k: b.clone() for k, b in buffers.items()}
    covered = {k: torch.zeros_like(bits(b)) for k, b in buffers.items()}
    for (buf, view_of), src in zip(targets, srcs):
        view_of(expected[id(buf)]).copy_(src)
        bits(view_of(covered[id(buf)])).fill_(-1)
    dsts = [view_of(buf) for buf, view_of in targets]

    copy(dsts, srcs)

    for i, ((buf, view_of), dst, src) in enumerate(zip(targets, dsts, srcs)):
        try:
            assert_same_copy(dst, view_of(expected[id(buf)]), converted=src.dtype != dst.dtype)
        except AssertionError as e:
            where = f"pair {i} ({src.dtype} {tuple(src.shape)} -> {dst.dtype})"
            raise AssertionError(f"{where}: {e}") from None
    for k, buf in buffers.items():
        outside = covered[k] == 0
        assert torch.equal(bits(buf)[outside], bits(expected[k])[outside]), \
            "bytes outside the destinations changed"


def whole(buf):
    """view_of for a destination that is its whole buffer."""
    return buf


def dense_pairs(src_dtype, dst_dtype, shapes, device, seed=0):
    """One fresh (destination buffer, source) per shape, both holding random bits."""
    g = gen(seed)
    targets = [(random_values(s, dst_dtype, g, device), whole) for s in shapes]
    srcs = [random_values(s, src_dtype, g, device) for s in shapes]
    return targets, srcs


def special_values(dtype):
    """The values conversions get wrong: signed zeros, infinities, NaN, the subnormals and
    largest finite values of every format and the numbers just past them (fp8 e4m3fn has
    no infinity: overflow gives NaN), and ties that must round to even."""
    magnitudes = [
        0.0, math.inf, math.nan, 1.0,
        2.0**-1074, 2.0**-1022 / 3, 2.0**-149, 2.0**-126 * 0.75, 2.0**-133, 2.0**-24, 2.0**-15,
        2.0**-9, 2.0**-10, 2.0**-16, 2.0**-17,  # (near) the smallest subnormals, per format
        448.0, 449.0, 464.0, 465.0, 480.0, 57344.0, 61439.0, 61440.0, 65504.0, 65519.0, 65520.0,
        3.3895313892515355e38, 3.4028234663852886e38, 3.5e38, 1e300,  # around each maximum
        1 + 2.0**-4, 1 + 3 * 2.0**-4, 1 + 2.0**-3, 1 + 2.0**-8, 1 + 3 * 2.0**-8,
        1 + 2.0**-11, 1 + 2.0**-24, 1 + 3 * 2.0**-24,  # halfway between neighbours
        # Just past halfway in float64 but exactly halfway once rounded to float32, which
        # copy_ converts float64 through on its way to the narrower formats.
        1 + 2.0**-4 + 2.0**-40, 1 + 2.0**-8 + 2.0**-40, 1 + 2.0**-11 + 2.0**-40,
    ]
    values = torch.tensor(magnitudes + [-m for m in magnitudes], dtype=torch.float64)
    return values.to(dtype)


# ----------------------------------------------------------------------------------------
# opcheck


def _storage_samples():
    x = torch.randn(4, 6)
    return [
        ([x],),
        ([x, x[1:], x.t(), x[:, ::2], torch.empty(0), torch.zeros(3, dtype=torch.float16)],),
        ([torch.ones(()), torch.arange(5, dtype=torch.int64), x.view(torch.int32)],),
    ]


def _alias_samples():
    x, y = torch.randn(4, 6), torch.randn(3)
    return [
        ([x[1:], y, torch.randn(2)], [x]),
        ([x, torch.empty(0)], [torch.empty(0), y]),
        ([x.t(), x[:, 1::2], y[:1]], [x, y]),
    ]


def _check_samples():
    x = torch.randn(4, 6)
    return [
        ([torch.empty(4, 6), torch.empty(3, dtype=torch.bfloat16)], [x, torch.randn(3)]),
        ([torch.empty(2), torch.empty(5, dtype=torch.int32)], [torch.empty(3), torch.empty(5)]),
        ([x[:2], x[1:3], x[3]], [torch.empty(2, 6), torch.empty(2, 6), x[2]]),
        ([x[:, 0::2], x[:, 1::2]], [torch.randn(4, 3), torch.randn(4, 3)]),
    ]


def _copy_samples():
    x = torch.randn(4, 6)
    return [
        ([torch.empty(4, 6)], [x]),
        ([torch.empty(4, 6, dtype=torch.bfloat16), torch.empty(5, dtype=torch.float8_e4m3fn),
          torch.empty(0, 3)], [x, torch.randn(5, dtype=torch.float16), torch.empty(0, 3)]),
        ([torch.empty(6, 4).t(), torch.empty(4, 6)[:, ::2], torch.empty(3, 5, dtype=torch.float64)],
         [x, x[:, 1::2], torch.randn(1, 5).expand(3, 5)]),
        ([torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
          torch.empty(7, dtype=torch.int64)],
         [torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), torch.arange(7)]),
    ]


# Results of these ops are addresses or depend on which inputs share bytes: test_schema,
# test_autograd_registration and test_faketensor (shapes, dtypes and devices of the fake
# result) apply. test_aot_dispatch_dynamic compares eager results with those of a traced
# graph that runs on other allocations: for storage_ptrs the addresses then differ by
# design, and for the other two it would test AOTAutograd's reconstruction of aliasing
# between inputs, not the op.
ADDRESS_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("op, samples", [
    (torch.ops.fastreload.storage_ptrs.default, _storage_samples),
    (torch.ops.fastreload.storage_alias_mask.default, _alias_samples),
    (torch.ops.fastreload.batched_copy_check.default, _check_samples),
], ids=["storage_ptrs", "storage_alias_mask", "batched_copy_check"])
def test_opcheck_address_ops(op, samples):
    for args in samples():
        opcheck(op, args, test_utils=ADDRESS_CHECKS)


def test_opcheck_batched_copy():
    for args in _copy_samples():
        opcheck(torch.ops.fastreload.batched_copy_.default, args)


# ----------------------------------------------------------------------------------------
# storage_ptrs


def test_storage_ptrs_are_untyped_storage_addresses():
    x = torch.randn(5, 7)
    y = torch.zeros(3, dtype=torch.bfloat16)
    tensors = [x, y, x[2:], x.t(), x[:, ::3], x.view(torch.int32), x[4, 6], y.expand(2, 3),
               torch.tensor(True)]
    ptrs = ops.storage_ptrs(tensors)
    assert ptrs.dtype == torch.int64 and ptrs.device.type == "cpu" and ptrs.shape == (len(tensors),)
    assert ptrs.tolist() == [t.untyped_storage().data_ptr() for t in tensors]
    # Views report their base's storage, not their own first element.
    assert ptrs[2] == ptrs[3] == ptrs[4] == ptrs[5] == ptrs[6] == ptrs[0] != x[2:].data_ptr()
    assert ptrs[7] == ptrs[1]


def test_storage_ptrs_zero_byte_storages_are_zero():
    freed = torch.ones(4)
    freed.untyped_storage().resize_(0)  # as FSDP leaves a sharded parameter
    tensors = [torch.empty(0), torch.empty(3, 0), torch.empty(0, dtype=torch.float8_e5m2), freed]
    assert ops.storage_ptrs(tensors).tolist() == [0, 0, 0, 0]



def test_storage_ptrs_meta_tensors_are_zero():
    x, y = torch.randn(3), torch.randn(2)
    meta = torch.empty(3, device="meta")
    assert ops.storage_ptrs([x, meta, y]).tolist() == [x.untyped_storage().data_ptr(), 0,
                                                      y.untyped_storage().data_ptr()]


def test_storage_ptrs_empty_list():
    ptrs = ops.storage_ptrs([])
    assert ptrs.dtype == torch.int64 and ptrs.shape == (0,)


# ----------------------------------------------------------------------------------------
# storage_alias_mask


def test_alias_mask_views_of_against_alias_others_do_not():
    a, b = torch.randn(4, 6), torch.zeros(10, dtype=torch.float16)
    freed = torch.ones(4)
    freed.untyped_storage().resize_(0)
    tensors = [a, a[1:], a.t(), a.view(torch.int32), a[:, ::2], b[::3], b[9],  # views: alias
               torch.randn(4, 6), a.clone(), torch.empty(0), a[:0].clone(), freed]  # no shared bytes
    mask = ops.storage_alias_mask(tensors, [a, b, torch.empty(0), freed])
    assert mask.dtype == torch.bool and mask.shape == (len(tensors),)
    assert mask.tolist() == [True] * 7 + [False] * 5


def test_alias_mask_zero_byte_tensors_never_alias_each_other():
    z = torch.empty(0)
    assert ops.storage_alias_mask([z, z.view(0, 1)], [z]).tolist() == [False, False]



def test_alias_mask_meta_tensors_never_alias():
    a = torch.randn(8)
    metas = [torch.empty(4, device="meta") for _ in range(8)]
    tensors = [t for m in metas for t in (a[1:], m)]
    mask = ops.storage_alias_mask(tensors, [a] + metas)
    assert mask.tolist() == [True, False] * 8


def test_alias_mask_empty_lists():
    x = torch.randn(3)
    assert ops.storage_alias_mask([], []).shape == (0,)
    assert ops.storage_alias_mask([], [x]).shape == (0,)
    assert ops.storage_alias_mask([x], []).tolist() == [False]


# ----------------------------------------------------------------------------------------
# batched_copy_: values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_copy_matches_copy_for_every_dtype_pair(device, pair):
    src_dtype, dst_dtype = pair
    shapes = [(n,) for n in ODD_SIZES] + [(3, 5, 2), ()]
    targets, srcs = dense_pairs(src_dtype, dst_dtype, shapes, device)
    if src_dtype in FLOAT_DTYPES:
        specials = special_values(src_dtype).to(device)
        targets.append((random_values(specials.shape, dst_dtype, gen(1), device), whole))
        srcs.append(specials)
    check_batched_copy(targets, srcs)


def packed_starts(sizes, align):
    """Start of each region of sizes[i] units, laid end to end, each on a multiple of align."""
    starts, pos = [], 0
    for n in sizes:
        starts.append(pos)
        pos += -(-n // align) * align
    return starts, pos


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_every_alignment_of_source_and_destination(device, pair):
    """Every combination of src and dst offset, in elements: for 1-byte dtypes every byte
    offset in a 16-byte word, for the others every alignment their dtype allows."""
    src_dtype, dst_dtype = pair
    g = gen()
    combos = list(itertools.product(OFFSETS, OFFSETS, ALIGNMENT_SIZES))
    # 64 elements: each region starts 64-byte aligned, as the buffers do.
    starts, total = packed_starts([16 + n for _, _, n in combos], 64)
    src_buf = random_values((total,), src_dtype, g, device)
    dst_buf = random_values((total,), dst_dtype, g, device)
    targets, srcs = [], []
    for start, (so, do, n) in zip(starts, combos):
        targets.append((dst_buf, lambda b, lo=start + do, n=n: b[lo:lo + n]))
        srcs.append(src_buf[start + so:start + so + n])
    check_batched_copy(targets, srcs)


MISALIGNED_PAIRS = [p for p in DTYPE_PAIRS if max(t.itemsize for t in p) > 1]


@pytest.mark.skipif("cpu" not in DEVICES, reason="needs the CPU kernel")
@pytest.mark.parametrize("pair", MISALIGNED_PAIRS, ids=pair_id)
def test_byte_misaligned_multibyte_tensors(pair):
    """Tensors over a file mapping or a packed buffer (torch.frombuffer) may start at any
    byte, below their dtype's natural alignment; Tensor.copy_ handles them on the CPU."""
    src_dtype, dst_dtype = pair
    g = gen()
    combos = list(itertools.product(OFFSETS, OFFSETS, [1, 7, 17, 4095]))
    starts, total = packed_starts([16 + 8 * n for _, _, n in combos], 64)
    src_bytes = random_values((total,), torch.uint8, g)
    dst_bytes = random_values((total,), torch.uint8, g)

    def at(buf, offset, dtype, n):
        return torch.frombuffer(buf.numpy(), dtype=dtype, offset=offset, count=n)

    targets, srcs = [], []
    for start, (so, do, n) in zip(starts, combos):
        src = at(src_bytes, start + so, src_dtype, n)
        if src_dtype == torch.bool:
            src.view(torch.uint8).bitwise_and_(1)
        assert src.data_ptr() % 16 == so
        srcs.append(src)
        targets.append((dst_bytes, lambda b, o=start + do, n=n: at(b, o, dst_dtype, n)))
    check_batched_copy(targets, srcs)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_size_pairs(device):
    g = gen()
    shapes = [(0,), (3, 0), (0, 5), (2, 0, 4)]
    targets, srcs = dense_pairs(torch.float32, torch.bfloat16, shapes, device)
    check_batched_copy(targets, srcs)  # only empty pairs
    more_targets, more_srcs = dense_pairs(torch.float16, torch.float32, [(5,), (0,), (7, 3)], device,
                                          seed=1)
    check_batched_copy(targets + more_targets, srcs + more_srcs)  # empty among sized ones
    dst = torch.empty(0, 3, device=device)
    ops.batched_copy_([dst], [random_values((0, 3), torch.float64, g, device)])
    assert dst.shape == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count", [1, 2, 33, 1000, 100_000])
@pytest.mark.parametrize("pair", [(torch.float32, torch.bfloat16), (torch.int32, torch.int32)], ids=pair_id)
def test_many_tensors_in_one_call(device, count, pair):
    """Destinations are views of one buffer, separated by gaps and passed in shuffled order
    (not address order); each source sits at its destination's position in a source
    buffer, so the whole result is checked in one comparison."""
    src_dtype, dst_dtype = pair
    g = gen(count)
    sizes = torch.randint(0, 6, (count,), generator=g).tolist()
    gaps = torch.randint(0, 3, (count,), generator=g).tolist()
    starts, pos = [], 0
    for n, gap in zip(sizes, gaps):
        starts.append(pos)
        pos += n + gap
    src_buf = random_values((pos,), src_dtype, g, device)
    dst_buf = random_values((pos,), dst_dtype, g, device)
    expected = dst_buf.clone()
    # +1 at each start, -1 at each end: positions inside a destination have a positive sum.
    edges = torch.zeros(pos + 1, dtype=torch.int64)
    edges.index_add_(0, torch.tensor(starts), torch.ones(count, dtype=torch.int64))
    ends = torch.tensor(starts) + torch.tensor(sizes)
    edges.index_add_(0, ends, -torch.ones(count, dtype=torch.int64))
    covered = (edges.cumsum(0)[:-1] > 0).to(device)
    expected[covered] = src_buf[covered].to(dst_dtype)
    order = torch.randperm(count, generator=g).tolist()
    dsts = [dst_buf[starts[i]:starts[i] + sizes[i]] for i in order]
    srcs = [src_buf[starts[i]:starts[i] + sizes[i]] for i in order]

    ops.batched_copy_(dsts, srcs)

    assert_same_copy(dst_buf, expected, converted=src_dtype != dst_dtype)


def _noncontiguous_cases(src_dtype, dst_dtype, device):
    """(name, destination buffer, view_of, source): layouts that take the fallback path,
    and dense ones in one shared memory order that take the fused path."""
    g = gen()

    def rand(*shape, dtype=src_dtype):
        return random_values(shape, dtype, g, device)

    cl = torch.channels_last
    return [
        ("transposed src", rand(4, 6, dtype=dst_dtype), whole, rand(6, 4).t()),
        ("transposed dst", rand(6, 5, dtype=dst_dtype), lambda b: b.t(), rand(5, 6)),
        ("strided src", rand(4, 3, dtype=dst_dtype), whole, rand(4, 6)[:, 1::2]),
        ("strided dst", rand(30, dtype=dst_dtype), lambda b: b[1:28:3].view(3, 3)[:, :2], rand(3, 2)),
        ("strided both", rand(8, 9, dtype=dst_dtype), lambda b: b[::2, 1::3], rand(7, 6)[::2, ::2]),
        ("expanded row", rand(3, 5, dtype=dst_dtype), whole, rand(1, 5).expand(3, 5)),
        ("expanded scalar", rand(4, 2, dtype=dst_dtype), whole, rand().expand(4, 2)),
        ("channels_last both", rand(2, 3, 4, 5, dtype=dst_dtype).contiguous(memory_format=cl), whole,
         rand(2, 3, 4, 5).contiguous(memory_format=cl)),
        ("channels_last src only", rand(2, 3, 4, 5, dtype=dst_dtype), whole,
         rand(2, 3, 4, 5).contiguous(memory_format=cl)),
        ("same permutation", rand(60, dtype=dst_dtype), lambda b: b.view(5, 4, 3).permute(2, 0, 1),
         rand(5, 4, 3).permute(2, 0, 1)),
        ("size-1 dim stride differs", rand(3, 1, 4, dtype=dst_dtype), whole,
         rand(12).as_strided((3, 1, 4), (4, 99, 1))),
        ("zero-dim", rand(dtype=dst_dtype), whole, rand()),
    ]


CASE_NAMES = [c[0] for c in _noncontiguous_cases(torch.float32, torch.float32, "cpu")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", LAYOUT_DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_noncontiguous_and_permuted_layouts(device, pair, case):
    (_, buf, view_of, src), = [c for c in _noncontiguous_cases(*pair, device) if c[0] == case]
    check_batched_copy([(buf, view_of)], [src])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", LAYOUT_DTYPE_PAIRS, ids=pair_id)
def test_fused_and_fallback_pairs_in_one_call(device, pair):
    cases = _noncontiguous_cases(*pair, device)
    dense, dense_srcs = dense_pairs(*pair, [(7,), (262145,), (2, 3)], device, seed=3)
    check_batched_copy([(buf, v) for _, buf, v, _ in cases] + dense,
                       [src for *_, src in cases] + dense_srcs)


@pytest.mark.parametrize("device", DEVICES)
def test_source_with_conj_or_neg_bit_is_resolved(device):
    z = random_values((6,), torch.complex64, gen(), device)
    neg = z.conj().imag  # a float32 view with the negative bit set
    assert neg.is_neg()
    check_batched_copy([(torch.zeros(6, dtype=torch.complex64, device=device), whole),
                        (torch.zeros(6, device=device), whole),
                        (torch.zeros(6, dtype=torch.bfloat16, device=device), whole)],
                       [z.conj(), neg, neg])


def test_conj_destination_is_written_right_or_refused_whole():
    z = torch.zeros(4, dtype=torch.complex64)
    plain = torch.zeros(3)
    src = torch.randn(4, dtype=torch.complex64)
    try:
        ops.batched_copy_([plain, z.conj()], [torch.ones(3), src])
    except RuntimeError:
        assert torch.equal(z, torch.zeros_like(z)) and torch.equal(plain, torch.zeros(3))
    else:
        assert torch.equal(z.conj(), src) and torch.equal(plain, torch.ones(3))


# ----------------------------------------------------------------------------------------
# batched_copy_: property


_LAYOUTS = ["contiguous", "permuted", "strided"]


@st.composite
def _layout(draw, ndim, source):
    kind = draw(st.sampled_from(_LAYOUTS + (["expanded"] if source else [])))
    perm = draw(st.permutations(range(ndim)))
    offset = draw(st.integers(0, 15))
    broadcast = draw(st.lists(st.booleans(), min_size=ndim, max_size=ndim))
    return kind, tuple(perm), offset, tuple(broadcast)


def _view_maker(shape, layout):
    """(elements the buffer needs, view_of(buffer) -> tensor of `shape` in that layout)."""
    kind, perm, offset, broadcast = layout
    ndim = len(shape)
    if kind == "permuted" and ndim:
        base = [shape[p] for p in perm]
        inverse = [perm.index(d) for d in range(ndim)]
        return offset + math.prod(base), \
            lambda b: b[offset:offset + math.prod(base)].view(base).permute(inverse)
    if kind == "strided" and ndim:
        dim = perm[0]
        base = list(shape)
        base[dim] *= 2
        index = (slice(None),) * dim + (slice(1, None, 2),)
        return offset + math.prod(base), lambda b: b[offset:offset + math.prod(base)].view(base)[index]
    if kind == "expanded":
        base = [1 if flat else n for n, flat in zip(shape, broadcast)]
        return offset + math.prod(base), \
            lambda b: b[offset:offset + math.prod(base)].view(base).expand(shape)
    return offset + math.prod(shape), lambda b: b[offset:offset + math.prod(shape)].view(shape)


@st.composite
def _pair(draw):
    src_dtype, dst_dtype = draw(st.sampled_from(DTYPE_PAIRS))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    dst_layout = draw(_layout(len(shape), source=False))
    src_layout = dst_layout if draw(st.booleans()) else draw(_layout(len(shape), source=True))
    return src_dtype, dst_dtype, shape, dst_layout, src_layout


def halves(n):
    """Batch stops cutting n pairs in two batches (one when there is a single pair)."""
    return [n // 2, n] if n > 1 else [n]


def bound_copy(dsts, srcs):
    """As batched_copy_, through a BoundCopy of two batches (one for a single pair)."""
    assert ops.BoundCopy(dsts, halves(len(dsts)))(tuple(srcs)) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("copy", [ops.batched_copy_, bound_copy], ids=["batched_copy_", "BoundCopy"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(_pair(), min_size=1, max_size=8), seed=st.integers(0, 2**31 - 1))
def test_property_matches_per_pair_copy(device, copy, pairs, seed):
    g = gen(seed)
    targets, srcs = [], []
    for src_dtype, dst_dtype, shape, dst_layout, src_layout in pairs:
        dst_need, dst_view = _view_maker(shape, dst_layout)
        src_need, src_view = _view_maker(shape, src_layout)
        # 16 spare elements after the view: a write past its end shows there.
        targets.append((random_values((dst_need + 16,), dst_dtype, g, device), dst_view))
        srcs.append(src_view(random_values((src_need,), src_dtype, g, device)))
    dsts = [v(b) for b, v in targets]
    assert ops.batched_copy_check(dsts, srcs).tolist() == [PairProblem.NONE] * len(pairs)
    check_batched_copy(targets, srcs, copy)


# ----------------------------------------------------------------------------------------
# batched_copy_: refusals and what is accepted


def _refused(device):
    """(name, destinations, sources, expected codes). Buffers are shared between pairs where
    the case is about overlap."""
    g = gen()

    def r(*shape, dtype=torch.float32):
        return random_values(shape, dtype, g, device)

    buf = r(40)
    x = r(4, 4)
    a, b, c = r(5), r(6), r(7)
    valid = [r(300) for _ in range(300)]  # many good pairs before the bad one
    words = r(20, dtype=torch.int32)
    N, S, D = PairProblem.NONE, PairProblem.SHAPE, PairProblem.DTYPE
    DO, SO = PairProblem.DESTINATION_OVERLAP, PairProblem.SOURCE_OVERLAP
    return [
        ("shape mismatch in the last pair", valid + [r(3, 2)], [r(300) for _ in valid] + [r(2, 3)],
         [N] * len(valid) + [S]),
        ("empty shapes differ", [a, r(0, 3)], [r(5), r(3, 0)], [N, S]),
        ("int32 -> float32", [a, r(3)], [r(5), r(3, dtype=torch.int32)], [N, D]),
        ("float32 -> int32", [r(3, dtype=torch.int32), a], [r(3), r(5)], [D, N]),
        ("int8 -> int32", [r(3, dtype=torch.int32)], [r(3, dtype=torch.int8)], [D]),
        ("float32 -> complex64", [r(3, dtype=torch.complex64)], [r(3)], [D]),
        ("same destination twice", [a, b, a], [r(5), r(6), r(5)], [DO, N, DO]),
        ("overlapping slices", [buf[0:10], buf[30:40], buf[5:15]], [r(10), r(10), r(10)], [DO, N, DO]),
        ("overlapping strided views", [x[:, 0::2], x[:, 0::3]], [r(4, 2), r(4, 2)], [DO, DO]),
        ("source is another pair's destination", [a, b], [b[:5], r(6)], [SO, N]),
        ("source overlaps another pair's destination", [buf[0:10], c], [r(10), buf[5:12]], [N, SO]),
        ("source partially overlaps its destination", [buf[0:10]], [buf[5:15]], [SO]),
        ("source is its destination transposed", [x], [x.t()], [SO]),
        ("source is its destination as another dtype", [words.view(torch.float16)[:10]],
         [words.view(torch.bfloat16)[:10]], [SO]),
        ("expanded source from its destination", [a], [a[:1].expand(5)], [SO]),
    ]


REFUSED_NAMES = [c[0] for c in _refused("cpu")]


def storage_bytes(t):
    """Every byte of t's storage, whatever part of it t views."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", REFUSED_NAMES)
def test_refused_batches_write_nothing(device, case):
    (_, dsts, srcs, codes), = [c for c in _refused(device) if c[0] == case]
    assert ops.batched_copy_check(dsts, srcs).tolist() == codes
    # Destinations may share a buffer: snapshot every distinct storage, whole.
    storages = {t.untyped_storage().data_ptr(): t for t in dsts}
    before = {p: storage_bytes(t).clone() for p, t in storages.items()}
    first = next(i for i, code in enumerate(codes) if code != PairProblem.NONE)
    with pytest.raises(RuntimeError, match=f"pair {first}: "):
        ops.batched_copy_(dsts, srcs)
    for p, t in storages.items():
        assert torch.equal(storage_bytes(t), before[p]), f"{case}: a destination was written"


def test_destination_overlapping_itself_is_refused_whole():
    a, x = torch.zeros(4), torch.zeros(1)
    dsts, srcs = [a, x.expand(3)], [torch.ones(4), torch.arange(3.0)]
    with pytest.raises(RuntimeError):
        ops.batched_copy_(dsts, srcs)  # as x.expand(3).copy_(...) is refused
    assert torch.equal(a, torch.zeros(4)), "pair 0 was written before pair 1 was refused"
    assert ops.batched_copy_check(dsts, srcs)[1] != PairProblem.NONE


@pytest.mark.parametrize("device", DEVICES)
def test_length_mismatch_is_refused(device):
    dsts = [torch.zeros(3, device=device), torch.zeros(2, device=device)]
    srcs = [torch.ones(3, device=device)]
    with pytest.raises(RuntimeError, match="2 destinations but 1 sources"):
        ops.batched_copy_check(dsts, srcs)
    with pytest.raises(RuntimeError, match="2 destinations but 1 sources"):
        ops.batched_copy_(dsts, srcs)
    with pytest.raises(RuntimeError, match="0 destinations but 1 sources"):
        ops.batched_copy_([], srcs)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in dsts)



def test_meta_source_is_refused():
    dst = torch.zeros(3)
    meta = torch.empty(3, device="meta")
    assert ops.batched_copy_check([dst, dst.clone()], [meta, meta]).tolist() == [PairProblem.DEVICE] * 2
    with pytest.raises(RuntimeError, match="pair 0: "):
        ops.batched_copy_([dst], [meta])


# Views of one 128-byte buffer in every byte width: overlaps at byte granularity.
_OVERLAP_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]


@st.composite
def _strided_view(draw, shape):
    """(dtype, strides, element offset) of a view of `shape` whose elements do not overlap
    each other (rows may interleave with other views), inside the shared buffer."""
    dtype = draw(st.sampled_from(_OVERLAP_DTYPES))
    inner = draw(st.integers(1, 3))
    strides = (shape[1] * inner + draw(st.integers(0, 3)), inner) if len(shape) == 2 else (inner,)
    if len(shape) == 2 and draw(st.booleans()):
        strides = strides[::-1]  # column-major rows: still no element shared
    extent = 1 + sum((n - 1) * st_ for n, st_ in zip(shape, strides))
    length = 128 // dtype.itemsize
    assume(extent <= length)
    return dtype, strides, draw(st.integers(0, length - extent))


@st.composite
def _overlap_case(draw):
    pairs = []
    for _ in range(draw(st.integers(1, 5))):
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
        dst = draw(_strided_view(shape))
        src = dst if draw(st.integers(0, 5)) == 0 else draw(_strided_view(shape))
        pairs.append((shape, dst, src, draw(st.booleans())))  # last: src in a separate buffer
    return pairs


def _byte_addresses(t):
    offsets = [0]
    for size, stride in zip(t.shape, t.stride()):
        offsets = [o + i * stride for o in offsets for i in range(size)]
    return {t.data_ptr() + o * t.element_size() + k for o in offsets for k in range(t.element_size())}


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=_overlap_case(), seed=st.integers(0, 2**31 - 1))
def test_property_overlaps_refused_exactly(device, case, seed):
    """Pairs of views of one buffer are refused exactly when a destination shares a byte
    with another destination, or a source with a destination it is not the very view of;
    accepted batches copy as copy_ does, refused ones write nothing."""
    g = gen(seed)
    shared = random_values((128,), torch.uint8, g, device)
    separate = random_values((128,), torch.uint8, g, device)

    def view(buf, spec, shape):
        dtype, strides, offset = spec
        return buf.view(dtype).as_strided(shape, strides, offset)

    dst_views = [lambda b, d=d, shape=shape: view(b, d, shape) for shape, d, _, _ in case]
    dsts = [v(shared) for v in dst_views]
    srcs = [view(separate if apart else shared, s, shape) for shape, _, s, apart in case]

    dst_bytes = [_byte_addresses(d) for d in dsts]
    expected = []
    for i, (d, s) in enumerate(zip(dsts, srcs)):
        others = set().union(*(b for j, b in enumerate(dst_bytes) if j != i))
        same_view = ((d.data_ptr(), d.dtype, d.shape, d.stride())
                     == (s.data_ptr(), s.dtype, s.shape, s.stride()))
        if dst_bytes[i] & others:
            expected.append(PairProblem.DESTINATION_OVERLAP)
        elif not same_view and _byte_addresses(s) & (dst_bytes[i] | others):
            expected.append(PairProblem.SOURCE_OVERLAP)
        else:
            expected.append(PairProblem.NONE)

    for code in expected:
        event(code.name)
    assert ops.batched_copy_check(dsts, srcs).tolist() == expected
    if all(code == PairProblem.NONE for code in expected):
        check_batched_copy([(shared, v) for v in dst_views], srcs)
    else:
        before = shared.clone()
        first = next(i for i, code in enumerate(expected) if code != PairProblem.NONE)
        with pytest.raises(RuntimeError, match=f"pair {first}: "):
            ops.batched_copy_(dsts, srcs)
        assert torch.equal(shared, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", LAYOUT_DTYPE_PAIRS, ids=pair_id)
def test_interleaved_strided_destinations_are_accepted(device, pair):
    g = gen()
    x = random_values((4, 10), pair[1], g, device)
    srcs = [random_values((4, 5), pair[0], g, device) for _ in range(2)]
    even, odd = (lambda b: b[:, 0::2]), (lambda b: b[:, 1::2])
    assert ops.batched_copy_check([even(x), odd(x)], srcs).tolist() == [PairProblem.NONE] * 2
    check_batched_copy([(x, even), (x, odd)], srcs)


@pytest.mark.parametrize("device", DEVICES)
def test_source_interleaved_with_its_destination_is_accepted(device):
    """Odd columns into even ones of the same buffer: the spans intersect, no byte is shared."""
    x = random_values((4, 10), torch.float32, gen(), device)
    even = lambda b: b[:, 0::2]  # noqa: E731
    assert ops.batched_copy_check([even(x)], [x[:, 1::2]]).tolist() == [PairProblem.NONE]
    check_batched_copy([(x, even)], [x[:, 1::2]])


@pytest.mark.parametrize("device", DEVICES)
def test_adjacent_destinations_are_accepted(device):
    buf = random_values((12,), torch.float16, gen(), device)
    srcs = [random_values((n,), torch.float32, gen(n), device) for n in (5, 7)]
    parts = [lambda b: b[:5], lambda b: b[5:]]
    assert ops.batched_copy_check([p(buf) for p in parts], srcs).tolist() == [PairProblem.NONE] * 2
    check_batched_copy([(buf, p) for p in parts], srcs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_source_that_is_its_destination_is_a_noop(device, dtype):
    x = random_values((9, 8), dtype, gen(), device)
    before = x.clone()
    views = [x[:3], x[3:6].t(), x[6:, ::2]]  # contiguous, transposed, strided
    other_dst = torch.zeros(5, dtype=dtype, device=device)
    other_src = random_values((5,), dtype, gen(1), device)
    dsts, srcs = views + [other_dst], views + [other_src]
    assert ops.batched_copy_check(dsts, srcs).tolist() == [PairProblem.NONE] * 4
    ops.batched_copy_(dsts, srcs)
    assert torch.equal(bits(x), bits(before))
    assert torch.equal(bits(other_dst), bits(other_src))


def test_zero_size_destinations_never_overlap():
    x = torch.zeros(4)
    dsts = [x[:0], x[:0], x[2:2]]
    assert ops.batched_copy_check(dsts, [torch.empty(0)] * 3).tolist() == [PairProblem.NONE] * 3
    ops.batched_copy_(dsts, [torch.empty(0)] * 3)


# ----------------------------------------------------------------------------------------
# empty lists


def test_empty_lists():
    assert ops.batched_copy_([], []) is None
    codes = ops.batched_copy_check([], [])
    assert codes.dtype == torch.int8 and codes.shape == (0,)
    assert ops.storage_ptrs([]).shape == (0,)
    assert ops.storage_alias_mask([], []).shape == (0,)
    ops.ReplayableCopy([], [])()


def _no_bytes():
    return torch.empty(0, dtype=torch.uint8)


# Every op with all its lists empty, and its result then: nothing to dispatch on.
EMPTY_CALLS = {
    "storage_ptrs": (([],), torch.int64),
    "storage_alias_mask": (([], []), torch.bool),
    "batched_copy_check": (([], []), torch.int8),
    "batched_copy_": (([], []), None),
    "batched_copy_table": (([], []), torch.uint8),
    "batched_copy_with_table_": (([], [], _no_bytes(), _no_bytes()), None),
}


def test_every_declared_op_has_an_empty_call():
    declared = re.findall(r'm\.def\("(\w+)\(', (ROOT / "csrc" / "ops.cpp").read_text())
    assert sorted(declared) == sorted(EMPTY_CALLS)


@pytest.mark.parametrize("name", sorted(EMPTY_CALLS))
def test_raw_ops_accept_empty_lists(name):
    op = getattr(torch.ops.fastreload, name).default
    args, dtype = EMPTY_CALLS[name]
    result = op(*args)
    if dtype is None:
        assert result is None
    else:
        results = result if isinstance(result, list) else [result]
        assert results and all(r.shape == (0,) and r.dtype == dtype for r in results)
    opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_an_empty_list_beside_a_full_one_is_a_length_mismatch(device):
    x = torch.zeros(3, device=device)
    for dst, src in (([], [x]), ([x], [])):
        with pytest.raises(RuntimeError, match="1 destinations but 0 sources|0 destinations but 1 sources"):
            torch.ops.fastreload.batched_copy_(dst, src)


def test_a_non_empty_table_for_an_empty_batch_is_refused():
    with pytest.raises(RuntimeError, match="built for other tensors"):
        torch.ops.fastreload.batched_copy_with_table_([], [], torch.zeros(16, dtype=torch.uint8), _no_bytes())


def test_cpu_tensors_get_no_replayable_table():
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        torch.ops.fastreload.batched_copy_table([torch.zeros(2)], [torch.ones(2)])


def test_table_ops_refuse_meta_tensors_instead_of_doing_nothing():
    # A meta tensor in the lists sends the call to the fake kernel: it must not pass silently.
    dst, meta = torch.zeros(3), torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        ops.batched_copy_with_table_([dst], [meta], torch.zeros(1, dtype=torch.uint8),
                                     torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="meta"):
        ops.batched_copy_table([dst], [meta])


# ----------------------------------------------------------------------------------------
# BoundCopy: batched_copy_ bound to fixed destinations, as a reload runs it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", REFUSED_NAMES)
@pytest.mark.parametrize("batches", ["one", "two"])
def test_bound_copy_refusals_write_nothing_and_name_every_pair(device, case, batches):
    (_, dsts, srcs, codes), = [c for c in _refused(device) if c[0] == case]
    storages = {t.untyped_storage().data_ptr(): t for t in dsts}
    before = {p: storage_bytes(t).clone() for p, t in storages.items()}
    stops = [len(dsts)] if batches == "one" else halves(len(dsts))
    problems = ops.BoundCopy(dsts, stops)(srcs)
    assert problems is not None and problems.tolist() == codes
    for p, t in storages.items():
        assert torch.equal(storage_bytes(t), before[p]), f"{case}: a destination was written"


def test_bound_copy_reports_each_batch_and_copies_again_and_again():
    dsts = [torch.zeros(4), torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2, 2)]
    bound = ops.BoundCopy(dsts, [1, 3])
    assert len(bound) == 3
    for value in (1.0, 2.0, 3.0):
        written = []
        assert bound([torch.full_like(d, value, dtype=torch.float32) for d in dsts], written.append) is None
        assert written == [16, 6 + 16]
        assert all(torch.equal(d, torch.full_like(d, value)) for d in dsts)


def test_bound_copy_follows_destinations_that_change():
    p, q = torch.zeros(4), torch.zeros(3)
    bound = ops.BoundCopy([p, q], [2])
    assert bound((torch.ones(4), torch.ones(3))) is None
    old = p.data
    p.data = torch.zeros(4)  # new storage behind the same tensor object
    assert bound((torch.full((4,), 2.0), torch.full((3,), 2.0))) is None
    assert torch.equal(p, torch.full((4,), 2.0)), "wrote to the storage the tensor had before"
    assert torch.equal(old, torch.ones(4))
    p.data = torch.zeros(5)
    assert bound((torch.ones(4), torch.ones(3))).tolist() == [PairProblem.SHAPE, PairProblem.NONE]
    assert torch.equal(q, torch.full((3,), 2.0)), "a refused copy wrote"
    p.data = torch.zeros(3)
    q.data = p.data  # now the two destinations are one
    problems = bound((torch.ones(3), torch.ones(3)))
    assert problems.tolist() == [PairProblem.DESTINATION_OVERLAP] * 2
    assert torch.equal(p, torch.zeros(3))


def test_bound_copy_checks_sources_again_whenever_they_change():
    # An accepted call's checks are reused while the same sources come back: each
    # test here changes what those checks rested on, and must be seen.
    p, q = torch.zeros(4), torch.zeros(6)
    bound = ops.BoundCopy([p, q], [1, 2])
    a, b = torch.ones(4), torch.ones(6)
    assert bound((a, b)) is None
    a.fill_(2.0)  # new values in the same tensors: copied, not remembered
    assert bound((a, b)) is None and torch.equal(p, torch.full((4,), 2.0))
    # Another source, now a view of a destination: refused, nothing written.
    assert bound((q[:4], b)).tolist() == [PairProblem.SOURCE_OVERLAP, PairProblem.NONE]
    assert torch.equal(p, torch.full((4,), 2.0)) and torch.equal(q, torch.ones(6))
    # The same source object given another storage, then another shape.
    a.data = torch.full((4,), 3.0)
    assert bound((a, b)) is None and torch.equal(p, torch.full((4,), 3.0))
    a.data = torch.ones(5)
    assert bound((a, b)).tolist() == [PairProblem.SHAPE, PairProblem.NONE]
    # The same bytes seen through a negative view: the sign is applied.
    z = torch.randn(4, dtype=torch.complex64)
    real = torch.zeros(4, 2)
    bound = ops.BoundCopy([real, p], [2])
    assert bound((torch.view_as_real(z), torch.ones(4))) is None
    assert bound((torch.view_as_real(z.conj().resolve_conj()), z.conj().imag)) is None
    assert torch.equal(p, -z.imag) and torch.equal(real, torch.view_as_real(z.conj().resolve_conj()))


def test_bound_copy_remembers_several_sources_and_checks_each_again_when_it_changes():
    # Sources given in turn (two checkpoints, double-buffered staging tensors) each
    # keep their checks; whatever changes in any of them, or in a destination, is seen.
    p, q = torch.zeros(4), torch.zeros(2, 3)
    bound = ops.BoundCopy([p, q], [1, 2])
    sets = [(torch.full((4,), float(n)), torch.full((2, 3), float(n))) for n in range(6)]
    for round_ in range(3):  # more sets than are remembered, cycled
        for n, (a, b) in enumerate(sets):
            a.fill_(n + 10 * round_)
            assert bound((a, b)) is None
            assert torch.equal(p, a) and torch.equal(q, b)
    a, b = sets[-1]
    a.data = torch.ones(5)  # the most recent set, now another shape
    assert bound((a, b)).tolist() == [PairProblem.SHAPE, PairProblem.NONE]
    assert torch.equal(p, torch.full((4,), 25.0)), "a refused copy wrote"
    a, b = sets[-2]
    b.data = q.t()  # an older remembered set, now a view of a destination
    assert bound((a, b)).tolist() == [PairProblem.NONE, PairProblem.SHAPE]
    b.data = q.view(2, 3)
    assert bound((a, b)) is None, "a source that is its destination copies nothing"
    assert torch.equal(p, torch.full((4,), 24.0))
    a.data = q.view(6)[:4]
    assert bound((a, b)).tolist() == [PairProblem.SOURCE_OVERLAP, PairProblem.NONE]
    old = p.data
    p.data = torch.zeros(4)  # a destination moved: every remembered set is checked again
    a, b = sets[-3]
    assert bound((a, b)) is None
    assert torch.equal(p, a) and torch.equal(old, torch.full((4,), 24.0))
    p.data = torch.zeros(2)
    assert bound((a, b)).tolist() == [PairProblem.SHAPE, PairProblem.NONE]


@pytest.mark.parametrize("change", ["data", "set_view", "resize", "as_strided", "transpose", "storage_resized"])
def test_storage_watch_sees_every_change_that_makes_a_cached_plan_stale(change):
    # What cached plans of views of model tensors ask before every reload.
    p, q = torch.zeros(4, 6), torch.zeros(3)
    watch = ops.StorageWatch([p, q])
    assert len(watch) == 2 and watch.unchanged()
    p.fill_(1.0)
    q.add_(2.0)
    assert watch.unchanged(), "new values are no change"
    if change == "data":
        p.data = torch.zeros(4, 6)
    elif change == "set_view":
        p.set_(p.untyped_storage(), 6, (3, 6))
    elif change == "resize":
        q.resize_(2)
    elif change == "as_strided":
        p.as_strided_((4, 6), (1, 4))
    elif change == "transpose":
        p.t_()
    else:
        q.untyped_storage().resize_(0)
    assert not watch.unchanged()


def test_frozen_sources_read_what_they_were_whatever_is_done_to_the_tensors_given():
    # What a cached plan of views into mapped files relies on: the views are frozen
    # once, and the copy reads exactly those bytes again and again.
    buffer = torch.arange(16, dtype=torch.float32)
    views = [buffer[0:4], buffer[8:14].view(2, 3)]
    frozen = ops.FrozenTensors(views)
    assert len(frozen) == 2 and frozen.unchanged()
    p, q = torch.zeros(4), torch.zeros(2, 3)
    bound = ops.BoundCopy([p, q], [1, 2])
    for value in (1.0, 2.0):
        buffer.fill_(value)  # new bytes in the same storage are read
        assert bound(frozen) is None
        assert torch.equal(p, torch.full((4,), value)) and torch.equal(q, torch.full((2, 3), value))
    views[0].set_(torch.full((7,), 9.0))  # the tensor given, not the frozen alias
    views[1].resize_(1)
    assert bound(frozen) is None and torch.equal(p, torch.full((4,), 2.0))
    assert bound(tuple(views)).tolist() == [PairProblem.SHAPE, PairProblem.SHAPE]  # the tensors themselves
    old = p.data
    p.data = torch.zeros(4)  # a destination moved: frozen sources known before are checked again
    buffer.fill_(5.0)
    assert bound(frozen) is None and torch.equal(p, torch.full((4,), 5.0)) and torch.equal(old, torch.full((4,), 2.0))
    p.data = q.view(6)[:4]
    assert bound(frozen).tolist() == [PairProblem.DESTINATION_OVERLAP] * 2


def test_frozen_sources_whose_storage_is_resized_are_refused_with_nothing_written():
    buffer = torch.ones(8)
    frozen = ops.FrozenTensors([buffer[:4], buffer[4:]])
    p, q = torch.zeros(4), torch.zeros(4)
    bound = ops.BoundCopy([p, q], [2])
    assert bound(frozen) is None
    buffer.untyped_storage().resize_(4)  # the second view now reaches past the storage
    assert not frozen.unchanged()
    p.zero_()
    with pytest.raises(ValueError, match="frozen source"):
        bound(frozen)
    assert torch.equal(p, torch.zeros(4))


def test_frozen_sources_are_checked_in_full_the_first_time():
    p, q = torch.zeros(4), torch.zeros(4)
    bound = ops.BoundCopy([p, q], [2])
    assert bound(ops.FrozenTensors([p, torch.ones(4)])) is None  # p onto p: nothing to do
    assert bound(ops.FrozenTensors([q, torch.ones(4)])).tolist() == [PairProblem.SOURCE_OVERLAP, PairProblem.NONE]
    assert bound(ops.FrozenTensors([torch.ones(5), torch.ones(4)])).tolist() == [PairProblem.SHAPE, PairProblem.NONE]
    assert torch.equal(p, torch.zeros(4)) and torch.equal(q, torch.ones(4))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_a_bound_copy_does_not_keep_frozen_sources_alive(tmp_path):
    # Frozen views of a mapped checkpoint, once dropped by their caller, leave the
    # file unmapped (a deleted checkpoint's disk space is freed), however many calls
    # the copy remembers.
    from safetensors.torch import save_file

    from fastreload.safetensors_files import SafetensorsSource

    path = tmp_path / "frozen.safetensors"
    save_file({"a": torch.ones(4), "b": torch.full((3,), 2.0)}, str(path))
    p, q = torch.zeros(4), torch.zeros(3)
    bound = ops.BoundCopy([p, q], [2])
    source = SafetensorsSource([str(path)])
    frozen = ops.FrozenTensors([source["a"], source["b"]])
    assert bound(frozen) is None and bound(frozen) is None
    assert torch.equal(q, torch.full((3,), 2.0))
    assert str(path) in Path("/proc/self/maps").read_text()
    del frozen, source
    assert str(path) not in Path("/proc/self/maps").read_text()
    assert bound((torch.ones(4), torch.ones(3))) is None and torch.equal(q, torch.ones(3))


def test_frozen_tensors_refuse_what_has_no_storage_to_alias():
    with pytest.raises(ValueError, match="tensor 1 is not a strided tensor with storage"):
        ops.FrozenTensors([torch.ones(2), torch.ones(2, device="meta")])
    with pytest.raises(ValueError, match="tensor 0"):
        ops.FrozenTensors([torch.ones(4).to_sparse()])


def test_bound_copy_of_frozen_destinations_writes_their_storage_and_sees_it_freed():
    # Frozen destinations are for views whose bases the caller watches: the copy
    # writes where the views were made, checks only that the storages stayed.
    base = torch.zeros(2, 6)
    views = [base[0, :3], base[:, 3:].t()]
    bound = ops.BoundCopy(views, [1, 2], frozen=True)
    source = (torch.arange(3.0), torch.arange(6.0).view(3, 2))
    assert bound(source) is None
    assert torch.equal(base, torch.tensor([[0, 1, 2, 0, 2, 4], [0, 0, 0, 1, 3, 5]], dtype=torch.float32))
    views[0].set_(torch.zeros(3))  # not what is written: the view as it was made is
    assert bound(tuple(s + 1 for s in source)) is None and base[0, 2] == 3
    base.untyped_storage().resize_(0)
    with pytest.raises(ValueError, match="frozen destination"):
        bound(source)


def test_values_in_order_reads_a_dict_while_its_keys_come_in_the_same_order():
    source = {name: torch.full((1,), float(i)) for i, name in enumerate(["a.w", "b.w", "c.w"])}
    read = ops.ValuesInOrder(tuple(source), [2, 0])
    assert read(source) == (source["c.w"], source["a.w"])
    source["c.w"] = torch.zeros(1)  # a new value under the same key: read
    assert read(source)[0] is source["c.w"]
    assert read(dict(source)) == (source["c.w"], source["a.w"]), "a copy holds the same key objects"
    key = next(iter(source))
    source[key] = source.pop(key)  # the same keys, another order
    assert read(source) is None
    same_text = {("" + k + ".")[:-1]: torch.full((1,), 7.0 + i) for i, k in enumerate(("a.w", "b.w", "c.w"))}
    assert read(same_text) == (same_text["c.w"], same_text["a.w"]), "new strings, the same text and order"
    assert read({("" + k + ".")[:-1]: v for k, v in zip(("a.w", "c.w", "b.w"), source.values())}) is None
    assert read({k: source[k] for k in ("a.w", "b.w")}) is None
    assert read(list(source.items())) is None
    with pytest.raises(IndexError, match="position 3"):
        ops.ValuesInOrder(tuple(source), [3])


@pytest.mark.parametrize("swapped", [1, 20, 38])  # among the first keys, or compared after the walk
def test_values_in_order_refuses_a_dict_whose_keys_differ_anywhere(swapped):
    names = [f"layers.{i}.weight" for i in range(40)]
    source = {n: torch.full((1,), float(i)) for i, n in enumerate(names)}
    read = ops.ValuesInOrder(tuple(source), range(40))
    assert read({(n + ".")[:-1]: v for n, v in source.items()}) == tuple(source.values())
    reordered = names[:swapped] + [names[swapped + 1], names[swapped]] + names[swapped + 2:]
    assert read({n: source[n] for n in reordered}) is None
    renamed = {n if n != names[swapped] else n + "_scale": source[n] for n in names}
    assert read(renamed) is None


@pytest.mark.parametrize("device", DEVICES)
def test_bound_copy_of_lazy_conjugates_matches_copy(device):
    z = random_values((6,), torch.complex64, gen(), device)
    dst = torch.zeros(6, dtype=torch.complex64, device=device)
    bound = ops.BoundCopy([dst], [1])
    for source in (z, z.conj(), z, z.conj()):  # one address, the conjugate bit on and off
        assert bound((source,)) is None
        assert torch.equal(bits(dst), bits(torch.empty_like(dst).copy_(source)))


def test_bound_copy_bad_arguments():
    dsts = [torch.zeros(2), torch.zeros(3)]
    bound = ops.BoundCopy(dsts, [2])
    with pytest.raises(TypeError, match="source 1 is a str"):
        bound((torch.ones(2), "weights"))
    with pytest.raises(ValueError, match="got 1 sources for 2 destinations"):
        bound((torch.ones(2),))
    with pytest.raises(TypeError, match="sequence"):
        bound(42)
    with pytest.raises(ValueError, match="last batch"):
        ops.BoundCopy(dsts, [1])
    with pytest.raises(ValueError, match="increase"):
        ops.BoundCopy(dsts, [1, 1, 2])
    assert all(torch.equal(d, torch.zeros_like(d)) for d in dsts)
    assert ops.BoundCopy([], [0])(()) is None


# -- CheckpointTensors: what a replay makes and checks on every reload


class Entry:
    """What CheckpointTensors reads of a recorded checkpoint tensor."""

    def __init__(self, shape, dtype=torch.float32, cls=torch.nn.Parameter, requires_grad=False, loader=None,
                 device="cpu"):
        self.shape, self.dtype, self.cls = tuple(shape), dtype, cls
        self.requires_grad, self.loader, self.device = requires_grad, loader, torch.device(device)


class Tagged(torch.nn.Parameter):
    """A Parameter subclass, as inference engines give their weights."""


def _buffer(tensors, begin=0, end=None):
    end = len(tensors) if end is None else end
    return torch.empty(tensors.nbytes(begin, end), dtype=torch.uint8)


def test_checkpoint_tensors_are_disjoint_aligned_views_of_one_buffer():
    entries = [Entry((3, 5), torch.bfloat16), Entry((7,), torch.float32, torch.Tensor), Entry((0, 4)),
               Entry((2, 2), torch.float8_e4m3fn, Tagged, loader=print), Entry((), torch.float16),
               Entry((4,), torch.float32, requires_grad=True)]
    tensors = ops.CheckpointTensors(entries)
    assert len(tensors) == len(entries)
    assert tensors.nbytes(0, 6) == 5 * 64 and tensors.nbytes(2, 3) == 0  # each on its own cache line; empty: none
    buffer = _buffer(tensors)
    made = tensors.make(buffer, 0, 0, len(entries))
    for t, e in zip(made, entries):
        assert type(t) is e.cls and t.shape == e.shape and t.dtype == e.dtype and t.is_contiguous()
        assert t.requires_grad == e.requires_grad and t.is_leaf
        assert t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert t.data_ptr() % 64 == 0
    def as_bytes(t):
        return t.detach().reshape(-1).view(torch.uint8)

    for i, t in enumerate(made):  # each written alone changes no other
        as_bytes(t).fill_(i + 1)
    assert [set(as_bytes(t).tolist()) for t in made] == [{1}, {2}, set(), {4}, {5}, {6}]
    made[0].__dict__["attribute"] = 1  # attributes land on a fresh object each time
    assert "attribute" not in tensors.make(buffer, 0, 0, 1)[0].__dict__


def test_checkpoint_tensors_ranges_and_offsets():
    entries = [Entry((100,)), Entry((3,), torch.int64), Entry((17,), torch.float16)]
    tensors = ops.CheckpointTensors(entries)
    buffer = torch.empty(64 + tensors.nbytes(1, 3), dtype=torch.uint8)
    made = tensors.make(buffer, 64, 1, 3)
    assert [t.shape for t in made] == [(3,), (17,)]
    assert made[0].data_ptr() == buffer.data_ptr() + 64
    assert tensors.make(buffer, 0, 2, 2) == []


def test_checkpoint_tensors_refuse_bad_arguments():
    tensors = ops.CheckpointTensors([Entry((4,)), Entry((8,))])
    buffer = _buffer(tensors)
    with pytest.raises(ValueError, match="bytes needed"):
        tensors.make(buffer[:64], 0, 0, 2)
    with pytest.raises(ValueError, match="not a multiple of 64"):
        tensors.make(buffer, 8, 0, 1)
    with pytest.raises(ValueError, match="uint8"):
        tensors.make(buffer.view(torch.float32), 0, 0, 2)
    with pytest.raises(IndexError, match="out of 2"):
        tensors.make(buffer, 0, 1, 3)
    with pytest.raises(IndexError, match="out of 2"):
        tensors.fits((torch.zeros(4), torch.zeros(8), torch.zeros(1)))
    with pytest.raises(ValueError, match="meta"):
        tensors.make(torch.empty(128, dtype=torch.uint8, device="meta"), 0, 0, 2)
    with pytest.raises(TypeError, match="not a torch.Tensor subclass"):
        ops.CheckpointTensors([Entry((4,), cls=int)])
    with pytest.raises(TypeError, match="tuple"):
        tensors.fits([torch.zeros(4), torch.zeros(8)])


@pytest.mark.parametrize("source, fits", [
    (torch.zeros(2, 3), True),
    (torch.zeros(2, 3, dtype=torch.float8_e5m2), True),  # floating types convert
    (torch.zeros(3, 2), False),
    (torch.zeros(6), False),
    (torch.zeros(2, 3, dtype=torch.int32), False),
    (torch.zeros(2, 3, dtype=torch.float8_e4m3fnuz), False),  # floating, but batched_copy_ cannot convert it
    (torch.zeros(2, 3, device="meta"), False),
    (torch.zeros(3, 2).t(), True),  # any layout
    ("weights", False),
    (None, False),
])
def test_checkpoint_tensors_fit_what_batched_copy_takes(source, fits):
    tensors = ops.CheckpointTensors([Entry((4,)), Entry((2, 3), torch.bfloat16), Entry((5,), loader=print)])
    # The third entry has a weight_loader: any tensor fits it.
    assert tensors.fits((torch.zeros(4), source, torch.zeros(9, dtype=torch.int8))) is fits
    assert tensors.fits((source,), 1) is fits
    if isinstance(source, torch.Tensor) and source.device.type == "cpu":
        assert (ops.batched_copy_check([torch.zeros(2, 3, dtype=torch.bfloat16)], [source]).item() == 0) is fits
        assert ops.converts(source.dtype, torch.bfloat16) is (fits or source.shape != (2, 3))
