import os
import re
import subprocess
import sys

import pytest
import torch

from raro_fast.config import ConfigError, JobConfig, help_text, iter_fields, load_config


def test_defaults_and_cli_overrides():
    cfg = load_config([])
    assert cfg == JobConfig()
    cfg = load_config(["--raro.group_size", "4", "--loss.dual_clip=3.0", "--train.progress", "false",
                       "--warmup.max_target", "50", "--model", "some/dir", "--resume"])
    assert cfg.raro.group_size == 4
    assert cfg.loss.dual_clip == 3.0
    assert cfg.train.progress is False
    assert cfg.warmup.max_target == 50
    assert cfg.model.path == "some/dir"
    assert cfg.train.resume is True
    assert load_config(["--loss.dual_clip", "none"]).loss.dual_clip is None
    # a bare --resume is true; given a value, the value counts
    assert load_config(["--resume=false"]).train.resume is False
    assert load_config(["--resume", "false", "--model", "m"]).train.resume is False
    assert load_config(["--resume", "--model", "m"]).train.resume is True


def test_yaml_then_cli(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("raro:\n  group_size: 3\n  tau_pol: 0.5\ntrain:\n  steps: 7\n")
    cfg = load_config(["--config", str(f), "--raro.group_size", "5"])
    assert (cfg.raro.group_size, cfg.raro.tau_pol, cfg.train.steps) == (5, 0.5, 7)


def test_unknown_key_in_yaml_names_file_line_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("raro:\n  group_size: 3\n  grop_size: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3: unknown key 'raro.grop_size'"):
        load_config(["--config", str(f)])


def test_ill_typed_key_in_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: 'train.steps': expected an integer, got 'many'"):
        load_config(["--config", str(f)])


def test_bad_literal_and_unknown_cli_key():
    with pytest.raises(ConfigError, match=r"'loss.kl_estimator': 'k9' is not one of"):
        load_config(["--loss.kl_estimator", "k9"])
    with pytest.raises(ConfigError, match=r"command line: unknown key 'raro.nope'"):
        load_config(["--raro.nope", "1"])
    # an unknown section on the command line is blamed on the command line, with the key given (it said "config")
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'nosection.x': no section 'nosection'"):
        load_config(["--nosection.x", "1"])
    with pytest.raises(ConfigError, match=r"needs a value"):
        load_config(["--raro.group_size"])


def test_a_number_setting_takes_a_fraction_as_the_paper_writes_it(tmp_path):
    cfg = load_config(["--raro.lambda_pol", "1/9", "--raro.lambda_crit", " 8/9 "])
    assert (cfg.raro.lambda_pol, cfg.raro.lambda_crit) == (1 / 9, 8 / 9)
    f = tmp_path / "w.yaml"
    f.write_text("raro:\n  lambda_pol: 1/3\n")
    assert load_config(["--config", str(f)]).raro.lambda_pol == 1 / 3
    for bad in ("1/0", "1/x", "1//3"):
        with pytest.raises(ConfigError, match=f"command line: 'raro.lambda_pol': expected a number, got '{bad}'"):
            load_config(["--raro.lambda_pol", bad])


def test_a_number_setting_must_be_finite(tmp_path):
    # Python's float() reads "nan" and "inf", and no range check catches nan: --optim.lr nan trained NaN weights.
    for flag, bad in (("optim.lr", "nan"), ("rollout.temperature", "inf"), ("loss.kl_coef", "-inf"),
                      ("loss.tis_cap", "NaN")):
        with pytest.raises(ConfigError, match=f"command line: '{flag}': expected a finite number, got '{bad}'"):
            load_config([f"--{flag}", bad])
    f = tmp_path / "lr.yaml"
    f.write_text("optim:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"lr.yaml:2: 'optim.lr': expected a finite number, got nan"):
        load_config(["--config", str(f)])


def test_missing_yaml_file_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read"):
        load_config(["--config", str(tmp_path / "nope.yaml")])
    f = tmp_path / "broken.yaml"
    f.write_text("train:\n  steps: 3\nraro: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:4: invalid YAML: while parsing a flow sequence"):
        load_config(["--config", str(f)])


def test_a_setting_given_twice_in_one_file_is_refused(tmp_path):
    f = tmp_path / "twice.yaml"
    f.write_text("rollout:\n  mem_fraction: 0.3\n  tp_size: 1\n  mem_fraction: 0.4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml:4: 'rollout.mem_fraction' is set twice \(first on line 2\)"):
        load_config(["--config", str(f)])
    f.write_text("rollout:\n  mem_fraction: 0.3\nrollout:\n  tp_size: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml:3: 'rollout' is set twice \(first on line 1\)"):
        load_config(["--config", str(f)])
    other = tmp_path / "other.yaml"  # across files (and from the command line) a later value wins, as documented
    other.write_text("rollout:\n  mem_fraction: 0.4\n")
    f.write_text("rollout:\n  backend: sglang\n  mem_fraction: 0.3\n")
    assert load_config(["--config", str(f), "--config", str(other)]).rollout.mem_fraction == 0.4


def test_a_refused_value_is_reported_at_its_own_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rollout:\n  tp_size: 1\n  mem_fraction: 1.5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3: section 'rollout': rollout.mem_fraction must be in \(0, 1\)"):
        load_config(["--config", str(f)])
    f.write_text("task:\n  countdown:\n    seed: 1\n    num_numbers: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4: .*task.countdown.num_numbers must be >= 2"):
        load_config(["--config", str(f)])
    # A cross-section refusal points at the first setting it names, wherever that one was given.
    f.write_text("train:\n  steps: 3\n  mode: dpo\nloss:\n  tis_cap: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:5: section 'root': loss.tis_cap needs"):
        load_config(["--config", str(f)])
    with pytest.raises(ConfigError, match=r"command line: section 'root': loss.tis_cap needs"):
        load_config(["--config", str(f), "--loss.tis_cap", "3"])


def test_task_validation_is_reported_with_its_section():
    with pytest.raises(ConfigError, match=r"task"):
        load_config(["--task.countdown.num_numbers", "0"])


def test_settings_that_contradict_each_other_are_refused():
    with pytest.raises(ConfigError, match=r"loss.tis_cap needs the engine's log-probs .* train.mode dpo"):
        load_config(["--train.mode", "dpo", "--loss.tis_cap", "2"])
    with pytest.raises(ConfigError, match=r"dpo.rounds must be >= 1"):
        load_config(["--dpo.rounds", "0"])
    with pytest.raises(ConfigError, match=r"rollout.weight_bucket_mb must be > 0"):
        load_config(["--rollout.weight_bucket_mb", "0"])
    assert load_config(["--train.mode", "rlvr", "--loss.tis_cap", "2"]).loss.tis_cap == 2


def test_raro_values_are_validated():
    with pytest.raises(ConfigError, match=r"raro.tau_pol must lie in \[0, 1\], got 1.5"):
        load_config(["--raro.tau_pol", "1.5"])
    with pytest.raises(ConfigError, match=r"raro.group_size must be >= 1"):
        load_config(["--raro.group_size", "0"])


@pytest.mark.parametrize("flag,value,message", [
    ("--train.steps", "-5", "train.steps must be >= 0, got -5"),  # wrote an untrained final_model
    ("--warmup.steps", "-3", "warmup.steps must be >= 0, got -3"),
    ("--train.eval_size", "-1", "train.eval_size must be >= 0, got -1"),  # silently 199 of 200 puzzles
    ("--train.eval_samples", "-2", "train.eval_samples must be >= 0, got -2"),  # n = -2 samples per puzzle
    ("--rollout.max_new_tokens", "0", "rollout.max_new_tokens must be >= 1, got 0"),  # a traceback in generation
    ("--rollout.top_p", "0", r"rollout.top_p must be in \(0, 1\], got 0"),
    ("--optim.lr", "-0.1", "optim.lr must be >= 0, got -0.1"),
    ("--warmup.critic_fraction", "1.5", r"warmup.critic_fraction must lie in \[0, 1\]"),
    ("--warmup.min_target", "31", r"warmup.min_target/max_target: need min_target <= max_target, got 31, 30"),  # a hang
    ("--rollout.temperature", "0", "rollout.temperature 0 .greedy. with train.mode raro"),  # 100% truncation, loss 0
    # the upper bound is what the critic traces leave (default 0.4): 0.7 more would leave policy traces -10%
    ("--warmup.arithmetic_fraction", "0.7", r"warmup.arithmetic_fraction must lie in \[0, 1 - critic_fraction\]"),
    ("--rollout.critic_temperature", "0", "rollout.critic_temperature must be > 0"),
    ("--rollout.mem_fraction", "1", r"rollout.mem_fraction must be in \(0, 1\), got 1"),
    ("--raro.replay_ratio", "1", r"raro.replay_ratio must lie in \[0, 1\)"),  # r/(1-r): a division by zero
    ("--raro.critic_samples_per_pair", "0", "raro.critic_samples_per_pair must be >= 1, got 0"),
    ("--dpo.beta", "0", "dpo.rounds must be >= 1 and dpo.beta > 0, got 3, 0"),
    ("--optim.grad_clip", "-1", "optim.grad_clip must be >= 0, got -1"),
    ("--rollout.critic_max_new_tokens", "0", "rollout.critic_max_new_tokens must be >= 1, got 0"),
    ("--raro.lambda_crit", "-0.5", "raro.lambda_pol and raro.lambda_crit must be >= 0"),
    ("--train.max_tokens_per_micro_batch", "0", "train.max_tokens_per_micro_batch must be >= 1, got 0"),
    ("--train.eval_temperature", "-1", "train.eval_temperature must be >= 0, got -1"),  # was greedy, silently
])
def test_values_that_would_fail_deep_inside_are_refused_at_start(flag, value, message):
    with pytest.raises(ConfigError, match=f"command line: .*{message}"):
        load_config([flag, value])


@pytest.mark.parametrize("argv", [
    ["--warmup.critic_fraction", "1", "--warmup.arithmetic_fraction", "0"],  # critic traces only
    ["--warmup.critic_fraction", "0.8", "--warmup.arithmetic_fraction", "0.2"],  # 1.0 - 0.8 is 0.19999999999999996
    ["--warmup.critic_fraction", "0.33", "--warmup.arithmetic_fraction", "0.67"],
    ["--warmup.min_target", "30"],  # one warm-up target, max_target's default
    ["--raro.tau_pol", "1", "--raro.tau_crit", "0"],
    ["--rollout.critic_temperature", "0.01", "--rollout.backend", "sglang", "--rollout.mem_fraction", "0.99",
     "--raro.replay_ratio", "0"],
])
def test_the_edges_of_the_documented_ranges_are_accepted(argv):
    """Each range check takes its closed ends: a refused edge (or a float rounding 1 - 0.8 below 0.2) would stop a
    valid run at start."""
    load_config(["--model.path", ""] + argv)  # the embedded model: its warm-up reads warmup.*


@pytest.mark.parametrize("argv,message", [
    (["--train.mode", "sft", "--train.ppo_mini_batches", "2"], "train.ppo_mini_batches > 1 with train.mode sft"),
    (["--train.mode", "rationalization", "--train.ppo_mini_batches", "3"],
     "train.ppo_mini_batches > 1 with train.mode rationalization"),
    (["--train.mode", "rationalization", "--loss.tis_cap", "2"], "loss.tis_cap needs .* train.mode rationalization"),
    (["--train.mode", "sft", "--loss.tis_cap", "2"], "loss.tis_cap needs .* train.mode sft"),
])
def test_modes_that_train_on_sequences_the_engine_did_not_sample_refuse_ppo_settings(argv, message):
    with pytest.raises(ConfigError, match=f"command line: section 'root': {message}"):
        load_config(argv)
    assert load_config([argv[0], "rlvr", *argv[2:]]).train.mode == "rlvr"  # the same setting is fine for RL


def test_the_critic_pair_cap_caps_the_planned_fresh_pairs():
    """4 questions x 8 samples = 32 judged pairs per step; the cap keeps the smaller count, 0 is no cap."""
    assert load_config([]).raro.planned_fresh_pairs == 32
    assert load_config(["--raro.critic_pairs_per_step", "5"]).raro.planned_fresh_pairs == 5
    assert load_config(["--raro.critic_pairs_per_step", "100"]).raro.planned_fresh_pairs == 32


def test_command_line_spellings_of_booleans_and_none():
    for word, want in (("yes", True), ("ON", True), ("1", True), ("no", False), ("off", False), ("0", False)):
        assert load_config(["--train.progress", word]).train.progress is want
    with pytest.raises(ConfigError, match=r"command line: 'train.progress': expected true/false, got 'maybe'"):
        load_config(["--train.progress", "maybe"])
    assert load_config(["--loss.tis_cap", "2", "--loss.tis_cap", "null"]).loss.tis_cap is None
    assert load_config(["--rollout.critic_temperature", "None"]).rollout.critic_temperature is None


@pytest.mark.parametrize("text,message", [
    ("train:\n  steps: true\n", r"cfg.yaml:2: 'train.steps': expected an integer, got True"),  # int(True) is 1
    ("optim:\n  lr: false\n", r"cfg.yaml:2: 'optim.lr': expected a number, got False"),  # float(False) is 0.0
    ("train:\n  output_dir: 5\n", r"cfg.yaml:2: 'train.output_dir': expected a string, got 5"),
    ("model:\n  path: [a, b]\n", r"cfg.yaml:2: 'model.path': expected a string, got \['a', 'b'\]"),
    ("raro:\n  group_size: 3\ntrain: 5\n", r"cfg.yaml:3: 'train' is a section; expected a mapping"),
])
def test_yaml_values_of_the_wrong_type_are_refused_not_converted(tmp_path, text, message):
    f = tmp_path / "cfg.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(f)])


def test_later_config_files_merge_into_a_section_not_replace_it(tmp_path):
    """The second file's rollout section adds to the first's; replaced, tp_size would silently fall back to 1."""
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("rollout:\n  backend: sglang\n  tp_size: 2\n  mem_fraction: 0.3\n")
    b.write_text("rollout:\n  mem_fraction: 0.4\n")
    cfg = load_config(["--config", str(a), "--config", str(b)])
    assert (cfg.rollout.tp_size, cfg.rollout.mem_fraction) == (2, 0.4)


def test_greedy_rollouts_are_fine_where_no_group_compares_samples():
    """Rationalization and DPO were refused for a reason that is not theirs (found by review on 2026-12-07)."""
    for mode in ("sft", "rationalization", "dpo"):
        assert load_config(["--rollout.temperature", "0", "--train.mode", mode]).rollout.temperature == 0
    assert load_config(["--train.steps", "0", "--train.eval_size", "0"]).train.steps == 0


def test_the_critics_normaliser_plans_the_replayed_pairs_a_step_draws_on_average():
    """The replayed pairs a step draws are exact in expectation (the fraction drawn); the critic's normaliser
    rounded them, to even at halves: 5 fresh pairs at ratio 1/3 draw 2.5 and it planned 2, weighing the critic's
    objective 7% more than its planned sequences (found by review)."""
    import random

    from raro_fast.modes import make_mode

    for ratio, fresh in (("1/3", 5), ("0.6", 3), ("0.3", 32)):
        cfg = load_config(["--raro.questions_per_step", "1", "--raro.group_size", str(fresh),
                           "--raro.replay_ratio", ratio, "--raro.replay_size", "64"])
        rc, rng = cfg.raro, random.Random(0)
        drawn = sum(rc.replay_pairs_for(fresh, rng) for _ in range(40000)) / 40000
        exact = fresh * rc.replay_ratio / (1 - rc.replay_ratio)  # 2.5, 4.5, 13.71
        assert rc.planned_replay_pairs == pytest.approx(exact) and drawn == pytest.approx(exact, rel=0.01)
        critic = make_mode("raro").role_constants(cfg)["critic"]
        assert critic == pytest.approx((fresh + exact) * rc.critic_samples_per_pair
                                       * cfg.rollout.critic_max_new_tokens)
    # the buffer must hold a step's draw at most: 13.71 on average is 14 at most
    one = ["--raro.questions_per_step", "1", "--raro.group_size", "32", "--raro.replay_ratio", "0.3"]
    load_config([*one, "--raro.replay_size", "14"])
    with pytest.raises(ConfigError, match="raro.replay_size 13 holds fewer than the 14 replayed pairs"):
        load_config([*one, "--raro.replay_size", "13"])


def test_help_lists_every_field():
    text = help_text("prog")
    names = [name for name, *_ in iter_fields()]
    assert len(names) > 40
    for name in names:
        assert f"--{name} " in text


def test_shipped_configs_load():
    from pathlib import Path

    for f in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(["--config", str(f)])


def test_the_default_config_file_spells_out_the_defaults():
    from pathlib import Path

    from raro_fast.config import to_dict

    spelled = load_config(["--config", str(Path(__file__).parents[1] / "configs" / "countdown-default.yaml")])
    assert to_dict(spelled) == to_dict(load_config([]))


@pytest.mark.parametrize("command", [["-m", "raro_fast.train"], ["-m", "raro_fast.cli", "train"],
                                     ["-m", "raro_fast.cli", "train", "--nproc_per_node=2", "--standalone"]])
def test_train_help_and_bad_config_exit_codes(command):
    def answer(*args):
        out = subprocess.run([sys.executable, "-X", "importtime", *command, *args], capture_output=True, text=True)
        imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
        # --help took 5 s importing them, a mistyped setting 7 s; with torchrun's options, every rank said it
        assert "torch" not in imported and "transformers" not in imported, command
        return out.returncode, out.stdout, "\n".join(line for line in out.stderr.splitlines() if "|" not in line)

    for flag in ("--help", "-h"):
        code, stdout, _ = answer(flag)
        assert code == 0 and "--raro.tau_pol" in stdout, flag
    code, _, stderr = answer("--raro.tau_poll", "1")
    assert code == 2 and stderr.count("error: command line: unknown key 'raro.tau_poll'") == 1, stderr
    assert "Traceback" not in stderr


def test_only_colocated_engines_release_memory():
    assert load_config(["--rollout.backend", "sglang"]).rollout.released_tags == ("kv_cache",)
    assert load_config(["--rollout.backend", "sglang", "--rollout.release_memory", "kv_cache+weights"]
                       ).rollout.released_tags == ("kv_cache", "weights")
    # A server has its own GPUs; every trainer rank would release it, some while others still generate on it.
    assert load_config(["--rollout.backend", "sglang_http"]).rollout.released_tags == ()
    # Asked for where it cannot act, it is refused (found by review: accepted and ignored)
    with pytest.raises(ConfigError, match=r"command line: section 'root': rollout.release_memory with rollout.backend "
                                          r"sglang_http: a server keeps its memory"):
        load_config(["--rollout.backend", "sglang_http", "--rollout.release_memory", "kv_cache+weights"])
    for backend in ("auto", "embedded", "continuous"):
        with pytest.raises(ConfigError, match=rf"rollout.release_memory kv_cache\+weights with rollout.backend "
                                              rf"{backend}: only a colocated SGLang engine .* gives its weights back"):
            load_config(["--rollout.backend", backend, "--rollout.release_memory", "kv_cache+weights"])
    assert load_config(["--rollout.release_memory", "none"]).rollout.released_tags == ()


def test_cpu_threads_keep_a_users_omp_num_threads_and_share_cores_under_torchrun():
    from raro_fast.distributed import cpu_threads

    assert cpu_threads({}, 8) == 8
    assert cpu_threads({"OMP_NUM_THREADS": "1"}, 8) == 1  # one run of several side by side
    assert cpu_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, 8) == 3
    assert cpu_threads({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, 8) == 4  # torchrun's own default
    assert cpu_threads({"LOCAL_WORLD_SIZE": "4"}, 2) == 1
    assert cpu_threads({"OMP_NUM_THREADS": "x"}, 2) == 2


@pytest.mark.parametrize("half,group", [(False, False), (True, True)])
def test_one_cpu_process_under_torchrun_gets_a_group_only_for_mixed_precision(half, group, free_port):
    """A float32 CPU process has nothing for FSDP2 to do, and a gloo group made its steps 40% slower; a half-
    precision one needs the group (FSDP2's mixed precision). Several processes always get one (tested end to end)."""
    code = ("import torch; from raro_fast.distributed import init_distributed, shutdown; "
            f"d = init_distributed(half_precision={half}); print(d.enabled, d.rank, d.world_size); shutdown(d)")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(group), "0", "1"]


def test_a_world_size_without_a_rank_is_refused_in_one_line(tmp_path):
    """Started by a launcher that sets WORLD_SIZE only, every process ran as rank 0 of N with no group: N copies
    training apart on the first 1/N of the questions, with no error."""
    env = {**os.environ, "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RANK", None)
    out = subprocess.run([sys.executable, "-m", "raro_fast.train", "--train.output_dir", str(tmp_path / "run")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: WORLD_SIZE=2 is set but RANK is not: start the ranks with torchrun (or `raro-fast train "
        "--nproc_per_node=N`), which sets both, or unset WORLD_SIZE"]
    assert not (tmp_path / "run").exists()


def test_an_empty_value_or_a_scalar_section_in_yaml_names_file_and_line(tmp_path):
    """`steps:` with nothing after it stopped the run with a YAML parser traceback; `train: 5` with a --train.steps
    override blamed the command line."""
    f = tmp_path / "empty.yaml"
    f.write_text("rollout:\n  critic_temperature:\ntrain:\n  steps:\n")
    with pytest.raises(ConfigError, match=r"empty.yaml:4: 'train.steps': expected an integer, got None"):
        load_config(["--config", str(f)])
    cfg = load_config(["--config", str(f), "--train.steps", "3"])  # an empty value is YAML's null, as `~` is
    assert cfg.rollout.critic_temperature is None and cfg.train.steps == 3
    g = tmp_path / "scalar.yaml"
    g.write_text("raro:\n  group_size: 3\ntrain: 5\n")
    with pytest.raises(ConfigError, match=r"scalar.yaml:3: 'train' is a section; expected a mapping"):
        load_config(["--config", str(g), "--train.steps", "2"])


def test_yaml_numbers_are_read_from_their_text_as_the_command_line_reads_them(tmp_path):
    """YAML 1.1 read `seed: 0123` as octal 83 (the command line: 123), `1:20` as 80 and `0x10` as 16; an impossible
    date or a bad explicit tag stopped the run with a traceback, and a file in another encoding too (review)."""
    def load(text, name="c.yaml"):
        f = tmp_path / name
        f.write_text(text) if isinstance(text, str) else f.write_bytes(text)
        return load_config(["--config", str(f)])

    assert load("train:\n  seed: 0123\n").train.seed == load_config(["--train.seed", "0123"]).train.seed == 123
    assert load("train:\n  steps: 1_000\n  output_dir: 2026-02-30\n").train.output_dir == "2026-02-30"
    assert load("optim:\n  lr: 1.0e-4\n").optim.lr == 1e-4
    for text, message in [("train:\n  steps: 1:20\n", "c.yaml:2: 'train.steps': expected an integer, got '1:20'"),
                          ("raro:\n  replay_size: 0x10\n", "c.yaml:2: 'raro.replay_size': expected an integer, got '0x10'"),
                          ("train:\n  steps: !!int 80x\n", "c.yaml:2: 'train.steps': expected an integer, got '80x'"),
                          ("optim:\n\n  lr: 1:30.5\n", "c.yaml:3: 'optim.lr': expected a number, got '1:30.5'"),
                          ("model:\n  path: !!python/name:os.system\n", "c.yaml:2: 'model.path': could not determine a "
                                                                      "constructor"),
                          (b"# caf\xe9\ntrain:\n  steps: 3\n", "c.yaml: not UTF-8 text")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(text)


def test_a_command_line_key_below_a_setting_is_named_as_the_command_lines(tmp_path):
    """`--train.steps.x 5` blamed the config file that set train.steps (a correct line), or "config"."""
    for argv in (["--config", "configs/countdown-default.yaml", "--train.steps.x", "5"], ["--train.steps.x", "5"]):
        with pytest.raises(ConfigError, match=re.escape("command line: unknown key 'train.steps.x' ('train.steps' is a "
                                                        "setting, not a section)")):
            load_config(argv)


def test_help_names_the_choices_of_a_choice_setting():
    text = help_text("x")
    assert "--loss.kl_estimator ['k3']  (one of: k1, k2, k3)" in text and "(Literal)" not in text


def test_embedded_model_settings_are_refused_where_a_model_path_replaces_them():
    """With the default model.path (the shipped base) or a checkpoint, `--model.embedded.num_layers 8` trained the
    shipped 4-layer base and `--warmup.steps 5000` warmed up nothing, silently (found by review)."""
    for argv in (["--model.embedded.num_layers", "8"], ["--model.path", "some/model", "--warmup.steps", "5000"]):
        with pytest.raises(ConfigError, match=r"command line: .*(model.embedded.num_layers|warmup.steps): settings of "
                                              r"the embedded model and its warm-up, which model.path '.*' replaces"):
            load_config(argv)
    cfg = load_config(["--model.path", "", "--model.embedded.num_layers", "8", "--warmup.steps", "5000"])
    assert cfg.model.embedded.num_layers == 8 and cfg.warmup.steps == 5000
    # a checkpoint's own warm-up, and the shipped configs as the docs combine them
    load_config(["--model.path", "m", "--warmup.checkpoint_steps", "100", "--warmup.batch_size", "8"])
    load_config(["--config", "configs/countdown-24.yaml", "--config", "configs/qwen2.5-1.5b-countdown.yaml", "--model", "m"])


def test_an_option_is_never_taken_as_the_value_of_the_one_before():
    """Found by review: `--output-dir $RUN --resume` with RUN unset started a new run in ./--resume."""
    with pytest.raises(ConfigError, match=r"command line: --output-dir needs a value, and the next argument --resume "
                                          r"is an option \(a value that starts with -- is given as --output-dir=VALUE\)"):
        load_config(["--output-dir", "--resume"])
    assert load_config(["--output-dir=--odd", "--resume"]).train.output_dir == "--odd"
    assert load_config(["--train.seed", "-3"]).train.seed == -3  # one dash is a number's sign


def test_warm_up_settings_no_warm_up_reads_are_refused_or_said():
    """Found by review: `--warmup.arithmetic_fraction 0.3` with the shipped base, and `--warmup.checkpoint_steps 300`
    with the embedded model, were accepted and never read."""
    with pytest.raises(ConfigError, match=r"warmup.arithmetic_fraction, warmup.seed: no warm-up runs, as the shipped "
                                          r"base 'builtin:countdown-easy' was warmed up already"):
        load_config(["--warmup.arithmetic_fraction", "0.3", "--warmup.seed", "7"])
    with pytest.raises(ConfigError, match=r"warmup.checkpoint_lr: no warm-up runs, .*; pass --warmup.checkpoint_steps N"):
        load_config(["--warmup.checkpoint_lr", "1e-4"])  # not sent to the embedded model, which refuses it too
    with pytest.raises(ConfigError, match=r"warmup.checkpoint_steps, warmup.checkpoint_lr: a real checkpoint's "
                                          r"warm-up \(with --model.path\)"):
        load_config(["--model.path", "", "--warmup.checkpoint_steps", "300", "--warmup.checkpoint_lr", "1e-5"])
    # read: the embedded model's warm-up, the shipped base warmed up further, a checkpoint's warm-up
    load_config(["--model.path", "", "--warmup.arithmetic_fraction", "0.3"])
    load_config(["--warmup.checkpoint_steps", "10", "--warmup.arithmetic_fraction", "0.3"])
    # another checkpoint, not warmed up: a config file may describe its base's warm-up (smollm2.sh): train says so
    from raro_fast.config import unused_warmup_settings
    cfg = load_config(["--model.path", "m", "--warmup.batch_size", "8", "--warmup.checkpoint_lr", "1e-4"])
    assert unused_warmup_settings(cfg) == ["warmup.batch_size", "warmup.checkpoint_lr"]
    assert unused_warmup_settings(load_config(["--model.path", "m", "--warmup.checkpoint_steps", "5"])) == []


def test_another_tasks_settings_are_refused():
    """Found by review: `--task.deepmath.path my_math.jsonl` without `--task.name deepmath` trained Countdown and
    never opened the file. Countdown's settings are read with another task only where a warm-up makes puzzles."""
    with pytest.raises(ConfigError, match=r"task.deepmath.path: settings of the deepmath task, which task.name "
                                          r"countdown does not use; add --task.name deepmath"):
        load_config(["--task.deepmath.path", "/nowhere/my_math.jsonl"])
    with pytest.raises(ConfigError, match=r"task.countdown.target: settings of the countdown task, which task.name "
                                          r"poetry does not use"):
        load_config(["--task.name", "poetry", "--task.countdown.target", "24"])
    load_config(["--task.name", "poetry", "--task.countdown.target", "24", "--model.path", ""])  # the warm-up's
    # a run's config.json from another checkout holds that checkout's shipped sample: no other task's data
    load_config(["--task.deepmath.path", "/elsewhere/raro_fast/tasks/data/deepmath_sample.jsonl"])


@pytest.mark.parametrize("flag,value,message", [
    ("--loss.kl_coef", "-1", "loss.kl_coef must be >= 0, got -1"),  # no KL at all, silently (the trainer tests > 0)
    ("--loss.dual_clip", "0.5", r"loss.dual_clip must be > 1"),  # these failed at the first update, after the
    ("--loss.tis_cap", "0", "loss.tis_cap must be > 0"),  # model loaded and the step-0 evaluation ran
    ("--loss.clip_low", "-1", r"loss.clip_low must be in \[0, 1\)"),
    ("--loss.clip_high", "-0.1", "loss.clip_high must be >= 0"),
    ("--optim.beta1", "1.5", r"optim.beta1 must lie in \[0, 1\), got 1.5"),  # AdamW's, naming no setting
    ("--optim.beta2", "-0.1", r"optim.beta2 must lie in \[0, 1\)"),
])
def test_loss_and_optimizer_values_are_refused_at_start(flag, value, message):
    with pytest.raises(ConfigError, match=f"command line: .*{message}"):
        load_config([flag, value])


def test_a_replay_buffer_smaller_than_a_steps_planned_replay_is_refused():
    """The critic's normaliser plans every replayed pair: --raro.replay_size 0 (meant as "no replay") halved the
    critic's weight for the whole run, and 10 took it to 0.66 (found by review)."""
    for size in ("0", "10", "-1"):
        with pytest.raises(ConfigError, match="raro.replay_size"):
            load_config(["--raro.replay_size", size])
    assert load_config(["--raro.replay_size", "0", "--raro.replay_ratio", "0"]).raro.replay_size == 0
    assert load_config(["--raro.replay_size", "32"]).raro.replay_size == 32


@pytest.mark.parametrize("argv,message", [
    # a group of one has advantage 0: the run trained nothing, silently (found by review on 2026-12-07)
    (["--train.mode", "rlvr", "--raro.group_size", "1"], "raro.group_size 1 with train.mode rlvr: a GRPO group"),
    (["--train.mode", "rl_logit", "--raro.group_size", "1"], "raro.group_size 1 with train.mode rl_logit"),
    (["--raro.group_size", "1"], "raro.group_size 1 with train.mode raro"),
    (["--raro.critic_samples_per_pair", "1"], "raro.critic_samples_per_pair 1 with train.mode raro"),
    # DPO replaced the aggregation, and anchored the KL to its moving reference
    (["--train.mode", "dpo", "--loss.loss_agg", "token_mean"], "loss.loss_agg token_mean with train.mode dpo"),
    (["--train.mode", "dpo", "--loss.kl_coef", "0.1"], "loss.kl_coef > 0 with train.mode dpo"),
    # the game's schedule and critic outside the game: an RLVR run trained its policy from step 1
    (["--train.mode", "rlvr", "--raro.critic_lead_steps", "40"], "raro.critic_lead_steps with train.mode rlvr: "
                                                                  "settings of the RARO game"),
    (["--train.mode", "sft", "--raro.critic", "oracle"], "raro.critic with train.mode sft"),
])
def test_settings_a_mode_would_not_honour_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_the_critics_temperature_is_every_modes_for_its_tournament():
    """Every mode's tournament@n samples the critic at rollout.critic_temperature: refused outside RARO, an RLVR run
    with its tournament at 0.3 could not start (found by review on 2026-12-07)."""
    assert load_config(["--train.mode", "rlvr", "--rollout.critic_temperature", "0.3"]).rollout.critic_temperature == 0.3


def test_groups_of_one_are_fine_where_no_group_is_compared():
    for mode in ("sft", "rationalization", "dpo"):
        assert load_config(["--train.mode", mode, "--raro.group_size", "1"]).raro.group_size == 1
    assert load_config(["--train.mode", "rlvr", "--raro.critic_samples_per_pair", "1"]).train.mode == "rlvr"


def test_a_prompt_the_sampled_tokens_would_carry_past_the_models_positions_is_refused_at_start():
    """Found by review: `--rollout.critic_max_new_tokens 480` on a 512-position model failed in step 1, after the
    step-0 evaluation and the policy's rollouts had run. setup() checks the longest prompts a run samples first."""
    from types import SimpleNamespace

    from raro_fast import prompts
    from raro_fast.model.hf import load_project_tokenizer
    from raro_fast.tasks import make_task
    from raro_fast.tasks.base import Example
    from raro_fast.train import check_context

    tok = load_project_tokenizer()
    task = make_task(load_config([]).task)
    train, heldout = task.examples("train"), task.examples("heldout")
    model_config = SimpleNamespace(max_position_embeddings=512)
    check_context(load_config([]), tok, model_config, train, heldout)  # the defaults fit
    with pytest.raises(ValueError, match=r"rollout.critic_max_new_tokens 480: the longest critic prompt \(with the "
                                         r"expert's answer, the policy's empty\) has \d+ tokens \(example countdown:[^)]*\), and 480 more run past "
                                         r"the model's 512 positions"):
        check_context(load_config(["--rollout.critic_max_new_tokens", "480"]), tok, model_config, train, heldout)
    # the expert's answer counts: a long one (a poem) fails every step where the question alone fits (review); a
    # prompt past the positions without a token more is the row's fault, and named (no setting makes room)
    long_answer = [Example(id="poem", question="Write a poem.", answer="\n".join(["a line of verse"] * 60))]
    with pytest.raises(ValueError, match=r"^example poem: its critic prompt \(with the expert's answer, the policy's "
                                         r"empty\) has 946 tokens, past the model's 512 positions \(max_position_embeddings\) "
                                         r"without a token more; leave it out of the data"):
        check_context(load_config(["--train.eval_tournament", "false"]), tok, model_config, long_answer, heldout)
    # the bound is exact: the longest policy prompt plus max_new_tokens may fill the positions, not one more
    longest = max(len(prompts.render_prompt(tok, prompts.policy_messages(ex.question))) for ex in train + heldout)
    check_context(load_config(["--rollout.max_new_tokens", str(512 - longest)]), tok, model_config, train, heldout)
    with pytest.raises(ValueError, match=rf"rollout.max_new_tokens {513 - longest}: the longest policy prompt has "
                                         rf"{longest} tokens \(example [^)]*\), and {513 - longest} more run past the model's 512"):
        check_context(load_config(["--rollout.max_new_tokens", str(513 - longest)]), tok, model_config, train, heldout)
    # Only what a run samples counts (review): SFT samples no training prompt, and no critic prompt unless its
    # evaluation runs the tournament; a long training question does not stop it.
    long_question = [Example(id="long", question="Using " + ", ".join(["3"] * 150) + ", make 10.", answer="3")]
    sft = ["--train.mode", "sft", "--rollout.critic_max_new_tokens", "480", "--train.eval_tournament", "false"]
    check_context(load_config(sft), tok, model_config, long_question, heldout)
    with pytest.raises(ValueError, match="rollout.max_new_tokens 48: the longest policy prompt"):
        check_context(load_config(sft[:2]), tok, model_config, [], long_question)  # evaluated: sampled
    with pytest.raises(ValueError, match="rollout.critic_max_new_tokens 480"):
        check_context(load_config(sft[:4]), tok, model_config, [], heldout)  # the tournament samples the critic
    # a sliding attention window bounds every trained sequence (packed attention does not compute one): the run
    # stopped at the first update that met a longer one (found by review)
    windowed = SimpleNamespace(max_position_embeddings=4096, sliding_window=longest + 48 - 1)
    with pytest.raises(ValueError, match=rf"^model.path: the longest policy sequence \(its prompt and the sampled "
                                         rf"completion\) can have up to {longest + 48} tokens \(example [^)]*\), past "
                                         rf"{longest + 47}, its sliding attention window \(config.sliding_window\), "
                                         r"which packed attention does not compute; lower rollout.max_new_tokens"):
        check_context(load_config(["--train.mode", "rlvr"]), tok, windowed, train, heldout)
    windowed.sliding_window += 1
    check_context(load_config(["--train.mode", "rlvr"]), tok, windowed, train, heldout)
    with pytest.raises(ValueError, match="rollout.max_new_tokens 48: the longest policy prompt"):
        check_context(load_config(["--train.mode", "rlvr"]), tok, model_config, long_question, heldout)


def test_a_trained_sequence_one_micro_batch_cannot_hold_is_refused_at_start():
    """A sequence the run can make that `train.max_tokens_per_micro_batch` cannot hold stopped the run at packing,
    in whichever step first sampled one that long (found by review on 2026-12-07). Each mode's longest trained
    sequence is checked at start: exactly for the policy, critic and expert sequences, a few tokens over for a
    reasoning before the expert's answer; without a model context limit too."""
    from types import SimpleNamespace

    from raro_fast import prompts
    from raro_fast.model.hf import load_project_tokenizer
    from raro_fast.modes.base import expert_completion_ids
    from raro_fast.tasks import make_task
    from raro_fast.train import check_context

    tok = load_project_tokenizer()
    task = make_task(load_config([]).task)
    train, heldout = task.examples("train"), task.examples("heldout")
    unlimited = SimpleNamespace()  # no max_position_embeddings: only the budget bounds
    policy = max(len(prompts.render_prompt(tok, prompts.policy_messages(ex.question))) for ex in train) + 48
    critic = max(len(prompts.render_prompt(tok, prompts.critic_messages(ex.question, ex.answer, ""))) for ex in train)
    expert = max(len(prompts.render_prompt(tok, prompts.policy_messages(ex.question)))
                 + len(expert_completion_ids(tok, ex.answer)) for ex in train)
    assert policy < critic + 96
    budget = lambda mode, n: load_config(["--train.mode", mode, "--train.max_tokens_per_micro_batch", str(n)])  # noqa: E731
    check_context(budget("rlvr", policy), tok, unlimited, train, heldout)
    with pytest.raises(ValueError, match=rf"^train.max_tokens_per_micro_batch {policy - 1}: the longest policy sequence "
                                         rf"\(its prompt and the sampled completion\) can have up to {policy} tokens "
                                         r"\(example countdown:[^)]*\), more than one micro-batch holds; raise "
                                         r"train.max_tokens_per_micro_batch or lower rollout.max_new_tokens$"):
        check_context(budget("rlvr", policy - 1), tok, unlimited, train, heldout)
    check_context(budget("raro", critic + 96), tok, unlimited, train, heldout)
    with pytest.raises(ValueError, match=rf"{critic + 95}: the longest critic sequence .* up to {critic + 96} tokens"):
        check_context(budget("raro", critic + 95), tok, unlimited, train, heldout)
    check_context(budget("sft", expert), tok, unlimited, train, heldout)  # SFT samples no training sequence
    with pytest.raises(ValueError, match=rf"{expert - 1}: the longest expert's sequence .* up to {expert} tokens .*"
                                         r"raise train.max_tokens_per_micro_batch$"):  # no setting shortens it
        check_context(budget("sft", expert - 1), tok, unlimited, train, heldout)
    for mode in ("rl_logit", "rationalization"):  # a reasoning of up to max_new_tokens before the expert's answer
        check_context(budget(mode, expert + 48), tok, unlimited, train, heldout)
        with pytest.raises(ValueError, match=rf"the longest sequence of a reasoning .* up to {expert + 48} tokens"):
            check_context(budget(mode, expert + 47), tok, unlimited, train, heldout)
    # DPO trains sampled sequences and the expert's; RARO its policy's too, past a short critic reply (the planted
    # bugs that dropped each of these went unnoticed: review)
    check_context(budget("dpo", policy), tok, unlimited, train, heldout)
    with pytest.raises(ValueError, match=rf"{policy - 1}: the longest policy sequence"):
        check_context(budget("dpo", policy - 1), tok, unlimited, train, heldout)
    short = lambda mode, n, new: load_config(["--train.mode", mode, "--train.max_tokens_per_micro_batch", str(n),  # noqa: E731
                                              "--rollout.max_new_tokens", str(new), "--rollout.critic_max_new_tokens", "8"])
    assert expert > policy - 40
    with pytest.raises(ValueError, match=rf"{expert - 1}: the longest expert's sequence .* up to {expert} tokens"):
        check_context(short("dpo", expert - 1, 8), tok, unlimited, train, heldout)
    long_policy = policy - 48 + 400
    assert critic + 8 < long_policy
    check_context(short("raro", long_policy, 400), tok, unlimited, train, heldout)
    with pytest.raises(ValueError, match=rf"{long_policy - 1}: the longest policy sequence .* up to {long_policy} tokens"):
        check_context(short("raro", long_policy - 1, 400), tok, unlimited, train, heldout)
    # the advice names a setting only where lowering it can help: not when the prompt alone fills the budget
    with pytest.raises(ValueError, match=r"raise train.max_tokens_per_micro_batch$"):
        check_context(budget("rlvr", policy - 48), tok, unlimited, train, heldout)


def test_the_checks_at_start_take_the_longest_rows_by_question_and_answer():
    """The rows that stand for all are the longest by question and answer together: a short question with a long
    expert answer (a poem) among longer questions makes the longest critic prompt and the longest expert sequence.
    Ranked by question, it escaped each check (planted bugs that went unnoticed: review on 2026-12-07)."""
    from types import SimpleNamespace

    from raro_fast import prompts
    from raro_fast.model.hf import load_project_tokenizer
    from raro_fast.modes.base import expert_completion_ids
    from raro_fast.tasks.base import Example
    from raro_fast.train import check_context

    tok = load_project_tokenizer()
    questions = [Example(id=f"q{i}", question="Using " + ", ".join(["3"] * 40) + f", make {i}.", answer="3")
                 for i in range(20)]
    poem = Example(id="poem", question="Write a poem.", answer="\n".join(["a line of verse"] * 60))
    rows = questions + [poem]
    critic = len(prompts.render_prompt(tok, prompts.critic_messages(poem.question, poem.answer, "")))
    expert = len(prompts.render_prompt(tok, prompts.policy_messages(poem.question))) + len(expert_completion_ids(tok, poem.answer))
    question = max(len(prompts.render_prompt(tok, prompts.policy_messages(ex.question))) for ex in questions)
    assert question + 48 < expert and question + 48 < critic
    cfg = lambda *args: load_config(["--train.eval_tournament", "false", *args])  # noqa: E731
    with pytest.raises(ValueError, match=rf"the longest critic sequence .* up to {critic + 96} tokens \(example poem\)"):
        check_context(cfg("--train.max_tokens_per_micro_batch", str(critic + 95)), tok, SimpleNamespace(), rows, [])
    with pytest.raises(ValueError, match=rf"the longest sequence of a reasoning .* up to {expert + 48} tokens "
                                         r"\(example poem\)"):
        check_context(cfg("--train.mode", "rl_logit", "--train.max_tokens_per_micro_batch", str(expert + 47)), tok,
                      SimpleNamespace(), rows, [])
    positions = SimpleNamespace(max_position_embeddings=critic + 95)
    with pytest.raises(ValueError, match=rf"rollout.critic_max_new_tokens 96: the longest critic prompt .* has {critic} "
                                         r"tokens \(example poem\)"):
        check_context(cfg(), tok, positions, rows, [])
    # a row that fills the positions by itself is the row's fault, whatever the settings
    with pytest.raises(ValueError, match=r"^example poem: its critic prompt .* without a token more"):
        check_context(cfg(), tok, SimpleNamespace(max_position_embeddings=critic), rows, [])
    # the eight longest rows stand for all: a row the raw count ranks second may make the longest prompt (its many
    # lines are indented in the critic's prompt); a planted bug that checked the first alone went unnoticed (review)
    one_line = Example(id="one_line", question="Q?", answer=" ".join(["ab"] * 62))
    many_lines = Example(id="many_lines", question="Q?", answer="\n".join(["ab"] * 40))
    raw = lambda ex: len(tok(ex.answer, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompt = lambda ex: len(prompts.render_prompt(tok, prompts.critic_messages(ex.question, ex.answer, "")))  # noqa: E731
    assert raw(one_line) > raw(many_lines) and prompt(many_lines) > prompt(one_line)
    with pytest.raises(ValueError, match=r"the longest critic prompt .* \(example many_lines\)"):
        check_context(cfg(), tok, SimpleNamespace(max_position_embeddings=prompt(many_lines) + 95), [one_line, many_lines],
                      [])
    # rows are ranked by their tokens as targets read them: a spelled-out special token is several (review: 60 of
    # `<|im_end|>` counted as 60 tokens, not 540, and that row hid behind eight longer-looking ones)
    spelled = Example(id="spelled", question="Say it.", answer="<|im_end|>" * 60)
    longer = [Example(id=f"l{i}", question="Say it.", answer=" ".join(["seven"] * 40) + f" {i}") for i in range(8)]
    sequence = lambda ex: (len(prompts.render_prompt(tok, prompts.policy_messages(ex.question)))  # noqa: E731
                           + len(expert_completion_ids(tok, ex.answer)))
    plain = lambda ex: len(tok(ex.answer, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert plain(spelled) < min(map(plain, longer)) and sequence(spelled) > max(map(sequence, longer))
    with pytest.raises(ValueError, match=r"^example spelled: its expert's sequence"):
        check_context(cfg("--train.mode", "sft"), tok, SimpleNamespace(max_position_embeddings=sequence(spelled) - 1),
                      longer + [spelled], [])


def test_setup_checks_the_context_before_it_builds_an_engine(saved_embedded_model, tmp_path, monkeypatch):
    """The check is wired into setup (a test of check_context alone passed with the call removed: review)."""
    from raro_fast import train
    from raro_fast.distributed import Dist

    monkeypatch.setattr(train, "make_engine", lambda *a, **k: pytest.fail("an engine was built"))
    cfg = load_config(["--model.path", str(saved_embedded_model), "--train.output_dir", str(tmp_path / "run"),
                       "--rollout.critic_max_new_tokens", "250", "--train.progress", "false"])
    with pytest.raises(ValueError, match=r"rollout.critic_max_new_tokens 250: .* past the model's 256 positions"):
        train.setup(cfg, Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def test_adamw_betas_take_0_and_refuse_1():
    # [0, 1) as torch's AdamW checks it: beta 0 (no momentum) is AdamW's, 1 (no update from new gradients) is not
    with pytest.raises(ConfigError, match=r"optim.beta2 must lie in \[0, 1\), got 1.0"):
        load_config(["--optim.beta2", "1"])
    with pytest.raises(ConfigError, match=r"optim.beta1 must lie in \[0, 1\), got 1.0"):
        load_config(["--optim.beta1", "1.0"])
    optim = load_config(["--optim.beta1", "0", "--optim.beta2", "0"]).optim
    assert (optim.beta1, optim.beta2) == (0.0, 0.0)


def _context_setting():
    from types import SimpleNamespace

    from raro_fast.model.hf import load_project_tokenizer
    from raro_fast.tasks import make_task

    task = make_task(load_config([]).task)
    return load_project_tokenizer(), SimpleNamespace(max_position_embeddings=512), task.examples("heldout")


def test_the_critic_prompt_checked_is_the_longest_with_its_expert_answer_not_by_question():
    """The examples standing for all are the longest by question and answer together: a short question with a long
    expert answer makes the longest critic prompt, whatever the questions' lengths."""
    from raro_fast.tasks.base import Example
    from raro_fast.train import check_context

    tok, model_config, heldout = _context_setting()
    poem = Example(id="poem", question="Write a poem.", answer="\n".join(["a line of verse"] * 60))
    questions = [Example(id=f"q{i}", question="Using " + ", ".join(["3"] * 20) + ", make 10.", answer="3")
                 for i in range(8)]
    cfg = load_config(["--train.eval_tournament", "false"])
    check_context(cfg, tok, model_config, questions, heldout)
    with pytest.raises(ValueError, match=r"example poem: its critic prompt \(with the expert's answer, the policy's "
                                         r"empty\)"):
        check_context(cfg, tok, model_config, questions + [poem], heldout)


def test_the_tournaments_critic_prompt_counts_only_where_the_tournament_runs():
    """The evaluation's tournament picks among eval_samples answers: with 0 or 1 of them it never runs, so its
    critic prompt is not checked."""
    from raro_fast.train import check_context

    tok, model_config, heldout = _context_setting()
    sft = ["--train.mode", "sft", "--rollout.critic_max_new_tokens", "480"]
    for samples in ("0", "1"):
        check_context(load_config([*sft, "--train.eval_samples", samples]), tok, model_config, [], heldout)
    with pytest.raises(ValueError, match=r"rollout.critic_max_new_tokens 480: the longest critic prompt \(with both "
                                         r"answers empty\)"):
        check_context(load_config([*sft, "--train.eval_samples", "2"]), tok, model_config, [], heldout)


def test_only_the_shipped_sample_in_another_checkout_passes_for_no_other_tasks_data():
    # a file of one's own that has the sample's name is data: refused as another task's (the checkout's folders
    # raro_fast/tasks/data are part of what makes it the shipped sample)
    with pytest.raises(ConfigError, match=r"task.deepmath.path: settings of the deepmath task"):
        load_config(["--task.deepmath.path", "/home/me/math/deepmath_sample.jsonl"])
    load_config(["--task.deepmath.path", "/elsewhere/raro_fast/tasks/data/deepmath_sample.jsonl"])


def test_the_context_check_ranks_rows_by_tokens_and_checks_rationalization_and_the_experts_sequences():
    """Found by review on 2026-12-07: the rows checked were the longest by characters, so a short Chinese question
    of many tokens passed and stopped the run in step 1; rationalization's prompts (question and expert answer) were
    never checked; and SFT, DPO and rl_logit trained expert sequences past the model's positions with no word."""
    from raro_fast import prompts
    from raro_fast.modes.base import expert_completion_ids
    from raro_fast.tasks.base import Example
    from raro_fast.train import check_context

    tok, model_config, heldout = _context_setting()
    english = [Example(id=f"en{i}", question="Add the numbers " + " ".join(["12"] * 100) + f" ({i}).", answer="7")
               for i in range(8)]
    chinese = Example(id="zh", question="请计算" + "一二三四五六七八九十" * 13 + "。", answer="7")
    assert len(chinese.question) < min(len(ex.question) for ex in english)
    tokens = lambda ex: len(prompts.render_prompt(tok, prompts.policy_messages(ex.question)))  # noqa: E731
    assert tokens(chinese) > max(map(tokens, english))
    fits = 512 - max(map(tokens, english))
    rlvr = ["--train.mode", "rlvr", "--train.eval_samples", "0", "--rollout.max_new_tokens", str(fits)]
    check_context(load_config(rlvr), tok, model_config, english, heldout)
    with pytest.raises(ValueError, match=rf"rollout.max_new_tokens {fits}: the longest policy prompt has "
                                         rf"{tokens(chinese)} tokens \(example zh\)"):
        check_context(load_config(rlvr), tok, model_config, english + [chinese], heldout)

    poem = Example(id="poem", question="Write a poem.", answer="\n".join(["a line of verse"] * 30),
                   meta={"source": "poems.jsonl:3"})
    rationalization = len(prompts.render_prompt(tok, prompts.rationalization_messages(poem.question, poem.answer)))
    expert = tokens(poem) + len(expert_completion_ids(tok, poem.answer))
    assert rationalization + 48 > 512 > rationalization and expert < 512
    with pytest.raises(ValueError, match=r"rollout.max_new_tokens 48: the longest rationalization prompt \(with the "
                                         r"expert's answer\) has \d+ tokens \(poems.jsonl:3\)"):
        check_context(load_config(["--train.mode", "rationalization"]), tok, model_config, [poem], heldout)
    check_context(load_config(["--train.mode", "rlvr"]), tok, model_config, [poem], heldout)  # samples no such prompt
    # rl_logit scores the expert's answer after up to max_new_tokens of reasoning: checked with them (review: only
    # the expert's sequence alone was, and a reasoning of 45 tokens carried the scored sequence past the positions)
    rl_logit = lambda n: load_config(["--train.mode", "rl_logit", "--train.eval_tournament", "false",  # noqa: E731
                                      "--rollout.max_new_tokens", str(n)])
    with pytest.raises(ValueError, match=rf"rollout.max_new_tokens {513 - expert}: the longest sequence of a reasoning "
                                         rf"before the expert's answer .* has {expert} tokens \(poems.jsonl:3\)"):
        check_context(rl_logit(513 - expert), tok, model_config, [poem], heldout)
    check_context(rl_logit(512 - expert), tok, model_config, [poem], heldout)

    longer = Example(id="longer", question=poem.question, answer="\n".join(["a line of verse"] * 100),
                     meta={"source": "poems.jsonl:9"})
    for mode, what in (("sft", "expert's sequence"), ("dpo", "expert's sequence"),
                       ("rl_logit", "sequence of a reasoning before the expert's answer"),
                       ("rationalization", "rationalization prompt")):  # its prompt holds the expert's answer too
        with pytest.raises(ValueError, match=rf"^poems.jsonl:9: its {what} \(.*\) has \d+ tokens, past the model's "
                                             r"512 positions"):
            check_context(load_config(["--train.mode", mode, "--train.eval_tournament", "false",
                                       "--rollout.max_new_tokens", "1"]), tok, model_config, [poem, longer], heldout)


@pytest.mark.parametrize("argv, message", [
    # another mode's settings: DPO's read only in dpo mode (the game's critic_lead_steps was refused, these not)
    (["--train.mode", "rlvr", "--dpo.beta", "0.5", "--dpo.rounds", "5"],
     r"dpo.rounds, dpo.beta with train.mode rlvr: settings of iterative DPO, which this mode does not run"),
    (["--dpo.beta", "0.5"], r"dpo.beta with train.mode raro: settings of iterative DPO"),
    # loss settings a mode never reads (found by review: accepted): no group advantages, a ratio kept at 1, no KL
    (["--train.mode", "dpo", "--loss.std_normalize", "true"], r"loss.std_normalize with train.mode dpo: this mode "
                                                              r"has no group advantages to normalise"),
    (["--train.mode", "sft", "--loss.clip_high", "0.2", "--loss.dual_clip", "3"],
     r"loss.clip_high, loss.dual_clip with train.mode sft: .* trains at ratio 1, where no clip acts"),
    (["--train.mode", "rationalization", "--loss.clip_low", "0.1"], r"loss.clip_low with train.mode rationalization"),
    (["--loss.kl_estimator", "k1"], r"loss.kl_estimator k1 with loss.kl_coef 0: no KL term is computed"),
    # an SGLang backend's settings with an in-process engine, or the other SGLang backend's
    (["--rollout.backend", "embedded", "--rollout.tp_size", "4", "--rollout.mem_fraction", "0.9"],
     r"rollout.mem_fraction, rollout.tp_size with rollout.backend embedded: settings of the SGLang backends, which "
     r"this backend does not read"),
    (["--rollout.sglang_url", "http://gpu:30000"], r"rollout.sglang_url with rollout.backend auto: settings of the SGLang"),
    (["--rollout.backend", "continuous", "--rollout.weight_bucket_mb", "64"], r"rollout.weight_bucket_mb with rollout"),
    (["--rollout.backend", "sglang", "--rollout.server_ranks", "2"],
     r"rollout.server_ranks with rollout.backend sglang: settings of the other SGLang backend"),
    (["--rollout.backend", "sglang_http", "--rollout.tp_size", "2"],
     r"rollout.tp_size with rollout.backend sglang_http: settings of the other SGLang backend"),
    # another task's settings the warm-up does not read either
    (["--task.name", "deepmath", "--model.path", "", "--task.countdown.expert_form", "varied",
      "--task.countdown.seed", "7"],
     r"task.countdown.seed, task.countdown.expert_form: settings of the countdown task, which task.name deepmath "
     r"does not use, nor the warm-up \(its puzzles read num_numbers, min_number, max_number, target, max_target\)"),
    # neither role weighed: nothing learnt, as with a group of one
    (["--raro.lambda_pol", "0", "--raro.lambda_crit", "0"], r"raro.lambda_pol and raro.lambda_crit are both 0"),
    # the embedded model's shape, named at start (a ZeroDivisionError deep in its build before; 0 layers accepted)
    (["--model.path", "", "--model.embedded.num_kv_heads", "0"], r"model.embedded.num_kv_heads must be >= 1, got 0"),
    (["--model.path", "", "--model.embedded.num_layers", "0"], r"model.embedded.num_layers must be >= 1, got 0"),
    (["--model.path", "", "--model.embedded.hidden_size", "-8"], r"model.embedded.hidden_size must be >= 1, got -8"),
    (["--model.path", "", "--model.embedded.num_heads", "3"],
     r"model.embedded.hidden_size \(128\) must divide by model.embedded.num_heads \(3\)"),
    (["--model.path", "", "--model.embedded.hidden_size", "12", "--model.embedded.num_heads", "4",
      "--model.embedded.num_kv_heads", "1"], r"model.embedded.hidden_size / model.embedded.num_heads \(12 / 4\) is odd"),
    (["--train.output_dir", ""], r"train.output_dir is empty"),  # it wrote the run into the working directory
])
def test_a_setting_the_run_would_not_read_or_could_not_build_is_refused_naming_it(argv, message):
    """Found by review on 2026-12-07: each was accepted and ignored, or failed deep inside the run."""
    with pytest.raises(ConfigError, match=r"^command line: section '[\w.]+': " + message):
        load_config(argv)


def test_the_replay_buffer_is_sized_in_raro_only_and_what_is_read_is_accepted():
    """The replay buffer's size was checked in every mode: an SFT or RLVR run of many questions a step was refused
    over a buffer it never builds, naming a setting its user never gave. Found by review on 2026-12-07."""
    assert load_config(["--train.mode", "sft", "--raro.questions_per_step", "2000"]).raro.questions_per_step == 2000
    assert load_config(["--train.mode", "rlvr", "--raro.questions_per_step", "256", "--raro.group_size", "64"]
                       ).raro.group_size == 64
    with pytest.raises(ConfigError, match=r"raro.replay_size 10000 holds fewer than the 16000 replayed pairs a step "
                                          r"plans at raro.replay_ratio 0.5 \(raro.questions_per_step 2000 x "
                                          r"raro.group_size 8 fresh ones"):
        load_config(["--raro.questions_per_step", "2000"])
    # what each backend, mode and warm-up reads is taken
    assert load_config(["--rollout.backend", "sglang", "--rollout.tp_size", "2", "--rollout.weight_bucket_mb", "64",
                        "--rollout.release_memory", "kv_cache+weights"]).rollout.tp_size == 2
    assert load_config(["--rollout.backend", "sglang_http", "--rollout.server_ranks", "2", "--rollout.weight_bucket_mb",
                        "64"]).rollout.server_ranks == 2
    assert load_config(["--train.mode", "dpo", "--dpo.beta", "0.5"]).dpo.beta == 0.5
    assert load_config(["--task.name", "deepmath", "--model.path", "", "--task.countdown.target", "12"]
                       ).task.countdown.target == 12
    assert load_config(["--task.name", "deepmath", "--model.path", "", "--warmup.leave_out", "puzzles",
                        "--task.countdown.num_train", "50"]).task.countdown.num_train == 50
    assert load_config(["--raro.lambda_pol", "0"]).raro.lambda_pol == 0  # the critic alone may train


def test_the_context_check_tokenizes_many_rows_in_chunks_and_keeps_each_rows_length():
    """More rows than one chunk of the tokenizer's (2048 texts, a question and an answer each): every row keeps its
    own lengths, and the long one at the end is still found (mutation review: a chunk cut short passed every test)."""
    from raro_fast.tasks.base import Example
    from raro_fast.train import check_context

    tok, model_config, heldout = _context_setting()
    rows = [Example(id=f"r{i}", question=f"Add {i} and 1.", answer=str(i + 1)) for i in range(1100)]
    rows.append(Example(id="long", question="Add " + " ".join(["12"] * 300) + ".", answer="7"))
    cfg = load_config(["--train.mode", "rlvr", "--train.eval_samples", "0"])
    check_context(cfg, tok, model_config, rows[:-1], heldout)
    with pytest.raises(ValueError, match=r"^example long: its policy prompt has \d+ tokens, past the model's 512"):
        check_context(cfg, tok, model_config, rows, heldout)
