from pathlib import Path

import pytest
import yaml

from trec_accel.config import Config, ConfigError, load_config, reference, save_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_notebook_recipe():
    cfg = load_config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (32, 16, 0.1)
    assert cfg.lora.target_modules[-1] == "lm_head" and len(cfg.lora.target_modules) == 8
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.lr) == (200, 1, 8, 2e-4)
    assert (cfg.train.scheduler, cfg.train.max_grad_norm, cfg.seed, cfg.data.split_seed) == ("cosine", 0.3, 42, 42)


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "output_dir: out\ntrain:\n  lr: 1e-3\n  max_steps: 7\ndata:\n  task: fine\n")
    cfg = load_config(p, ["train.lr=5e-4", "lora.target_modules=q_proj,v_proj", "data.path=/x"])
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.data.task == "fine" and cfg.output_dir == "out"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.path == "/x"


def test_env_references_expand(tmp_path, monkeypatch):
    p = write(tmp_path, "data:\n  path: ${TREC_TEST_DIR:-CogComp/trec}\n")
    monkeypatch.delenv("TREC_TEST_DIR", raising=False)
    assert load_config(p).data.path == "CogComp/trec"
    monkeypatch.setenv("TREC_TEST_DIR", "/data/trec")
    assert load_config(p).data.path == "/data/trec"


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    ("nope=1", "unknown config key 'nope'"),
    ("train.lr=fast", "train.lr: expected float, got 'fast'"),
    ("train.max_steps=1.5", "train.max_steps: expected int, got 1.5"),
    ("train.shared_prefix=maybe", "train.shared_prefix: 'maybe' is not one of auto, on, off"),
    ("train.cuda_graphs=fast", "train.cuda_graphs: 'fast' is not one of auto, on, off"),
    ("train.pad_multiple=0", "train.pad_multiple must be > 0"),
    ("lora.r=0", "lora.r must be > 0"),
    ("data.val_fraction=1.0", "data.val_fraction must be in (0, 1)"),
    ("data.val_fraction=0", "data.val_fraction must be in (0, 1)"),
    ("data.task=medium", "data.task: 'medium' is neither a built-in task (coarse, fine) nor a task file"),
    ("data.task=[a, b]", "data.task: expected str or dict, got ['a', 'b']"),
    ("data.task={labels: [a]}", "data.task: a task needs at least 2 labels, got 1"),
    ("eval.method=guess", "eval.method: 'guess' is not one of score, generate"),
    ("seed=-5", "seed must be in [0, 2**32)"),
    ("seed=4294967296", "seed must be in [0, 2**32)"),
    ("data.split_seed=-1", "data.split_seed must be in [0, 2**32)"),
    ("train", "override 'train' is not of the form dotted.key=value"),
    ("train.lr.x=1", "unknown config key 'train.lr.x'"),
])
def test_bad_values_give_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_prefix_attention_is_refused_outside_sdpa():
    with pytest.raises(ConfigError, match="model.prefix_attention=grouped needs model.attn_implementation=sdpa"):
        load_config(None, ["model.prefix_attention=grouped", "model.attn_implementation=eager"])
    assert load_config(None, ["model.attn_implementation=eager"]).model.prefix_attention == "auto"


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "train: 3\n"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "data.task=fine"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == 3e-4


def test_every_field_is_documented():
    rows = reference()
    assert len(rows) > 30 and all(help_ for _, _, help_ in rows)
    assert {"output_dir", "seed", "model.name", "data.path", "data.task", "train.max_steps", "train.batch_size",
            "train.lr"} <= {k for k, _, _ in rows}


SHIPPED = sorted(p.stem for p in (Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_the_issue_configs_are_shipped():
    assert {"tiny", "smollm2_coarse", "smollm2_fine", "mistral7b_coarse", "mistral7b_fine"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name, monkeypatch):
    root = Path(__file__).parent.parent
    monkeypatch.chdir(root)  # the example task's file is named from the repository's root
    cfg = load_config(root / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config) and cfg.output_dir == f"runs/{name}"
    if "pedalo" in name:
        assert cfg.data.task["name"] == "pedalo_support" and len(cfg.data.task["labels"]) == 8
    else:
        assert cfg.data.task == ("fine" if "fine" in name else "coarse")


def test_the_example_task_is_shipped_whole(monkeypatch):
    from trec_accel.data import load_data
    from trec_accel.task import load_task
    monkeypatch.chdir(Path(__file__).parent.parent)
    cfg = load_config("configs/smollm2_pedalo.yaml")
    splits = load_data(cfg.data, load_task(cfg.data.task))
    assert {k: len(v) for k, v in splits.items()} == {"train": 432, "validation": 48, "test": 160}
    assert sorted({e.label for e in splits["test"]}) == list(range(8))


def test_readme_config_table_is_the_generated_one():
    from pathlib import Path

    from trec_accel.config import reference_markdown
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert reference_markdown() in readme, \
        "README's config table is stale: paste the output of `python scripts/train.py --help-config`"
