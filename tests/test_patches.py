"""patches/ on a pristine torchtitan 0.2.2 tree: they apply, and the patched Trainer logs what the plugin logs.

The installed torchtitan package is copied to <tmp>/fork/torchtitan (a git repository, as a fork would be), the
patches are checked and applied in order with `git apply`, and the patched tree runs first on PYTHONPATH. Its
job turns NerVE and Muon on through the new TOML keys alone: no `[job] custom_config_module`, and no
`[experimental] custom_import` that touches NerVE's wiring. The same job through the plugin route must log the
same numbers, bit for bit: nerve's JSONL, and the exact loss and grad norm of every step.
"""

import hashlib
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torchtitan
import helpers
from torchtitan_harness import REPO_ROOT, TESTS_DIR, base_config, merge, read_metrics, run_torchtitan

# Every test here runs torchtitan in torchrun subprocesses: the slow part of the suite.
pytestmark = pytest.mark.slow

PATCH_DIR = REPO_ROOT / "patches"
PATCHES = sorted(PATCH_DIR.glob("*.patch"))
PRISTINE = Path(torchtitan.__file__).parent
N_LAYERS = 6  # debugmodel

# Test-only custom import. It is the CPU harness, not NerVE's wiring: tt_synthetic turns on CPU mode and
# registers the synthetic llama3 spec `nerve_test_llama3` (no tokenizer, no data files), which nothing in nerve
# wraps; NerVE and Muon reach it only through the patched train.py. It also reports which torchtitan runs.
CPU_HARNESS = """
import sys

import torchtitan
import tt_synthetic  # noqa: F401

print(f"patch-test torchtitan={torchtitan.__file__} main={sys.modules['__main__'].__file__}", flush=True)
"""


def git(cwd, *args) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def touched_files(patch: Path) -> list[str]:
    return re.findall(r"^diff --git a/(\S+) b/", patch.read_text(), flags=re.M)


@pytest.fixture(scope="module")
def fork(tmp_path_factory):
    root = tmp_path_factory.mktemp("fork")
    shutil.copytree(PRISTINE, root / "torchtitan", ignore=shutil.ignore_patterns("__pycache__"))
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "torchtitan 0.2.2")
    for patch in PATCHES:
        git(root, "apply", "--check", str(patch))
        git(root, "apply", str(patch))
    (root / "tt_patch_cpu.py").write_text(textwrap.dedent(CPU_HARNESS))
    return root


def test_patches_target_the_pristine_files_named_in_the_readme(fork):
    assert [p.name[:4] for p in PATCHES] == ["0001", "0002"]
    listed = dict(
        re.findall(
            r"^\| `(torchtitan/[^`]+)` \| `([0-9a-f]{64})` \|", (PATCH_DIR / "README.md").read_text(), flags=re.M
        )
    )
    touched = sorted({f for p in PATCHES for f in touched_files(p)})
    assert sorted(listed) == touched
    for path, digest in listed.items():
        assert hashlib.sha256((PRISTINE.parent / path).read_bytes()).hexdigest() == digest, path
    # Applied: the tree differs from the pristine commit in exactly those files, and no patch applies twice.
    assert sorted(git(fork, "diff", "--name-only").split()) == touched
    for patch in PATCHES:
        assert subprocess.run(["git", "apply", "--check", str(patch)], cwd=fork, capture_output=True).returncode != 0


def job(tmp_path) -> dict:
    """FSDP over 2 ranks, NerVE at both steps, Muon (float32 Newton-Schulz: bf16 matmuls crawl on CPUs)."""
    return merge(
        base_config(tmp_path),
        {
            "training": {"steps": 2},
            "parallelism": {"data_parallel_shard_degree": 2},
            "optimizer": {"name": "Muon", "lr": 3e-3},
            "muon": {"ns_dtype": "float32"},
            # the synthetic spec's name has no built-in tap spec; its blocks are llama3's
            "nerve": {"enable": True, "log_freq": 1, "spec": "llama3"},
        },
    )


def read_jsonl(cfg) -> list[dict]:
    return helpers.read_jsonl(Path(cfg["job"]["dump_folder"]) / "nerve" / "metrics.jsonl")


def test_patched_trainer_logs_exactly_what_the_plugin_route_logs(fork, tmp_path):
    patched = merge(job(tmp_path / "patched"), {"experimental": {"custom_import": "tt_patch_cpu"}})
    assert "custom_config_module" not in patched["job"]
    env = {"PYTHONPATH": os.pathsep.join(map(str, (fork, REPO_ROOT, TESTS_DIR)))}
    log = run_torchtitan(tmp_path / "patched", patched, nproc=2, env=env).stdout

    plugin = merge(
        job(tmp_path / "plugin"),
        {
            "experimental": {"custom_import": "tt_nerve"},
            "job": {"custom_config_module": "nerve_plugin.torchtitan.config"},
            "model": {"name": "nerve_test_llama3_nerve"},
        },
    )
    run_torchtitan(tmp_path / "plugin", plugin, nproc=2)

    # Both ranks ran the patched tree, started as its train.py.
    imported = re.findall(r"patch-test torchtitan=(\S+) main=(\S+)", log)
    assert len(imported) == 2
    for package, main in imported:
        assert Path(package) == fork / "torchtitan" / "__init__.py"
        assert Path(main) == fork / "torchtitan" / "train.py"
    assert "Muon (model part 0)" in log

    records = read_jsonl(patched)
    assert [(r["step"], r["layer"]) for r in records] == [(s, layer) for s in (1, 2) for layer in range(N_LAYERS)]
    assert records == read_jsonl(plugin)  # every metric and spectrum point, exactly
    metrics = read_metrics(patched)
    assert [m["step"] for m in metrics[0]] == [1, 2]
    assert metrics == read_metrics(plugin)  # float repr round-trips: bitwise loss and grad norm
