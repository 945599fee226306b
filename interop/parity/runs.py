"""One row group of the parity harness: the loss options it runs with, each framework's run of the heads,
the float64 ground truth and the naive same-dtype baseline (what float16/bfloat16 results are judged
relative to).

Every run returns the same list of float64 NumPy arrays, in the order of :func:`output_names`: the loss,
the gradient of the hidden states, then each split's weight gradient (torch's ``(V_split, H)`` layout)
and, with a bias, each split's bias gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx

import jax_heads
import torch_heads
from heads_common import LM_IGNORE_INDEX
from heads_common.options import (
    check_head_bias,
    check_label_smoothing,
    check_lse_square_scale,
    check_shift,
    check_shift_fits,
    check_softcap,
)


@dataclasses.dataclass(frozen=True)
class LossSetup:
    """The loss options of one row group: the heads' configuration and the label ``shift`` (passed to
    ``linear_cross_entropy`` with the head's concatenated parameters, as the heads take no shift)."""

    softcap: float | None = None
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    bias: bool = False
    shift: int = 0

    def check(self, seq: int) -> None:
        """Every option in range (``heads_common.options``), the shift shorter than the sequence ``seq``."""
        check_softcap(self.softcap)
        check_label_smoothing(self.label_smoothing)
        check_lse_square_scale(self.lse_square_scale)
        check_head_bias(self.bias)
        check_shift_fits(check_shift(self.shift), (seq,))

    @property
    def head_options(self) -> dict[str, object]:
        """The heads' constructor arguments for these options."""
        return dict(bias=self.bias, softcap=self.softcap, label_smoothing=self.label_smoothing,
                    lse_square_scale=self.lse_square_scale)

    @property
    def registry_options(self) -> frozenset[str]:
        """The names (``heads_common.registry.LOSS_OPTIONS``) an implementation must support to run them."""
        given = {"bias": self.bias, "softcap": self.softcap is not None, "label_smoothing": self.label_smoothing != 0,
                 "lse_square_scale": self.lse_square_scale != 0}
        return frozenset(name for name, on in given.items() if on)

    def describe(self) -> str:
        """``"no options"`` or e.g. ``"softcap=30, bias, shift=1"``."""
        parts = [] if self.softcap is None else [f"softcap={self.softcap:g}"]
        parts += [f"label_smoothing={self.label_smoothing:g}"] if self.label_smoothing else []
        parts += [f"lse_square_scale={self.lse_square_scale:g}"] if self.lse_square_scale else []
        parts += ["bias"] if self.bias else []
        parts += [f"shift={self.shift}"] if self.shift else []
        return ", ".join(parts) or "no options"


ALL_OPTIONS = LossSetup(softcap=30.0, label_smoothing=0.1, lse_square_scale=1e-4, bias=True, shift=1)
"""The options of the "all options on" row group."""


def output_names(order: Sequence[str], bias: bool) -> list[str]:
    names = ["loss", "d_hidden", *(f"d_lm_head.{n}.weight" for n in order)]
    return names + [f"d_lm_head.{n}.bias" for n in order] if bias else names


def torch_run(head, hidden, labels, upstream, impl: str, shift: int) -> list[np.ndarray]:
    """Loss and gradients of one torch implementation with exact gradients (``filter_eps=None``)."""
    head.impl = impl
    head.filter_eps = None
    h = hidden.detach().requires_grad_()
    if shift:
        loss = torch_heads.linear_cross_entropy(
            h, head.weight(), labels, bias=head.bias(), ignore_index=LM_IGNORE_INDEX, softcap=head.softcap,
            label_smoothing=head.label_smoothing, lse_square_scale=head.lse_square_scale, shift=shift, impl=impl,
            filter_eps=None,
        )
    else:
        loss = head(h, labels)
    layers = [head.lm_head[name] for name in head._split_order]
    params = [layer.weight for layer in layers] + ([layer.bias for layer in layers] if head.has_bias else [])
    grads = torch.autograd.grad(loss, [h, *params], grad_outputs=upstream)
    return [to_numpy(loss), *(to_numpy(g) for g in grads)]


def jax_run(head, hidden, labels, upstream, impl: str, shift: int, order: Sequence[str]) -> list[np.ndarray]:
    """Same as :func:`torch_run` for the Flax head; split kernel gradients transposed to torch's layout."""
    head.impl = impl
    graphdef, params, rest = nnx.split(head, nnx.Param, ...)

    def forward(params, h):
        module = nnx.merge(graphdef, params, rest)
        if not shift:
            return module(h, labels)
        return jax_heads.linear_cross_entropy(
            h, module.weight(), labels, bias=module.bias(), ignore_index=LM_IGNORE_INDEX, softcap=module.softcap,
            label_smoothing=module.label_smoothing, lse_square_scale=module.lse_square_scale, shift=shift, impl=impl,
        )

    loss, vjp = jax.vjp(forward, params, hidden)
    d_params, d_hidden = vjp(upstream)
    grads = [np.asarray(d_params["lm_head"][name]["kernel"][...], np.float64).T for name in order]
    if head.has_bias:
        grads += [np.asarray(d_params["lm_head"][name]["bias"][...], np.float64) for name in order]
    return [to_numpy(loss), to_numpy(d_hidden), *grads]


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().double().numpy() if x.dtype != torch.float64 else x.detach().cpu().numpy()
    return np.asarray(jax.device_get(x), np.float64)


def ground_truth(torch_head, hidden, labels, upstream, setup: LossSetup) -> list[np.ndarray]:
    """The float64 results: the torch reference on a float64 copy of the head, on the harness's device."""
    truth_head = copy_head(torch_head, torch.float64, hidden.device, setup)
    return torch_run(truth_head, hidden.double(), labels, upstream.double(), "reference", setup.shift)


def naive_baseline(torch_head, hidden, labels, upstream, setup: LossSetup) -> list[np.ndarray]:
    """The materialised logits in the input dtype, as a plain user would write them: ``F.linear`` with
    the bias, then float32 soft-capping, ``F.cross_entropy`` with label smoothing, and the z-loss term."""
    h = hidden.detach().requires_grad_()
    layers = [torch_head.lm_head[name] for name in torch_head._split_order]
    weights = [layer.weight for layer in layers]
    biases = [layer.bias for layer in layers] if setup.bias else []
    logits = F.linear(h, torch.cat(weights), torch.cat(biases) if biases else None).float()
    if setup.softcap is not None:
        logits = setup.softcap * torch.tanh(logits / setup.softcap)
    k = setup.shift
    targets = F.pad(labels[..., k:], (0, k), value=LM_IGNORE_INDEX) if k else labels
    loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=LM_IGNORE_INDEX, reduction="none",
                           label_smoothing=setup.label_smoothing).reshape(targets.shape)
    if setup.lse_square_scale:
        loss = loss + setup.lse_square_scale * torch.logsumexp(logits, -1) ** 2 * (targets != LM_IGNORE_INDEX)
    loss = loss[..., : loss.shape[-1] - k]
    grads = torch.autograd.grad(loss, [h, *weights, *biases], grad_outputs=upstream)
    return [to_numpy(loss), *(to_numpy(g) for g in grads)]


def copy_head(head, dtype, device, setup: LossSetup):
    """A torch head with ``setup``'s options holding ``head``'s parameters, in ``dtype`` on ``device``."""
    layout = head._layout
    copy = torch_heads.SplitLanguageModellingHead(
        dict(zip(layout.order, layout.sizes, strict=True)), layout.order, head._hidden_size, **setup.head_options
    )
    copy.load_state_dict(head.state_dict())
    return copy.to(device=device, dtype=dtype)
