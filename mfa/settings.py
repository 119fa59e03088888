"""The ``$MFA_*`` switches that steer a call, read from the environment once per call.

The router takes one `Settings` snapshot per public call and hands it to the kernels' forward
and backward (through the call's custom function), so a native fwd+bwd reads the environment
6 times instead of 15, once per helper (with `AttentionSpec`'s cached hash, the host time to build
a window fwd+bwd fell from ~157 to ~150 µs on a 2-core x86 host).  A changed variable takes effect at the next call; the kernel entry
points read their own snapshot when called without one.
"""

from __future__ import annotations

import os
from typing import NamedTuple


class Settings(NamedTuple):
    """One reading of the environment.

    Attributes:
        backend: ``$MFA_BACKEND``, what ``backend="auto"`` becomes (``"auto"`` when unset).
        log: ``$MFA_LOG`` set (not ``0``): print which backend ran and why.
        blocks: ``$MFA_BLOCKS``, kernel tile overrides (see `mfa.kernels.attention.block_sizes`).
        wgmma: ``$MFA_WGMMA`` is not ``0``: Hopper wgmma B tiles allowed.
        backward: ``$MFA_BWD``, the native backward's form (see `mfa.kernels.attention.backward_form`).
        verbose: ``$MFA_KERNEL_VERBOSE`` set (not ``0``): MLX prints each kernel's generated source.
        deterministic: not from the environment: the router sets it for a ``deterministic=True``
            call, whose native backward then takes no form that adds with atomics.
    """

    backend: str
    log: bool
    blocks: str
    wgmma: bool
    backward: str
    verbose: bool
    deterministic: bool = False


def _flag(value: str) -> bool:
    return value not in ("", "0")


def read() -> Settings:
    """The current `Settings`."""
    env = os.environ
    return Settings(
        backend=env.get("MFA_BACKEND", "auto") or "auto",
        log=_flag(env.get("MFA_LOG", "")),
        blocks=env.get("MFA_BLOCKS", ""),
        wgmma=env.get("MFA_WGMMA", "1") != "0",
        backward=env.get("MFA_BWD", "auto"),
        verbose=_flag(env.get("MFA_KERNEL_VERBOSE", "")),
    )
