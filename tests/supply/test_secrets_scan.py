"""Secret scan at bake: real bakes of tiny scratch images fail on a secret their own
layers add (masked, nothing tagged), pass with an allow-list, skip binaries and huge
files, and leave a referrer the policy gate reads; the rules fire on real-shaped
secrets and not on their near misses, nor on hash manifests (wheel RECORD, lockfiles,
go.sum) or minified JS."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import shutil
import string
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from importlib.metadata import distribution
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from kiln.errors import KilnError
from kiln.image.bake import bake
from kiln.image.digest import MEDIA_TYPE_LAYER_TAR, Descriptor
from kiln.image.layer import layer_from_dir
from kiln.image.store import ImageStore
from kiln.spec import load_spec
from kiln.supply.secrets_scan import (
    MAX_FILE_BYTES,
    RULE_NAMES,
    SECRET_SCAN_ARTIFACT_TYPE,
    AllowEntry,
    high_entropy,
    mask,
    scan_layers,
    scan_text,
    stored_scan,
)

BUSYBOX = Path("/bin/busybox")
DEB_CACHE = Path(os.environ.get("KILN_CACHE", "/var/cache/kiln-test"))
RNG = random.Random(11)
ALNUM = string.ascii_letters + string.digits
B64 = ALNUM + "+/"

# Real-shaped secrets, assembled at run time so this file holds none of them whole.
AWS_KEY_ID = "AKIA" + "Q3RJ7M2XK5WZ8XYZ"


def rand(alphabet: str, size: int) -> str:
    return "".join(RNG.choice(alphabet) for _ in range(size))


def b64(size: int) -> str:
    return base64.b64encode(RNG.randbytes(size)).decode()


def ed25519_pem() -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def openssh_key() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()


def public_pem() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


ENV_FILE = f"# app settings\nDEBUG=0\nAWS_ACCESS_KEY_ID={AWS_KEY_ID}\nREGION=eu-west-1\n"


# -- the rules, one by one ----------------------------------------------------


def _cases() -> list[tuple[str, str, str, str]]:
    """(rule, path, a true positive, a near miss that must not fire)."""
    gcp_key = ed25519_pem().replace("\n", "\\n")
    return [
        ("private-key", "/srv/app/key.pem", ed25519_pem(), public_pem()),
        (
            "private-key",
            "/root/.ssh/id_ecdsa",
            openssh_key(),
            'MARKER = "-----BEGIN OPENSSH PRIVATE KEY-----"\nif line == MARKER:\n    pass\n',
        ),
        (
            "aws-access-key-id",
            "/srv/app/deploy.sh",
            f"export AWS_ACCESS_KEY_ID={AWS_KEY_ID}\n",
            "export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE\nid = 'AKIAq3rj7m2xk5wz8xyz'\n",
        ),
        (
            "aws-secret-access-key",
            "/root/.aws/credentials",
            f"[default]\naws_secret_access_key = {b64(30)}\n",
            "[default]\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
        ),
        (
            "gcp-service-account-key",
            "/srv/app/sa.json",
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "shop",
                    "private_key_id": rand("0123456789abcdef", 40),
                    "private_key": gcp_key.replace("\\n", "\n"),
                },
                indent=2,
            ),
            json.dumps({"type": "service_account", "private_key": ""}, indent=2),
        ),
        (
            "azure-storage-connection-string",
            "/srv/app/appsettings.json",
            '{"Storage": "DefaultEndpointsProtocol=https;AccountName=shopdata;'
            f'AccountKey={b64(64)};EndpointSuffix=core.windows.net"}}\n',
            '{"Storage": "DefaultEndpointsProtocol=https;AccountName=shopdata;'
            'AccountKey=<your-account-key>;EndpointSuffix=core.windows.net"}\n',
        ),
        (
            "github-token",
            "/srv/app/ci.sh",
            f"curl -H 'Authorization: token ghp_{rand(ALNUM, 36)}' https://api.github.com\n",
            f"# tokens look like ghp_{rand(ALNUM, 20)}…\n",
        ),
        (
            "github-token",
            "/srv/app/ci2.sh",
            f"GH=github_pat_{rand(ALNUM, 22)}_{rand(ALNUM, 59)}\n",
            "GH=github_pat_xxxxxxxxxxxx\n",
        ),
        (
            "gitlab-token",
            "/srv/app/release.sh",
            f"TOKEN=glpat-{rand(ALNUM, 20)}\n",
            "TOKEN=glpat-example\n",
        ),
        (
            "slack-token",
            "/srv/app/notify.py",
            f"SLACK = 'xoxb-{rand(string.digits, 11)}-{rand(string.digits, 13)}-"
            f"{rand(ALNUM, 24)}'\n",
            "SLACK = 'xoxb-your-bot-token'\n",
        ),
        (
            "stripe-secret-key",
            "/srv/app/pay.py",
            f"stripe.api_key = 'sk_live_{rand(ALNUM, 24)}'\n",
            f"stripe_test = 'sk_test_{rand(ALNUM, 24)}'\n",
        ),
        (
            "password-assignment",
            "/srv/app/config.yaml",
            "database:\n  host: db\n  password: Tr0ub4dor&3x\n",
            "database:\n  password: ${DB_PASSWORD}\n  old_password: ''\n",
        ),
        (
            "password-assignment",
            "/srv/app/.env.production",
            "DB_PASSWORD=hunter2hunter2\n",
            "DB_PASSWORD=changeme\n",
        ),
        (
            "high-entropy-string",
            "/srv/app/settings.py",
            f'SECRET_KEY = "{rand(B64, 50)}"\n',
            f'SECRET_KEY = "{"a" * 50}"\nchecksum = "{rand(B64, 50)}"\n',
        ),
    ]


CASES = _cases()


@pytest.mark.parametrize(
    ("rule", "path", "positive", "negative"),
    CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)],
)
def test_each_rule_fires_on_a_real_shaped_secret_and_not_on_its_near_miss(
    rule: str, path: str, positive: str, negative: str
) -> None:
    [found] = scan_text(path, positive)
    assert found.rule == rule
    assert found.path == path
    assert 1 <= found.line <= positive.count("\n") + 1
    assert scan_text(path, negative) == []


def test_every_rule_has_a_case() -> None:
    assert {c[0] for c in CASES} == RULE_NAMES


def test_a_password_in_source_code_is_not_a_config_assignment() -> None:
    text = "database:\n  password: Tr0ub4dor&3x\n"
    assert [f.rule for f in scan_text("/srv/app/config.yml", text)] == ["password-assignment"]
    assert scan_text("/srv/app/check.py", 'if password == "Tr0ub4dor&3x":\n') == []


def test_masks_never_show_the_secret() -> None:
    assert mask(AWS_KEY_ID) == "AKIA…XYZ"
    secret = rand(B64, 40)
    [finding] = scan_text("/x/settings.py", f'API_TOKEN = "{secret}"\n')
    assert secret not in finding.describe()
    assert finding.masked == f"{secret[:4]}…{secret[-3:]}"
    assert mask("short") == "sh…"


# -- what must not fire -------------------------------------------------------


def test_a_wheels_record_hashes_do_not_fire() -> None:
    for name in ("pydantic", "cryptography", "cyclonedx-python-lib"):
        record = distribution(name).read_text("RECORD")
        assert record and "sha256=" in record
        assert scan_text(f"/usr/lib/python3/dist-packages/{name}.dist-info/RECORD", record) == []


def test_lockfiles_and_go_sum_do_not_fire() -> None:
    packages = {
        f"node_modules/pkg{i}": {
            "version": f"1.{i}.0",
            "resolved": f"https://registry.npmjs.org/pkg{i}/-/pkg{i}-1.{i}.0.tgz",
            "integrity": "sha512-"
            + base64.b64encode(hashlib.sha512(RNG.randbytes(32)).digest()).decode(),
        }
        for i in range(200)
    }
    lock = json.dumps({"name": "shop", "lockfileVersion": 3, "packages": packages}, indent=2)
    assert scan_text("/srv/app/package-lock.json", lock) == []
    go_sum = "".join(
        f"example.com/mod{i} v0.{i}.0 h1:{base64.b64encode(RNG.randbytes(32)).decode()}\n"
        f"example.com/mod{i} v0.{i}.0/go.mod h1:{base64.b64encode(RNG.randbytes(32)).decode()}\n"
        for i in range(200)
    )
    assert scan_text("/srv/app/go.sum", go_sum) == []
    hashes = "".join(
        f'{name} = [\n    {{file = "x-{i}.whl", '
        f'hash = "sha256:{hashlib.sha256(RNG.randbytes(8)).hexdigest()}"}},\n]\n'
        for i, name in enumerate(["content-hash", "token-lib", "secretstorage"])
    )
    assert scan_text("/srv/app/poetry.lock", hashes) == []
    requirements = "".join(
        f"pkg{i}==1.0 --hash=sha256:{hashlib.sha256(RNG.randbytes(8)).hexdigest()}\n"
        for i in range(100)
    )
    assert scan_text("/srv/app/requirements.txt", requirements) == []


def test_minified_js_does_not_fire() -> None:
    font = base64.b64encode(RNG.randbytes(3000)).decode()
    sri = base64.b64encode(hashlib.sha384(b"x").digest()).decode()
    minified = (
        '!function(e,t){"use strict";var n="data:font/woff2;base64,'
        + font
        + f'",r={{integrity:"sha384-{sri}",crossOrigin:"anonymous"}};'
        + "e.tokenize=function(t){return t.split(/\\s+/)},e.keyOf=function(e){return e.key}"
        + "}(window,document);\n"
    )
    assert scan_text("/srv/app/static/app.min.js", minified) == []
    for real in (
        Path("/usr/share/javascript/jquery/jquery.min.js"),
        *sorted(Path("/usr/lib/node_modules/npm/node_modules").glob("*/dist/esm/index.min.js")),
    ):
        if real.is_file():
            assert scan_text(str(real), real.read_text(errors="replace")) == [], real


def test_entropy_threshold_separates_random_runs_from_words_and_identifiers() -> None:
    assert high_entropy(rand(B64, 40))
    assert high_entropy(rand("0123456789abcdef", 40))
    assert not high_entropy("this_is_a_rather_long_setting_name_for_tests")
    assert not high_entropy("0" * 64)
    assert not high_entropy("1234567890" * 4)  # digits only: a number, not hex
    assert not high_entropy(rand(B64, 31))


# -- real bakes ---------------------------------------------------------------


@dataclass
class Project:
    root: Path
    home: Path
    store: ImageStore
    lines: list[str] = field(default_factory=list)

    def write(self, recipe: str, files: dict[str, str | bytes]) -> None:
        for rel, content in files.items():
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        (self.root / "kiln.toml").write_text('[project]\nname = "scan"\n\n' + recipe)

    def bake(self) -> str:
        from kiln.image.progress import PlainProgress

        stream = io.StringIO()
        progress = PlainProgress(stream)
        spec = load_spec(self.root / "kiln.toml")
        try:
            return bake(spec, store=self.store, progress=progress)["web"].digest
        finally:
            self.lines = stream.getvalue().splitlines()

    def tags(self) -> list[str]:
        return [entry.ref_name for entry in self.store.images()]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    home = tmp_path / "home"
    monkeypatch.setenv("KILN_HOME", str(home))
    root = tmp_path / "project"
    root.mkdir()
    return Project(root, home, ImageStore(home / "images"))


def test_a_copied_env_with_an_aws_key_fails_the_bake_masked_and_nothing_is_tagged(
    project: Project,
) -> None:
    project.write(
        '[images.web]\nfrom = "scratch"\nsteps = [{ copy = "app/", to = "/srv/app" }]\n',
        {"app/.env": ENV_FILE, "app/main.txt": "hello\n"},
    )
    with pytest.raises(KilnError) as failure:
        project.bake()
    message = str(failure.value)
    assert (
        message
        == "kiln.toml: images.web: secret found: /srv/app/.env:3: aws-access-key-id (AKIA…XYZ)"
    )
    assert AWS_KEY_ID not in message
    assert project.tags() == []
    assert project.store.referrer_subjects() == []

    cli = subprocess.run(
        [str(Path(sys.executable).parent / "kiln"), "bake", str(project.root / "kiln.toml")],
        capture_output=True,
        text=True,
        env={**os.environ, "KILN_HOME": str(project.home)},
        timeout=120,
    )
    assert cli.returncode != 0
    assert "secret found: /srv/app/.env:3: aws-access-key-id (AKIA…XYZ)" in cli.stderr
    assert AWS_KEY_ID not in cli.stderr + cli.stdout
    assert project.tags() == []


def test_a_clean_bake_records_the_scan_and_a_cached_rebake_does_not_rescan(
    project: Project,
) -> None:
    project.write(
        '[images.web]\nfrom = "scratch"\nsteps = [{ copy = "app/", to = "/srv/app" }]\n',
        {"app/main.txt": "hello\n", "app/config.yaml": "password: ${DB_PASSWORD}\n"},
    )
    digest = project.bake()
    [referrer] = project.store.referrers(digest, SECRET_SCAN_ARTIFACT_TYPE)
    document = stored_scan(project.store, digest)
    assert document is not None
    assert document["findings"] == 0
    assert document["allowed"] == []
    assert document["rules_version"] == 1
    manifest = project.store.read_json(digest)
    assert document["layers"] == [layer["digest"] for layer in manifest["layers"]]

    scan_cache = project.home / "cache" / "secrets"
    assert scan_cache.is_dir()
    shutil.rmtree(scan_cache)
    assert project.bake() == digest
    assert not scan_cache.exists(), "a cached re-bake read the layers again"
    assert project.store.referrers(digest, SECRET_SCAN_ARTIFACT_TYPE) == [referrer]


def test_the_allow_list_hides_a_finding_records_it_and_warns_on_a_stale_entry(
    project: Project,
) -> None:
    recipe = (
        '[images.web]\nfrom = "scratch"\nsteps = [{ copy = "app/", to = "/srv/app" }]\n'
        "secrets_allow = [\n"
        '  { path = "/srv/app/test/*.pem", rule = "private-key", reason = "test fixture" },\n'
        '  { path = "/srv/app/old.key", reason = "removed long ago" },\n'
        "]\n"
    )
    project.write(recipe, {"app/test/fixture.pem": ed25519_pem(), "app/main.txt": "hi\n"})
    digest = project.bake()
    document = stored_scan(project.store, digest)
    assert document is not None
    assert document["findings"] == 0
    assert document["allowed"] == [
        {
            "path": "/srv/app/test/fixture.pem",
            "line": 1,
            "rule": "private-key",
            "reason": "test fixture",
        }
    ]
    warnings = [line for line in project.lines if "warning:" in line]
    assert len(warnings) == 1
    assert "secrets_allow: /srv/app/old.key (any rule) matches nothing" in warnings[0]
    assert any(tag.endswith(digest.removeprefix("sha256:")[:12]) for tag in project.tags())

    # the allow entry covers one rule only: an AWS key in the same file still fails
    project.write(recipe, {"app/test/fixture.pem": ed25519_pem() + f"\n{AWS_KEY_ID}\n"})
    with pytest.raises(KilnError, match=r"fixture\.pem:\d+: aws-access-key-id \(AKIA…XYZ\)"):
        project.bake()


def test_an_unknown_allow_rule_is_one_clear_error(project: Project) -> None:
    project.write(
        '[images.web]\nfrom = "scratch"\nsteps = [{ copy = "app/", to = "/srv/app" }]\n'
        'secrets_allow = [{ path = "/srv/*", rule = "aws-key", reason = "x" }]\n',
        {"app/main.txt": "hi\n"},
    )
    with pytest.raises(KilnError, match=r"images\.web\.secrets_allow\[0\]\.rule: unknown rule"):
        project.bake()
    assert project.tags() == []


def test_binaries_and_huge_files_are_skipped(project: Project) -> None:
    secret_line = f"AWS_ACCESS_KEY_ID={AWS_KEY_ID}\n".encode()
    project.write(
        '[images.web]\nfrom = "scratch"\nsteps = [{ copy = "app/", to = "/srv/app" }]\n',
        {
            "app/tool.bin": b"\x7fELF\x02\x01\x00\x00" + secret_line,
            "app/huge.log": secret_line + b"x" * MAX_FILE_BYTES,
            "app/main.txt": "hi\n",
        },
    )
    digest = project.bake()
    document = stored_scan(project.store, digest)
    assert document is not None
    assert document["skipped"] == {"binary": 1, "large": 1, "unsafe": 0}


@pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static not installed")
def test_a_secret_deleted_by_a_later_step_still_fails(project: Project) -> None:
    from kiln.image.sandbox import step_blocker

    if step_blocker() is not None:
        pytest.skip(str(step_blocker()))
    rootfs = project.root / "rootfs" / "bin"
    rootfs.mkdir(parents=True)
    shutil.copyfile(BUSYBOX, rootfs / "busybox")
    os.chmod(rootfs / "busybox", 0o755)
    (rootfs / "sh").symlink_to("busybox")
    (rootfs / "rm").symlink_to("busybox")
    project.write(
        '[images.web]\nfrom = "scratch"\nsteps = [\n'
        '  { copy = "rootfs/", to = "/" },\n'
        '  { copy = "app/", to = "/srv/app" },\n'
        '  { run = "rm /srv/app/.env" },\n'
        "]\n",
        {"app/.env": ENV_FILE},
    )
    with pytest.raises(KilnError, match=r"/srv/app/\.env:3: aws-access-key-id \(AKIA…XYZ\)"):
        project.bake()
    assert project.tags() == []


def test_a_tampered_layer_fails_naming_the_blob(project: Project, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("hello\n")
    layer = layer_from_dir(tree, project.store, 0, prefix="/srv").descriptor
    blob = project.store.blob_path(layer.digest)
    data = blob.read_bytes()
    os.chmod(blob, 0o644)
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(KilnError, match=layer.digest[:19]):
        scan_layers(project.store, [layer], cache=tmp_path / "cache")


def test_the_scan_reads_each_layer_not_the_merged_view(project: Project, tmp_path: Path) -> None:
    """Two layers: the upper one whites the secret out; the lower one still holds it."""
    lower = tmp_path / "lower"
    (lower / "app").mkdir(parents=True)
    (lower / "app" / ".env").write_text(ENV_FILE)
    upper = tmp_path / "upper"
    (upper / "app").mkdir(parents=True)
    (upper / "app" / ".wh..env").write_text("")
    layers: list[Descriptor] = [
        layer_from_dir(tree, project.store, 0, prefix="/srv").descriptor for tree in (lower, upper)
    ]
    result = scan_layers(project.store, layers, [AllowEntry("/nothing", None, "x")])
    assert [f.describe() for f in result.findings] == [
        "/srv/app/.env:3: aws-access-key-id (AKIA…XYZ)"
    ]
    assert [e.path for e in result.stale] == ["/nothing"]


# -- a Debian base ------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_the_debian_bases_own_keys_do_not_fire(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ssl-cert's postinst makes a snakeoil private key in the base's package layer; the
    recipe's own copy layer is scanned (and is clean), the base's is not."""
    if os.geteuid() != 0 or shutil.which("mmdebstrap") is None:
        pytest.skip("a Debian bake needs root and mmdebstrap")
    monkeypatch.setenv("KILN_CACHE", str(DEB_CACHE))
    project.write(
        '[images.web]\nfrom = "debian:bookworm"\npackages = ["python3-minimal", "ssl-cert"]\n'
        'steps = [{ copy = "app/", to = "/srv/app" }]\n',
        {"app/main.py": "print('hi')\n"},
    )
    digest = project.bake()
    document = stored_scan(project.store, digest)
    assert document is not None and document["findings"] == 0
    manifest = project.store.read_json(digest)
    layers = [Descriptor.from_json(layer) for layer in manifest["layers"]]
    assert document["layers"] == [layers[-1].digest]
    base = scan_layers(project.store, layers[:-1])
    assert "/etc/ssl/private/ssl-cert-snakeoil.key" in {f.path for f in base.findings}


