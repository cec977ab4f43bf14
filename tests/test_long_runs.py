"""Issue 18, long runs: keep-last-N and best checkpoints, early stopping, log.txt and config.toml, gradient
accumulation, SLURM launches, class weights and OHEM."""
import copy
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from seg import checkpoint, config, dist, losses, tasks, train
from seg.files import UserError

from test_evaluate import small_pspnet
from test_train_e2e import CONFIGS, assert_same_weights, final_weights, overrides


def load(*overrides_):
    return config.load_config(CONFIGS, "demo", list(overrides_), tasks.builder_defaults)


def run(data_root, output_dir, *extra):
    cfg = load(*overrides(data_root, output_dir, *extra))
    tasks.train_task(config.validate(cfg))
    return cfg


def seg_state(cfg, iteration):
    return {"model": {"w": torch.full((2,), float(iteration))}, "optimizer": {}, "iteration": iteration, "config": cfg}


# ------------------------------------------------------------------ keep_last, best.pth, early stopping

def test_keep_newest_deletes_only_this_runs_older_checkpoints(tmp_path):
    cfg = load(f"output_dir={tmp_path}")
    other = copy.deepcopy(cfg)
    other["model"]["num_classes"] = 7  # another run's checkpoint in the same folder
    for iteration in (2, 4, 6, 8):
        checkpoint.save_atomic(seg_state(cfg, iteration), tmp_path / f"iter_{iteration:07d}.pth")
    checkpoint.save_atomic(seg_state(other, 9), tmp_path / "iter_0000009.pth")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "iter_0000001.pth")  # not seg's
    (tmp_path / "iter_0000010.pth").write_bytes(b"PK\x03\x04 torn")  # a torn copy: not provably seg's
    (tmp_path / "notes.txt").write_text("mine")
    checkpoint.keep_newest(tmp_path, cfg, 2, log=lambda *a, **k: None)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "iter_0000001.pth", "iter_0000006.pth", "iter_0000008.pth", "iter_0000009.pth", "iter_0000010.pth",
        "notes.txt"]


