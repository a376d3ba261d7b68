"""The toy world: deterministic renders, captions that match labels, the tokenizer's SD conventions."""

import random

import pytest
import torch

from lods.cameras import orbit, sample_cameras
from lods.priors.toy.text import MAX_LENGTH, build_text_encoder, build_tokenizer
from lods.priors.toy.world import (
    COLOR_NAMES,
    COMBOS,
    HELD_OUT,
    SHAPES,
    Scene,
    WorldObject,
    all_captions,
    parse_caption,
    random_scene,
    render_captions,
    render_scenes,
)


def test_renderer_is_deterministic_and_in_range():
    a = render_captions(["a red cube", "a blue sphere on grass", "a green cone and a pink torus"], seed=3)
    b = render_captions(["a red cube", "a blue sphere on grass", "a green cone and a pink torus"], seed=3)
    assert torch.equal(a.rgb, b.rgb)
    assert a.rgb.shape == (3, 3, 64, 64)
    assert a.rgb.min() >= 0 and a.rgb.max() <= 1
    c = render_captions(["a red cube"], seed=4)
    assert not torch.equal(a.rgb[:1], c.rgb)


def test_object_is_centred_and_background_white():
    cams = orbit(torch.tensor([30.0]), torch.tensor([20.0]), torch.tensor([2.8]), torch.tensor([42.0]), 64, 64)
    r = render_scenes([Scene((WorldObject("red", "sphere"),))], cams, random.Random(0))
    mask = r.object_mask[0]
    assert mask[32, 32] and not mask[0, 0] and not mask[63, 63]
    assert torch.allclose(r.rgb[0, :, 0, 0], torch.ones(3))
    ys, xs = mask.nonzero(as_tuple=True)
    assert abs(ys.float().mean() - 31.5) < 2 and abs(xs.float().mean() - 31.5) < 2
    # The sphere's pixels are reddish: red channel dominates on average.
    mean = r.rgb[0][:, mask].mean(1)
    assert mean[0] > mean[1] + 0.15 and mean[0] > mean[2] + 0.15


def test_colours_differ_and_are_not_pure_primaries():
    caps = [f"a {c} sphere" if c[0] not in "aeiou" else f"an {c} sphere" for c in COLOR_NAMES]
    cams = orbit(torch.zeros(8), torch.full((8,), 20.0), torch.full((8,), 2.8), torch.full((8,), 42.0), 64, 64)
    r = render_scenes([parse_caption(c) for c in caps], cams, random.Random(0))
    means = torch.stack([r.rgb[i][:, r.object_mask[i]].mean(1) for i in range(8)])
    dists = torch.cdist(means, means) + torch.eye(8)
    assert dists.min() > 0.08
    assert means.max() < 0.95 and means.min() > 0.05


def test_ground_and_two_objects_render():
    front = orbit(torch.zeros(2), torch.full((2,), 15.0), torch.full((2,), 2.8), torch.full((2,), 42.0), 64, 64)
    r = render_captions(["a cyan cylinder on checkered floor", "a yellow capsule and a purple cube"], cameras=front)
    assert (r.alpha[0] > 0.5).sum() > (r.object_mask[0]).sum()  # the floor is visible beyond the object
    from scipy import ndimage

    _, n = ndimage.label(r.object_mask[1].numpy())
    assert n >= 2


def test_captions_round_trip_and_labels():
    rng = random.Random(0)
    for _ in range(200):
        s = random_scene(rng)
        assert parse_caption(s.caption) == s
        assert not s.held_out
        if s.category == "multi":
            assert s.objects[0].color != s.objects[1].color and s.objects[0].shape != s.objects[1].shape
    assert parse_caption("An Orange Torus, front view").combos == (("orange", "torus"),)
    with pytest.raises(ValueError):
        parse_caption("a hamburger")
    assert len(COMBOS) == len(COLOR_NAMES) * len(SHAPES) == 48
    held = all_captions("single", held_out=True)
    assert len(held) == len(HELD_OUT) and all(parse_caption(c).held_out for c in held)
    assert "a red cube" in all_captions("single", held_out=False)


def test_tokenizer_round_trip_and_null_prompt():
    tok = build_tokenizer()
    ids = tok(
        ["a red cube on checkered floor", ""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt"
    ).input_ids
    assert ids.shape == (2, MAX_LENGTH)
    assert tok.decode(ids[0], skip_special_tokens=True) == "a red cube on checkered floor"
    assert ids[1, 0] == tok.bos_token_id and ids[1, 1] == tok.eos_token_id
    assert (ids[1, 2:] == tok.pad_token_id).all()
    assert tok.unk_token_id not in ids[0].tolist()
    enc = build_text_encoder(len(tok))
    with torch.no_grad():
        emb = enc(ids).last_hidden_state
    assert emb.shape == (2, MAX_LENGTH, enc.config.hidden_size)


def test_tokenizer_saves_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again("a pink torus").input_ids == tok("a pink torus").input_ids


def test_cameras_look_at_origin():
    cams = sample_cameras(16, 32, generator=torch.Generator().manual_seed(0))
    origin = torch.tensor([0.0, 0.0, 0.0, 1.0])
    cam_pts = cams.viewmat @ origin
    assert torch.allclose(cam_pts[:, 0], torch.zeros(16), atol=1e-5)
    assert torch.allclose(cam_pts[:, 1], torch.zeros(16), atol=1e-5)
    assert (cam_pts[:, 2] > 2).all()
