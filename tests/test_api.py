"""``from lods import ...``: the Python entry points take the CLI's config keys and reject bad input in one line."""

import subprocess
import sys

import pytest

import lods
from lods.errors import UserError


def test_import_lods_alone_does_not_import_torch():
    code = "import sys, lods; assert 'torch' not in sys.modules; print(sorted(lods.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("generate", "edit", "load_prior", "estimator", "RunConfig", "METHODS", "DiffusersPrior", "LodsEmbed"):
        assert name in out
    assert lods.LodsEmbed is lods.METHODS["lods-embed"] and lods.DiffusersPrior.__name__ == "DiffusersPrior"
    with pytest.raises(AttributeError):
        lods.no_such_thing  # noqa: B018


def test_run_config_merges_like_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: sds\ncfg: 7.5\nbatch: 3\n")
    run = lods.run_config(path, cfg=30.0, prompt="a red cube", gaussians={"num_points": 100})
    assert (run.method, run.cfg, run.batch) == ("sds", 30.0, 3)  # keywords win over the file
    assert run.steps == 600  # the gs preset fills what is unset
    assert run.gaussians.num_points == 100 and run.gaussians.max_points is None  # None: the prior's own cap
    assert lods.run_config(prompt="a cube", backbone="image").cfg == 100.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": " "}, "the prompt is empty"),
        ({"prompt": "a cube", "method": "magic"}, "unknown method"),
        ({"prompt": "a cube", "colour": "red"}, "unknown config key colour"),
        ({"prompt": "a cube", "cfg": 0.5}, "CFG weight"),
    ],
)
def test_bad_input_is_one_user_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        lods.run_config(**kwargs)


def test_generate_rejects_a_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        lods.generate("a red cube", config=tmp_path / "nope.yaml")


def test_estimator_of_an_unknown_method_is_a_user_error(tiny_sd_dir):
    prior = lods.load_prior(str(tiny_sd_dir), "cpu")
    assert lods.load_prior(str(tiny_sd_dir), "cpu") is prior  # loaded once
    assert type(lods.estimator("lods-embed", prior)).__name__ == "LodsEmbed"
    with pytest.raises(UserError, match="unknown method"):
        lods.estimator("magic", prior)
