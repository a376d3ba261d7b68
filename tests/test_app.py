"""The Gradio app: its API driven with gradio_client, its job manager, input rules and plot data.

Every run uses the tiny random SD-format prior of ``conftest.tiny_sd_dir`` (injected through the
job manager's prior factory) on the 2D image backbone, so a run takes a fraction of a second per
step on one CPU thread.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import time
import types
import urllib.request
from pathlib import Path

import pytest
import torch

from app.config import ModelPolicy, build_run_config, restricted_server
from app.jobs import JobManager, NotOwner
from app.plots import PLOTS, mark_names, metric_frame, plot_colors, preview_grid
from app.studio_tab import NO_WORLD_SCENE
from app.ui import AppSettings, Studio, build_demo, launch_local, md_text, status_text
from lods.errors import UserError
from lods.priors.base import PriorError

OVERRIDES = {"resolution": 16, "batch": 1, "snapshot_every": 2, "preview_views": 2,
             "gaussians": {"num_points": 64}}
OFFLINE = "cannot get 'stabilityai/stable-diffusion-2-1-base' from the Hugging Face Hub (offline)"
GOOD = dict(prompt="a red cube", negative_prompt="", prior="toy", custom_model="", backbone="image",
            method="lods-embed", cfg=50.0, lr_scale=1.0, learned_lr=1e-4, steps=5000, seed=0)


def wait_for(condition, timeout: float = 20.0, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_prior(tiny_sd_dir, one_thread):
    from lods.priors.diffusers_prior import DiffusersPrior

    return DiffusersPrior.from_pretrained(str(tiny_sd_dir))


@pytest.fixture(scope="module")
def prior_factory(tiny_prior):
    calls = []

    def load(name: str, device: torch.device):
        calls.append(name)
        if name == "sd21":
            raise PriorError(OFFLINE)
        return tiny_prior

    load.calls = calls
    return load


@pytest.fixture
def manager(prior_factory):
    jobs = JobManager(prior_factory=prior_factory, join_timeout=20)
    yield jobs
    jobs.shutdown()


@contextlib.contextmanager
def serve(prior_factory, **settings):
    """The app on a free loopback port, as a public server would show it (allow-list only)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        mp.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")  # notice a closed tab quickly
        jobs = JobManager(prior_factory=prior_factory, join_timeout=20)
        settings = AppSettings(policy=ModelPolicy(allowed=("toy", "sd21"), custom_ids=False),
                               run_overrides=OVERRIDES, **{"unload_grace_s": 0, **settings})
        demo = build_demo(jobs, settings)
        url = launch_local(demo)
        try:
            yield url, jobs
        finally:
            jobs.shutdown()
            demo.close()


@pytest.fixture(scope="module")
def server(prior_factory):
    with serve(prior_factory) as served:
        yield served


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def start(c, **changes) -> str:
    values = {**GOOD, **changes}
    return c.predict(*values.values(), api_name="/start")


