"""The consumer's post-processing thread (consumer/post.py): urgent work first, nothing else while held."""

from __future__ import annotations

import threading
import time

import pytest

from consumer.post import PostQueue

pytestmark = pytest.mark.unit


def busy(post: PostQueue, gate: threading.Event):
    """Work that holds the thread until `gate` is set; returns once the thread has taken it up."""
    started = threading.Event()

    def work() -> bool:
        started.set()
        return gate.wait(5)

    fut = post.submit(work)
    assert started.wait(5)
    return fut


def test_urgent_work_goes_before_what_is_queued_and_a_hold_lets_only_urgent_work_start():
    post = PostQueue()
    gate, order = threading.Event(), []
    try:
        first = busy(post, gate)  # keeps the thread busy while the rest queues
        normal = [post.submit(order.append, f"n{i}") for i in range(3)]
        urgent = post.submit(order.append, "u", urgent=True)
        with post.hold():
            gate.set()
            assert first.result(5) is True
            assert urgent.result(5) is None  # urgent work runs while held
            assert not any(f.done() for f in normal)  # the rest waits for the hold's end
            assert order == ["u"]
        for f in normal:
            f.result(5)
        assert order == ["u", "n0", "n1", "n2"]  # then first in, first out
    finally:
        post.shutdown()


def test_an_exception_reaches_the_caller_and_the_thread_goes_on():
    post = PostQueue()
    try:
        with pytest.raises(ZeroDivisionError):
            post.submit(lambda: 1 / 0).result(5)
        assert post.submit(lambda: 42).result(5) == 42
    finally:
        post.shutdown()


def test_shutdown_cancels_what_is_queued_and_refuses_more():
    post = PostQueue()
    gate = threading.Event()
    running = busy(post, gate)
    queued = post.submit(lambda: "never")
    post.shutdown()
    gate.set()
    assert running.result(5) is True  # the work in progress finishes
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="shut down"):
        post.submit(lambda: None)


def test_the_run_time_average_counts_the_work_not_the_wait_before_it():
    post = PostQueue()
    gate = threading.Event()
    try:
        held = busy(post, gate)
        quick = post.submit(lambda: None)  # waits behind `held`, runs in no time
        time.sleep(0.2)
        gate.set()
        held.result(5), quick.result(5)
        # held ran 0.2 s (0.3 x 0.2 = 0.06 after one), quick ~0 s (0.7 x 0.06): nothing of quick's 0.2 s wait
        assert 0.03 < post.run_s < 0.05
    finally:
        post.shutdown()


def test_pause_and_resume_hold_normal_work_like_a_hold():
    post = PostQueue()
    try:
        post.pause()
        normal = post.submit(lambda: "n")
        urgent = post.submit(lambda: "u", urgent=True)
        assert urgent.result(5) == "u"
        time.sleep(0.05)
        assert not normal.done()
        post.resume()
        assert normal.result(5) == "n"
    finally:
        post.shutdown()
