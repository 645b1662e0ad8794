"""The reliability run: soak, fuzzing, faults, killed training, security; figures as JSON and a Markdown table.

    python -m bench.reliability            # the short variant (about 2 minutes), as in the test suite
    python -m bench.reliability --long     # 10-minute soak, 10,000 fuzz cases, 5 training kills (~25 minutes)

Writes bench/results/reliability.json (every figure, the soak's RSS and
descriptor series) and prints one table row per promise: the promise, the test
that checks it in the suite, the figure measured here and whether it held. The
exit status is 1 when a promise did not hold. Everything runs against real
processes: `charrnn-serve` with torch unimportable, `charrnn-train`,
`charrnn-generate`, on this machine's loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from bench import cancel_leak
from testkit import faults, training_faults
from testkit.fuzz import run_fuzz
from testkit.soak import SERVER_ARGS, SoakConfig, soak
from testkit.modelfactory import DEFAULT_VOCAB, make_model_repo
from testkit.serve_process import ServeProcess, blocked_env

RESULTS = Path(__file__).parent / "results" / "reliability.json"
FUZZ_MAX_CHARS = 64  # --max-chars of the fuzzed server (tests/test_fuzz.py uses the same)
PARTS = ("soak", "leak", "fuzz", "faults", "training", "security")


@dataclass(frozen=True)
class Plan:
    soak_seconds: float  # measured soak, after a warm-up
    warmup_seconds: float
    fuzz_cases: int
    kills: int  # SIGKILLs of charrnn-train
    train_steps: int
    leak_seconds: float  # each of the five loads of bench/cancel_leak.py


SHORT = Plan(soak_seconds=30, warmup_seconds=5, fuzz_cases=300, kills=2, train_steps=150, leak_seconds=15)
LONG = Plan(soak_seconds=600, warmup_seconds=20, fuzz_cases=10_000, kills=5, train_steps=300, leak_seconds=60)


def tracebacks(log: str, keep: int = 3) -> list[str]:
    """The first ``keep`` tracebacks in a server's log, each with the log line before it (what it was doing).

    A traceback ends at its first unindented line after the header: the exception and its message.
    """
    lines, texts = log.splitlines(), []
    for i, line in enumerate(lines):
        if len(texts) == keep:
            break
        if line.startswith("Traceback"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j][:1] not in (" ", "\t")), len(lines) - 1)
            texts.append("\n".join(lines[max(0, i - 1): end + 1])[:4000])
    return texts


def server_figures(server: ServeProcess) -> dict:
    """Whether the server outlived its part, and the tracebacks in its log (none is the promise)."""
    log = server.log()
    return {"server_alive": server.proc.poll() is None, "server_tracebacks": log.count("Traceback"),
            "server_traceback_texts": tracebacks(log)}


def run_soak(plan: Plan, models: Path, env: dict, work: Path) -> dict:
    with ServeProcess(models, *SERVER_ARGS, env=env) as server:
        cfg = SoakConfig(streams=256, seconds=plan.soak_seconds, warmup_seconds=plan.warmup_seconds)
        figures = asyncio.run(soak(server.target, server.proc.pid, server.metrics_url, cfg))
        figures.update(server_figures(server))
    return figures


def run_leak(plan: Plan, models: Path, env: dict, work: Path) -> dict:
    return cancel_leak.measure(models, env, plan.leak_seconds, plan.warmup_seconds)


def run_fuzzing(plan: Plan, models: Path, env: dict, work: Path) -> dict:
    with ServeProcess(models, "--max-chars", str(FUZZ_MAX_CHARS), "--max-prime-chars", "2048", env=env) as server:
        figures = run_fuzz(server.target, DEFAULT_VOCAB, FUZZ_MAX_CHARS, plan.fuzz_cases, random_seed=int(time.time()))
        figures.update(server_figures(server))
    return figures


def run_faults(plan: Plan, models: Path, env: dict, work: Path) -> dict:
    damaged = Path(shutil.copytree(models, work / "damaged"))
    (work / "disk").mkdir()
    return {
        "client_killed": faults.client_killed_mid_stream(models, env),
        "server_killed": faults.server_killed_and_restarted(models, env),
        "model_truncated": faults.model_truncated_while_served(damaged, env),
        "metrics_port_taken": faults.port_taken_at_startup(models, env, "metrics"),
        "grpc_port_taken": faults.port_taken_at_startup(models, env, "grpc"),
        "disk_full": training_faults.disk_full_during_checkpoint(work / "disk"),
    }


def run_training(plan: Plan, models: Path, env: dict, work: Path) -> dict:
    (work / "train").mkdir()
    return training_faults.kill_and_resume(work / "train", plan.kills, seed=int(time.time()),
                                           max_steps=plan.train_steps)


def run_security(plan: Plan, models: Path, env: dict, work: Path) -> dict:
    """The security tests themselves (their checks need no figures beyond pass counts)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_security.py"],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    return {"returncode": done.returncode, "summary": summary}


