"""Starting `sdtorch serve` as a user does (a subprocess on a free port) for the server's tests and benchmark."""
import os
import socket
import subprocess
import sys
import threading
import time

import requests

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # the same for the server and the CLI
AUTH = ("user", "pa:ss")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, auth=AUTH, env=ENV, timeout=120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth = auth
        auth_args = ["--api-auth", f"{auth[0]}:{auth[1]}"] if auth else []
        self.proc = subprocess.Popen([sys.executable, "-m", "sdtorch.cli", "serve", "--port", str(self.port),
                                      *auth_args, *map(str, args)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        # read the server's output as it comes: a pipe nobody reads fills at 64 KB and then blocks the server
        self._output: list[str] = []
        self._drain = threading.Thread(target=lambda: self._output.extend(self.proc.stdout), daemon=True)
        self._drain.start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._drain.join(timeout=5)
                raise RuntimeError(f"sdtorch serve exited: {''.join(self._output)}")
            try:
                if requests.get(self.url + "/internal/ping", auth=auth, timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("sdtorch serve did not answer")

    def memory(self) -> dict[str, int]:
        """The server's resident memory now (VmRSS) and at its peak (VmHWM), in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(timeout=5)
        return "".join(self._output)
