"""The compare commands: params, accuracy, speed and sweep (smoke runs; speed is never asserted)."""

from __future__ import annotations

import json
import os
import shlex

import jax
import numpy as np
import pytest
from flax import nnx

from compare import accuracy, params, speed, sweep
from compare.convert import MODEL_NAMES, nnx_module, torch_model
from flax_impl import model as flax_model
from flax_impl.common.config import Config, build_parser
from flax_impl.common.models import MODELS, PARAMETER_LIMIT
from flax_impl.extras.kernels import FAST, STOCK
from tests.conftest import SHAPE_BATCH_SIZE, SHAPE_EPOCHS, SHAPE_STEPS, SHAPE_STEPS_PER_CALL


def test_params_counts_agree_in_all_three_and_each_table_model_is_under_its_budget(capsys):
    assert params.main(["--model", "all", "--json"]) == 0
    tables = {table["model"]: table for table in json.loads(capsys.readouterr().out)}
    assert list(tables) == list(MODEL_NAMES)
    for name, table in tables.items():
        assert table["flax_total"] == table["nnx_total"] == table["torch_total"] > 0, name
        assert table["match"] and all(row["match"] for row in table["rows"]), name
    for name, spec in MODELS.items():
        assert tables[name]["budget"] == spec.budget and tables[name]["under_limit"], name
        assert tables[name]["flax_total"] < spec.budget <= PARAMETER_LIMIT, name
    assert tables["seednet"]["budget"] is None  # the seed README's network: far over 20k
    assert tables["seednet"]["flax_total"] > 100 * PARAMETER_LIMIT


