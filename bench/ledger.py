#!/usr/bin/env python3
"""Rebuild the measured tables of the README and the docs/ pages from the files in results/.

    python bench/ledger.py            # rewrite every generated table where it stands
    python bench/ledger.py --check    # exit 1 if a page's table is not what the files give

A generated table lives between two markers, on any page (README.md and docs/*.md by default):
`<!-- ledger:NAME -->` and `<!-- /ledger:NAME -->`. The names:

    headline   preset, device (torch, precision), runs, accuracy mean ± std, time: the README's table
    accuracy   the same runs in full: the mean's 95% interval and one-sided p for "mean > 94%", min, max,
               fraction at 94%, epochs, time-to-94%, wall time
    studies    one table per study folder under results/ablations/
    cost       per preset: the timed PFLOP of one run (profile/flops.py) and the CPU's timed budget
    selective  selective TTA (the views only for the least sure images), from results/evaluations/

Every *.json in results/ itself (not in its folders) is a result the trainer wrote (`python
speedrun.py --out ...`). Only full-scale runs of a preset count: all 50,000 training and 10,000
test images and the preset's recipe unchanged (the seed, device, precision, memory format,
evaluation cadence and workers may differ). Runs are grouped by preset, precision and memory
format, device, and torch version. A file that is not a full-scale run of a preset stops the
script with its name: nothing is left out silently. A results folder that does not exist or
holds no result stops it too (exit 2), so a mistyped --results never empties the tables.

Every folder under results/ablations/ that holds a summary.json is a study folder of ablations/ (its
summary.json is what the study's own report gave from its results.csv); each becomes a table:
variant, accuracy, the paired difference from its reference with its 95% interval, timed seconds
and their paired difference, with the study's hardware and command.

Every *.json in results/evaluations/ is what bench/evaluate.py wrote of saved weights (each result
with the config saved with the weights). An evaluation is paired with the one full-scale run under
results/ of its preset, seed, device type and precision (the run that made the weights), so the
table's difference, selective minus all views, is of the same weights on the same test images. An
evaluation that is not of a preset's recipe, not on all 10,000 test images, or without exactly one
such run (or of a run another file evaluates too) stops the script with its name.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch

try:  # a clone without `pip install -e .`: one line that says what to do, not a traceback
    import speedrun
    import speedrun_tools
    from ablations import study  # its format of a paired difference
except ModuleNotFoundError as e:  # the project, or a dependency it would install
    print(f"error: {e.name} is not installed here: run pip install -e . in the repository root", file=sys.stderr)
    sys.exit(2)

ROOT = Path(__file__).resolve().parents[1]

# a generated block: <!-- ledger:NAME --> ... <!-- /ledger:NAME -->; NAME is a key of TABLES (below)
BLOCK = re.compile(r"<!-- ledger:([\w-]+) -->(.*?)<!-- /ledger:\1 -->", re.S)
OPENING = re.compile(r"<!-- ledger:([\w-]+) -->")
# fields a run may change without changing the recipe it measures
FREE = {"seed", "runs", "device", "precision", "channels_last", "eval_every", "workers", "data_dir", "compile",
        "compile_mode", "deterministic", "eval_batch_size"}
# fields that act only on CUDA (orthogonalize() runs Newton-Schulz in fp32 elsewhere): free off CUDA
CUDA_ONLY = {"muon_ns_precision"}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# a preset's earlier recipes (the fields they set otherwise): their results keep rows of their own
EARLIER_RECIPES = {"record": [(" of September 2025", dict(epochs=7.59, whiten_bias_epochs=0.19))]}
TARGET_ACC = 0.94  # the accuracy table's "at ≥ 94%" and p columns


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
        changes = []  # against each recipe the preset had, today's first
        for version, fields in [("", {}), *EARLIER_RECIPES.get(name, [])]:
            recipe = dataclasses.asdict(speedrun.make_config(name, **fields))
            changes.append(sorted(k for k, v in recipe.items() if k not in free and k in config and config[k] != v))
            if not changes[-1]:
                older = [f"{k}={defaults[k]}" for k, v in recipe.items()
                         if k not in free and k not in config and defaults[k] != v]
                return f"{name}{version}" + (f" (then: {', '.join(older)})" if older else "")
        changed = changes[0]
    raise ValueError(f"{source}: its config is not the recipe of {'preset ' + names[0] if len(names) == 1 else 'any preset'}"
                     + (f" (changed: {', '.join(changed)})" if len(names) == 1 else ""))


def wall_s(run: dict) -> float:
    """A run's wall time; results written before the trainer recorded wall_s give the sum of its
    timed training and its evaluations instead (the rest, model building, is under a second)."""
    return run.get("wall_s") or run["whitening_s"] + run["train_s"] + sum(e["eval_s"] or 0 for e in run["epochs"])


def result_files(folder: Path) -> list[Path]:
    """The result files in folder; ValueError naming it when it does not exist or holds none, so a
    mistyped --results stops the script instead of writing empty tables."""
    if not folder.is_dir():
        raise ValueError(f"results folder {folder} does not exist; give --results the folder of result JSON files")
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise ValueError(f"results folder {folder} holds no result (*.json); give --results the folder of result JSON files")
    return paths


def read_result(path: Path) -> dict:
    """A result file, checked to be what the trainer writes; ValueError naming the file if not."""
    try:
        result = json.loads(path.read_text())
        result["config"] = speedrun.upgrade_config(result["config"])  # results written before a field went plain
        speedrun.Config(**result["config"])
        runs, _ = result["runs"], result["environment"]["device"]
        if not isinstance(runs, list) or any(r["final_acc"] is None for r in runs if not r.get("diverged")):
            raise ValueError("a run neither finished nor diverged")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a result speedrun.py writes ({type(e).__name__}: {e}); move it out of the "
                         f"results folder") from None
    return result


def device_and_precision(result: dict) -> tuple[torch.device, str]:
    """The device type a result ran on and its compute precision there ('fp32')."""
    device = torch.device(result["environment"]["device"].split(":")[0])
    return device, DTYPE_NAMES[speedrun.compute_dtype(speedrun.Config(**result["config"]), device)]


def rows(folder: Path) -> list[dict]:
    groups: dict[tuple, list] = {}
    for path in result_files(folder):
        result = read_result(path)
        preset = preset_of(result, path.name)
        cfg = speedrun.Config(**result["config"])
        env = result["environment"]
        device, precision = device_and_precision(result)
        layout = "channels_last" if speedrun.uses_channels_last(cfg, device) else "NCHW"
        key = (preset, f"{precision}, {layout}", env["device_name"], env["torch"], cfg.epochs)
        groups.setdefault(key, []).extend(r for r in result["runs"] if not r.get("diverged"))
    out = []
    for (preset, precision, device, torch_version, epochs), runs in groups.items():
        s = speedrun.summarize(runs, TARGET_ACC)
        reached = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
        out.append(dict(preset=preset, precision=precision, device=device, torch=torch_version, runs=len(runs),
                        mean=s["acc_mean"], std=s["acc_std"], ci95=s["acc_ci95"], p=s["p_value"],
                        min=s["acc_min"], max=s["acc_max"], at_94=s["frac_at_target"],
                        epochs=epochs, budget_s=[r["full_budget_s"] for r in runs], time_to_94_s=reached,
                        wall_s=sum(wall_s(r) for r in runs) / len(runs)))
    return sorted(out, key=lambda r: (r["preset"], r["device"], r["precision"], r["torch"]))


def seconds(values: list[float]) -> str:
    """Mean and spread: '3.13 s ± 0.18' for a GPU's seconds, '61 ± 16 min' for a CPU's (whose spread
    comes mostly from the machine being shared); no spread for one run."""
    mean, std = speedrun.mean_std(values)
    if mean >= 60:
        return f"{mean / 60:.0f} ± {std / 60:.0f} min" if len(values) > 1 else f"{mean / 60:.0f} min"
    return f"{mean:.2f} s" + (f" ± {std:.2f}" if len(values) > 1 else "")


def accuracy_table(folder: Path) -> str:
    """Every group of full-scale runs with all its figures."""
    columns = ["preset", "precision, memory format", "device", "torch", "runs", "accuracy mean ± std", "mean's 95% CI",
               "p (mean > 94%)", "min", "max", "at ≥ 94%", "epochs", "timed budget", "time-to-94% (runs)", "wall time per run"]
    cells = []
    for r in rows(folder):
        to_94 = f"{seconds(r['time_to_94_s'])} ({len(r['time_to_94_s'])})" if r["time_to_94_s"] else "—"
        ci = "—" if r["ci95"] is None else f"{100 * r['ci95'][0]:.2f}..{100 * r['ci95'][1]:.2f}%"
        p = "—" if r["p"] is None else f"p = {r['p']:.2g}"
        cells.append([r["preset"], r["precision"], r["device"], r["torch"], r["runs"], accuracy(r), ci, p,
                      f"{100 * r['min']:.2f}%", f"{100 * r['max']:.2f}%", f"{100 * r['at_94']:.0f}%", f"{r['epochs']:g}",
                      seconds(r["budget_s"]), to_94, speedrun.format_duration(r["wall_s"])])
    return "\n".join(speedrun_tools.markdown_table(columns, cells))


def headline_table(folder: Path) -> str:
    """The README's short form of accuracy_table: what ran where, how often, how well, how fast."""
    columns = ["preset", "device", "torch, precision", "runs", "accuracy mean ± std", "time per run (timed budget)"]
    cells = [[r["preset"], r["device"], f"{r['torch']}, {r['precision'].split(',')[0]}", r["runs"], accuracy(r),
              seconds(r["budget_s"])] for r in rows(folder)]
    return "\n".join(speedrun_tools.markdown_table(columns, cells))


