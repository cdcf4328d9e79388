"""Config: YAML + dotted overrides, validation naming the field, exact YAML round trip."""

import pytest

from focusdpo.config import Config, ConfigError, load_config, parse_override


def test_default_config_loads_and_round_trips():
    cfg = load_config()
    assert cfg.model.backbone == "flux-tiny"
    again = Config.from_yaml(cfg.to_yaml())
    assert again == cfg


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, ["train.max_steps=7", "focus.spaf=false", "loss.beta=250", "focus.tap_layer=1",
                             "lora.targets=[to_q,to_k]"])
    assert cfg.train.max_steps == 7
    assert cfg.focus.spaf is False
    assert cfg.loss.beta == 250.0 and isinstance(cfg.loss.beta, float)
    assert cfg.focus.tap_layer == 1
    assert cfg.lora.targets == ["to_q", "to_k"]
    assert Config.from_yaml(cfg.to_yaml()) == cfg


def test_save_and_load_file(tmp_path):
    cfg = load_config(None, ["train.seed=3", "data.disruptions={attribute_swap: 1.0}"])
    path = tmp_path / "c.yaml"
    cfg.save(path)
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.objective=foo", "train.objective='foo'"),
        ("focus.tau=1.5", "focus.tau=1.5"),
        ("loss.beta=-1", "loss.beta=-1"),
        ("train.max_steps=ten", "train.max_steps='ten'"),
        ("data.disruptions={melt: 1.0}", "data.disruptions.melt"),
        ("focus.weights_from=negative", "focus.weights_from"),
        ("train.nope=1", "train.nope"),
    ],
)
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_parse_override_needs_equals():
    with pytest.raises(ConfigError):
        parse_override("train.max_steps")
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_with_overrides_copies_and_validates():
    cfg = load_config()
    other = cfg.with_overrides(["train.objective=dpo", "focus.dpce=false"])
    assert (other.train.objective, other.focus.dpce) == ("dpo", False)
    assert (cfg.train.objective, cfg.focus.dpce) == ("focusdpo", True)
    with pytest.raises(ConfigError, match="train.max_steps"):
        cfg.with_overrides(["train.max_steps=0"])


def test_exponent_without_dot_is_a_float():
    assert load_config(None, ["train.lr=5e-4"]).train.lr == pytest.approx(5e-4)
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=fast"])


def test_config_command_prints_the_resolved_config_and_rejects_bad_values():
    from typer.testing import CliRunner

    from focusdpo.cli import app

    ok = CliRunner().invoke(app, ["config", "train.max_steps=3"])
    assert ok.exit_code == 0 and Config.from_yaml(ok.output).train.max_steps == 3
    bad = CliRunner().invoke(app, ["config", "focus.tau=2"])
    assert bad.exit_code == 2 and "focus.tau=2" in bad.output
