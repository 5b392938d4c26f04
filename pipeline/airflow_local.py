"""Run Airflow on this machine for the retraining DAG: ``python -m pipeline.airflow_local`` (``make airflow``).

It does what ``airflow standalone`` does (migrate the metadata database, start the scheduler, DAG processor,
triggerer and API server, generate the admin password on first start) with two differences:

- nothing listens beyond 127.0.0.1: the API server is bound there, and the scheduler's and triggerer's log
  servers, which ``airflow standalone`` starts on all interfaces (ports 8793 / 8794, no setting moves them), are
  not started; the API server reads task logs from the local log folder instead;
- it prints where the generated admin password is, never the password.

Defaults (each one kept when already set in the environment): ``AIRFLOW_HOME=<repo>/airflow_home``, the project's
``dags/`` folder, no example DAGs, ``parallelism=4``, DAGs unpaused when first seen, SQLite with the LocalExecutor.
Beyond one process: set ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` (``postgresql+psycopg://...``) and
``AIRFLOW__CORE__EXECUTOR=CeleryExecutor`` with ``AIRFLOW__CELERY__BROKER_URL`` (``redis://...``) and
``AIRFLOW__CELERY__RESULT_BACKEND`` (``db+postgresql+psycopg://...``), and a Celery worker is started too
(more workers, on other machines, join with ``airflow celery worker``).
Ctrl-C (or SIGTERM) stops every component, waiting at most ``--stop-timeout`` seconds before killing what is left.
Each component's output goes to ``$AIRFLOW_HOME/logs/<component>.out``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from pipeline.local_servers import start_group, stop_groups

REPO = Path(__file__).resolve().parents[1]
AIRFLOW = Path(sys.executable).with_name("airflow")
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"


def airflow_env(home: Path, port: int, dags: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every component: ``base`` (default ``os.environ``) plus the local defaults."""
    env = dict(os.environ if base is None else base)
    env["AIRFLOW_HOME"] = str(home)
    defaults = {
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        # task workers reach the API server's execution API here (the default assumes localhost:8080)
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
    }
    sync_db = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if sync_db.startswith("postgresql+psycopg://"):  # psycopg 3 is async too; Airflow would assume asyncpg
        defaults["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] = sync_db
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def uses_celery(env: dict[str, str]) -> bool:
    """Whether one of the configured executors (``a,b`` or ``alias:module.Class``) is the CeleryExecutor."""
    executors = env.get("AIRFLOW__CORE__EXECUTOR", "").split(",")
    return any(name.strip().rsplit(".", 1)[-1].rsplit(":", 1)[-1] == "CeleryExecutor" for name in executors)


def components(port: int, triggerer: bool = True, celery_worker: bool = False) -> dict[str, list[str]]:
    commands = {
        "scheduler": ["scheduler", "--skip-serve-logs"],
        "dag-processor": ["dag-processor"],
        "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(port)],
    }
    if triggerer:
        commands["triggerer"] = ["triggerer", "--skip-serve-logs"]
    if celery_worker:  # its log server would listen on all interfaces: the API server reads the log folder instead
        commands["celery-worker"] = ["celery", "worker", "--concurrency", "2", "--skip-serve-logs"]
    return commands


def password_file(env: dict[str, str]) -> Path:
    configured = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
    return Path(configured) if configured else Path(env["AIRFLOW_HOME"]) / PASSWORDS_FILE


def healthy(port: int, timeout_s: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=timeout_s) as reply:
            return reply.status == 200
    except OSError:
        return False


class Airflow:
    """The running components; :meth:`stop` ends exactly the processes :meth:`start` launched."""

    def __init__(self, env: dict[str, str], port: int, triggerer: bool = True) -> None:
        self.env, self.port, self.triggerer = env, port, triggerer
        self.logs = Path(env["AIRFLOW_HOME"]) / "logs"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False  # set by a signal handler: every wait below gives up
        self._outputs: list[IO[bytes]] = []

    def migrate(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / "db-migrate.out", "wb") as out:
            done = subprocess.run([str(AIRFLOW), "db", "migrate"], env=self.env, stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed: see {self.logs / 'db-migrate.out'}")

    def start(self) -> None:
        for name, command in components(self.port, self.triggerer, uses_celery(self.env)).items():
            out = open(self.logs / f"{name}.out", "ab")  # noqa: SIM115 - closed in stop()
            self._outputs.append(out)
            self.processes[name] = start_group([str(AIRFLOW), *command], out, env=self.env)

    def dead(self) -> list[str]:
        return [name for name, process in self.processes.items() if process.poll() is not None]

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not healthy(self.port):
            if self.stopping:
                raise InterruptedError("stopped while starting")
            if self.dead():
                raise RuntimeError(f"{', '.join(self.dead())} stopped while starting: see {self.logs}/<name>.out")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API server did not answer on 127.0.0.1:{self.port} within {timeout_s:.0f}s")
            time.sleep(1.0)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to every component's process group (a Celery worker lets its running tasks finish), SIGKILL to
        the groups still there after ``timeout_s`` — task processes included, so nothing outlives the launcher."""
        stop_groups(self.processes.values(), timeout_s)
        for out in self._outputs:
            out.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.airflow_local", description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=os.environ.get("AIRFLOW_HOME") or str(REPO / "airflow_home"))
    parser.add_argument("--port", type=int, default=8080, help="API server / UI port on 127.0.0.1 (default 8080)")
    parser.add_argument("--dags", default=str(REPO / "dags"), help="DAG folder (default: the project's dags/)")
    parser.add_argument("--no-triggerer", action="store_true", help="skip the triggerer (no deferrable tasks here)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the API server")
    parser.add_argument("--stop-timeout", type=float, default=30.0, help="seconds to wait for a clean stop")
    args = parser.parse_args(argv)
    home = Path(args.home).resolve()
    env = airflow_env(home, args.port, Path(args.dags).resolve())
    airflow = Airflow(env, args.port, triggerer=not args.no_triggerer)

    def request_stop(signum: int, frame: object) -> None:
        airflow.stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    print(f"AIRFLOW_HOME={home}; migrating the metadata database ...", flush=True)
    airflow.migrate()
    airflow.start()
    try:
        airflow.wait_ready(args.ready_timeout)
        print(
            f"\nAirflow is up: http://127.0.0.1:{args.port}  (DAG hymoerec_retrain, DAG folder {args.dags})\n"
            f"User 'admin'; its generated password is in {password_file(env)}\n"
            f"Component output: {airflow.logs}/<component>.out. Ctrl-C stops everything.\n",
            flush=True,
        )
        while not airflow.stopping and not airflow.dead():
            time.sleep(1.0)
        if airflow.dead() and not airflow.stopping:
            print(f"{', '.join(airflow.dead())} stopped: see {airflow.logs}; stopping the rest", file=sys.stderr)
            return 1
        return 0
    except (RuntimeError, TimeoutError, InterruptedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        print("stopping Airflow ...", flush=True)
        airflow.stop(args.stop_timeout)


if __name__ == "__main__":
    sys.exit(main())
