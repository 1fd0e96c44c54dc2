import pytest

from hnet.config import ConfigError, load_config


def test_override_types_and_nesting():
    cfg = load_config(None, ["train.lr=3e-4", "train.batch_size=128", "connector.kind=mlp", "eval.datasets=a,b"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.batch_size == 128 and cfg.connector.kind == "mlp"
    assert cfg.eval.datasets == ["a", "b"]


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"train\.lrr.*did you mean 'lr'"):
        load_config(None, ["train.lrr=1"])


def test_wrong_type_names_field():
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected an integer"):
        load_config(None, ["train.batch_size=big"])


def test_bad_choice_names_field():
    with pytest.raises(ConfigError, match=r"connector\.kind.*'mpl'.*did you mean 'mlp'"):
        load_config(None, ["connector.kind=mpl"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="--config: file not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    for name in ("demo", "cc595k_ie12", "cc595k_ie30", "cc595k_9x3"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.train.batch_size > 0


def test_research_zoo_is_9_image_by_3_text_encoders():
    from hnet.models.encoders import read_encoder_list

    cfg = load_config("configs/cc595k_9x3.yaml")
    assert len(read_encoder_list(cfg.encoders)) == 9
    assert cfg.texts == [f"sentence-transformers/{n}" for n in
                         ("all-MiniLM-L12-v2", "all-mpnet-base-v2", "all-roberta-large-v1")]
    assert load_config("configs/cc595k_ie12.yaml").texts == ["all-MiniLM-L6-v2"]  # text_encoder: one text encoder


def test_text_encoder_conflicting_with_text_encoders_refused():
    with pytest.raises(ConfigError, match="text_encoder: 'c' is not one of text_encoders"):
        load_config(None, ["text_encoders=[a,b]", "text_encoder=c"])
    assert load_config(None, ["text_encoders=[a,b]", "text_encoder=b"]).texts == ["a", "b"]


def test_text_spec_split_at_its_comma_refused():
    with pytest.raises(ConfigError, match=r"text_encoders\[2\]: 'pool=cls' is an option without its encoder"):
        load_config(None, ["text_encoders=[a, a@layers=3,pool=cls]"])
    assert load_config(None, ['text_encoders=[a, "a@layers=3,pool=cls"]']).texts == ["a", "a@layers=3,pool=cls"]


def test_text_encoders_listed_twice_refused():
    with pytest.raises(ConfigError, match="text_encoders: listed twice"):
        load_config(None, ["text_encoders=[a,b,a]"])