def test_keep_newest_never_deletes_the_only_loadable_checkpoint(tmp_path):
    cfg = load(f"output_dir={tmp_path}")
    checkpoint.save_atomic(seg_state(cfg, 2), tmp_path / "iter_0000002.pth")
    good = (tmp_path / "iter_0000002.pth").read_bytes()
    (tmp_path / "iter_0000004.pth").write_bytes(good[: len(good) // 2])  # the newest is torn
    checkpoint.keep_newest(tmp_path, cfg, 1, log=lambda *a, **k: None)
    assert (tmp_path / "iter_0000002.pth").read_bytes() == good and (tmp_path / "iter_0000004.pth").exists()


def eval_records(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [record for record in map(json.loads, handle) if "mIoU" in record]


BEST = ["iterations=6", "checkpoint_interval=2", "eval_interval=2", "checkpoint.best=mIoU", "optimizer.lr=0.2"]


def test_best_checkpoint_is_the_best_evaluations_and_survives_resume(voc_root, tmp_path):
    whole = str(tmp_path / "whole")
    run(voc_root, whole, *BEST)
    records = eval_records(whole)
    best = max(records, key=lambda record: record["mIoU"])  # max keeps the first of equal scores, as the run
    state = checkpoint.load_training_state(os.path.join(whole, "best.pth"))
    assert [record["iteration"] for record in records] == [2, 4, 6]
    assert state["iteration"] == best["iteration"] and {"optimizer", "scaler", "config"} <= state.keys()
    assert state["best"] == {"metric": "mIoU", "value": best["mIoU"], "iteration": best["iteration"], "stale": 0}
    assert_same_weights(state["model"], checkpoint.load_training_state(
        os.path.join(whole, f"iter_{best['iteration']:07d}.pth"))["model"])
    # a run interrupted after iteration 4 keeps the best of evaluations 2 and 4: it writes best.pth at 6 only if
    # evaluation 6 beats them, and ends with the uninterrupted run's record
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copy(os.path.join(whole, "iter_0000004.pth"), resumed)
    run(voc_root, resumed, *BEST, "resume=true")
    assert_same_weights(final_weights(whole), final_weights(resumed))
    final = checkpoint.load_training_state(os.path.join(resumed, "iter_0000006.pth"))
    assert final["best"] == checkpoint.load_training_state(os.path.join(whole, "iter_0000006.pth"))["best"]
    assert os.path.exists(os.path.join(resumed, "best.pth")) == (best["iteration"] == 6)


def test_resume_restores_the_best_score_of_its_metric(tmp_path):
    model = small_pspnet()
    optimizer = train.build_optimizer(model, 0.01, 0.9, 0.0, 0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stored = {"metric": "mIoU", "value": 0.5, "iteration": 4, "stale": 1}
    state = train.training_state(model, optimizer, scaler, 6, {}, best=stored)
    checkpoint.save_atomic(state, tmp_path / "iter_0000006.pth")
    for metric, expected in (("mIoU", stored), ("aAcc", {"metric": "aAcc", "value": None, "iteration": 0, "stale": 0})):
        progress = {"metric": metric, "value": None, "iteration": 0, "stale": 0}
        train.resume(model, optimizer, scaler, tmp_path, 10, lambda *a: None, progress=progress)
        assert progress == expected


def test_record_evaluation_counts_evaluations_without_a_rise_of_delta():
    policy = {"early_stop_patience": 2, "early_stop_delta": 0.01}
    progress = {"metric": "mIoU", "value": None, "iteration": 0, "stale": 0}
    seen = [checkpoint.record_evaluation(progress, {"mIoU": value}, step, policy)
            for step, value in enumerate([0.5, 0.52, 0.525, 0.51, 0.6, 0.6, 0.605], 1)]
    # 0.525 is a new best but not 0.01 above 0.52; the 4th evaluation ends the first patience window
    assert [(best, stop is not None) for best, stop in seen] == [
        (True, False), (True, False), (True, False), (False, True), (True, False), (False, False), (True, True)]
    assert progress == {"metric": "mIoU", "value": 0.605, "iteration": 7, "stale": 2}


def test_early_stopping_ends_like_a_normal_run_and_says_why(voc_root, tmp_path, capsys):
    out = str(tmp_path / "stop")
    run(voc_root, out, "iterations=20", "checkpoint_interval=0", "eval_interval=2", "checkpoint.best=mIoU",
        "checkpoint.early_stop_patience=1", "checkpoint.early_stop_delta=1.0")  # a rise of 100 points never comes
    printed = capsys.readouterr().out
    assert "stopped early at iteration 4 of 20: mIoU did not rise by 1 or more in 1 evaluations" in printed
    assert [record["iteration"] for record in eval_records(out)] == [2, 4]
    assert checkpoint.latest_checkpoint(out).name == "iter_0000004.pth"  # the final checkpoint
    assert "iter 5/20" not in printed and json.load(open(os.path.join(out, "eval.json")))["iteration"] == 4


@pytest.mark.parametrize("bad, key", [(["checkpoint.early_stop_patience=3"], "checkpoint.early_stop_patience"),
                                      (["checkpoint.best=mIoU", "eval_interval=0", "final_eval=false"],
                                       "checkpoint.best"),
                                      (["loss.class_weight=[1.0, 2.0]"], "loss.class_weight"),
                                      (["loss.ohem_thresh=1.5"], "loss.ohem_thresh"),
                                      (["accumulate=0"], "accumulate")])
def test_validation_names_the_key(bad, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config.validate(load(*bad))


# ------------------------------------------------------------------ log.txt and config.toml

def is_subsequence(lines, within):
    remaining = iter(within)
    return all(any(line == other for other in remaining) for line in lines)


def test_log_holds_config_environment_and_every_line_across_a_resume(voc_root, tmp_path, capsys):
    out = str(tmp_path / "logged")
    run(voc_root, out, "iterations=2", "checkpoint_interval=2")
    first = capsys.readouterr().out
    # not seg's, older than the run's newest (a newer foreign file would stop the resume: tests/test_ownership.py)
    torch.save({"state_dict": {"w": torch.zeros(1)}}, os.path.join(out, "iter_0000001.pth"))
    cfg = run(voc_root, out, "iterations=4", "checkpoint_interval=2", "resume=true", "checkpoint.keep_last=1")
    second = capsys.readouterr().out
    log = open(os.path.join(out, "log.txt")).read()
    assert "iter 2/2" in first and "resumed from" in second and "iter 4/4" in second and "removed" in second
    assert is_subsequence((first + second).splitlines(), log.splitlines())  # every printed line, in order
    assert log.count("\n[demo]\n") == 2 and log.count('"world_size": 1') == 2 and '"torch": "' in log
    assert sorted(name for name in os.listdir(out) if name.startswith("iter_")) == ["iter_0000001.pth",
                                                                                  "iter_0000004.pth"]
    dumped = config.load_toml(os.path.join(out, "config.toml"))  # re-runnable: over [base] it resolves to cfg
    assert config.resolve_section({"base": config.load_toml(CONFIGS)["base"], **dumped}, "demo") == cfg


# ------------------------------------------------------------------ gradient accumulation

def one_step(model, batch, accumulate):
    optimizer = train.build_optimizer(model, 0.1, 0.9, 0.0005, 0.0005)
    loss_fn = losses.loss_function("pspnet", {"average": "all", "aux_weight": 0.4})
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    found, applied = train.train_one_step(model, batch, loss_fn, optimizer, scaler,
                                          lambda: torch.autocast("cpu", enabled=False), accumulate)
    return {key: float(value) for key, value in found.items()}, applied


def test_accumulating_two_micro_batches_gives_the_weights_of_one_whole_batch(free_port):
    """PSPNet with BN in eval mode (norm_eval) and no dropout has no batch-dependent layer, and its loss averages
    over all pixels: two half batches average to the whole batch's gradient (DDP's no_sync path included)."""
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator),
             "hw": torch.tensor([[32, 32], [30, 28], [32, 32], [24, 32]]),
             "label": torch.randint(0, 3, (4, 32, 32), generator=generator)}
    batch["label"][1, 30:] = 255
    whole, split = small_pspnet().train(), small_pspnet().train()
    for model in (whole, split):
        model.decode_head.dropout.p = model.auxiliary_head.dropout.p = 0.0
        train.set_norm_eval(model, True)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(split)
        expected, got = one_step(whole, batch, 1), one_step(wrapped, batch, 2)
    finally:
        torch.distributed.destroy_process_group()
    assert expected[1] and got[1] and expected[0].keys() == got[0].keys()
    for key in expected[0]:
        assert math.isclose(expected[0][key], got[0][key], rel_tol=1e-5)
    assert_same_weights(whole.state_dict(), split.state_dict(), atol=1e-6)
    assert not torch.equal(whole.state_dict()["decode_head.conv_seg.weight"],
                           small_pspnet().state_dict()["decode_head.conv_seg.weight"])  # the step moved it


def test_accumulate_must_divide_the_per_process_batch(voc_root, tmp_path):
    with pytest.raises(UserError, match="accumulate = 3"):
        run(voc_root, str(tmp_path / "a"), "iterations=1", "accumulate=3")


# ------------------------------------------------------------------ SLURM

@pytest.mark.parametrize("nodelist, first", [("node[01-04,07]", "node01"), ("gpu7", "gpu7"), ("a1,b[2-3]", "a1"),
                                             ("n[3-4]-ib,x9", "n3-ib"), ("127.0.0.[1-4]", "127.0.0.1")])
def test_first_node_of_a_slurm_node_list(nodelist, first):
    assert dist.first_node(nodelist) == first


def test_launch_ranks_read_slurm_only_without_torchrun(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert dist.launch_ranks() == (5, 1, 8)
    monkeypatch.setenv("SLURM_NODELIST", "gpu[12-13]")
    monkeypatch.setenv("MASTER_PORT", "1234")
    assert dist.slurm_rendezvous() == "tcp://gpu12:1234"
    monkeypatch.setenv("RANK", "0")  # srun running torchrun: torchrun's variables win
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.launch_ranks() == (0, 0, 2)


def test_two_slurm_tasks_train_together_like_torchrun(voc_root, tmp_path, free_port):
    """Two processes given only srun's variables rendezvous on the node list's first host and train the weights of
    one process with the same global batch, which test_train_e2e shows a 2-process torchrun run trains."""
    import subprocess
    import sys

    common = ["iterations=2", "checkpoint_interval=0", "model.dropout=0.0", "norm_eval=true"]
    one = str(tmp_path / "one")
    run(voc_root, one, *common)
    slurm = str(tmp_path / "slurm")
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.[1-2]", MASTER_PORT=str(free_port))
    processes = [subprocess.Popen([sys.executable, "run.py", "demo", *overrides(voc_root, slurm, *common)],
                                  cwd=os.path.dirname(CONFIGS), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)})
                 for rank in (0, 1)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert '"world_size": 2' in outputs[0][0] and outputs[1][0] == ""  # rank 1 prints nothing
    assert_same_weights(final_weights(one), final_weights(slurm), atol=1e-6)


# ------------------------------------------------------------------ class weights and OHEM

def random_case(n, c, h, w, ignore_share, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=generator) * 3
    label = torch.randint(0, c, (n, h, w), generator=generator)
    label[torch.rand(n, h, w, generator=generator) < ignore_share] = 255
    weight = torch.rand(c, generator=generator) * 3
    return logits, label, weight


CASES = dict(n=st.integers(1, 3), c=st.integers(2, 5), h=st.integers(1, 6), w=st.integers(1, 6),
             ignore_share=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 10_000))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(**CASES)
def test_class_weights_match_weighted_cross_entropy_over_all_pixels(n, c, h, w, ignore_share, seed):
    logits, label, weight = random_case(n, c, h, w, ignore_share, seed)
    summed = F.cross_entropy(logits, label, weight=weight, reduction="sum", ignore_index=255)  # Σ w[y]·ce
    got = losses.pixel_cross_entropy(logits, label, "all", class_weight=weight)
    assert math.isclose(float(got), float(summed) / label.numel(), rel_tol=1e-5, abs_tol=1e-6)
    valid = max(int((label != 255).sum()), 1)
    got = losses.pixel_cross_entropy(logits, label, "valid", class_weight=weight)
    assert math.isclose(float(got), float(summed) / valid, rel_tol=1e-5, abs_tol=1e-6)


def brute_force_ohem(logits, label, thresh, min_kept):
    """mmseg's OHEMPixelSampler, pixel by pixel: keep valid pixels whose true-class probability is below
    max(thresh, the sorted valid probabilities at min(min_kept·N, count − 1))."""
    prob = F.softmax(logits.float(), dim=1)
    pixels = [(i, y, x) for i in range(label.shape[0]) for y in range(label.shape[1]) for x in range(label.shape[2])
              if label[i, y, x] != 255]
    probs = sorted(float(prob[i, label[i, y, x], y, x]) for i, y, x in pixels)
    threshold = max(probs[min(min_kept * label.shape[0], len(probs) - 1)], thresh) if probs else thresh
    kept = torch.zeros(label.shape)
    for i, y, x in pixels:
        kept[i, y, x] = float(prob[i, label[i, y, x], y, x]) < threshold
    return kept


@settings(max_examples=30, deadline=None, derandomize=True)
@given(**CASES, thresh=st.sampled_from([0.05, 0.3, 0.7, 1.0]), min_kept=st.integers(2, 40))
def test_ohem_keeps_what_a_brute_force_sampler_keeps(n, c, h, w, ignore_share, seed, thresh, min_kept):
    logits, label, weight = random_case(n, c, h, w, ignore_share, seed)
    kept = losses.ohem_kept(logits, label, thresh, min_kept)
    assert torch.equal(kept, brute_force_ohem(logits, label, thresh, min_kept))
    got = losses.pspnet_losses({"seg": logits}, label, "all", 0.4, class_weight=weight.tolist(), ohem=True,
                               ohem_thresh=thresh, ohem_min_kept=min_kept)["loss_seg"]
    per_pixel = F.cross_entropy(logits, label, weight=weight, reduction="none", ignore_index=255)
    assert math.isclose(float(got), float((per_pixel * kept).sum()) / label.numel(), rel_tol=1e-5, abs_tol=1e-6)


def test_enet_weights_by_hand_and_the_rule_in_a_run(voc_root, tmp_path, capsys):
    assert losses.enet_class_weight([98, 2, 0]) == pytest.approx([1 / math.log(2.0), 1 / math.log(1.04),
                                                                  1 / math.log(1.02)])
    cfg = load(*overrides(voc_root, str(tmp_path), "loss.class_weight_rule=enet"))
    loss_fn = tasks.loss_function(cfg)
    assert "loss.class_weight = [" in capsys.readouterr().out and len(loss_fn.keywords["class_weight"]) == 5
    assert "class_weight_rule" not in loss_fn.keywords


def test_keep_last_and_resume_agree_on_which_checkpoints_are_this_runs(tmp_path):
    """One rule (checkpoint.why_not_this_run) for keep_last and resume: every run_identity key must be equal; a key
    the identity does not name (a newer seg's model option) does not make a checkpoint foreign, a differing one does."""
    cfg = load(f"output_dir={tmp_path}")
    extra, other = copy.deepcopy(cfg), copy.deepcopy(cfg)
    extra["model"]["not_an_identity_key"] = 1
    other["data"]["train_splits"] = ["someone_else"]
    identity = checkpoint.run_identity(cfg)
    for iteration, stored in ((2, cfg), (4, extra), (6, other)):
        checkpoint.save_atomic(seg_state(stored, iteration), tmp_path / f"iter_{iteration:07d}.pth")
    reasons = [checkpoint.why_not_this_run(path, checkpoint.stored_config(path), identity)
               for path in checkpoint.checkpoints_newest_first(tmp_path)]
    assert reasons[1:] == [None, None] and "its data.train_splits is ['someone_else']" in reasons[0]
    with pytest.raises(UserError, match="iter_0000006.pth is not a checkpoint of this run: its data.train_splits"):
        checkpoint.latest_loadable_checkpoint(tmp_path, identity=identity)
    (tmp_path / "iter_0000006.pth").rename(tmp_path / "elsewhere.pth")
    assert checkpoint.latest_loadable_checkpoint(tmp_path, identity=identity)[0].name == "iter_0000004.pth"
    checkpoint.keep_newest(tmp_path, cfg, 1, log=lambda *a, **k: None)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["elsewhere.pth", "iter_0000004.pth"]
