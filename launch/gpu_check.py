"""The whole GPU check, in phases; launch/gpu_check.sh sets up the environment and runs this.

    python3 launch/gpu_check.py LABEL [quick] [env] [tests] [bench] [tin20] [--smoke]

Every phase runs its parts as subprocesses (a crash or a hang in one is recorded, the rest
still run), writes its output into one folder ($OUT when set; else a smoke run's own new
runs/gpu-check/LABEL-DATE-PID/, git-ignored; else docs/bench/LABEL/, to be committed, which a
second run at the same time refuses in one line), ends
with a one-screen summary on stdout and a JSON file `PHASE.json`, and keeps the parts' full
output in `PHASE.log`. At most 8 files per phase come back from the device tool's $OUT.

- quick  the headline in one call, needing no DALI, webdataset or wandb: env, the step rows
         (compiled bf16 at 64/512/1024, default, reduce-overhead and a whole-step CUDA graph; eager
         fp32 at 64), e2e through the GPU cache at 1024 and 64 beside the seed's own loop on 100k
         images, the GPU tests that need no DALI, 20 epochs if time is left; the verdict.
         quick.json, quick.log, step.json, e2e.json, junit-gpu.xml, tin20-metrics.jsonl
- dali   the DALI window's last call (DALI installed from launch/pack_dali.sh's parts): the DALI
         GPU tests, bench data (mixed decode with and without fancy upsampling), streaming e2e at
         1024 and 64, the CPU DALI tests. dali.json, dali.log, data.json, e2e-dali.json, 2 junit
- env    the GPU, driver, versions; which optional packages (DALI, webdataset, wandb) are present
- tests  the GPU tests (pytest -m gpu), then the whole suite; junit XML of both
- bench  data (DALI mixed / CPU / webdataset / seed loader / GPU cache), step (eager, compiled,
         captured; fp32, bf16; batch 64..4096; TFLOP/s, MFU), e2e (the seed's loop vs the
         streaming Trainer vs the GPU cache, at batch 64 and a large batch): data.json,
         step.json, e2e.json, and the targets of the GPU issue met or not
- tin20  a Tiny-ImageNet-sized set (100k train / 10k val) from `sample-data`, packed; 20 epochs
         with pack, start-up (cache, compile) and training timed apart; the seed's own loop on
         the same images over one epoch, extrapolated to 20; the final val metrics

--smoke runs the same phases at toy sizes (minutes on a CPU; the suite runs it so it cannot rot).

Each run works in a folder of its own, removed at the end (VAE_DIST_WORK=DIR: kept and reused);
what runs reuse on purpose (the sample sets that bench and tin20 pack, keyed by their size and a
hash of the code that makes them) lives in the
per-user cache ${XDG_CACHE_HOME:-~/.cache}/vae-dist/, one run at a time (a lock), and a run says when
it reuses it. A phase reports only what its own run measured.

One call of the device tool may run for 10 minutes and is then killed with everything it left
unwritten, so the whole invocation has a deadline, GPU_CHECK_BUDGET_S (default 540 s), counted from
gpu_check.sh's start (GPU_CHECK_T0: the wheels' install is inside it; a .venv that the script
builds first is not, the clock starts after it): every
part's timeout is cut to the time left, a part with no time left is skipped and says so, and
each phase rewrites its JSON after every part. Parts run in their own process group, which a
timeout or a SIGTERM to this script ends whole (no process outlives the call on the GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("quick", "dali", "env", "tests", "bench", "tin20")
PY = sys.executable
MARGIN_S = 25  # kept back from each part's share: the summary and the transfer back
PYTEST = [PY, "-m", "pytest", "-rs", "-p", "no:cacheprovider", "-p", "no:logging"]  # + -q or -v
# the GPU issue's targets (one H100; an H200 counts, the summary says which)
TARGETS = {"e2e_cache_large_bf16": 100e3, "e2e_b64": 40e3, "e2e_vs_seed_b64": 10.0, "dali_mixed_decode": 50e3}


class Deadline:
    """The invocation's time budget, shared by its phases, counted from `start` (gpu_check.sh's
    own start, GPU_CHECK_T0, so the wheels' install is inside it)."""

    def __init__(self, seconds: float, start: float | None = None):
        self.start = start if start is not None else time.time()
        self.seconds = seconds
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - time.time()


LIVE: set[subprocess.Popen] = set()  # the running part, ended with this script on SIGTERM


def _end_live_parts(signum=None, frame=None):
    for proc in list(LIVE):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if signum is not None:
        raise SystemExit(128 + signum)


