"""A checkpoint disk that fills up, on a real (tmpfs) filesystem: nothing partial is left behind to
hold the space, the error names the file and says what to do, every rank stops together, and the
committed checkpoints stay the newest and load. Skipped where mounting is not allowed."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from dtrain import dist
from dtrain.checkpoint import CheckpointManager, storage
from dtrain.errors import CheckpointError
from tests.checkpoint.workers import save_error, wrap
from tests.multiproc import run_ranks
from tests.reliability.conftest import make_model, tmpfs, train_step
from tests.reliability.test_storage_faults import assert_loads


def fill(disk: Path, leave: int = 0) -> Path:
    """A ballast file that leaves `leave` bytes free on `disk`."""
    st = os.statvfs(disk)
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return ballast


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [64 << 10, 8 << 20])  # through the page cache; O_DIRECT
def test_a_write_that_runs_out_of_space_leaves_no_file(tmp_path: Path, size: int) -> None:
    """The buffered file's close() flushes again and fails again; that second error used to skip
    the removal, so a truncated file stayed behind holding the space."""
    with tmpfs(tmp_path / "disk", "16m") as disk:
        fill(disk, leave=32 << 10)
        url = str(disk / "x.safetensors")
        with pytest.raises(OSError) as e:
            with storage.open_write(url, size=size) as f:
                f.write(b"\1" * size)
        assert e.value.errno == errno.ENOSPC
        assert not os.path.exists(url), os.listdir(disk)


def step_dirs(root: str) -> list[str]:
    return sorted(p for p in os.listdir(root) if p.startswith("step-"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("where", ["tensors", "manifest"])
def test_a_save_that_runs_out_of_space_leaves_nothing_behind(tmp_path: Path, async_save: bool, where: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up while the tensor files are written, or just before the manifest is (the
    ballast is written there, at the moment the commit writes it: the ENOSPC itself is real). The
    failed step's directory is removed, so its files do not keep holding the space; step 1 stays
    the newest committed checkpoint and loads, and once there is space the run saves on."""
    with tmpfs(tmp_path / "disk", "4m") as disk:
        root = str(disk / "ckpts")
        m, o = make_model(width=256)
        train_step(m, o, 1)
        mgr = CheckpointManager(root, async_save=async_save)
        mgr.save(1, model=m, optimizer=o)
        mgr.wait()
        saved = {k: v.clone() for k, v in m.state_dict().items()}
        if where == "tensors":
            ballast = fill(disk, leave=48 << 10)
        else:
            ballast = disk / "ballast"
            real = storage.write_atomic

            def full_first(url: str, data: bytes, storage_options: object = None) -> None:
                if url.endswith("/manifest.json"):
                    fill(disk)
                real(url, data, storage_options)  # type: ignore[arg-type]
            monkeypatch.setattr(storage, "write_atomic", full_first)
        train_step(m, o, 2)
        with pytest.raises(CheckpointError) as e:
            mgr.save(2, model=m, optimizer=o)
            mgr.wait()
        message = str(e.value)
        assert "No space left on device" in message and f"{root}/step-000000002" in message
        # which file, and what to do about it
        assert re.search(r"writing (model|optim)-00000-of-00001\.safetensors" if where == "tensors" else
                         r"writing manifest\.json", message), message
        assert f"The storage under {root} is full" in message and "checkpoint.keep_last_n" in message
        assert step_dirs(root) == ["step-000000001"]
        assert_loads(root, None, 1, saved, width=256)
        ballast.unlink()
        monkeypatch.undo()
        train_step(m, o, 3)
        mgr.save(3, model=m, optimizer=o)
        mgr.close()
        assert_loads(root, None, 3, {k: v.clone() for k, v in m.state_dict().items()}, width=256)
        assert step_dirs(root) == ["step-000000001", "step-000000003"]


@pytest.mark.timeout(30)
def test_no_inode_left_for_the_step_directory_says_what_to_do(tmp_path: Path) -> None:
    """A disk out of inodes (a tmpfs with nr_inodes, as a disk of many small files runs out) fails
    the save where the step directory is created, before any file is written: that error named
    the directory but not that the disk was full or what to do, as a failed write does."""
    with tmpfs(tmp_path / "disk", "4m", "nr_inodes=64") as disk:
        root = str(disk / "ckpts")
        m, o = make_model()
        mgr = CheckpointManager(root)
        mgr.save(1, model=m, optimizer=o)
        n = 0
        with pytest.raises(OSError) as full:
            while True:  # take every inode left
                (disk / f"f{n}").touch()
                n += 1
        assert full.value.errno == errno.ENOSPC
        with pytest.raises(CheckpointError) as e:
            mgr.save(2, model=m, optimizer=o)
        message = str(e.value)
        assert f"No space left on device: '{root}/step-000000002'" in message, message
        assert re.search(rf"The storage under {root} is full \(\d+\.\d MiB free now, no free inodes\): free space "
                         r"there, or keep fewer checkpoints", message), message
        for k in range(n):
            (disk / f"f{k}").unlink()
        mgr.save(2, model=m, optimizer=o)
        mgr.close()
        assert step_dirs(root) == ["step-000000001", "step-000000002"]


def two_ranks_fill_the_disk(rank: int, world: int, disk: str) -> list[str]:
    """Each mode (sync, async with overlapped staging as the trainer saves): commit a step, let
    rank 1 fill the shared disk, save again (every rank must raise, none may hang), free the space,
    save again. Returns, per mode, the error and the step directories seen after it."""
    dist.init(timeout_s=60, backend="gloo")
    m, o = make_model(width=256)
    model = wrap(m, "ddp", world)
    out = []
    for n, async_save in enumerate((False, True)):
        root = f"{disk}/ckpts-{n}"
        mgr = CheckpointManager(root, async_save=async_save, overlap_staging=async_save)
        train_step(model, o, 1)
        mgr.save(1, model=model, optimizer=o)
        mgr.wait()
        dist.barrier()
        if rank == 1:
            fill(Path(disk), leave=32 << 10)
        dist.barrier()
        train_step(model, o, 2)
        out.append(save_error(mgr, 2, model=model, optimizer=o))
        out.append(",".join(step_dirs(root)))
        dist.barrier()
        if rank == 1:
            (Path(disk) / "ballast").unlink()
        dist.barrier()
        train_step(model, o, 3)
        mgr.save(3, model=model, optimizer=o)
        mgr.close()
        out.append(",".join(step_dirs(root)))
    dist.shutdown()
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_two_ranks_on_a_full_disk_stop_together_and_save_again_once_there_is_space(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "4m") as disk:
        results = run_ranks(two_ranks_fill_the_disk, 2, str(disk))
    assert results[0] == results[1], results
    for n in (0, 1):
        error, after_failure, after_retry = results[0][3 * n:3 * n + 3]
        assert "No space left on device" in error and f"ckpts-{n}/step-000000002" in error, error
        assert "-of-00002.safetensors" in error and f"{disk}/ckpts-{n} is full" in error, error
        assert after_failure == "step-000000001"
        assert after_retry == "step-000000001,step-000000003"
