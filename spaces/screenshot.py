"""Regenerate `docs/space.png`: serve the app, run the bundled M2N2 demo in headless Chromium, screenshot the page.

Drives Debian's `chromium` over the DevTools protocol on a pipe (`--remote-debugging-pipe`, no extra package):
clicks Run, waits for the run to finish, captures the page.

Usage (from the repository root): `python spaces/screenshot.py docs/space.png [--budget 20]`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path


class DevTools:
    """A minimal Chrome DevTools Protocol client over `--remote-debugging-pipe` (fd 3: commands, fd 4: replies)."""

    def __init__(self, chromium: str, width: int, height: int):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
            f"--window-size={width},{height}",
            "about:blank",
        ]

        def fds() -> None:
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.process = subprocess.Popen(
            args, pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._id = 0

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium exited")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def screenshot(url: str, out: Path, *, budget: int, width: int = 1280, height: int = 1600) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs chromium (apt-get install chromium)")
    tools = DevTools(chromium, width, height)
    try:
        target = tools.call("Target.createTarget", url=url)["targetId"]
        session = tools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        tools.call(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

        def js(expression: str):
            result = tools.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
            return result.get("result", {}).get("value")

        deadline = time.time() + 60
        while not js("!!document.querySelector('#run-btn')"):
            if time.time() > deadline:
                raise SystemExit("the page did not render")
            time.sleep(0.5)
        js(
            "(() => { const i = document.querySelector('#budget input[type=number]');"
            f" i.value = '{budget}'; i.dispatchEvent(new Event('input', {{bubbles: true}}));"
            " i.dispatchEvent(new Event('change', {bubbles: true})); })()"
        )
        time.sleep(0.5)
        js("document.querySelector('#run-btn').click()")
        deadline = time.time() + 600
        while "Done" not in (js("document.querySelector('#status').innerText") or ""):
            if time.time() > deadline:
                raise SystemExit("the run did not finish in 10 minutes")
            time.sleep(1)
        time.sleep(2)  # let the plot and the table settle
        data = tools.call("Page.captureScreenshot", session, format="png")["data"]
        out.write_bytes(base64.b64decode(data))
    finally:
        tools.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="PNG file, e.g. docs/space.png")
    parser.add_argument(
        "--budget", type=int, default=20, help="M2N2 forward passes of the demo run (default 20)"
    )
    parser.add_argument("--specialists-dir", help="the tiny specialists build (default: the app's cache)")
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch

    from hf_m2n2.app import build_demo

    torch.set_num_threads(1)
    demo = build_demo(specialists_dir=args.specialists_dir)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(url, args.out, budget=args.budget)
    finally:
        demo.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
