import pytest
import yaml

from medseg.config import list_recipes, load_recipe, recipe_from_dict
from medseg.errors import MedsegError


def test_builtin_recipe_loads_with_typed_overrides():
    recipe = load_recipe("unet", ["data.size=128", "train.epochs=2", "model.base_channels=16", "loss.1.smooth=0.5",
                                  "data.augment=[hflip, {name: rotate, degrees: 5}]",
                                  "train.early_stopping={patience: 3}"])
    assert recipe.name == "unet" and "unet" in list_recipes()
    assert recipe.data.hw == (128, 128) and recipe.train.epochs == 2
    assert recipe.model.options() == {"base_channels": 16}
    assert recipe.loss[1].model_dump() == {"name": "dice", "weight": 1.0, "smooth": 0.5, "per_image": True}
    assert recipe.data.augment[1] == {"name": "rotate", "degrees": 5}
    assert recipe.train.early_stopping.patience == 3


@pytest.mark.parametrize("override,message", [
    ("data.sise=1", "data.sise: Extra inputs are not permitted"),
    ("optim.name=rmsprop", "optim.name"),
    ("train.epochs=0", "train.epochs"),
    ("loss.5.weight=1", "loss is a list of 2"),
    ("train.epochs", "expected key=value"),
])
def test_bad_overrides_are_one_clear_error(override, message):
    with pytest.raises(MedsegError, match=message):
        load_recipe("unet", [override])


def test_unknown_recipe_names_the_builtin_ones(tmp_path):
    with pytest.raises(MedsegError, match="unknown recipe 'unet9'; built-in recipes: .*unet"):
        load_recipe("unet9")
    with pytest.raises(MedsegError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_yaml_file_and_run_config_round_trip(tmp_path):
    recipe = load_recipe("unet", ["train.epochs=3"])
    stored = {**recipe.to_dict(), "run": {"data": "/somewhere", "seed": 0}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(stored))
    assert load_recipe(path) == recipe.model_copy(update={"name": "unet"})
    assert recipe_from_dict(stored, ["train.epochs=5"]).train.epochs == 5


@pytest.mark.parametrize("override,message", [
    ("eval.protocol=pranett",
     "eval.protocol: Input should be 'goals', 'infnet', 'm2snet', 'nnunet', 'paper', 'pooled' or 'pranet'"),
    ("data.normalize=imagenett", "data.normalize: Input should be 'imagenet', 'per_image', 'dataset' or 'none'"),
    ("model.depth=5", "model: model 'unet' has no option depth; its options are: base_channels"),
    ("model.name=unett", "model: unknown model 'unett'"),
    ("loss.0.name=bcee", "loss.0: unknown loss 'bcee'"),
    ("loss.1.smoth=1", "loss.1: loss 'dice' has no option smoth"),
    ("data.augment=[hflipp]", "data: unknown augmentation 'hflipp'"),
    ("train.precision=bf16", "train.precision"),
    ("train.precision=64", "train.precision: Input should be 'auto', '32', '16-mixed' or 'bf16-mixed', got '64'"),
])
def test_names_are_checked_against_the_registries_when_the_recipe_loads(override, message):
    with pytest.raises(MedsegError, match=message.replace("(", r"\(")):
        load_recipe("unet", [override])


def test_a_misspelt_protocol_stops_train_before_any_data_is_read(tmp_path):
    from conftest import run_cli

    missing = tmp_path / "no-such-data"  # were the data read first, the error would name this folder
    result = run_cli("train", "--recipe", "unet", "--data", str(missing), "--set", "eval.protocol=pranett",
                     "--out", str(tmp_path / "runs"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "eval.protocol" in lines[0] and "pranett" in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_precision_given_as_a_number_on_the_command_line_is_read_as_its_name():
    assert load_recipe("unet", ["train.precision=32"]).train.precision == "32"  # YAML reads 32 as an integer


def test_every_shipped_recipe_trains_at_sizes_its_network_takes():
    """A recipe whose size, multi-scale sizes or crop the network cannot take fails before the first batch."""
    from medseg.engine.train import check_training_sizes
    from medseg.models.registry import model_info

    for name in list_recipes():
        recipe = load_recipe(name)
        check_training_sizes(recipe, model_info(recipe.model.name).size_multiple)
    with pytest.raises(MedsegError, match="multiples of 16, not \\[100\\]"):
        check_training_sizes(load_recipe("centroidnet_v2", ["data.crop=100"]), 16)
