"""Run the sandbox APIs (CRM, shop, events, ESP) on loopback, in a child process that a caller
always stops; each API is served by a process of its own under it."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvicorn

from presend.sandbox import crm, esp, events, shop

CRM_TOKEN = "sandbox-crm-token"
ESP_API_KEY = "sandbox-esp-key"
SHOP_TOKEN = "sandbox-shop-token"
EVENTS_TOKEN = "sandbox-events-token"


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    return sock


APPS = ("crm", "esp", "shop", "events")


def _create_app(name: str, args: argparse.Namespace):
    if name == "crm":
        return crm.create_app(seed=args.seed, size=args.contacts, token=CRM_TOKEN)
    if name == "esp":
        return esp.create_app(api_key=ESP_API_KEY, state_file=args.esp_state)
    if name == "shop":
        return shop.create_app(
            seed=args.seed,
            products=args.products,
            orders=args.orders,
            contacts=args.contacts,
            token=SHOP_TOKEN,
        )
    return events.create_app(
        seed=args.seed,
        events=args.events,
        contacts=args.contacts,
        products=args.products,
        token=EVENTS_TOKEN,
    )


def _run_app(name: str, args: argparse.Namespace, sock: socket.socket, started) -> None:
    """In a child process: one vendor's API on its listening socket, as its own server (a
    vendor's API does not share a CPU with another's). Dies with the sandbox's main process."""
    _die_with_parent()
    config = uvicorn.Config(
        _create_app(name, args), log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:  # else the server failed: this process ends, and the sandbox with it
            started.set()
        await task

    asyncio.run(serve())


def _serve(args: argparse.Namespace) -> int:
    """Start every app in a process of its own, write the ready file once all accept
    connections, and stop them all when one dies or this process is told to stop."""
    ctx = multiprocessing.get_context("fork")
    ports = {
        "crm": args.crm_port,
        "esp": args.esp_port,
        "shop": args.shop_port,
        "events": args.events_port,
    }
    socks = {name: _listen(ports[name]) for name in APPS}
    children = []
    for name in APPS:
        started = ctx.Event()
        proc = ctx.Process(
            target=_run_app, args=(name, args, socks[name], started), name=f"sandbox-{name}"
        )
        proc.start()
        children.append((proc, started))

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        while not all(started.is_set() for _, started in children):
            if any(not proc.is_alive() for proc, _ in children):
                return 1
            time.sleep(0.02)
        urls = {f"{n}_url": f"http://127.0.0.1:{socks[n].getsockname()[1]}" for n in APPS}
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(urls))
        tmp.replace(args.ready_file)
        multiprocessing.connection.wait([proc.sentinel for proc, _ in children])
        return 1  # an app's server died
    finally:
        for proc, _ in children:
            proc.terminate()
        for proc, _ in children:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m presend.sandbox.server")
    parser.add_argument(
        "--ready-file",
        type=Path,
        required=True,
        help="written with the servers' URLs once they accept connections",
    )
    parser.add_argument("--crm-port", type=int, default=0)
    parser.add_argument("--esp-port", type=int, default=0)
    parser.add_argument("--shop-port", type=int, default=0)
    parser.add_argument("--events-port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--contacts", type=int, default=1000)
    parser.add_argument("--products", type=int, default=200)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument(
        "--esp-state",
        type=Path,
        default=None,
        help="file the sandbox ESP keeps its contacts in between runs",
    )
    sys.exit(_serve(parser.parse_args(argv)))


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started the sandbox dies, so a killed
    demo or test never leaves servers behind (Linux prctl PR_SET_PDEATHSIG)."""
    import contextlib
    import ctypes

    # Not glibc Linux: the context manager still stops the sandbox.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Sandbox:
    """The sandbox servers in a child process; use as a context manager so they always stop."""

    def __init__(
        self,
        *,
        seed: int = 42,
        contacts: int = 1000,
        esp_state: Path | None = None,
        crm_port: int = 0,
        esp_port: int = 0,
        products: int = 200,
        orders: int = 2000,
        events: int = 20_000,
        shop_port: int = 0,
        events_port: int = 0,
    ) -> None:
        self.args = [
            "--seed",
            str(seed),
            "--contacts",
            str(contacts),
            "--crm-port",
            str(crm_port),
            "--esp-port",
            str(esp_port),
            "--products",
            str(products),
            "--orders",
            str(orders),
            "--events",
            str(events),
            "--shop-port",
            str(shop_port),
            "--events-port",
            str(events_port),
        ]
        if esp_state:
            self.args += ["--esp-state", str(esp_state)]
        self.proc: subprocess.Popen | None = None
        self.crm_url = self.esp_url = self.shop_url = self.events_url = ""

    def start(self, timeout: float = 60) -> Sandbox:
        ready = Path(tempfile.mkdtemp(prefix="presend-sandbox-")) / "ready.json"
        env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "presend.sandbox.server",
                "--ready-file",
                str(ready),
                *self.args,
            ],
            env=env,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandbox exited with code {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("sandbox servers did not start in time")
            time.sleep(0.05)
        urls = json.loads(ready.read_text())
        self.crm_url, self.esp_url = urls["crm_url"], urls["esp_url"]
        self.shop_url, self.events_url = urls["shop_url"], urls["events_url"]
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def connection_env(self) -> dict[str, str]:
        """Airflow Connections for the sandbox, as AIRFLOW_CONN_* environment variables."""

        def conn(url: str, secret: str) -> str:
            host, port = url.removeprefix("http://").split(":")
            return json.dumps(
                {
                    "conn_type": "http",
                    "host": host,
                    "port": int(port),
                    "schema": "http",
                    "password": secret,
                }
            )

        return {
            "AIRFLOW_CONN_PRESEND_CRM": conn(self.crm_url, CRM_TOKEN),
            "AIRFLOW_CONN_PRESEND_ESP": conn(self.esp_url, ESP_API_KEY),
            "AIRFLOW_CONN_PRESEND_SHOP": conn(self.shop_url, SHOP_TOKEN),
            "AIRFLOW_CONN_PRESEND_EVENTS": conn(self.events_url, EVENTS_TOKEN),
        }

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    main()
