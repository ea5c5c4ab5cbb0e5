"""Pre-flight (issue 24 item 8): what used to fail late (in the warm-up, after the experts, or by
waiting forever on a local Ray) is refused before Ray starts, by one error naming the key.
No Ray, no training, no weights: the base model is built on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gs_ray import preflight
from gs_ray.config import Config, EvalConfig, apply_overrides
from gs_ray.errors import ConfigError, DataError
from gs_ray.preflight import check_encoder, check_eval, check_run, check_sts, check_target_modules


def _cfg(tmp_path: Path, *overrides: str) -> Config:
    """A config whose model cache is a fresh folder (so a test can see that nothing was built)."""
    return apply_overrides(Config(), ["--model.cache_dir", str(tmp_path / "cache"), *overrides])


@pytest.fixture
def local(monkeypatch):
    """A Ray that would be started here, on a machine with `gpus` GPUs (default none)."""
    monkeypatch.setattr(preflight, "starts_local_ray", lambda address: not address)
    monkeypatch.delenv("RAY_OVERRIDE_RESOURCES", raising=False)

    def machine(gpus: int = 0) -> None:
        monkeypatch.setattr(preflight, "local_gpus", lambda: gpus)

    machine()
    return machine


# --------------------------------------------------------------------------- lora.target_modules


def test_the_default_passes_without_building_or_pretraining_anything(tmp_path, local):
    cfg = _cfg(tmp_path)
    assert check_run(cfg) == []
    assert not (tmp_path / "cache").exists()  # no tokenizer trained, no tiny model pretrained


def test_a_misspelt_target_module_names_the_field(tmp_path):
    cfg = _cfg(tmp_path, "--lora.target_modules", "[q_proj, v_prj]")
    with pytest.raises(
        ConfigError, match=r"^lora.target_modules\[1\]: 'v_prj' .*did you mean 'v_proj'"
    ):
        check_target_modules(cfg)
    ok = _cfg(tmp_path, "--lora.target_modules", "[q_proj, k_proj, v_proj, o_proj, down_proj]")
    assert check_target_modules(ok) == []


def test_a_target_module_that_is_no_linear_layer_names_the_field(tmp_path):
    cfg = _cfg(tmp_path, "--lora.target_modules", "[mlp]")
    with pytest.raises(ConfigError, match=r"^lora.target_modules\[0\]: 'mlp' names LlamaMLP"):
        check_target_modules(cfg)


def test_target_modules_of_a_model_folder_and_of_a_resumed_run(tmp_path):
    """A model folder (and a resumed run's saved base model) is checked against its own config:
    GPT-2 names its attention c_attn, so q_proj is refused there."""
    from transformers import GPT2Config, LlamaConfig

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(gpt2)
    with pytest.raises(ConfigError, match=r"^lora.target_modules\[0\]: 'q_proj'.*'c_attn'"):
        check_target_modules(_cfg(tmp_path, "--model.name", str(gpt2)))
    assert (
        check_target_modules(
            _cfg(tmp_path, "--model.name", str(gpt2), "--lora.target_modules", "[c_attn]")
        )
        == []
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="^model.name: folder .* has no config.json"):
        check_target_modules(_cfg(tmp_path, "--model.name", str(empty)))
    run = tmp_path / "run"
    LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
    ).save_pretrained(run / "base_model")
    cfg = _cfg(tmp_path, "--lora.target_modules", "[q_proj, v_prj]")
    with pytest.raises(ConfigError, match="v_prj"):
        check_target_modules(cfg, run)


def test_a_hub_model_not_on_this_machine(tmp_path, monkeypatch):
    """Offline, a model that is no folder and not cached cannot load: an error naming model.name;
    online it is left to download, and the note says that target_modules were not checked."""
    cfg = _cfg(tmp_path, "--model.name", "no-such-org/no-such-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="^model.name: 'no-such-org/no-such-model' .*offline"):
        check_target_modules(cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    (note,) = check_target_modules(cfg)
    assert note.startswith("lora.target_modules not checked")


# --------------------------------------------------------------------------- router.encoder


def test_router_encoder_is_checked_before_ray_when_the_router_uses_it(tmp_path, monkeypatch, local):
    assert check_encoder("all-MiniLM-L6-v2") == []  # the bundled copy
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="^router.encoder: 'all-MiniLM-L6-v3' .*offline"):
        check_encoder("all-MiniLM-L6-v3")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(
        ConfigError, match="^router.encoder: .*did you mean the bundled 'all-MiniLM-L6-v2'"
    ):
        check_encoder("all-MiniLM-L6-v3")
    (note,) = check_encoder("some-org/some-encoder")  # online: left to download, said so
    assert "not checked" in note
    with pytest.raises(ConfigError, match="^router.encoder: 'a/b/c' is no folder here and not a"):
        check_encoder("a/b/c")
    with pytest.raises(ConfigError, match="^router.encoder: folder .* has no config.json"):
        check_encoder(str(tmp_path))
    # In a run: checked only when the router is the encoder kind.
    bad = _cfg(tmp_path, "--router.encoder", "a/b/c")
    assert check_run(bad) == []
    with pytest.raises(ConfigError, match="^router.encoder"):
        check_run(apply_overrides(bad, ["--router.kind", "encoder"]))


# --------------------------------------------------------------------------- devices and resources


def test_cuda_on_a_machine_without_a_gpu_fails_fast(tmp_path, local):
    cfg = _cfg(tmp_path, "--model.device", "cuda")
    with pytest.raises(ConfigError, match=r"^model.device is 'cuda' but this machine has no GPU"):
        check_run(cfg)
    with pytest.raises(ConfigError, match="^model.device"):
        check_run(cfg, on_ray=False)  # the single-process pipeline too
    local(gpus=1)
    with pytest.raises(ConfigError, match=r"^model.device is 'cuda:1' but this machine has 1 GPU"):
        check_run(_cfg(tmp_path, "--model.device", "cuda:1"))
    assert check_run(cfg) == []
    # On a cluster the autoscaler may add GPU nodes: not refused.
    local(gpus=0)
    assert check_run(apply_overrides(cfg, ["--run.ray_address", "ray://head:10001"])) == []


def test_gpu_and_cpu_counts_a_local_ray_cannot_offer(tmp_path, local):
    with pytest.raises(ConfigError, match="^warmup.use_gpu is true but this machine has no GPU"):
        check_run(_cfg(tmp_path, "--warmup.use_gpu", "true"))
    local(gpus=1)
    with pytest.raises(ConfigError, match=r"^experts.num_workers \(2\): each worker takes a GPU"):
        check_run(_cfg(tmp_path, "--experts.num_workers", "2"))
    with pytest.raises(ConfigError, match=r"^stage2.num_workers \(2\): each gradient worker"):
        check_run(_cfg(tmp_path, "--stage2.num_workers", "2"))
    assert (
        check_run(
            _cfg(
                tmp_path,
                "--stage2.num_workers",
                "2",
                "--model.device",
                "cpu",
                "--experts.use_gpu",
                "false",
                "--experts.num_workers",
                "2",
                "--run.num_cpus",
                "2",
            )
        )
        == []
    )
    local(gpus=0)
    with pytest.raises(
        ConfigError, match=r"^warmup.num_workers x warmup.cpus_per_worker \(3 x 1\)"
    ):
        check_run(_cfg(tmp_path, "--warmup.num_workers", "3", "--run.num_cpus", "2"))
    with pytest.raises(ConfigError, match=r"^stage2.cpus_per_worker \(4\)"):
        check_run(
            _cfg(
                tmp_path,
                "--stage2.cpus_per_worker",
                "4",
                "--run.num_cpus",
                "2",
                "--model.device",
                "cpu",
            )
        )


@pytest.mark.parametrize("section", ["warmup", "experts", "stage2"])
def test_a_worker_resource_a_local_ray_cannot_have_fails_fast(
    tmp_path, monkeypatch, local, section
):
    cfg = _cfg(tmp_path, f"--{section}.worker_resource", "fake_gpu")
    with pytest.raises(
        ConfigError,
        match=f"^{section}.worker_resource 'fake_gpu': the Ray started here .* "
        "has no such resource",
    ):
        check_run(cfg)
    assert check_run(apply_overrides(cfg, ["--run.ray_address", "ray://head:10001"])) == []
    monkeypatch.setenv("RAY_OVERRIDE_RESOURCES", json.dumps({"fake_gpu": 2}))
    assert check_run(cfg) == []


def test_a_local_ray_is_known_only_without_an_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert preflight.starts_local_ray("ray://head:10001") is False
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert preflight.starts_local_ray(None) is False


# --------------------------------------------------------------------------- eval.sts


def test_eval_sts_is_read_before_ray(tmp_path, local):
    good = tmp_path / "sts.csv"
    good.write_text("main-news\tMSRpar\t2012\t0001\t4.2\tA man plays.\tA man is playing.\n")
    check_sts(EvalConfig(sts=str(good)))
    missing = _cfg(tmp_path, "--eval.sts", str(tmp_path / "nope.csv"))
    with pytest.raises(ConfigError, match="^eval.sts: .*nope.csv: not found"):
        check_eval(missing)
    with pytest.raises(ConfigError, match="^eval.sts"):
        check_run(missing)  # a run's config is what gs-ray eval reads it from
    with pytest.raises(ConfigError, match="^eval.sts: .*is a directory"):
        check_eval(_cfg(tmp_path, "--eval.sts", str(tmp_path)))
    bad = tmp_path / "bad.csv"
    bad.write_text(good.read_text() + "main-news\tMSRpar\t2012\t0002\tfive\ta\tb\n")
    with pytest.raises(DataError, match=r"^eval.sts: .*bad.csv:2: field 5 \(score\)"):
        check_eval(_cfg(tmp_path, "--eval.sts", str(bad)))


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--data.template", "Q: {prompt:d}"],
            r"^data.template: placeholder \{prompt\} .*bad format spec 'd'",
        ),
        (["--data.template", "Q: {prompt!z}"], r"^data.template: .*unknown conversion !z"),
        (["--data.template", "Q: {prompt:{w}}"], r"^data.template: .*nested placeholders"),
        (["--data.template", "Q: {}"], r"^data.template: placeholder \{\} .*name a field"),
        (["--data.template", "Q: {prompt.upper}"], r"^data.template: .*name a field"),
        (
            [
                "--data.source",
                "mix",
                "--data.mix",
                '[{source: a.jsonl, domain: a, prompt: "{question:,}", response: "{answer}"}]',
            ],
            r"^data.mix\[0\].prompt: placeholder \{question\} .*bad format spec ','",
        ),
        (
            [
                "--data.source",
                "mix",
                "--data.mix",
                '[{source: a.jsonl, domain: a, prompt: "{question}", response: "{answer!x}"}]',
            ],
            r"^data.mix\[0\].response: .*unknown conversion !x",
        ),
    ],
)
def test_template_format_specs_fail_when_the_config_loads(overrides, message):
    """Before: {prompt:d} passed the load-time check and raised in prepare (after Ray started),
    and a mix template's bad spec raised a bare ValueError while the data was read."""
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), overrides)


