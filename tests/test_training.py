"""LoRA training on Ray Train + DeepSpeed: the warm-up, the experts in parallel, retries.

The Ray tests share the session's local Ray (2 CPUs) and a tiny Llama (hidden 64, 2 layers).
One warm-up run (ZeRO-2, two data-parallel workers) feeds one parallel expert run (three experts
at ZeRO-1 on one CPU each, one of them crashing once) and one sequential run (ZeRO-0, one expert
and one that cannot start). LoRA dropout is 0 so a training step's loss can be recomputed exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gs_ray import faults
from gs_ray.config import DataConfig, ExpertConfig, LoRAConfig, ModelConfig, TrainingConfig
from gs_ray.core.gradients import collate, per_sample_loss
from gs_ray.core.models import add_lora, load_base_model, load_tokenizer, materialize_base_model
from gs_ray.data import Sample, length_bucketed_batches, load_samples
from gs_ray.training.loop import mean_loss, planned_steps
from gs_ray.training.ray_train import (
    AdapterJob,
    _read_attempts,
    deepspeed_config,
    resolve_use_gpu,
    train_many_on_ray,
    train_on_ray,
)

MODEL = ModelConfig(tiny_hidden_size=64, tiny_num_layers=2, tiny_pretrain_steps=0)
LORA = LoRAConfig(r=8, alpha=16, dropout=0.0)
N_WARMUP, N_EXPERT = 64, 24
WARMUP_CFG = TrainingConfig(
    epochs=3, batch_size=8, lr=5e-3, zero_stage=2, num_workers=2, use_gpu="false", log_every=4
)
EXPERT_CFG = ExpertConfig(
    epochs=2, batch_size=8, lr=5e-3, zero_stage=1, num_workers=1, use_gpu="false", max_failures=1
)
FAIL_AT = 4  # the first step of the second epoch (3 steps per epoch)
FAULT = "trainer:expert_1:1:1"  # gs_ray.faults: expert_1 dies after step 1 of epoch 1 (FAIL_AT)


# --------------------------------------------------------------------------- no Ray needed


def test_deepspeed_config_follows_the_training_config():
    cfg = TrainingConfig(batch_size=4, grad_accum=3, zero_stage=1)
    ds = deepspeed_config(cfg, ModelConfig(dtype="bfloat16"), world_size=2, cuda=False)
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # CPU: float32
    on_gpu = deepspeed_config(cfg, ModelConfig(dtype="bfloat16"), world_size=1, cuda=True)
    assert on_gpu["bf16"]["enabled"] and not on_gpu["fp16"]["enabled"]
    fp32_gpu = deepspeed_config(cfg, ModelConfig(dtype="float32"), world_size=1, cuda=True)
    assert not fp32_gpu["bf16"]["enabled"]
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(TrainingConfig(zero_stage=3), MODEL, 1, cuda=False)


def test_use_gpu_setting_and_argument_checks(tmp_path):
    assert resolve_use_gpu(TrainingConfig(use_gpu="false")) is False
    assert resolve_use_gpu(TrainingConfig(use_gpu="true")) is True
    with pytest.raises(ValueError, match="use_gpu"):
        resolve_use_gpu(TrainingConfig(use_gpu="sometimes"))
    job = AdapterJob("x", "base", str(tmp_path / "out"), [([1, 2], [-100, 2])])
    with pytest.raises(ValueError, match="absolute"):
        train_on_ray(job, MODEL, LORA, TrainingConfig(), 0, "relative/storage")
    with pytest.raises(ValueError, match="unique"):
        train_many_on_ray([job, job], MODEL, LORA, TrainingConfig(), 0, str(tmp_path))


def test_workers_ask_for_cpus_a_gpu_and_the_configured_resource():
    from gs_ray.config import Config, apply_overrides
    from gs_ray.training.ray_train import worker_resources

    assert worker_resources(TrainingConfig(cpus_per_worker=2), use_gpu=False) == {"CPU": 2.0}
    assert worker_resources(TrainingConfig(), use_gpu=True) == {"CPU": 1.0, "GPU": 1.0}
    cfg = apply_overrides(Config(), ["--experts.worker_resource", "fake_gpu"])
    assert worker_resources(cfg.experts, use_gpu=False) == {"CPU": 1.0, "fake_gpu": 1.0}
    assert cfg.warmup.worker_resource == ""  # per training section
    with pytest.raises(Exception, match="experts.worker_resource"):
        apply_overrides(Config(), ["--experts.worker_resource", "two words"])


def test_adapters_are_packed_into_the_runs_the_cluster_holds():
    from gs_ray.training.ray_train import pack_runs

    def job(name, n, max_steps=None):
        return AdapterJob(name, "base", "out", [([1], [1])] * n, max_steps=max_steps)

    cfg = ExpertConfig(epochs=1, batch_size=1)
    jobs = [job("a", 5), job("b", 9), job("c", 4), job("d", 3), job("g", 100, max_steps=6)]
    # Planned steps a 5, b 9, c 4, d 3, g 6 (its own max_steps). Longest first, each to the run
    # with the fewest steps so far: b -> 1 (9), g -> 2 (6), a -> 2 (11), c -> 1 (13), d -> 2 (14);
    # a run keeps the given order.
    runs = pack_runs(jobs, cfg, 2)
    assert [[j.name for j in r] for r in runs] == [["b", "c"], ["a", "d", "g"]]
    assert [[j.name for j in r] for r in pack_runs(jobs, cfg, 2)] == [["b", "c"], ["a", "d", "g"]]
    assert [[j.name for j in r] for r in pack_runs(jobs, cfg, 1)] == [["a", "b", "c", "d", "g"]]
    assert len(pack_runs(jobs, cfg, 99)) == 5  # never more runs than jobs, never an empty one
    assert pack_runs(jobs, cfg, 2, "off") == [[j] for j in jobs]
    assert pack_runs(jobs[:1], cfg, 3) == [jobs[:1]]


def test_uneven_adapters_share_fewer_wider_runs_and_even_ones_keep_a_run_per_slot():
    """fewest_runs: a run of m CPU slots trains 1 + 0.35 (m - 1) times as fast as one. Even work,
    or work two slots share well, keeps one run per slot; one large adapter beside small ones
    (a dominant cluster) takes every slot in one run, which would otherwise idle; never more
    runs than adapters, and no widening past the largest node. widened asks for the slots' CPUs
    up to the node's."""
    from gs_ray.training.ray_train import fewest_runs, widened

    assert fewest_runs([100] * 8, 2) == 2
    assert fewest_runs([300, 200], 2) == 2  # 300 against 500 / 1.35 = 370
    assert fewest_runs([448, 40], 2) == 1  # the default run's experts: 448 against 488 / 1.35
    assert fewest_runs([448, 40], 2, widest=1) == 2  # no node holds a wider worker
    assert fewest_runs([448, 40], 2, widest=0) == 2  # no CPU free now: no wider worker either
    assert fewest_runs([400, 50, 50, 50], 4) == 1  # 550 / 2.05 = 268 < 400 / 1.35 = 296 < 400
    assert fewest_runs([400, 300, 300, 200], 4) == 4  # 400 < 600 / 1.35 < 1200 / 2.05
    assert fewest_runs([7], 4) == 1 and fewest_runs([5, 5], 8) == 2
    cfg = ExpertConfig(cpus_per_worker=1)
    assert widened(cfg, 2, node_cpus=16).cpus_per_worker == 2.0
    assert widened(cfg, 4, node_cpus=3).cpus_per_worker == 3.0
    assert widened(ExpertConfig(cpus_per_worker=4), 2, node_cpus=2).cpus_per_worker == 4.0
    assert widened(cfg, 1, node_cpus=16) is cfg