class Phase:
    """One phase: its parts, its log, its summary JSON (rewritten after every part)."""

    def __init__(self, name: str, out: Path, label: str, smoke: bool, deadline: Deadline | None = None):
        self.name, self.out, self.label, self.smoke = name, out, label, smoke
        self.deadline = deadline or Deadline(float("inf"))
        self.parts: list[dict] = []
        self.results: dict = {}
        self.t0 = time.time()
        self.log = open(out / f"{name}.log", "w", buffering=1)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def run(self, part: str, cmd: list, timeout: float, env: dict | None = None, skip: str | None = None,
            outputs: tuple = (), keep: float = 0) -> dict:
        """Runs one part; its output goes to the log. A part that outlives its timeout (cut to
        the deadline) gets SIGTERM (the trainer checkpoints on it), then SIGKILL 20 s later.
        `outputs` are removed first, so a part that fails writes nothing a reader could take
        for this run's (the output folder, and a kept work folder, outlive a run). `keep`: seconds
        kept back for the parts after this one."""
        budget = self.deadline.left() - MARGIN_S - 20 - keep
        if not skip and budget < 30:
            skip = f"no time left in this call (GPU_CHECK_BUDGET_S): {max(0, budget):.0f} s"
        if skip:
            rec = {"part": part, "status": "skipped", "why": skip}
            self.parts.append(rec)
            self.say(f"[{self.name}] {part}: skipped ({skip})")
            self.write()
            return rec
        timeout = min(timeout, budget)
        for path in outputs:
            Path(path).unlink(missing_ok=True)
        cmd = [str(c) for c in cmd]
        self.log.write(f"\n$ {' '.join(cmd)}\n")
        t0 = time.time()
        # its own process group (not session): the device tool's end of a call still reaches it
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "VAE_DIST_IN_GPU_CHECK": "1", **(env or {})},
                                **group)
        LIVE.add(proc)
        tail: list[str] = []

        def pump():
            for line in proc.stdout:
                self.log.write(line)
                tail.append(line.rstrip("\n"))
                del tail[:-30]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        status = "ok"
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = "timeout"
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        LIVE.discard(proc)
        reader.join(timeout=10)
        seconds = time.time() - t0
        if status == "ok" and proc.returncode != 0:
            status = "failed"
        rec = {"part": part, "status": status, "rc": proc.returncode, "seconds": round(seconds, 1)}
        if status == "timeout":
            rec["timeout_s"] = round(timeout)
        if status != "ok":
            rec["tail"] = tail[-12:]
        self.parts.append(rec)
        self.say(f"[{self.name}] {part}: {status} in {seconds:.0f} s" + (f" (rc {proc.returncode})" if status != "ok" else ""))
        self.write()
        return rec

    def write(self) -> dict:
        ok = all(p["status"] in ("ok", "skipped") for p in self.parts)
        summary = {"phase": self.name, "label": self.label, "smoke": self.smoke, "ok": ok,
                   "seconds": round(time.time() - self.t0, 1),
                   "since_script_start_s": round(time.time() - self.deadline.start, 1),  # the install included
                   "parts": self.parts, "results": self.results}
        (self.out / f"{self.name}.json").write_text(json.dumps(summary, indent=1))
        return summary

    def finish(self) -> dict:
        summary = self.write()
        ok = summary["ok"]
        self.say(f"== {self.name}: {'ok' if ok else 'FAILED PARTS'} in {summary['seconds']:.0f} s -> "
                 f"{self.out / (self.name + '.json')}")
        for p in self.parts:
            line = f"   {p['part']:<22} {p['status']:<8} {p.get('seconds', '')}"
            if p.get("why"):
                line += f"  {p['why']}"
            if p.get("tail"):
                line += f"  | {p['tail'][-1][:110]}"
            self.say(line)
        self.log.close()
        return summary


def _json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _have_cuda() -> bool:
    r = subprocess.run([PY, "-c", "import torch; raise SystemExit(not torch.cuda.is_available())"], capture_output=True)
    return r.returncode == 0


def _have(module: str) -> bool:
    r = subprocess.run([PY, "-c", f"import importlib.util as u; raise SystemExit(u.find_spec('{module}') is None)"],
                       capture_output=True)
    return r.returncode == 0


def _sample_set(phase: Phase, folder: Path, name: str, train_per_class: int, val_per_class: int,
                timeout: float = 900, keep: float = 0) -> tuple[Path, Path]:
    """(shards, extracted root) of a sample set in `folder`, written and packed on every core;
    reused when already packed there. One run at a time makes or checks it (a lock beside it):
    a second run waits, then reuses what the first packed."""
    key = f"{name}-{train_per_class}x{val_per_class}-{_sets_version()}"  # another size, or generator, is another set
    src, shards = folder / f"{key}-src", folder / f"{key}-shards"
    folder.mkdir(parents=True, exist_ok=True)
    with _held(folder / f"{key}.lock", f"[{phase.name}] {name}", phase.say):
        if _json(shards / "manifest.json") and (src / "train").is_dir():
            phase.say(f"[{phase.name}] {name}: reusing {shards} (packed by an earlier run)")
            return shards, src
        for half_made in (src, shards):  # ours alone (the set's own folders), from a run cut short
            shutil.rmtree(half_made, ignore_errors=True)
        t = phase.run(f"{name} sample-data", [PY, "-m", "vae_dist", "sample-data", src, "--train-per-class",
                                              train_per_class, "--val-per-class", val_per_class, "--test", 0], timeout,
                      keep=keep)
        p = phase.run(f"{name} pack", [PY, "-m", "vae_dist", "pack", src, shards, "--shard-size", 5000], timeout,
                      keep=keep, skip=None if t["status"] == "ok" else "no sample data")
    phase.results.setdefault("data_sets", {})[name] = {
        "images": 10 * (train_per_class + val_per_class), "sample_data_s": t.get("seconds"), "pack_s": p.get("seconds"),
        "folder": str(shards)}
    return shards, src


def _sets_version() -> str:
    """What a packed sample set depends on, as a short hash of the code that writes it (the
    generator and the packer): a set made by other code is another set, never reused as this one's."""
    import hashlib

    sources = ("sample.py", "pack.py", "images.py", "shards.py")
    code = b"".join((ROOT / "vae_dist" / "data" / name).read_bytes() for name in sources)
    return hashlib.sha1(code).hexdigest()[:8]


