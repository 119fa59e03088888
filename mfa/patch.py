"""Route ``mx.fast.scaled_dot_product_attention`` through mfa, so existing MLX code trains on it.

Opt-in and reversible; importing mfa never patches anything::

    mfa.install()                  # every later call of mx.fast.scaled_dot_product_attention runs mfa
    mfa.uninstall()                # back to MLX's own
    with mfa.installed():          # only inside the block
        loss, grads = loss_and_grad(model, batch)

Code that looks the function up at call time (``mx.fast.scaled_dot_product_attention(...)``, as
mlx-lm's models do) is routed; code that bound the function to a name before `install` is not.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import mlx.core as mx

import mfa

_mlx_sdpa = mx.fast.scaled_dot_product_attention
_depth = 0
_inside = threading.local()


def _routed_sdpa(q, k, v, *, scale: float, mask=None, sinks: Optional[mx.array] = None, force_fused: bool = False,
                 stream=None):
    """``mx.fast.scaled_dot_product_attention``'s signature, computed by `mfa.scaled_dot_product_attention`.

    ``force_fused`` is accepted and has nothing to do: mfa's attention is always fused.

    mfa's own ``sdpa`` backend calls ``mx.fast.scaled_dot_product_attention`` too: inside an mfa
    call that name means MLX's function again, so routing never recurses.
    """
    if getattr(_inside, "active", False):
        return _mlx_sdpa(q, k, v, scale=scale, mask=mask, sinks=sinks, force_fused=force_fused, stream=stream)
    _inside.active = True
    try:
        with mx.stream(stream) if stream is not None else contextlib.nullcontext():
            return mfa.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    finally:
        _inside.active = False


def install() -> None:
    """Make ``mx.fast.scaled_dot_product_attention`` call `mfa.scaled_dot_product_attention`.

    Calls nest: each `install` needs its own `uninstall` before MLX's function is back.
    """
    global _depth
    _depth += 1
    mx.fast.scaled_dot_product_attention = _routed_sdpa


def uninstall() -> None:
    """Undo one `install`; MLX's own function is back once every `install` is undone."""
    global _depth
    if _depth == 0:
        raise RuntimeError("mfa.uninstall() called without a matching mfa.install()")
    _depth -= 1
    if _depth == 0:
        mx.fast.scaled_dot_product_attention = _mlx_sdpa


def is_installed() -> bool:
    """True while ``mx.fast.scaled_dot_product_attention`` is routed through mfa."""
    return mx.fast.scaled_dot_product_attention is _routed_sdpa


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Context manager: `install` on entry, `uninstall` on exit (also on error)."""
    install()
    try:
        yield
    finally:
        uninstall()
