"""Failure isolation: which errors leave the device unusable, and fault injection for tests.

An error tied to one request (non-finite logits in its row) ends that request alone; an error
that leaves the device unusable (a sticky CUDA error: every later call fails the same way)
becomes `DeviceLostError`, on which the worker exits for its service manager to restart it.

Fault injection is for tests and drills only, off unless `ORCD_FAULT_INJECT` is set, e.g.
`ORCD_FAULT_INJECT="nan=job-3,device_lost_after=5"`:

- `nan=ID` (repeatable, `+`-separated ids): the logits row of request ID are NaN at every step;
- `device_lost_after=N`: the (N+1)-th engine step raises `DeviceLostError`, as does every
  step after it (the error is sticky).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from gpu.request import DeviceLostError, RequestError

FAULT_ENV = "ORCD_FAULT_INJECT"
# What CUDA reports for the errors after which a context cannot be used again (the driver's
# names and the runtime's messages, as torch and cuda-python raise them).
_STICKY = (
    "illegal memory access", "CUDA_ERROR_ILLEGAL_ADDRESS", "unspecified launch failure",
    "CUDA_ERROR_LAUNCH_FAILED", "misaligned address", "CUDA_ERROR_MISALIGNED_ADDRESS",
    "illegal instruction", "CUDA_ERROR_ILLEGAL_INSTRUCTION", "uncorrectable ECC",
    "CUDA_ERROR_ECC_UNCORRECTABLE", "hardware stack error", "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "device-side assert", "CUDA_ERROR_ASSERT",
)


def is_device_lost(exc: BaseException) -> bool:
    """Whether an exception means the device cannot be used again by this process."""
    if isinstance(exc, DeviceLostError):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _STICKY)


@dataclass(slots=True)
class FaultInjector:
    """Faults to inject (see the module docstring); `active` is False when there are none."""

    nan_requests: frozenset[str] = frozenset()
    device_lost_after: int | None = None
    steps: int = field(default=0)

    @classmethod
    def from_env(cls, environ=os.environ) -> FaultInjector:
        spec = environ.get(FAULT_ENV, "").strip()
        injector = cls()
        if not spec:
            return injector
        for part in spec.split(","):
            name, _, value = part.strip().partition("=")
            if name == "nan" and value:
                injector.nan_requests = injector.nan_requests | frozenset(value.split("+"))
            elif name == "device_lost_after" and value.isdigit():
                injector.device_lost_after = int(value)
            else:
                raise RequestError(f"{FAULT_ENV}: cannot read {part.strip()!r} (expected "
                                   "nan=ID[+ID...] or device_lost_after=N)")
        return injector

    @property
    def active(self) -> bool:
        return bool(self.nan_requests) or self.device_lost_after is not None

    def describe(self) -> str:
        parts = [f"NaN logits for {', '.join(sorted(self.nan_requests))}"] \
            if self.nan_requests else []
        if self.device_lost_after is not None:
            parts.append(f"device lost after {self.device_lost_after} steps")
        return "; ".join(parts)

    def on_step(self) -> None:
        """Called at the start of each engine step: raise the injected device loss."""
        if self.device_lost_after is None:
            return
        if self.steps >= self.device_lost_after:
            raise DeviceLostError(f"injected by {FAULT_ENV}: device lost after "
                                  f"{self.device_lost_after} steps (sticky)")
        self.steps += 1

    def poison(self, logits, request_ids: list[str]) -> None:
        """Set the logits rows of the poisoned requests among `request_ids` to NaN. The CUDA
        backend's logits are inference tensors: they take an in-place write only inside
        inference mode (outside it, torch raises and the whole step failed on the GPU)."""
        import torch

        with torch.inference_mode():
            for row, request_id in enumerate(request_ids):
                if request_id in self.nan_requests:
                    logits[row] = float("nan")