def test_a_run_of_many_adapters_has_a_folder_name_that_fits(tmp_path):
    """Sixteen experts of gs-ray eval in one run (a one-GPU cluster): their names joined were
    over 255 bytes, and the run could not make its folder. The name is short, stable, and
    tells runs apart; a short join stays as it was."""
    from gs_ray.training.ray_train import RUN_NAME_MAX, run_name

    def jobs(prefix, n):
        return [AdapterJob(f"{prefix}-expert_{k}", "base", "out", []) for k in range(n)]

    many = jobs("eval-s0-embedding_kmeans", 16)
    name = run_name(many)
    assert len(f"{name}.gs_ray".encode()) <= RUN_NAME_MAX + len(".gs_ray") < 255
    assert name.startswith("eval-s0-embedding_kmeans-expert_0+15-more-")
    (tmp_path / f"{name}.gs_ray").mkdir()
    assert run_name(many) == name  # a resumed call finds its run
    assert run_name(many[:15]) != name and run_name(jobs("eval-s1-embedding_kmeans", 16)) != name
    assert (
        run_name(many[:2]) == "eval-s0-embedding_kmeans-expert_0+eval-s0-embedding_kmeans-expert_1"
    )
    long_first = [AdapterJob("x" * 300, "base", "out", []), *many]
    assert len(run_name(long_first).encode()) <= RUN_NAME_MAX


