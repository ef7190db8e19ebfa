"""Fault injection is off unless asked for, reads its one variable strictly, and the sticky
CUDA errors are recognised by their driver and runtime texts."""

from __future__ import annotations

import pytest

from gpu.faults import FaultInjector, is_device_lost
from gpu.request import DeviceLostError, RequestError


def test_off_by_default_and_parsed_strictly():
    assert not FaultInjector.from_env({}).active
    faults = FaultInjector.from_env({"ORCD_FAULT_INJECT": "nan=a+b, device_lost_after=3"})
    assert faults.nan_requests == {"a", "b"} and faults.device_lost_after == 3
    with pytest.raises(RequestError, match="cannot read 'explode=1'"):
        FaultInjector.from_env({"ORCD_FAULT_INJECT": "explode=1"})


@pytest.mark.parametrize("error, lost", [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("cuLaunchKernel failed: CUDA_ERROR_LAUNCH_FAILED"), True),
    (DeviceLostError("gone"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (ValueError("bad shape"), False),
])
def test_sticky_errors_are_told_apart(error, lost):
    assert is_device_lost(error) is lost
