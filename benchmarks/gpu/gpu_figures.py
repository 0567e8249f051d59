"""Figures of the one-call GPU check (benchmarks/gpu/gpu_train_check.sh): reads what its stages left in
the work folder and writes one JSON, then prints a summary table.

    python benchmarks/gpu/gpu_figures.py --work /tmp/gtc --json $OUT/gpu_figures.json --bf16 D --fp8 D --ckpt D
        [--warmup 5] [--split 20] [--budget 600]

Throughput (tokens/s, step time, MFU) is the median over the logged steps after the first `--warmup`
(train.log_every=1, so every step is logged; a step's tokens_per_s is measured from its start to the
host-side end of its optimizer step, eval and checkpoint excluded). MFU is given twice: against the
1024^3 bf16 matmul peak train.py measures at start (metrics.jsonl's own `mfu`) and against the 8192^3
peak benchmarks/bench_gpu.py measured in the same session. Peak memory:
torch.cuda.max_memory_allocated/reserved of the training process (benchmarks/gpu/gpu_sitecustomize.py)
and the largest nvidia-smi memory.used sample during the run (whole GPU: context and allocator cache
included). Everything missing stays null.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

GIB = 2 ** 30


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def med(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def rnd(x, n=4):
    return None if x is None else round(x, n)


def stages(work: Path) -> dict:
    out = {}
    for line in text(work / "stages.tsv").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            out[parts[0]] = {"rc": None if parts[1] == "" else int(parts[1]), "seconds": float(parts[2]),
                             "note": parts[3] if len(parts) > 3 else ""}
    return out


def bench(log: str) -> dict:
    b = {}
    m = re.search(r"measured (\w+) matmul peak: ([\d.]+) TFLOP/s", log)
    if m:
        b["matmul_dtype"], b["matmul_peak_tflops"] = m.group(1), float(m.group(2))
    for name, ms, tps, mfu in re.findall(r"^\s*(bf16|fp32|fp8): step\s+([\d.]+) ms\s+([\d.]+) tokens/s"
                                         r"\s+MFU\s+([\d.]+)%", log, re.M):
        b[name] = {"step_ms": float(ms), "tokens_per_s": float(tps), "mfu": float(mfu) / 100}
    m = re.search(r"fp8/\w+ step time ratio: ([\d.]+)", log)
    if m:
        b["fp8_step_time_ratio"] = float(m.group(1))
    m = re.search(r"^fp8 backend: (.*)$", log, re.M)
    if m:
        b["fp8_backend"] = m.group(1).strip()
    m = re.search(r"^device (.*), torch (\S+), config (\S+), batch (\d+) x (\d+)", log, re.M)
    if m:
        b.update(device=m.group(1), config=m.group(3), batch=int(m.group(4)), seq=int(m.group(5)))
    m = re.search(r"(\d+) passed", log)
    b["tests_passed"] = int(m.group(1)) if m else None
    m = re.search(r"(\d+) failed", log)
    b["tests_failed"] = int(m.group(1)) if m else 0 if m is None and b.get("tests_passed") is not None else None
    m = re.search(r"(\d+) skipped", log)
    b["tests_skipped"] = int(m.group(1)) if m else 0
    return b


def memory(work: Path, tag: str) -> dict:
    recs = [r for r in read_jsonl(work / "memlog.jsonl") if r.get("tag") == tag]
    r = recs[-1] if recs else {}
    smi = [float(x) for x in text(work / f"smi_{tag}.txt").split() if re.fullmatch(r"[\d.]+", x)]
    idle = [float(x) for x in text(work / "smi_idle.txt").split() if re.fullmatch(r"[\d.]+", x)]
    return {"torch_max_allocated_gib": rnd(r["max_allocated"] / GIB, 2) if "max_allocated" in r else None,
            "torch_max_reserved_gib": rnd(r["max_reserved"] / GIB, 2) if "max_reserved" in r else None,
            "host_max_rss_gib": rnd(r["max_rss_bytes"] / GIB, 2) if "max_rss_bytes" in r else None,
            "nvidia_smi_max_used_gib": rnd(max(smi) / 1024, 2) if smi else None,
            "nvidia_smi_idle_used_gib": rnd(min(idle) / 1024, 2) if idle else None,
            "nvidia_smi_samples": len(smi)}


def run_figures(recs: list[dict], run_json, log: str, warmup: int, bench_peak_tflops, upto=None,
                after=None) -> dict:
    if upto is not None:
        recs = [r for r in recs if r.get("step", 0) <= upto]
    if after is not None:
        recs = [r for r in recs if r.get("step", 0) > after]
    info = run_json or {}
    tps_step = info.get("tokens_per_step")
    first = min((r["step"] for r in recs), default=None)
    steady = [r for r in recs if first is not None and r["step"] > first + warmup - 1 and r["step"] > warmup]
    tps = med([r.get("tokens_per_s") for r in steady])
    f = {"steps_logged": len(recs), "first_step": first, "last_step": max((r["step"] for r in recs), default=None),
         "steps_in_median": len(steady), "tokens_per_step": tps_step,
         "tokens_per_s_median": rnd(tps, 1),
         "step_time_s_median": rnd(tps_step / tps, 4) if tps and tps_step else None,
         "mfu_median_vs_train_peak": rnd(med([r.get("mfu") for r in steady])),
         "train_peak_tflops": rnd(info["peak_flops"] / 1e12, 3) if info.get("peak_flops") else None,
         "flops_per_token": info.get("flops_per_token"), "params": info.get("params"),
         "mfu_median_vs_bench_peak": (rnd(tps * info["flops_per_token"] / (bench_peak_tflops * 1e12))
                                      if tps and info.get("flops_per_token") and bench_peak_tflops else None)}
    by_step = {r["step"]: r for r in recs}
    last = by_step.get(f["last_step"], {})
    f.update(loss_first=rnd(by_step.get(first, {}).get("loss")), loss_last=rnd(last.get("loss")),
             lm_loss_last=rnd(last.get("lm_loss")), val_loss_last=rnd(last.get("val_loss")),
             lr_last=last.get("lr"), grad_norm_last=rnd(last.get("grad_norm")),
             skipped_steps=last.get("skipped_steps"),
             expert_load_imbalance_last=[round(x, 2) for x in last.get("expert_load_imbalance", [])] or None)
    m = re.search(r"^(fp8: backend .*)$", log, re.M)
    f["fp8_line"] = m.group(1).strip() if m else None
    return f


def lr_expected(run_json, step0: int):
    """lr of 0-based optimizer step `step0` from the run's train config (parallel.engine.lr_at)."""
    try:
        from model.schedules import lr_at
        t = SimpleNamespace(**run_json["config"]["train"])
        return lr_at(step0, t)
    except Exception:  # noqa: BLE001 - figure left null
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--bf16", required=True, help="bf16 throughput run dir (no checkpoint)")
    ap.add_argument("--fp8", required=True, help="fp8 throughput run dir (no checkpoint)")
    ap.add_argument("--ckpt", required=True, help="the small-checkpoint run dir (saved at --split, resumed in place)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--split", type=int, default=20, help="step the save stage stops at (train.stop_at)")
    ap.add_argument("--budget", type=float, default=None, help="the script's budget in seconds")
    a = ap.parse_args()
    w = Path(a.work)
    st = stages(w)
    b = bench(text(w / "gpu_check.log"))
    peak = b.get("matmul_peak_tflops")
    bf16_dir, fp8_dir, ckpt_dir = Path(a.bf16), Path(a.fp8), Path(a.ckpt)
    ckpt_first = read_jsonl(w / "metrics_ckpt_first.jsonl")
    bf16_all = read_jsonl(ckpt_dir / "metrics.jsonl")      # the small run, saved and resumed (named as before)
    run_resume = read_json(ckpt_dir / "run.json")
    logs = {k: text(w / f"{k}.log") for k in ("bf16", "fp8", "gemm", "sdpa", "save", "resume", "export", "install",
                                               "cache")}

    runs = {"bf16": run_figures(read_jsonl(bf16_dir / "metrics.jsonl"), read_json(bf16_dir / "run.json"),
                                logs["bf16"], a.warmup, peak),
            "fp8": run_figures(read_jsonl(fp8_dir / "metrics.jsonl"), read_json(fp8_dir / "run.json"), logs["fp8"],
                               a.warmup, peak),
            "save": run_figures(ckpt_first, read_json(w / "run_ckpt_first.json"), logs["save"], 0, peak, upto=a.split),
            "resume": run_figures(bf16_all, run_resume, logs["resume"], 0, peak, after=a.split)}
    for tag in runs:
        runs[tag]["rc"] = st.get(tag, {}).get("rc")
        runs[tag]["seconds"] = st.get(tag, {}).get("seconds")
        runs[tag]["peak_memory"] = memory(w, tag)

    bf, f8 = runs["bf16"], runs["fp8"]
    cmp = {"step_time_ratio_fp8_over_bf16": (rnd(f8["step_time_s_median"] / bf["step_time_s_median"])
                                              if f8["step_time_s_median"] and bf["step_time_s_median"] else None),
           "loss_at_end_bf16": bf["loss_last"], "loss_at_end_fp8": f8["loss_last"],
           "lm_loss_at_end_bf16": bf["lm_loss_last"], "lm_loss_at_end_fp8": f8["lm_loss_last"],
           "val_loss_at_end_bf16": bf["val_loss_last"], "val_loss_at_end_fp8": f8["val_loss_last"],
           "fp8_backend": f8["fp8_line"],
           "fp8_log_lines": sorted(set(re.findall(r"^fp8.*$", logs["fp8"], re.M)))[:8],
           "no_checkpoint_written": [bool(re.search(r"not written \(GTC_NO_SAVE\)", logs[k])) for k in ("bf16", "fp8")]}
    gemm = {"lines": [ln for ln in logs["gemm"].splitlines() if re.match(r"(device|fp8 swap|bf16:|fp8:|fp8/bf16)", ln)]}
    m = re.search(r"fp8/bf16 time ratio: ([\d.]+)", logs["gemm"])
    gemm["fp8_over_bf16"] = float(m.group(1)) if m else None
    sdpa = {"lines": [ln for ln in logs["sdpa"].splitlines() if " layout " in ln or ln.startswith("device ")]}
    if bf["lm_loss_last"] and f8["lm_loss_last"]:
        cmp["lm_loss_rel_diff"] = rnd((f8["lm_loss_last"] - bf["lm_loss_last"]) / bf["lm_loss_last"], 5)

    # resume: the continuation of the bf16 run from its step-`split` checkpoint
    steps = sorted(r["step"] for r in bf16_all)
    by = {r["step"]: r for r in bf16_all}
    want = list(range(a.split + 1, (run_resume or {}).get("config", {}).get("train", {}).get("max_steps", a.split) + 1))
    res = {"rc": st.get("resume", {}).get("rc"),
           "resumed_from": (run_resume or {}).get("resumed_from"),
           "steps_after_split": [s for s in steps if s > a.split],
           "log_says_resuming": bool(re.search(rf"resuming from .*step_0*{a.split} at step {a.split}",
                                               logs["resume"]))}
    lr_next, lr_exp = by.get(a.split + 1, {}).get("lr"), lr_expected(run_resume, a.split) if run_resume else None
    res["lr_step_after_split"], res["lr_expected"] = lr_next, lr_exp
    before = [by[s]["loss"] for s in range(a.split - 4, a.split + 1) if s in by]
    after = by.get(a.split + 1, {}).get("loss")
    res["loss_mean_last5_before"] = rnd(sum(before) / len(before)) if before else None
    res["loss_first_after"] = rnd(after)
    res["val_loss_end"] = rnd(by.get(want[-1], {}).get("val_loss")) if want else None
    res["checks"] = {
        "exit_0": res["rc"] == 0,
        "resumed_from_split_checkpoint": bool(res["resumed_from"]) and res["resumed_from"].rstrip("/").endswith(
            f"step_{a.split:07d}"),
        "all_steps_present": bool(want) and res["steps_after_split"] == want,
        "lr_continues_schedule": lr_next is not None and lr_exp is not None and math.isclose(lr_next, lr_exp,
                                                                                             rel_tol=1e-9),
        "loss_continues": bool(before) and after is not None and math.isfinite(after)
        and abs(after - res["loss_mean_last5_before"]) <= 0.2 * res["loss_mean_last5_before"],
    }
    res["ok"] = all(res["checks"].values())

    hf = read_json(w / "hf.json") or {}
    export = {"export_rc": st.get("export", {}).get("rc"), "hf": hf,    # the stage exports, then loads (hf.json)
              "export_line": (re.search(r"^(exported .*)$", logs["export"], re.M) or [None, None])[1]}
    if hf.get("val_loss") and res.get("val_loss_end"):
        export["hf_val_loss_rel_diff_vs_train"] = rnd((hf["val_loss"] - res["val_loss_end"]) / res["val_loss_end"], 5)
    export["ok"] = export["export_rc"] == 0 and bool(hf.get("ok"))

    jit_dir = w / "torch_extensions"
    built = sorted(p.name for p in jit_dir.glob("*/*")) if jit_dir.is_dir() else []
    all_logs = "\n".join(logs.values())
    jit = {"torch_extensions_built": built,
           "log_lines": sorted(set(re.findall(r"^.*(?:Building extension module|Loading extension module|"
                                               r"JIT compil|ninja: ).*$", all_logs, re.M)))[:10]}
    cache = {"check": (re.search(r"^(cache (?:HIT|MISS).*)$", logs["cache"], re.M) or [None, None])[1],
             "shard_dirs_after_runs": sorted(p.name for p in Path(".gpucache/data").glob("shards-*"))
             if Path(".gpucache/data").is_dir() else None}

    budget = {"budget_s": a.budget, "stages_s": round(sum(x["seconds"] for x in st.values()), 1)}
    fig = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": read_json(w / "versions.json"), "stages": st, "budget": budget, "bench_gpu": b, "runs": runs,
           "fp8_vs_bf16": cmp, "gemm": gemm, "sdpa": sdpa, "resume": res, "export": export, "data_cache": cache,
           "jit": jit}
    Path(a.json).write_text(json.dumps(fig, indent=1))

    # ---- summary table ----
    v = fig["versions"] or {}
    print(f"\n==== GPU train check summary ({v.get('device', '?')}, torch {v.get('torch', '?')} CUDA "
          f"{v.get('cuda', '?')}, deepspeed {v.get('deepspeed', '?')}, transformers {v.get('transformers', '?')})")
    print(f"{'stage':<10} {'rc':>4} {'s':>7}  note")
    for k, s in st.items():
        print(f"{k:<10} {str(s['rc']):>4} {s['seconds']:>7.1f}  {s['note']}")
    print(f"{'stages':<10} {'':>4} {budget['stages_s']:>7.1f}  of the budget {a.budget} s")
    print(f"bench_gpu: matmul peak {peak} TFLOP/s; " + ", ".join(
        f"{k} {b[k]['tokens_per_s']:.0f} tok/s MFU {b[k]['mfu']:.1%}" for k in ("bf16", "fp32", "fp8") if k in b)
        + f"; fp8/bf16 {b.get('fp8_step_time_ratio')}; tests passed {b.get('tests_passed')} failed "
          f"{b.get('tests_failed')} skipped {b.get('tests_skipped')}")
    print(f"{'run':<7} {'rc':>3} {'tok/s':>10} {'step s':>8} {'MFU(train pk)':>13} {'MFU(bench pk)':>13} "
          f"{'loss@end':>9} {'val@end':>8} {'alloc GiB':>9} {'smi GiB':>8}")
    for k, r in runs.items():
        pm = r["peak_memory"]
        print(f"{k:<7} {str(r['rc']):>3} {str(r['tokens_per_s_median']):>10} {str(r['step_time_s_median']):>8} "
              f"{str(r['mfu_median_vs_train_peak']):>13} {str(r['mfu_median_vs_bench_peak']):>13} "
              f"{str(r['loss_last']):>9} {str(r['val_loss_last']):>8} {str(pm['torch_max_allocated_gib']):>9} "
              f"{str(pm['nvidia_smi_max_used_gib']):>8}")
    print(f"fp8/bf16 step time {cmp['step_time_ratio_fp8_over_bf16']}; lm loss at the end bf16 "
          f"{cmp['lm_loss_at_end_bf16']} fp8 {cmp['lm_loss_at_end_fp8']} (rel {cmp.get('lm_loss_rel_diff')}); "
          f"{cmp['fp8_backend']}")
    print(f"grouped GEMM fp8/bf16 time {gemm['fp8_over_bf16']}: " + " | ".join(gemm["lines"][1:]))
    for ln in sdpa["lines"]:
        print(f"sdpa {ln}")
    print(f"resume ok={res['ok']} {res['checks']}")
    print(f"export ok={export['ok']} hf val_loss {hf.get('val_loss')} vs train {res.get('val_loss_end')} "
          f"(rel {export.get('hf_val_loss_rel_diff_vs_train')}); {hf.get('cls')} load {hf.get('load_s')} s")
    print(f"data cache: {cache['check']}; JIT-built ops: {jit['torch_extensions_built'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