def attempt(fn, *args, **kwargs) -> str:
    """The notice an API call returns, or the message of the error Gradio itself raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # gradio_client raises AppError for errors raised by components
        return f"error: {err}"


def plot_column(plot: dict, column: str) -> set:
    value = plot.get("value", plot)
    return {row[value["columns"].index(column)] for row in value["data"]}


# ----------------------------------------------------------------------------- the API, end to end


def test_run_live_knobs_second_session_and_stop(server):
    url, jobs = server
    a, b = client(url), client(url)
    try:
        assert "Started run" in start(a)
        job = jobs.current()
        wait_for(lambda: job.trainer is not None and job.trainer.step >= 3)

        # a second session sees the run but may not steer or stop it; its own run queues behind it
        assert "queued (position 1)" in start(b, steps=2000)
        assert "queued (position 1)" in start(b, steps=2000)  # one entry per session, replaced
        assert jobs.queue_length() == 1
        assert "your run is queued (position 1 of 1)" in b.predict(api_name="/poll")[0]
        assert "1 run queued" in a.predict(api_name="/poll")[0]
        assert "another session" in b.predict(api_name="/stop")
        assert "another session" in b.predict(20, api_name="/set_cfg")[0]
        status_b = b.predict(api_name="/poll")[0]
        assert "Running" in status_b and "read-only" in status_b

        # the owner turns the CFG weight: applied within a step, recorded, marked on the plots
        assert "set to 20" in a.predict(20, api_name="/set_cfg")[0]
        assert "set to 0.5" in a.predict(0.5, api_name="/set_lr_scale")
        step = job.trainer.step
        wait_for(lambda: (s := job.snapshot()) is not None and len(s.knob_changes) == 2 and s.step > step + 2)
        changes = job.snapshot().knob_changes
        assert [(c["knob"], c["old"], c["new"]) for c in changes] == [("cfg", 50.0, 20.0), ("lr_scale", 1.0, 0.5)]
        assert any(h["cfg"] == 20.0 for h in job.snapshot().history if h["step"] > changes[0]["step"])
        status, renders, _, *plots_and_rest = a.predict(api_name="/poll")
        plots = plots_and_rest[: len(PLOTS)]
        assert "read-only" not in status and Path(renders).is_file()
        cfg_plot = plots[[p.key for p in PLOTS].index("cfg")]
        series = plot_column(cfg_plot, "series")
        assert "Effective CFG weight" in series and len(series) == 3  # the metric and one mark per change
        assert {c for c in series if c.startswith("w 50 → 20 @")} and {c for c in series if c.startswith("scene lr")}

        # pause holds the step count; resume goes on
        assert "Paused" in str(a.predict(api_name="/pause"))
        wait_for(lambda: job.state == "paused")
        with job.trainer.scene_lock:  # the step in flight when Pause arrived has finished
            held = job.trainer.step
        assert not job.trainer._resume_event.is_set()  # the training loop blocks before its next step
        for _ in range(3):  # the page keeps polling; the run does not move
            a.predict(api_name="/poll")
        assert job.trainer.step == held
        assert "Resumed" in str(a.predict(api_name="/pause"))
        wait_for(lambda: job.trainer.step > held)

        # stop frees the job: the thread ends, the result files come from the job's own folder; the queued
        # run of the other session starts, and the first session still gets its own files
        assert "Stopping" in a.predict(api_name="/stop")
        job.thread.join(20)
        assert not job.thread.is_alive() and job.phase == "stopped"
        names = {p.name for p in job.files}
        assert {"image.png", "config.yaml", "metrics.jsonl"} <= names
        assert all(p.parent == job.out_dir for p in job.files)
        second = wait_for(lambda: (j := jobs.current()) is not job and j)
        assert second.owner == b.session_hash and second.config.steps == 2000 and jobs.queue_length() == 0
        files = a.predict(api_name="/poll")[-1]
        assert {Path(f).name for f in files} == names and job.out_dir.exists()

        # Reset by the other session stops its run and deletes the folder; the first one's kept files go
        # when that session resets or starts again
        assert "another session" in attempt(a.predict, api_name="/reset")[12]
        assert not job.out_dir.exists()
        b.predict(api_name="/reset")
        assert not second.thread.is_alive() and jobs.current() is None and not second.out_dir.exists()
    finally:
        a.close()
        b.close()


def test_bad_input_gives_one_line_and_spares_the_running_job(server):
    url, jobs = server
    a, b = client(url), client(url)
    try:
        assert "Started run" in start(a)
        job = jobs.current()
        wait_for(lambda: job.trainer is not None and job.trainer.step >= 2)
        for c in (a, b):  # the owner and a watcher
            for changes, expected in [
                ({"prompt": ""}, "prompt is empty"),
                ({"prompt": "   "}, "prompt is empty"),
                ({"prompt": "a" * 1001}, "longer than 1000"),
                ({"negative_prompt": "b" * 1001}, "longer than 1000"),
                ({"learned_lr": -1e-3}, "learning rate must be"),
                ({"learned_lr": 1e6}, "learning rate must be"),
                ({"steps": 0}, "steps must be"),
                ({"custom_model": "someone/model"}, "only loads the listed models"),
                ({"custom_model": "../../etc"}, "only loads the listed models"),
                ({"cfg": 50000}, "between 1 and 10000"),
                ({"cfg": "inf", "method": "sds"}, "diverges at an infinite CFG weight"),
                ({"lr_scale": -1}, "less than minimum"),
                ({"prior": "evil/model"}, "evil/model"),
            ]:
                message = attempt(start, c, **changes)
                assert expected in message, (changes, message)
                assert "\n" not in message and "Traceback" not in message
            assert "learning rate must be" in c.predict(1e9, api_name="/set_learned_lr")
        assert job.active and job.trainer.knobs.cfg == 50.0 and jobs.current() is job
        step = job.trainer.step
        wait_for(lambda: job.trainer.step > step)
        a.predict(api_name="/stop")
        job.thread.join(20)
        assert not job.thread.is_alive()
    finally:
        a.close()
        b.close()


def test_missing_weights_show_in_the_status_line(server, prior_factory):
    url, jobs = server
    a = client(url)
    try:
        assert "Started run" in start(a, prior="sd21")
        job = jobs.current()
        job.thread.join(20)
        assert job.phase == "failed" and job.message == OFFLINE
        status = a.predict(api_name="/poll")[0]
        assert "Failed" in status and "offline" in status and "\n" not in status.split("  \n")[0]
        assert "Started run" in start(a, steps=3)  # a failed job does not block the next one
        jobs.current().thread.join(20)
        assert jobs.current().phase == "done"
    finally:
        a.close()


def test_only_result_files_are_served(server):
    import httpx

    url, _ = server
    for path in [Path(__file__).resolve(), Path(__file__).resolve().parents[1] / "app.py", Path("/etc/passwd")]:
        response = httpx.get(f"{url}gradio_api/file={path}", timeout=10)
        assert response.status_code in (403, 404), (path, response.status_code)


def test_closing_the_tab_stops_its_run(server):
    url, jobs = server
    a, b = client(url), client(url)
    try:
        assert "Started run" in start(a)
        job = jobs.current()
        wait_for(lambda: job.trainer is not None and job.trainer.step >= 1)
        released = []
        release = jobs.release
        jobs.release = lambda owner: (released.append(owner), release(owner))
        try:
            b.close()  # a watcher leaving changes nothing
            wait_for(lambda: b.session_hash in released)  # its unload event has been handled
            assert job.active
        finally:
            jobs.release = release
        a.close()  # the heartbeat connection drops: Gradio's unload event runs for a's session
        job.thread.join(20)
        assert not job.thread.is_alive() and job.phase == "stopped" and job.files == []
    finally:
        a.close()
        b.close()


# ----------------------------------------------------------------------------- callbacks and the job manager


def test_nan_and_bad_numbers_are_refused_before_the_job(manager):
    studio = Studio(manager, AppSettings(run_overrides=OVERRIDES))
    values = dict(GOOD)
    for key, bad, expected in [("cfg", math.nan, "CFG weight"), ("cfg", 20000.0, "between 1 and"),
                               ("cfg", 0.5, "CFG weight"), ("lr_scale", math.nan, "finite"),
                               ("learned_lr", None, "must be a number"), ("seed", -1, "seed"),
                               ("steps", 10**9, "steps"), ("steps", 2.5, "whole number"),
                               ("prompt", "a\x00b", "control characters"), ("prompt", 42, "must be text"),
                               ("backbone", "voxels", "unknown backbone"), ("method", "dds", "unknown method")]:
        message = studio.start(*{**values, key: bad}.values())
        assert message.startswith("⚠️") and expected in message, (key, bad, message)
    assert manager.current() is None
    assert studio.set_cfg(math.nan)[0].startswith("⚠️") and studio.set_cfg("abc")[0].startswith("⚠️")
    assert studio.set_cfg("inf")[1:] == ("inf", 4.0)  # before a run: the box and the slider take the weight
    # the log-scale slider: released at log10 w, the weight rounded to two digits goes into the box
    assert [studio.set_cfg_log(math.log10(w) + 0.001)[1] for w in (7.5, 30, 100, 1000)] == ["7.5", "30", "100", "1000"]
    assert studio.set_cfg_log(None)[0].startswith("⚠️")


def test_watch_sends_keys_and_the_timer_draw_runs_once_per_snapshot(manager):
    import gradio as gr

    studio = Studio(manager, AppSettings(run_overrides=OVERRIDES))
    owner, watcher = types.SimpleNamespace(session_hash="owner"), types.SimpleNamespace(session_hash="watcher")
    status, snap_key, phase_key, _, _, view, compare_view, timer = studio.watch({}, {}, request=watcher)
    assert "Ready" in status and snap_key is None and phase_key is None
    assert timer.value == studio.settings.poll_seconds  # an idle page polls at the page's rate
    assert studio.watch(view, compare_view, request=watcher)[7] == gr.skip()  # unchanged: not re-sent
    assert "Started run" in studio.start(*GOOD.values(), request=owner)
    job = manager.current()
    wait_for(lambda: (s := job.snapshot()) is not None and s.step >= 2)
    out = studio.watch(view, compare_view, request=watcher)
    assert out[7].value == studio.settings.watch_poll_seconds  # watching another session's run: slower
    assert out[1][0] == job.id and out[2][:2] == (job.id, "running")
    assert studio.watch({}, {}, request=owner)[7].value == studio.settings.poll_seconds  # the owner: fast
    studio.toggle_pause(request=owner)
    wait_for(lambda: job.state == "paused")
    paused = studio.watch(out[5], out[6], request=watcher)
    assert paused[2][:2] == (job.id, "paused")  # the phase key changed: files and the Pause label redraw
    assert studio.draw_phase(paused[5], request=owner)[2]["value"] == "Resume"
    wait_for(lambda: not job.trainer._resume_event.is_set())
    with job.trainer.scene_lock:  # the step in flight when Pause arrived (and its snapshot) has finished
        pass

    def drawn_twice():  # the same snapshot for another session: drawn once, shared
        snap = job.snapshot()
        pair = studio.draw(paused[5], request=watcher), studio.draw({}, request=owner)
        return pair if job.snapshot() is snap else None

    first, again = wait_for(drawn_twice)
    assert again[0] is first[0] and all(a is b for a, b in zip(again[1:], first[1:]))
    assert len(first) == 2 + len(PLOTS) and first[0].shape[2] == 3 and "step" in first[-1]
    studio.stop(request=owner)
    job.thread.join(30)


def test_learned_rate_of_a_method_without_learned_parameters(manager):
    studio = Studio(manager, AppSettings(run_overrides=OVERRIDES))
    assert "Started run" in studio.start(*{**GOOD, "method": "sds"}.values())
    wait_for(lambda: manager.current().trainer is not None)
    assert "learns no parameters" in studio.set_learned_lr(1e-3)
    assert "set to 30" in studio.set_cfg(30)[0]
    assert [c["knob"] for c in manager.current().trainer.knob_changes] == ["cfg"]


def test_job_manager_owner_rules_and_clean_shutdown(manager):
    config = build_run_config(**{k: v for k, v in GOOD.items() if k != "custom_model"}, overrides=OVERRIDES)
    job = manager.start_or_queue(config, owner="a")
    with pytest.raises(UserError, match="still in progress"):
        manager.start_or_queue(config, owner="a")
    assert manager.start_or_queue(config, owner="b") == 1 and manager.start_or_queue(config, owner="c") == 2
    assert manager.queue_position("c") == 2
    manager.release("b")  # a queued session's tab closes: its entry goes
    assert manager.queue_position("c") == 1 and manager.queue_length() == 1
    manager.max_queue = 1
    with pytest.raises(UserError, match="queue is full"):
        manager.start_or_queue(config, owner="d")
    with pytest.raises(NotOwner):
        manager.set_knobs("b", cfg=10)
    with pytest.raises(UserError):
        manager.set_knobs("a", cfg=math.nan)
    manager.set_knobs("a", cfg=10, learned_lr=1e-3)  # before or after the trainer exists
    assert job.knob("cfg") == 10
    manager.release("b")
    assert job.active
    manager.release("a")
    job.thread.join(20)
    assert job.phase == "stopped" and not job.thread.is_alive()
    queued = wait_for(lambda: (j := manager.current()) is not job and j)  # the queue's head took the device
    assert queued.owner == "c" and manager.queue_length() == 0
    assert not job.out_dir.exists() and manager.kept("a") is None  # a closed tab's run had no files to keep
    out = queued.out_dir
    manager.shutdown()
    assert manager.current() is None and not out.exists()


def test_prior_loaded_once_and_listener_errors_do_not_stop_training(manager, prior_factory):
    got = []

    def broken_viewer(snapshot):
        raise RuntimeError("viewer down")

    manager.add_listener(broken_viewer)
    manager.add_listener(got.append)
    config = build_run_config(**{**{k: v for k, v in GOOD.items() if k != "custom_model"}, "steps": 4},
                              overrides=OVERRIDES)
    before = len(prior_factory.calls)
    for _ in range(2):
        job = manager.start_or_queue(config, owner="a")
        job.thread.join(20)
        assert job.phase == "done", job.message
    assert len(prior_factory.calls) - before == 1
    assert got and got[-1].step == 4


# ----------------------------------------------------------------------------- rules and helpers


def test_server_log_says_when_runs_start_queue_end_and_diverge(manager, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="app.jobs")
    base = {k: v for k, v in GOOD.items() if k != "custom_model"}
    first = manager.start_or_queue(build_run_config(**{**base, "steps": 4}, overrides=OVERRIDES), owner="a")
    queued = manager.start_or_queue(build_run_config(**{**base, "steps": 30}, overrides={
        **OVERRIDES, "max_grad_norm_jump": 1.000001}), owner="b")
    assert queued == 1
    first.thread.join(20)
    second = wait_for(lambda: manager.current() if manager.current() is not first else None)
    second.thread.join(30)
    assert second.phase == "diverged"
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "app.jobs"]
    text = "\n".join(m for _, m in lines)
    assert f"run {first.id} started: lods-embed on image, prior toy, cfg 50, 4 steps, 'a red cube'" in text
    assert "run queued at position 1: lods-embed on image" in text
    assert f"run {first.id} done after 4 steps" in text
    assert f"run {second.id} started" in text
    assert any(level == "WARNING" and m.startswith(f"run {second.id} diverged after") for level, m in lines)
    order = [m.split(":")[0] for _, m in lines]
    assert order.index(f"run {first.id} done after 4 steps") < order.index(f"run {second.id} started")


def test_result_scene_shown_in_3d_is_the_filtered_splat():
    from app.ui import result_model

    gs = ["d/views.png", "d/scene.ply", "d/scene.splat", "d/turntable.mp4"]
    assert result_model(gs) == "d/scene.splat"
    assert result_model(["d/views.png", "d/mesh.glb"]) == "d/mesh.glb"
    assert result_model(["d/scene.ply"]) == "d/scene.ply"
    assert result_model(["d/image.png"]) is None


def test_model_policy():
    local = ModelPolicy.for_server("127.0.0.1", extra=["my/model"], env={})
    assert local.custom_ids and local.allowed == ("toy", "sd21", "my/model")
    assert local.resolve("sd21") == "sd21"
    assert local.resolve("toy", " owner/some-model ") == "owner/some-model"
    for typed in ["/etc/passwd", "./weights", "../a/b", "~/models/x", "tests/conftest.py", "a/b/c", "x"]:
        with pytest.raises(UserError, match="not a Hugging Face model id"):
            local.resolve("toy", typed)
    with pytest.raises(UserError, match="unknown model"):
        local.resolve("/tmp/model")
    public = ModelPolicy.for_server("0.0.0.0", env={})
    space = ModelPolicy.for_server("127.0.0.1", env={"SPACE_ID": "me/lods"})
    for policy in (public, space):
        assert not policy.custom_ids
        with pytest.raises(UserError, match="only loads the listed"):
            policy.resolve("toy", "owner/model")
    assert restricted_server("::1", {}) is False and restricted_server("192.168.1.2", {}) is True


def test_entry_point_host_and_port():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lods_app_main", Path(__file__).parents[1] / "app.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    assert main.server_host(None, {}) == "127.0.0.1"
    assert main.server_host(None, {"SPACE_ID": "me/lods"}) == "0.0.0.0"
    assert main.server_host(None, {"GRADIO_SERVER_NAME": "0.0.0.0"}) == "0.0.0.0"
    assert main.server_host("127.0.0.1", {"SPACE_ID": "x"}) == "127.0.0.1"
    assert main.server_port(None, {"GRADIO_SERVER_PORT": "7861"}) == 7861
    args = main.parse_args(["--allow-model", "a/b", "--allow-model", "c/d", "--single-port"])
    assert args.allow_model == ["a/b", "c/d"] and args.single_port and args.prior == "toy"


def test_terminal_ends_with_the_page_address_once():
    """``python app.py`` prints the page's address last and once, not the embedded viewer's banner first."""
    import subprocess
    import sys
    import threading

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port, viewer_port = free(), free()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--viewer-port", str(viewer_port)],
                            cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("LODS Studio is running" in line for line in lines), timeout=120)
        for _ in range(2):  # the page answers there; the second answer comes after all the first one printed
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
    finally:
        proc.terminate()
        proc.wait(20)
        reader.join(20)  # every line, to the end of the output
    text = [line.rstrip() for line in lines if line.strip()]
    address = f"LODS Studio is running: open http://127.0.0.1:{port}/ (Ctrl-C to quit)"
    assert address in text and text.count(address) == 1
    assert text[-2:] == [address, "LODS Studio stopped."]  # nothing while it ran; one line when it stopped
    assert not any("viser" in t or str(viewer_port) in t for t in text[: text.index(address)])


def test_plot_frames_mark_knob_changes():
    history = [{"step": i, "loss": 1.0 / (i + 1), "cfg": 100.0 if i < 5 else 7.5} for i in range(1000)]
    history[3]["loss"] = math.nan
    changes = [{"step": 5, "knob": "cfg", "old": 100.0, "new": 7.5},
               {"step": 9, "knob": "learned_lr", "old": None, "new": 1e-3},
               {"step": 20, "knob": "cfg", "old": 7.5, "new": math.inf}]
    loss, cfg = PLOTS[0], next(p for p in PLOTS if p.key == "cfg")
    frame = metric_frame(history, changes, loss, max_points=300)
    metric = frame[frame.series == loss.title]
    assert len(metric) <= 301 and metric.step.iloc[-1] == 999 and metric.value.notna().all()
    # the loss is drawn as its log10; the tooltip column keeps the value itself
    assert metric.value.iloc[-1] == pytest.approx(math.log10(1 / 1000)) and metric.shown.iloc[-1] == "0.001"
    # each change is its own two-point series, named by what changed: separate marks, never one band
    names = mark_names(changes)
    assert names == ["w 100 → 7.5 @ 5", "learned lr default → 0.001 @ 9", "w 7.5 → ∞ @ 20"]
    for name, step in zip(names, (5, 9, 20)):
        mark = frame[frame.series == name]
        assert list(mark.step) == [step, step] and mark.value.min() < metric.value.min()
        assert mark.value.max() > metric.value.max()
    assert list(plot_colors(loss, changes)) == [loss.title, *names]
    assert len(set(plot_colors(loss, changes).values())) == 4
    linear = metric_frame(history, changes[:1], cfg)
    assert set(linear[linear.series == cfg.title].value) == {100.0, 7.5}  # not every plot is a log plot
    quiet = metric_frame(history, [], loss)
    assert set(quiet.series) == {loss.title}
    empty = metric_frame(history, changes, PLOTS[-1])  # a metric this run does not have: one invisible point
    assert list(empty.columns) == ["step", "value", "series", "shown"] and len(empty) == 1
    assert metric_frame([{"step": 1, "loss": -2.0}], [], loss).series.tolist() == [loss.title]  # no log of <= 0


def test_plots_that_do_not_apply_to_the_method_are_hidden():
    shown = {m: {p.key for p in PLOTS if p.applies(m, "gs")} for m in ("sds", "lods-embed", "lods-lora", "vsd")}
    assert shown["sds"] == {"loss", "cfg", "saturation", "floater_score"}
    assert shown["lods-embed"] == shown["sds"] | {"update_loss", "embedding_distance"}
    assert shown["lods-lora"] == shown["vsd"] == shown["sds"] | {"update_loss"}
    assert "floater_score" not in {p.key for p in PLOTS if p.applies("sds", "image")}


def test_render_history_keeps_the_frames_around_each_knob_change():
    from app.history import Frame, history_html, pick_frames

    frames = [Frame(step, 100.0 if step <= 50 else 7.5, f"data:image/png;base64,{step}") for step in range(0, 301, 10)]
    changes = [{"step": 50, "knob": "cfg", "old": 100.0, "new": 7.5}]
    picked = pick_frames(frames, changes, max_frames=8)
    steps = [f.step for f in picked]
    assert len(picked) == 8 and steps == sorted(steps) and steps[0] == 0 and steps[-1] == 300
    assert 50 in steps and 60 in steps  # the last frame before the change and the first after it, side by side
    strip = history_html(frames, changes, max_frames=8)
    before, mark = strip.index("step 50 · w 100"), strip.index("w 100 → 7.5 @ 50")
    assert before < mark < strip.index("step 60 · w 7.5") and strip.count("<figure") == 8
    assert "fills in" in history_html([], [])


def test_viewer_hook(monkeypatch, manager):
    import viewer.server
    from app import viewer_link

    class FakeViewer:
        def __init__(self, host, port):
            self.host, self.port, self.url = host, port, f"http://{host}:{port}/"
            self.snapshots, self.render_fns, self.cleared, self.resets = [], [], 0, 0
            self.min_interval_s = 0.0

        def reset(self):
            self.resets += 1

        def update(self, snapshot):
            self.snapshots.append(snapshot)

        def clear(self):
            self.cleared += 1

        def set_render_fn(self, fn, lock=None):
            self.render_fns.append(fn)

    monkeypatch.setattr(viewer.server, "ViewerServer", FakeViewer)
    link = viewer_link.connect_viewer(manager, "0.0.0.0", 8123)
    assert 'data-port="8123"' in link.html() and link.server.host == "0.0.0.0"
    config = build_run_config(**{**{k: v for k, v in GOOD.items() if k != "custom_model"}, "steps": 2},
                              overrides=OVERRIDES)
    manager.start_or_queue(config, owner="a").thread.join(20)
    assert link.server.cleared == 1 and link.server.render_fns == [None] and link.server.snapshots
    proxied = viewer_link.connect_viewer(manager, "0.0.0.0", 8124, single_port=True)
    assert proxied.server.host == "127.0.0.1" and 'src="/viewer/"' in proxied.html()

    # Gaussian runs: the splats reach the viewer after every step it can take, not only with snapshots
    gs = build_run_config(**{**{k: v for k, v in GOOD.items() if k != "custom_model"}, "steps": 4,
                             "backbone": "gs"}, overrides={**OVERRIDES, "snapshot_every": 100})
    link.server.snapshots.clear()
    manager.start_or_queue(gs, owner="a").thread.join(20)
    fed = [s for s in link.server.snapshots if s.previews is None]
    assert [s.step for s in fed] == [1, 2, 3, 4] and fed[0].gaussians["means"].shape[1] == 3
    from lods.export import run_pixel_variance  # the training pixel filter of this run's 16 px renders

    assert link.server.pixel_variance == pytest.approx(run_pixel_variance(16)) and link.server.pixel_variance > 0
    link.server.min_interval_s = proxied.server.min_interval_s = 3600.0  # one update an hour at most
    link.server.snapshots.clear()
    manager.start_or_queue(gs, owner="a").thread.join(20)
    assert [s.step for s in link.server.snapshots if s.previews is None] == [1]
    assert link.server.resets == 0
    manager.discard("a")  # Reset: both viewers forget the run, so a new client receives none of its splats
    assert link.server.resets == 1 and proxied.server.resets == 1


def test_preview_grid_and_text_helpers():
    grid = preview_grid(torch.rand(3, 3, 16, 16), min_side=64, cols=2)
    assert grid.dtype.name == "uint8" and grid.shape == (64 * 2 + 4, 64 * 2 + 4, 3)
    assert md_text("<b>x</b> *y* [z](http://e)\nnext") == "&lt;b&gt;x&lt;/b&gt; \\*y\\* \\[z\\](http://e) next"
    assert "Ready" in status_text(None, "me")


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_page_in_a_browser(server):
    playwright = pytest.importorskip("playwright.sync_api")
    url, jobs = server
    with playwright.sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#start", timeout=30_000)
            assert page.title() == "LODS Studio"
            page.locator("#prompt textarea").fill("a blue sphere")
            page.get_by_label("2D image").check()
            page.locator("#steps input").fill("3000")
            page.locator("#start").click()
            page.wait_for_selector("#status :text('Running')", timeout=20_000)
            job = jobs.current()
            page.wait_for_selector("#renders img", timeout=20_000)
            page.locator("#stop").click()
            page.wait_for_selector("#status :text('Stopped')", timeout=20_000)
            page.wait_for_selector("#files [aria-label='image.png']", timeout=20_000)
            assert job.config.prompt == "a blue sphere" and not job.thread.is_alive()
        finally:
            browser.close()


def _browser(p):
    return p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                             args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"])


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_typed_cfg_applies_on_enter_and_previews_are_large(prior_factory):
    """Type a CFG weight and press Enter: the notice, the status line and the next plotted step show the typed
    weight (not the previous one); the previews measure at least 256 px per view on a 1400 px wide page; a
    reload keeps the run its own and the controls show it."""
    playwright = pytest.importorskip("playwright.sync_api")
    with serve(prior_factory, unload_grace_s=20.0) as (url, jobs), playwright.sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#start", timeout=30_000)
            assert page.locator("#stop").is_disabled() and page.locator("#pause").is_disabled()
            assert page.locator("#start").bounding_box()["y"] + 40 <= 1000  # Start above the fold
            page.get_by_label("2D image").check()
            page.wait_for_function("() => document.querySelector('#steps input').value === '500'", timeout=10_000)
            page.locator("#steps input").fill("3000")  # after the backbone's default arrived
            page.locator("#start").click()
            page.wait_for_selector("#status :text('Running')", timeout=20_000)
            job = jobs.current()
            assert job.config.steps == 3000 and job.config.backbone == "image"
            wait_for(lambda: job.trainer is not None and job.trainer.step >= 2)
            page.locator("#start:disabled").wait_for(timeout=10_000)  # your run goes: Start waits, Stop is there
            page.locator("#stop:enabled").wait_for(timeout=10_000)

            box = page.locator("#cfg input, #cfg textarea").first
            for typed in ("7.5", "1000"):  # twice: the second must not apply the first
                box.fill(typed)
                box.press("Enter")
                page.wait_for_selector(f"#notice :text('CFG weight set to {typed};')", timeout=10_000)
                page.wait_for_selector(f"#status :text('CFG {typed},')", timeout=10_000)
                change = wait_for(lambda t=typed: [c for c in job.trainer.knob_changes if c["new"] == float(t)])[0]
                # the next plotted step: the CFG plot's mark and the history strip's frame after the change
                page.wait_for_selector(f"#plot-cfg :text('→ {typed} @ {change['step']}')", timeout=20_000)
                page.wait_for_selector(f"#history :text('· w {typed}')", timeout=20_000)
                after = [h["cfg"] for h in job.snapshot().history if h["step"] > change["step"]]
                assert after and after[0] == float(typed)
            assert [c["new"] for c in job.trainer.knob_changes] == [7.5, 1000.0]

            views = len(job.snapshot().previews)
            shown = page.locator("#renders img").bounding_box()
            cols = min(2, views)  # two views a row (a 2D run has one)
            assert (shown["width"] - 4 * (cols - 1)) / cols >= 256, shown
            natural = page.locator("#renders img").evaluate("img => img.naturalWidth")
            assert natural >= cols * 256

            page.reload()  # the browser's owner token keeps the run its own
            page.wait_for_function("() => { const s = document.querySelector('#status')?.innerText || '';"
                                   " return s.includes('Running') && !s.includes('read-only'); }", timeout=20_000)
            page.wait_for_function("() => document.querySelector('#cfg input, #cfg textarea').value === '1000'",
                                   timeout=10_000)
            assert page.locator("#steps input").input_value() == "3000"
            assert job.active and job.owner.startswith("browser:")
            page.locator("#stop").click()
            page.wait_for_selector("#notice :text('its result files are below')", timeout=30_000)
            page.locator("#start:enabled").wait_for(timeout=10_000)
            assert page.locator("#stop").is_disabled()
        finally:
            browser.close()


# ----------------------------------------------------------------------------- the Compare tab


def test_comparison_steps_its_runs_in_turn():
    from lods.config import RunConfig
    from lods.runs.compare import PRESETS, comparison_configs

    assert [(s.method, s.cfg) for s in PRESETS["cfg-sweep"]] == [
        ("lods-embed", 30.0), ("lods-embed", 100.0), ("lods-embed", 1000.0), ("lods-embed", math.inf)]
    base = RunConfig(prompt="a red cube", backbone="image", steps=4, snapshot_every=1, **{
        k: v for k, v in OVERRIDES.items() if k in ("resolution", "batch", "preview_views")})
    configs = comparison_configs(base, PRESETS["cfg-vs-lods"])
    assert [(c.method, c.cfg, c.seed, c.prompt) for c in configs] == [
        ("sds", 100.0, 0, "a red cube"), ("lods-embed", 100.0, 0, "a red cube"),
        ("lods-embed", math.inf, 0, "a red cube")]
    with pytest.raises(UserError, match="2 to 4"):
        comparison_configs(base, PRESETS["cfg-vs-lods"][:1])


def test_comparison_job_round_robin_export_and_controls(manager, tiny_prior):
    from lods.runs.compare import PRESETS as CP
    from lods.runs.compare import Comparison, comparison_configs

    config = build_run_config(**{**{k: v for k, v in GOOD.items() if k != "custom_model"}, "steps": 4},
                              overrides={**OVERRIDES, "snapshot_every": 1})
    configs = comparison_configs(config, CP["cfg-vs-lods"])
    order = []
    comparison = Comparison(configs, tiny_prior, on_snapshot=lambda i, snap: order.append((i, snap.step)))
    assert comparison.run() == ["done"] * 3
    comparison.close()
    stepped = [o for o in order if o[1] > 0][:9]
    assert stepped == [(i, s) for s in (1, 2, 3) for i in range(3)]  # one step of each run in turn

    job = manager.start_or_queue(configs[0], owner="a", compare=configs)
    assert manager.start_or_queue(config, owner="b") == 1  # another session queues behind the comparison
    manager.release("b")
    with pytest.raises(UserError, match="keeps the settings"):
        manager.set_knobs("a", cfg=10)
    job.thread.join(30)
    assert job.phase == "done", job.message
    folders = sorted({p.parent.name for p in job.files})
    assert folders == ["1-sds-cfg-100", "2-lods-embed-cfg-100", "3-lods-embed-cfg-inf"]
    assert all((job.out_dir / f / "image.png").is_file() for f in folders)

    long = [c.__class__(**{**c.__dict__, "steps": 5000}) for c in configs[:2]]
    job = manager.start_or_queue(long[0], owner="a", compare=long)
    wait_for(lambda: job.comparison is not None and min(t.step for t in job.comparison.trainers) >= 2)
    manager.set_paused("a", True)
    assert job.state == "paused"
    manager.set_paused("a", False)
    manager.stop("a", wait=20)
    assert job.phase == "stopped" and not job.thread.is_alive()


def test_compare_tab_callbacks(manager):
    studio = Studio(manager, AppSettings(run_overrides={**OVERRIDES, "snapshot_every": 1}))
    from app.compare_tab import COMPARE_PRESETS_SHOWN
    from lods.runs.lessons import LESSONS

    preset = Studio.compare_slots("cfg-vs-lods")
    assert preset == ("sds", "100", "lods-embed", "100", "lods-embed", "inf", "off", "100")
    # every lesson is a preset: its slots, steps, backbone and the sentence of what to look for
    assert list(COMPARE_PRESETS_SHOWN)[: len(LESSONS)] == list(LESSONS)
    for name, lesson in LESSONS.items():
        *slots, steps, backbone, look, input_view = Studio.compare_preset(name)
        assert [slots[2 * i] for i in range(len(lesson.slots))] == [s.method for s in lesson.slots]
        assert steps == lesson.steps and backbone == lesson.backbone and lesson.look_for.split()[0] in look
        assert input_view == NO_WORLD_SCENE  # the lessons are text to 3D
        off = [slots[2 * i + 1]["visible"] for i in range(len(slots) // 2) if slots[2 * i] == "off"]
        assert not any(off)  # an "off" slot hides its CFG weight
    assert Studio.compare_slot_changed("off")["visible"] is False and Studio.compare_slot_changed("sds")["visible"]
    bad = studio.compare_start("a red cube", "toy", "image", 3, 0, "sds", "abc", "lods-embed", "100",
                               "off", "100", "off", "100")
    assert bad.startswith("⚠️") and "CFG" in bad
    one = studio.compare_start("a red cube", "toy", "image", 3, 0, "sds", "100", *["off", "100"] * 3)
    assert one.startswith("⚠️") and "2 to 4" in one
    assert manager.current() is None
    sweep = ("lods-embed", "30", "lods-embed", "100", "lods-embed", "1000", "lods-embed", "inf")
    ok = studio.compare_start("a red cube", "toy", "image", 3, 0, *sweep, request=types.SimpleNamespace(
        session_hash="teacher"))
    assert "Started comparison" in ok and "4 runs" in ok
    job = manager.current()
    assert job.owner == "teacher"  # the session that pressed Start owns the comparison (it may stop it)
    job.thread.join(30)
    status, gallery, table, files, view = studio.compare_poll({})
    assert "Done" in status and "Comparison of 4 runs" in status
    # one pane per run, its views in a row at the Studio previews' size
    assert gallery.count("<figure") == 4 and "lods-embed · CFG 30 · step 3" in gallery
    assert gallery.index("CFG 30") < gallery.index("CFG ∞") and gallery.count('style="width: 300px"') == 4
    images = re.findall(r'src="(data:image/png;base64,[^"]+)"', gallery)
    assert len(set(images)) == 4  # the runs ran to the end and their panes differ
    # the replay: every run's preview as it was at a share of the run (steps 1, 2, 3 were published)
    assert "No previews by step 0" in studio.compare_replay(0)
    early, late = studio.compare_replay(34), studio.compare_replay(100)
    assert early.count("· step 1</figcaption>") == 4 and late.count("· step 3</figcaption>") == 4
    assert re.findall(r'src="(data:image/png;base64,[^"]+)"', late) == images  # the end is what the panes show
    assert set(re.findall(r'src="(data:image/png;base64,[^"]+)"', early)).isdisjoint(images)
    assert [row[1] for row in table["data"]] == [3, 3, 3, 3]
    assert table["headers"][0] == "run" and len(files) >= 4
    import gradio as gr

    assert studio.compare_poll(view)[:4] == (gr.skip(),) * 4  # nothing changed: nothing re-sent


# ----------------------------------------------------------------------------- the load and viewer benchmarks


def test_load_test_sessions_poll_and_turn_knobs_without_errors(prior_factory):
    from benchmarks.loadtest import run_load_test

    report = run_load_test(clients=3, seconds=1.0, poll_s=0.1, knob_every=2, warmup_s=0.2,
                           prior_factory=prior_factory, run={"backbone": "image"}, overrides=OVERRIDES)
    assert report["errors"] == 0, report["error_samples"]
    calls = report["latency_ms"]
    assert calls["poll"]["n"] == 3  # the page's first load, once per session
    assert calls["watch"]["n"] > 0 and calls["draw"]["n"] > 0  # then ticks, and draws when a snapshot is out
    assert report["refused_read_only"] > 0  # the watchers may not turn the owner's knobs
    assert report["knob_changes_applied"] > 0  # the owner's changes reach the trainer
    assert report["it_per_s_alone"] > 0 and report["it_per_s_loaded"] > 0


def test_viewer_bench_counts_splat_updates_that_arrive(tiny_prior):
    from benchmarks.viewer import run_viewer_bench

    report = run_viewer_bench(steps=12, frame_bytes=1_000, max_updates_per_s=1000.0, prior=tiny_prior,
                              client="websocket")
    assert report["server_updates_sent"] >= 1
    assert 1 <= report["splat_updates_received"] <= report["server_updates_sent"]
    assert report["splats"] > 0 and report["it_per_s_alone"] > 0


def test_an_abandoned_run_is_stopped_with_its_results_and_frees_the_device(prior_factory):
    config = build_run_config(**{k: v for k, v in GOOD.items() if k != "custom_model"}, overrides=OVERRIDES)
    jobs = JobManager(prior_factory=prior_factory, join_timeout=20, abandon_after_s=0)  # checked by hand here
    try:
        job = jobs.start_or_queue(config, owner="api-client")  # started through the API, never polled again
        assert jobs.start_or_queue(config, owner="gone-too") == 1
        assert jobs.start_or_queue(config, owner="waiting") == 2
        wait_for(lambda: job.trainer is not None and job.trainer.step > 0)
        t0 = time.monotonic()
        for owner in ("api-client", "gone-too"):
            jobs.touch(owner, now=t0)  # their last polls
        jobs.touch("waiting", now=t0 + 100)  # this session still polls; the other two do not
        jobs.abandon_after_s = 60
        assert jobs.check_abandoned(now=t0 + 100) is job
        job.thread.join(20)
        assert job.phase == "stopped" and "stopped polling" in job.message
        assert {p.name for p in job.files} >= {"image.png", "summary.json", "checkpoint.safetensors"}
        nxt = wait_for(lambda: (j := jobs.current()) is not job and j)
        assert nxt.owner == "waiting"  # the silent queued session lost its place, the polling one started
        assert jobs.check_abandoned(now=t0 + 100) is None  # its owner polled within the limit
    finally:
        jobs.shutdown()
    watched = JobManager(prior_factory=prior_factory, join_timeout=20, abandon_after_s=0.3)  # the watchdog thread
    try:
        job = watched.start_or_queue(config, owner="api-client")
        job.thread.join(30)
        assert job.phase == "stopped" and "stopped polling" in job.message
    finally:
        watched.shutdown()


def test_start_again_while_queued_keeps_the_place_and_kept_runs_are_capped(manager):
    config = build_run_config(**{k: v for k, v in GOOD.items() if k != "custom_model"}, overrides=OVERRIDES)
    first = manager.start_or_queue(config, owner="a")
    assert manager.start_or_queue(config, owner="b") == 1 and manager.start_or_queue(config, owner="c") == 2
    assert manager.start_or_queue(config, owner="b") == 1  # a second Start is not sent to the back
    assert manager.queue_position("c") == 2
    wait_for(lambda: first.trainer is not None and first.trainer.step > 0)
    manager.stop("a", wait=20)
    assert first.files  # its owner may still want them
    manager.max_kept = 1
    b = wait_for(lambda: (j := manager.current()) is not first and j)
    assert manager.kept("a") is first
    wait_for(lambda: b.trainer is not None and b.trainer.step > 0)
    manager.stop("b", wait=20)
    c = wait_for(lambda: (j := manager.current()) is not b and j)
    assert c.owner == "c" and manager.kept("b") is b and manager.kept("a") is None  # the oldest went
    assert not first.out_dir.exists()
    manager.stop("c", wait=20)


def test_file_urls_go_only_to_their_owner(manager):
    import gradio as gr

    studio = Studio(manager, AppSettings(run_overrides=OVERRIDES))
    owner, watcher = types.SimpleNamespace(session_hash="owner"), types.SimpleNamespace(session_hash="watcher")
    assert "Started run" in studio.start(*{**GOOD, "steps": 2}.values(), request=owner)
    job = manager.current()
    job.thread.join(30)
    model, files, pause, start, stop, reset, note = studio.draw_phase({}, request=owner)
    assert files and any(f.endswith("image.png") for f in files)
    # the run has ended: Start is back, Pause and Stop are off, Reset clears it; the notice says the files are here
    assert start["interactive"] and not pause["interactive"] and not stop["interactive"] and reset["interactive"]
    assert "result files are below" in note
    model, files, *_, note = studio.draw_phase({}, request=watcher)
    assert files is None and model is None and note == gr.skip()
    polled = studio.poll({}, request=watcher)
    assert polled[2] is None and polled[-6] is None  # the 3D result and the files of the full poll


def test_an_owner_token_keeps_the_run_across_a_reload(manager):
    studio = Studio(manager, AppSettings(run_overrides=OVERRIDES, unload_grace_s=0.3))
    first, reloaded, stranger = (types.SimpleNamespace(session_hash=h) for h in ("page-1", "page-2", "page-3"))
    token = studio.claim("", request=first)  # a new browser gets a fresh random token
    assert len(token) == 32 and studio.claim("", request=stranger) != token
    assert studio.claim("../not-a-token", request=stranger) != "../not-a-token"
    assert "Started run" in studio.start(*{**GOOD, "cfg": 42.0}.values(), request=first)
    job = manager.current()
    assert job.owner == f"browser:{token}"
    assert studio.claim(token, request=reloaded) == token  # the reloaded page brings the token back
    studio.release(request=first)  # the old page's unload: its run stays while the new page polls
    grace_over = time.monotonic() + studio.settings.unload_grace_s
    after_grace: dict[str, int] = {}

    def trained_on_past_the_grace() -> str | None:
        """The reloaded page's status once the run has taken 3 steps after the old page's grace period ended."""
        status = studio.watch({}, {}, request=reloaded)[0]
        if time.monotonic() < grace_over or job.trainer is None:
            return None
        start = after_grace.setdefault("step", job.trainer.step)
        return status if job.trainer.step >= start + 3 else None

    status = wait_for(trained_on_past_the_grace, timeout=60)
    assert job.active and not job.stop_requested and "read-only" not in status and "CFG 42" in status
    assert "set to 30" in studio.set_cfg("30", request=reloaded)[0]
    assert "another session" in studio.set_cfg("20", request=stranger)[0]
    controls = studio.run_controls({}, request=reloaded)  # the reloaded page shows the run's own settings
    assert controls[0] == GOOD["prompt"] and controls[6] == "30" and controls[7] == pytest.approx(math.log10(30))
    studio.stop(request=reloaded)
    job.thread.join(30)
    assert job.phase == "stopped"


def test_reset_removes_gradios_cached_copies(manager, tmp_path, monkeypatch):
    import gradio.utils
    from gradio.processing_utils import save_file_to_cache

    monkeypatch.setattr(gradio.utils, "get_upload_folder", lambda: str(tmp_path))
    studio = Studio(manager, AppSettings(run_overrides=OVERRIDES))
    me = types.SimpleNamespace(session_hash="me")
    studio.start(*{**GOOD, "steps": 2}.values(), request=me)
    job = manager.current()
    job.thread.join(30)
    copies = [Path(save_file_to_cache(p, str(tmp_path))) for p in job.files]
    assert all(c.exists() for c in copies)
    studio.reset({}, request=me)
    assert not job.out_dir.exists() and not any(c.exists() for c in copies)


def test_sigterm_stops_the_run_and_removes_its_folder(tmp_path):
    """``python app.py`` ended by a service manager: the run stops, its job folder goes, exit status 0."""
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--no-viewer"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        c = wait_for(lambda: _try_client(f"http://127.0.0.1:{port}/"), timeout=120, every=0.5)
        assert "Started run" in start(c, steps=5000)
        wait_for(lambda: list(tmp_path.glob("lods-job-*")), timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert list(tmp_path.glob("lods-job-*")) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _try_client(url: str):
    try:
        return client(url)
    except Exception:
        return None


def test_finished_runs_files_go_when_their_session_has_left(manager):
    config = build_run_config(**{**{k: v for k, v in GOOD.items() if k != "custom_model"}, "steps": 2},
                              overrides=OVERRIDES)
    first = manager.start_or_queue(config, owner="a")
    first.thread.join(30)
    second = manager.start_or_queue(config, owner="b")  # a's run is kept for a, with its files
    second.thread.join(30)
    assert manager.kept("a") is first and first.out_dir.exists() and second.files
    manager.touch("b")
    manager.keep_files_s = 3600.0
    manager.check_abandoned(now=time.monotonic() + 60)  # both polled within the hour: nothing goes
    assert first.out_dir.exists() and second.out_dir.exists()
    manager.check_abandoned(now=time.monotonic() + 7200)  # two hours without a poll: both sessions have left
    assert manager.kept("a") is None and not first.out_dir.exists()
    assert second.files == [] and not second.out_dir.exists()


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_a_lesson_runs_to_its_end_in_the_browser(server):
    """The Compare tab's first lesson, shortened: picked, started, run to the end; the sentence of what to look
    for is shown, and its panes differ, at the Studio previews' size."""
    from lods.runs.lessons import LESSONS

    playwright = pytest.importorskip("playwright.sync_api")
    url, jobs = server
    lesson = next(iter(LESSONS.values()))
    with playwright.sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#start", timeout=30_000)
            page.get_by_role("tab", name="Compare").click()
            page.wait_for_selector("#compare-look-for", timeout=10_000)
            assert lesson.look_for.split(";")[0][:30] in page.locator("#compare-look-for").inner_text()
            page.locator("#compare-steps input").fill("4")
            page.locator("#compare-start").click()
            page.wait_for_selector("#compare-status :text('Done')", timeout=60_000)
            job = jobs.current()
            assert [(c.method, c.cfg) for c in job.compare_configs] == [(s.method, s.cfg) for s in lesson.slots]
            assert all(t.step == 4 for t in job.comparison.trainers)
            page.wait_for_function(
                f"() => document.querySelectorAll('#compare-gallery img').length === {len(lesson.slots)}",
                timeout=20_000)
            panes = page.locator("#compare-gallery img")
            sources = [panes.nth(i).get_attribute("src") for i in range(len(lesson.slots))]
            assert len(set(sources)) == len(lesson.slots)  # the runs' panes differ
            assert panes.first.bounding_box()["width"] >= 256  # at the Studio previews' size
        finally:
            browser.close()
