"""Tests for ``interop.dlpack``: exact values, aliasing, copies, narrowing, errors; a leaf import."""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from interop.dlpack import to_jax, to_torch

EXACT_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.bool,
                torch.uint8, torch.int8, torch.int16]
SHAPES = [(), (0,), (3, 0), (5, 7)]


def enable_x64() -> contextlib.AbstractContextManager:
    """Turns JAX's 64-bit mode on inside a ``with`` block, on old and new JAX alike."""
    if hasattr(jax, "enable_x64"):  # jax >= 0.8: a config state, callable as a context
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as experimental_enable_x64

    return experimental_enable_x64(True)


def random_tensor(shape, dtype, device="cpu", seed=0):
    """Random bit patterns (NaN payloads, infinities, subnormals, -0.0 included)."""
    gen = torch.Generator().manual_seed(seed)
    numel = int(np.prod(shape, dtype=np.int64))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool().to(device)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape).to(device)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


def ptr(array: jax.Array) -> int:
    return array.unsafe_buffer_pointer()


def as_float64(x) -> np.ndarray:
    """Values as numpy float64 (bf16 included) for comparison across frameworks."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x).astype(np.float64)


def test_importing_the_bridge_imports_torch_and_jax_only():
    """``import interop.dlpack`` (what torch's ``impl="pallas"`` needs) pulls in no Flax and no heads."""
    script = (
        "import json, sys; import interop.dlpack; "
        "print(json.dumps({'file': interop.dlpack.__file__, 'modules': sorted(sys.modules)}))"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve() == root / "interop" / "dlpack.py"
    tops = {name.split(".")[0] for name in report["modules"]}
    assert {"torch", "jax"} <= tops
    assert not tops & {"flax", "torch_heads", "jax_heads"}
    assert not set(report["modules"]) & {"interop.parity", "interop.porting"}


def test_interop_exposes_the_rest_lazily():
    import interop
    import interop.parity
    import interop.porting

    assert set(interop.__all__) <= set(dir(interop))
    assert interop.to_jax is to_jax and interop.to_torch is to_torch
    assert interop.port_torch_to_flax is interop.porting.port_torch_to_flax
    assert interop.run_parity is interop.parity.run_parity and interop.ParityConfig is interop.parity.ParityConfig
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        interop.nope  # noqa: B018


def test_enable_x64_helper_toggles_and_restores():
    assert not jax.config.jax_enable_x64
    with enable_x64():
        assert jax.config.jax_enable_x64
        assert jnp.asarray(np.int64(2**40)).dtype == jnp.int64
    assert not jax.config.jax_enable_x64


# --- exact round trips and zero-copy ---------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "0d")
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_round_trip_is_bitwise_and_zero_copy(dtype, shape):
    tensor = random_tensor(shape, dtype)
    array = to_jax(tensor)
    assert array.dtype == jnp.dtype(str(dtype).removeprefix("torch."))
    assert array.shape == shape
    np.testing.assert_array_equal(as_float64(array), as_float64(tensor))
    back = to_torch(array)
    assert back.dtype == dtype and back.shape == tensor.shape and not back.requires_grad
    assert torch.equal(bits(back), bits(tensor))
    if tensor.numel():  # an empty buffer has no meaningful address
        assert ptr(array) == tensor.data_ptr()
        assert back.data_ptr() == tensor.data_ptr()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32, jnp.bool_,
                                   jnp.uint8, jnp.int8, jnp.int16], ids=str)
def test_jax_created_array_to_torch_is_exact(dtype):
    array = jax.random.bits(jax.random.key(0), (4, 6), jnp.uint8).astype(dtype)
    tensor = to_torch(array)
    assert str(tensor.dtype) == f"torch.{jnp.dtype(dtype).name}"
    assert tensor.data_ptr() == ptr(array)
    np.testing.assert_array_equal(as_float64(tensor), as_float64(array))


def test_mutating_tensor_is_visible_through_zero_copy_array():
    tensor = torch.zeros(8)
    array = to_jax(tensor)
    tensor[3] = 5.0
    assert float(array[3]) == 5.0


def test_mutating_aliasing_tensor_is_visible_through_jax_array():
    # Undefined behaviour as far as JAX is concerned; documented so that nobody relies on it.
    array = jnp.arange(8, dtype=jnp.float32)
    tensor = to_torch(array)
    tensor[0] = 42.0
    assert float(array[0]) == 42.0


def test_copy_true_gives_independent_memory_both_ways():
    tensor = torch.arange(16, dtype=torch.float32)
    array = to_jax(tensor, copy=True)
    assert ptr(array) != tensor.data_ptr()
    tensor[0] = -1.0
    assert float(array[0]) == 0.0

    array = jnp.arange(16, dtype=jnp.float32)
    tensor = to_torch(array, copy=True)
    assert tensor.data_ptr() != ptr(array)
    tensor[0] = -1.0
    assert float(array[0]) == 0.0