def accuracy(r: dict) -> str:
    return f"{100 * r['mean']:.2f}%" + (f" ± {100 * r['std']:.2f}" if r["runs"] > 1 else " (n = 1)")


def study_tables(folder: Path) -> str:
    """One table per study folder under folder (sorted by name), from its summary.json."""
    summaries = sorted(folder.glob("*/summary.json"))
    if not summaries:
        raise ValueError(f"{folder} holds no study folder (one with a summary.json); give --results the folder "
                         f"whose ablations/ holds the studies")
    parts = []
    for summary_path in summaries:
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
        parts += speedrun_tools.markdown_table(["variant", "change", "runs", "accuracy % mean ± std", "Δ accuracy, points (95% CI)",
                                          f"at ≥ {target:g}%", "timed s", "Δ timed s (95% CI)"], rows)
        parts.append("")
    return "\n".join(parts).rstrip("\n")


def cost_table(folder: Path) -> str:
    """Per preset, the work our timing rule covers (profile/flops.py's count of one run, each epoch at its
    images' side) and the CPU's measured timed budget, each also as a multiple of record's."""
    sys.path.insert(0, str(ROOT / "profile"))
    import flops
    pflop = {p: flops.count_run(speedrun.make_config(p))["timed_total"] / 1e15 for p in speedrun.PRESETS}
    cpu = {}
    for r in rows(folder):
        if r["device"].startswith("CPU") and r["precision"].startswith("fp32"):
            cpu.setdefault(r["preset"], r)
    budget = {p: speedrun.mean_std(r["budget_s"])[0] for p, r in cpu.items()}
    cells = []
    for p in speedrun.PRESETS:
        images, _ = speedrun.image_counts(speedrun.make_config(p))
        cpu_cell = "—" if p not in cpu else f"{seconds(cpu[p]['budget_s'])} ({cpu[p]['runs']})" + (
            f", x {budget[p] / budget['record']:.2f}" if "record" in budget else "")
        cells.append([p, f"{images:,}", f"{pflop[p]:.3f}", f"{pflop[p] / pflop['record']:.2f}", cpu_cell])
    return "\n".join(speedrun_tools.markdown_table(
        ["preset", "training images", "timed PFLOP per run", "x record", "CPU timed budget (runs), x record"], cells))


