"""The statistics behind the multi-run summary."""
import math

import pytest

import speedrun


@pytest.mark.parametrize("t,df,p", [
    (1.0, 1, 0.25),           # Cauchy: 1/2 - atan(1)/pi
    (0.0, 7, 0.5),
    (1.812461, 10, 0.05),     # t-table critical values
    (2.527977, 20, 0.01),
    (1.644854, 1e7, 0.05),    # the normal limit
    (-1.812461, 10, 0.95),
])
def test_student_t_survival_function_matches_tabulated_values(t, df, p):
    assert speedrun.student_t_sf(t, df) == pytest.approx(p, abs=2e-6)


def test_student_t_ppf_inverts_the_cdf():
    for q, df in [(0.975, 4), (0.95, 19), (0.5, 3), (0.01, 8)]:
        t = speedrun.student_t_ppf(q, df)
        assert 1 - speedrun.student_t_sf(t, df) == pytest.approx(q, abs=1e-9)
    assert speedrun.student_t_ppf(0.975, 4) == pytest.approx(2.776445, abs=1e-5)


def test_t_test_and_interval_follow_their_formulas_and_degenerate_cases():
    values = [0.941, 0.943, 0.939, 0.944, 0.942]
    m, s = speedrun.mean_std(values)
    t, p = speedrun.one_sided_t_test(values, 0.94)
    assert t == pytest.approx((m - 0.94) / (s / math.sqrt(5)))
    assert p == pytest.approx(speedrun.student_t_sf(t, 4))
    lo, hi = speedrun.confidence_interval(values)
    assert lo < m < hi and (hi - lo) / 2 == pytest.approx(speedrun.student_t_ppf(0.975, 4) * s / math.sqrt(5))
    assert speedrun.one_sided_t_test([0.95], 0.94) == (None, None)
    assert speedrun.one_sided_t_test([0.93, 0.93], 0.94) == (-math.inf, 1.0)


def test_summary_counts_runs_at_the_target_and_averages_accuracy_and_time():
    runs = [dict(final_acc=a, time_to_target_s=t) for a, t in [(0.945, 3.0), (0.938, None), (0.941, 3.4)]]
    s = speedrun.summarize(runs, 0.94)
    assert s["runs"] == 3 and s["runs_reaching_target"] == 2
    assert s["acc_mean"] == pytest.approx(0.9413333) and s["acc_min"] == 0.938 and s["acc_max"] == 0.945
    assert s["frac_at_target"] == pytest.approx(2 / 3)
    assert s["time_to_target_mean_s"] == pytest.approx(3.2) and s["time_to_target_std_s"] == pytest.approx(math.sqrt(0.08))
    assert s["p_value"] == pytest.approx(speedrun.one_sided_t_test([0.945, 0.938, 0.941], 0.94)[1])


def test_a_single_run_has_no_spread_or_interval_and_says_n_is_1():
    s = speedrun.summarize([dict(seed=0, final_acc=0.93, time_to_target_s=None)], 0.94)
    assert s["acc_std"] is None and s["acc_ci95"] is None and s["p_value"] is None
    text = "\n".join(speedrun.summary_lines(s))
    assert "n = 1" in text and "std 0.00" not in text


def test_accuracy_interval_stays_within_0_and_100_percent():
    s = speedrun.summarize([dict(seed=k, final_acc=a, time_to_target_s=None) for k, a in enumerate([0.0, 0.01, 0.3])], 0.94)
    lo, hi = s["acc_ci95"]
    assert lo == 0.0 and 0 < hi <= 1


def test_diverged_runs_count_as_runs_but_not_in_the_accuracy():
    runs = [dict(seed=0, final_acc=0.95, time_to_target_s=3.0), dict(seed=1, final_acc=0.93, time_to_target_s=None),
            dict(seed=2, final_acc=None, time_to_target_s=None, diverged=True, diverged_epoch=3)]
    s = speedrun.summarize(runs, 0.94)
    assert s["runs"] == 3 and s["diverged"] == 1 and s["diverged_seeds"] == [2]
    assert s["acc_mean"] == pytest.approx(0.94) and s["frac_at_target"] == pytest.approx(1 / 3)
    assert any("1 of 3 runs diverged (seeds 2)" in line for line in speedrun.summary_lines(s))
    everything_diverged = speedrun.summarize(runs[2:], 0.94)
    assert everything_diverged["acc_mean"] is None
    assert "every one diverged" in speedrun.summary_lines(everything_diverged)[0]


def test_equal_accuracies_give_no_infinite_t_in_the_summary():
    s = speedrun.summarize([dict(seed=k, final_acc=0.1, time_to_target_s=None) for k in range(3)], 0.94)
    text = "\n".join(speedrun.summary_lines(s))
    assert "inf" not in text and "not defined, every run has the same accuracy" in text


def test_verdict_speaks_of_1_epoch_not_1_epochs():
    cfg = speedrun.make_config(epochs=1)
    assert "not reached in 1 epoch " in speedrun.verdict(dict(seed=0, final_acc=0.5, time_to_target_s=None), cfg)
    assert "in 10 epochs" in speedrun.verdict(dict(seed=0, final_acc=0.5, time_to_target_s=None), speedrun.make_config())