def test_a_run_the_others_wait_for_takes_every_cpu_slot(ray_session, monkeypatch):
    """alone_on_the_cluster on the suite's 2-CPU head: a 1-CPU worker takes both CPUs, a
    2-CPU one stays, a wider one is never cut; not the CPUs something else holds (a placement
    group here); GPU runs and runs on a node type's resource are left as they are."""
    import time

    import ray

    from gs_ray.training import ray_train
    from gs_ray.training.ray_train import alone_on_the_cluster

    deadline = time.time() + 60  # the lane's earlier tests' actors give their CPUs back
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert alone_on_the_cluster(ExpertConfig(cpus_per_worker=1)).cpus_per_worker == 2.0
    settle = ray_train.FREE_CPU_SETTLE_S
    monkeypatch.setattr(ray_train, "FREE_CPU_SETTLE_S", 0.5)
    holder = ray.util.placement_group([{"CPU": 1}])  # another job's reservation, say
    try:
        ray.get(holder.ready(), timeout=60)
        assert alone_on_the_cluster(ExpertConfig(cpus_per_worker=1)).cpus_per_worker == 1
    finally:
        ray.util.remove_placement_group(holder)
    # given back a moment later: the settle waits for it
    monkeypatch.setattr(ray_train, "FREE_CPU_SETTLE_S", settle)
    assert alone_on_the_cluster(ExpertConfig(cpus_per_worker=1)).cpus_per_worker == 2.0
    assert alone_on_the_cluster(ExpertConfig(cpus_per_worker=2)).cpus_per_worker == 2.0
    assert alone_on_the_cluster(ExpertConfig(cpus_per_worker=4)).cpus_per_worker == 4.0
    assert alone_on_the_cluster(ExpertConfig(worker_resource="fake_gpu")).cpus_per_worker == 1
    monkeypatch.setattr(ray_train, "resolve_use_gpu", lambda cfg: True)
    assert alone_on_the_cluster(ExpertConfig(cpus_per_worker=1)).cpus_per_worker == 1


def test_progress_relay_gives_the_newest_whole_step_line(tmp_path):
    from gs_ray.training.ray_train import ProgressRelay

    path = tmp_path / "progress.jsonl"
    relay = ProgressRelay(path, every=0.01)
    assert relay.poll() is None  # no file yet
    line = '{"job": "pretrain", "step": %d, "planned": 400, "loss": %s, "t": 1.0}\n'
    path.write_text(line % (50, 3.5) + line % (100, 2.25) + '{"job": "pre')  # last: half written
    assert relay.poll() == "pretrain: step 100/400 loss 2.2500"
    assert relay.poll() is None  # nothing new, the half line is not read
    with path.open("a") as f:
        f.write('train", "step": 150, "planned": 400, "loss": 2.0, "t": 2.0}\n')
    assert relay.poll() == "pretrain: step 150/400 loss 2.0000"


