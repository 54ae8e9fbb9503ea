#!/usr/bin/env python3
"""Rebuild the README's measured tables from the files in results/: accuracy and time, and what each trick is worth.

    python bench/ledger.py            # rewrite both tables between the README's markers
    python bench/ledger.py --check    # exit 1 if the README's tables are not what the files give

Every *.json under results/ is a result the trainer wrote (`python speedrun.py --out ...`). Only
full-scale runs of a preset count: all 50,000 training and 10,000 test images and the preset's
recipe unchanged (the seed, device, precision, memory format, evaluation cadence and workers may
differ). Runs are grouped by preset, precision and memory format, device, and torch version; each
row gives the number of runs, the mean, spread, min and max of the final accuracy, the fraction at
or above 94%, the epochs, the timed budget (whitening + every epoch + the last evaluation, the
timer's rule), the time-to-94% of the runs that reached it, and the mean wall time of a run. A
file that is not a full-scale run of a preset stops the script with its name: nothing is left
out silently.

Every folder under results/ablations/ is a study folder of ablations/ (its summary.json is what
the study's own report gave from its results.csv); each becomes a table between the README's
studies markers: variant, accuracy, the paired difference from its reference with its 95%
interval, timed seconds and their paired difference, with the study's hardware and command.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import speedrun  # noqa: E402
from ablations import study  # noqa: E402  (its format of a paired difference)

START, END = "<!-- ledger:start (bench/ledger.py writes this table) -->", "<!-- ledger:end -->"
STUDIES_START, STUDIES_END = "<!-- studies:start (bench/ledger.py writes these tables) -->", "<!-- studies:end -->"
# fields a run may change without changing the recipe it measures
FREE = {"seed", "runs", "device", "precision", "channels_last", "eval_every", "workers", "data_dir", "compile",
        "compile_mode", "deterministic", "eval_batch_size"}
# fields that act only on CUDA (orthogonalize() runs Newton-Schulz in fp32 elsewhere): free off CUDA
CUDA_ONLY = {"muon_ns_precision"}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TARGET_ACC = 0.94  # the accuracy table's "at ≥ 94%" column


def preset_of(result: dict, source) -> str:
    """The preset a full-scale result ran, checked against the recipe; ValueError if none. A field
    the file does not have (it was added to Config later) had its default's behaviour; where that
    differs from today's recipe, the row says so: 'record (then: muon_ns_precision=bf16)'."""
    config = result["config"]
    if config.get("subset") or config.get("test_subset"):
        raise ValueError(f"{source}: not a full-scale run (subset {config.get('subset')}, test_subset "
                         f"{config.get('test_subset')}); keep only full-scale results under results/")
    names = [result["preset"]] if result.get("preset") else list(speedrun.PRESETS)
    defaults = dataclasses.asdict(speedrun.Config())
    free = FREE if result["environment"]["device"].startswith("cuda") else FREE | CUDA_ONLY
    for name in names:
        recipe = dataclasses.asdict(speedrun.make_config(name))
        changed = sorted(k for k, v in recipe.items() if k not in free and k in config and config[k] != v)
        if not changed:
            older = [f"{k}={defaults[k]}" for k, v in recipe.items()
                     if k not in free and k not in config and defaults[k] != v]
            return f"{name} (then: {', '.join(older)})" if older else name
    raise ValueError(f"{source}: its config is not the recipe of preset {names[0] if len(names) == 1 else 'any preset'}"
                     + (f" (changed: {', '.join(changed)})" if len(names) == 1 else ""))


def wall_s(run: dict) -> float:
    """A run's wall time; results written before the trainer recorded wall_s give the sum of its
    timed training and its evaluations instead (the rest, model building, is under a second)."""
    return run.get("wall_s") or run["whitening_s"] + run["train_s"] + sum(e["eval_s"] or 0 for e in run["epochs"])


def read_result(path: Path) -> dict:
    """A result file, checked to be what the trainer writes; ValueError naming the file if not."""
    try:
        result = json.loads(path.read_text())
        speedrun.Config(**result["config"])
        runs, _ = result["runs"], result["environment"]["device"]
        if not isinstance(runs, list) or any(r["final_acc"] is None for r in runs if not r.get("diverged")):
            raise ValueError("a run neither finished nor diverged")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a result speedrun.py writes ({type(e).__name__}: {e}); move it out of the "
                         f"results folder") from None
    return result


def rows(folder: Path) -> list[dict]:
    groups: dict[tuple, list] = {}
    if not folder.is_dir():
        raise ValueError(f"--results {folder} is not a folder; pass the folder of result JSON files")
    if not any(folder.glob("*.json")):
        raise ValueError(f"--results {folder} holds no result (*.json); pass the folder of result JSON files")
    for path in sorted(folder.glob("*.json")):
        result = read_result(path)
        preset = preset_of(result, path.name)
        cfg = speedrun.Config(**result["config"])
        env = result["environment"]
        precision = DTYPE_NAMES[speedrun.compute_dtype(cfg, torch.device(env["device"].split(":")[0]))]
        layout = "channels_last" if speedrun.uses_channels_last(cfg, torch.device(env["device"].split(":")[0])) else "NCHW"
        key = (preset, f"{precision}, {layout}", env["device_name"], env["torch"], cfg.epochs)
        groups.setdefault(key, []).extend(r for r in result["runs"] if not r.get("diverged"))
    out = []
    for (preset, precision, device, torch_version, epochs), runs in groups.items():
        s = speedrun.summarize(runs, TARGET_ACC)
        reached = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
        out.append(dict(preset=preset, precision=precision, device=device, torch=torch_version, runs=len(runs),
                        mean=s["acc_mean"], std=s["acc_std"], min=s["acc_min"], max=s["acc_max"],
                        at_94=s["frac_at_target"],
                        epochs=epochs, budget_s=[r["full_budget_s"] for r in runs], time_to_94_s=reached,
                        wall_s=sum(wall_s(r) for r in runs) / len(runs)))
    return sorted(out, key=lambda r: (r["preset"], r["device"], r["precision"], r["torch"]))


