"""ZeroGPU: a run trained in slices (each a ``spaces.GPU`` call whose arguments and result cross a process
boundary, emulated here by pickling) reaches the same parameters as a continuous run with the same seed."""

import pickle

import pytest
import torch

from lods import checkpoint
from lods.config import RunConfig
from lods.priors.diffusers_prior import DiffusersPrior
from lods.trainer import Trainer
from lods.zerogpu import gpu, on_zerogpu, run_sliced, train_slice

SMALL_GS = {"num_points": 200, "densify_from": 2, "densify_every": 3, "densify_until": 100, "grad_threshold": 1e-9,
            "max_points": 800}


@pytest.fixture(scope="module")
def tiny_prior(tiny_sd_dir):
    return DiffusersPrior.from_pretrained(str(tiny_sd_dir))


def config(**kw) -> RunConfig:
    base = dict(prompt="a red cube", prior="tiny", backbone="gs", method="lods-embed", cfg=100.0, steps=9, seed=3,
                device="cpu", batch=1, learned_lr=1e-3, snapshot_every=2, checkpoint_every=0, gaussians=SMALL_GS)
    return RunConfig(**{**base, **kw})


def forked(tiny_prior, calls: list, during=None):
    """A slice as ZeroGPU runs it: arguments and result pickled (another process), under ``spaces.GPU``."""

    @gpu(duration=60)
    def call(config, state, seconds, max_steps):
        calls.append(state["step"])
        if during:
            during(len(calls))
        config, state = pickle.loads(pickle.dumps((config, state)))
        return pickle.loads(pickle.dumps(train_slice(config, state, seconds, max_steps, prior=tiny_prior)))

    return call


def test_sliced_run_reaches_the_parameters_of_a_continuous_run(tiny_prior, tmp_path):
    continuous = Trainer(config(), prior=tiny_prior)
    assert continuous.run() == "done"

    host = Trainer(config(), prior=tiny_prior, out_dir=tmp_path)
    snapshots = []
    host.subscribe(lambda e: snapshots.append(e.snapshot) if e.kind == "snapshot" else None)
    calls: list[int] = []
    status = run_sliced(host, device="cpu", seconds=600, max_steps=2, call=forked(tiny_prior, calls))
    assert status == "done" and host.step == 9
    assert calls == [0, 2, 4, 6, 8]  # five slices of at most 2 steps
    assert host.scene.num_gaussians == continuous.scene.num_gaussians > 200  # densified inside slices
    for (name, a), (_, b) in zip(continuous.scene.state_dict().items(), host.scene.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(continuous.estimator.alpha, host.estimator.alpha)
    assert [h["loss"] for h in host.history] == [h["loss"] for h in continuous.history]
    assert [s.step for s in snapshots][:4] == [2, 4, 6, 8]  # previews between slices
    assert checkpoint.load(tmp_path)["step"] == 9
    continuous.close()
    host.close()


def test_knobs_pause_and_stop_between_slices(tiny_prior):
    host = Trainer(config(steps=40), prior=tiny_prior)

    def during(n):
        if n == 1:
            host.set_knobs(cfg=20.0)  # turned while the first slice trains: the next slices use it
        if n == 3:
            host.stop()

    calls: list[int] = []
    status = run_sliced(host, device="cpu", seconds=600, max_steps=3, call=forked(tiny_prior, calls, during))
    assert status == "stopped" and calls == [0, 3, 6] and host.step == 9
    cfgs = [h["cfg_knob"] for h in host.history]
    assert cfgs[:3] == [100.0] * 3 and cfgs[3:] == [20.0] * 6
    assert host.knobs.cfg == 20.0 and [c["new"] for c in host.knob_changes] == [20.0]
    host.close()


def test_zerogpu_is_recognised_by_the_spaces_variable():
    assert on_zerogpu({"SPACES_ZERO_GPU": "true"})
    assert not on_zerogpu({}) and not on_zerogpu({"SPACES_ZERO_GPU": "false"})
    assert gpu(30)(len) is len  # outside a ZeroGPU Space the decorator hands the function back


def test_the_app_trains_in_slices_on_a_zerogpu_space(tiny_prior, monkeypatch):
    from app.jobs import JobManager
    from lods import zerogpu

    slices = []

    def slice_here(config, state, seconds, max_steps):
        slices.append((config["device"], state["step"]))
        config, state = pickle.loads(pickle.dumps((config, state)))
        return pickle.loads(pickle.dumps(train_slice(config, state, seconds, max_steps, prior=tiny_prior)))

    monkeypatch.setattr(zerogpu, "on_zerogpu", lambda env=None: True)
    monkeypatch.setattr(zerogpu, "gpu_train_slice", slice_here)
    monkeypatch.setattr(zerogpu, "SLICE_SECONDS", 0.0)  # one step per slice
    snapshots = []
    manager = JobManager(prior_factory=lambda name, device: tiny_prior, listeners=[snapshots.append],
                         join_timeout=30)
    try:
        # "cpu:0" stands for the GPU: the device the slices get (the host's trainer is on "cpu")
        run = config(steps=12, backbone="image", method="sds", prior="toy", device="cpu:0")
        job = manager.start_or_queue(run, owner="a")
        job.thread.join(60)
        assert job.phase == "done", job.message
        assert job.trainer.device.type == "cpu" and job.trainer.step == 12  # the host copy, on the CPU
        assert slices == [("cpu:0", step) for step in range(12)]  # the worker's device; each goes on from the last
        assert snapshots and snapshots[-1].step == 12
        assert {p.name for p in job.files} >= {"image.png", "config.yaml"}
        import yaml

        assert yaml.safe_load((job.out_dir / "config.yaml").read_text())["device"] == "cpu:0"  # the slices' device
    finally:
        manager.shutdown()
