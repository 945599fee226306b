"""What the Flax heads share: torch's initialisers, the linear layer they build, the input check."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_heads.reference import PRECISION

# torch's nn.Linear init, kaiming_uniform(a=sqrt(5)): uniform(-b, b) with b = sqrt(3 * (1/3) / fan_in).
TORCH_LINEAR_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torch's nn.Embedding init: standard normal.
TORCH_EMBEDDING_INIT = nnx.initializers.normal(1.0)


def torch_bias_init(in_features: int):
    """torch's nn.Linear bias init: uniform(-b, b) with b = 1 / sqrt(in_features)."""
    bound = 1.0 / math.sqrt(in_features)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear(
    in_features: int, out_features: int, param_dtype: jnp.dtype, rngs: nnx.Rngs, *, use_bias: bool = False
) -> nnx.Linear:
    """An ``nnx.Linear`` initialised as torch's ``nn.Linear`` (bias-free unless ``use_bias``)."""
    # HIGHEST: true float32 products, as torch computes them (XLA's default may use tf32 on GPU).
    # Inputs and kernel of different dtypes are promoted, as in every nnx.Linear (torch would raise).
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=TORCH_LINEAR_INIT,
        bias_init=torch_bias_init(in_features),
        param_dtype=param_dtype,
        precision=PRECISION,
        rngs=rngs,
    )


def reset_linear(layer: nnx.Linear, key: jax.Array) -> None:
    """Redraw ``layer``'s kernel (and bias, if any) as torch's ``nn.Linear`` initialises them."""
    kernel = layer.kernel[...]
    layer.kernel[...] = TORCH_LINEAR_INIT(key, kernel.shape, kernel.dtype)
    if layer.bias is not None:
        bias = layer.bias[...]
        layer.bias[...] = torch_bias_init(kernel.shape[0])(jax.random.fold_in(key, 1), bias.shape, bias.dtype)


def check_hidden(hidden_states: object, hidden_size: int) -> jax.Array:
    if not isinstance(hidden_states, jax.Array):
        raise TypeError(f"hidden_states must be a jax.Array, got {type(hidden_states).__name__}")
    if not jnp.issubdtype(hidden_states.dtype, jnp.floating):
        raise TypeError(f"hidden_states must be a floating array, got {hidden_states.dtype}")
    if hidden_states.ndim < 1 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden size mismatch: expected hidden_states (..., {hidden_size}), got shape {tuple(hidden_states.shape)}"
        )
    return hidden_states
