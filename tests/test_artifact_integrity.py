"""Artifacts on disk: every kind takes the mode the umask asks for, and the temporary files of
killed writers go on the next write to the same destination."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dnnmod.artifacts import (
    FOREIGN_ORPHAN_AGE_S,
    remove_orphans,
    save_tensors,
    write_bytes,
    write_json,
)
from dnnmod.data import make_splits, prepare
from dnnmod.models import build_model
from dnnmod.modules.heads import OwnLogitHead
from dnnmod.modules.moduleset import ModuleSet, base_identity
from dnnmod.modules.structure import trace_structure
from dnnmod.report.figures import pyplot, save_figure
from dnnmod.resumable import save_checkpoint
from dnnmod.training.model_io import save_model

META = {"arch": "lenet5", "num_classes": 10, "width": 0.25, "options": {}, "dataset": "digits",
        "seed": 0, "training": "st", "objective": {},
        "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}


def write_every_kind(root) -> None:
    """One artifact of every kind dnnmod writes, under ``root``."""
    write_json(root / "a.json", {"x": 1})
    write_bytes(root / "a.bin", b"x")
    save_tensors(root / "a.safetensors", {"x": torch.zeros(2)})
    model = build_model("lenet5", 10, width=0.25)
    save_model(root / "model" / "model.safetensors", model, META)
    structure = trace_structure(model)
    group = structure.groups[0]
    ModuleSet(approach="test", classes=[0, 1], masks={group.name: torch.ones(2, group.size)},
              head=OwnLogitHead([0, 1], 10), combination="argmax", base=base_identity(META),
              structure=structure, provenance={"approach": "test", "hyperparameters": {},
                                               "seed": 0, "wall_seconds": 0.0},
              ).save(root / "modules" / "modules.safetensors")
    save_checkpoint(root / "checkpoint.pt", {"step": 1})
    figure, _ = pyplot().subplots()
    save_figure(figure, root / "figure.png")
    prepare("digits", root / "data")
    make_splits(root / "data", "digits", seed=0)


@pytest.mark.parametrize("umask, mode", [(0o027, 0o640), (0o002, 0o664)])
def test_every_artifact_kind_honours_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_every_kind(tmp_path)
    finally:
        os.umask(previous)
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    kinds = {path.suffix for path in files}
    assert {".json", ".bin", ".safetensors", ".pt", ".png", ".pdf"} <= kinds
    assert len(files) >= 12
    wrong = {str(path.relative_to(tmp_path)): oct(path.stat().st_mode & 0o777)
             for path in files if path.stat().st_mode & 0o777 != mode}
    assert not wrong, wrong


#: a child that starts preparing digits and is killed (SIGKILL) while writing the images
KILLED_PREPARE = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch
    from dnnmod.data import prepare

    real = safetensors.torch.save_file

    def save_then_die(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if "images" in os.path.basename(filename):
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = save_then_die
    prepare("digits", sys.argv[1])
""")


def test_a_killed_prepare_leaves_a_temporary_file_that_the_rerun_removes(tmp_path):
    run = subprocess.run([sys.executable, "-c", KILLED_PREPARE, str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    leftovers = list((tmp_path / "digits").glob(".images.safetensors.*.tmp"))
    assert len(leftovers) == 1
    prepare("digits", tmp_path)
    assert (tmp_path / "digits" / "images.safetensors").is_file()
    assert not list((tmp_path / "digits").glob(".*.tmp"))


def test_a_live_writers_temporary_file_stays(tmp_path):
    target = tmp_path / "a.json"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as writer:
        try:
            live = tmp_path / f".a.json.{socket.gethostname()}~{writer.pid}~abcd1234.tmp"
            live.write_text("{")
            write_json(target, {"x": 1})
            assert live.exists()
        finally:
            writer.kill()
    writer.wait()
    write_json(target, {"x": 2})
    assert not live.exists()


def test_another_hosts_temporary_file_goes_once_it_is_old(tmp_path):
    target = tmp_path / "a.json"
    young = tmp_path / ".a.json.elsewhere~1~abcd1234.tmp"
    old = tmp_path / ".a.json.elsewhere~2~abcd1234.tmp"
    unnamed = tmp_path / ".a.json.k3j4h5g6.tmp"  # as written before names said their writer
    other_target = tmp_path / ".b.json.elsewhere~3~abcd1234.tmp"
    for path in (young, old, unnamed, other_target):
        path.write_text("{")
    stale = time.time() - FOREIGN_ORPHAN_AGE_S - 60
    for path in (old, unnamed, other_target):
        os.utime(path, (stale, stale))
    assert sorted(remove_orphans(target)) == sorted([old, unnamed])
    assert young.exists() and other_target.exists()
