"""The shipped toy prior and judge: offline loading, reproducible sampling, the judge on known renders."""

import pytest
import torch

from lods.__main__ import main
from lods.priors.diffusers_prior import DiffusersPrior
from lods.priors.toy.judge import JUDGE_PATH, Judge, _augment, judge_images, load_judge, train_judge
from lods.priors.toy.sample import load_pipeline, sample
from lods.priors.toy.train import WEIGHTS_DIR
from lods.priors.toy.world import render_captions


def test_shipped_weights_are_small_safetensors():
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} >= {"unet", "vae", "text_encoder"} and JUDGE_PATH in weights
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20


def test_loads_offline_as_a_prior():
    prior = DiffusersPrior.from_pretrained("toy")
    assert prior.image_size == 64 and prior.latent_shape == (4, 16, 16)
    assert prior.dtype == torch.float32
    null = prior.encode_text([""])
    again = prior.encode_text([""])
    assert torch.equal(null, again) and null.shape[0] == 1
    z = prior.encode_images(torch.ones(1, 3, 64, 64))
    assert z.shape == (1, 4, 16, 16)
    back = prior.decode_latents(z)
    assert (back - 1).abs().mean() < 0.1  # a white image survives the autoencoder


def test_seeded_sampling_is_reproducible():
    pipe = load_pipeline()
    a = sample(pipe, ["a red cube", "a blue sphere"], seed=3, steps=8, cfg=5.0)
    b = sample(pipe, ["a red cube", "a blue sphere"], seed=3, steps=8, cfg=5.0)
    c = sample(pipe, ["a red cube"], seed=4, steps=8, cfg=5.0)
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)
    assert not torch.equal(a[:1], c)


def test_judge_names_known_renders():
    # Single objects and objects on a ground (two-object scenes are the hard case, measured by the CLI).
    caps = ["a red cube", "a blue sphere", "a green cone on grass", "a yellow torus", "a purple cylinder",
            "an orange capsule on checkered floor", "a cyan cylinder"]
    r = judge_images(load_judge(), render_captions(caps, seed=11).rgb, caps)
    assert r["objects_right"].all()
    wrong = judge_images(load_judge(), render_captions(["a red cube"], seed=11).rgb, ["a blue sphere"])
    assert not wrong["objects_right"].any()


def test_judge_augmentation_keeps_images_in_range():
    x = render_captions(["a red cube and a blue sphere"], seed=2).rgb.repeat(4, 1, 1, 1)
    y = _augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() < 0.2  # mirrored, shifted and zoomed a little, not scrambled


def test_judge_training_resumes_from_its_work_dir(tmp_path):
    caps = ["a red cube", "a blue sphere on grass", "a green cone and a pink torus"]
    r = render_captions(caps, seed=5)
    data = {"rgb": (r.rgb * 255).round().to(torch.uint8), "captions": caps}
    out = tmp_path / "judge.safetensors"
    train_judge(data, out=out, minutes=0.01, batch=4, fresh_per_step=1, work_dir=tmp_path / "work", init=Judge(8))
    state = torch.load(tmp_path / "work" / "judge_ckpt.pt")
    assert out.exists() and state["step"] >= 1 and list((tmp_path / "work").glob("fresh_*.pt"))
    train_judge(data, out=out, minutes=0.02, batch=4, fresh_per_step=1, work_dir=tmp_path / "work", init=Judge(8))
    assert torch.load(tmp_path / "work" / "judge_ckpt.pt")["step"] > state["step"]


