"""Restart policy: backoff growth, cap and jitter; healthy reset; intensity window.

Clock and random are injected: nothing here sleeps.
"""

from __future__ import annotations

import pytest
from fakes import FakeClock

from chatq.supervisor.policy import Decision, RestartPolicy, compute_backoff


def middle() -> float:
    """rand() at the midpoint: no jitter at all."""
    return 0.5


def lowest() -> float:
    return 0.0


def highest() -> float:
    return 1.0 - 1e-12  # random.random() stays below 1


# compute_backoff ----------------------------------------------------------


def test_no_failures_no_wait() -> None:
    assert compute_backoff(0, initial=0.1, maximum=30, rand=highest) == 0.0


def test_backoff_doubles_from_initial() -> None:
    delays = [compute_backoff(n, initial=0.1, maximum=30, rand=middle) for n in range(1, 6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])


def test_backoff_is_capped_at_maximum() -> None:
    assert compute_backoff(9, initial=0.1, maximum=30, rand=middle) == pytest.approx(25.6)
    assert compute_backoff(10, initial=0.1, maximum=30, rand=middle) == 30
    assert compute_backoff(10_000, initial=0.1, maximum=30, rand=middle) == 30


@pytest.mark.parametrize("failures", [1, 3, 12])
def test_jitter_stays_within_the_fraction(failures: int) -> None:
    base = compute_backoff(failures, initial=1.0, maximum=30, rand=middle)
    low = compute_backoff(failures, initial=1.0, maximum=30, jitter=0.2, rand=lowest)
    high = compute_backoff(failures, initial=1.0, maximum=30, jitter=0.2, rand=highest)
    assert low == pytest.approx(base * 0.8)
    assert high == pytest.approx(base * 1.2)
    assert low < base < high


def test_no_jitter_ignores_rand() -> None:
    assert compute_backoff(2, initial=1, maximum=30, jitter=0, rand=lowest) == 2
    assert compute_backoff(2, initial=1, maximum=30, jitter=0, rand=highest) == 2


def test_full_jitter_never_goes_negative() -> None:
    assert compute_backoff(3, initial=1, maximum=30, jitter=1.0, rand=lowest) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"failures": -1}, "failures"),
        ({"failures": True}, "failures"),
        ({"initial": -0.1}, "initial"),
        ({"initial": float("nan")}, "initial"),
        ({"maximum": 0.01}, "maximum"),
        ({"maximum": float("inf")}, "maximum"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
    ],
)
def test_bad_backoff_arguments(kwargs: dict[str, float], needle: str) -> None:
    args: dict[str, float] = {"failures": 1, "initial": 0.1, "maximum": 30, "jitter": 0.2}
    args.update(kwargs)
    failures = args.pop("failures")
    with pytest.raises(ValueError, match=needle):
        compute_backoff(failures, **args)  # type: ignore[arg-type]


# RestartPolicy ------------------------------------------------------------


def make_policy(clock: FakeClock, **overrides: float) -> RestartPolicy:
    settings: dict[str, float] = {
        "initial": 1.0,
        "maximum": 8.0,
        "healthy_after": 10.0,
        "max_restarts": 5,
        "window": 60.0,
    }
    settings.update(overrides)
    return RestartPolicy(**settings, clock=clock, rand=middle)  # type: ignore[arg-type]


def crash_after(policy: RestartPolicy, clock: FakeClock, ran: float) -> Decision:
    policy.on_start()
    clock.advance(ran)
    return policy.on_exit()


def crash_loop(policy: RestartPolicy, clock: FakeClock, runs: list[float]) -> list[Decision]:
    decisions = []
    for ran in runs:
        decision = crash_after(policy, clock, ran)
        decisions.append(decision)
        clock.advance(decision.delay)
    return decisions


def test_defaults_match_the_settings_defaults() -> None:
    from chatq.config.settings import SupervisorSettings

    settings = SupervisorSettings()
    clock_a, clock_b = FakeClock(), FakeClock()
    default = RestartPolicy(clock=clock_a, rand=middle)
    explicit = RestartPolicy(
        settings.backoff_initial,
        settings.backoff_max,
        settings.healthy_after,
        settings.max_restarts,
        settings.restart_window,
        clock=clock_b,
        rand=middle,
    )
    runs = [0.0] * 12 + [settings.healthy_after] + [0.0] * 3
    assert crash_loop(default, clock_a, runs) == crash_loop(explicit, clock_b, runs)
    clock = FakeClock()
    first = crash_loop(RestartPolicy(clock=clock, rand=middle), clock, [0.0])
    second = crash_loop(RestartPolicy(clock=clock, rand=middle), clock, [0.0, 0.0])
    assert first == [Decision("restart", 0.0)]  # the first restart is immediate
    assert second[1] == Decision("restart", settings.backoff_initial)


def test_quick_crashes_back_off_exponentially_up_to_the_cap() -> None:
    clock = FakeClock()
    policy = make_policy(clock, max_restarts=100)
    delays = []
    for _ in range(6):
        decision = crash_after(policy, clock, 0.5)
        assert decision.action == "restart"
        delays.append(decision.delay)
        clock.advance(decision.delay)
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert policy.failures == 6


