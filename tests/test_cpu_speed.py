"""bench/cpu_speed.py measures every cell of its table, each with its ratio to fp32 NCHW."""
from bench import cpu_speed


def test_cpu_speed_measures_every_cell_with_its_ratio_to_fp32_nchw():
    medians = cpu_speed.measure(["cpu"], batch_size=16, steps=1, repeats=1)
    assert set(medians) == {("cpu", p, cl) for p, cl in cpu_speed.CELLS} and all(s > 0 for s in medians.values())
    lines = cpu_speed.table(medians, 16)
    assert len(lines) == 2 + 4 and "| cpu | fp32 | NCHW |" in lines[2] and lines[2].endswith("| 1.00x |")