RUNNERS = {"soak": run_soak, "leak": run_leak, "fuzz": run_fuzzing, "faults": run_faults, "training": run_training,
           "security": run_security}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _codes(codes: dict) -> str:
    return ", ".join(f"{c} {n:,}" for c, n in sorted(codes.items(), key=lambda kv: -kv[1]))


def _new_threads(s: dict) -> str:
    """The thread names that are more numerous at the end of the soak than at its start."""
    start, end = s.get("thread_names_start"), s.get("thread_names_end")
    if start is None or end is None:
        return ""
    more = [f"{name} +{n - start.get(name, 0)}" for name, n in end.items() if n > start.get(name, 0)]
    return f" ({', '.join(more)})" if more else ""


def _other_styles(lk: dict) -> str:
    """The bare server written with context.write() and shielded writes (absent in runs before they were added)."""
    styles = [(name, lk[key]) for name, key in (("context.write()", "bare_grpc_writer_cancelling"),
                                                 ("shielded writes", "bare_grpc_shielded_cancelling")) if key in lk]
    return "".join(f"; {name}: {x['bytes_per_cancelled_call']} B" for name, x in styles)


def promises(results: dict) -> list[tuple[str, str, str, bool]]:
    """(promise, test, figure, held) for every promise whose part ran."""
    rows = []
    T = "tests/"
    if s := results.get("soak"):
        if "error" in s:
            rows.append(("soak ran", T + "test_reliability_soak.py", s["error"], False))
        else:
            rows += [
                (f"{s['config']['streams']} concurrent misbehaving streams get only documented statuses",
                 T + "test_reliability_soak.py::test_every_status_is_documented",
                 f"{s['requests']:,} requests in {s['soak_seconds']:.0f} s ({_codes(s['client_codes'])}); "
                 "server counted "
                 f"{_codes(s['server_codes'])}", not s["undocumented"] and not s["bad_ok_streams"]
                 and not {"INTERNAL", "UNKNOWN"} & set(s["server_codes"]) and not s["server_tracebacks"]),
                ("server memory under load grows by less than 5% over the soak",
                 T + "test_reliability_soak.py::test_memory_under_load_grows_by_less_than_3_percent",
                 f"RSS under load {_mib(s['rss_start_bytes'])} -> {_mib(s['rss_end_bytes'])} "
                 f"({s['rss_growth']:+.1%}; idle {_mib(s['rss_idle_start_bytes'])} -> {_mib(s['rss_idle_end_bytes'])}), "
                 f"peak {_mib(s['rss_peak_bytes'])}", s["rss_growth"] < 0.05),
                ("open descriptors return to the starting count",
                 T + "test_reliability_soak.py::test_descriptors_return_to_the_starting_count",
                 f"{s['fds_start']} -> {s['fds_end']} (peak {s['fds_peak']}, settled in {s['fds_settle_seconds']} s); "
                 f"threads {s['threads_start']} -> {s['threads_end']}{_new_threads(s)}",
                 s["fds_end"] <= s["fds_start"]),
                ("active and queued stream gauges return to 0; health stays SERVING",
                 T + "test_reliability_soak.py::test_stream_gauges_return_to_zero_and_health_stays_serving",
                 f"active {s['active_after']:g}, queued {s['queued_after']:g} after {s['idle_after_seconds']} s; "
                 f"{s['health_after']}",
                 s["active_after"] == 0 == s["queued_after"] and s["health_after"] == "SERVING"),
            ]
    if (lk := results.get("leak")) and "error" not in lk:
        c, w, b = lk["charrnn_cancelling"], lk["charrnn_well_behaved"], lk["bare_grpc_cancelling"]
        rows.append(("without cancelled calls server memory stays flat (the soak's growth is per cancelled call)",
                     "bench/cancel_leak.py (no test: minutes of load)",
                     f"well-behaved clients: {w['calls']:,} calls, RSS {w['rss_growth']:+.1%}; cancelling clients: "
                     f"{c['bytes_per_cancelled_call']} B per cancelled call ({c['cancelled_calls']:,} calls, "
                     f"{c['rss_growth']:+.1%}); bare grpc.aio server, same clients: "
                     f"{b['bytes_per_cancelled_call']} B per cancelled call" + _other_styles(lk), w["rss_growth"] < 0.02))
    elif lk:
        rows.append(("cancel leak measured", "bench/cancel_leak.py", lk["error"], False))
    if f := results.get("fuzz"):
        rows.append(("fuzzed requests (every field, raw wire bytes) get OK or a documented status; SERVING",
                     T + "test_fuzz.py::test_fuzzed_requests_get_only_documented_statuses",
                     f.get("error") or f"{f['cases']:,} cases ({_codes(f['codes'])}); {f['health_after']}"
                     + (f"; FAILED: {f['failure'][:300]}" if f["failure"] else ""),
                     "error" not in f and not f["failure"] and f["health_after"] == "SERVING"
                     and not f["server_tracebacks"]))
    if x := results.get("faults"):
        if "error" in x:
            rows.append(("faults ran", T + "test_faults.py", x["error"], False))
        else:
            c, k, m, d = x["client_killed"], x["server_killed"], x["model_truncated"], x["disk_full"]
            rows += [
                ("a SIGKILLed client's slot is freed", T + "test_faults.py::test_killed_client_frees_its_slot",
                 f"active streams 1 -> {c['active_after_kill']:g} within {c['seconds_to_free_slot']} s; "
                 f"counted as CANCELLED: {c['counted_as_cancelled']}", c["active_after_kill"] == 0),
                ("server SIGKILLed and restarted: UNAVAILABLE, then a retry succeeds",
                 T + "test_faults.py::test_server_killed_and_restarted_clients_see_unavailable_then_a_retry_succeeds",
                 f"in flight {k['in_flight_code']}, while down {k['while_down_code']}; retry OK after "
                 f"{k.get('retry_attempts')} attempts, {k.get('seconds_to_success')} s",
                 k["in_flight_code"] == k["while_down_code"] == "UNAVAILABLE" and k["retry_ok"]),
                ("model file truncated while served: streams finish, reload refuses it with path and reason",
                 T + "test_faults.py::test_truncated_model_file_is_refused_at_reload_while_the_loaded_one_"
                 "keeps_serving",
                 f"{m['streams_completed']}/{len(m['stream_results'])} streams completed; "
                 f"refused: {m['refusal'][:400]}",
                 m["streams_completed"] == len(m["stream_results"]) and m["refusal_names_path"]
                 and m["health_tiny"] == "SERVING"),
            ]
            for key, flag in (("metrics_port_taken", "--metrics-port"), ("grpc_port_taken", "--port")):
                p = x[key]
                rows.append((f"{flag} taken at start-up: clear error, non-zero exit",
                             T + "test_faults.py::test_a_taken_port_at_start_up_is_a_clear_error_and_a_non_zero_exit",
                             f"exit {p['returncode']}: {p['error_line'].split(': ', 1)[-1][:150]}",
                             p["returncode"] != 0 and flag in p["error_line"] and not p["traceback"]))
            rows.append(("disk full while a checkpoint is written: clear error, last checkpoint intact",
                         T + "test_faults.py::test_disk_full_while_a_checkpoint_is_written_stops_training_and_keeps_"
                         "the_last_checkpoint",
                         f"{d['how']}: exit {d['returncode']}, \"{d['error'][:220]}\"; last.pt step "
                         f"{d['checkpoint_step_after']} loads",
                         d["returncode"] != 0 and "last.pt" in d["error"] and not d["traceback"]
                         and d["checkpoint_step_after"] == d["checkpoint_step_before"]))
    if t := results.get("training"):
        rows.append(("charrnn-train SIGKILLed at random moments resumes to the exact uninterrupted run",
                     T + "test_reliability_training.py",
                     t.get("error") or f"{t['killed_runs']} kills ({t['killed_during_checkpoint_write']} during a "
                     f"checkpoint write), resumed from steps {t['resumes']}; {t['steps_compared']} step losses equal: "
                     f"{t['steps_equal']}, {t['evaluations_compared']} evaluations equal: {t['evaluations_equal']}, "
                     f"weights equal: {t['final_weights_equal']}",
                     "error" not in t and t["steps_equal"] and t["evaluations_equal"] and t["final_weights_equal"]))
    if sec := results.get("security"):
        rows.append(("path escapes, oversize messages, plaintext / expired / not-yet-valid clients are refused",
                     T + "test_security.py", sec.get("error") or sec["summary"],
                     "error" not in sec and sec["returncode"] == 0))
    return rows


