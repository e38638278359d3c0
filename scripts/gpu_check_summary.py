"""Collect what scripts/gpu_check.sh measured into RESULTS/summary.json, and print it briefly.

    python scripts/gpu_check_summary.py --work SCRATCH --results RESULTS --mode cuda --seconds 412.3
    python scripts/gpu_check_summary.py --junit tests.xml skipped     # one count of a pytest JUnit report

Standard library only, so it still reports when PyTorch itself is what broke. Exit status 1 unless
every step of the check passed.
"""
import argparse
import json
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

STEPS = ("preflight", "tests", "train", "evaluate", "predict", "ddp")


def read_json(path: Path):
    """The file's JSON, or None when it was not written (its step failed or never ran)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def junit(path: Path):
    """{tests, failures, errors, skipped} of a pytest --junitxml report; None without one."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def history(run_dir: Path) -> list:
    """metrics.jsonl's records: one per completed epoch."""
    return [json.loads(line) for line in read_text(run_dir / "metrics.jsonl").splitlines() if line.strip()]


def run_facts(run_dir: Path, log: str) -> dict:
    """A training run's epochs (loss, Dice, speed, time), precision and device as its log states them."""
    records = history(run_dir)
    facts = {"epochs_done": len(records), "checkpoint": str(run_dir / "best.pt") if (run_dir / "best.pt").is_file()
             else None}
    match = re.search(r"run \S+: (\S+), (\w+)", log)
    if match:
        facts.update(device=match.group(1), precision=match.group(2))
    keep = ("epoch", "train_loss", "val_loss", "val_dice_full_res", "val_dice_model_res", "images_per_s", "seconds")
    facts["epochs"] = [{k: round(r[k], 5) if isinstance(r[k], float) else r[k] for k in keep if k in r}
                       for r in records]
    config = read_json(run_dir / "config.json") or {}
    facts["options"] = {k: config[k] for k in ("image_width", "image_height", "crop_width", "crop_height",
                                                "base_channels", "batch_size", "compile", "precision", "sync_bn",
                                                "num_workers") if k in config}
    return facts


def evaluate_facts(work: Path):
    summary = read_json(work / "eval" / "summary.json")
    if summary is None:
        return None
    return {"images": summary["full_res"]["images"], "cars": summary.get("cars"), "precision": summary.get("precision"),
            "dice_full_res": summary["full_res"]["dice"], "iou_full_res": summary["full_res"]["iou"],
            "dice_model_res": summary["model_res"]["dice"], "seconds": summary.get("seconds")}


def ddp_facts(work: Path, log: str, warnings: list):
    facts = run_facts(work / "runs" / "ddp", log)
    match = re.search(r"distributed: (\d+) process\(es\), (\w+) backend", log)
    facts["process_group"] = {"processes": int(match.group(1)), "backend": match.group(2)} if match else None
    if match is None and facts["epochs_done"]:
        warnings.append("ddp: train.py ran under torchrun without joining a process group, so NCCL and "
                        "DistributedDataParallel were not exercised")
    return facts


def steps(work: Path) -> list:
    """Each step's record from steps.tsv, in order, with the notes it left."""
    rows = []
    for line in read_text(work / "steps.tsv").splitlines():
        name, status, seconds, rc = line.split("\t")
        notes = [n for n in read_text(work / "notes" / name).splitlines() if n]
        rows.append({"name": name, "status": status, "seconds": float(seconds), "exit": int(rc), "notes": notes})
    return rows


def summarise(work: Path, mode: str, seconds: float) -> dict:
    records, warnings = steps(work), []
    logs = {name: read_text(work / "logs" / f"{name}.log") for name in STEPS}
    ran = {r["name"] for r in records}
    missing = [name for name in STEPS if name not in ran]
    summary = {"ok": bool(records) and not missing and all(r["status"] == "ok" for r in records),
               "mode": mode, "seconds": round(seconds, 1), "commit": read_text(work / "commit").strip() or None,
               "uncommitted_changes": bool(read_text(work / "changes").strip()),
               "device": read_json(work / "device.json"), "steps": records, "not_run": missing,
               "tests": {"cuda_marked": junit(work / "tests-cuda.xml"), "mocked": junit(work / "tests-mocked.xml")},
               "train": run_facts(work / "runs" / "amp", logs["train"]), "evaluate": evaluate_facts(work),
               "predict": read_json(work / "predict.json"), "ddp": ddp_facts(work, logs["ddp"], warnings)}
    summary["warnings"] = warnings + [f"{r['name']}: {n}" for r in records for n in r["notes"]]
    return summary


def report(summary: dict) -> str:
    """A few lines for the log: each step's status and time, then the headline numbers."""
    lines = [f"gpu_check ({summary['mode']}): {'PASSED' if summary['ok'] else 'FAILED'} in {summary['seconds']} s"]
    lines += [f"  {r['name']:<10} {r['status']:<8} {r['seconds']:7.1f} s" for r in summary["steps"]]
    lines += [f"  {name:<10} not run" for name in summary["not_run"]]
    train, evaluated = summary["train"], summary["evaluate"]
    if train["epochs"]:
        last = train["epochs"][-1]
        lines.append(f"train: {train['epochs_done']} epoch(s), {train.get('precision')}, last "
                     f"{last.get('images_per_s', 0):.1f} img/s, val Dice {last.get('val_dice_full_res')}")
    if evaluated:
        lines.append(f"evaluate: full-res Dice {evaluated['dice_full_res']:.5f} on {evaluated['images']} images")
    for row in summary["predict"] or []:
        lines.append(f"predict ({row['model']}): {row['images_per_s']} images/s over {row['images']} photos")
    lines += [f"warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", nargs=2, metavar=("XML", "COUNT"), help="print one count of a JUnit report")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--results", type=Path)
    parser.add_argument("--mode", default="cuda")
    parser.add_argument("--seconds", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.junit:
        counts = junit(Path(args.junit[0]))
        print(counts[args.junit[1]] if counts else 0)
        return 0
    if args.work is None or args.results is None:
        parser.error("--work and --results are required")
    summary = summarise(args.work, args.mode, args.seconds)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(report(summary))
    print(f"wrote {args.results / 'summary.json'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
