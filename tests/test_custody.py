"""The resend policy: re-send on evidence of loss, never just because a backlog is slow."""

from __future__ import annotations

from civicmesh.custody import MAX_BACKOFF, PROBE_SIZE, REORDER_MS, ResendPolicy


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def test_a_slow_backlog_is_not_sent_again() -> None:
    clock = Clock()
    policy = ResendPolicy(60, clock=clock)
    # Messages sent at t=0..100 s; receipts keep coming, but only for messages sent at
    # t=0..10 s: the receiver is working through its queue in order.
    start = clock.ms
    for step in range(10):
        clock.ms = start + 100_000 + step * 30_000
        policy.confirmed(start + step * 1_000)
        plan = policy.plan()
        assert plan.probe == 0, "receipts are flowing: no probe"
        # Only what was sent before the newest confirmed one is suspect.
        assert plan.before_ms <= start + step * 1_000 - REORDER_MS


def test_a_message_overtaken_by_later_receipts_is_sent_again() -> None:
    clock = Clock()
    policy = ResendPolicy(60, clock=clock)
    lost_sent = clock.ms
    clock.ms += 5_000
    later_sent = clock.ms
    clock.ms += 1_000
    policy.confirmed(later_sent)
    assert policy.plan().before_ms < lost_sent, "too young to call lost"
    clock.ms = lost_sent + 61_000
    assert policy.plan().before_ms > lost_sent


def test_a_quiet_path_gets_probes_that_back_off() -> None:
    clock = Clock()
    policy = ResendPolicy(10, clock=clock)
    assert policy.plan().probe == 0
    clock.ms += 10_000
    assert policy.plan().probe == PROBE_SIZE
    gaps = []
    for _ in range(8):
        policy.probed()
        waited = 0
        while policy.plan().probe == 0:
            clock.ms += 1_000
            waited += 1_000
        gaps.append(waited)
    assert gaps[:3] == [20_000, 40_000, 80_000]
    assert max(gaps) == 10_000 * MAX_BACKOFF
    policy.confirmed(clock.ms)  # a receipt: the path is alive again, backoff resets
    policy.probed()
    clock.ms += 20_000
    assert policy.plan().probe == PROBE_SIZE
