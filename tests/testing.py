"""What the op tests run over: dtypes, devices, and the bit-level comparisons they share."""

import torch

# batched_copy_ converts between any two of these (csrc/copy_pairs.cpp, float_kind).
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16,
                torch.float8_e4m3fn, torch.float8_e5m2]
# Copied as bytes, only into their own dtype.
OTHER_DTYPES = [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
DTYPES = FLOAT_DTYPES + OTHER_DTYPES

# (source dtype, destination dtype): every pair batched_copy_ accepts.
DTYPE_PAIRS = [(s, d) for s in FLOAT_DTYPES for d in FLOAT_DTYPES] + [(t, t) for t in OTHER_DTYPES]


def _has_kernel(device: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastreload::batched_copy_", key)


# A device is tested where torch can reach it and the extension was built with a kernel for it.
DEVICES = [d for d in ("cpu", "cuda")
           if (d == "cpu" or torch.cuda.is_available()) and _has_kernel(d)]

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's elements reinterpreted as integers of the same width (a view, any layout):
    equal iff bitwise equal."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def random_values(shape, dtype, generator, device="cpu") -> torch.Tensor:
    """Uniformly random bit patterns: every NaN, infinity, subnormal and rounding case a
    dtype has turns up. bool gets 0 or 1 only, the two values a bool may hold."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool().to(device)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(-128, 128, (*shape, size), dtype=torch.int8, generator=generator)
    return raw.view(dtype).reshape(shape).to(device)


def assert_same_copy(actual: torch.Tensor, expected: torch.Tensor, *, converted: bool) -> None:
    """actual holds expected bit for bit. Where a dtype conversion produced a NaN, any NaN
    will do: Tensor.copy_ itself gives different NaN payloads and signs depending on the
    CPU's vector extensions (try ATEN_CPU_CAPABILITY=default vs avx512 on float32 ->
    bfloat16), so no NaN bit pattern is a contract."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = bits(actual).cpu().flatten(), bits(expected).cpu().flatten()
    if converted and expected.is_floating_point():
        nan = expected.cpu().double().isnan().flatten()
        assert torch.equal(actual.cpu().double().isnan().flatten(), nan), "NaN positions differ"
        a, e = a[~nan], e[~nan]
    if not torch.equal(a, e):
        where = (a != e).nonzero().flatten()[:5].tolist()
        raise AssertionError(f"{int((a != e).sum())} elements differ, first at {where}: "
                             f"got {a[where].tolist()}, expected {e[where].tolist()}")
