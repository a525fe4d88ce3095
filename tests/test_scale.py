"""Scale-out: results independent of the executor, worker deaths, seeds, chunks, progress lines."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pairs import random_pair

from prunecert.adversarial import attack_many
from prunecert.certify import certify
from prunecert.core.regions import Box, L2Ball
import prunecert.scale.executor as executor
from prunecert.scale import (
    WorkerError,
    chunk_slices,
    keep_freed_memory,
    open_executor,
    region_generator,
    region_seed,
    release_memory,
)


def _case():
    pair = random_pair(np.random.default_rng(3), 5, (12, 8), 3, twin="prune")
    rng = np.random.default_rng(4)
    lo, hi = pair.domain()
    regions = [Box.around(rng.random(5), 0.05, lo, hi, source=f"p{i}") for i in range(7)]
    regions += [L2Ball(rng.random(5), 0.1, lo, hi, source=f"b{i}") for i in range(3)]
    return pair, regions


def _docs(executor) -> tuple[dict, list[dict]]:
    pair, regions = _case()
    cert = certify(pair, None, regions, method="diff-linear", samples=64, seed=5, batch_size=3, progress=False,
                   executor=executor)
    doc = cert.to_json()
    doc.pop("seconds")
    attacks = attack_many(pair, None, regions, method="pgd", restarts=2, iterations=10, seed=5, progress=False,
                          executor=executor, chunk_size=4, budget_seconds=60)
    found = []
    for a in attacks:
        d = a.to_json()
        d.pop("seconds")
        found.append({**d, "x": a.x.tolist()})
    return doc, found


def test_same_json_for_one_two_workers_and_a_dask_cluster(tmp_path):
    reference = _docs(open_executor(workers=1))
    with open_executor(workers=2) as ex:
        assert ex.kind == "local"
        assert _docs(ex) == reference
        assert set(ex.map(_torch_threads, ex.share(None), range(4))) == {1}  # the policy: one thread per worker
    with open_executor(workers=2, scheduler="local") as ex:
        assert ex.kind == "dask" and ex.workers == 2
        assert _docs(ex) == reference
        # a worker killed mid-run: the scheduler re-runs its chunk on another worker (one cluster start
        # serves both checks: starting a LocalCluster costs ~10 s here)
        marker = tmp_path / "kill-once"
        marker.write_text("")
        assert list(ex.map(_die_once, ex.share(str(marker)), range(5))) == [0, 10, 20, 30, 40]
        assert not marker.exists()  # the kill did happen
    # the seeds really are per region: another run seed changes the samples
    pair, regions = _case()
    other = certify(pair, None, regions, samples=64, seed=6, batch_size=3, progress=False).to_json()
    assert other["regions"] != reference[0]["regions"]


def test_region_seeds_depend_on_the_seed_and_the_region_only():
    assert region_seed(0, 1) == region_seed(0, 1)
    assert len({region_seed(s, i) for s in range(4) for i in range(50)}) == 200
    _, regions = _case()
    a = region_generator(7, regions[0]).initial_seed()
    assert a == region_generator(7, Box(*regions[0].bounding_box())).initial_seed()  # same bounds, same seed
    assert 0 <= a < 2**63 and a != region_generator(8, regions[0]).initial_seed()
    assert a != region_generator(7, regions[1]).initial_seed()
    assert chunk_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]


def _torch_threads(shared, item) -> int:
    import torch
    return torch.get_num_threads()


def test_in_process_runs_on_the_policys_threads_and_restores_them():
    import torch
    before = torch.get_num_threads()
    assert list(open_executor(workers=1).map(_torch_threads, None, range(2))) == [1, 1]
    assert list(open_executor(workers=1, threads=2).map(_torch_threads, None, range(1))) == [2]
    assert torch.get_num_threads() == before


def _die(shared, item):
    """A chunk function that kills its own worker process (as the OOM killer or `kill -9` would)."""
    if item == shared:
        os.kill(os.getpid(), signal.SIGKILL)
    return item


def _die_once(marker: str, item):
    """Kills its worker the first time it sees item 2 (the marker file says whether it did)."""
    if item == 2 and Path(marker).exists():
        Path(marker).unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return item * 10


def test_killed_local_worker_is_a_clear_error():
    with open_executor(workers=2) as ex, pytest.raises(WorkerError, match="worker process died"):
        list(ex.map(_die, ex.share(3), range(6)))


def test_bad_worker_options():
    from prunecert.errors import ConfigError
    with pytest.raises(ConfigError, match="--workers"):
        open_executor(workers=0)
    with pytest.raises(ConfigError, match="--threads"):
        open_executor(workers=1, threads=0)


def test_progress_lines_when_stderr_is_a_file(capfd):
    pair, regions = _case()
    certify(pair, None, regions, samples=8, batch_size=4, progress=True)
    err = capfd.readouterr().err.splitlines()
    lines = [ln for ln in err if ln.startswith("certify (diff-linear): ")]
    assert [ln.split(": ")[1].split(" ")[0] for ln in lines] == ["4/10", "7/10", "10/10"]
    assert all("elapsed" in ln and "ETA" in ln for ln in lines)
    certify(pair, None, regions, samples=8, batch_size=4, progress=False)
    assert capfd.readouterr().err == ""



def test_streamed_certify_json_is_the_whole_runs_document(tmp_path):
    from prunecert.certify import certify_stream
    from prunecert.certify.stream import CertifyWriter

    pair, regions = _case()
    whole = certify(pair, None, regions, samples=16, batch_size=3, tolerance=0.05, progress=False).to_json()
    with CertifyWriter(tmp_path / "c.json", models={"original": {"sha256": "ab"}}) as writer:
        for first, part in certify_stream(pair, None, regions, samples=16, batch_size=3, tolerance=0.05,
                                          progress=False):
            writer.add(first, part)
        writer.finish(whole["seconds"])
    streamed = json.loads((tmp_path / "c.json").read_text())
    assert streamed.pop("models") == {"original": {"sha256": "ab"}}
    assert streamed == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]  # no parts left behind


def test_a_failed_stream_writes_nothing(tmp_path):
    from prunecert.certify import certify_stream
    from prunecert.certify.stream import CertifyWriter

    pair, regions = _case()
    with pytest.raises(RuntimeError, match="worker died"), CertifyWriter(tmp_path / "c.json") as writer:
        for first, part in certify_stream(pair, None, regions, samples=16, batch_size=3, progress=False):
            writer.add(first, part)
            if first >= 3:
                raise RuntimeError("worker died")
    assert list(tmp_path.iterdir()) == []


def test_lazy_regions_are_built_per_chunk_and_give_the_same_result():
    from prunecert.scale.lazy import LazyRegions

    pair, regions = _case()
    built = []

    def make(i):
        built.append(i)
        return regions[i]

    lazy = LazyRegions(len(regions), make)
    assert lazy[2:4] == regions[2:4] and lazy[-1] is regions[-1] and len(lazy) == 10
    with pytest.raises(IndexError):
        lazy[10]
    a = certify(pair, None, lazy, samples=16, batch_size=3, progress=False).to_json()
    b = certify(pair, None, regions, samples=16, batch_size=3, progress=False).to_json()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    found = attack_many(pair, None, lazy, method="pgd", restarts=1, iterations=3, progress=False, chunk_size=4)
    assert [r.value for r in found] == [r.value for r in attack_many(pair, None, regions, method="pgd", restarts=1,
                                                                      iterations=3, progress=False, chunk_size=4)]


_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from prunecert.scale import keep_freed_memory
    keep_freed_memory()
torch.ones(2 ** 23, dtype=torch.float64)             # 64 MB, written, then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(6 * 2 ** 20, dtype=torch.float64)         # 48 MB
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_kept_heap_serves_the_next_large_tensor_without_fresh_pages():
    """With `keep_freed_memory` the heap a freed 64 MB tensor leaves serves the next, 48 MB one (no
    page faults); with glibc's defaults it gets fresh mmap'd pages (12288 faults of 4 KB). (A block of
    the very same size may not fit the freed one: torch's 64-byte alignment asks a little more.)"""
    def faults(variant: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS, variant], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])
    assert faults("keep") < 1000 < 6000 < faults("default")


def test_keep_freed_memory_is_harmless_without_glibc(monkeypatch):
    def no_libc(name: str) -> None:
        raise OSError(f"{name}: not found")
    monkeypatch.setattr(executor.ctypes, "CDLL", no_libc)
    keep_freed_memory()
    release_memory()
