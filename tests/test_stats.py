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
def test_student_t_survival_function(t, df, p):
    assert speedrun.student_t_sf(t, df) == pytest.approx(p, abs=2e-6)


def test_student_t_ppf_inverts_the_cdf():
    for q, df in [(0.975, 4), (0.95, 19), (0.5, 3), (0.01, 8)]:
        t = speedrun.student_t_ppf(q, df)
        assert 1 - speedrun.student_t_sf(t, df) == pytest.approx(q, abs=1e-9)
    assert speedrun.student_t_ppf(0.975, 4) == pytest.approx(2.776445, abs=1e-5)


def test_one_sided_t_test_and_confidence_interval():
    values = [0.941, 0.943, 0.939, 0.944, 0.942]
    m, s = speedrun.mean_std(values)
    t, p = speedrun.one_sided_t_test(values, 0.94)
    assert t == pytest.approx((m - 0.94) / (s / math.sqrt(5)))
    assert p == pytest.approx(speedrun.student_t_sf(t, 4))
    lo, hi = speedrun.confidence_interval(values)
    assert lo < m < hi and (hi - lo) / 2 == pytest.approx(speedrun.student_t_ppf(0.975, 4) * s / math.sqrt(5))
    assert speedrun.one_sided_t_test([0.95], 0.94) == (None, None)
    assert speedrun.one_sided_t_test([0.93, 0.93], 0.94) == (-math.inf, 1.0)


def test_summary_of_runs():
    runs = [dict(final_acc=a, time_to_target_s=t) for a, t in [(0.945, 3.0), (0.938, None), (0.941, 3.4)]]
    s = speedrun.summarize(runs, 0.94)
    assert s["runs"] == 3 and s["runs_reaching_target"] == 2
    assert s["acc_mean"] == pytest.approx(0.9413333) and s["acc_min"] == 0.938 and s["acc_max"] == 0.945
    assert s["frac_at_target"] == pytest.approx(2 / 3)
    assert s["time_to_target_mean_s"] == pytest.approx(3.2) and s["time_to_target_std_s"] == pytest.approx(math.sqrt(0.08))
    assert s["p_value"] == pytest.approx(speedrun.one_sided_t_test([0.945, 0.938, 0.941], 0.94)[1])
