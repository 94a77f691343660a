"""`trainer server`: the tracking server for many writers, PostgreSQL-backed, with basic auth.

One folder holds the whole stack: `postgres/` (a PostgreSQL cluster listening on a Unix socket in
that folder only, never on TCP; MLflow's run store and the basic-auth user store are two databases in
it) and `artifacts/` (`mlflow server --artifacts-destination`: clients upload and download artifacts
through the server, so no machine needs to share a filesystem with it). `mlflow server --app-name
basic-auth` lets no one in without a user name and password; its admin user is
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from the environment, the variables `trainer` and
every Ray trial authenticate with. They are read from the environment only, never written anywhere.

PostgreSQL refuses to run as root: started by root, it runs as the `postgres` user (Debian's
`postgresql` package creates it), which then owns `postgres/` and must be able to reach the folder.
"""

import configparser
import glob
import os
import pwd
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

SOCKET_NAME = ".s.PGSQL.5432"
SOCKET_PATH_MAX = 107  # sun_path in struct sockaddr_un, less the terminating NUL
DATABASES = ("mlflow", "mlflow_auth")  # runs, users
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
PASSWORD_MIN = 12  # MLflow's basic-auth password policy


class ServerError(ValueError):
    pass


def pg_bin(name: str) -> str:
    """A PostgreSQL server binary, from the newest version installed in Debian's layout."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[4]))
    if not found:
        raise ServerError(f"PostgreSQL's {name} not found: install the server (apt-get install postgresql)")
    return found[-1]


def cluster_user() -> dict:
    """subprocess arguments that run PostgreSQL as its own user when we are root, else as us."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError("PostgreSQL refuses to run as root and there is no user `postgres` to run it") from None
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


def database_uri(folder: Path, database: str) -> str:
    # +psycopg2: SQLAlchemy 2.1's plain postgresql:// means psycopg 3
    return f"postgresql+psycopg2://mlflow@/{database}?host={folder / 'postgres'}"


def init_cluster(folder: Path) -> None:
    """initdb on first use: local socket only, no password needed on it (the socket's folder is the
    cluster owner's alone), every TCP connection rejected."""
    data = folder / "postgres"
    if (data / "PG_VERSION").exists():
        return
    as_user = cluster_user()
    data.mkdir(mode=0o700)
    if as_user:
        os.chown(data, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)
        if subprocess.run(["test", "-w", str(data)], **as_user).returncode != 0:
            data.rmdir()
            raise ServerError(f"user postgres can't reach {data}: choose a folder it can (e.g. under /tmp or /srv)")
    cmd = [pg_bin("initdb"), "-D", str(data), "-U", "mlflow", "--auth-local=trust", "--auth-host=reject"]
    out = subprocess.run(cmd, capture_output=True, text=True, **as_user)
    if out.returncode != 0:
        raise ServerError(f"initdb failed: {(out.stderr.strip() or out.stdout.strip()).splitlines()[-1]}")


def start_postgres(folder: Path) -> subprocess.Popen:
    data = folder / "postgres"
    cmd = [pg_bin("postgres"), "-D", str(data), "-c", "listen_addresses=", "-c", f"unix_socket_directories={data}"]
    log = open(folder / "postgres.log", "ab")  # noqa: SIM115 (the server's for its whole life)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **cluster_user())
    for _ in range(300):
        if proc.poll() is not None:
            raise ServerError(f"PostgreSQL exited at start (exit {proc.returncode}); see {folder / 'postgres.log'}")
        ready = subprocess.run([pg_bin("pg_isready"), "-q", "-h", str(data), "-U", "mlflow"])
        if ready.returncode == 0:
            return proc
        time.sleep(0.1)
    stop(proc, signal.SIGINT)
    raise ServerError(f"PostgreSQL did not start in 30 s; see {folder / 'postgres.log'}")


def create_databases(folder: Path) -> None:
    import psycopg2

    conn = psycopg2.connect(host=str(folder / "postgres"), dbname="postgres", user="mlflow")
    try:
        conn.autocommit = True  # CREATE DATABASE can't run in a transaction
        with conn.cursor() as cur:
            for name in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def auth_config(folder: Path) -> Path:
    """The basic-auth app's settings (no secrets: the admin comes from the environment at start)."""
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": "READ",
        "database_uri": database_uri(folder, "mlflow_auth"),
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    path = folder / "basic_auth.ini"
    with open(path, "w") as f:
        config.write(f)
    return path


def flask_secret(folder: Path) -> str:
    """The key the UI's sessions and CSRF tokens are signed with: made once, kept (0600) in the folder so
    that every worker and every restart share it."""
    path = folder / "flask_secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def mlflow_command(folder: Path, host: str, port: int, workers: int, allowed_hosts: str | None) -> list[str]:
    allowed = ["--allowed-hosts", allowed_hosts] if allowed_hosts else []  # mlflow's default: localhost only
    return [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        database_uri(folder, "mlflow"),
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--app-name",
        "basic-auth",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        *allowed,
    ]


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(folder: Path, host: str, port: int, workers: int, allowed_hosts: str | None = None) -> None:
    """Start PostgreSQL and the tracking server; run until Ctrl-C or SIGTERM, then stop both."""
    missing = [name for name in CREDENTIALS if not os.environ.get(name)]
    if missing:
        raise ServerError(f"set {' and '.join(missing)}: the server's admin user (read from the environment only)")
    if len(os.environ[CREDENTIALS[1]]) < PASSWORD_MIN:
        raise ServerError(f"{CREDENTIALS[1]} must have at least {PASSWORD_MIN} characters (MLflow's password policy)")
    folder = folder.resolve()
    if len(str(folder / "postgres" / SOCKET_NAME)) > SOCKET_PATH_MAX:
        raise ServerError(f"folder {folder} is too deep for PostgreSQL's socket path: choose a shorter one")
    folder.mkdir(parents=True, exist_ok=True)
    init_cluster(folder)
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_config(folder)),
        "MLFLOW_AUTH_ADMIN_USERNAME": os.environ[CREDENTIALS[0]],
        "MLFLOW_AUTH_ADMIN_PASSWORD": os.environ[CREDENTIALS[1]],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": flask_secret(folder),
    }
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # run the finally clauses below
    postgres = start_postgres(folder)
    try:
        create_databases(folder)
        server = subprocess.Popen(
            mlflow_command(folder, host, port, workers, allowed_hosts), env=env, start_new_session=True
        )
        try:
            wait_healthy(server, f"http://{host}:{port}")
            print(f"tracking server on http://{host}:{port} (PostgreSQL and artifacts in {folder}); Ctrl-C stops")
            server.wait()
            raise ServerError(f"mlflow server exited (exit {server.returncode})")
        finally:
            stop(server)
    except KeyboardInterrupt:
        pass
    finally:
        stop(postgres, signal.SIGINT)  # PostgreSQL's fast shutdown


def wait_healthy(server: subprocess.Popen, uri: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise ServerError(f"mlflow server exited at start (exit {server.returncode})")
        try:
            if requests.get(f"{uri}/health", timeout=1).ok:
                return
        except requests.RequestException:  # refused, or too slow while it starts
            pass
        time.sleep(0.5)
    raise ServerError(f"mlflow server did not answer on {uri} in {seconds:.0f} s")
