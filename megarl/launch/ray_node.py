"""`ray start` as the launcher runs it on every node, with two differences from the plain command:

- no Ray Client server. megarl never uses it; Ray has no flag to turn it off, refuses port 0 for it,
  and a port chosen free here and bound later by Ray can be taken in between, which kills the head
  (seen: `ray_client_server.err`, "Remaining processes will be killed"). Ray starts it only when its
  client dependencies import, so this process reports them missing.
- `--publish PATH` (head only): once the head's GCS has bound its port (`--port=0`: the kernel's
  choice) and Ray has written its address, the address is copied to PATH, a file in the job's log
  directory that the launcher reads before it starts the workers.

    python -m megarl.launch.ray_node [--publish PATH] RAY_START_ARGS...
"""

from __future__ import annotations

import os
import sys
import threading
import time


def _temp_dir(args: list[str]) -> str | None:
    for a in args:
        if a.startswith("--temp-dir="):
            return a.split("=", 1)[1]
    return None


def _publish_when_up(address_file: str, path: str) -> None:
    from megarl.runtime.rendezvous import publish_address

    while not os.path.exists(address_file):
        time.sleep(0.1)
    with open(address_file) as f:
        host, port = f.read().strip().rsplit(":", 1)
    publish_address(path, host, int(port))


def main(argv: list[str]) -> None:
    import ray.scripts.scripts as ray_cli
    from ray._common.utils import get_ray_address_file

    publish = None
    if argv[:1] == ["--publish"]:
        publish, argv = argv[1], argv[2:]
    ray_cli.get_ray_client_dependency_error = lambda: ImportError("megarl runs Ray without the Ray Client server")
    if publish:
        temp_dir = _temp_dir(argv)
        if temp_dir is None:
            sys.exit("ray_node: --publish needs --temp-dir=DIR (where Ray writes the head's address)")
        address_file = get_ray_address_file(temp_dir)
        if os.path.exists(address_file):  # left by an earlier run of this job (requeue): not ours
            os.remove(address_file)
        threading.Thread(target=_publish_when_up, args=(address_file, publish), daemon=True).start()
    sys.argv = ["ray", "start", *argv]
    ray_cli.main()


if __name__ == "__main__":
    main(sys.argv[1:])
