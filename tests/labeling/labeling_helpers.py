"""Shared by the labeling and browser tests: pair files, stores and a real server subprocess."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from preftune.labeling.pairs import Pair


def make_pairs(n: int, prefix: str = "p") -> list[Pair]:
    """n pairs with distinct, recognisable responses; every third prompt is a conversation."""
    pairs = []
    for i in range(n):
        prompt = (
            [{"role": "user", "content": f"question {i}"},
             {"role": "assistant", "content": "earlier answer"},
             {"role": "user", "content": "and now?"}]
            if i % 3 == 2 else f"prompt {i}"
        )
        pairs.append(Pair(f"{prefix}{i:05d}", prompt, (f"first answer {i}", f"second answer {i}")))
    return pairs


def cast(store, who, pair_id, outcome, left_index=0):
    """Vote for response `outcome` (0/1) or tie/both_bad/skip, with a chosen left/right order."""
    with sqlite3.connect(store.path) as db:
        db.execute("INSERT OR REPLACE INTO assignments VALUES (?, ?, ?, 'open', 0)",
                   (pair_id, who.id, left_index))
    choice = ("left" if outcome == left_index else "right") if outcome in (0, 1) else outcome
    key = f"{who.name}-{pair_id}-{outcome}-{left_index}"
    return store.record_vote(who, pair_id, choice, None, key)


def write_pairs_file(path: Path, pairs: list[Pair]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"pair_id": p.pair_id, "prompt": p.prompt,
                                "responses": list(p.responses)}) + "\n" for p in pairs)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(db: Path, *args: str, startup_timeout: float = 20.0, port: int | None = None):
    """Run `label serve` in a subprocess on 127.0.0.1 and `port` (by default a free one);
    yields (url, process). Pass the port of a stopped server to restart it at the same address."""
    port = port or free_port()
    log_path = Path(str(db) + f".server-{port}.log")
    cmd = [sys.executable, "-m", "preftune.labeling.cli", "serve", "--db", str(db),
           "--host", "127.0.0.1", "--port", str(port), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in time:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