@pytest.mark.slow
def test_sample_cli_writes_files(tmp_path):
    code = main(["toy-prior", "sample", "--prompt", "a red cube", "--n", "2", "--steps", "5", "--out", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "sample_00.png").exists() and (tmp_path / "sample_01.png").exists()
    assert (tmp_path / "grid.png").exists()


@pytest.mark.slow
def test_latent_object_masks_mark_the_patches_that_are_not_white():
    from lods.priors.toy.train import latent_object_masks

    rgb = torch.full((2, 3, 64, 64), 255, dtype=torch.uint8)
    rgb[0, :, 10:14, 20:22] = torch.tensor([200, 50, 50], dtype=torch.uint8).view(3, 1, 1)
    rgb[1, :, 40, 40] = 245  # off-white: background, not an object
    masks = latent_object_masks(rgb, 4, chunk=1)
    assert masks.shape == (2, 1, 16, 16)
    assert masks[0, 0].nonzero().tolist() == [[2, 5], [3, 5]]
    assert not masks[1].any()


def test_unet_learning_rate_warms_up_decays_and_can_start_a_new_cycle():
    from lods.priors.toy.train import ToyTrainConfig, unet_lr_at

    one = ToyTrainConfig(unet_minutes=100, unet_lr=4e-4)
    assert unet_lr_at(one, 0, 0.0) == 0.0
    assert unet_lr_at(one, 250, 10.0) == pytest.approx(2e-4, rel=1e-3)  # half-way through the warm-up
    assert unet_lr_at(one, 5000, 50 * 60) == pytest.approx(4e-4 * 0.55)  # the cosine's middle
    assert unet_lr_at(one, 9000, 100 * 60) == pytest.approx(4e-5)  # a tenth at the budget
    # A second cycle from minute 100 to 200: the first one's curve before it, a new warm-up and cosine after.
    two = ToyTrainConfig(unet_minutes=200, unet_lr=2e-4, unet_cycle_from=100)
    assert unet_lr_at(two, 9000, 100 * 60) == 0.0
    assert unet_lr_at(two, 9100, 100 * 60 + 150) == pytest.approx(1e-4, rel=1e-2)
    assert unet_lr_at(two, 12000, 150 * 60) == pytest.approx(2e-4 * 0.55)
    assert unet_lr_at(two, 15000, 200 * 60) == pytest.approx(2e-5)
    assert unet_lr_at(two, 5000, 50 * 60) == pytest.approx(2e-4 * 0.55)  # the first cycle ends at minute 100
    lrs = [unet_lr_at(two, 9000 + s, 100 * 60 + 300 + s) for s in range(0, 5700, 100)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_train_cli_rejects_a_bad_learning_rate_or_cycle(tmp_path, capsys):
    assert main(["toy-prior", "train", "--cache", str(tmp_path), "--unet-lr", "nan"]) != 0
    assert "--unet-lr must be a positive number" in capsys.readouterr().err
    assert main(["toy-prior", "train", "--cache", str(tmp_path), "--unet-minutes", "10",
                 "--unet-cycle-from", "10"]) != 0
    assert "--unet-cycle-from (10) must be" in capsys.readouterr().err


def test_prior_training_runs_every_stage_resumes_and_exports(tmp_path):
    from lods.priors.toy.data import render_cache
    from lods.priors.toy.train import ToyTrainConfig, train

    render_cache(tmp_path / "world", n=300, chunk=300, seed=3)
    cfg = ToyTrainConfig(cache=str(tmp_path / "world"), work=str(tmp_path / "work"), out=str(tmp_path / "out"),
                         vae_minutes=0.03, vae_batch=4, decoder_minutes=0.03, decoder_batch=4, unet_minutes=0.03,
                         unet_batch=4, unet_multi_fraction=0.5, unet_object_weight=3.0,
                         checkpoint_every_s=0.0)
    out = train(cfg)
    work = tmp_path / "work"
    first = {name: torch.load(work / f"{name}.pt")["elapsed"] for name in ("vae", "decoder", "unet")}
    assert all(v >= 0.03 * 60 for v in first.values())
    pipe = load_pipeline(out)
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels
    # A rerun with the same budgets finds every stage done; a longer one continues each from its checkpoint.
    train(cfg)
    assert {name: torch.load(work / f"{name}.pt")["elapsed"] for name in first} == first
    steps = torch.load(work / "unet.pt")["step"]
    train(ToyTrainConfig(**{**cfg.__dict__, "vae_minutes": 0.05, "decoder_minutes": 0.05, "unet_minutes": 0.05}))
    for name, before in first.items():
        assert torch.load(work / f"{name}.pt")["elapsed"] >= max(before, 0.05 * 60), name
    assert torch.load(work / "unet.pt")["step"] > steps