def seconds(values: list[float]) -> str:
    """Mean and spread: '3.13 s ± 0.18' for a GPU's seconds, '36 min' for a CPU's (whose spread
    comes mostly from the machine being shared); no spread for one run."""
    mean, std = speedrun.mean_std(values)
    if mean >= 60:
        return speedrun.format_duration(mean)
    return f"{mean:.2f} s" + (f" ± {std:.2f}" if len(values) > 1 else "")


def table(folder: Path) -> str:
    columns = ["preset", "precision, memory format", "device", "torch", "runs", "accuracy mean ± std", "min", "max",
               "at ≥ 94%", "epochs", "timed budget", "time-to-94% (runs)", "wall time per run"]
    cells = []
    for r in rows(folder):
        spread = f" ± {100 * r['std']:.2f}" if r["runs"] > 1 else " (n = 1)"
        to_94 = f"{seconds(r['time_to_94_s'])} ({len(r['time_to_94_s'])})" if r["time_to_94_s"] else "—"
        cells.append([r["preset"], r["precision"], r["device"], r["torch"], r["runs"], f"{100 * r['mean']:.2f}%{spread}",
                      f"{100 * r['min']:.2f}%", f"{100 * r['max']:.2f}%", f"{100 * r['at_94']:.0f}%", f"{r['epochs']:g}",
                      seconds(r["budget_s"]), to_94, speedrun.format_duration(r["wall_s"])])
    if not cells:
        cells.append(["(no full-scale result yet)"] + [""] * (len(columns) - 1))
    return "\n".join([START, *speedrun.markdown_table(columns, cells), END])


def study_tables(folder: Path) -> str:
    """One table per study folder under folder (sorted by name), from its summary.json."""
    parts = [STUDIES_START]
    for summary_path in sorted(folder.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        where = summary_path.parent.relative_to(ROOT) if summary_path.is_relative_to(ROOT) else summary_path.parent
        target = 100 * summary["variants"][0]["target_acc"]
        parts += [f"**{summary['title']}** (`{where}/`): {', '.join(summary['hardware'])}, torch "
                  f"{', '.join(summary['torch'])}, seeds {', '.join(map(str, summary['seeds']))} for every variant; "
                  f"`{summary['commands'][0]}`", ""]
        rows = []
        for v in summary["variants"]:
            runs = f"{v['runs']}" + (f" ({v['diverged']} diverged)" if v.get("diverged") else "")
            acc = "diverged (every run)" if v["acc_mean"] is None else f"{100 * v['acc_mean']:.2f} ± {100 * (v['acc_std'] or 0):.2f}"
            timed = "—" if v["timed_mean_s"] is None else f"{v['timed_mean_s']:.2f}"
            rows.append([v["name"], v["change"], runs, acc, study.format_delta(v.get("delta_acc"), 100),
                         f"{100 * v['frac_at_target']:.0f}%", timed, study.format_delta(v.get("delta_timed_s"), 1)])
        parts += speedrun.markdown_table(["variant", "change", "runs", "accuracy % mean ± std", "Δ accuracy, points (95% CI)",
                                          f"at ≥ {target:g}%", "timed s", "Δ timed s (95% CI)"], rows)
        parts.append("")
    if len(parts) == 1:
        parts += ["(no study under results/ablations/ yet)", ""]
    return "\n".join(parts + [STUDIES_END])


def replace_between(readme: str, start: str, end: str, new_text: str) -> str:
    if start not in readme or end not in readme:
        raise ValueError(f"the README has no markers {start} and {end}; put them where the table goes")
    head, rest = readme.split(start, 1)
    return head + new_text + rest.split(end, 1)[1]


def rebuilt(readme: str, results: Path) -> str:
    """The README with both measured tables rebuilt from the files under results."""
    readme = replace_between(readme, START, END, table(results))
    return replace_between(readme, STUDIES_START, STUDIES_END, study_tables(results / "ablations"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "results", help="folder of result JSON files (default: results/)")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README to rewrite (default: README.md)")
    p.add_argument("--check", action="store_true", help="only check that the README's table is up to date")
    args = p.parse_args(argv)
    try:
        readme = args.readme.read_text()
        new = rebuilt(readme, args.results)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        p.exit(2, f"error: {e}\n")
    if args.check:
        if new != readme:
            print(f"{args.readme} is out of date: run python bench/ledger.py", file=sys.stderr)
            return 1
        return 0
    if new != readme:
        speedrun.write_atomic(args.readme, lambda tmp: tmp.write_text(new))
    print(table(args.results))
    print(study_tables(args.results / "ablations"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
