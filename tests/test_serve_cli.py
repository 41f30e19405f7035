"""``mass serve DIR``, the one command: it starts its own local Ray, answers over HTTP, and on SIGINT stops the
app and the Ray instance it started and exits 0 (run as a subprocess, after tests/test_serve.py's Ray is gone)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")
requests = pytest.importorskip("requests")

import mass  # noqa: E402

from conftest import make_setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_mass_serve_answers_and_stops_everything_it_started_on_sigint(tmp_path):
    pretrained, finetuned, _ = make_setup("hf", n_tasks=2)
    heads = {f"task{i}": torch.randn(3, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)}
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig.recommended(), heads=heads, progress=False)
    model.class_names = {t: [f"{t} {c}" for c in "abc"] for t in model.tasks}
    model.save_pretrained(tmp_path / "m")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from mass.tools.cli import main; sys.exit(main())", "serve", str(tmp_path / "m"), "--port",
                             str(port), "--num-cpus", "1", "--threads", "1"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, health = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).json()
                break
            except (requests.ConnectionError, requests.Timeout, ValueError):
                time.sleep(1)
        assert health is not None and health["status"] == "ok", (tmp_path / "serve.log").read_text()[-3000:]
        meta = requests.get(f"http://127.0.0.1:{port}/v1/tasks", timeout=30).json()
        assert meta["tasks"] == ["task0", "task1"] and meta["classes"] == model.class_names
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)
        text = (tmp_path / "serve.log").read_text()
        assert "loaded" in text and "2 tasks" in text  # the replica's startup line reached the console
    finally:
        if proc.poll() is None:  # the command failed to stop: end it and everything it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
