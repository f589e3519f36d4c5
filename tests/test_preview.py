"""The viewers' stream pacer: at most one message per key and interval, the newest one always follows."""

import math

from stm_live.preview import PreviewPacer

RAW = ("forward", "Z", "raw")
RECON = ("forward", "Z", "reconstructed")


def test_a_message_too_soon_is_held_and_replaced_by_a_newer_one():
    pacer = PreviewPacer(10.0)
    assert pacer.offer(RAW, ["a"], now=0.0) == ["a"]
    assert pacer.offer(RAW, ["b"], now=0.03) is None
    assert pacer.offer(RAW, ["c"], now=0.05) is None
    assert pacer.next_due() == 0.1
    assert pacer.due(0.09) == []
    assert pacer.due(0.1) == [["c"]]  # the newest, never the one it replaced
    assert pacer.next_due() == math.inf
    assert pacer.offer(RAW, ["d"], now=0.15) is None  # the held one went at 0.1: the next may go at 0.2
    assert pacer.due(0.2) == [["d"]]


def test_keys_are_paced_apart_and_zero_means_every_message():
    pacer = PreviewPacer(10.0)
    assert pacer.offer(RAW, ["raw"], now=0.0) == ["raw"]
    assert pacer.offer(RECON, ["reconstructed"], now=0.001) == ["reconstructed"]
    unpaced = PreviewPacer(0.0)
    assert all(unpaced.offer(RAW, [i], now=0.0) == [i] for i in range(5))


def test_a_message_after_a_quiet_interval_goes_at_once():
    pacer = PreviewPacer(30.0)
    for step in range(10):
        assert pacer.offer(RAW, [step], now=step * 0.1) == [step]
    assert pacer.due(10.0) == [] and not pacer._next  # idle keys are forgotten