def test_params_counts_come_from_the_models():
    table = params.parameter_table("net")
    torch_count = sum(p.numel() for p in torch_model("net").parameters())
    nnx_count = sum(x.size for x in jax.tree.leaves(
        nnx.state(nnx.eval_shape(lambda: nnx_module("net")), nnx.Param)))
    linen_count = sum(x.size for x in jax.tree.leaves(jax.eval_shape(
        lambda: flax_model.create_model("net", 0.0).init(
            jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"])))
    assert table["torch_total"] == torch_count
    assert table["nnx_total"] == nnx_count
    assert table["flax_total"] == linen_count
    assert table["flax_total"] == sum(r["flax_count"] for r in table["rows"])


def test_params_flags_a_mismatch(monkeypatch, capsys):
    real = params.flax_shapes

    def one_wrong(model, widths=None):
        shapes = dict(real(model, widths))
        shapes["params", ("head", "bias")] = (11,)
        return shapes

    monkeypatch.setattr(params, "flax_shapes", one_wrong)
    assert params.main([]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def write_runs(root, finals: dict[str, list[float]]):
    for framework, accuracies in finals.items():
        (root / framework).mkdir(parents=True)
        for seed, final in enumerate(accuracies):
            records = [{"epoch": e, "train_loss": 0.1, "test_loss": 0.02,
                        "test_accuracy": final - 0.001 * (2 - e), "seconds": 60.0}
                       for e in (1, 2)]
            (root / framework / f"seed{seed}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records))


def test_accuracy_summarises_both_frameworks_and_draws_curves(tmp_path, capsys):
    write_runs(tmp_path, {"flax": [0.995, 0.996], "torch": [0.9955, 0.9945]})
    assert accuracy.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "99.55 ± 0.07" in out and "verdict: every run ends at >= 99.4 %" in out
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000


def test_accuracy_reads_a_recipes_own_folder_and_tables_every_recipes_time_to_target(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # results/ and results/fast/ below it
    write_runs(tmp_path / "results", {"flax": [0.9952, 0.9968], "torch": [0.9955, 0.9945]})
    write_runs(tmp_path / "results" / "fast", {"flax": [0.9941], "torch": [0.9939]})
    (tmp_path / "results" / "fast" / "whole_process.txt").write_text(
        "# machine\nflax seed0 50.0 s  final\nflax seed0 44.0 s  final\ntorch seed0 60.5 s\n")
    assert accuracy.main(["--recipe", "fast"]) == 1  # torch's run ends at 99.39 %
    out = capsys.readouterr().out
    assert (tmp_path / "results" / "fast" / "accuracy.png").is_file()
    rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines()
            if line.split()[:1] in (["default"], ["fast"])}
    # recipe, framework, runs, final mean, min, at >= 99.4, first epoch, s to it, whole process
    assert rows["default", "flax"] == ["default", "flax", "2", "99.60", "99.52", "2/2", "1",
                                       "60", "-"]
    assert rows["fast", "flax"][2:] == ["1", "99.41", "99.41", "1/1", "2", "120", "44"]
    assert rows["fast", "torch"][5:] == ["0/1", "-", "-", "60"]
    assert ("tinynet", "flax") not in rows  # no runs: no row


FAKE_TRAINER = """
import argparse, json, pathlib, sys, time
time.sleep(0.2)  # what whole_process.txt must count
parser = argparse.ArgumentParser()
for flag in ("--recipe", "--seed", "--epochs", "--workdir"):
    parser.add_argument(flag)
args = parser.parse_args()
print("training", args.recipe, "seed", args.seed)
if args.seed == "9":
    sys.exit(3)
workdir = pathlib.Path(args.workdir)
workdir.mkdir(parents=True)
(workdir / "config.json").write_text(json.dumps({"recipe": args.recipe, "epochs": args.epochs}))
(workdir / "metrics.jsonl").write_text(json.dumps(
    {"epoch": 1, "test_loss": 0.02, "test_accuracy": 0.99 + int(args.seed) / 1000,
     "seconds": 1.0}) + "\\n")
"""


def test_accuracy_run_keeps_each_runs_metrics_config_log_and_whole_process_time(
        tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(accuracy, "FRAMEWORKS", {"flax": "fake_trainer", "torch": "fake_trainer"})
    results = tmp_path / "results"
    accuracy.run_training(results, [4, 5], epochs=3, recipe="fast")
    for framework in ("flax", "torch"):
        assert json.loads((results / framework / "seed5.config.json").read_text()) == {
            "recipe": "fast", "epochs": "3"}
        assert "training fast seed 5" in (results / framework / "seed5.log").read_text()
        assert accuracy.load_runs(results)[framework][4][0]["test_accuracy"] == 0.994
    seconds = accuracy.whole_process_seconds(results)
    assert sorted(seconds) == [("flax", 4), ("flax", 5), ("torch", 4), ("torch", 5)]
    assert all(s >= 0.2 for s in seconds.values())
    assert (results / "whole_process.txt").read_text().startswith("# ")
    assert "flax seed5" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--seed 9 failed \(exit 3\); its output: .*seed9.log"):
        accuracy.run_training(results, [9], epochs=None, recipe="fast")


def test_accuracy_fails_when_a_run_misses_the_target(tmp_path, capsys):
    write_runs(tmp_path, {"flax": [0.995, 0.993], "torch": [0.995]})
    assert accuracy.main(["--results", str(tmp_path)]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.slow
def test_speed_benchmark_runs_and_writes_json(tmp_path, tiny_idx_source, monkeypatch, capsys):
    # The recipe at the suite's run shape: the compilation cache holds its programs.
    monkeypatch.setattr(speed, "recipe_config", lambda recipe, **overrides: Config(
        epochs=SHAPE_EPOCHS, batch_size=SHAPE_BATCH_SIZE, **overrides))
    out = tmp_path / "speed.json"
    assert speed.main(["--steps", str(2 * SHAPE_STEPS_PER_CALL), "--steps-per-call",
                       str(SHAPE_STEPS_PER_CALL), "--no-epoch", "--json", str(out),
                       "--data-source", tiny_idx_source]) == 0
    printed = capsys.readouterr().out
    assert "training images/s" in printed
    numbers = json.loads(out.read_text())
    # the persistent compilation cache is on, as for training (here: the tests' directory)
    assert numbers["compilation_cache"] == os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert f"compilation cache: {numbers['compilation_cache']}" in printed
    assert numbers["flax"]["step"]["n"] == 2  # rounds: one scan call each, then as many
    assert numbers["torch"]["step"]["n"] == 2 * SHAPE_STEPS_PER_CALL  # torch steps
    assert numbers["paired_step_speedup"] > 0
    assert numbers["train_flops_per_image"] == speed.train_flops_per_image()
    assert numbers["steps_per_epoch"] == SHAPE_STEPS and numbers["batch_size"] == SHAPE_BATCH_SIZE


class FakeBench:
    """A `FlaxBench` stand-in: how it was built, and a step time of 1 ms, 2 ms with the stock
    kernels, 3 ms one step per call, 1.5x in NNX."""

    built = []

    def __init__(self, data, config, steps_per_call, kernels="auto"):
        self.config, self.steps_per_call, self.kernels = config, steps_per_call, kernels
        self.warmup_seconds = 0.5
        FakeBench.built.append(self)

    def train(self, chunk, calls=1):
        seconds = 2e-3 if self.kernels is STOCK else 1e-3
        seconds *= (3 if self.steps_per_call == 1 else 1) * (1.5 if self.config.api == "nnx"
                                                             else 1)
        return seconds


def test_the_ablation_times_each_variant_against_the_fast_kernels(monkeypatch):
    monkeypatch.setattr(speed, "FlaxBench", FakeBench)
    FakeBench.built = []
    timed = speed.ablation(None, Config(), rounds=3, steps_per_call=4)
    assert list(timed) == ["default", "python_loop", *speed.ablation_variants()]
    kernels = {name: bench.kernels for name, bench in zip(timed, FakeBench.built, strict=True)}
    assert kernels["default"] is FAST and kernels["stock"] is STOCK
    assert timed["default"] == pytest.approx({"median_ms": 1.0, "slowdown": 1.0})
    assert timed["stock"] == pytest.approx({"median_ms": 2.0, "slowdown": 2.0})
    assert timed["python_loop"]["slowdown"] == pytest.approx(3.0)
    lines = speed.ablation_lines(timed)
    assert [line.split()[0] for line in lines] == ["fast", "first", "rotation", "XLA's", "Python",
                                                   "XLA's", "stock"]


def test_the_nnx_comparison_times_the_products_nnx_path_against_linen(monkeypatch):
    monkeypatch.setattr(speed, "FlaxBench", FakeBench)
    FakeBench.built = []
    timed = speed.nnx_comparison(None, Config(), rounds=2, steps_per_call=4)
    assert list(timed) == list(speed.NNX_VARIANTS)
    built = {name: (bench.config.api, bench.steps_per_call)
             for name, bench in zip(timed, FakeBench.built, strict=True)}
    assert built == {"linen_scan": ("linen", 4), "nnx_scan": ("nnx", 4),
                     "linen_step": ("linen", 1), "nnx_step": ("nnx", 1)}
    assert [timed[name]["slowdown"] for name in timed] == pytest.approx([1.0, 1.5, 1.0, 1.5])
    assert timed["nnx_step"]["median_ms"] == pytest.approx(4.5)


def test_flop_count_agrees_with_torchs_flop_counter():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from torch_ref.model import create_model

    model = create_model("net", 0.0).train()
    with FlopCounterMode(display=False) as counter:  # convolutions and matmuls, fwd + bwd
        model(torch.randn(4, 1, 28, 28)).sum().backward()
    assert speed.train_flops_per_image() == counter.get_total_flops() / 4


def test_each_ablation_variant_builds_another_train_step():
    """Each variant must change the lowered step (else the ablation times the default twice)."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from flax_impl import core
    from flax_impl import train as flax_train

    config = Config(batch_size=8)
    batches = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P("data"))
    arguments = (jax.ShapeDtypeStruct((64, 28, 28), np.uint8),
                 jax.ShapeDtypeStruct((64,), np.uint8), jax.ShapeDtypeStruct((2, 8), np.int32),
                 jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 2)))

    def lowered_step(kernels) -> str:
        port = flax_train.create_port(config, 10, kernels)
        state = jax.eval_shape(port.init, jax.random.key(0))
        return core.make_train_chunk(port.train_step, batches).lower(state, *arguments).as_text()

    default = lowered_step(FAST)
    assert lowered_step(FAST) == default
    variants = {name: lowered_step(kernels) for name, kernels in speed.ablation_variants().items()}
    for name, text in variants.items():
        assert text != default, name
    assert len(set(variants.values())) == len(variants)


def test_speeds_conv_shapes_are_nets_convolutions_in_order():
    widths = MODELS["net"].widths
    shapes = speed.conv_shapes(4)
    assert [name for name, _, _ in shapes] == [f"block{i}.conv" for i in range(1, 7)]
    assert [shape for _, shape, _ in shapes][:3] == [(4, 1, 28, 28), (4, widths[0], 26, 26),
                                                     (4, widths[1], 12, 12)]
    assert [out for _, _, out in shapes] == list(widths)


def test_params_counts_a_model_at_the_widths_given(capsys):
    assert params.main(["--model", "net", "--widths", "8,10,12,12,14,14", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["widths"] == [8, 10, 12, 12, 14, 14]
    assert table["flax_total"] == params.parameter_table("tinynet")["flax_total"]
    with pytest.raises(SystemExit):
        params.main(["--model", "net", "--widths", "8,10"])
    assert "--widths needs 6 positive integers for net" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        params.main(["--model", "net", "--widths", "8,x"])
    assert "--widths: takes comma-separated integers" in capsys.readouterr().err


def test_sweep_runs_every_variant_and_seed_on_the_validation_split(tmp_path, monkeypatch):
    (tmp_path / "fake_trainer.py").write_text(
        "import sys\nprint('Validation set: Average loss: 0.1, Accuracy: 1/1 (100.00%)', "
        "' '.join(sys.argv[1:]))\nsys.exit(3 if '--seed' in sys.argv and "
        "sys.argv[sys.argv.index('--seed') + 1] == '9' else 0)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(sweep, "TRAINERS", {"flax": "fake_trainer", "torch": "fake_trainer"})
    out = tmp_path / "sweep.txt"
    assert sweep.main(["--out", str(out), "--seeds", "0,9", "--parallel", "2",
                       "--variants", "b128,wide_b64"]) == 0
    lines = sorted(out.read_text().splitlines())
    assert len(lines) == 4
    assert lines[0].startswith("b128 seed0 ") and ":: Validation set:" in lines[0]
    assert lines[1].startswith("b128 seed9 ") and "FAILED (exit 3)" in lines[1]
    assert sweep.main(["--out", str(out), "--seeds", "1", "--variants", "b128",
                       "--framework", "torch"]) == 0
    assert out.read_text().splitlines()[-1].startswith("b128@torch seed1 ")
    widened = sweep.command(sweep.VARIANTS["wide_b64"], 3)
    assert widened[-4:] == ["--validation", "10000", "--seed", "3"]
    assert "--widths" in widened and "10,16,20,20,24,32" in widened


def test_sweep_summary_gives_each_variants_mean_min_and_count(tmp_path, capsys):
    lines = ["b64 seed0 F :: Validation set: Average loss: 0.1, Accuracy: 9941/10000 (99.41%) :: 3 s",
             "b64 seed2 F :: Validation set: Average loss: 0.1, Accuracy: 9937/10000 (99.37%) :: 3 s",
             "b128 seed0 F :: FAILED (exit 1): boom :: 3 s",
             "b128 seed1 F :: Validation set: Average loss: 0.1, Accuracy: 9950/10000 (99.50%) :: 3 s"]
    (tmp_path / "a.txt").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(lines[2:]) + "\n")
    assert sweep.main(["--summary", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["b128", "1", "99.500", "99.50", "1", "/", "1", "1-1"]
    assert table[2].split() == ["b64", "2", "99.390", "99.37", "1", "/", "2", "0,2"]


def test_every_sweep_variant_is_flags_the_trainer_takes_and_the_default_is_the_first_sweep():
    parser = build_parser("python -m flax_impl.train", "", "flax")
    for name, flags in sweep.VARIANTS.items():
        parser.parse_args(shlex.split(flags))  # argparse exits on a flag the trainer lacks
        assert "--seed" not in flags and "--validation" not in flags, name  # the sweep's own
    first = sweep.FIRST_SWEEP.split(",")
    assert first[0] == "default3" and first[-1] == "wide_b64"
    assert set(sweep.SECOND_SWEEP.split(",")) | set(sweep.MARGIN_SWEEP.split(",")) <= \
        set(sweep.VARIANTS)


def test_sweep_refuses_an_unknown_variant(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--out", str(tmp_path / "x"), "--variants", "b128,nope"])
    assert "unknown variant(s) nope" in capsys.readouterr().err


def test_accuracy_time_command_records_each_bare_command(tmp_path, monkeypatch):
    (tmp_path / "fake_trainer.py").write_text(
        "import sys\nassert sys.argv[1:] == ['--recipe', 'fast']\n"
        "print('Done: 3 epochs in 0.1 min; final test accuracy 99.50%')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(accuracy, "FRAMEWORKS", {"flax": "fake_trainer", "torch": "fake_trainer"})
    assert accuracy.main(["--recipe", "fast", "--results", str(tmp_path / "r"),
                          "--time-command", "2"]) == 0
    lines = (tmp_path / "r" / "command_time.txt").read_text().splitlines()
    assert lines[0].startswith("# ") and len(lines) == 5
    assert lines[1].startswith("flax round1 ") and lines[-1].startswith("torch round2 ")
    assert all("final test accuracy 99.50%" in line for line in lines[1:])


def test_accuracy_time_command_cold_runs_flax_on_a_new_cache_then_again(tmp_path, monkeypatch):
    (tmp_path / "fake_trainer.py").write_text(
        "import os, pathlib\n"
        "cache = pathlib.Path(os.environ.get('MNIST20K_JAX_CACHE', 'none'))\n"
        "state = 'warm' if (cache / 'entry').exists() else 'cold'\n"
        "if cache.is_dir():\n    (cache / 'entry').write_text('compiled')\n"
        "print(f'Done: 3 epochs in 0.1 min; final test accuracy 99.50% {state} {cache.name}')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("MNIST20K_JAX_CACHE", "off")
    monkeypatch.setattr(accuracy, "FRAMEWORKS", {"flax": "fake_trainer", "torch": "fake_trainer"})
    assert accuracy.main(["--recipe", "fast", "--results", str(tmp_path / "r"),
                          "--time-command", "2", "--cold"]) == 0
    lines = (tmp_path / "r" / "command_time.txt").read_text().splitlines()
    assert "cold then warm" in lines[0] and len(lines) == 7
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["flax_cold", "flax_warm", "torch"] * 2
    states = [line.split()[-2] for line in lines[1:]]
    assert states[:2] == states[3:5] == ["cold", "warm"]
    caches = [line.split()[-1] for line in lines[1:]]
    assert caches[0] == caches[1] != caches[3]  # a new cache each round
    assert caches[2] == caches[5] == "off"  # torch runs with the environment as it is