def runs_by_seed(folder: Path) -> dict[tuple, list]:
    """Every finished full-scale run under folder by (preset, device type, precision, seed)."""
    runs = {}
    for path in result_files(folder):
        result = read_result(path)
        device, precision = device_and_precision(result)
        for run in result["runs"]:
            if not run.get("diverged"):
                runs.setdefault((preset_of(result, path.name), device.type, precision, run["seed"]), []).append(run)
    return runs


def selective_table(folder: Path, results: Path) -> str:
    """Per preset, device, precision, TTA and fraction: bench/evaluate.py's accuracy of saved weights
    with the TTA views only for the least sure fraction of the test images, paired with the
    accuracy its run gave them with every image's views (see the module's docstring)."""
    runs, groups = runs_by_seed(results), {}
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise ValueError(f"{folder} holds no evaluation (*.json); write them with bench/evaluate.py --out")
    for path in paths:
        try:
            written = json.loads(path.read_text())
            evaluations = [dict(e, config=speedrun.upgrade_config(e["config"])) for e in written["results"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not an evaluation with its weights' config ({type(e).__name__}: {e}); evaluate "
                             f"the weights again with bench/evaluate.py --out") from None
        for e in evaluations:
            preset = preset_of(dict(config=e["config"], environment=written["environment"]), path.name)
            if e["test_images"] != speedrun.CIFAR10_SIZES[1]:
                raise ValueError(f"{path.name}: evaluated on {e['test_images']} test images; evaluate on all of them")
            device, precision = torch.device(e["device"]).type, DTYPE_NAMES[getattr(torch, e["precision"])]
            matched = runs.get((preset, device, precision, e["config"]["seed"]), [])
            if len(matched) != 1:
                raise ValueError(f"{path.name}: {len(matched)} full-scale runs of {preset}, seed {e['config']['seed']}, "
                                 f"{device}, {precision} under {results}; keep the one run that made the weights there")
            key = (preset, written["environment"]["device_name"], precision, e["tta"], e["tta_unsure_frac"])
            pairs = groups.setdefault(key, {})
            if id(matched[0]) in pairs:
                raise ValueError(f"{path.name}: evaluates the same run as another file; keep one of them")
            pairs[id(matched[0])] = (matched[0]["final_acc"], e["tta_acc"], e["plain_acc"])
    cells = []
    for (preset, device, precision, tta, fraction), pairs in sorted(groups.items()):
        every, selective, plain = zip(*pairs.values())
        diff, spread = speedrun.mean_std([s - a for a, s in zip(every, selective)])
        diff = f"{100 * diff:+.2f}" + (f" ± {100 * spread:.2f}" if len(pairs) > 1 else "")
        cells.append([preset, device, precision, tta, f"{100 * fraction:g}%", len(pairs), accuracies(every),
                      accuracies(selective), accuracies(plain), diff])
    return "\n".join(speedrun_tools.markdown_table(
        ["preset", "device", "precision", "TTA", "views for the least sure", "weights", "all views (the runs)",
         "selective", "plain", "selective − all views, points"], cells))


def accuracies(values) -> str:
    """Their mean ± std as the accuracy columns write it."""
    mean, std = speedrun.mean_std(values)
    return accuracy(dict(mean=mean, std=std, runs=len(values)))


TABLES = {"headline": headline_table, "accuracy": accuracy_table, "cost": cost_table,
          "studies": lambda results: study_tables(results / "ablations"),
          "selective": lambda results: selective_table(results / "evaluations", results)}


def rebuilt(page: str, results: Path, source="the page", made=None) -> str:
    """The page with every generated block rebuilt from the files under results; ValueError for a
    block of an unknown name or one without its closing marker. `made` caches tables across pages."""
    made = {} if made is None else made
    closed = {m.start() for m in BLOCK.finditer(page)}
    for m in OPENING.finditer(page):
        if m.group(1) not in TABLES:
            raise ValueError(f"{source}: unknown table <!-- ledger:{m.group(1)} -->; the tables are {', '.join(TABLES)}")
        if m.start() not in closed:
            raise ValueError(f"{source}: <!-- ledger:{m.group(1)} --> has no closing <!-- /ledger:{m.group(1)} -->")

    def table(m):
        name = m.group(1)
        if name not in made:
            made[name] = TABLES[name](results)
        return f"<!-- ledger:{name} -->\n{made[name]}\n<!-- /ledger:{name} -->"
    return BLOCK.sub(table, page)


def default_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "results", help="folder of result JSON files (default: results/)")
    p.add_argument("--pages", type=Path, nargs="+", default=None,
                   help="the Markdown pages whose tables to rewrite (default: README.md and docs/*.md)")
    p.add_argument("--check", action="store_true", help="only check that every page's tables are up to date")
    args = p.parse_args(argv)
    pages = args.pages or default_pages()
    try:
        result_files(args.results)  # a missing or empty results folder is named before anything else
        texts = {page: page.read_text() for page in pages}
        if not any(OPENING.search(text) for text in texts.values()):
            raise ValueError(f"no generated table (<!-- ledger:NAME -->) in {', '.join(map(str, pages))}")
        made = {}
        new = {page: rebuilt(text, args.results, page, made) for page, text in texts.items()}
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        p.exit(2, f"error: {e}\n")
    stale = [page for page in pages if new[page] != texts[page]]
    if args.check:
        for page in stale:
            print(f"{page} is out of date: run python bench/ledger.py", file=sys.stderr)
        return 1 if stale else 0
    for page in stale:
        speedrun.write_atomic(page, lambda tmp, text=new[page]: tmp.write_text(text))
        print(f"rewrote the tables of {page}")
    if not stale:
        print(f"every table is up to date ({', '.join(sorted(made))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
