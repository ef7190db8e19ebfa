"""The seams the code is built on, checked as facts: the import graph (no cycle, `jobs/` at the
bottom, `gpu/batch.py` backend-neutral), one sampler protocol both samplers satisfy, one table
of sampling bounds for the wire and the engine, the sampling kernel's record layout equal on
both sides, and no reference to documents outside the repository."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from gpu.backends.base import TokenSampler
from gpu.cuda import sampling as cuda_sampling
from gpu.cuda.sampling import CudaSampler
from gpu.request import RequestError, SamplingParams
from gpu.sampler import Sampler
from jobs.limits import SAMPLING_BOUNDS
from jobs.schema import Sampling

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jobs", "loader", "tokenizer", "structured", "gpu", "worker", "gateway")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every module of ours and the modules of ours it imports (at any level of the file)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = _module_name(path)
            targets: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    targets.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets.add(node.module)
                    targets.update(f"{node.module}.{alias.name}" for alias in node.names)
            graph[name] = {t for t in targets if t.split(".")[0] in PACKAGES}
    modules = set(graph)
    # `from a.b import c` names a module a.b.c or a name inside a.b: keep what is a module.
    return {m: {t for t in ts if t in modules} for m, ts in graph.items()}


def test_import_graph_has_no_cycle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if target.startswith(module + "."):
                continue  # a package importing its own submodule is not a cycle
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_jobs_imports_nothing_of_the_layers_above():
    graph = _imports()
    for module, targets in graph.items():
        if module.split(".")[0] == "jobs":
            above = sorted(t for t in targets if t.split(".")[0] != "jobs")
            assert not above, f"{module} imports {above}"


def test_gateway_stands_on_the_contract_alone():
    """The gateway turns HTTP into jobs: it never reaches the engine or the worker daemon
    (`orcd gateway` must not import torch; tests/gateway checks the process too)."""
    graph = _imports()
    for module, targets in graph.items():
        if module.split(".")[0] == "gateway":
            below = sorted(t for t in targets if t.split(".")[0] in ("gpu", "worker"))
            assert not below, f"{module} imports {below}"


def test_batch_packing_is_backend_neutral():
    assert not {t for t in _imports()["gpu.batch"] if t.startswith("gpu.cuda")}


def _tracked_files() -> list[Path]:
    """The repository's own files (git's list; without git, the tree less what git ignores
    here: environments, caches, build output)."""
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()  # fmt: skip
        return [ROOT / name for name in names]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".whl", ".model", ".baseline", "build"}
        return [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)
                and not any(part.endswith(".egg-info") for part in p.parts)]


def test_no_document_outside_the_repository_is_cited():
    pattern = re.compile(r"\.\./shared|ANCHORS\.md|DESIGN\.md|STYLE\.md")
    suffixes = {".py", ".cu", ".cuh", ".md", ".sh", ".toml", ".yaml", ".service", ".txt"}
    offenders = []
    for path in _tracked_files():
        if path.suffix not in suffixes or path == Path(__file__).resolve() or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, offenders


@pytest.mark.parametrize("sampler", [Sampler(seed=0), CudaSampler(seed=0)],
                         ids=["torch", "cuda"])  # fmt: skip
def test_both_samplers_satisfy_the_protocol(sampler):
    assert isinstance(sampler, TokenSampler)
    sampler.release("never-seen")  # a request without state: nothing to do, no error


def test_one_table_of_sampling_bounds():
    """The engine's SamplingParams, the wire's Sampling and the table name the same fields,
    and both sides refuse exactly what the table puts out of bounds."""
    engine_fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert engine_fields == set(SAMPLING_BOUNDS)
    assert engine_fields <= set(Sampling.model_fields)
    for name, bound in SAMPLING_BOUNDS.items():
        is_int = isinstance(bound.low, int) and isinstance(bound.high, int)
        step = 1 if is_int else 1e-6
        inside = [bound.high, bound.low + step if bound.low_open else bound.low]
        outside = [bound.high + step, bound.low if bound.low_open else bound.low - step]
        for value in inside:
            SamplingParams(**{name: value}).validate()
            Sampling(**{name: value})
        for value in outside:
            with pytest.raises(RequestError, match=name):
                SamplingParams(**{name: value}).validate()
            with pytest.raises(ValueError, match=name):
                Sampling(**{name: value})


def test_sampling_record_layout_matches_the_kernel():
    """gpu/cuda/sampling.py writes the row records that sampling.cu reads: same word indices,
    flags, sizes and logprob bound."""
    source = (ROOT / "gpu" / "kernels" / "sampling.cu").read_text()
    defines = {m[1]: int(m[2]) for m in re.finditer(r"#define (\w+) (\d+)\b", source)}
    names = [n for n in defines if re.fullmatch(r"(W|F)_[A-Z_]+", n)]
    assert len(names) == 24
    for name in names:
        assert getattr(cuda_sampling, name) == defines[name], name
    assert cuda_sampling.ROW_WORDS == defines["ROW_WORDS"]
    assert cuda_sampling.OUT_WORDS == defines["OUT_WORDS"]
    assert cuda_sampling.THREADS == defines["THREADS"]
    assert cuda_sampling.MAX_TOP_LOGPROBS == defines["MAX_TOP"] == SAMPLING_BOUNDS["logprobs"].high
