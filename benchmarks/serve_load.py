"""Load benchmark of the served model: ``mlflow models serve`` of the champion under concurrent keep-alive clients.

Issue 14 asks what one served HyMoERec answers per second and how fast, so the figures must come from the real
path: the project's default model trained on Amazon Beauty (L = 50), evaluated and registered as ``champion`` by
the pipeline's own stages (:data:`pipeline.stages.STAGES`, what ``python -m pipeline`` runs) in an MLflow SQLite
store under ``--work-dir``, then served exactly as the README serves it. It is trained for ``--epochs`` (default 1):
serving latency depends on the network's shape and the catalogue, not on how well its weights are trained. A work
folder that already holds a champion is reused as it is, so a rerun only measures.

The load comes from a second process (this script with ``--client``), so that the clients' JSON work is not
counted inside the server and the GIL of one does not slow the other: ``--clients`` threads, one keep-alive HTTP
connection each, send requests back to back for ``--seconds`` after ``--warmup`` requests each that are not
counted, once per ``--batch-sizes`` value. A request holds ``batch`` users' real histories from the test split
(raw item ids as strings, k = 10); every answer is checked (HTTP 200, one prediction per user). On a small machine
clients and server share the cores: the JSON records the machine and its load average.

    HYMOE_DATA_MIRROR=../shared/datasets .venv/bin/python benchmarks/serve_load.py

writes ``benchmarks/results/serve_load.json`` and prints a Markdown table for BENCHMARKS.md; the exit code is 1 if
any request failed. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import platform
import random
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.local_servers import free_port, start_group, stop_group, wait_http
from pipeline.tracking.runs import git_commit

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
BODIES = 256  # distinct request bodies per batch size, built before the clock starts and cycled
SERVE_TIMEOUT_S = 60  # mlflow models serve's own request timeout (its default, passed explicitly)
log = logging.getLogger("serve_load")


# ----------------------------------------------------------------------------------------------- the model
def benchmark_params(args: argparse.Namespace) -> Any:
    """``params.yaml`` with every folder under ``<work-dir>/<dataset>`` (the model is the project's default)."""
    from pipeline.params import load_params

    work = args.work_dir.resolve() / args.dataset
    return load_params(
        REPO / "params.yaml",
        {
            "data.dataset": args.dataset,
            "data.interim_dir": str(work / "interim"),
            "data.cache_dir": str(work / "cache"),
            "preprocess.processed_dir": str(work / "processed"),
            "model.max_seq_len": 50,
            "train.model_dir": str(work / "models"),
            "train.epochs": args.epochs,
            "evaluate.report_dir": str(work / "reports"),
            "mlflow.enabled": True,
            "mlflow.store_dir": str(work / "mlflow"),
            "mlflow.batch_output": str(work / "reports" / "recommendations.parquet"),
        },
    )


def ensure_champion(params: Any) -> Any:
    """The champion version of the work folder's store; download → preprocess → train → evaluate (which registers
    and promotes, as DVC's ``evaluate`` stage does) first when there is none."""
    from pipeline.stages import STAGES
    from pipeline.tracking.registry import alias_target
    from pipeline.tracking.store import CHAMPION, Tracking, model_name

    name = model_name(params)
    champion = alias_target(Tracking.from_params(params), name, CHAMPION)
    if champion is not None:
        log.info("reusing %s version %s (champion) from %s", name, champion.version, params.mlflow.store_dir)
        return champion
    for stage in ("download", "preprocess", "train", "evaluate"):
        log.info("stage %s", stage)
        STAGES[stage].run(params)
    champion = alias_target(Tracking.from_params(params), name, CHAMPION)
    if champion is None:
        raise SystemExit(f"error: no champion of {name} after evaluate (see the log above)")
    return champion


def model_record(params: Any, champion: Any) -> dict[str, Any]:
    """What is served: registry version, its run's training settings, the network's shape, the catalogue."""
    from pipeline.data.layout import num_items
    from pipeline.tracking.registry import champion_uri
    from pipeline.tracking.store import Tracking

    run = Tracking.from_params(params).client.get_run(champion.run_id)
    keys = ("model.kind", "model.moe.enabled", "model.hidden_size", "model.num_layers", "model.max_seq_len")
    keys += ("model.moe.num_experts", "model.moe.top_k", "model.moe.router_input", "model.history_bias")
    keys += ("train.epochs", "data.dataset")
    return {
        "uri": champion_uri(params),
        "version": str(champion.version),
        "run_id": champion.run_id,
        "test_ndcg_at_10": run.data.metrics.get("test.ndcg_at_10"),
        "params": {key: run.data.params.get(key) for key in keys},
        "items": num_items(params.preprocess.processed_dir),
    }


def write_histories(params: Any, path: Path) -> int:
    """Every test user's history (raw item ids, oldest first) as JSON for the client process; returns the count."""
    import pyarrow.parquet as pq

    from pipeline.data.id_maps import read_id_map
    from pipeline.data.layout import PreprocessOutputs
    from pipeline.io import write_bytes_atomic

    splits = PreprocessOutputs.under(params.preprocess.processed_dir)
    raw = read_id_map(splits.item_map, "item_id")
    histories = [[raw[i] for i in h] for h in pq.read_table(splits.test, columns=["history"])["history"].to_pylist()]
    histories = [h for h in histories if h]
    write_bytes_atomic(path, json.dumps(histories).encode())
    return len(histories)


# ----------------------------------------------------------------------------------------------- the server
@contextmanager
def served(uri: str, tracking_uri: str, workers: int, threads: int | None, work: Path) -> Iterator[dict[str, Any]]:
    """``mlflow models serve`` of ``uri`` in its own process group, ready on /ping; always stopped afterwards."""
    port = free_port()
    cmd = ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", HOST, "-p", str(port)]
    cmd += ["--workers", str(workers), "--timeout", str(SERVE_TIMEOUT_S)]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": tracking_uri}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log_path = work / "serve.log"
    log.info("serving %s on %s:%d (%d worker(s)); log %s", uri, HOST, port, workers, log_path)
    with open(log_path, "w") as out:
        proc = start_group(cmd, out, env=env, cwd=work)
    try:
        started = time.perf_counter()
        wait_http(f"http://{HOST}:{port}/ping", proc, log_path, timeout_s=300)
        log.info("server ready after %.1f s", time.perf_counter() - started)
        yield {"command": shlex.join(cmd), "port": port, "ready_s": round(time.perf_counter() - started, 2)}
    finally:
        stop_group(proc)


# ----------------------------------------------------------------------------------------------- the client
def client_main(args: argparse.Namespace) -> int:
    """The second process: ``--clients`` threads on keep-alive connections; prints one JSON line of figures."""
    import numpy as np

    batch = args.batch_sizes[0]
    histories = json.loads(args.histories.read_text())
    rng = random.Random(args.seed * 1_000_003 + batch)
    bodies = [
        json.dumps(
            {"dataframe_records": [{"history": h, "k": args.k} for h in rng.choices(histories, k=batch)]}
        ).encode()
        for _ in range(BODIES)
    ]
    headers = {"Content-Type": "application/json"}
    clock: dict[str, float] = {}

    def start_clock() -> None:  # runs once, when every client has finished its warm-up
        clock["start"] = time.perf_counter()
        clock["deadline"] = clock["start"] + args.seconds

    barrier = threading.Barrier(args.clients, action=start_clock)
    outcomes: list[dict[str, Any]] = [{} for _ in range(args.clients)]

    def client(index: int) -> None:
        latencies: list[float] = []
        errors: list[str] = []
        conn = http.client.HTTPConnection(HOST, args.port, timeout=args.timeout)
        sent = 0

        def one(body: bytes) -> float | None:
            nonlocal conn
            began = time.perf_counter()
            try:
                conn.request("POST", "/invocations", body, headers)
                response = conn.getresponse()
                data = response.read()
                elapsed = time.perf_counter() - began
                if response.status != 200:
                    errors.append(f"HTTP {response.status}: {data[:300].decode(errors='replace')}")
                    return None
                answered = len(json.loads(data)["predictions"])
                if answered != batch:
                    errors.append(f"{answered} predictions for {batch} users")
                    return None
                return elapsed
            except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as err:
                errors.append(f"{type(err).__name__}: {err}")
                conn.close()
                conn = http.client.HTTPConnection(HOST, args.port, timeout=args.timeout)
                time.sleep(0.05)  # a dead server must not turn the loop into a spin
                return None

        for i in range(args.warmup):
            one(bodies[(index * 7 + i) % BODIES])
        warmup_errors = errors[:]  # reported on their own: they are not in the measured window
        errors.clear()
        try:
            barrier.wait(timeout=args.timeout * (args.warmup + 1) + 30)
        except threading.BrokenBarrierError:
            errors.append("another client did not finish its warm-up")
            outcomes[index] = {"latencies": [], "errors": errors, "warmup_errors": warmup_errors, "sent": 0}
            outcomes[index]["end"] = time.perf_counter()
            return
        while sent < args.max_requests and time.perf_counter() < clock["deadline"]:
            elapsed = one(bodies[(index * 31 + args.warmup + sent) % BODIES])
            if elapsed is not None:
                latencies.append(elapsed)
            sent += 1
        conn.close()
        outcomes[index] = {
            "latencies": latencies,
            "errors": errors,
            "warmup_errors": warmup_errors,
            "sent": sent,
            "end": time.perf_counter(),
        }

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies_ms = np.array([s for o in outcomes for s in o["latencies"]]) * 1000
    errors = [e for o in outcomes for e in o["errors"]]
    warmup_errors = [e for o in outcomes for e in o["warmup_errors"]]
    wall = max(o["end"] for o in outcomes) - clock.get("start", max(o["end"] for o in outcomes))
    ok = len(latencies_ms)

    def pct(q: float) -> float | None:
        return round(float(np.percentile(latencies_ms, q)), 2) if ok else None

    print(
        json.dumps(
            {
                "batch": batch,
                "requests": sum(o["sent"] for o in outcomes),
                "ok": ok,
                "errors": len(errors),
                "warmup_errors": len(warmup_errors),
                "first_error": (warmup_errors + errors)[0] if warmup_errors or errors else None,
                "wall_s": round(wall, 3),
                "requests_per_s": round(ok / wall, 2) if wall > 0 else None,
                "users_per_s": round(ok * batch / wall, 1) if wall > 0 else None,
                "latency_ms": {
                    "p50": pct(50),
                    "p90": pct(90),
                    "p99": pct(99),
                    "max": round(float(latencies_ms.max()), 2) if ok else None,
                    "mean": round(float(latencies_ms.mean()), 2) if ok else None,
                },
                "request_bytes_mean": round(sum(map(len, bodies)) / BODIES),
            }
        ),
        flush=True,
    )
    return 0


def run_load(args: argparse.Namespace, port: int, batch: int, histories: Path) -> dict[str, Any]:
    """One batch size: the client process, bounded by its own deadline and a hard timeout here."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--client", "--port", str(port), "--histories"]
    cmd += [str(histories), "--batch-sizes", str(batch), "--clients", str(args.clients), "--seconds", str(args.seconds)]
    cmd += ["--warmup", str(args.warmup), "--k", str(args.k), "--timeout", str(args.timeout)]
    cmd += ["--max-requests", str(args.max_requests), "--seed", str(args.seed)]
    limit = args.seconds + args.timeout * (args.warmup + 2) + 120
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"batch": batch, "requests": 0, "ok": 0, "errors": 1, "first_error": f"client ran past {limit:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"batch": batch, "requests": 0, "ok": 0, "errors": 1, "first_error": f"client exit {done.returncode}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------- the record
def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal")), 0)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": models[0] if models else platform.processor(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "platform": platform.platform(),
    }


def markdown(record: dict[str, Any]) -> str:
    """The BENCHMARKS.md block: command, settings, one row per batch size, users/s against the first one."""
    server, client, model, box = record["server"], record["client"], record["model"], record["machine"]
    git = record["git"]
    lines = [
        f"Command: `{record['command']}`",
        "",
        f"Served: `{model['uri']}` version {model['version']} ({model['params']['model.kind']}, "
        f"MoE {'on' if model['params']['model.moe.enabled'] == 'true' else 'off'}, "
        f"d = {model['params']['model.hidden_size']}, "
        f"{model['items']:,} items, trained {model['params']['train.epochs']} epoch(s)); server `--workers "
        f"{server['workers']}`, torch threads {server['torch_threads']}; {client['clients']} client threads in a "
        f"second process, one keep-alive connection each, {client['seconds']} s per batch size after "
        f"{client['warmup']} warm-up requests each, k = {client['k']}; {box['nproc']} × {box['cpu_model']}, "
        f"load average {record['loadavg_start'][0]:.2f} at the start; git {git['commit'][:7]}"
        f"{' + local changes' if git['dirty'] else ''}; {record['date'][:10]}.",
        "",
        f"| users / request | requests | requests / s | users / s | users / s vs batch {record['results'][0]['batch']} "
        "| p50 ms | p90 ms | p99 ms | max ms | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first = record["results"][0].get("users_per_s")  # the ratios are to the first batch size, as the header says

    def num(value: float | None, digits: int = 1) -> str:
        return "–" if value is None else f"{value:,.{digits}f}"

    for r in record["results"]:
        lat = r.get("latency_ms", {})
        ratio = f"{r['users_per_s'] / first:.2f}×" if first and r.get("users_per_s") else "–"
        errors = str(r["errors"] + r.get("warmup_errors", 0))
        lines.append(
            f"| {r['batch']} | {r['requests']:,} | {num(r.get('requests_per_s'))} | {num(r.get('users_per_s'))} | "
            f"{ratio} | {num(lat.get('p50'))} | {num(lat.get('p90'))} | {num(lat.get('p99'))} | "
            f"{num(lat.get('max'))} | {errors} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "benchmarks/results/serve_load")
    parser.add_argument("--dataset", default="beauty", choices=["beauty", "ml-1m", "ml-100k", "synthetic"])
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (latency does not depend on them)")
    parser.add_argument("--server-workers", type=int, default=1, help="mlflow models serve --workers")
    parser.add_argument("--server-threads", type=int, help="OMP/MKL threads of the server (default: torch's)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads, one connection each")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted requests per client before the clock")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="users per request")
    parser.add_argument("--k", type=int, default=10, help="recommendations per user")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request (s)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="cap per client and batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled users")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/serve_load.json")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)  # the load process (internal)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--histories", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args)
    if min(args.clients, args.epochs, args.server_workers, args.k, *args.batch_sizes) < 1 or args.warmup < 0:
        parser.error("--clients, --epochs, --server-workers, --k and --batch-sizes must be >= 1, --warmup >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import mlflow
    import torch

    from pipeline.io import write_json_atomic
    from pipeline.tracking.store import TRACKING_URI_ENV, embedded_uri

    default_threads = torch.get_num_threads()  # what the server's torch takes from the same environment
    params = benchmark_params(args)
    work = Path(params.mlflow.store_dir).parent
    work.mkdir(parents=True, exist_ok=True)
    tracking_uri = embedded_uri(params.mlflow.store_dir)
    os.environ[TRACKING_URI_ENV] = tracking_uri  # this folder's store, never a server set in the shell
    champion = ensure_champion(params)
    model = model_record(params, champion)
    histories = work / "histories.json"
    users = write_histories(params, histories)
    record: dict[str, Any] = {
        "command": shlex.join([".venv/bin/python", "benchmarks/serve_load.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": dict(zip(("commit", "dirty"), git_commit(REPO) or (None, None), strict=True)),
        "machine": machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "mlflow": mlflow.__version__},
        "model": model,
        "loadavg_start": os.getloadavg(),
    }
    with served(model["uri"], tracking_uri, args.server_workers, args.server_threads, work) as server:
        record["server"] = {
            **server,
            "workers": args.server_workers,
            "torch_threads": args.server_threads or default_threads,
            "request_timeout_s": SERVE_TIMEOUT_S,
        }
        record["client"] = {
            "clients": args.clients,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "k": args.k,
            "timeout_s": args.timeout,
            "max_requests": args.max_requests,
            "transport": "http.client, one keep-alive connection per thread, threads in one separate process",
            "history_pool": users,
            "seed": args.seed,
        }
        record["results"] = []
        for batch in args.batch_sizes:
            r = run_load(args, server["port"], batch, histories)
            record["results"].append(r)
            lat, failed = r.get("latency_ms", {}), r["errors"] + r.get("warmup_errors", 0)
            print(
                f"batch {batch}: {r['ok']:,} requests in {r.get('wall_s', 0):.1f} s, {r.get('requests_per_s')} "
                f"requests/s, {r.get('users_per_s')} users/s, p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, "
                f"{failed} errors" + (f" (first: {r['first_error']})" if failed else ""),
                flush=True,
            )
    record["loadavg_end"] = os.getloadavg()
    write_json_atomic(args.out, record)
    print(f"\n{markdown(record)}\n\nwritten: {args.out}")
    failed = sum(r["errors"] + r.get("warmup_errors", 0) for r in record["results"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
