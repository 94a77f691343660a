"""`mlflow ui` serves the default store. (`trainer sweep` on Ray: tests/test_scale.py.)"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def test_mlflow_ui_serves_the_store(tmp_path):
    """The README's `mlflow ui --backend-store-uri sqlite:///mlflow.db`, on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [Path(sys.executable).parent / "mlflow", "ui", "--backend-store-uri", "sqlite:///mlflow.db", "--port", port]
    ui = subprocess.Popen(list(map(str, cmd)), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                response = requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except requests.RequestException:  # refused, or too slow while it starts
                time.sleep(0.5)
        assert response.ok
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).ok
    finally:
        ui.terminate()
        ui.wait(timeout=30)