def test_scan_time_for_the_shop_examples_layer(project: Project, tmp_path: Path) -> None:
    """Figure: the shop example's app layer (what its copy step adds), scanned cold."""
    app = Path(__file__).resolve().parents[2] / "examples" / "shop" / "app"
    layer = layer_from_dir(app, project.store, 0, prefix="/srv/app").descriptor
    started = time.perf_counter()
    result = scan_layers(project.store, [layer], cache=tmp_path / "cache")
    seconds = time.perf_counter() - started
    assert result.findings == []
    assert result.files > 0
    assert seconds < 1.0
    print(f"\nshop app layer: {result.files} files scanned in {seconds * 1000:.1f} ms")


def test_a_hostile_layer_entry_that_climbs_out_is_counted_not_read(
    project: Project, tmp_path: Path
) -> None:
    """A member named ``../../…`` never lands in an image (the unpacker refuses it): it
    is counted as unsafe; a sibling member is still scanned under its own path."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for name in ("../../escape/.env", "./srv/app/.env"):
            data = ENV_FILE.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    layer = project.store.put_bytes(buffer.getvalue(), MEDIA_TYPE_LAYER_TAR)
    result = scan_layers(project.store, [layer], cache=tmp_path / "cache")
    assert result.unsafe == 1
    assert [f.describe() for f in result.findings] == [
        "/srv/app/.env:3: aws-access-key-id (AKIA…XYZ)"
    ]
