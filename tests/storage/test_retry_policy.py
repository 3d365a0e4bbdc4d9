"""RetryPolicy on its own: a fake sleep records the delays, so nothing here waits."""

from __future__ import annotations

import errno
import pickle

import pytest

from segbatch.errors import StorageFault
from segbatch.storage import RetryPolicy

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


class Flaky:
    """A call that fails with ``exc`` its first ``failures`` times, then returns "done"."""

    def __init__(self, exc: Exception, failures: int):
        self.exc, self.failures, self.calls = exc, failures, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "done"


def _policy(retries: int = 3, **kw) -> tuple[RetryPolicy, list[float]]:
    slept: list[float] = []
    return RetryPolicy(retries, backoff_s=0.5, max_backoff_s=1.0, sleep=slept.append, **kw), slept


def test_a_transient_fault_is_retried_after_capped_jittered_delays():
    policy, slept = _policy()
    call = Flaky(ConnectionResetError(errno.ECONNRESET, "reset"), failures=3)
    assert policy.call("read", "s3://b/k", call) == "done"
    assert call.calls == 4 and len(slept) == 3
    caps = [0.5, 1.0, 1.0]  # backoff_s * 2**attempt, at most max_backoff_s
    assert all(0 <= d <= cap for d, cap in zip(slept, caps)), slept


def test_a_permanent_fault_is_raised_at_once_as_it_came():
    policy, slept = _policy()
    call = Flaky(FileNotFoundError("s3://b/k"), failures=1)
    with pytest.raises(FileNotFoundError):
        policy.call("read", "s3://b/k", call)
    assert call.calls == 1 and slept == []


def test_retries_spent_raise_a_transient_storage_fault_naming_them():
    policy, slept = _policy(retries=2)
    call = Flaky(TimeoutError("read timed out"), failures=10)
    with pytest.raises(StorageFault) as raised:
        policy.call("read", "s3://b/k", call)
    assert call.calls == 3 and len(slept) == 2
    assert raised.value.kind == "transient" and "after 2 retries" in str(raised.value)
    assert isinstance(raised.value.__cause__, TimeoutError)


def test_a_storage_fault_is_never_retried_again():
    policy, slept = _policy()
    call = Flaky(StorageFault("already sorted", "s3://b/k", "transient"), failures=1)
    with pytest.raises(StorageFault):
        policy.call("read", "s3://b/k", call)
    assert call.calls == 1 and slept == []


def test_secrets_are_masked_in_what_is_raised():
    policy, _ = _policy(redact=lambda text: text.replace(SECRET, "***"))
    with pytest.raises(ValueError) as raised:
        policy.call("read", "s3://b/k", Flaky(ValueError(f"bad secret {SECRET}"), failures=1))
    assert SECRET not in str(raised.value) and "***" in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_the_default_policy_pickles():
    copy = pickle.loads(pickle.dumps(RetryPolicy(7, backoff_s=0.1)))
    assert (copy.retries, copy.backoff_s, copy.max_backoff_s) == (7, 0.1, 10.0)
