"""The typed config: YAML + overrides, strict keys with suggestions, clear type errors."""
import open_clip
import pytest
import yaml

from fastprompt.config import (
    Config,
    ConfigError,
    check_method_options,
    config_to_dict,
    load_config,
    save_config,
)


def test_defaults_are_the_paper_settings():
    cfg = load_config()
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.0035, 0.9, 5e-4)
    assert (cfg.optim.head_lr_mult, cfg.optim.warmup_epochs, cfg.optim.warmup_lr) == (6.5, 1, 1e-5)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.data.shots, cfg.data.seeds) == (10, 4, 16, [1, 2, 3])


def test_yaml_then_overrides_with_coercion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.002}, "train": {"epochs": 5}, "method": {"name": "cocoop"}}))
    cfg = load_config(path, ["optim.lr=1e-3", "data.seeds=4,5", "train.compile=true", "optim.grad_clip=2",
                             "method.options.n_ctx=8", "protocol.targets=[a, b]"])
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-3 as str
    assert cfg.train.epochs == 5 and cfg.method.name == "cocoop"
    assert cfg.data.seeds == [4, 5] and cfg.train.compile is True
    assert cfg.optim.grad_clip == 2.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.method.options == {"n_ctx": 8} and cfg.protocol.targets == ["a", "b"]


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("optim.lrr=0.1", "optim.lr"),
        ("train.epoch=3", "train.epochs"),
        ("train.lr=0.1", "optim.lr"),  # right name, wrong section
        ("modle.name=x", "model.name"),
        ("data.seed=1", "data.seeds"),
    ],
)
def test_unknown_key_names_it_and_suggests(override, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    key = override.split("=")[0]
    assert f"'{key}'" in str(err.value) and f"did you mean '{suggestion}'" in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"'optim.momentun'.*did you mean 'optim.momentum'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
        ("train.epochs=2.5", "train.epochs: expected int, got 2.5"),
        ("train.batch_size=true", "train.batch_size: expected int, got True"),
        ("train.precision=fp8", "train.precision: expected one of 'fp32' | 'bf16' | 'fp16', got 'fp8'"),
        ("train.compile=maybe", "train.compile: expected bool, got 'maybe'"),
        ("data.seeds=[1, x]", "data.seeds[1]: expected int, got 'x'"),
        ("model=3", "model: expected a mapping, got 3"),
    ],
)
def test_wrong_type_names_key_type_and_value(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


@pytest.mark.parametrize("override", ["train.epochs=0", "optim.lr=-1", "optim.grad_clip=0", "data.seeds=[]"])
def test_out_of_range_values(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="no sub-key 'x'"):
        load_config(None, ["optim.lr.x=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=0.01", "method.options.n_ctx=4", "data.cache_dir=null"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_method_options_checked_against_defaults():
    defaults = {"n_ctx": 16, "ctx_init": None, "lam": 0.7}
    cfg = load_config(None, ["method.name=coop", "method.options.n_ctx=4", "method.options.lam=1"])
    resolved = check_method_options(cfg, ["coop", "dept+coop"], defaults)
    assert resolved == {"n_ctx": 4, "lam": 1.0} and isinstance(resolved["lam"], float)
    with pytest.raises(ConfigError, match=r"'method.options.n_cxt'.*did you mean 'method.options.n_ctx'"):
        check_method_options(load_config(None, ["method.options.n_cxt=4"]), ["dept+coop"], defaults)
    with pytest.raises(ConfigError, match=r"method.options.n_ctx: expected int, got 'many'"):
        check_method_options(load_config(None, ["method.options.n_ctx=many"]), ["dept+coop"], defaults)
    with pytest.raises(ConfigError, match=r"unknown method 'dept\+cop'.*did you mean 'dept\+coop'"):
        check_method_options(load_config(None, ["method.name=dept+cop"]), ["coop", "dept+coop"], defaults)


# PromptSRC's published settings per protocol, for ivlp, promptsrc and their dept+ variants:
# (epochs, text and vision prompt depth, promptsrc's GPA (mean, std)); lr 0.0025, batch 4 everywhere.
PROMPTSRC_SETTINGS = {"base2new": (20, 9, (15.0, 1.0)), "few_shot": (50, 9, (30.0, 30.0)),
                      "cross_dataset": (20, 3, (6.0, 10.0)), "domain_generalisation": (20, 3, (6.0, 10.0))}
# Few-shot GPA per dataset (PromptSRC's per-dataset few-shot configs); the other six keep (30, 30).
FEW_SHOT_GPA_45_5 = {"stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat"}


def _promptsrc_family(method: str) -> bool:
    return method.split("+")[-1] in ("ivlp", "promptsrc")


def _check_promptsrc_settings(cfg: Config, protocol: str, where, gpa=None) -> None:
    """cfg holds PromptSRC's published settings for `protocol` (GPA: `gpa`, else the protocol's)."""
    from fastprompt.methods import method_defaults

    epochs, depth, protocol_gpa = PROMPTSRC_SETTINGS[protocol]
    opt = cfg.optim
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.data.shots, cfg.data.seeds) == (epochs, 4, 16, [1, 2, 3]), where
    assert (opt.name, opt.lr, opt.momentum, opt.weight_decay) == ("sgd", 0.0025, 0.9, 5e-4), where
    assert (opt.warmup_epochs, opt.warmup_lr, opt.scheduler, opt.head_lr_mult) == (1, 1e-5, "cosine", 6.5), where
    options = {**method_defaults(cfg.method.name), **cfg.method.options}  # what build_model receives
    assert (options["n_ctx"], options["n_vis_ctx"], options["depth"], options["vis_depth"]) == (4, 4, depth, depth), where
    if cfg.method.name.endswith("promptsrc"):
        assert options["gpa"] is True and (options["gpa_mean"], options["gpa_std"]) == (gpa or protocol_gpa), where
        assert (options["text_loss_weight"], options["image_loss_weight"]) == (25.0, 10.0), where
    else:
        assert "gpa" not in options, where


def test_every_shipped_config_loads_and_names_real_options():
    from pathlib import Path

    from fastprompt.methods import METHOD_NAMES, method_defaults

    configs = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
    protocols = {p.parent.name for p in configs}
    assert {"base2new", "cross_dataset", "domain_generalisation", "few_shot"} <= protocols
    checked_promptsrc = 0
    for path in configs:
        cfg = load_config(path)
        assert isinstance(cfg, Config), path
        check_method_options(cfg, METHOD_NAMES, method_defaults(cfg.method.name))
        if path.parent.name != "configs":  # the published settings
            assert cfg.protocol.name == path.parent.name and cfg.model.pretrained == "openai", path
            # The model name builds the activation the weights were trained with (QuickGELU for OpenAI's),
            # so the tag, OpenAI's archive and a state dict of those weights all give the published model.
            tag_cfg = open_clip.get_pretrained_cfg(cfg.model.name, cfg.model.pretrained)
            assert open_clip.get_model_config(cfg.model.name).get("quick_gelu") is tag_cfg["quick_gelu"] is True, path
            if _promptsrc_family(cfg.method.name):  # PromptSRC's own settings (DePT's paper uses them too)
                _check_promptsrc_settings(cfg, path.parent.name, path)
                checked_promptsrc += 1
                continue
            assert (cfg.train.epochs, cfg.data.shots, cfg.data.seeds, cfg.optim.head_lr_mult) == (10, 16, [1, 2, 3], 6.5)
            cocoop = cfg.method.name.endswith("cocoop")
            assert (cfg.train.batch_size, cfg.optim.lr) == ((1, 0.002) if cocoop else (4, 0.0035)), path
    assert checked_promptsrc == 4 * 4  # ivlp, promptsrc, dept+ivlp, dept+promptsrc under each protocol
    trained = {p.stem for p in (Path(__file__).parents[1] / "configs" / "base2new").glob("*.yaml")}
    assert {m.replace("+", "_") for m in METHOD_NAMES} <= trained  # every method has its config


@pytest.mark.parametrize("method", ["ivlp", "promptsrc", "dept+ivlp", "dept+promptsrc"])
def test_promptsrc_settings_follow_the_protocol_and_the_few_shot_dataset(method):
    """However the dataset is chosen (--dataset, a data.dataset override as sweeps give it, the
    protocol's own), composing gives PromptSRC's settings for it; overrides still win."""
    from fastprompt.config import compose_config
    from fastprompt.data import DATASETS

    base2new_11 = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                   "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
    assert set(base2new_11) <= set(DATASETS) and FEW_SHOT_GPA_45_5 <= set(base2new_11)
    for protocol in PROMPTSRC_SETTINGS:
        _check_promptsrc_settings(compose_config(protocol, method), protocol, (protocol, method))
        for dataset in base2new_11:
            gpa = (45.0, 5.0) if protocol == "few_shot" and dataset in FEW_SHOT_GPA_45_5 else None
            for cfg in (compose_config(protocol, method, dataset=dataset),
                        compose_config(protocol, method, overrides=[f"data.dataset={dataset}"]),
                        compose_config(protocol, method, dataset="caltech101", overrides=[f"data.dataset={dataset}"])):
                assert cfg.data.dataset == dataset
                _check_promptsrc_settings(cfg, protocol, (protocol, method, dataset), gpa)
    if method.endswith("promptsrc"):
        mine = compose_config("few_shot", method, dataset="dtd", overrides=["method.options.gpa_std=2", "train.epochs=7"])
        assert (mine.method.options["gpa_mean"], mine.method.options["gpa_std"], mine.train.epochs) == (45.0, 2, 7)


def test_per_protocol_layers_name_known_protocols_and_datasets():
    from fastprompt.config.compose import PER_PROTOCOL, dataset_settings, layer_data, method_names, protocol_names, \
        split_method
    from fastprompt.data import DATASETS

    layered = set()
    for method in method_names():
        for name in split_method(method):
            table = layer_data("methods", name).get(PER_PROTOCOL, {})
            assert set(table) <= set(protocol_names()), name
            layered |= {name} if table else set()
            for protocol in table:
                assert set(dataset_settings(name, protocol)) <= set(DATASETS), (name, protocol)
    assert layered == {"ivlp", "promptsrc"}


def test_a_per_protocol_table_naming_an_unknown_protocol_is_refused(tmp_path, monkeypatch):
    import fastprompt.config.compose as compose

    layers = tmp_path / "layers"
    for kind in ("protocols", "methods"):
        (layers / kind).mkdir(parents=True)
        for path in (compose.LAYERS_DIR / kind).glob("*.yaml"):
            (layers / kind / path.name).write_text(path.read_text())
    (layers / "methods" / "ivlp.yaml").write_text("per_protocol:\n  fewshot: {train: {epochs: 50}}\n")
    monkeypatch.setattr(compose, "LAYERS_DIR", layers)
    with pytest.raises(ConfigError, match=r"per_protocol names unknown protocol\(s\) \['fewshot'\]"):
        compose.compose_config("few_shot", "ivlp")


def test_ctx_init_from_the_config_sets_the_context_length():
    """The config path leaves the defaults and the ctx_init -> n_ctx rule to build_model."""
    from fastprompt.clip import TINY_MODEL, load_clip
    from fastprompt.methods import METHOD_NAMES, build_model, method_defaults

    cfg = load_config(None, ["method.name=coop", "method.options.ctx_init=a photo of a"])
    options = check_method_options(cfg, METHOD_NAMES, method_defaults("coop"))
    model = build_model("coop", load_clip(TINY_MODEL), ["cat", "dog"], **options)
    assert model.text_prompts.n_ctx == 4


@pytest.mark.parametrize("overrides, message", [
    (["data.seeds=[1,2,1]"], "data.seeds: [1] listed more than once in [1, 2, 1]; list each once, e.g. data.seeds=[1,2]"),
    (["protocol.shots=[4,2,4]"], "protocol.shots: [4] listed more than once"),
    (["protocol.name=few_shot", "protocol.shots=[]"], "protocol 'few_shot' needs at least one shot count"),
])
def test_seed_and_shot_lists_that_would_run_nothing_or_count_twice(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    load_config(None, ["protocol.shots=[]"])  # base2new does not read protocol.shots


# --------------------------------------------------------------------------- layers


def test_layers_compose_protocol_method_dataset_then_overrides():
    from fastprompt.config import compose_config

    cfg = compose_config("cross_dataset", "dept+cocoop", overrides=["optim.lr=0.001"])
    assert (cfg.protocol.name, cfg.method.name, cfg.data.dataset) == ("cross_dataset", "dept+cocoop", "imagenet")
    assert len(cfg.protocol.targets) == 10 and cfg.train.batch_size == 1 and cfg.optim.lr == 0.001
    assert cfg.optim.head_lr_mult == 6.5 and cfg.output_dir == "runs/cross_dataset/dept_cocoop/imagenet"
    few = compose_config("few_shot", "maple", dataset="dtd")
    assert (few.protocol.shots, few.data.dataset, few.train.batch_size, few.optim.lr) == ([1, 2, 4, 8, 16], "dtd", 4,
                                                                                          0.0035)
    # What no layer sets keeps the schema's default, which is the published setting.
    assert config_to_dict(compose_config("base2new", "coop", dataset="imagefolder")) == config_to_dict(
        load_config(None, ["method.name=coop", "data.dataset=imagefolder"]))


@pytest.mark.parametrize("protocol, method, message", [
    ("base2old", "coop", "unknown protocol 'base2old'; did you mean 'base2new'?"),
    ("base2new", "dept+copo", "unknown method 'dept+copo'; did you mean 'dept+coop'?"),
    ("base2new", "dept+coop+maple", "unknown method 'dept+coop+maple'"),
])
def test_unknown_layers_are_named(protocol, method, message):
    from fastprompt.config import compose_config

    with pytest.raises(ConfigError) as err:
        compose_config(protocol, method)
    assert message in str(err.value)


def test_published_configs_are_what_the_layers_compose():
    """configs/<protocol>/<method>.yaml are written by `python -m fastprompt.config.published configs`:
    each is exactly that text, and loads to the composed config (edit a layer, then rewrite them)."""
    from pathlib import Path

    from fastprompt.config import compose_config, method_names
    from fastprompt.config.published import PUBLISHED_PROTOCOLS, published_path, published_text

    repo = Path(__file__).parents[1]
    expected = set()
    for protocol in PUBLISHED_PROTOCOLS:
        for method in method_names():
            path = published_path(repo / "configs", protocol, method)
            expected.add(path)
            relative = str(path.relative_to(repo))
            assert path.read_text() == published_text(protocol, method, file=relative), \
                f"{relative} is stale: run `python -m fastprompt.config.published configs`"
            assert config_to_dict(load_config(path)) == config_to_dict(compose_config(protocol, method)), relative
    assert set((repo / "configs").glob("*/*.yaml")) == expected


def test_printed_config_with_overrides_loads_to_the_composed_config(tmp_path, capsys):
    from fastprompt.cli import main
    from fastprompt.config import compose_config

    assert main(["config", "--protocol", "few_shot", "--method", "dept+kgcoop", "--dataset", "dtd",
                 "train.compile=true", "data.root=/data"]) == 0
    path = tmp_path / "mine.yaml"
    path.write_text(capsys.readouterr().out)
    text = path.read_text()
    assert "compile: true" in text and "--dataset dtd train.compile=true data.root=/data" in text
    want = compose_config("few_shot", "dept+kgcoop", dataset="dtd", overrides=["train.compile=true", "data.root=/data"])
    assert config_to_dict(load_config(path)) == config_to_dict(want)


# ------------------------------------------------------------------ what a config file may hold


@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  epochs: 2\n  precision: fp32\ntrain:\n  epochs: 10\n  precision: bf16\n", "train", (1, 4)),
    ("optim:\n  lr: 0.01\n  momentum: 0.9\n  lr: 0.1\n", "optim.lr", (2, 4)),
    ("method:\n  name: coop\n  options:\n    n_ctx: 4\n    n_ctx: 16\n", "method.options.n_ctx", (4, 5)),
])
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: '{key}' is given twice (lines {lines[0]} and {lines[1]}); the second would "
                              "silently replace the first: keep one")