@contextlib.contextmanager
def _held(path: Path, who: str, say=print):
    """An exclusive lock on `path` (made when missing) for the block; a run that has to wait says
    for whom (the holder writes its pid into the file)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not truncated: it names the holder
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            say(f"{who}: waiting for another run (pid {holder}) that holds {path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # the lock's end


# -- quick ---------------------------------------------------------------------------------------

# the GPU issue's targets that `quick` can judge (one H100; an H200 counts, the JSON says which)
QUICK_TARGETS = {"e2e_cache_large_bf16": (100e3, "img/s"), "e2e_b64": (40e3, "img/s"),
                 "e2e_vs_seed_b64": (10.0, "x"), "tin20_train_s": (20.0, "s, at most")}
PRESET = ROOT / "launch" / "configs" / "throughput.yaml"
# a graph row after the default row of its batch: both compile the same graph, so the second
# finds it in inductor's on-disk cache (as do the e2e and 20-epoch runs at 64 and 1024 later)
QUICK_STEP_ROWS = ("default:bf16:64,graph:bf16:64,eager:fp32:64,default:bf16:1024,graph:bf16:1024,"
                   "reduce-overhead:bf16:64,default:bf16:512,reduce-overhead:bf16:1024,reduce-overhead:bf16:512,"
                   "graph:bf16:512")


def phase_quick(phase: Phase, args) -> None:
    """The headline in one call, in the order of value: env, the step rows, end to end through
    the cache at 64 and 1024 beside the seed's own loop on a Tiny-ImageNet-sized set, the GPU
    tests that need no DALI, then (time left) 20 epochs; the verdict against the targets. Each
    part runs for a share of the budget at most and keeps time back for the parts after it, so
    a call cut short returns the most useful numbers."""
    smoke, out, work, r = args.smoke, phase.out, args.work, phase.results
    budget = phase.deadline.seconds
    r.update(budget_s=budget, verdict={}, lines=[])
    tiny = ["--tiny"] if smoke else []
    reps = ["--repeats", 1, "--steps", 2, "--warmup", 1] if smoke else ["--repeats", 3]
    r["env"] = {}
    _probe_env(phase, r["env"])

    step_json = out / "step.json"
    rows = "eager:fp32:8,default:fp32:8,graph:fp32:8" if smoke else QUICK_STEP_ROWS
    phase.run("step", [PY, "-m", "vae_dist", "bench", "step", *tiny, "--rows", rows, "--channels-last", "on", *reps,
                       "--json", step_json], 0.3 * budget, keep=0.4 * budget, outputs=(step_json,))
    r["step"] = [_step_summary(row) for row in _rows(step_json)]
    phase.write()

    per_class = (20, 6) if smoke else (10000, 1000)  # 10 classes: 100k train, 10k val, as Tiny ImageNet
    shards, images = _sample_set(phase, work, "tin", *per_class, timeout=0.2 * budget, keep=0.25 * budget)
    no_data = None if _json(shards / "manifest.json") else "no sample set (its parts did not run)"
    e2e = [PY, "-m", "vae_dist", "bench", "e2e", *tiny, "--shards", shards, "--images", images,
           *(["--threads", 2] if smoke else []), *reps]
    parts = {name: work / f"e2e-{name}.json" for name in ("cache", "seed", "graph", "preset")}
    sizes = "32,16" if smoke else "1024,64"
    phase.run("e2e cache", [*e2e, "--variants", "cache", "--batch-sizes", sizes, "--json", parts["cache"]],
              0.25 * budget, keep=0.15 * budget, outputs=(parts["cache"],), skip=no_data)
    _e2e_rows(phase, parts)
    phase.run("e2e seed's loop", [*e2e, "--variants", "seed", "--batch-size", 16 if smoke else 64,
                                  "--json", parts["seed"]], 0.12 * budget, keep=0.1 * budget, outputs=(parts["seed"],),
              skip=no_data)
    _e2e_rows(phase, parts)

    junit = out / "junit-gpu.xml"
    # -v: each result is a line in the log as it comes, so a part cut at its time still says
    # which passed (the junit XML is written only at the end); 4 workers share the one GPU
    workers = ["-n", "4"] if _have("xdist") and not smoke else []
    base = [*PYTEST, "-v", *workers, f"--basetemp={work / 'pytest'}"]
    log_start = (out / "quick.log").stat().st_size
    phase.run("gpu tests (no DALI)", [*base, "-m", "gpu and not dali", "tests/test_gpu.py", f"--junitxml={junit}"],
              0.2 * budget, keep=0.05 * budget, outputs=(junit,))
    r["gpu_tests"] = _junit(junit)
    if r["gpu_tests"].get("junit") == "missing":  # cut short: what the log says
        r["gpu_tests"] = _results_in_log(out / "quick.log", log_start)
    phase.write()

    phase.run("e2e graph", [*e2e, "--variants", "graph", "--batch-sizes", "64,1024" if not smoke else "16",
                            "--json", parts["graph"]], 0.12 * budget, keep=0.1 * budget, outputs=(parts["graph"],),
              skip=no_data or (None if args.cuda else "no CUDA GPU: a CUDA graph needs one"))
    _e2e_rows(phase, parts)
    phase.run("e2e throughput preset", [*e2e, "--variants", "cache", "--config", PRESET,
                                        *(["--batch-size", 32] if smoke else []), "--json", parts["preset"]],
              0.1 * budget, keep=0.08 * budget, outputs=(parts["preset"],), skip=no_data)
    _e2e_rows(phase, parts)

    epochs, batch = (2, 16) if smoke else (20, 64)
    model = ["--model.widths=[8,16,16,32]", "--model.latent_dim=8"] if smoke else []
    cache = "gpu" if args.cuda else "ram"  # the cache needs no loader package
    _, r["tin20"] = _train_epochs(phase, shards, work / "tin20-run", epochs, batch, model, budget,
                                  extra=(f"--data.cache={cache}",), skip=no_data, copy_to=out / "tin20-metrics.jsonl")
    r["verdict"], r["lines"] = _quick_verdict(r, judged=not smoke)
    for line in r["lines"]:
        phase.say("   " + line)


def _results_in_log(log: Path, start: int) -> dict:
    """pytest -v's result lines in the log from byte `start` on: {passed, failed, skipped, names}."""
    text = log.read_bytes()[start:].decode(errors="replace")
    found = re.findall(r"(PASSED|FAILED|ERROR|SKIPPED)\s+(tests/\S+::\S+)|(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED)",
                       text)
    results = {name or name2: status or status2 for status, name, name2, status2 in found}
    out = {"junit": "missing: the part was cut short; results from its log",
           "passed": sum(s == "PASSED" for s in results.values()),
           "failures": sum(s in ("FAILED", "ERROR") for s in results.values()),
           "skipped": sum(s == "SKIPPED" for s in results.values())}
    out["tests"] = out["passed"] + out["failures"] + out["skipped"]
    out["failed"] = [name for name, s in results.items() if s in ("FAILED", "ERROR")]
    out["results"] = results
    return out