def test_copy_false_accepts_the_zero_copy_cases():
    tensor = torch.ones(4, 4, dtype=torch.bfloat16)
    assert ptr(to_jax(tensor, copy=False)) == tensor.data_ptr()
    array = jnp.ones((4, 4))
    assert to_torch(array, copy=False).data_ptr() == ptr(array)


# --- views, alignment, grad --------------------------------------------------------------------

NON_CONTIGUOUS = {
    "stride2": lambda base: base[:, ::2],
    "expand": lambda base: base[:1].expand(3, 8),
    "transpose": lambda base: base.T,
    "neg_view": lambda base: base._neg_view(),  # lazily negated: the memory holds -values
}


@pytest.mark.parametrize("make_view", NON_CONTIGUOUS.values(), ids=NON_CONTIGUOUS.keys())
def test_non_contiguous_view_is_copied_with_the_view_values(make_view):
    base = torch.arange(24, dtype=torch.float32).reshape(3, 8)
    view = make_view(base)
    expected = view.clone().resolve_neg()
    array = to_jax(view)
    assert array.shape == view.shape
    np.testing.assert_array_equal(np.asarray(array), expected.numpy())
    assert ptr(array) != base.data_ptr()
    base.zero_()
    np.testing.assert_array_equal(np.asarray(array), expected.numpy())  # not aliased
    with pytest.raises(ValueError, match="copy=False"):
        to_jax(view, copy=False)


def test_size_one_dims_with_odd_strides_are_zero_copy():
    # torch calls this contiguous: the stride of a size-1 dimension never matters.
    tensor = torch.empty_strided((3, 1), (1, 7)).copy_(torch.tensor([[1.0], [2.0], [3.0]]))
    array = to_jax(tensor, copy=False)
    assert ptr(array) == tensor.data_ptr()
    np.testing.assert_array_equal(np.asarray(array), [[1.0], [2.0], [3.0]])


def test_empty_views_with_odd_strides_convert():
    for view in (torch.empty_strided((0, 3), (1, 5)), torch.zeros(0, 1).expand(0, 4)):
        array = to_jax(view)
        assert array.shape == view.shape and array.dtype == jnp.float32


def test_cpu_slice_with_unaligned_offset_is_copied_by_jax():
    storage = torch.arange(80, dtype=torch.float32)
    assert storage.data_ptr() % 64 == 0
    aligned = storage[16:24]  # 64-byte offset
    assert ptr(to_jax(aligned, copy=False)) == aligned.data_ptr()
    unaligned = storage[1:9]  # 4-byte offset: XLA:CPU needs 64-byte alignment
    array = to_jax(unaligned)
    assert ptr(array) != unaligned.data_ptr()
    np.testing.assert_array_equal(np.asarray(array), np.arange(1, 9, dtype=np.float32))
    with pytest.raises(ValueError, match="not 64-byte aligned"):
        to_jax(unaligned, copy=False)


def test_tensor_that_requires_grad_is_detached_and_still_aliased():
    weight = torch.nn.Parameter(torch.randn(3, 4))
    array = to_jax(weight)
    assert ptr(array) == weight.data_ptr()
    np.testing.assert_array_equal(np.asarray(array), weight.detach().numpy())
    assert weight.requires_grad and weight.grad is None
    non_leaf = weight * 2
    np.testing.assert_array_equal(np.asarray(to_jax(non_leaf)), non_leaf.detach().numpy())


# --- which cases copy: copy=None shares exactly when copy=False succeeds ------------------------

_STORAGE = torch.arange(80, dtype=torch.float32)  # torch's CPU allocations start 64-byte aligned
COPY_CASES = {
    # name: (tensor maker, allow_narrowing, the reason copy=False gives, or None: aliased)
    "contiguous": (lambda: torch.arange(12, dtype=torch.float32), False, None),
    "aligned-slice": (lambda: _STORAGE.clone()[16:24], False, None),  # 64-byte offset
    "requires-grad": (lambda: torch.nn.Parameter(torch.ones(6)), False, None),
    "strided": (lambda: torch.arange(24, dtype=torch.float32).reshape(3, 8)[:, ::2], False, "not contiguous"),
    "negated": (lambda: torch.arange(6, dtype=torch.float32)._neg_view(), False, "negated view"),
    "unaligned-slice": (lambda: _STORAGE.clone()[1:9], False, "is not 64-byte aligned"),
    "int64-narrowed": (lambda: torch.arange(6), False, "int64 is narrowed to int32"),
    "float64-narrowed": (lambda: torch.arange(6, dtype=torch.float64), True, "float64 is narrowed to float32"),
}


