"""The maskrt side of bench/torchvision_worker.py: starts torchvision's interpreter and asks it,
one JSON line each way (used by bench/eager.py and bench/ops.py; standard library only)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path


class TorchvisionWorker:
    """torchvision in its own interpreter (`python`: one of an environment where it loads)."""

    def __init__(self, python: str, threads: int) -> None:
        worker = Path(__file__).resolve().with_name("torchvision_worker.py")
        self.process = subprocess.Popen([python, str(worker), "--threads", str(threads)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.versions = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit("the torchvision worker ended (see its error above)")
        return json.loads(line)

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise SystemExit(f"torchvision worker: {reply['error']}")
        return reply

    def seconds(self, request: dict) -> float:
        return float(self.ask(request)["seconds"])

    def close(self) -> None:
        self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.process.stdin.flush()
        self.process.wait(timeout=60)
