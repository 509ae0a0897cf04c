import pytest

from fedge.cli import main
from fedge.config import ConfigError, RunConfig, parse_option
from fedge.strategies import build_strategy
from fedge.tasks import task_class


def test_toml_values_and_flag_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'task = "digits"\nrounds = 7\nlr = 0.1\n[strategy_options]\nproximal_mu = 0.5\n'
    )
    cfg = RunConfig.from_toml(path, {"rounds": "3"})
    assert cfg.rounds == 3  # the flag wins
    assert cfg.lr == 0.1
    assert cfg.strategy_options == {"proximal_mu": 0.5}


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"rounds": 0}, "rounds"),
        ({"rounds": "many"}, "rounds"),
        ({"lr": -1}, "lr"),
        ({"num_clients": 4, "clients_per_round": 9}, "clients_per_round"),
        ({"partition": "label-k:zero"}, "partition"),
        ({"colour": "blue"}, "colour"),
        ({"backend": "spark"}, "backend"),
    ],
)
def test_bad_values_name_the_field(values, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        RunConfig.from_mapping(values)


def test_bad_toml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.from_toml(path)


def test_cli_bad_value_exits_nonzero_with_one_line(capsys):
    assert main(["run", "--rounds", "-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedge run: error: rounds: must be >= 1, got -2"]


def test_option_parsing():
    assert parse_option("width=8") == ("width", 8)
    assert parse_option("source=sklearn") == ("source", "sklearn")
    with pytest.raises(ConfigError):
        parse_option("novalue")


def test_bad_input_is_one_line_but_a_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    from fedge import cli
    from fedge.errors import ConfigError

    out = str(tmp_path / "never")
    assert cli.main(["run", "--rounds", "0", "--out", out]) == 2
    assert capsys.readouterr().err.strip() == "fedge run: error: rounds: must be >= 1, got 0"
    with pytest.raises(ConfigError, match="rounds: must be >= 1"):
        cli.main(["--debug", "run", "--rounds", "0", "--out", out])

    def buggy(cfg):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr("fedge.simulation.simulate", buggy)
    with pytest.raises(ValueError, match="a bug, not bad input"):
        cli.main(["run", "--out", out])


def test_typos_get_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'num_clients'"):
        RunConfig.from_mapping({"num_client": 3})
    with pytest.raises(ConfigError, match="did you mean 'fedavg'"):
        build_strategy("fedavgg", {}, {})
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        task_class("digit")