def _step_summary(row: dict) -> dict:
    keys = ("name", "img_per_s", "batch_size", "dtype", "compile_mode", "cuda_graph", "tflop_per_s", "mfu",
            "compiled_graphs", "recompiles_while_timed", "warmup_s", "unavailable", "note")
    return {k: row[k] for k in keys if k in row}


def _e2e_rows(phase: Phase, parts: dict) -> None:
    """The e2e rows so far, into e2e.json (the DESIGN.md report) and the phase's JSON."""
    merged = _merge([p for p in parts.values()], phase.out / "e2e.json")
    phase.results["e2e"] = [{k: row[k] for k in ("name", "img_per_s", "batch_size", "data_wait", "loader",
                                                 "precision", "unavailable") if k in row}
                            for row in (merged["results"] if merged else [])]
    phase.write()


def _quick_verdict(r: dict, judged: bool) -> tuple[dict, list[str]]:
    """Each target's value, and met or not (not judged at toy sizes, where the seed's batch is
    16 and a large one 32)."""
    rows = [row for row in r.get("e2e", []) if "img_per_s" in row]
    small, large = (64, 512) if judged else (16, 32)
    seed64 = _rate(rows, lambda row: row["name"].startswith("seed") and row["batch_size"] == small)
    fast = lambda row: not row["name"].startswith("seed")  # noqa: E731 - the cache rows, with or without the graph
    got = {"e2e_cache_large_bf16": _rate(rows, lambda row: fast(row) and row["batch_size"] >= large),
           "e2e_b64": _rate(rows, lambda row: fast(row) and row["batch_size"] == small),
           "tin20_train_s": r.get("tin20", {}).get("train_s")}
    got["e2e_vs_seed_b64"] = got["e2e_b64"] / seed64 if got["e2e_b64"] and seed64 else None
    verdict, lines = {}, []
    for row in rows:
        lines.append(f"e2e {row['name']} b{row['batch_size']}: {row['img_per_s']:,.0f} img/s")
    for key, (target, unit) in QUICK_TARGETS.items():
        value = got.get(key)
        met = None if not judged or value is None else value <= target if key == "tin20_train_s" else value >= target
        verdict[key] = {"value": value, "target": target, "unit": unit, "met": met}
        shown = "n/a" if value is None else f"{value:,.1f}" if unit != "img/s" else f"{value:,.0f}"
        lines.append(f"{key:<22} {shown:>12} {unit:<11} target {target:,.0f}: "
                     + ("toy sizes, not judged" if not judged else "not measured" if value is None
                        else "met" if met else "NOT met"))
    return verdict, lines


# -- dali ----------------------------------------------------------------------------------------

def phase_dali(phase: Phase, args) -> None:
    """The DALI window's last call (DALI installed from its parts by gpu_check.sh): the DALI GPU
    tests, the data bench (mixed decode with and without fancy upsampling, CPU decode, the
    cache, the seed's loader), streaming e2e at 1024 and 64, then the CPU DALI tests."""
    smoke, out, work, r = args.smoke, phase.out, args.work, phase.results
    budget = phase.deadline.seconds
    r["dali"] = _dali_version()
    if not r["dali"]:
        phase.run("dali", [], 0, skip="no NVIDIA DALI here: carry launch/pack_dali.sh's parts (docs/gpu_check.md)")
        return
    base = [*PYTEST, "-q", f"--basetemp={work / 'pytest'}"]
    gpu_xml, cpu_xml = out / "junit-dali-gpu.xml", out / "junit-dali-cpu.xml"
    phase.run("dali gpu tests", [*base, "-m", "gpu and dali", "tests/test_gpu.py", f"--junitxml={gpu_xml}"],
              0.3 * budget, keep=0.45 * budget, outputs=(gpu_xml,))
    r["gpu_tests"] = _junit(gpu_xml)
    phase.write()
    shards, images = _sample_set(phase, work, "bench", *((20, 5) if smoke else (1000, 50)), timeout=0.1 * budget,
                                 keep=0.35 * budget)
    tiny, threads = (["--tiny"], ["--threads", 2]) if smoke else ([], [])
    reps = ["--repeats", 1, "--steps", 2, "--warmup", 1] if smoke else ["--repeats", 3]
    data_json, e2e_json = out / "data.json", out / "e2e-dali.json"
    bench = [PY, "-m", "vae_dist", "bench"]
    phase.run("bench data", [*bench, "data", *tiny, "--shards", shards, "--images", images, *threads,
                             *(reps if smoke else ["--repeats", 3, "--steps", 50]), "--json", data_json],
              0.15 * budget, keep=0.2 * budget, outputs=(data_json,))
    phase.run("e2e streaming", [*bench, "e2e", *tiny, "--shards", shards, *threads, *reps, "--variants", "fast",
                                "--batch-sizes", "32,16" if smoke else "1024,64", "--json", e2e_json],
              0.25 * budget, keep=0.05 * budget, outputs=(e2e_json,))
    cpu_tests = ["-k", "index_matches_dalis_wds2idx"] if smoke else (["-n", "8"] if _have("xdist") else [])
    phase.run("dali cpu tests", [*base, "-m", "dali and not gpu", "tests", *cpu_tests, f"--junitxml={cpu_xml}"],
              budget, outputs=(cpu_xml,))
    r["cpu_tests"] = _junit(cpu_xml)
    data, e2e = _rows(data_json), _rows(e2e_json)
    fancy = _rate(data, lambda row: row["name"] == "dali-gpu (mixed decode)")
    plain = _rate(data, lambda row: row["name"].startswith("dali-gpu (mixed decode, plain"))
    r["data"] = {row["name"]: row.get("img_per_s", row.get("unavailable")) for row in data}
    r["e2e"] = {f"{row['name']} b{row.get('batch_size')}": row.get("img_per_s", row.get("unavailable")) for row in e2e}
    r["fancy_upsampling_cost"] = 1 - fancy / plain if fancy and plain else None
    target = TARGETS["dali_mixed_decode"]
    r["verdict"] = {"dali_mixed_decode": {"value": fancy, "target": target,
                                          "met": None if smoke or fancy is None else fancy >= target}}
    for name, value in {**r["data"], **r["e2e"]}.items():
        phase.say(f"   {name}: {value:,.0f} img/s" if isinstance(value, float) else f"   {name}: {value}")
    if r["fancy_upsampling_cost"] is not None:
        phase.say(f"   fancy chroma upsampling costs {r['fancy_upsampling_cost']:.1%} of mixed decode's img/s")


