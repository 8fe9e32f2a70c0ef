"""Real 2-rank gloo jobs: resharding between 1 process, DDP and FSDP2, bitwise; failures on one rank."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dtrain.checkpoint import CheckpointManager
from dtrain.checkpoint.cli import main as ckpt_main
from tests.checkpoint import workers
from tests.checkpoint.workers import (
    Tied,
    failing_rank_save,
    full_state,
    make_mlp,
    make_narrow,
    make_optim,
    narrow_fsdp_load,
    narrow_fsdp_save,
    overlapped_async_saves,
    reshard_scenarios,
    save_agreement,
    step,
)
from tests.multiproc import run_ranks
from tests.reliability.test_lease import forge

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]


def assert_equal_states(a: dict, b: dict) -> None:
    """Bitwise equality of two `full_state` results (numpy arrays)."""
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert a["model"][k].dtype == b["model"][k].dtype and a["model"][k].tobytes() == b["model"][k].tobytes(), k
    assert a["optim"].keys() == b["optim"].keys() and a["optim"]
    for fqn in a["optim"]:
        assert a["optim"][fqn].keys() == b["optim"][fqn].keys()
        for name, v in a["optim"][fqn].items():
            assert v.tobytes() == b["optim"][fqn][name].tobytes(), (fqn, name)


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("reshard")
    roots = {k: str(base / k) for k in ("single", "fsdp", "ddp", "fresh", "tied")}
    model = make_mlp()
    opt = make_optim(model)
    for s in (1, 2):
        step(model, opt, 0, 1, seed=s)
    CheckpointManager(roots["single"]).save(2, model=model, optimizer=opt, extra={"tag": "single"})
    ranks = run_ranks(reshard_scenarios, 2, roots)
    return {"roots": roots, "single_saved": full_state(model, opt), "ranks": ranks}


def test_one_process_to_two_fsdp_ranks(scenarios: dict) -> None:
    for r in scenarios["ranks"]:
        got = r["single_to_fsdp"]
        assert got["step"] == 2 and got["extra"] == {"tag": "single"}
        assert_equal_states(got["loaded"], scenarios["single_saved"])


def test_fsdp_ranks_write_their_own_shards(scenarios: dict) -> None:
    ckpt = os.path.join(scenarios["roots"]["fsdp"], "step-000000002")
    assert sorted(os.listdir(ckpt)) == [
        "manifest.json", "model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors",
        "optim-00000-of-00002.safetensors", "optim-00001-of-00002.safetensors",
        "rng-00000-of-00002.json", "rng-00001-of-00002.json", "state.json"]
    man = json.load(open(os.path.join(ckpt, "manifest.json")))
    assert man["strategy"] == "fsdp"
    assert len(man["tensors"]["model/0.weight"]["chunks"]) == 2


def test_fsdp_to_ddp_is_bitwise_and_training_continues(scenarios: dict) -> None:
    saved = scenarios["ranks"][0]["fsdp_save"]
    for rank, r in enumerate(scenarios["ranks"]):
        got = r["fsdp_to_ddp"]
        assert (got["rng"] == r["fsdp_save"]["rng"]).all()  # each rank gets its own RNG stream back
        assert (got["rng"] != scenarios["ranks"][1 - rank]["fsdp_save"]["rng"]).any()
        assert_equal_states(got["loaded"], saved["saved"])
        for k, v in got["after"]["model"].items():  # one more step lands where the FSDP run went
            torch.testing.assert_close(torch.from_numpy(v), torch.from_numpy(saved["after"]["model"][k]),
                                       rtol=1e-6, atol=1e-7)


def test_ddp_writes_replicas_once_spread_over_ranks_and_loads_in_one_process(scenarios: dict) -> None:
    root = scenarios["roots"]["ddp"]
    man = json.load(open(os.path.join(root, "step-000000002", "manifest.json")))
    assert man["world_size"] == 2 and man["strategy"] == "ddp"
    assert all(len(t["chunks"]) == 1 for t in man["tensors"].values())  # each replica written once
    share: dict[str, int] = {}
    for t in man["tensors"].values():
        c = t["chunks"][0]
        rank = c["file"].split("-")[1]
        share[rank] = share.get(rank, 0) + c["data_offsets"][1] - c["data_offsets"][0]
    assert set(share) == {"00000", "00001"} and min(share.values()) > 0.3 * max(share.values())
    model = make_mlp(seed=5)
    opt = make_optim(model)
    info, extra = CheckpointManager(root).restore_latest(model=model, optimizer=opt)
    assert info.step == 2 and extra == {"tag": "ddp"}
    assert_equal_states(full_state(model, opt), scenarios["ranks"][0]["ddp_save"]["saved"])


def test_ddp_writes_tied_weights_once_and_one_process_loads_them_tied(scenarios: dict) -> None:
    """DDP: the tied pair goes to one rank, which writes its bytes once; both keys point at them."""
    step_dir = os.path.join(scenarios["roots"]["tied"], "step-000000001")
    chunks = {k: t["chunks"] for k, t in json.load(open(os.path.join(step_dir, "manifest.json")))["tensors"].items()}
    emb, head = chunks["model/emb.weight"], chunks["model/head.weight"]
    assert len(emb) == len(head) == 1
    assert (emb[0]["file"], emb[0]["data_offsets"]) == (head[0]["file"], head[0]["data_offsets"])
    model = Tied(seed=5)
    opt = make_optim(model)
    CheckpointManager(scenarios["roots"]["tied"]).restore_latest(model=model, optimizer=opt)
    assert model.head.weight is model.emb.weight
    assert_equal_states(full_state(model, opt), scenarios["ranks"][0]["tied_ddp"])
    assert ckpt_main(["verify", step_dir]) == 0


def test_fsdp_save_before_the_first_step_leaves_the_optimizer_alone_and_resumes_exactly(scenarios: dict) -> None:
    for r in scenarios["ranks"]:
        out = r["fresh_fsdp"]
        assert out["untouched"], "the save initialised the optimizer state"
        assert out["reset"], "loading a never-stepped checkpoint left the stepped optimizer state in place"
        assert_equal_states(out["resumed"], out["reference"])


def test_fsdp_shards_left_empty_on_some_ranks_reshard_from_4_to_3_ranks_and_to_1_process(tmp_path) -> None:
    """Uneven FSDP2 shards, some of them empty: saved on 4 ranks, loaded on 3 (other uneven
    shards) and in one process, bitwise; `dtrain ckpt verify` accepts the checkpoint."""
    root = str(tmp_path / "narrow")
    saved = run_ranks(narrow_fsdp_save, 4, root)
    assert saved[3]["rows"]["0.weight"] == 0 and saved[0]["rows"]["0.weight"] == 1  # an empty shard was saved
    for got in run_ranks(narrow_fsdp_load, 3, root):
        assert_equal_states(got, saved[0]["saved"])
    model = make_narrow(seed=5)
    opt = make_optim(model)
    CheckpointManager(root).restore_latest(model=model, optimizer=opt)
    assert_equal_states(full_state(model, opt), saved[0]["saved"])
    assert ckpt_main(["verify", os.path.join(root, "step-000000002")]) == 0


def test_a_failing_rank_fails_every_rank_and_commits_nothing(tmp_path) -> None:
    roots = [str(tmp_path / "sync"), str(tmp_path / "async")]
    for messages in run_ranks(failing_rank_save, 2, roots):
        for m in messages:
            assert "not committed" in m and "rank 1" in m and "no space left on device" in m
    for root in roots:
        assert not os.path.exists(os.path.join(root, "step-000000001", "manifest.json"))
        assert CheckpointManager(root).latest_committed() is None


def test_overlapped_async_saves_of_ddp_and_fsdp_commit_the_state_at_the_call(tmp_path) -> None:
    roots = {k: str(tmp_path / k) for k in ("ddp", "fsdp")}
    ranks = run_ranks(overlapped_async_saves, 2, roots)
    for strategy, root in roots.items():
        model = make_mlp(seed=9)
        opt = make_optim(model)
        CheckpointManager(root).load("step-000000002", model=model, optimizer=opt)
        assert_equal_states(full_state(model, opt), ranks[0][strategy])


def test_ranks_agree_on_a_save_with_one_small_all_reduce_and_all_raise_one_ranks_error(tmp_path) -> None:
    """A DDP save sends no object but the reports rank 0 needs (rank 0 alone checks the lease; the
    box lists are the same on every rank); FSDP2 also sends the box lists, which differ. A `stateful`
    component whose state differs between ranks was silently saved as rank 0's: rank 0 now names it,
    once; the same state on every rank costs no collective more and says nothing."""
    roots = {k: str(tmp_path / k) for k in ("ddp", "fsdp", "walk", "leased", "dtypes", "per_rank")}
    forge(roots["leased"], None, job="job-x", host="other-host", renewed_ago=1)
    ranks = run_ranks(save_agreement, 2, roots)
    for r in ranks:
        assert r["ddp"] == "saved" and r["ddp_calls"] == {"gather_object": 1}
        assert r["fsdp"] == "saved" and r["fsdp_calls"] == {"all_gather_object": 1, "gather_object": 1}
        assert "cannot save checkpoint" in r["walk"] and "rank 1: RuntimeError: state dict walk failed" in r["walk"]
        for case in ("leased", "leased_overlapped"):
            assert "is in use by another job" in r[case] and "job 'job-x' (host other-host" in r[case], r[case]
        assert "'model/0.bias' is F32[16] on one rank and F64[16] on rank 1; ranks must agree" in r["dtypes"]
        assert r["said_when_the_same"] == [] and r["per_rank"] == "saved"
    assert ranks[1]["said_per_rank"] == [] and len(ranks[0]["said_per_rank"]) == 1, ranks[0]["said_per_rank"]
    assert ranks[0]["said_per_rank"][0].startswith("checkpoint step 1: stateful['mine'] differs between ranks (rank(s) "
                                                   "[1] hold other state than rank 0): a checkpoint keeps rank 0's")
    for strategy in ("ddp", "fsdp"):
        model, saved = make_mlp(seed=7), make_mlp().state_dict()
        CheckpointManager(roots[strategy]).load("step-000000001", model=model)
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    for root in ("walk", "leased", "dtypes"):
        assert CheckpointManager(roots[root], lease=False).latest_committed() is None


@pytest.mark.timeout(120)
def test_a_damaged_newest_checkpoint_is_reported_once_unless_ranks_saw_different_things(tmp_path) -> None:
    """Every rank logged the same "damaged ... falling back" warning. And where one rank found the
    damage while another could not load at all, the first fell back alone to an older checkpoint
    and waited there for the others (until the process group timeout)."""
    ranks = run_ranks(workers.damaged_fallback_warnings, 2, str(tmp_path / "ckpt"))
    same = [r["same"] for r in ranks]
    assert [r["loaded"] for r in same] == [1, 1]
    assert len(same[0]["said"]) == 1 and same[1]["said"] == [], same
    assert "step-000000002 is damaged" in same[0]["said"][0] and "checksum" in same[0]["said"][0], same
    own = [r["own"] for r in ranks]  # rank 1 alone read the damage; rank 0 knows only that it did
    assert [r["loaded"] for r in own] == [1, 1]
    assert len(own[0]["said"]) == 1 and "rank(s) [1] could not load" in own[0]["said"][0], own
    assert len(own[1]["said"]) == 1 and "rng-00001-of-00002.json" in own[1]["said"][0], own
    mixed = [r["mixed"] for r in ranks]
    assert all(r["said"] == [] and r["error"].startswith(("CheckpointError", "CheckpointMismatchError"))
               for r in mixed), mixed
    assert "rng-00001-of-00002.json" in mixed[1]["error"], mixed
