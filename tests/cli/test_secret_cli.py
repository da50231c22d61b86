"""``kiln secret`` with the store encrypted: key problems are one-line errors, exit 1."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

KILN = str(Path(sys.executable).parent / "kiln")
KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = bytes(range(1, 33)).hex()


def kiln(home: Path, *args: str, key: str | None, stdin: bytes = b"") -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KILN_SECRET_KEY"}
    env["KILN_HOME"] = str(home)
    if key is not None:
        env["KILN_SECRET_KEY"] = key
    out = subprocess.run([KILN, *args], env=env, input=stdin, capture_output=True, timeout=60)
    return out.returncode, out.stdout.decode(), out.stderr.decode()


def test_a_wrong_or_malformed_key_is_a_one_line_error_and_rm_still_works(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert kiln(home, "secret", "set", "api_key", key=KEY_A, stdin=b"s3cr3t") == (
        0,
        "api_key v1\n",
        "",
    )

    code, out, err = kiln(home, "secret", "set", "api_key", key=KEY_B, stdin=b"other")
    assert code == 1 and out == ""
    assert err.startswith("error: secret api_key: cannot decrypt: KILN_SECRET_KEY is not the key")
    assert err.count("\n") == 1 and KEY_B not in err and "Traceback" not in err

    code, out, err = kiln(home, "secret", "set", "api_key", key="not-a-key", stdin=b"other")
    assert code == 1
    assert err.startswith("error: secret api_key: KILN_SECRET_KEY is not a secret key")
    assert "not-a-key" not in err

    listed = kiln(home, "secret", "list", key=KEY_B)[1].splitlines()
    assert listed[1].split()[:2] == ["api_key", "v1"], listed
    assert kiln(home, "secret", "set", "api_key", key=KEY_A, stdin=b"s3cr3t")[1] == "api_key v1\n"
    assert kiln(home, "secret", "rm", "api_key", key=KEY_B) == (0, "removed api_key\n", "")
    for path in (home / "secrets").rglob("*"):
        assert not path.is_file() or b"s3cr3t" not in path.read_bytes()


def test_without_a_key_in_the_environment_a_private_key_file_is_made(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert kiln(home, "secret", "set", "db", key=None, stdin=b"pw")[0] == 0
    key_file = home / "secrets" / ".key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key_file.chmod(0o644)
    code, _, err = kiln(home, "secret", "set", "db", key=None, stdin=b"pw2")
    assert code == 1
    assert err.startswith(f"error: secret db: permissions 0644 for key file {key_file} are too")