@pytest.mark.parametrize("case", COPY_CASES.values(), ids=COPY_CASES.keys())
def test_copy_false_refuses_exactly_the_cases_that_copy_and_names_why(case):
    make, allow_narrowing, reason = case
    tensor = make()
    if reason is None:
        array = to_jax(tensor, allow_narrowing=allow_narrowing, copy=False)
        assert ptr(array) == tensor.data_ptr()
    else:
        with pytest.raises(ValueError, match=f"copy=False, but a copy is needed because .*{reason}"):
            to_jax(tensor, allow_narrowing=allow_narrowing, copy=False)


@pytest.mark.parametrize("case", COPY_CASES.values(), ids=COPY_CASES.keys())
def test_in_place_update_shows_through_exactly_when_aliased(case):
    make, allow_narrowing, reason = case
    tensor = make()
    array = to_jax(tensor, allow_narrowing=allow_narrowing)
    independent = to_jax(tensor, allow_narrowing=allow_narrowing, copy=True)
    before = np.asarray(array).copy()
    with torch.no_grad():
        tensor.add_(1)
    np.testing.assert_array_equal(np.asarray(independent), before)  # copy=True: never shared
    shared = (ptr(array) == tensor.data_ptr()) and not np.array_equal(np.asarray(array), before)
    assert shared == (reason is None)


def test_unaligned_cpu_slice_message_says_how_far_off_and_what_to_do():
    storage = torch.arange(80, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"not 64-byte aligned \(4 bytes past a boundary.*t\.clone\(\)"):
        to_jax(storage[1:9], copy=False)
    aligned_copy = storage[1:9].clone()
    assert ptr(to_jax(aligned_copy, copy=False)) == aligned_copy.data_ptr()


# --- 64-bit dtypes -----------------------------------------------------------------------------


def test_int64_with_x64_off_is_narrowed_exactly():
    tensor = torch.tensor([[3, -100, 0], [7, 2**31 - 1, -(2**31)]])
    array = to_jax(tensor)
    assert array.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(array), tensor.numpy())
    assert to_jax(torch.tensor(5)).dtype == jnp.int32
    assert to_jax(torch.zeros(0, 2, dtype=torch.int64)).shape == (0, 2)
    with pytest.raises(ValueError, match="copy=False"):
        to_jax(tensor, copy=False)


@pytest.mark.parametrize("bad", [2**40 + 5, 2**31, -(2**31) - 1], ids=str)
def test_int64_outside_int32_raises_naming_the_first_bad_value(bad):
    tensor = torch.tensor([[1, 2, 3], [4, 5, bad], [bad + 1, 0, 0]])
    with pytest.raises(ValueError, match=rf"value {bad} at index \(1, 2\)"):
        to_jax(tensor)
    with pytest.raises(ValueError, match=rf"value {bad} at index \(\)"):
        to_jax(torch.tensor(bad))
    with pytest.raises(ValueError, match="does not fit int32"):
        to_jax(tensor, allow_narrowing=True)  # narrowing never applies to integers


def test_float64_with_x64_off_needs_allow_narrowing():
    tensor = torch.tensor([1.0 + 2**-40, -3.5, 1e300], dtype=torch.float64)
    with pytest.raises(TypeError, match="allow_narrowing=True") as info:
        to_jax(tensor)
    assert "jax_enable_x64" in str(info.value)
    array = to_jax(tensor, allow_narrowing=True)
    assert array.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(array), tensor.to(torch.float32).numpy())
    assert to_jax(torch.zeros((), dtype=torch.float64), allow_narrowing=True).shape == ()
    with pytest.raises(ValueError, match="copy=False"):
        to_jax(tensor, allow_narrowing=True, copy=False)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "0d")
def test_64bit_with_x64_on_is_bitwise_and_zero_copy(dtype, shape):
    tensor = random_tensor(shape, dtype)
    with enable_x64():
        array = to_jax(tensor, copy=False)
        assert array.dtype == jnp.dtype(str(dtype).removeprefix("torch."))
        back = to_torch(array)
    assert back.dtype == dtype and torch.equal(bits(back), bits(tensor))
    if tensor.numel():
        assert ptr(array) == tensor.data_ptr() == back.data_ptr()


def test_int64_beyond_int32_survives_with_x64_on_both_ways():
    tensor = torch.tensor([2**40 + 5, -(2**62)])
    with enable_x64():
        array = to_jax(tensor)
        np.testing.assert_array_equal(np.asarray(array), [2**40 + 5, -(2**62)])
        from_jax = to_torch(jnp.array([2**40 + 5, -(2**62)], dtype=jnp.int64))
    assert from_jax.dtype == torch.int64 and from_jax.tolist() == [2**40 + 5, -(2**62)]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn, torch.uint32], ids=str)
