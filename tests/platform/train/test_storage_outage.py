"""Real object-store outages during a training run, one on each writer.

``python jobs/train.py`` (tiny model, ddp, 1 process) writes its checkpoints, TensorBoard files, config copy and
export to the moto S3 server through :class:`TcpProxy`, a TCP forwarder on 127.0.0.1 that reads the HTTP request
lines going through it. The first request of each writer (a checkpoint upload, a TensorBoard upload, the export)
triggers an outage: the proxy resets that connection and every live one, closes its listening socket (connections
are refused, like an S3 endpoint going down) and reopens on the same port 10 s later. The run must ride out all
three through the storage retry policy: exit 0, every checkpoint committed, the export present, every TensorBoard
step on the bucket, and no staging folder left in its TMPDIR.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.test_train_support import REPO, base_overrides, launch_command, make_digits_dataset, write_config

OUTAGE_S = 10.0
STEPS, CKPT_EVERY = 40, 5


class TcpProxy:
    """Forwards connections to ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``; :meth:`outage` takes it down.

    ``triggers``: request-line fragments (e.g. ``"PUT /bucket/run/export/"``); the first request that contains one
    is cut off and starts an outage of ``outage_s`` seconds (each trigger fires once; ``fired`` lists them).
    """

    def __init__(self, target_port: int, triggers: tuple[str, ...] = (), outage_s: float = OUTAGE_S) -> None:
        self.target = ("127.0.0.1", target_port)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._pending = list(triggers)
        self.fired: list[str] = []
        self.outage_s = outage_s
        self._listener = self._listen(0)
        self.port = int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return listener

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # the listener was closed: the outage began
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections.update((client, upstream))
            for source, sink, inspect in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(source, sink, inspect), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, inspect: bool) -> None:
        try:
            while data := source.recv(65536):
                if inspect and self._triggered(data):
                    threading.Thread(target=self.outage, args=(self.outage_s,), daemon=True).start()
                    return  # the request never reaches the store; the finally block resets both sides
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(source)
            self._drop(sink)

    def _triggered(self, data: bytes) -> bool:
        text = data[:512].decode("latin-1")
        with self._lock:
            hit = next((t for t in self._pending if t in text), None)
            if hit is not None:
                self._pending.remove(hit)
                self.fired.append(hit)
        return hit is not None

    def _drop(self, sock: socket.socket) -> None:
        """Cut a connection like a crashed endpoint: shutdown (wakes the pump blocked in recv, so the socket is
        really released) then close with a reset (SO_LINGER 0)."""
        with self._lock:
            self._connections.discard(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def outage(self, seconds: float) -> None:
        """Refuse connections for ``seconds`` (listener closed, live connections reset), then listen again."""
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
        self._listener.close()
        with self._lock:
            live = list(self._connections)
        for sock in live:
            self._drop(sock)
        time.sleep(seconds)
        self._listener = self._listen(self.port)

    def close(self) -> None:
        self._listener.close()


@pytest.mark.slow
def test_training_rides_out_an_object_store_outage(s3_server, tmp_path: Path) -> None:  # noqa: ANN001
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deepflow.artifacts import load_weights

    bucket = "train-outage"
    s3_server.make_bucket(bucket)
    client = s3_server.client()
    writers = {  # request that starts an outage -> the URL prefix whose retries must show in the log
        f"PUT /{bucket}/run/checkpoints/step-{2 * CKPT_EVERY:07d}/": f"s3://{bucket}/run/checkpoints/",
        f"PUT /{bucket}/run/tensorboard/": f"s3://{bucket}/run/tensorboard/",
        f"PUT /{bucket}/run/export/": f"s3://{bucket}/run/export/",
    }
    proxy = TcpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]), triggers=tuple(writers))
    make_digits_dataset(str(tmp_path / "digits"))
    overrides = base_overrides(str(tmp_path / "digits"), f"s3://{bucket}/run", steps=STEPS, **{
        "checkpoint.every": CKPT_EVERY, "checkpoint.keep_last": STEPS // CKPT_EVERY, "checkpoint.async": "true",
        "debug.step_sleep_s": 0.1, "distributed.engine": "ddp",
    })
    config = write_config(tmp_path / "run.yaml", overrides)
    staging = tmp_path / "tmp"
    staging.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(staging),
           "AWS_ENDPOINT_URL": proxy.url, "DEEPFLOW_STORAGE_RETRY_BUDGET_S": "60",
           "DEEPFLOW_STORAGE_RETRY_MAX_DELAY_S": "2",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # (torch's own cache would land in TMPDIR)
    proc = subprocess.Popen(launch_command(config, [], launcher="python"), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"training hung; outages started: {proxy.fired}; output:\n{output[-6000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proxy.close()
    assert proc.returncode == 0, output[-6000:]
    assert f"training completed at step {STEPS}" in output
    assert sorted(proxy.fired) == sorted(writers), f"outages started: {proxy.fired}"
    for prefix in writers.values():  # each writer met a refused connection and retried through it
        assert f"transient error on {prefix}" in output, f"no retry on {prefix}: " + output[-4000:]

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]}
    committed = sorted(k for k in keys if k.startswith("run/checkpoints/") and k.endswith("/COMMIT"))
    assert committed == [f"run/checkpoints/step-{s:07d}/COMMIT" for s in range(CKPT_EVERY, STEPS + 1, CKPT_EVERY)]
    assert {"run/export/export.safetensors", "run/export/export.json", "run/config.yaml"} <= keys
    assert json.loads(client.get_object(Bucket=bucket, Key="run/export/export.json")["Body"].read())["step"] == STEPS
    weights, card = load_weights(f"s3://{bucket}/run/checkpoints", s3_server.storage_options)
    assert card.step == STEPS and card.model == "DeepFlow-S/2-2T" and weights

    download = tmp_path / "tensorboard"
    download.mkdir()
    for key in (k for k in keys if k.startswith("run/tensorboard/")):
        client.download_file(bucket, key, str(download / key.removeprefix("run/tensorboard/")))
    accumulator = EventAccumulator(str(download), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("loss/total")] == list(range(1, STEPS + 1))
    rows = [json.loads(line) for line in (download / "scalars.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert list(staging.iterdir()) == [], "staging folders left behind"