def test_healthy_run_resets_the_backoff() -> None:
    clock = FakeClock()
    policy = make_policy(clock)
    for _ in range(3):
        clock.advance(crash_after(policy, clock, 1.0).delay)
    assert policy.failures == 3
    decision = crash_after(policy, clock, 10.0)  # exactly healthy_after
    assert decision == Decision("restart", 0.0)
    assert policy.failures == 1


def test_run_just_short_of_healthy_does_not_reset() -> None:
    clock = FakeClock()
    policy = make_policy(clock)
    clock.advance(crash_after(policy, clock, 1.0).delay)
    assert crash_after(policy, clock, 9.999) == Decision("restart", 1.0)


def test_exit_without_start_counts_as_a_quick_failure() -> None:
    clock = FakeClock()
    policy = make_policy(clock)
    assert policy.on_exit() == Decision("restart", 0.0)
    clock.advance(100)
    assert policy.on_exit() == Decision("restart", 1.0)


def test_fatal_after_more_than_max_restarts_in_the_window() -> None:
    clock = FakeClock()
    policy = make_policy(clock, max_restarts=3, window=60.0)
    for _ in range(3):
        assert crash_after(policy, clock, 1.0).action == "restart"
    assert not policy.fatal
    assert crash_after(policy, clock, 1.0) == Decision("fatal", 0.0)
    assert policy.fatal
    # Fatal sticks, whatever comes later.
    clock.advance(1000)
    assert crash_after(policy, clock, 100.0).action == "fatal"


def test_window_slides_old_exits_out() -> None:
    clock = FakeClock()
    # healthy runs: the backoff stays at `initial`; only the window matters
    policy = make_policy(clock, max_restarts=3, window=60.0, healthy_after=0.0)
    for _ in range(3):
        crash_after(policy, clock, 10.0)  # exits at +10, +20, +30
    clock.advance(40.0)  # now +70: the exit at +10 is exactly 60 s old
    assert crash_after(policy, clock, 0.0).action == "restart"
    # exits in the window: +20, +30, +70; one more at +75 makes four
    assert crash_after(policy, clock, 5.0).action == "fatal"


def test_exits_spread_wider_than_the_window_never_go_fatal() -> None:
    clock = FakeClock()
    policy = make_policy(clock, max_restarts=2, window=60.0, healthy_after=0.0)
    for _ in range(20):
        assert crash_after(policy, clock, 30.0).action == "restart"


def test_reset_revives_a_fatal_policy() -> None:
    clock = FakeClock()
    policy = make_policy(clock, max_restarts=1)
    crash_after(policy, clock, 0.0)
    assert crash_after(policy, clock, 0.0).action == "fatal"
    policy.reset()
    assert not policy.fatal
    assert policy.failures == 0
    assert crash_after(policy, clock, 0.0) == Decision("restart", 0.0)


def test_restart_delay_uses_the_injected_random() -> None:
    clock = FakeClock()
    policy = RestartPolicy(initial=1.0, maximum=8.0, clock=clock, rand=lowest)
    assert crash_after(policy, clock, 0.0).delay == 0.0
    assert crash_after(policy, clock, 0.0).delay == pytest.approx(0.8)


def test_default_crash_loop_goes_fatal_on_the_eleventh_quick_exit() -> None:
    """With the defaults, 11 instant crashes span ~25 s: inside the 60 s window."""
    clock = FakeClock()
    policy = RestartPolicy(clock=clock, rand=middle)
    decisions = crash_loop(policy, clock, [0.0] * 11)
    assert [decision.action for decision in decisions] == ["restart"] * 10 + ["fatal"]


def test_a_short_window_lets_backoff_spread_a_crash_loop_forever() -> None:
    """Backoff alone keeps 11 exits from fitting in a window shorter than ~20 s."""
    clock = FakeClock()
    policy = RestartPolicy(window=15.0, clock=clock, rand=lowest)
    decisions = crash_loop(policy, clock, [0.0] * 30)
    assert {decision.action for decision in decisions} == {"restart"}


def test_poison_message_quarantine_fits_under_the_default_intensity() -> None:
    """Three instant crashes (max_attempts) leave the tenant restarting, not fatal."""
    clock = FakeClock()
    policy = RestartPolicy(clock=clock, rand=middle)
    decisions = crash_loop(policy, clock, [0.0] * 3)
    assert [decision.action for decision in decisions] == ["restart"] * 3
    assert not policy.fatal


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"initial": -1.0}, "initial"),
        ({"maximum": 0.01}, "maximum"),
        ({"healthy_after": -1.0}, "healthy_after"),
        ({"max_restarts": -1}, "max_restarts"),
        ({"max_restarts": 2.5}, "max_restarts"),
        ({"window": 0.0}, "window"),
    ],
)
def test_bad_policy_arguments(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        RestartPolicy(**kwargs)  # type: ignore[arg-type]
