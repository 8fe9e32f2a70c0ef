"""Replicated loads shared by the ranks of one host (peers.py): the split, the cross-process copy,
and real 2-rank DDP loads that split, fall back, and fail together on a damaged share."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from dtrain.checkpoint import peers
from tests.checkpoint.test_multiprocess import assert_equal_states
from tests.checkpoint.workers import peer_loads
from tests.multiproc import run_ranks


def test_shares_are_runs_of_about_equal_bytes() -> None:
    assert peers.shares([10, 10, 10, 10], 2) == [0, 0, 1, 1]
    assert peers.shares([10] * 9, 3) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert peers.shares([100, 1, 1, 1], 2) == [0, 1, 1, 1]  # one big tensor is a share of its own
    assert peers.shares([5], 4) == [2]  # by its middle byte
    assert peers.shares([0, 0], 2) == [0, 0] and peers.shares([], 2) == []


def test_readv_copies_many_pieces_and_raises_for_a_bad_address() -> None:
    """More pieces than one call takes; the copy is exact; an unmapped source raises (the rank
    then reads those tensors itself) instead of copying part of them silently."""
    src = [torch.randn(n) for n in range(1, 1500)]
    dst = [torch.zeros_like(t) for t in src]
    peers._readv(os.getpid(), [(d.data_ptr(), s.data_ptr(), s.nbytes) for d, s in zip(dst, src, strict=True)])
    assert all(torch.equal(d, s) for d, s in zip(dst, src, strict=True))
    with pytest.raises(OSError) as e:
        peers._readv(os.getpid(), [(dst[0].data_ptr(), 8, 4)])
    assert e.value.errno == errno.EFAULT


def test_enabled_follows_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTRAIN_PEER_COPY", "0")
    assert not peers.enabled()
    monkeypatch.delenv("DTRAIN_PEER_COPY")
    assert peers.enabled() == (not os.path.exists("/proc/sys/kernel/yama/ptrace_scope")
                               or open("/proc/sys/kernel/yama/ptrace_scope").read().strip() == "0")


def test_enabled_only_where_yama_lets_any_process_of_the_user_attach(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path) -> None:
    scope = tmp_path / "ptrace_scope"
    monkeypatch.setattr(peers, "_YAMA", scope)
    assert peers.enabled()  # no Yama: the same user may
    for value, allowed in (("0\n", True), ("1\n", False), ("2\n", False), ("3\n", False)):
        scope.write_text(value)  # 1 (Ubuntu's default): only ancestors may; 2: admin only; 3: none
        assert peers.enabled() == allowed, value


def test_address_is_only_given_for_one_run_of_host_memory() -> None:
    t = torch.zeros(4, 4)
    assert peers._address(t) == t.data_ptr()
    assert peers._address(t.t()) == 0 and peers._address(torch.zeros(0)) == 0


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_ddp_ranks_split_the_load_and_copy_the_rest_from_each_other(tmp_path) -> None:
    ranks = run_ranks(peer_loads, 2, str(tmp_path / "ckpt"))
    for r in ranks:
        for case in ("split", "off", "refused", "small"):
            assert_equal_states(r[case]["state"], r["saved"])
    total = sum(ranks[0]["off"]["bytes"][:2])
    assert total > 10  # MiB: big enough that the shares are read with O_DIRECT
    for r in ranks:
        read, copied, shared = r["split"]["bytes"]
        assert read < 0.7 * total and copied > 0.3 * total and read + copied == pytest.approx(total, abs=0.2)
        assert not shared  # each its own bytes: O_DIRECT where the files qualify
        # DTRAIN_PEER_COPY=0: every rank reads it all, through the page cache (which each byte
        # then comes from the disk once)
        assert r["off"]["bytes"] == (pytest.approx(total), 0, True)
        assert r["small"]["bytes"] == (pytest.approx(total), 0, True)  # below peers.MIN_BYTES: the same
    assert ranks[0]["refused"]["bytes"] == (pytest.approx(total), 0, False)  # refused: rank 0 read it all
    assert ranks[1]["refused"]["bytes"] == pytest.approx(ranks[1]["split"]["bytes"])
    for case in ("mismatch", "mismatch_small"):
        mismatch = [r[case] for r in ranks]
        assert "the model expects F32[128]" in mismatch[1] and "rank(s) [1] could not load" in mismatch[0], mismatch
    damaged = [r["damaged"] for r in ranks]
    assert "checksum mismatch" in damaged[1] and "rank(s) [1] could not load" in damaged[0], damaged
