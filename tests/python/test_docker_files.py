"""The container files parse and name what exists; scripts/docker-test.sh --help works.

CI runs no container (the image downloads several GB); scripts/docker-test.sh does,
and BENCHMARKS.md records its runs.
"""
import os
import re
import subprocess

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "CMD", "ENTRYPOINT", "LABEL", "USER", "EXPOSE"}


def dockerfile_instructions(path):
    """(keyword, rest) per instruction, with continuation lines joined and comments dropped."""
    out, current = [], ""
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            current += line.rstrip("\\") + " "
            if not line.endswith("\\"):
                keyword, _, rest = current.strip().partition(" ")
                out.append((keyword, rest.strip()))
                current = ""
    assert not current, f"{path}: a continuation line runs off the end"
    return out


def test_the_dockerfile_parses_and_copies_what_exists():
    ins = dockerfile_instructions(os.path.join(ROOT, "docker", "Dockerfile"))
    assert ins[0][0] in ("FROM", "ARG"), ins[0]
    for keyword, rest in ins:
        assert keyword in INSTRUCTIONS, f"unknown Dockerfile instruction {keyword!r}"
        if keyword == "COPY":
            for src in rest.split()[:-1]:
                assert src == "." or os.path.exists(os.path.join(ROOT, src)), f"COPY of a missing {src}"
    assert ("CMD", '["scripts/test.sh"]') in ins


def test_the_compose_files_parse_and_run_what_exists():
    for name in ("compose.yaml", "nodes.yaml"):
        with open(os.path.join(ROOT, "docker", name)) as f:
            doc = yaml.safe_load(f)
        assert doc["services"], name
        for service, spec in doc["services"].items():
            assert "image" in spec, (name, service)
            command = spec.get("command")
            text = " ".join(command) if isinstance(command, list) else str(command or "")
            for script in re.findall(r"scripts/[\w.-]+\.sh", text):
                assert os.path.exists(os.path.join(ROOT, script)), (name, service, script)
    with open(os.path.join(ROOT, "docker", "nodes.yaml")) as f:
        nodes = yaml.safe_load(f)["services"]
    assert {"rdzv", "node0", "node1", "node2"} <= set(nodes)
    for n in ("node0", "node1", "node2"):
        volumes = nodes[n]["volumes"]
        assert any(v.endswith(":/disk") and f"{n}-disk" in v for v in volumes), (n, volumes)  # a disk of its own


def test_docker_test_help_says_what_it_runs():
    out = subprocess.run([os.path.join(ROOT, "scripts", "docker-test.sh"), "--help"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert "scripts/test.sh" in out.stdout and "--nodes" in out.stdout
    bad = subprocess.run([os.path.join(ROOT, "scripts", "docker-test.sh"), "--bogus"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