def test_templates_that_format_text_still_load():
    cfg = apply_overrides(Config(), ["--data.template", "{{Q}} {prompt!r:>12}\n"])
    assert cfg.data.template.format(prompt="hi") == "{Q}         'hi'\n"


# --------------------------------------------------------------------------- the command line


def test_gs_ray_run_refuses_a_misspelt_target_module_before_ray(tmp_path, capsys):
    """The whole path: one line naming the key, exit status 2, no Ray started, nothing created."""
    ray = pytest.importorskip("ray")
    from gs_ray.cli import main

    was_up = ray.is_initialized()
    out = tmp_path / "runs"
    code = main(
        [
            "run",
            "--run.output_dir",
            str(out),
            "--model.cache_dir",
            str(tmp_path / "c"),
            "--data.demo_size",
            "64",
            "--lora.target_modules",
            "[q_proj, v_prj]",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("gs-ray: config error: lora.target_modules[1]: 'v_prj'"), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
    if not was_up:
        assert not ray.is_initialized()


def test_serve_refuses_a_gpu_this_machine_does_not_have(local):
    from gs_ray.config import ServeConfig
    from gs_ray.preflight import check_serve

    with pytest.raises(ConfigError, match=r"^serve.device is 'cuda'"):
        check_serve(ServeConfig(device="cuda"))
    with pytest.raises(ConfigError, match=r"^serve.expert_gpus \(1 x 1 replicas\)"):
        check_serve(ServeConfig(expert_gpus=1.0))
    check_serve(ServeConfig())  # cpu / auto: fine
    local(gpus=2)
    check_serve(ServeConfig(device="cuda:1", expert_gpus=1.0, expert_replicas=2))
    with pytest.raises(ConfigError, match="^serve.expert_gpus"):
        check_serve(ServeConfig(expert_gpus=1.0, expert_replicas=3))


def test_select_checks_the_sections_it_trains_with_before_ray(tmp_path, local, capsys):
    """gs-ray select: G-SNR trains its ensemble (gsnr.*), the other methods may warm up
    (warmup.*); a device, GPU or target module the job cannot have fails before Ray starts."""
    from gs_ray.cli import main
    from gs_ray.preflight import check_select

    gsnr = ["--selection.method", "gsnr"]
    with pytest.raises(ConfigError, match="^gsnr.use_gpu is true but this machine has no GPU"):
        check_select(_cfg(tmp_path, *gsnr, "--gsnr.use_gpu", "true"))
    with pytest.raises(ConfigError, match="^warmup.use_gpu is true"):
        check_select(_cfg(tmp_path, "--selection.method", "gist", "--warmup.use_gpu", "true"))
    # only the sections select trains with: the experts' and Stage II's are not its business
    assert check_select(_cfg(tmp_path, *gsnr, "--experts.use_gpu", "true")) == []
    assert check_select(_cfg(tmp_path, *gsnr, "--warmup.use_gpu", "true")) == []
    assert check_select(_cfg(tmp_path, "--stage2.cpus_per_worker", "64")) == []
    with pytest.raises(ConfigError, match="^model.device is 'cuda'"):
        check_select(_cfg(tmp_path, *gsnr, "--model.device", "cuda"))
    with pytest.raises(ConfigError, match=r"^lora.target_modules\[1\]: 'v_prj'"):
        check_select(_cfg(tmp_path, *gsnr, "--lora.target_modules", "[q_proj, v_prj]"))
    # the command: one line naming the key, exit status 2, nothing written
    out = tmp_path / "runs"
    code = main(
        ["select", "--method", "gsnr", "--output-dir", str(out), "--gsnr.use_gpu", "true"]
        + ["--model.cache_dir", str(tmp_path / "c"), "--data.demo_size", "64"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("gs-ray: config error: gsnr.use_gpu is true"), err
    assert not out.exists() or not any(out.iterdir())