def table(rows: list[tuple[str, str, str, bool]]) -> str:
    lines = ["| promise | checked by | figure (last run) | held |", "| --- | --- | --- | --- |"]
    for promise, test, figure, held in rows:
        figure = re.sub(r"/\S*?/charrnn-reliability-[^/\s]+", "$TMP", figure)  # the run's temporary folder
        figure = figure.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {promise} | `{test}` | {figure} | {'yes' if held else '**NO**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n")[0])
    p.add_argument("--long", action="store_true", help="10-minute soak, 10,000 fuzz cases, 5 training kills")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run (of {', '.join(PARTS)})")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results file (default {RESULTS})")
    p.add_argument("--table", action="store_true", help="print the table of the run saved in --out, run nothing")
    args = p.parse_args(argv)
    if args.table:
        rows = promises(json.loads(args.out.read_text()))
        print(table(rows))
        return 0 if rows and all(r[3] for r in rows) else 1
    plan = LONG if args.long else SHORT
    parts = [x for x in args.only.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"--only must name parts of {', '.join(PARTS)}, got {', '.join(sorted(unknown))}")
    results: dict = {
        "variant": "long" if args.long else "short",
        "plan": plan.__dict__,
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                    "python": platform.python_version(), "platform": platform.platform()},
    }
    with tempfile.TemporaryDirectory(prefix="charrnn-reliability-") as tmp:
        work = Path(tmp)
        models = make_model_repo(work / "models", name="tiny")
        make_model_repo(models, name="other", cell="gru", seed=10)
        env = blocked_env(Path(tempfile.mkdtemp(dir=work)))
        for part in parts:
            started = time.monotonic()
            print(f"[{part}] running ...", file=sys.stderr, flush=True)
            try:
                results[part] = RUNNERS[part](plan, models, env, Path(tempfile.mkdtemp(prefix=part, dir=work)))
            except Exception as e:  # noqa: BLE001 - one broken part must not hide the figures of the others
                results[part] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            results[part]["part_seconds"] = round(time.monotonic() - started, 1)
            print(f"[{part}] done in {results[part]['part_seconds']} s", file=sys.stderr, flush=True)
    rows = promises(results)
    results["promises"] = [{"promise": r[0], "test": r[1], "figure": r[2], "held": r[3]} for r in rows]
    results["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp_out.replace(args.out)
    print(table(rows))
    load = results["machine"]["load_average_at_start"]
    print(f"\n{results['variant']} run, {os.cpu_count()} CPUs, load average {load} at start; figures in {args.out}")
    return 0 if rows and all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