def test_attempt_history_is_read_per_attempt(tmp_path):
    log = tmp_path / "attempts.jsonl"
    log.write_text(
        '{"attempt": 1, "start": 1.0}\n{"attempt": 1, "crashed": 2.0, "step": 4}\n'
        '{"attempt": 2, "start": 3.0}\n{"attempt": 2, "end": 5.0}\n'
    )
    history = _read_attempts(log)
    assert history == [
        {"attempt": 1, "start": 1.0, "crashed": 2.0, "step": 4},
        {"attempt": 2, "start": 3.0, "end": 5.0},
    ]
    # A run that trains several adapters: each job's events, in the attempts that trained it.
    log.write_text(
        '{"attempt": 1, "start": 1.0}\n{"attempt": 1, "job": "a", "start": 1.5}\n'
        '{"attempt": 1, "job": "a", "end": 2.0}\n{"attempt": 1, "job": "b", "start": 2.0}\n'
        '{"attempt": 2, "start": 3.0}\n{"attempt": 2, "job": "b", "start": 3.5}\n'
        '{"attempt": 2, "job": "b", "end": 4.0}\n{"attempt": 2, "end": 4.0}\n'
    )
    assert _read_attempts(log, "a") == [{"attempt": 1, "start": 1.5, "end": 2.0}]
    assert _read_attempts(log, "b") == [
        {"attempt": 1, "start": 2.0},
        {"attempt": 2, "start": 3.5, "end": 4.0},
    ]
    assert [a["attempt"] for a in _read_attempts(log)] == [1, 2]


