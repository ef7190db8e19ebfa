"""The "measured" summary section (tests/measured.py) lists what tests record, once each."""

from __future__ import annotations

pytest_plugins = ("pytester",)


def test_recorded_values_are_listed_once_at_the_end(pytester):
    pytester.makepyfile(
        test_sample="""
        from tests.measured import MEASURED

        def test_a(record_property):
            record_property(MEASURED, "max rel error 1.23e-04")
            record_property("other", "not listed")

        def test_b():
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "tests.measured")
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    assert "measured" in out
    assert out.count("test_sample.py::test_a: max rel error 1.23e-04") == 1
    assert "not listed" not in out and "test_b:" not in out