def test_a_sweep_file_with_a_key_given_twice_is_refused(tmp_path):
    from fastprompt.sweep import load_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text("protocol: base2new\nmethods: [coop]\ndatasets: [dtd]\nseeds: [1]\nseeds: [1, 2, 3]\n")
    with pytest.raises(ConfigError, match=r"'seeds' is given twice \(lines 4 and 5\)"):
        load_sweep(path)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "---\n"])
def test_an_empty_config_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="holds no settings"):
        load_config(path)


def test_a_config_that_is_a_folder_or_not_text(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        load_config(tmp_path)
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="is not a text file"):
        load_config(binary)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.nan", "optim.lr: expected a finite number, got nan"),
    ("optim.lr=.inf", "optim.lr: expected a finite number, got inf"),
    ("optim.lr=-.inf", "optim.lr: expected a finite number, got -inf"),
    ("optim.lr=nan", "optim.lr: expected a finite number, got 'nan'"),
    ("optim.lr=1e308", "optim.lr: 1e+308 is out of range (0 < lr <= 10)"),
    ("optim.lr=0", "optim.lr: 0.0 is out of range (0 < lr <= 10)"),
    ("optim.momentum=2", "optim.momentum: 2.0 is out of range (0 <= momentum <= 1)"),
    ("optim.grad_clip=.inf", "optim.grad_clip: expected a finite number"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay: -0.0001 is out of range"),
    ("train.batch_size=100000000000000000000000", "train.batch_size: 100000000000000000000000 is out of range "
                                                  "(1 <= batch_size <= 1048576)"),
    ("train.batch_size=1e30", "train.batch_size: expected int, got '1e30'"),
    ("train.batch_size=1.0e+30", "train.batch_size: 1000000000000000019884624838656 is out of range"),
    ("train.epochs=0", "train.epochs: 0 is out of range (1 <= epochs <= 100000)"),
    ("data.shots=-2", "data.shots: -2 is out of range"),
    ("data.seeds=[1,-1]", "data.seeds[1]: -1 is out of range (0 <= seeds[1] <= 4294967295)"),
    ("data.seeds=[99999999999999999999]", "data.seeds[0]: 99999999999999999999 is out of range"),
    ("protocol.shots=[0]", "protocol.shots[0]: 0 is out of range"),
    ("method.options.lam=.nan", "method.options.lam: expected a finite number, got nan"),
    ("output_dir=", "output_dir: empty"),
])
def test_non_finite_and_out_of_range_numbers_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        cfg = load_config(None, ["method.name=dept+coop", override])
        check_method_options(cfg, ["dept+coop"], {"lam": 0.7})
    assert message in str(err.value)


def test_every_range_bound_is_accepted():
    from fastprompt.config.schema import RANGES

    for key, (low, high, low_included) in RANGES.items():
        for value in ([low] if low_included else []) + [high]:
            cfg = load_config(None, [f"{key}={value}"])
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == value, key


def test_invalid_yaml_is_one_line_with_where_and_why(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("train:\n\tepochs: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: not valid YAML at line 2, column 1: found character '\\t' that cannot start "
                              "any token (YAML indents with spaces, not tabs)")
