"""The README's picture of a simulated cluster: the real TUI over a real server and `maas simulate`.

    .venv/bin/python scripts/simulated_screenshot.py [--workers 1000] [--replicas 300] [--out screenshots/simulated-1000-workers.svg]

Starts `maas start --no-agent` (embedded PostgreSQL) and `maas simulate --workers N` as their own
processes (as bench/cluster.py does), deploys a model of `--replicas` replicas on the simulated GPUs,
then renders the TUI (maas_tui/tui/app.py, headless, 120x40) against that server and saves its
dashboard as SVG once every worker is in it and the replicas run. Nothing is drawn from fixed data:
what the picture shows is what the server sent. CPU heavy for a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from cluster import start_server, stop_processes, wait_http  # noqa: E402

from maas_tui.client import MaasClient  # noqa: E402
from maas_tui.tui.app import MaasApp  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    base, data_dir, model, url, env, server = start_server("maas-screenshot-")
    simulate = None
    try:
        await wait_http(url, 120)
        token = (data_dir / "token").read_text().strip()
        password = (data_dir / "initial_admin_password").read_text().strip()
        simulate = subprocess.Popen(
            [sys.executable, "-m", "maas_tui", "simulate", "--server", url, "--token", token,
             "--workers", str(args.workers), "--gpus", args.gpus],
            stdout=open(base / "simulate.log", "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v2/auth/login", json={"username": "admin", "password": password}) as r:
                admin = (await r.json())["token"]
            auth = {"Authorization": f"Bearer {admin}"}
            deadline = time.monotonic() + 300
            while True:  # one listing every few seconds while they register
                async with http.get(f"{url}/v2/workers", headers=auth) as r:
                    workers = await r.json()
                count = len(workers["items"] if isinstance(workers, dict) else workers)
                if count >= args.workers:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {count} of {args.workers} workers registered")
                await asyncio.sleep(3)
            body = {"name": "llama-demo", "source": str(model), "backend": "llama.cpp", "replicas": args.replicas}
            async with http.post(f"{url}/v2/models", json=body, headers=auth) as r:
                if r.status >= 300:
                    raise RuntimeError(f"deploy refused: {await r.text()}")

        app = MaasApp(MaasClient(url, admin))
        async with app.run_test(size=(args.width, args.height)) as pilot:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                await pilot.pause(1)
                running = sum(1 for i in app.state.instances.values() if i.state == "running")
                if len(app.state.workers) >= args.workers and running >= args.replicas:
                    break
            await pilot.pause(args.settle)  # a few telemetry frames: utilisation moves where replicas run
            out = Path(args.out).resolve()
            out.parent.mkdir(parents=True, exist_ok=True)
            app.save_screenshot(filename=out.name, path=str(out.parent))
            print(f"{out}: {len(app.state.workers)} workers, {running} replicas running")
    finally:
        stop_processes(simulate, server)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--gpus", default="8xH100-80GB")
    parser.add_argument("--replicas", type=int, default=300)
    parser.add_argument("--width", type=int, default=120)
    parser.add_argument("--height", type=int, default=40)
    parser.add_argument("--settle", type=float, default=6.0, help="seconds to let telemetry move before the shot")
    parser.add_argument("--out", default=str(ROOT / "screenshots" / "simulated-1000-workers.svg"))
    asyncio.run(main(parser.parse_args()))