# --------------------------------------------------------------------------- shared set-up


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Base model, tokenizer, samples, and a storage folder for Ray Train."""
    root = tmp_path_factory.mktemp("training")
    base = materialize_base_model(MODEL, root, seed=0)
    tokenizer = load_tokenizer(base)
    samples, _ = load_samples(DataConfig(source="demo", demo_size=N_WARMUP + 8), tokenizer, 0)
    pairs = [s.pair for s in samples]
    return {
        "root": root,
        "base": base,
        "pad": int(tokenizer.pad_token_id),
        "warmup_pairs": pairs[:N_WARMUP],
        "expert_pairs": [pairs[k * N_EXPERT : (k + 1) * N_EXPERT] for k in range(3)],
        "storage": str(root / "ray"),
    }


def _dataset_managers(cluster) -> set[str]:
    """Ray Train's dataset manager actors on the cluster, alive or dead (their ids)."""
    from ray.util.state import list_actors

    found = list_actors(
        address=cluster.dashboard_url,
        filters=[("class_name", "=", "DatasetManager")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return {a.actor_id for a in found}


@pytest.fixture(scope="module")
def warmup(world, ray_cluster):
    job = AdapterJob("warmup", world["base"], str(world["root"] / "warmup"), world["warmup_pairs"])
    managers = _dataset_managers(ray_cluster)
    record = train_on_ray(job, MODEL, LORA, WARMUP_CFG, world["pad"], world["storage"])
    world["dataset_managers_started"] = _dataset_managers(ray_cluster) - managers
    return record


@pytest.fixture(scope="module")
def experts(world, warmup, ray_cluster):
    """Three experts from the warm-up adapter, in parallel; expert_1 crashes once at FAIL_AT."""
    jobs = [
        AdapterJob(
            f"expert_{k}",
            world["base"],
            str(world["root"] / "experts" / f"expert_{k}"),
            world["expert_pairs"][k],
            init_adapter=warmup["output_dir"],
            seed=k,
        )
        for k in range(3)
    ]
    with pytest.MonkeyPatch.context() as env:  # the runs' workers get it with their environment
        env.setenv(faults.ENV, FAULT)
        records = train_many_on_ray(
            jobs, MODEL, LORA, EXPERT_CFG, world["pad"], world["storage"], parallel=True
        )
    return {"jobs": {j.name: j for j in jobs}, "records": records}


def _peft(base: str, adapter: str):
    """The adapter loaded with nothing but transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).eval()


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {
        n.replace(".default", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if "lora_" in n
    }


def _first_batch_loss(model, job: AdapterJob, pad: int) -> float:
    """The loss ``train_adapter`` computes at an expert's first step (rank 0 of 1, epoch 0)."""
    pairs = job.samples
    lengths = np.array([len(ids) for ids, _ in pairs])
    order = length_bucketed_batches(
        lengths, np.arange(len(pairs)), EXPERT_CFG.batch_size, 8, job.seed
    )
    with torch.no_grad():
        batch = collate([pairs[i] for i in order[0]], pad)
        return float(per_sample_loss(model, batch).mean())


def _as_samples(pairs):
    return [Sample(str(i), ids, labels) for i, (ids, labels) in enumerate(pairs)]


def _intervals(record: dict) -> list[tuple[float, float]]:
    """(start, end) of every attempt of a run, in its workers (a crash or error ends one)."""
    ends = ("end", "crashed", "failed")
    return [(a["start"], next(a[k] for k in ends if k in a)) for a in record["attempt_history"]]


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    # at equal times an end sorts before a start: touching intervals do not overlap
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


# --------------------------------------------------------------------------- Stage I: warm-up


def test_warmup_is_a_deepspeed_zero2_data_parallel_run(world, warmup, ray_session):
    assert warmup["ok"] and warmup["error"] is None
    assert warmup["engine"] == "DeepSpeedEngine"
    assert warmup["zero_stage"] == 2
    assert warmup["world_size"] == 2
    assert warmup["device"] == "cpu"
    assert warmup["attempts"] == 1 and warmup["resumed_from_epoch"] == 0
    assert warmup["steps"] == len(warmup["losses"]) == planned_steps(N_WARMUP, WARMUP_CFG, 2)
    assert warmup["epochs_done"] == WARMUP_CFG.epochs
    losses = np.array(warmup["losses"])
    assert np.isfinite(losses).all()
    assert losses[-3:].mean() < losses[:3].mean() - 0.05
    assert warmup["deepspeed_init_s"] > 0
    assert warmup["start"] <= warmup["train_start"] <= warmup["train_end"] <= warmup["end"]
    # gs-ray passes Ray Train no datasets: the run starts no dataset manager (a process that
    # did nothing, and outlived its run)
    assert world["dataset_managers_started"] == set()
    # rank 0's step lines for the driver's console (every log_every steps)
    progress = Path(world["storage"], "warmup.gs_ray", "progress.jsonl").read_text().splitlines()
    lines = [json.loads(x) for x in progress]
    assert [x["step"] for x in lines] == list(range(4, warmup["steps"] + 1, 4))
    assert {x["planned"] for x in lines} == {warmup["steps"]}


def test_warmup_adapter_loads_with_plain_peft_and_has_learned(world, warmup, ray_session):
    trained = _peft(world["base"], warmup["output_dir"])
    fresh = add_lora(load_base_model(world["base"], MODEL), LORA, seed=0)
    w_trained, w_fresh = _lora_weights(trained), _lora_weights(fresh)
    assert w_trained.keys() == w_fresh.keys() and len(w_trained) == 2 * 2 * 2  # A,B x q,v x 2
    for name, w in w_trained.items():
        if "lora_B" in name:
            assert w_fresh[name].abs().max() == 0 and w.abs().max() > 0
        else:
            assert not torch.allclose(w, w_fresh[name])
    samples = _as_samples(world["warmup_pairs"])
    assert mean_loss(trained, samples, world["pad"]) < mean_loss(fresh, samples, world["pad"])


# --------------------------------------------------------------------------- Stage III: experts


@pytest.mark.slow
def test_experts_start_from_the_warmup_adapter_and_move_away(world, warmup, experts, ray_session):
    warm = _peft(world["base"], warmup["output_dir"])
    base = load_base_model(world["base"], MODEL).eval()
    w_warm = _lora_weights(warm)
    for name, record in experts["records"].items():
        job = experts["jobs"][name]
        assert record["ok"], record["error"]
        assert record["engine"] == "DeepSpeedEngine" and record["zero_stage"] == 1
        assert record["world_size"] == 1
        # The first step's loss is the warm-up adapter's loss on that batch, not the base model's.
        expected = _first_batch_loss(warm, job, world["pad"])
        from_base = _first_batch_loss(base, job, world["pad"])
        assert record["losses"][0] == pytest.approx(expected, rel=1e-4)
        assert abs(from_base - expected) > 1e-2
        # The final expert loads with plain peft and is no longer the warm-up adapter.
        w_expert = _lora_weights(_peft(world["base"], record["output_dir"]))
        assert w_expert.keys() == w_warm.keys()
        assert max((w_expert[k] - w_warm[k]).abs().max() for k in w_warm) > 1e-4


@pytest.mark.slow
def test_experts_train_concurrently_within_the_cluster(experts, ray_session):
    records = experts["records"]
    intervals = [iv for r in records.values() for iv in _intervals(r)]
    # Some runs overlapped in time, but never more than the 2 CPUs hold (1 CPU per expert).
    assert _max_overlap(intervals) == 2
    pairs = itertools.combinations(records.values(), 2)
    assert any(a["start"] < b["end"] and b["start"] < a["end"] for a, b in pairs)


@pytest.mark.slow
def test_a_crashed_expert_is_retried_alone_from_its_checkpoint(world, experts, ray_session):
    records = experts["records"]
    crashed = records["expert_1"]
    assert crashed["ok"] and crashed["attempts"] == 2
    first, second = crashed["attempt_history"]
    assert first["step"] == FAIL_AT and "crashed" in first and "end" not in first
    assert "end" in second and second["start"] >= first["crashed"]
    # The retry resumed after the first epoch's checkpoint and finished the plan.
    assert crashed["resumed_from_epoch"] == 1
    assert crashed["steps"] == planned_steps(N_EXPERT, EXPERT_CFG) == 2 * (FAIL_AT - 1)
    run = crashed["run"]
    markers = Path(world["storage"]) / f"{run}.gs_ray"
    assert [m.name for m in markers.glob("fault-*")] == ["fault-trainer-expert_1-1-1"]
    # expert_0 and expert_2 shared the other run (2 CPUs: two runs), one after the other.
    assert records["expert_0"]["run"] == records["expert_2"]["run"] == "expert_0+expert_2"
    assert records["expert_0"]["end"] <= records["expert_2"]["start"]
    for name in ("expert_0", "expert_2"):
        other = records[name]
        assert other["ok"] and other["attempts"] == 1 and other["resumed_from_epoch"] == 0
        assert other["steps"] == planned_steps(N_EXPERT, EXPERT_CFG)
        assert Path(other["output_dir"], "adapter_config.json").exists()


@pytest.mark.slow
def test_sequential_runs_do_not_overlap_and_a_failure_stays_isolated(world, warmup, ray_session):
    cfg = dataclasses.replace(EXPERT_CFG, epochs=1, zero_stage=0, max_failures=0, parallel=False)
    good = AdapterJob(
        "seq_good",
        world["base"],
        str(world["root"] / "seq" / "good"),
        world["expert_pairs"][0],
        init_adapter=warmup["output_dir"],
    )
    broken = dataclasses.replace(
        good,
        name="seq_broken",
        output_dir=str(world["root"] / "seq" / "broken"),
        init_adapter=str(world["root"] / "no_such_adapter"),
    )
    records = train_many_on_ray([good, broken], MODEL, LORA, cfg, world["pad"], world["storage"])
    ok, bad = records["seq_good"], records["seq_broken"]
    assert ok["ok"] and ok["engine"] == "DeepSpeedEngine" and ok["zero_stage"] == 0
    assert ok["steps"] == planned_steps(N_EXPERT, cfg)
    _peft(world["base"], ok["output_dir"])  # loads
    assert not bad["ok"] and "no_such_adapter" in bad["error"]
    assert bad["attempts"] == 1 and not Path(bad["output_dir"]).exists()
    assert "no_such_adapter" in bad["attempt_history"][0]["error"]
    assert ok["end"] <= bad["start"]  # one after the other
    assert _max_overlap(_intervals(ok) + _intervals(bad)) == 1
