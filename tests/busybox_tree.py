"""The smallest real image root for tests: static busybox with its applets in /bin.

Runtime, agent and end-to-end tests all start real sandboxes from trees like
this, so they build them one way.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path

BUSYBOX = Path(shutil.which("busybox") or "/bin/busybox")
MOUNT_POINTS = ("proc", "dev", "tmp", "run")


def build_busybox_rootfs(
    dest: Path,
    *,
    www: dict[str, str] | None = None,
    applets: Iterable[str] | None = None,
    mount_points: Iterable[str] = MOUNT_POINTS,
    users: bool = True,
) -> Path:
    """``applets`` None links every applet; ``www`` files land under /www."""
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    if applets is None:
        listed = subprocess.run(
            [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        applets = [a for a in listed if a != "busybox"]
    for applet in applets:
        (dest / "bin" / applet).symlink_to("busybox")
    if users:
        (dest / "etc").mkdir()
        (dest / "etc" / "passwd").write_text(
            "root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"
        )
        (dest / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for name in mount_points:
        (dest / name).mkdir()
    (dest / "www").mkdir(exist_ok=True)
    for name, text in (www or {}).items():
        (dest / "www" / name).write_text(text)
    for path in sorted(dest.rglob("*"), reverse=True):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or path.name == "busybox" else 0o644)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