def _dali_version() -> str | None:
    got = subprocess.run([PY, "-c", "import nvidia.dali as d; print(d.__version__)"], capture_output=True, text=True)
    return got.stdout.strip() if got.returncode == 0 else None


# -- env -----------------------------------------------------------------------------------------

ENV_PROBE = r"""
import importlib, json, os, platform, shutil
import torch
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
       "gpus": torch.cuda.device_count(), "cpu_count": os.cpu_count(),
       "disk_free_gib": shutil.disk_usage("/tmp").free / 2**30, "pythonpath": os.environ.get("PYTHONPATH", "")}
for mod in ("nvidia.dali", "webdataset", "wandb", "accelerate", "torchvision", "safetensors", "pytest", "xdist"):
    try:
        out[mod] = getattr(importlib.import_module(mod), "__version__", "present")
    except Exception as e:  # noqa: BLE001
        out[mod] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_gib=p.total_memory / 2**30,
               bf16=torch.cuda.is_bf16_supported())
    import time
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    a @ a  # cuBLAS handles and workspaces: not timed
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): a @ a
    torch.cuda.synchronize()
    out["bf16_matmul_tflops"] = 20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12
print("ENV " + json.dumps(out))
"""


def _probe_env(phase: Phase, into: dict) -> None:
    """The env probe's facts (GPU, versions, a bf16 matmul, the optional packages) into `into`."""
    rec = phase.run("env probe", [PY, "-c", ENV_PROBE], 300)
    lines = [line for line in (phase.out / f"{phase.name}.log").read_text().splitlines() if line.startswith("ENV ")]
    if lines:
        into.update(json.loads(lines[-1][4:]))
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True)
        into["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    missing = [m for m in ("nvidia.dali", "webdataset", "wandb") if not into.get(m)]
    into["missing_optional"] = missing
    phase.say(f"   GPU: {into.get('gpu', 'none')} ({into.get('nvidia_smi', 'no nvidia-smi')}), torch {into.get('torch')} "
              f"CUDA {into.get('cuda')}, {into.get('gpus', 0)} GPU(s), {into.get('cpu_count')} cores")
    phase.say(f"   optional packages missing: {', '.join(missing) or 'none'}"
              + (f"; bf16 matmul {into['bf16_matmul_tflops']:.0f} TFLOP/s" if "bf16_matmul_tflops" in into else ""))
    if rec["status"] != "ok":
        phase.say(f"   the probe failed: see {phase.name}.log")
    phase.write()


def phase_env(phase: Phase, args) -> None:
    _probe_env(phase, phase.results)


# -- tests ---------------------------------------------------------------------------------------

def _junit(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {"junit": "missing"}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["seconds"] = float(suite.get("time", 0))
    failed = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                msg = (node.get("message") or "").strip().splitlines()
                failed.append(f"{case.get('classname')}::{case.get('name')}: {msg[0][:200] if msg else kind}")
    out["failed"] = failed
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def phase_tests(phase: Phase, args) -> None:
    base = [*PYTEST, "-q", f"--basetemp={args.work / 'pytest'}"]  # the tests' folders go with the work folder
    if _have("pytest_timeout"):  # one hung test must not take the call with it
        base.append("--timeout=300")
    gpu_xml, suite_xml = phase.out / "junit-gpu.xml", phase.out / "junit-suite.xml"
    # smoke: one quick GPU test (the suite runs the smoke, and the GPU tests themselves, once);
    # GPU_TESTS_M selects by marker, e.g. GPU_TESTS_M=dali once DALI has arrived (every DALI test
    # carries the marker); GPU_TESTS_K by name
    k = "know_what_is_installed" if args.smoke else os.environ.get("GPU_TESTS_K")
    m = f"gpu and ({os.environ['GPU_TESTS_M']})" if os.environ.get("GPU_TESTS_M") else "gpu"
    phase.run("gpu tests", [*base, "-m", m, "tests/test_gpu.py", *(["-k", k] if k else []),
                            f"--junitxml={gpu_xml}"], 600, outputs=(gpu_xml,))
    phase.results["gpu_tests"] = _junit(gpu_xml)
    if args.smoke:  # the whole suite runs gpu_check --smoke: a small part of it here, not itself
        suite = ["tests/test_losses.py"]
    else:
        suite = ["tests", "-m", "not gpu"] + (["-n", "8"] if _have("xdist") else [])
    skip = "GPU_CHECK_SUITE=0" if os.environ.get("GPU_CHECK_SUITE") == "0" else None
    phase.run("suite", [*base, *suite, f"--junitxml={suite_xml}"], 570 if not args.smoke else 300, skip=skip,
              outputs=(suite_xml,))
    phase.results["suite"] = _junit(suite_xml)
    for name in ("gpu_tests", "suite"):
        r = phase.results[name]
        if "tests" in r:
            # skips are reasons, not passes: a GPU run with skipped GPU tests is incomplete
            r["complete"] = r["skipped"] == 0
            phase.say(f"   {name}: {r['passed']} passed, {r['failures'] + r['errors']} failed, {r['skipped']} skipped "
                      f"in {r['seconds']:.0f} s" + ("" if r["complete"] else " (incomplete: see the skip reasons in tests.log)"))
            for line in r["failed"][:8]:
                phase.say(f"     FAILED {line}")


# -- bench ---------------------------------------------------------------------------------------

def _rows(path: Path) -> list[dict]:
    report = _json(path)
    return report["results"] if report else []


def _merge(parts: list[Path], out: Path) -> dict | None:
    reports = [r for r in (_json(p) for p in parts) if r]
    if not reports:
        return None
    merged = {**reports[0], "results": [row for r in reports for row in r["results"]]}
    out.write_text(json.dumps(merged, indent=1))
    return merged


def _rate(rows: list[dict], match) -> float | None:
    found = [r["img_per_s"] for r in rows if "img_per_s" in r and match(r)]
    return max(found) if found else None


def phase_bench(phase: Phase, args) -> None:
    work = args.work
    smoke = args.smoke
    shards, images = _sample_set(phase, args.sets, "bench", 20 if smoke else 1000, 5 if smoke else 50)
    bench = [PY, "-m", "vae_dist", "bench"]
    tiny = ["--tiny"] if smoke else []
    j = lambda name: work / f"bench-{name}.json"  # noqa: E731
    data_args = ["--steps", 2, "--repeats", 1, "--threads", 2] if smoke else ["--steps", 50, "--repeats", 3]
    phase.run("data", [*bench, "data", *tiny, "--shards", shards, "--images", images, *data_args, "--json", j("data")],
              600, outputs=(j("data"),))
    step = [*bench, "step", *tiny, "--channels-last", "on"]
    sizes = "8" if smoke else "64,256,1024,4096"
    reps = ["--repeats", 1, "--steps", 2, "--warmup", 1] if smoke else ["--repeats", 3]
    prof = work / "profile"
    phase.run("step eager", [*step, "--compile", "off", "--dtypes", "fp32,bf16" if not smoke else "fp32",
                             "--batch-sizes", sizes, *reps, "--json", j("step-eager")], 600, outputs=(j("step-eager"),))
    phase.run("step compiled", [*step, "--compile", "on", "--dtypes", "bf16" if not smoke else "fp32",
                                "--batch-sizes", "64,1024,4096" if not smoke else "8", *reps, "--profile", prof,
                                "--json", j("step-compiled")], 600, outputs=(j("step-compiled"),))
    phase.run("step captured", [*step, "--compile", "on", "--compile-mode", "reduce-overhead",
                                "--dtypes", "bf16" if not smoke else "fp32", "--batch-sizes", "64" if not smoke else "8",
                                *reps, "--profile", prof, "--json", j("step-captured")], 600,
              skip=None if args.cuda else "no CUDA GPU: CUDA graphs need one", outputs=(j("step-captured"),))
    e2e = [*bench, "e2e", *tiny, "--shards", shards, "--images", images]
    e2e_reps = ["--repeats", 1, "--steps", 2, "--warmup", 1, "--threads", 2] if smoke else ["--repeats", 3]
    phase.run("e2e b64", [*e2e, "--batch-size", 16 if smoke else 64, "--variants",
                          "seed,fast" if smoke else "seed,fast,cache", *e2e_reps, "--json", j("e2e-b64")], 600,
              outputs=(j("e2e-b64"),))
    phase.run("e2e large batch", [*e2e, "--batch-size", 1024, "--variants", "fast,cache", *e2e_reps,
                                  "--json", j("e2e-large")], 600, outputs=(j("e2e-large"),),
              skip="smoke: one batch size" if smoke else None)
    data = _merge([j("data")], phase.out / "data.json")
    step_report = _merge([j("step-eager"), j("step-compiled"), j("step-captured")], phase.out / "step.json")
    e2e_report = _merge([j("e2e-b64"), j("e2e-large")], phase.out / "e2e.json")
    phase.results.update(_bench_verdicts(data, step_report, e2e_report, judged=not smoke))
    for line in phase.results.get("lines", []):
        phase.say("   " + line)


def _bench_verdicts(data, step, e2e, judged: bool = True) -> dict:
    """The numbers the GPU issue asks for, against its targets (not judged at toy sizes); and
    whether every compiled row really compiled."""
    out: dict = {"targets": {}, "lines": []}
    drows, srows, erows = (r["results"] if r else [] for r in (data, step, e2e))
    seed64 = _rate(erows, lambda r: r["name"].startswith("seed") and r["batch_size"] == 64)
    got = {
        "dali_mixed_decode": _rate(drows, lambda r: r["name"] == "dali-gpu (mixed decode)"),  # fancy upsampling
        "e2e_b64": _rate(erows, lambda r: not r["name"].startswith("seed") and r["batch_size"] == 64),
        "e2e_cache_large_bf16": _rate(erows, lambda r: "gpu-cache" in r["name"] and r["batch_size"] >= 512),
    }
    got["e2e_vs_seed_b64"] = got["e2e_b64"] / seed64 if got["e2e_b64"] and seed64 else None
    # the targets take the best path a default run would use; both paths are reported apart
    paths = (("streaming", lambda r: r["name"].startswith("fast:")), ("gpu-cache", lambda r: "gpu-cache" in r["name"]))
    for path, match in paths:
        for size in sorted({r["batch_size"] for r in erows if "img_per_s" in r and match(r)}):
            rate = _rate(erows, lambda r, m=match, b=size: m(r) and r["batch_size"] == b)
            out.setdefault("e2e", {})[f"{path} b{size}"] = rate
            out["lines"].append(f"e2e {path} b{size}: {rate:,.0f} img/s" + (f" ({rate / seed64:.1f}x the seed's loop)"
                                                                           if seed64 and size == 64 else ""))
    for key, target in TARGETS.items():
        value = got.get(key)
        met = (value is not None and value >= target) if judged else None
        out["targets"][key] = {"value": value, "target": target, "met": met}
        shown = "n/a" if value is None else (f"{value:,.1f}x" if key.endswith("seed_b64") else f"{value:,.0f} img/s")
        verdict = "toy sizes: not judged" if met is None else "met" if met else "NOT met"
        out["lines"].append(f"{key:<22} {shown:>16}  target {target:,.0f}  {verdict}")
    compiled = [r for r in srows if r.get("compile") and "img_per_s" in r]
    bad = [r["name"] for r in compiled if r.get("compiled_graphs", 0) == 0 or r.get("recompiles_while_timed")]
    out["compiled_rows"] = {"rows": len(compiled), "not_really_compiled": bad}
    out["lines"].append(f"compiled step rows: {len(compiled)}, not really compiled: {', '.join(bad) or 'none'}")
    for r in srows + erows:
        if "unavailable" in r:
            out["lines"].append(f"unavailable: {r['name']}: {r['unavailable'][:100]}")
    best = max((r for r in srows if "img_per_s" in r), key=lambda r: r["img_per_s"], default=None)
    if best:
        out["best_step"] = {k: best.get(k) for k in ("name", "img_per_s", "tflop_per_s", "mfu")}
        out["lines"].append(f"best step row: {best['name']} {best['img_per_s']:,.0f} img/s"
                            + (f", MFU {best['mfu']:.1%}" if best.get("mfu") else ""))
    return out


# -- tin20 ---------------------------------------------------------------------------------------

def phase_tin20(phase: Phase, args) -> None:
    smoke, work = args.smoke, args.work
    per_class = (20, 6) if smoke else (10000, 1000)  # 10 classes: 100k train, 10k val, as Tiny ImageNet
    shards, images = _sample_set(phase, args.sets, "tin", *per_class)
    epochs = int(os.environ.get("TIN20_EPOCHS", 2 if smoke else 20))
    batch = int(os.environ.get("TIN20_BATCH", 16 if smoke else 64))
    run = work / "tin20-run"
    model = ["--model.widths=[8,16,16,32]", "--model.latent_dim=8"] if smoke else []
    rec, phase.results["train"] = _train_epochs(phase, shards, run, epochs, batch, model,
                                                float(os.environ.get("TIN20_TRAIN_TIMEOUT", 480)),
                                                copy_to=phase.out / "tin20-metrics.jsonl")
    steps = max(1, (per_class[0] * 10) // batch)  # one epoch of the seed's loop
    seed_json = work / "tin20-seed.json"
    phase.run("seed loop, 1 epoch", [PY, "-m", "vae_dist", "bench", "e2e", *(["--tiny"] if smoke else []),
                                     "--shards", shards, "--images", images, "--variants", "seed", "--batch-size", batch,
                                     "--steps", steps, "--warmup", 5 if not smoke else 1, "--repeats", 1,
                                     *(["--threads", 2] if smoke else []), "--json", seed_json], 600,
              outputs=(seed_json,))
    seed = next((r for r in _rows(seed_json) if "img_per_s" in r), None)
    train = phase.results["train"]
    if seed:
        images_20 = epochs * per_class[0] * 10
        phase.results["seed"] = {
            "img_per_s": seed["img_per_s"], "timed_steps": steps, "batch_size": batch,
            "extrapolated_s": images_20 / seed["img_per_s"],
            "note": f"the seed's loop timed over one epoch ({steps} steps) and extrapolated to {epochs} epochs"}
        if train.get("img_per_s"):
            phase.results["speedup_vs_seed"] = train["img_per_s"] / seed["img_per_s"]
    r = phase.results
    phase.say(f"   data: {r.get('data_sets', {}).get('tin', {})}")
    phase.say(f"   train: {json.dumps({k: v for k, v in train.items() if k != 'final_val'})}")
    phase.say(f"   final val: {json.dumps(train.get('final_val'))}")
    if "seed" in r:
        phase.say(f"   seed loop: {r['seed']['img_per_s']:,.0f} img/s -> {r['seed']['extrapolated_s']:,.0f} s for "
                  f"{epochs} epochs (extrapolated from one); speed-up {r.get('speedup_vs_seed', 0):.1f}x")


def _train_epochs(phase: Phase, shards: Path, run: Path, epochs: int, batch: int, model: list, timeout: float,
                  extra: tuple = (), skip: str | None = None, copy_to: Path | None = None) -> tuple[dict, dict]:
    """`vae-dist train` for `epochs`, evaluated at each epoch end only; (part record, times).
    The run folder starts empty, so nothing an earlier run left there is read as this run's;
    `copy_to` gets this run's metrics.jsonl (and loses an earlier one first)."""
    wandb_mode = "offline" if _have("wandb") else "disabled"
    shutil.rmtree(run, ignore_errors=True)
    if copy_to:
        copy_to.unlink(missing_ok=True)
    t0 = time.time()
    rec = phase.run(f"train {epochs} epochs", [
        PY, "-m", "vae_dist", "train", f"--data.shards={shards}", f"--train.out_dir={run}", "--train.overwrite=true",
        f"--train.epochs={epochs}", f"--train.batch_size={batch}", f"--log.wandb_mode={wandb_mode}",
        f"--log.log_every={5 if phase.smoke else 200}", "--log.image_every=100000", "--train.checkpoint_every=100000",
        "--train.eval_every=0", *model, *extra], timeout, skip=skip)
    if copy_to and (run / "metrics.jsonl").is_file():
        shutil.copy(run / "metrics.jsonl", copy_to)
    return rec, _training_times(run / "metrics.jsonl", t0, rec, epochs, batch)


def _training_times(metrics: Path, t0: float, rec: dict, epochs: int, batch: int) -> dict:
    """Start-up (cache, compile, first window), training (the steps alone) and side work apart,
    from the rows this run wrote (logged at or after `t0`); a duration that comes out negative
    is not a measurement and is not reported."""
    try:
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        return {"status": rec["status"], "why": f"no metrics.jsonl from this run ({type(e).__name__})"}
    rows = [r for r in rows if isinstance(r.get("time"), (int, float)) and r["time"] >= t0]
    train = [r for r in rows if "split" not in r]
    val = [r for r in rows if r.get("split") == "val"]
    if not train:
        return {"status": rec["status"], "why": "no train rows from this run"}
    steps_per_row = [b["step"] - a["step"] for a, b in zip([{"step": 0}] + train[:-1], train)]
    step_s = [n * batch / r["img_per_s"] for n, r in zip(steps_per_row, train) if r["img_per_s"] > 0]
    steady = train[1:] or train
    rate = sum(r["img_per_s"] for r in steady) / len(steady)
    first_window_s = steps_per_row[0] * batch / rate
    startup_s = train[0]["time"] - t0 - first_window_s  # process start, data cache, compile, warm-up
    out = {
        "status": rec["status"], "wall_s": rec.get("seconds"), "epochs": epochs, "batch_size": batch,
        "steps": train[-1]["step"], "total_steps": train[-1]["total_steps"],
        "startup_s": startup_s, "train_s": sum(step_s), "img_per_s": rate, "mfu": steady[-1].get("mfu"),
        "side_s": (rec.get("seconds") or 0) - startup_s - sum(step_s),
        "final_val": {k: val[-1].get(k) for k in ("step", "loss", "recon", "kl", "psnr", "bpd", "sigma")} if val else None,
    }
    negative = [k for k in ("startup_s", "train_s", "side_s") if out[k] < 0]
    for k in negative:
        out[k] = None
    if negative:
        out["why"] = f"{', '.join(negative)} came out negative (a clock or a row out of order): not reported"
    return out


# a smoke run's output when $OUT is not set: a folder of its own under the checkout's ignored runs/
RUNS = ROOT / "runs" / "gpu-check"


def _output_folder(label: str, smoke: bool) -> Path:
    """$OUT when set (the device tool's folder); a smoke run's own new folder under runs/gpu-check/
    (GPU_CHECK_RUNS chooses another parent), never shared with another run and ignored by git;
    else docs/bench/LABEL/, the results meant to be committed (one run at a time: _lock_output)."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    if smoke:
        runs = Path(os.environ.get("GPU_CHECK_RUNS") or RUNS)
        return runs / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    return ROOT / "docs" / "bench" / label


def _lock_output(out: Path) -> int | None:
    """An exclusive lock on the output folder itself (nothing written beside it) for the rest of
    this process; None when another run holds it."""
    import fcntl

    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("label", help="names the output folder when $OUT is not set: docs/bench/LABEL/, or with --smoke "
                                 "runs/gpu-check/LABEL-DATE-PID/")
    p.add_argument("phases", nargs="*", help=f"some of {', '.join(PHASES)} (default: all)")
    p.add_argument("--smoke", action="store_true", help="toy sizes, for a CPU")
    args = p.parse_args(argv)
    phases = args.phases or [p for p in PHASES if p not in ("quick", "dali")]  # each its own call
    unknown = [x for x in phases if x not in PHASES]
    if unknown:
        print(f"gpu_check: unknown phase {', '.join(unknown)} (choose from {', '.join(PHASES)})", file=sys.stderr)
        return 2
    out = _output_folder(args.label, args.smoke)
    out.mkdir(parents=True, exist_ok=True)
    out_lock = _lock_output(out)
    if out_lock is None:
        print(f"gpu_check: another run is writing {out} now: wait for it to end, or choose another folder "
              "(OUT=DIR)", file=sys.stderr)
        return 2
    print(f"gpu_check: output {out}")
    # The run's work folder is its own (two runs on one machine never share one) and goes at the
    # end; VAE_DIST_WORK names one that is kept, and reused by the next run that names it.
    kept = os.environ.get("VAE_DIST_WORK")
    args.work = Path(kept) if kept else Path(tempfile.mkdtemp(prefix="vae-dist-gpu-check-"))
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: work folder {args.work} " + ("(VAE_DIST_WORK: kept)" if kept else
                                                    "(this run's own, removed at the end; VAE_DIST_WORK=DIR keeps one)"))
    # bench and tin20 reuse the sample sets an earlier run packed (a warm device
    # machine's calls): in the per-user cache (gpu_check.sh sets VAE_DIST_CACHE), or in the kept
    # work folder; quick and dali make everything they read afresh, in the work folder
    cache = Path(os.environ.get("VAE_DIST_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                 / "vae-dist")
    args.sets = args.work if kept else cache / ("gpu-check-smoke" if args.smoke else "gpu-check")
    if set(phases) & {"bench", "tin20"}:
        print(f"gpu_check: sample sets packed once and reused from {args.sets}")
    run = {"quick": phase_quick, "dali": phase_dali, "env": phase_env, "tests": phase_tests, "bench": phase_bench,
           "tin20": phase_tin20}
    start = float(os.environ["GPU_CHECK_T0"]) if os.environ.get("GPU_CHECK_T0") else None
    deadline = Deadline(float(os.environ.get("GPU_CHECK_BUDGET_S", 540)), start)
    signal.signal(signal.SIGTERM, _end_live_parts)
    failed, late = [], []
    try:
        args.cuda = _have_cuda()
        for name in phases:
            phase = Phase(name, out, args.label, args.smoke, deadline)
            phase.say(f"== {name} ({'smoke, ' if args.smoke else ''}label {args.label}, output {out})")
            try:
                run[name](phase, args)
            except Exception as e:  # noqa: BLE001 - one phase's failure is recorded, the others still run
                phase.parts.append({"part": "phase", "status": "failed", "tail": [f"{type(e).__name__}: {e}"]})
            summary = phase.finish()
            if not summary["ok"]:
                failed.append(name)
            late += [f"{name}: {p['part']}" for p in summary["parts"] if p.get("why", "").startswith("no time left")]
    finally:  # a SIGTERM too (_end_live_parts raises SystemExit)
        if not kept:
            shutil.rmtree(args.work, ignore_errors=True)
    print(f"gpu_check: {len(phases) - len(failed)} of {len(phases)} phases ok" + (f"; failed: {', '.join(failed)}"
                                                                                 if failed else ""))
    if late:  # they count as ok, having measured nothing: a run that passes says what it left out
        print(f"gpu_check: {len(late)} part(s) skipped for lack of time (GPU_CHECK_BUDGET_S), measured nothing: "
              f"{'; '.join(late)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