def test_to_jax_refuses_unsupported_dtypes(dtype):
    with pytest.raises(TypeError, match="not supported; supported: bool"):
        to_jax(torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.int4, jnp.uint32, jnp.float8_e4m3fn],
                         ids=str)
def test_to_torch_refuses_unsupported_dtypes(dtype):
    with pytest.raises(TypeError, match="not supported; supported: bool"):
        to_torch(jnp.zeros(3, dtype=dtype))


def test_to_jax_refuses_other_inputs_and_devices():
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        to_jax(np.zeros(3))
    with pytest.raises(TypeError, match="dense"):
        to_jax(torch.eye(3).to_sparse())
    with pytest.raises(ValueError, match="only cpu and cuda"):
        to_jax(torch.zeros(3, device="meta"))
    with pytest.raises(TypeError, match="copy must be"):
        to_jax(torch.zeros(3), copy="no")


def test_to_torch_refuses_other_inputs_tracers_and_deleted_arrays():
    with pytest.raises(TypeError, match="must be a jax.Array"):
        to_torch(torch.zeros(3))
    with pytest.raises(TypeError, match="tracer"):
        jax.jit(to_torch)(jnp.zeros(3))
    deleted = jnp.zeros(3)
    deleted.delete()
    with pytest.raises(ValueError, match="deleted"):
        to_torch(deleted)


def _jax_has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.skipif(_jax_has_gpu(), reason="checks the error of a CPU-only JAX")
def test_cuda_device_without_a_jax_gpu_backend_is_named():
    # A CUDA tensor cannot be made without a GPU, so check the device test itself.
    from interop.dlpack import _check_jax_sees

    with pytest.raises(ValueError, match=r"cuda:0, but this JAX has no GPU backend"):
        _check_jax_sees(torch.device("cuda", 0))


# --- CUDA --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_round_trip_is_bitwise_and_zero_copy(dtype):
    tensor = random_tensor((33, 65), dtype, device="cuda")
    array = to_jax(tensor, copy=False)
    assert array.devices() == {jax.devices("gpu")[tensor.device.index]}
    assert ptr(array) == tensor.data_ptr()
    back = to_torch(array)
    assert back.device == tensor.device and back.data_ptr() == tensor.data_ptr()
    assert torch.equal(bits(back), bits(tensor))


@pytest.mark.gpu
def test_cuda_jax_array_to_torch_is_zero_copy():
    array = jax.device_put(jnp.arange(1000, dtype=jnp.bfloat16), jax.devices("gpu")[0])
    tensor = to_torch(array)
    assert tensor.is_cuda and tensor.data_ptr() == ptr(array)
    np.testing.assert_array_equal(as_float64(tensor), as_float64(array))


@pytest.mark.gpu
def test_cuda_conversion_waits_for_pending_work_on_the_producer_stream():
    x = torch.randn(4096, 4096, device="cuda")
    product = x @ x  # queued, not finished, when to_jax reads it
    array = to_jax(product)
    np.testing.assert_array_equal(np.asarray(array), product.cpu().numpy())

    a = jax.device_put(jnp.ones((4096, 4096)), jax.devices("gpu")[0])
    jax_product = a @ a  # dispatched asynchronously
    tensor = to_torch(jax_product)
    assert float(tensor.min()) == float(tensor.max()) == 4096.0


@pytest.mark.gpu
def test_cuda_views_narrowing_and_grad():
    base = torch.arange(48, dtype=torch.float32, device="cuda").reshape(6, 8)
    strided = to_jax(base[:, ::2])
    np.testing.assert_array_equal(np.asarray(strided), base[:, ::2].cpu().numpy())
    weight = torch.nn.Parameter(base.clone())
    assert ptr(to_jax(weight, copy=False)) == weight.data_ptr()
    labels = torch.tensor([1, -100, 2**31 - 1], device="cuda")
    np.testing.assert_array_equal(np.asarray(to_jax(labels)), [1, -100, 2**31 - 1])
    with pytest.raises(ValueError, match=rf"value {2**40 + 5} at index \(1,\)"):
        to_jax(torch.tensor([0, 2**40 + 5], device="cuda"))
    with enable_x64():
        wide = torch.tensor([2**40 + 5], device="cuda")
        assert ptr(to_jax(wide, copy=False)) == wide.data_ptr()


@pytest.mark.gpu
def test_cuda_slice_with_offset_is_zero_copy():
    unaligned = torch.arange(80, dtype=torch.float32, device="cuda")[1:9]
    array = to_jax(unaligned, copy=False)  # unlike XLA:CPU, no alignment copy on CUDA
    assert ptr(array) == unaligned.data_ptr()
    np.testing.assert_array_equal(np.asarray(array), np.arange(1, 9, dtype=np.float32))
