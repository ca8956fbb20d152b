"""Several processes on the CPU (gloo) under torchrun: `-m maskrt train` runs, checkpoints and
resumes; 2 ranks x batch 1 take the same SGD step as one process on the same two images; a
rank that dies ends the job in bounded time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maskrt.train.coco import CocoDataset
from maskrt.train.synthetic import write_dataset
from maskrt.train.trainer import (STATE_JSON, WEIGHTS, BatchReader, Cursor, TrainConfig, make_model, to_model_inputs,
                                  _seed_everything)

from tiny_model import TINY  # tests/tiny_model.py
WORKER = Path(__file__).with_name("ddp_worker.py")
pytestmark = pytest.mark.slow


def torchrun(args: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """torchrun (as `python -m torch.distributed.run`) on this machine: a standalone rendezvous
    on a free local port, so tests may run beside each other."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    environment.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *args],
                          capture_output=True, text=True, timeout=timeout, env=environment)


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp2")
    write_dataset(root, train=2, val=1, size=96, seed=5)
    return root


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp4")
    write_dataset(root, train=4, val=1, size=64, seed=6)
    return root


def test_torchrun_two_cpu_ranks_train_checkpoint_and_resume(four_images, tmp_path):
    from maskrt.model import load_model

    out = tmp_path / "run"
    # The CLI end to end (the edge preset, 64 px images): 4 images, 2 ranks x batch 1 -> 2 steps per epoch.
    # Half an epoch (1 step), then --resume to one epoch (step 2).
    base = ["--nproc-per-node", "2", "-m", "maskrt", "train", "--device", "cpu", "--data", str(four_images),
            "--out", str(out), "--batch-size", "1", "--no-progress", "--checkpoint-every", "1", "--precision", "fp32",
            "--workers", "0"]
    first = torchrun([*base, "--epochs", "0.5"], timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 process(es) x 1 images = effective batch 2" in first.stderr
    assert first.stderr.count("training on cpu") == 1  # rank 0 alone speaks
    state = json.loads((out / STATE_JSON).read_text())
    assert state["step"] == 1 and state["world_size"] == 2 and state["epoch"] == 0
    assert state["ranks"] == [[0, 1], [0, 1]]  # each rank read the first item of its shard of two
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    weights = load_model(out / WEIGHTS, device="cpu")
    assert weights.class_names[0] == "__background__"
    before = {k: v.clone() for k, v in weights.state_dict().items()}

    resumed = torchrun([*base, "--epochs", "1", "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((out / STATE_JSON).read_text())
    assert state["step"] == 2 and state["epoch"] == 1 and state["world_size"] == 2
    assert state["ranks"] == [[1, 0], [1, 0]]
    assert resumed.stdout.count("trained 2 steps") == 1  # rank 0 alone reports
    after = load_model(out / WEIGHTS).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]  # rank 0 alone writes metrics (every 10th step, and the first)

    # Resuming with another number of processes is refused: each rank continues its own shard.
    from maskrt.cli import main

    assert main(["train", "--data", str(four_images), "--out", str(out), "--resume", "--epochs", "2",
                 "--device", "cpu", "--no-progress"]) == 2


def test_two_ranks_of_batch_1_take_the_same_sgd_step_as_one_process_on_both_images(two_images, tmp_path):
    """The formulation compared: Mask R-CNN's losses are means over the RoIs / anchors sampled
    in a batch, so a batch of two is not in general the mean of two batches of one (the mask
    loss averages over the positives of both images). DDP averages the ranks' gradients,
    i.e. it minimises the mean of the per-rank losses. The single-process reference therefore
    takes the loss as the mean of the two per-image losses (each image's samplers seeded as
    its rank seeds them), for which the two are equal by linearity of the gradient; then the
    same gradient clipping and SGD step."""
    fields = dict(data=str(two_images), preset="edge", epochs=1, batch_size=1, lr=0.05, optimizer="sgd",
                  momentum=0.9, warmup_fraction=0.0, augment=False, seed=3, progress=False, device="cpu",
                  precision="fp32", workers=0, checkpoint_every=1000, model_overrides=dict(TINY), log_every=1)
    config_file = tmp_path / "ddp.json"
    config_file.write_text(json.dumps({**fields, "out": str(tmp_path / "ddp")}))
    run = torchrun(["--nproc-per-node", "2", str(WORKER), str(config_file)], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp_state = json.loads((tmp_path / "ddp" / STATE_JSON).read_text())
    assert ddp_state["step"] == 1 and ddp_state["world_size"] == 2
    from maskrt.model import load_model

    ddp = load_model(tmp_path / "ddp" / WEIGHTS).state_dict()

    # One process, batch 2 on the same two images {a, b}, in the ranks' order.
    torch.set_num_threads(1)
    config = TrainConfig(**{**fields, "batch_size": 2, "out": str(tmp_path / "single")})
    dataset = CocoDataset(two_images, "train", drop_empty=True)
    _seed_everything(config.seed)
    model = make_model(config, dataset).train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batch = BatchReader(dataset, config, Cursor()).next_batch()
    per_image = []
    for rank, sample in enumerate(batch):
        image, target = to_model_inputs(sample)
        torch.manual_seed(config.seed * 1_000_003 + 0 * 2 + rank)  # the trainer's rule at step 0, world size 2
        per_image.append(sum(model([image], [target]).values()))
    loss = (per_image[0] + per_image[1]) / 2
    optimizer = torch.optim.SGD(
        [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": config.weight_decay},
         {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), config.clip_grad_norm)
    optimizer.step()
    single = model.state_dict()

    moved = max(float((single[k] - initial[k]).abs().max()) for k in single if single[k].is_floating_point())
    assert moved > 1e-3  # the step is large against the tolerance: the comparison can fail
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5, msg=key)


def test_a_rank_that_dies_ends_the_whole_job_in_bounded_time(four_images, tmp_path):
    # MASKRT_TEST_EXIT_RANK / _STEP: the trainer's test-only fault hook (train/distributed.py):
    # rank 1 exits with status 17 before step 1, while rank 0 waits for it in the gradient
    # all-reduce. torchrun sees the failure and ends rank 0: the job fails, and soon.
    config_file = tmp_path / "die.json"
    config_file.write_text(json.dumps(dict(data=str(four_images), out=str(tmp_path / "die"), epochs=10, batch_size=1,
                                           lr=0.01, progress=False, device="cpu", precision="fp32", workers=0,
                                           model_overrides=dict(TINY), dist_timeout_s=60)))
    start = time.monotonic()
    run = torchrun(["--nproc-per-node", "2", str(WORKER), str(config_file)], timeout=240,
                   env={"MASKRT_TEST_EXIT_RANK": "1", "MASKRT_TEST_EXIT_STEP": "1"})
    seconds = time.monotonic() - start
    assert run.returncode != 0
    assert "exitcode" in run.stderr and "17" in run.stderr, run.stderr[-3000:]
    assert seconds < 120, seconds
    state = json.loads((tmp_path / "die" / STATE_JSON).read_text()) if (tmp_path / "die" / STATE_JSON).exists() else None
    assert state is None or state["step"] <= 1


def test_with_minutes_every_rank_stops_at_the_same_step(four_images, tmp_path):
    # Rank 0's clock is broadcast each step: both ranks see the same budget fraction and end
    # together (without it, a rank whose clock ran ahead would leave its peer waiting in the
    # next all-reduce).
    config_file = tmp_path / "timed.json"
    config_file.write_text(json.dumps(dict(data=str(four_images), out=str(tmp_path / "timed"), minutes=0.1,
                                           batch_size=1, lr=0.01, progress=False, device="cpu", precision="fp32",
                                           workers=0, model_overrides=dict(TINY), warmup_fraction=0.0)))
    run = torchrun(["--nproc-per-node", "2", str(WORKER), str(config_file)], timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = [json.loads(line)["rank_summary"]["step"] for line in run.stdout.splitlines() if "rank_summary" in line]
    assert len(steps) == 2 and steps[0] == steps[1] >= 1, run.stdout
    assert json.loads((tmp_path / "timed" / STATE_JSON).read_text())["step"] == steps[0]
