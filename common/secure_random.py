"""A keyed, cryptographically secure source of DP-SGD's randomness (Poisson sampling, noise).

What Opacus's ``secure_mode`` intends (a CSPRNG from torchcsprng, and Gaussian noise that
resists the floating-point attacks), without torchcsprng.

The bits. ``SecureRandom`` holds a 32-byte key and a call counter. Every call that draws
anything takes one fresh ChaCha20 stream (RFC 7539, through ``cryptography``): the 16-byte
nonce is the 4-byte block counter 0 followed by the 12-byte little-endian call counter,
which then goes up by one. The keystream (ChaCha20 over zeros) is read as little-endian
64-bit words. Two calls never share keystream, and the same key with the same sequence of
calls gives the same output (on little-endian machines, as all of torch's CPUs are). One
call draws at most 2^32 blocks (256 GiB). The object is neither thread-safe nor fork-safe:
a forked copy repeats its parent's stream, so a child process must make its own.

Uniforms. A float64 ``k * 2^-53`` per word, ``k`` from its top 53 bits: uniform on the
2^53 multiples of 2^-53 in [0, 1). ``bernoulli(n, p)`` is ``uniform(n) < p``: True with
probability ``p`` rounded up to a multiple of 2^-53.

Gaussians. Opacus's secure mode (after Holohan & Braghin 2021, section 5.1) returns
``(z1 + z2 + z3 + z4) / 2`` for four standard Gaussian draws ``z``. The attacks of Mironov
(2012) and Jin et al. (2022) read from the floating-point result of ``value + noise``
which values the sampler can or cannot have produced; a sum of four independent draws
fills the gaps between the values one draw can take, and Opacus puts the cost of inverting
it at 2^(53 * 3). Here each draw is Box-Muller in float64 from two 53-bit uniforms ``u``,
``u'``: radius ``sqrt(-2 ln v)`` with ``v = 1 - u`` (exact, in (0, 1]), angle
``pi (2u' - 1)``. Both outputs of a pair serve, never in the same element (``cos t + sin
t = sqrt(2) cos(t - pi/4)`` would make two draws one): element ``j``'s four draws come
from four pairs whose other outputs make element ``j + ceil(n/2)``, as torch's CPU sampler
pairs element ``j`` with ``j + 8``. The sum is scaled by ``std / 2`` in float64 and cast
to the requested dtype last. Per element: 4 keystream words (32 bytes). The work is
vectorised in chunks of ``_CHUNK`` pairs per draw (the chunk size is part of the
layout, so changing it changes the draws); the operations depend on the size only,
never on the values drawn (no rejection loop, unlike the discrete samplers whose time Jin
et al. measure).

What it does not guarantee:

- It is a finite, discrete distribution that approximates the Gaussian; there is no formal
  DP proof at the level of floating point (an exact discrete Gaussian on a grid, Canonne,
  Kamath & Steinke 2020, with integer arithmetic, or snapping, would be needed). The sum
  of four is the same empirical mitigation as Opacus's.
- The tails are bounded by the 53-bit uniforms: ``v >= 2^-53``, so a radius is at most
  ``sqrt(106 ln 2) = 8.57`` and one output at most ``4 * 8.57 / 2 = 17.1`` standard
  deviations. A radius above 8 (probability ``e^-32 = 1.3e-14`` per draw) comes from one of
  only about 114 values of ``v``: the radius is coarse there, and exact only where ``v`` is
  many ulps above 2^-53.
- The rounding after the sampler (the cast to float32, ``gradient + noise``, the scaling
  and the update, the encoding for secure aggregation) is outside it: that is where the
  attacks read, and nothing here proves it leaks nothing.
- Timing: the float64 log, sqrt, sin and cos come from torch's vector library and are not
  audited as constant-time; the key lives in ordinary process memory.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

KEY_BYTES = 32
_CHUNK = 8192  # Box-Muller pairs per draw and chunk: 64 * _CHUNK bytes of keystream
_MAX_BLOCKS = 2**32  # the 32-bit ChaCha20 block counter of one call
_PI_2_52 = math.pi * 2.0**-52


class SecureRandom:
    """Uniforms, Bernoulli draws and Gaussians from a ChaCha20 keystream under ``key``."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
            size = f"{len(key)} bytes" if isinstance(key, bytes | bytearray) else type(key).__name__
            raise ValueError(f"SecureRandom needs a {KEY_BYTES}-byte key, got {size}")
        self._key = bytes(key)
        self._calls = 0
        # normal()'s workspace, allocated on first use: zeros to encrypt, the keystream,
        # its 53-bit words as float64
        self._zeros = b""
        self._buf = bytearray()
        self._work = torch.empty(0, dtype=torch.float64)

    @classmethod
    def fresh(cls) -> SecureRandom:
        """A generator under a new random key from the operating system."""
        return cls(secrets.token_bytes(KEY_BYTES))

    def __repr__(self) -> str:  # never the key
        return f"SecureRandom(calls={self._calls})"

    def _stream(self, nbytes: int) -> CipherContext:
        """The encryptor of the next call's fresh stream, for ``nbytes`` of keystream."""
        if -(-nbytes // 64) > _MAX_BLOCKS:
            raise ValueError(f"one call draws at most {_MAX_BLOCKS * 64} bytes of keystream")
        nonce = bytes(4) + self._calls.to_bytes(12, "little")
        self._calls += 1
        return Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()

    def _words(self, n: int) -> torch.Tensor:
        """``n`` keystream words of the next call, shifted to 53 bits: int64 in [-2^52, 2^52)."""
        buf = bytearray(8 * n)
        self._stream(8 * n).update_into(bytes(8 * n), buf)
        return torch.frombuffer(buf, dtype=torch.int64).bitwise_right_shift_(11)

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 uniforms on [0, 1), each an exact multiple of 2^-53."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:  # draws nothing
            return torch.empty(0, dtype=torch.float64)
        return self._words(n).to(torch.float64).mul_(2.0**-53).add_(0.5)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """``n`` booleans, each True with probability ``p`` (Poisson sampling's coins)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        return self.uniform(n) < p

    def normal(
        self,
        shape: int | Sequence[int],
        std: float,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Gaussian noise of standard deviation ``std`` (see the module's docstring)."""
        size = (shape,) if isinstance(shape, int) else tuple(shape)
        if not (math.isfinite(std) and std >= 0.0):
            raise ValueError(f"std must be finite and >= 0, got {std}")
        if not dtype.is_floating_point:
            raise ValueError(f"normal draws floating-point tensors, not {dtype}")
        n = math.prod(size)
        if std == 0.0 or n == 0:  # draws nothing
            return torch.zeros(size, dtype=dtype, device=device)
        half = -(-n // 2)
        out = torch.empty(2 * half, dtype=torch.float64)
        stream = self._stream(64 * half)
        if len(self._zeros) < 64 * min(half, _CHUNK):
            self._zeros = bytes(64 * min(half, _CHUNK))
            self._buf = bytearray(len(self._zeros))
            self._work = torch.empty(len(self._zeros) // 8, dtype=torch.float64)
        zeros, words = memoryview(self._zeros), torch.frombuffer(self._buf, dtype=torch.int64)
        for start in range(0, half, _CHUNK):
            m = min(_CHUNK, half - start)
            stream.update_into(zeros[: 64 * m], self._buf)
            s = self._work[: 8 * m].copy_(words[: 8 * m].bitwise_right_shift_(11)).view(2, 4, m)
            radius, angle = s[0], s[1]  # 4 pairs per column, each s = 2^53 u - 2^52
            radius.mul_(-(2.0**-53)).add_(0.5).log_().mul_(-2.0).sqrt_()  # v = 1 - u
            angle.mul_(_PI_2_52)  # pi (2u - 1): a full turn
            torch.sum(torch.cos(angle).mul_(radius), 0, out=out[start : start + m])
            torch.sum(angle.sin_().mul_(radius), 0, out=out[half + start : half + start + m])
        return out[:n].mul_(std / 2).to(dtype=dtype, device=device).view(size)
